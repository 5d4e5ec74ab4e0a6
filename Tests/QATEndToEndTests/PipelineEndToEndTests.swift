import Foundation
import QATData
import QATIO
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Pipeline-parallel `qat apply` (train.pipeline_stages: 2) under `mpirun -np 2`, against the
/// same recipe run by one process.
final class PipelineEndToEndTests: XCTestCase, MPITesting {
    /// QAD mixes CE and KD (kd_ratio 0.5), so both logged terms are compared.
    func pipelineRecipe(
        _ dir: URL, mode: String, stages: Int, steps: Int = 4, gradAccum: Int = 3, saveEvery: Int = 2,
        model: String = "models/fortune-lm", data: String? = nil
    ) throws -> String {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let distill = mode == "qad" ? ["distill:", "  kd_ratio: 0.5"] : []
        return try Fixtures.shortRecipe(
            in: dir, steps: steps, batch: 2, evalEvery: 2, saveEvery: saveEvery, model: model, data: data, mode: mode,
            trainExtra: ["grad_accum: \(gradAccum)", "pipeline_stages: \(stages)"] + distill)
    }

    /// Per-step figures of metrics.jsonl without the timing ones.
    func stepFigures(_ path: String) throws -> [[String: Double]] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { line in
            let v = try JSONValue.parse(String(line))
            var out: [String: Double] = [:]
            for k in ["step", "loss", "kd", "ce", "lr", "grad_norm", "val_loss"] { if let x = v[k]?.doubleValue { out[k] = x } }
            return out
        }
    }

    /// 2 pipeline stages = 1 process, bit for bit (untied embeddings): the same loss curve
    /// (every loss, KD/CE term, grad norm and validation loss of metrics.jsonl equal), the
    /// same checkpoints byte for byte (weights, AdamW moments, quantizer amax) and the same
    /// exported NVFP4 checkpoint. QAD with 3 micro-batches per step (gradient accumulation),
    /// so the teacher's hidden states of every micro-batch must be kept and used; QAT; and QAD
    /// over 3 stages.
    func testPipelineStagesMatchSingleProcessBitForBit() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-pp")
        defer { try? FileManager.default.removeItem(at: dir) }
        for (mode, stages) in [("qad", 2), ("qat", 2), ("qad", 3)] {  // 3 stages: layers 0…1 | 2 | 3, a middle stage
            let d1 = dir.appendingPathComponent("\(mode)-one"), d2 = dir.appendingPathComponent("\(mode)-\(stages)")
            if !FileManager.default.fileExists(atPath: d1.path) {
                let r1 = try Fixtures.runQAT(["apply", try pipelineRecipe(d1, mode: mode, stages: 1), "--quiet"])
                XCTAssertEqual(r1.status, 0, r1.err)
            }
            let r2 = try runMPI(
                mpirun, qat, ranks: stages, args: ["apply", try pipelineRecipe(d2, mode: mode, stages: stages), "--quiet"], dir: dir)
            XCTAssertEqual(r2.status, 0, r2.log)
            XCTAssertEqual(r2.log.components(separatedBy: "after \(mode.uppercased())").count - 1, 1, r2.log)

            let m1 = try stepFigures(d1.path + "/export.work/metrics.jsonl"), m2 = try stepFigures(d2.path + "/export.work/metrics.jsonl")
            XCTAssertEqual(m1.count, 4)
            XCTAssertEqual(m1, m2, "\(mode): loss curves differ")
            XCTAssertNotNil(m1[1]["val_loss"])
            XCTAssertNotNil(m1[0]["ce"])
            if mode == "qad" { XCTAssertNotNil(m1[0]["kd"]) }
            for step in ["000002", "000004"] {
                for file in ["model.safetensors", "optimizer.safetensors", "state.safetensors"] {
                    let a = "\(d1.path)/export.work/checkpoints/checkpoint-\(step)/\(file)",
                        b = "\(d2.path)/export.work/checkpoints/checkpoint-\(step)/\(file)"
                    XCTAssertEqual(
                        FileManager.default.contents(atPath: a), FileManager.default.contents(atPath: b), "\(mode): \(step)/\(file) differs"
                    )
                }
            }
            let e1 = FileManager.default.contents(atPath: d1.path + "/export/model.safetensors")
            XCTAssertNotNil(e1)
            XCTAssertEqual(e1, FileManager.default.contents(atPath: d2.path + "/export/model.safetensors"), "\(mode): exports differ")
            let s1 = try JSONValue.parse(String(contentsOfFile: d1.path + "/export/qat_summary.json", encoding: .utf8))
            let s2 = try JSONValue.parse(String(contentsOfFile: d2.path + "/export/qat_summary.json", encoding: .utf8))
            XCTAssertEqual(s1["verify_max_abs_logit_diff"]?.doubleValue, 0)
            XCTAssertEqual(s2["verify_max_abs_logit_diff"]?.doubleValue, 0)
        }
    }

    /// 4 ranks = 2 pipelines of 2 stages side by side (data parallel across pipelines) give
    /// bit for bit what 2 data-parallel ranks of whole models give (each pipeline reproduces
    /// one process exactly, and the gradient all-reduce adds the same two halves): metrics,
    /// checkpoints and export equal; with ZeRO-1 across the pipelines too.
    func testTwoPipelinesOfTwoStagesMatchTwoDataParallelRanks() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-pp-dp")
        defer { try? FileManager.default.removeItem(at: dir) }
        let dp = dir.appendingPathComponent("dp"), pp = dir.appendingPathComponent("pp")
        let r1 = try runMPI(
            mpirun, qat, ranks: 2, args: ["apply", try pipelineRecipe(dp, mode: "qad", stages: 1, gradAccum: 2), "--quiet"], dir: dir)
        XCTAssertEqual(r1.status, 0, r1.log)
        let r2 = try runMPI(
            mpirun, qat, ranks: 4, args: ["apply", try pipelineRecipe(pp, mode: "qad", stages: 2, gradAccum: 2), "--quiet"], dir: dir)
        XCTAssertEqual(r2.status, 0, r2.log)
        XCTAssertEqual(r2.log.components(separatedBy: "after QAD").count - 1, 1, r2.log)
        XCTAssertEqual(try stepFigures(dp.path + "/export.work/metrics.jsonl"), try stepFigures(pp.path + "/export.work/metrics.jsonl"))
        for file in ["model.safetensors", "optimizer.safetensors", "state.safetensors"] {
            let a = FileManager.default.contents(atPath: "\(dp.path)/export.work/checkpoints/checkpoint-000004/\(file)")
            XCTAssertNotNil(a)
            XCTAssertEqual(a, FileManager.default.contents(atPath: "\(pp.path)/export.work/checkpoints/checkpoint-000004/\(file)"), file)
        }
        XCTAssertEqual(
            FileManager.default.contents(atPath: dp.path + "/export/model.safetensors"),
            FileManager.default.contents(atPath: pp.path + "/export/model.safetensors"))

        // ZeRO-1 across the pipelines (each stage's AdamW state sharded over its 2 data-parallel
        // ranks): the same checkpoint bytes, also after resuming from the sharded step-2 checkpoint.
        let zero = dir.appendingPathComponent("pp-zero")
        let path = try pipelineRecipe(zero, mode: "qad", stages: 2, gradAccum: 2)
        let r3 = try runMPI(mpirun, qat, ranks: 4, args: ["apply", path, "--quiet", "--set", "train.shard_optimizer_state=true"], dir: dir)
        XCTAssertEqual(r3.status, 0, r3.log)
        func sameCheckpoint(_ label: String) {
            for file in ["model.safetensors", "optimizer.safetensors", "state.safetensors"] {
                XCTAssertEqual(
                    FileManager.default.contents(atPath: "\(dp.path)/export.work/checkpoints/checkpoint-000004/\(file)"),
                    FileManager.default.contents(atPath: "\(zero.path)/export.work/checkpoints/checkpoint-000004/\(file)"),
                    "\(label): \(file)")
            }
        }
        sameCheckpoint("ZeRO-1 + pipelines")
        try FileManager.default.removeItem(atPath: zero.path + "/export.work/checkpoints/checkpoint-000004")
        let r4 = try runMPI(
            mpirun, qat, ranks: 4, args: ["apply", path, "--quiet", "--resume", "--set", "train.shard_optimizer_state=true"], dir: dir)
        XCTAssertEqual(r4.status, 0, r4.log)
        sameCheckpoint("resumed ZeRO-1 + pipelines")
    }

    /// A tied embedding lives on both the first and the last stage; its gradient is the sum
    /// of the two stages' halves, taken in another order than one process accumulates it,
    /// so the runs agree to fp32 round-off: asserted |Δw| ≤ 1e-6 + 1e-4·|w| and per-step
    /// losses within 1e-6 (tiny-qwen3: tied, q/k norms, 2 layers; token ids folded into its
    /// 512-token vocabulary). One micro-batch per step: the first stage's backward follows its
    /// forward directly, without recomputation.
    func testTwoStagePipelineWithTiedEmbeddingsMatchesToRoundOff() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-pp-tied")
        defer { try? FileManager.default.removeItem(at: dir) }
        let tokens = dir.appendingPathComponent("tokens.h5").path
        let source = try TokenData.readHDF5(path: Fixtures.fortuneLM + "/tokens.h5", split: "validation")
        do {  // closed at the end of the block, before the runs open it
            let h5 = try HDF5File(path: tokens, mode: .create)
            for split in ["train", "validation"] {
                try h5.write("\(split)/input_ids", values: source.prefix(20_000).map { $0 % 512 })
            }
        }
        let model = Fixtures.path("tiny-qwen3")
        let d1 = dir.appendingPathComponent("one"), d2 = dir.appendingPathComponent("two")
        let r1 = try Fixtures.runQAT([
            "apply", try pipelineRecipe(d1, mode: "qad", stages: 1, gradAccum: 1, model: model, data: tokens), "--quiet",
        ])
        XCTAssertEqual(r1.status, 0, r1.err)
        let r2 = try runMPI(
            mpirun, qat, ranks: 2,
            args: ["apply", try pipelineRecipe(d2, mode: "qad", stages: 2, gradAccum: 1, model: model, data: tokens), "--quiet"], dir: dir)
        XCTAssertEqual(r2.status, 0, r2.log)
        let w1 = try weights(d1.path + "/export.work/checkpoints/checkpoint-000004"),
            w2 = try weights(d2.path + "/export.work/checkpoints/checkpoint-000004")
        XCTAssertNil(w1["lm_head.weight"])
        let maxDiff = maxAbsDiff(w1, w2)
        for (n, a) in w1 {
            for (i, (x, y)) in zip(a, w2[n] ?? []).enumerated() where abs(x - y) > 1e-6 + 1e-4 * abs(x) {
                XCTFail("\(n)[\(i)]: \(x) vs \(y)"); return
            }
        }
        print("tied embeddings, 2 stages vs 1 process: max |Δw| = \(maxDiff)")
        let m1 = try stepFigures(d1.path + "/export.work/metrics.jsonl"), m2 = try stepFigures(d2.path + "/export.work/metrics.jsonl")
        XCTAssertEqual(m1.count, 4); XCTAssertEqual(m2.count, 4)
        for (a, b) in zip(m1, m2) { XCTAssertEqual(a["loss"]!, b["loss"]!, accuracy: 1e-6) }
    }

    /// Killing a pipeline stage mid-run ends the job with rank 0's last gathered checkpoint
    /// complete; `--resume` under mpirun finishes, and the result is bit-identical to one
    /// uninterrupted process.
    func testPipelineStageKilledLeavesResumableCheckpoint() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-pp-kill")
        defer { try? FileManager.default.removeItem(at: dir) }
        let steps = 60
        let d1 = dir.appendingPathComponent("one"), d2 = dir.appendingPathComponent("two")
        let path = try pipelineRecipe(d2, mode: "qad", stages: 2, steps: steps, gradAccum: 2, saveEvery: 2)
        let ckpts = d2.path + "/export.work/checkpoints"
        try killRankAfterFirstCheckpoint(
            mpirun, qat, args: ["apply", path, "--quiet"], checkpoints: ckpts, log: dir.appendingPathComponent("run1.log"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: String(format: "%@/checkpoint-%06d", ckpts, steps)), "killed too late")

        let r = try runMPI(mpirun, qat, ranks: 2, args: ["apply", path, "--resume", "--quiet"], dir: dir)
        XCTAssertEqual(r.status, 0, r.log)
        let r1 = try Fixtures.runQAT([
            "apply", try pipelineRecipe(d1, mode: "qad", stages: 1, steps: steps, gradAccum: 2, saveEvery: 2), "--quiet",
        ])
        XCTAssertEqual(r1.status, 0, r1.err)
        let last = String(format: "checkpoint-%06d/model.safetensors", steps)
        let a = FileManager.default.contents(atPath: d1.path + "/export.work/checkpoints/" + last)
        XCTAssertNotNil(a)
        XCTAssertEqual(
            a, FileManager.default.contents(atPath: ckpts + "/" + last), "resumed pipeline run differs from one uninterrupted process")
        XCTAssertEqual(
            try stepFigures(d2.path + "/export.work/metrics.jsonl").map { $0["loss"]! },
            try stepFigures(d1.path + "/export.work/metrics.jsonl").map { $0["loss"]! })
    }

    /// Misconfigurations fail at once with the fix in the message.
    func testPipelineConfigurationErrors() throws {
        let dir = Fixtures.tempDir("qat-pp-errors")
        defer { try? FileManager.default.removeItem(at: dir) }
        // Two stages in one process: needs mpirun.
        let r = try Fixtures.runQAT(["apply", try pipelineRecipe(dir, mode: "qad", stages: 2), "--quiet"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("mpirun -np 2 (or a multiple of 2"), r.err)
        // More stages than layers.
        let r2 = try Fixtures.runQAT(["apply", try pipelineRecipe(dir, mode: "qad", stages: 5), "--quiet"])
        XCTAssertNotEqual(r2.status, 0)
        XCTAssertTrue(r2.err.contains("5 stages need at least 5 decoder layers"), r2.err)
        let r3 = try Fixtures.runQAT(["recipe", "validate", try pipelineRecipe(dir, mode: "qad", stages: 0)])
        XCTAssertNotEqual(r3.status, 0)
        XCTAssertTrue(r3.err.contains("pipeline_stages"), r3.err)
    }
}
