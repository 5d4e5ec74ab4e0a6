import Foundation
import QATCore
import QATData
import QATExport
import QATIO
import QATModels
import QATQuant
import QATTrain
import TestSupport
import XCTest

/// Deterministic token sequences for calibrating the random-weight fixtures.
func randomSequences(count: Int, seqLen: Int, vocab: Int, seed: UInt64) -> [[Int32]] {
    var s = seed
    func next() -> Int32 {
        s = s &* 6364136223846793005 &+ 1442695040888963407
        return Int32((s >> 33) % UInt64(vocab))
    }
    return (0..<count).map { _ in (0..<seqLen).map { _ in next() } }
}

/// A calibrated fake-quant model of a fixture directory.
func ptqModel(_ dir: String, preset: String = "nvfp4_default-kv_fp8", config: QuantConfig? = nil) throws -> (CausalLM, QuantizerSet) {
    let model = try CausalLM(directory: dir)
    let set = QuantizerSet(model: model, config: try config ?? QuantConfig.preset(preset))
    let seqs = randomSequences(count: 8, seqLen: 32, vocab: model.config.vocabSize, seed: 7)
    try Calibration.run(model: model, quantizers: set, sequences: seqs, seqLen: 32, batchSize: 4)
    Exporter.snapScales(model: model, quantizers: set)
    return (model, set)
}

func readText(_ path: String) throws -> String {
    String(decoding: try readFile(path), as: UTF8.self)
}

final class ExportFormatTests: XCTestCase {
    let tiny = Fixtures.path("tiny-llama")

