import Foundation
import QATCore
import QATExport
import QATIO
import QATModels
import QATQuant
import TestSupport
import XCTest

/// Quantizer placement, calibration and export of the MoE fixtures (ModelOpt's rules).
final class MoEExportTests: XCTestCase {
    /// Every expert Linear (and the shared expert) gets weight and input quantizers under
    /// ModelOpt's names; routers and the shared-expert gate stay unquantized (ModelOpt's
    /// default disabled list: *mlp.gate.*, *block_sparse_moe.gate*, *mlp.shared_expert_gate.*).
    /// Calibration runs every expert on every token (ModelOpt's `_QuantMoeSparseMoe`), so the
    /// gate/up input amax is the same for all experts of a layer.
    func testPlacementAndAllExpertCalibration() throws {
        for fixture in ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-mixtral", "tiny-qwen2-moe-b"] {
            let (model, set) = try ptqModel(Fixtures.path(fixture))
            for layer in model.layers {
                guard let moe = layer.moe else {
                    XCTAssertNotNil(set.byName["\(layer.prefix).mlp.gate_proj.weight_quantizer"]?.amax, "\(fixture): dense layer quantized")
                    continue
                }
                XCTAssertFalse(try XCTUnwrap(set.byName[moe.router.name + ".weight_quantizer"]).enabled, moe.router.name)
                XCTAssertFalse(try XCTUnwrap(set.byName[moe.router.name + ".input_quantizer"]).enabled, moe.router.name)
                XCTAssertNil(moe.router.weightQuantizer)
                if let g = moe.sharedExpertGate {
                    XCTAssertFalse(try XCTUnwrap(set.byName[g.name + ".weight_quantizer"]).enabled, g.name)
                    XCTAssertNil(g.inputQuantizer)
                }
                var experts = moe.experts
                if let s = moe.sharedExpert { experts.append(s) }
                for ex in experts {
                    for l in [ex.gate, ex.up, ex.down] {
                        XCTAssertNotNil(set.byName[l.name + ".weight_quantizer"]?.amax, l.name)
                        XCTAssertNotNil(set.byName[l.name + ".input_quantizer"]?.amax, l.name)
                    }
                    XCTAssertEqual(
                        set.byName[ex.gate.name + ".weight_quantizer"]?.amax, set.byName[ex.up.name + ".weight_quantizer"]?.amax,
                        "\(ex.gate.name): gate/up weight amax shared")
                }
                let inputs = Set(moe.experts.map { set.byName[$0.gate.name + ".input_quantizer"]!.amax! })
                XCTAssertEqual(inputs.count, 1, "\(fixture) \(layer.prefix): every expert observed every token")
                XCTAssertEqual(moe.routedDuringCalibration.reduce(0, +), 8 * 32 * moe.topK, "routed token count")
            }
        }
    }

    /// ModelOpt's `set_expert_quantizer_amax`: an expert input quantizer without amax takes
    /// the largest amax of the same projection in its layer; with none calibrated, 0.5.
    func testUncalibratedExpertsTakeModelOptFallback() throws {
        let (model, set) = try ptqModel(Fixtures.path("tiny-qwen3-moe"))
        let moe = try XCTUnwrap(model.layers[0].moe)
        let q = { (e: Int) in set.byName[moe.experts[e].down.name + ".input_quantizer"]! }
        let others = max(q(2).amax!, q(3).amax!)
        q(0).amax = nil; q(1).amax = 0
        XCTAssertEqual(Calibration.fillUncalibratedExperts(model: model, quantizers: set), 2)
        XCTAssertEqual(q(0).amax, others); XCTAssertEqual(q(1).amax, others)
        for e in 0..<4 { q(e).amax = nil }
        XCTAssertEqual(Calibration.fillUncalibratedExperts(model: model, quantizers: set), 4)
        XCTAssertEqual(q(3).amax, 0.5)
    }

    /// Each family exports every expert Linear in NVFP4 (w1/w3 sharing weight_scale_2), the
    /// routers and the shared-expert gate unquantized and excluded, and the export reproduces
    /// the fake-quant logits bit for bit, read back from a sharded checkpoint.
    func testExportsReproduceFakeQuantLogits() throws {
        for fixture in ["tiny-qwen2-moe", "tiny-mixtral", "tiny-qwen3-moe-b"] {
            let dir = Fixtures.path(fixture)
            let (model, set) = try ptqModel(dir)
            let tmp = Fixtures.tempDir("export-moe")
            defer { try? FileManager.default.removeItem(at: tmp) }
            let out = tmp.appendingPathComponent("e").path
            // Sharded (≈ 64 KiB shards): the per-expert tensors spread over several files and
            // are read back through the index.
            let summary = try Exporter.export(
                model: model, quantizers: set, sourceDirectory: dir, to: out,
                options: ExportOptions(maxShardBytes: 64 << 10))
            XCTAssertTrue(summary.weightMismatches.isEmpty)
            XCTAssertGreaterThanOrEqual(summary.files.filter { $0.hasSuffix(".safetensors") }.count, 2, "\(summary.files)")
            let ck = try ModelWeights(path: out)
            let hf = try JSONValue.parseObject(file: out + "/hf_quant_config.json")
            let excluded = Set(try hf.object("quantization").strings("exclude_modules"))
            for moe in model.moeBlocks {
                var experts = moe.experts
                if let s = moe.sharedExpert { experts.append(s) }
                for ex in experts {
                    for l in [ex.gate, ex.up, ex.down] { XCTAssertEqual(ck.info(l.name + ".weight")?.dtype, .u8, l.name) }
                    XCTAssertEqual(try ck.floats(ex.gate.name + ".weight_scale_2")[0], try ck.floats(ex.up.name + ".weight_scale_2")[0])
                }
                for l in [moe.router] + (moe.sharedExpertGate.map { [$0] } ?? []) {
                    XCTAssertNotEqual(ck.info(l.name + ".weight")?.dtype, .u8, l.name)
                    XCTAssertNil(ck.info(l.name + ".weight_scale"), l.name)
                    XCTAssertTrue(excluded.contains(l.name), "\(l.name) in \(excluded.sorted())")
                }
            }
            let loaded = try loadModelForEval(directory: out)
            let seqs = randomSequences(count: 4, seqLen: 33, vocab: model.config.vocabSize, seed: 99)
            let cmp = try Verification.compare(reference: model, candidate: loaded, sequences: seqs)
            XCTAssertEqual(cmp.maxAbsDiff, 0, "\(fixture): max |Δlogit| \(cmp.maxAbsDiff)")
        }
    }
}
