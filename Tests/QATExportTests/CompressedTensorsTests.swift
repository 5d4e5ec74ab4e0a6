import Foundation
import QATCore
import QATExport
import QATIO
import QATModels
import QATQuant
import TestSupport
import XCTest

/// Every file of a directory, by name.
func directoryBytes(_ dir: String) throws -> [String: [UInt8]] {
    var out: [String: [UInt8]] = [:]
    for f in try FileManager.default.contentsOfDirectory(atPath: dir) { out[f] = try readFile("\(dir)/\(f)") }
    return out
}

final class CompressedTensorsTests: XCTestCase {
    let tiny = Fixtures.path("tiny-llama")

    /// One calibrated model exported in both formats: the two read back to the same model,
    /// bit for bit (weights, input and KV amax), and `qat convert` maps either onto the other
    /// byte for byte.
    func testBothFormatsAndConvertRoundTrip() throws {
        let (model, set) = try ptqModel(tiny)
        let tmp = Fixtures.tempDir("ct-export")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let mo = tmp.appendingPathComponent("modelopt").path, ct = tmp.appendingPathComponent("ct").path
        try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: mo)
        try Exporter.export(
            model: model, quantizers: set, sourceDirectory: tiny, to: ct, options: ExportOptions(format: .compressedTensors))
        XCTAssertEqual(try ExportFormat.of(directory: ct), .compressedTensors)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(ct)/hf_quant_config.json"))

        let a = try ExportedModel.load(directory: mo), b = try ExportedModel.load(directory: ct)
        XCTAssertEqual(a.quantAlgo, "NVFP4"); XCTAssertEqual(b.quantAlgo, "NVFP4"); XCTAssertEqual(b.kvCacheQuantAlgo, "FP8")
        XCTAssertEqual(a.formats, b.formats)
        let pb = b.model.parameterByName
        for p in a.model.parameters {
            let q = try XCTUnwrap(pb[p.name], p.name)
            XCTAssertEqual(p.count, q.count)
            var same = 0
            for i in 0..<p.count where p.value[i].bitPattern == q.value[i].bitPattern { same += 1 }
            XCTAssertEqual(same, p.count, "\(p.name): dequantized weights differ between the formats")
        }
        var amaxCompared = 0
        for q in a.quantizers.all where q.enabled {
            let r = try XCTUnwrap(b.quantizers.byName[q.name], q.name)
            XCTAssertTrue(r.enabled, q.name)
            XCTAssertEqual(q.amax?.bitPattern, r.amax?.bitPattern, q.name)
            amaxCompared += 1
        }
        XCTAssertEqual(amaxCompared, 2 * 7 + 2 * 2, "input quantizers of 14 Linears and 4 KV quantizers")

        // The tensors: renamed, scales as reciprocals of shape [1], KV scales on self_attn.
        let c = try ModelWeights(path: ct)
        XCTAssertEqual(c.info("model.layers.0.self_attn.q_proj.weight_packed")?.dtype, .u8)
        XCTAssertEqual(c.info("model.layers.0.self_attn.q_proj.weight_scale")?.dtype, .f8e4m3)
        XCTAssertEqual(c.info("model.layers.0.self_attn.q_proj.weight_global_scale")?.shape, [1])
        XCTAssertEqual(c.info("model.layers.0.self_attn.q_proj.input_global_scale")?.shape, [1])
        XCTAssertEqual(c.info("model.layers.1.self_attn.k_scale")?.shape, [1])
        XCTAssertNil(c.info("model.layers.1.self_attn.k_proj.k_scale"))
        let m = try ModelWeights(path: mo)
        let s2 = try m.floats("model.layers.0.mlp.up_proj.weight_scale_2")[0],
            g = try c.floats("model.layers.0.mlp.up_proj.weight_global_scale")[0]
        XCTAssertEqual(g, 1 / s2)
        XCTAssertEqual(1 / g, s2, "qat's scales are reciprocal-safe")

        // config.json: the source's keys, then compressed-tensors' quantization_config as
        // the library writes it (the golden fixture's, made by compressed-tensors 0.20.1).
        let cfg = try JSONValue.parseObject(file: "\(ct)/config.json")
        let golden = try JSONValue.parseObject(file: Fixtures.path("ct-tiny-llama/config.json")).object("quantization_config")
        XCTAssertEqual(JSONValue.object(try cfg.object("quantization_config")).serialized(), JSONValue.object(golden).serialized())
        XCTAssertEqual(cfg.keys.last, "quantization_config")
        XCTAssertEqual(Array(cfg.keys.dropLast()), try JSONValue.parseObject(file: "\(tiny)/config.json").keys)