    func testConfigDTypeRewriteAndKeyOrder() throws {
        let (model, set) = try ptqModel(tiny)
        let tmp = Fixtures.tempDir("export-dtype")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let original = try readText("\(tiny)/config.json")
        let originalKeys = try JSONValue.parseObject(file: "\(tiny)/config.json").keys

        // save_dtype float16 on a config with "dtype".
        let f16 = tmp.appendingPathComponent("f16").path
        try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: f16, options: ExportOptions(saveDtype: .f16))
        let c16 = try JSONValue.parseObject(file: "\(f16)/config.json")
        XCTAssertEqual(c16.keys, originalKeys + ["quantization_config"])
        XCTAssertEqual(try c16.string("dtype"), "float16")
        XCTAssertFalse(c16.contains("torch_dtype"))
        let ck16 = try ModelWeights(path: f16)
        for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"] {
            XCTAssertEqual(ck16.info(name)?.dtype, .f16, name)
        }
        XCTAssertEqual(ck16.info("model.layers.0.self_attn.q_proj.weight")?.dtype, .u8)
        // Every other key and value unchanged.
        var back = c16
        back.remove("quantization_config")
        back.set("dtype", "bfloat16")
        XCTAssertEqual(back.fileText, original)

        // A config with only "torch_dtype".
        let src2 = tmp.appendingPathComponent("src-torch-dtype").path
        try FileManager.default.createDirectory(atPath: src2, withIntermediateDirectories: true)
        for f in ["model.safetensors", "generation_config.json"] {
            try FileManager.default.copyItem(atPath: "\(tiny)/\(f)", toPath: "\(src2)/\(f)")
        }
        let torchText = original.replacingOccurrences(of: "\"dtype\": \"bfloat16\"", with: "\"torch_dtype\": \"bfloat16\"")
        XCTAssertNotEqual(torchText, original)
        try torchText.write(toFile: "\(src2)/config.json", atomically: true, encoding: .utf8)
        let out2 = tmp.appendingPathComponent("f16-torch").path
        try Exporter.export(model: model, quantizers: set, sourceDirectory: src2, to: out2, options: ExportOptions(saveDtype: .f16))
        let c2 = try JSONValue.parseObject(file: "\(out2)/config.json")
        XCTAssertEqual(try c2.string("torch_dtype"), "float16")
        XCTAssertFalse(c2.contains("dtype"))
        var back2 = c2
        back2.remove("quantization_config")
        back2.set("torch_dtype", "bfloat16")
        XCTAssertEqual(back2.fileText, torchText)

        // save_dtype nil: config.json byte-identical except for the appended block; tensors keep BF16.
        let keep = tmp.appendingPathComponent("keep").path
        let summary = try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: keep)
        let exported = try readText("\(keep)/config.json")
        XCTAssertTrue(original.hasSuffix("\n}\n"))
        let head = String(original.dropLast(3))
        XCTAssertTrue(
            exported.hasPrefix(head + ",\n  \"quantization_config\": {"), "config.json must be the original text with the block appended")
        var stripped = try JSONValue.parseObject(file: "\(keep)/config.json")
        XCTAssertEqual(stripped.remove("quantization_config"), .object(summary.quantizationConfig))
        XCTAssertEqual(stripped.fileText, original)
        let ck = try ModelWeights(path: keep)
        XCTAssertEqual(ck.info("model.embed_tokens.weight")?.dtype, .bf16)
        XCTAssertEqual(ck.info("lm_head.weight")?.dtype, .bf16)
        // generation_config.json copied byte for byte.
        XCTAssertEqual(try readFile("\(keep)/generation_config.json"), try readFile("\(tiny)/generation_config.json"))
    }

    func testPackedWeightsScalesAndConfigs() throws {
        let (model, set) = try ptqModel(tiny)
        let tmp = Fixtures.tempDir("export-nvfp4")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let out = tmp.appendingPathComponent("e").path
        let summary = try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out)
        XCTAssertTrue(summary.weightMismatches.isEmpty, "\(summary.weightMismatches)")
        let ck = try ModelWeights(path: out)
        var expectedNames = Set<String>()
        for layer in model.layers {
            for l in layer.linears {
                let wq = try XCTUnwrap(set.byName[l.name + ".weight_quantizer"]),
                    iq = try XCTUnwrap(set.byName[l.name + ".input_quantizer"])
                let amax = try XCTUnwrap(wq.amax)
                let q = NVFP4.quantize(Array(l.weight.value.buffer), rows: l.outFeatures, cols: l.inFeatures, globalAmax: amax)
                let w = try XCTUnwrap(ck.info(l.name + ".weight"))
                XCTAssertEqual(w.dtype, .u8); XCTAssertEqual(w.shape, [l.outFeatures, l.inFeatures / 2])
                XCTAssertEqual(Array(try ck.bytes(l.name + ".weight")), q.packed, l.name)
                let s = try XCTUnwrap(ck.info(l.name + ".weight_scale"))
                XCTAssertEqual(s.dtype, .f8e4m3); XCTAssertEqual(s.shape, [l.outFeatures, l.inFeatures / 16])
                XCTAssertEqual(Array(try ck.bytes(l.name + ".weight_scale")), q.scales, l.name)
                for (n, v) in [("weight_scale_2", amax / 2688), ("input_scale", try XCTUnwrap(iq.amax) / 2688)] {
                    let i = try XCTUnwrap(ck.info("\(l.name).\(n)"))
                    XCTAssertEqual(i.dtype, .f32); XCTAssertEqual(i.shape, [], "\(n) must be a scalar of shape []")
                    XCTAssertEqual(try ck.floats("\(l.name).\(n)")[0].bitPattern, v.bitPattern, "\(l.name).\(n)")
                }
                expectedNames.formUnion(["weight", "weight_scale", "weight_scale_2", "input_scale"].map { "\(l.name).\($0)" })
            }
            // Fused groups share both global scales.
            for group in layer.fusedGroups {
                for n in ["weight_scale_2", "input_scale"] {
                    let values = try group.map { try ck.floats("\($0.name).\(n)")[0] }
                    XCTAssertEqual(Set(values).count, 1, "\(group.map(\.name)) \(n) \(values)")
                }
            }
            for (kind, proj) in [("k", layer.kProj), ("v", layer.vProj)] {
                let name = "\(proj.name).\(kind)_scale"
                let i = try XCTUnwrap(ck.info(name))
                XCTAssertEqual(i.shape, []); XCTAssertEqual(i.dtype, .f32)
                let amax = try XCTUnwrap(set.byName["\(layer.prefix).self_attn.\(kind)_bmm_quantizer"]?.amax)
                XCTAssertEqual(try ck.floats(name)[0], amax / 448)
                expectedNames.insert(name)
            }
        }
        // Everything else unquantized, nothing else written.
        for p in model.parameters where !expectedNames.contains(p.name) { expectedNames.insert(p.name) }
        XCTAssertEqual(Set(ck.names), expectedNames)
        XCTAssertEqual(ck.info("lm_head.weight")?.dtype, .bf16)
        XCTAssertFalse(ck.names.contains { $0.contains("amax") || $0.contains("quantizer") })

        XCTAssertEqual(
            try readText("\(out)/hf_quant_config.json"),
            """
            {
                "producer": {
                    "name": "qat",
                    "version": "\(qatExportVersion)"
                },
                "quantization": {
                    "quant_algo": "NVFP4",
                    "kv_cache_quant_algo": "FP8",
                    "group_size": 16,
                    "exclude_modules": [
                        "lm_head"
                    ]
                }
            }
            """)
        let qc = try JSONValue.parseObject(file: "\(out)/config.json").object("quantization_config")
        XCTAssertEqual(
            JSONValue.object(qc).serialized(indent: nil),
            """
            {"config_groups":{"group_0":{"input_activations":{"dynamic":false,"num_bits":4,"type":"float","group_size":16},\
            "weights":{"dynamic":false,"num_bits":4,"type":"float","group_size":16},"targets":["Linear"]}},"ignore":["lm_head"],\
            "quant_algo":"NVFP4","kv_cache_scheme":{"dynamic":false,"num_bits":8,"type":"float"},\
            "producer":{"name":"qat","version":"\(qatExportVersion)"},"quant_method":"modelopt"}
            """)
    }

    func testShardedIndexListsEveryTensorOnce() throws {
        let (model, set) = try ptqModel(tiny)
        let tmp = Fixtures.tempDir("export-shard")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let out = tmp.appendingPathComponent("e").path
        var opts = ExportOptions(saveDtype: .bf16, maxShardBytes: 100_000)
        opts.checkFreeSpace = true
        let summary = try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out, options: opts)
        let shards = summary.files.filter { $0.hasSuffix(".safetensors") }
        XCTAssertGreaterThan(shards.count, 2)
        XCTAssertFalse(summary.files.contains("model.safetensors"))
        let index = try JSONValue.parseObject(file: "\(out)/model.safetensors.index.json")
        let map = try index.object("weight_map")
        var inShards: [String] = []
        for s in shards { inShards += try SafeTensorsFile(path: "\(out)/\(s)").names }
        XCTAssertEqual(inShards.count, Set(inShards).count, "a tensor appears in two shards")
        XCTAssertEqual(map.keys.sorted(), inShards.sorted())
        XCTAssertEqual(Set(map.keys).count, map.count)
        for (name, file) in map.entries { XCTAssertTrue(try SafeTensorsFile(path: "\(out)/\(file.stringValue!)").names.contains(name)) }
        XCTAssertEqual(try index.object("metadata").int("total_size"), summary.tensorBytes)
        // The sharded export reads back.
        _ = try ExportedModel.load(directory: out)
    }

    func testNoHalfWrittenExport() throws {
        let (model, set) = try ptqModel(tiny)
        let tmp = Fixtures.tempDir("export-atomic")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let out = tmp.appendingPathComponent("e").path
        struct Injected: Error {}
        var opts = ExportOptions()
        var sawFiles: [String] = []
        opts.beforeCommit = { dir in
            sawFiles = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
            throw Injected()
        }
        XCTAssertThrowsError(try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out, options: opts)) {
            XCTAssertTrue($0 is Injected)
        }
        XCTAssertTrue(
            sawFiles.contains("model.safetensors") && sawFiles.contains("config.json"),
            "the failure came after the files were written: \(sawFiles)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp.path), [], "no temporary leftovers")

        // A failing re-export leaves the previous complete export untouched.
        try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out)
        let before = try readFile("\(out)/model.safetensors")
        XCTAssertThrowsError(try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out, options: opts))
        XCTAssertEqual(try readFile("\(out)/model.safetensors"), before)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp.path), ["e"])

        // An unwritable target (its parent is a regular file): a clear error, nothing created.
        let blocker = tmp.appendingPathComponent("file").path
        try "x".write(toFile: blocker, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: "\(blocker)/e"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: tmp.path).sorted(), ["e", "file"])

        // Not enough space: refused before anything is written.
        XCTAssertThrowsError(try Exporter.ensureFreeSpace(bytes: Int.max / 2, near: out)) {
            XCTAssertTrue("\($0)".contains("not enough disk space"), "\($0)")
        }
        // The source directory is never a target.
        XCTAssertThrowsError(try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: tiny + "/"))
    }

    func testRoundTripReproducesFakeQuantLogits() throws {
        for (fixture, preset) in [
            ("tiny-llama", "nvfp4_default-kv_fp8"), ("tiny-qwen3", "nvfp4_default-kv_fp8"), ("tiny-llama", "nvfp4_weight_only"),
        ] {
            let dir = Fixtures.path(fixture)
            let (model, set) = try ptqModel(dir, preset: preset)
            let tmp = Fixtures.tempDir("export-rt")
            defer { try? FileManager.default.removeItem(at: tmp) }
            let out = tmp.appendingPathComponent("e").path
            let summary = try Exporter.export(model: model, quantizers: set, sourceDirectory: dir, to: out)
            XCTAssertTrue(summary.weightMismatches.isEmpty)
            XCTAssertTrue(summary.unrecoverableScales.isEmpty)
            if model.config.tieWordEmbeddings {
                XCTAssertNil(try ModelWeights(path: out).info("lm_head.weight"), "a tied lm_head is written once")
            }
            let loaded = try loadModelForEval(directory: out)
            let exported = try ExportedModel.load(directory: out)
            // Scales invert exactly.
            for (name, q) in exported.quantizers.byName where q.enabled {
                let original = try XCTUnwrap(set.byName[name]?.amax)
                let a = try XCTUnwrap(q.amax)
                if case .nvfp4 = q.format {
                    XCTAssertEqual((a / 2688).bitPattern, (original / 2688).bitPattern, name)
                } else {
                    XCTAssertEqual((a / 448).bitPattern, (original / 448).bitPattern, name)
                }
            }
            let seqs = randomSequences(count: 4, seqLen: 33, vocab: model.config.vocabSize, seed: 99)
            // Bound: exact. The weights decode to the fake-quant weights bit for bit (no
            // mismatches above), and every activation quantizer gets the same scale.
            let cmp = try Verification.compare(reference: model, candidate: loaded, sequences: seqs)
            XCTAssertEqual(cmp.maxAbsDiff, 0, "\(fixture) \(preset): max |Δlogit| \(cmp.maxAbsDiff)")
            XCTAssertEqual(cmp.identical, cmp.count)
        }
    }

    func testFP8AndMixedPrecision() throws {
        // FP8 W8A8 with FP8 KV.
        let (model, set) = try ptqModel(tiny, preset: "fp8_default-kv_fp8")
        let tmp = Fixtures.tempDir("export-fp8")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let out = tmp.appendingPathComponent("fp8").path
        let summary = try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out)
        let ck = try ModelWeights(path: out)
        let q0 = "model.layers.0.self_attn.q_proj"
        XCTAssertEqual(ck.info("\(q0).weight")?.dtype, .f8e4m3)
        XCTAssertEqual(ck.info("\(q0).weight_scale")?.shape, [])
        XCTAssertEqual(ck.info("\(q0).input_scale")?.shape, [])
        XCTAssertNil(ck.info("\(q0).weight_scale_2"))
        let amax = try XCTUnwrap(set.byName["\(q0).weight_quantizer"]?.amax)
        XCTAssertEqual(try ck.floats("\(q0).weight_scale")[0], amax / 448)
        let w = model.linears[0].weight.value
        let codes = try ck.bytes("\(q0).weight")
        for i in 0..<w.count { XCTAssertEqual(codes[i], floatToE4M3(w[i] / (amax / 448))) }
        let hf = try JSONValue.parseObject(file: "\(out)/hf_quant_config.json").object("quantization")
        XCTAssertEqual(hf.keys, ["quant_algo", "kv_cache_quant_algo", "exclude_modules"])
        XCTAssertEqual(try hf.string("quant_algo"), "FP8")
        XCTAssertEqual(
            try JSONValue.parseObject(file: "\(out)/config.json").object("quantization_config").object("config_groups").object("group_0")
                .keys,
            ["input_activations", "weights", "targets"])
        // The export's per-weight mismatch counts, checked independently: the model's own
        // fake-quant weight against the stored codes decoded. Where they differ, the fake quant
        // (code / (448/amax)) and the decoded export (code · amax/448) are 1 ulp apart, or, on an
        // E4M3 rounding boundary of x·(448/amax) vs x/(amax/448), one code apart (measured: one
        // element of tiny-llama).
        var expected: [String: Int] = [:]
        for l in model.linears {
            guard let wq = set.byName[l.name + ".weight_quantizer"], wq.enabled, let a = wq.amax else { continue }
            let w = l.weight.value
            var fq = [Float](repeating: .nan, count: w.count)
            try fq.withUnsafeMutableBufferPointer { try wq.forward(w.data, $0.baseAddress!, rows: l.outFeatures, cols: l.inFeatures) }
            let scale = try ck.floats("\(l.name).weight_scale")[0]
            XCTAssertEqual(scale, a / 448, l.name)
            let stored = try ck.bytes("\(l.name).weight")
            var n = 0
            for i in 0..<w.count {
                let dq = e4m3ToFloat(stored[i]) * scale
                guard dq != fq[i] else { continue }
                n += 1
                let neighbours = [stored[i] &- 1, stored[i] &+ 1].map { e4m3ToFloat($0) * scale }
                let ulpApart = abs(dq - fq[i]) <= max(abs(dq), abs(fq[i])).ulp
                let codeApart = neighbours.contains { abs($0 - fq[i]) <= 2 * fq[i].ulp }
                XCTAssertTrue(ulpApart || codeApart, "\(l.name)[\(i)]: \(dq) vs \(fq[i])")
            }
            if n > 0 { expected[l.weight.name] = n }
        }
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: summary.weightMismatches.map { ($0.name, $0.elements) }), expected)
        // FP8 weights are not bit-exact with ModelOpt's multiply-form fake quant; the
        // an element on an E4M3 rounding boundary lands on the neighbouring code (counted above): far below the bound.
        let loaded = try loadModelForEval(directory: out)
        let cmp = try Verification.compare(
            reference: model, candidate: loaded, sequences: randomSequences(count: 2, seqLen: 17, vocab: 512, seed: 3))
        XCTAssertLessThan(cmp.maxAbsDiff, 1e-3)

        // Mixed: NVFP4 everywhere, FP8 down_proj.
        var cfg = try QuantConfig.preset("nvfp4_default-kv_fp8")
        cfg.entries += [QuantConfig.Entry("*down_proj*", cfg: .fp8)]
        let (m2, s2) = try ptqModel(tiny, config: cfg)
        let out2 = tmp.appendingPathComponent("mixed").path
        try Exporter.export(model: m2, quantizers: s2, sourceDirectory: tiny, to: out2)
        let hf2 = try JSONValue.parseObject(file: "\(out2)/hf_quant_config.json").object("quantization")
        XCTAssertEqual(hf2.keys, ["quant_algo", "kv_cache_quant_algo", "quantized_layers"])
        XCTAssertEqual(try hf2.string("quant_algo"), "MIXED_PRECISION")
        let layers = try hf2.object("quantized_layers")
        XCTAssertEqual(layers.count, 14)
        XCTAssertEqual(layers["model.layers.0.mlp.down_proj"], ["quant_algo": "FP8"])
        XCTAssertEqual(layers["model.layers.1.self_attn.o_proj"], ["quant_algo": "NVFP4", "group_size": 16])
        let qc2 = try JSONValue.parseObject(file: "\(out2)/config.json").object("quantization_config")
        XCTAssertEqual(
            qc2.keys, ["config_groups", "quantized_layers", "ignore", "quant_algo", "kv_cache_scheme", "producer", "quant_method"])
        let groups = try qc2.object("config_groups")
        XCTAssertEqual(groups.keys, ["group_0", "group_1"])
        XCTAssertEqual(try groups.object("group_1").strings("targets"), ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"])
        let loaded2 = try ExportedModel.load(directory: out2)
        XCTAssertEqual(loaded2.formats["model.layers.0.mlp.down_proj"], .fp8)
        XCTAssertEqual(loaded2.formats["model.layers.0.mlp.up_proj"], .nvfp4)
        XCTAssertEqual(loaded2.formats["lm_head"], LinearExportFormat.none)
    }

    func testErrors() throws {
        let (model, set) = try ptqModel(tiny)
        let tmp = Fixtures.tempDir("export-err")
        defer { try? FileManager.default.removeItem(at: tmp) }
        // Fused group with two global scales.
        let k = try XCTUnwrap(set.byName["model.layers.0.self_attn.k_proj.weight_quantizer"])
        let saved = k.amax
        k.amax = saved! * 2
        XCTAssertThrowsError(
            try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: tmp.appendingPathComponent("a").path)
        ) {
            XCTAssertTrue("\($0)".contains("fused GEMM"), "\($0)")
        }
        k.amax = saved
        // Uncalibrated quantizer.
        let fresh = try CausalLM(directory: tiny)
        let unset = QuantizerSet(model: fresh, config: try QuantConfig.preset("nvfp4_default"))
        XCTAssertThrowsError(
            try Exporter.export(model: fresh, quantizers: unset, sourceDirectory: tiny, to: tmp.appendingPathComponent("b").path)
        ) {
            XCTAssertTrue("\($0)".contains("never calibrated"), "\($0)")
        }
        // Unknown quant_algo when reading back.
        let out = tmp.appendingPathComponent("c").path
        try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out)
        let hfPath = "\(out)/hf_quant_config.json"
        try readText(hfPath).replacingOccurrences(of: "\"NVFP4\"", with: "\"W4A8_AWQ\"").write(
            toFile: hfPath, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try loadModelForEval(directory: out)) { XCTAssertTrue("\($0)".contains("W4A8_AWQ"), "\($0)") }
        // Without hf_quant_config.json the config.json block is read instead.
        try FileManager.default.removeItem(atPath: hfPath)
        XCTAssertEqual(try ExportedModel.load(directory: out).quantAlgo, "NVFP4")
        XCTAssertEqual(try ExportedModel.load(directory: out).kvCacheQuantAlgo, "FP8")
        // A plain model directory falls back to plain loading.
        XCTAssertEqual(try loadModelForEval(directory: tiny).parameters.count, model.parameters.count)
    }

    func testExcludeModulesSummary() {
        let q = (0..<12).flatMap { i in ["q_proj", "down_proj"].map { "model.layers.\(i).x.\($0)" } }
        XCTAssertEqual(ExportPlan.summarizeExcludeModules(unquantized: ["lm_head"], quantized: q), ["lm_head"])
        // A whole layer: one prefix wildcard; layer 1 must not swallow layers 10 and 11.
        let layer1 = ["model.layers.1.x.q_proj", "model.layers.1.x.down_proj"]
        XCTAssertEqual(
            ExportPlan.summarizeExcludeModules(unquantized: layer1 + ["lm_head"], quantized: q.filter { !layer1.contains($0) }),
            ["lm_head", "model.layers.1.*"])
        let layer3 = ["model.layers.3.x.q_proj", "model.layers.3.x.down_proj"]
        XCTAssertEqual(
            ExportPlan.summarizeExcludeModules(unquantized: layer3, quantized: q.filter { !layer3.contains($0) }), ["model.layers.3*"])
        XCTAssertEqual(
            ExportPlan.summarizeExcludeModules(
                unquantized: ["model.layers.0.x.down_proj"], quantized: q.filter { $0 != "model.layers.0.x.down_proj" }),
            ["model.layers.0.x.down_proj"])
    }
}

