import Foundation
import QATData
import QATIO
import TestSupport
import XCTest

/// `qat apply` on the tiny Qwen3-MoE fixture (2 sparse layers × 4 experts, top-2): QAT and
/// QAD, export, verify. The export must reproduce the fake-quant logits exactly, hold every
/// expert Linear in NVFP4 with gate/up sharing one weight_scale_2 per expert, and leave
/// every router unquantized and listed in exclude_modules / ignore. The QAT run also trains
/// with the load-balancing loss (train.router_aux_loss_coef).
final class MoEEndToEndTests: XCTestCase {
    func testQwen3MoEQATExportVerify() throws { try run(mode: "qat", trainExtra: ["router_aux_loss_coef: 0.01"]) }
    func testQwen3MoEQADExportVerify() throws { try run(mode: "qad") }

    /// LoRA-QAT with the default targets (`model.layers.*.mlp.*_proj` reaches every expert's
    /// projections; the router `mlp.gate` is not a target): adapters on every expert, merged
    /// NVFP4 export verified exactly.
    func testQwen3MoELoRAOnExperts() throws {
        let dir = try run(mode: "qat", trainExtra: ["lora:", "  rank: 4", "  alpha: 8"], keep: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let ck = try ModelWeights(path: dir.appendingPathComponent("export.work/checkpoints/checkpoint-000004").path)
        let adapters = ck.names.filter { $0.hasSuffix(".lora_A.weight") }
        for l in 0..<2 {
            for e in 0..<4 {
                for proj in ["gate_proj", "up_proj", "down_proj"] {
                    XCTAssertTrue(adapters.contains("model.layers.\(l).mlp.experts.\(e).\(proj).lora_A.weight"), "\(l).\(e).\(proj)")
                }
            }
            XCTAssertFalse(adapters.contains { $0.contains("mlp.gate.lora") }, "router has no adapter")
        }
    }

    /// Offline top-k QAD: `qat teacher-logprobs` runs the MoE teacher over the training data,
    /// then `qat apply` distils from the cache; export verified exactly.
    func testQwen3MoEOfflineTopKQAD() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-moe-topk")
        defer { try? FileManager.default.removeItem(at: dir) }
        let tokens = try foldedTokens(dir)
        let cache = dir.appendingPathComponent("teacher.h5").path
        let t = try Fixtures.runQAT([
            "teacher-logprobs", "--model", Fixtures.path("tiny-qwen3-moe"), "--data", tokens, "--seq-len", "32",
            "--top-k", "8", "--out", cache,
        ])
        XCTAssertEqual(t.status, 0, t.err)
        try run(mode: "qad", trainExtra: ["distill:", "  teacher_logprobs: \(cache)"], tokens: tokens)
    }

    private func foldedTokens(_ dir: URL) throws -> String {
        let tokens = dir.appendingPathComponent("tokens.h5").path
        let source = try TokenData.readHDF5(path: Fixtures.fortuneLM + "/tokens.h5", split: "validation")
        // fortune-lm's token ids folded into the fixture's 256-token vocabulary
        let h5 = try HDF5File(path: tokens, mode: .create)
        for split in ["train", "validation"] { try h5.write("\(split)/input_ids", values: source.prefix(8_000).map { $0 % 256 }) }
        return tokens
    }

    @discardableResult
    private func run(mode: String, trainExtra: [String] = [], keep: Bool = false, tokens given: String? = nil) throws -> URL {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-moe-\(mode)")
        defer { if !keep && ProcessInfo.processInfo.environment["QAT_KEEP"] == nil { try? FileManager.default.removeItem(at: dir) } }
        let model = Fixtures.path("tiny-qwen3-moe")
        let tokens = try given ?? foldedTokens(dir)
        let recipe = try Fixtures.shortRecipe(in: dir, steps: 4, model: model, data: tokens, mode: mode, trainExtra: trainExtra)
        let r = try Fixtures.runQAT(["apply", recipe, "--quiet"])
        XCTAssertEqual(r.status, 0, r.err)
        let out = dir.appendingPathComponent("export").path
        let summary = try JSONValue.parseObject(file: out + "/qat_summary.json")
        XCTAssertEqual(
            try XCTUnwrap(summary.optionalDouble("verify_max_abs_logit_diff")), 0,
            "\(mode): export reproduces the fake-quant logits")

        let ck = try ModelWeights(path: out)
        let E = 4
        for l in 0..<2 {
            let p = "model.layers.\(l).mlp"
            for e in 0..<E {
                for proj in ["gate_proj", "up_proj", "down_proj"] {
                    let n = "\(p).experts.\(e).\(proj)"
                    XCTAssertEqual(ck.info(n + ".weight")?.dtype, .u8, "\(n) packed NVFP4")
                    for s in ["weight_scale", "weight_scale_2", "input_scale"] { XCTAssertNotNil(ck.info("\(n).\(s)"), "\(n).\(s)") }
                }
                let g = try ck.floats("\(p).experts.\(e).gate_proj.weight_scale_2")[0]
                let u = try ck.floats("\(p).experts.\(e).up_proj.weight_scale_2")[0]
                XCTAssertEqual(g, u, "\(p).experts.\(e): w1/w3 share one global scale")
            }
            XCTAssertEqual(ck.info("\(p).gate.weight")?.shape, [E, 64], "router")
            XCTAssertNotEqual(ck.info("\(p).gate.weight")?.dtype, .u8, "router unquantized")
            XCTAssertNil(ck.info("\(p).gate.weight_scale"))
            XCTAssertNil(ck.info("\(p).gate.input_scale"))
        }
        let hf = try JSONValue.parseObject(file: out + "/hf_quant_config.json")
        let excluded = try hf.object("quantization").strings("exclude_modules")
        for l in 0..<2 { XCTAssertTrue(excluded.contains("model.layers.\(l).mlp.gate"), "\(excluded)") }
        let qc = try JSONValue.parseObject(file: out + "/config.json").object("quantization_config")
        XCTAssertEqual(try qc.strings("ignore"), excluded)
        XCTAssertEqual(try qc.string("quant_algo"), "NVFP4")
        return dir
    }
}