        // qat convert: modelopt → ct equals the direct export, and ct → modelopt the original.
        let ct2 = tmp.appendingPathComponent("ct2").path, mo2 = tmp.appendingPathComponent("mo2").path
        let s = try CompressedTensors.convert(source: mo, to: .compressedTensors, out: ct2)
        XCTAssertEqual(s.from, .modelopt); XCTAssertTrue(s.lossyScales.isEmpty)
        XCTAssertEqual(try directoryBytes(ct2), try directoryBytes(ct))
        try CompressedTensors.convert(source: ct2, to: .modelopt, out: mo2)
        let original = try directoryBytes(mo), back = try directoryBytes(mo2)
        XCTAssertEqual(Set(back.keys), Set(original.keys))
        for (f, bytes) in original { XCTAssertTrue(back[f] == bytes, "\(f) differs after modelopt → compressed-tensors → modelopt") }
    }

    /// The golden export written by compressed-tensors 0.20.1 itself (ModelOptNvfp4Converter,
    /// Tests/Fixtures/make_ct_fixture.py: scalar global scales, bf16 KV scales left on
    /// k_proj/v_proj): qat reads it, and every weight rounded to bf16 is the library's own
    /// decompression (NVFP4PackedCompressor.decompress) bit for bit.
    func testGoldenLibraryExport() throws {
        let dir = Fixtures.path("ct-tiny-llama")
        let e = try ExportedModel.load(directory: dir)
        XCTAssertEqual(e.quantAlgo, "NVFP4"); XCTAssertEqual(e.kvCacheQuantAlgo, "FP8")
        let ref = try SafeTensorsFile(path: "\(dir)/reference.safetensors")
        var compared = 0
        for name in ref.names {
            let want = try ref.floats(name)
            let p = try XCTUnwrap(e.model.parameterByName[name], name)
            var bf = [UInt8](repeating: 0, count: p.count * 2)
            let got = Tensor(shape: [p.count], zeroed: false)
            try bf.withUnsafeMutableBytes { try DTypeConversion.fromFloat(p.value.data, count: p.count, as: .bf16, into: $0.baseAddress!) }
            try bf.withUnsafeBytes { try DTypeConversion.toFloat($0.baseAddress!, dtype: .bf16, count: p.count, into: got.data) }
            var diff = 0
            for i in 0..<p.count where got[i].bitPattern != want[i].bitPattern && !(got[i] == 0 && want[i] == 0) { diff += 1 }
            XCTAssertEqual(diff, 0, "\(name): \(diff) of \(p.count) elements differ from compressed-tensors' decompression")
            compared += 1
        }
        XCTAssertEqual(compared, 14)
        // KV scales from k_proj.k_scale (bf16 there), input scales from the reciprocals.
        let k = try XCTUnwrap(e.quantizers.byName["model.layers.0.self_attn.k_bmm_quantizer"]?.amax)
        XCTAssertEqual(k / 448, Float(2.5 / 448 as Float).roundedToBF16, accuracy: 0)
        let inp = try XCTUnwrap(e.quantizers.byName["model.layers.1.mlp.down_proj.input_quantizer"]?.amax)
        XCTAssertEqual(inp, 3.0, accuracy: 3.0 * 1e-6)
        // And qat converts it to ModelOpt and back to its own compressed-tensors layout.
        let tmp = Fixtures.tempDir("ct-golden")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let mo = tmp.appendingPathComponent("mo").path
        try CompressedTensors.convert(source: dir, to: .modelopt, out: mo)
        let back = try ExportedModel.load(directory: mo)
        for p in e.model.parameters {
            XCTAssertEqual(back.model.parameterByName[p.name]?.value.data[0].bitPattern, p.value.data[0].bitPattern, p.name)
        }
    }

    func testBadInput() throws {
        let tmp = Fixtures.tempDir("ct-bad")
        defer { try? FileManager.default.removeItem(at: tmp) }
        // Not an export.
        XCTAssertThrowsError(try CompressedTensors.convert(source: tiny, to: .compressedTensors, out: tmp.appendingPathComponent("x").path))
        {
            XCTAssertTrue("\($0)".contains("not a quantized export"), "\($0)")
        }
        XCTAssertThrowsError(try ExportFormat.parse("gguf"))
        // FP8 has no nvfp4-pack-quantized layout.
        let (model, set) = try ptqModel(tiny, preset: "fp8_default-kv_fp8")
        let out = tmp.appendingPathComponent("fp8").path
        XCTAssertThrowsError(
            try Exporter.export(
                model: model, quantizers: set, sourceDirectory: tiny, to: out,
                options: ExportOptions(format: .compressedTensors))
        ) {
            XCTAssertTrue("\($0)".contains("compressed-tensors writes NVFP4"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: out), "nothing half-written")
        // A compressed-tensors config qat does not read (int4 pack-quantized).
        let ct = tmp.appendingPathComponent("int4").path
        try FileManager.default.createDirectory(atPath: ct, withIntermediateDirectories: true)
        var cfg = try JSONValue.parseObject(file: "\(Fixtures.path("ct-tiny-llama"))/config.json")
        var qc = try cfg.object("quantization_config")
        qc.set("format", .string("pack-quantized"))
        cfg.set("quantization_config", .object(qc))
        try cfg.write(toFile: "\(ct)/config.json")
        try FileManager.default.copyItem(atPath: "\(Fixtures.path("ct-tiny-llama"))/model.safetensors", toPath: "\(ct)/model.safetensors")
        XCTAssertThrowsError(try ExportedModel.load(directory: ct)) { XCTAssertTrue("\($0)".contains("pack-quantized"), "\($0)") }
    }
}

extension Float {
    /// Round to nearest even bf16, as a float.
    var roundedToBF16: Float {
        let b = bitPattern
        let r = (b &+ 0x7FFF &+ ((b >> 16) & 1)) & 0xFFFF_0000
        return Float(bitPattern: r)
    }
}