/// fortune-lm with the recipe defaults (nvfp4_default-kv_fp8, max calibration on tokens.h5).
final class FortuneLMExportTests: XCTestCase {
    func testPTQExportEvalMatchesFakeQuantAndSize() throws {
        let dir = Fixtures.fortuneLM
        var recipe = Recipe()
        recipe.data.train = "\(dir)/tokens.h5"
        recipe.data.validation = "\(dir)/tokens.h5"
        let model = try CausalLM(directory: dir)
        let set = try XCTUnwrap(try recipe.quantizePTQ(model: model, modelDirectory: dir, quiet: true))
        // Without snapping, some KV amax are not recoverable from amax/448.
        let unsnapped = Exporter.unrecoverableScales(set)
        let snaps = Exporter.snapScales(model: model, quantizers: set)
        XCTAssertTrue(Exporter.unrecoverableScales(set).isEmpty)
        XCTAssertTrue(snaps.allSatisfy { abs(Int($0.to.bitPattern) - Int($0.from.bitPattern)) <= 2 }, "\(snaps)")
        print("fortune-lm: \(unsnapped.count) FP8 amax not recoverable before snapping; \(snaps.count) amax snapped by ≤ 2 ulp")
        let tmp = Fixtures.tempDir("export-fortune")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let out = tmp.appendingPathComponent("fortune-lm-nvfp4").path
        let summary = try Exporter.export(model: model, quantizers: set, sourceDirectory: dir, to: out)
        XCTAssertTrue(summary.weightMismatches.isEmpty, "\(summary.weightMismatches)")
        XCTAssertEqual(
            summary.files,
            [
                "config.json", "generation_config.json", "hf_quant_config.json", "model.safetensors",
                "tokenizer.json", "tokenizer_config.json",
            ])

        let stream = try TokenData.load(
            path: recipe.data.validation, split: "validation", modelDirectory: dir,
            vocabSize: model.config.vocabSize)
        let ref = try Evaluation.evaluate(model: model, stream: stream, seqLen: 256, maxSequences: 16)
        let exported = try loadModelForEval(directory: out)
        let reread = try ExportedModel.load(directory: out)
        for (name, q) in reread.quantizers.byName where q.enabled {
            XCTAssertEqual(q.amax, set.byName[name]?.amax, "\(name): the loader recovers the snapped amax exactly")
        }
        let exp = try Evaluation.evaluate(model: exported, stream: stream, seqLen: 256, maxSequences: 16)
        XCTAssertEqual(exp.loss, ref.loss, accuracy: 1e-4)
        let seqs = try Calibration.sequences(from: stream, seqLen: 256, count: 4)
        let cmp = try Verification.compare(reference: model, candidate: exported, sequences: seqs)
        XCTAssertEqual(cmp.maxAbsDiff, 0)

        let bf16 = try FileManager.default.attributesOfItem(atPath: "\(dir)/model.safetensors")[.size] as! Int
        let fp4 = try FileManager.default.attributesOfItem(atPath: "\(out)/model.safetensors")[.size] as! Int
        let factor = Double(bf16) / Double(fp4)
        print(
            String(
                format: "fortune-lm: fake-quant loss %.6f, export loss %.6f, max |Δlogit| %g, bf16 %d B, export %d B, factor %.2fx",
                ref.loss, exp.loss, cmp.maxAbsDiff, bf16, fp4, factor))
        XCTAssertGreaterThan(factor, 1.8)
    }
}
