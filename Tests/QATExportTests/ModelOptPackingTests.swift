import Foundation
import QATCore
import QATExport
import QATIO
import QATModels
import QATQuant
import TestSupport
import XCTest

/// The bytes `Exporter.export` writes, against ModelOpt's own packing of the same weights
/// (`Tests/Fixtures/nvfp4_reference.safetensors`, made by `NVFP4QTensor.quantize` in
/// `Tests/Fixtures/make_fixtures.py`), not against our own dequantization: each fixture
/// case becomes the top-left corner of a zeroed `down_proj` weight of tiny-llama, the model
/// is calibrated (max) and exported through the whole path (plan, amax, scales, packing,
/// file layout), and the stored `weight`, `weight_scale` and `weight_scale_2` are compared
/// byte for byte.
///
/// `weight_scale_2` is `amax / 2688` correctly rounded, as ModelOpt computes it on the CPU
/// (the fixture). ModelOpt on CUDA gets `amax * fp32(1/2688)` (PyTorch turns a division by
/// a CPU scalar into a multiplication by its reciprocal), which is 1 ulp off for some amax
/// and then flips exact E2M1 ties. We match the division: it is the IEEE value of the
/// formula ModelOpt writes, the same on every device, and the one the reference fixture
/// holds; loaders read the stored scale, so either file decodes consistently.
final class ModelOptPackingTests: XCTestCase {
    static let cases = ["normal", "outliers", "with_zero_block", "tiny", "huge", "ties", "bf16_weight"]

    func testExportedBytesEqualModelOptPacking() throws {
        var compared = 0
        let ref = try SafeTensorsFile(path: Fixtures.path("nvfp4_reference.safetensors"))
        let tiny = Fixtures.path("tiny-llama")
        for name in Self.cases {
            let shape = try XCTUnwrap(ref.info("\(name).input")?.shape, name)
            let rows = shape[0], cols = shape[1]
            let x = try ref.floats("\(name).input")
            let model = try CausalLM(directory: tiny)
            let linear = try XCTUnwrap(model.layers[1].downProj)
            let (R, C) = (linear.outFeatures, linear.inFeatures)
            XCTAssertTrue(rows <= R && cols <= C && cols % 16 == 0, name)
            let w = linear.weight.value
            w.zero()
            for r in 0..<rows { for c in 0..<cols { w[r * C + c] = x[r * cols + c] } }
            model.markWeightsChanged()
            let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_weight_only"))
            let seqs = randomSequences(count: 2, seqLen: 16, vocab: model.config.vocabSize, seed: 7)
            try Calibration.run(model: model, quantizers: set, sequences: seqs, seqLen: 16, batchSize: 2)
            let tmp = Fixtures.tempDir("export-modelopt")
            defer { try? FileManager.default.removeItem(at: tmp) }
            let out = tmp.appendingPathComponent("e").path
            _ = try Exporter.export(model: model, quantizers: set, sourceDirectory: tiny, to: out)
            let ck = try ModelWeights(path: out)
            let n = linear.name
            let gs = try ck.floats("\(n).weight_scale_2")
            let refGlobalScale = try ref.floats("\(name).global_scale").array
            // Calibration snaps a scale that is not the exact reciprocal of a float to its nearest
            // neighbour that is (a few ulps), so that the ModelOpt and compressed-tensors exports
            // (which stores 1/scale) hold the same model (StoredScale.nvfp4Scale). There the bytes
            // legitimately differ from ModelOpt's; everywhere else they must be equal.
            if let r = refGlobalScale.first, !StoredScale.isReciprocalSafe(r) {
                let g = try XCTUnwrap(gs.array.first)
                XCTAssertTrue(StoredScale.isReciprocalSafe(g), "\(name): snapped scale \(g) is reciprocal-safe")
                XCTAssertLessThanOrEqual(abs(Int(g.bitPattern) - Int(r.bitPattern)), 16, "\(name): \(g) within a few ulps of \(r)")
                continue
            }
            XCTAssertEqual(gs.array.map(\.bitPattern), refGlobalScale.map(\.bitPattern), "\(name) weight_scale_2")
            let packed = try ck.bytes("\(n).weight"), scales = try ck.bytes("\(n).weight_scale")
            let refPacked = try ref.bytes("\(name).packed"), refScales = try ref.bytes("\(name).block_scale_e4m3")
            XCTAssertEqual(packed.count, R * C / 2); XCTAssertEqual(scales.count, R * C / 16)
            var badPacked = 0, badScales = 0
            for r in 0..<R {
                for c in stride(from: 0, to: C, by: 2) {
                    let expected = r < rows && c < cols ? refPacked[r * cols / 2 + c / 2] : 0  // zeros pack to code 0
                    if packed[r * C / 2 + c / 2] != expected { badPacked += 1 }
                }
                for b in 0..<(C / 16) {
                    // An all-zero block gets scale 1.0 (E4M3 0x38), as ModelOpt's does.
                    let expected = r < rows && b < cols / 16 ? refScales[r * cols / 16 + b] : 0x38
                    if scales[r * C / 16 + b] != expected { badScales += 1 }
                }
            }
            XCTAssertEqual(badPacked, 0, "\(name): packed bytes differing from ModelOpt's")
            XCTAssertEqual(badScales, 0, "\(name): block scales differing from ModelOpt's")
            compared += 1
        }
        XCTAssertGreaterThanOrEqual(compared, 5, "most fixture cases are compared byte for byte")
    }

    /// The two ways of computing the global scale differ: the choice above is not moot.
    func testDivisionAndReciprocalGlobalScalesDiffer() throws {
        let reciprocal = Float(1) / 2688
        var differ = 0
        var g = SplitMix64(seed: 5)
        for _ in 0..<10_000 {
            let amax = Float(bitPattern: UInt32(0x3C00_0000) + UInt32(truncatingIfNeeded: g.next() % 0x0800_0000))
            let gs = NVFP4.globalScale(amax: amax)
            XCTAssertEqual(gs.bitPattern, (amax / 2688).bitPattern)
            if gs != amax * reciprocal { differ += 1; XCTAssertLessThanOrEqual(abs(gs - amax * reciprocal), gs.ulp) }
        }
        XCTAssertGreaterThan(differ, 100, "amax * (1/2688) should differ from amax / 2688 by an ulp for many amax")
    }
}
