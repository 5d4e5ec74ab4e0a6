import Foundation
import QATIO
import TestSupport
import XCTest

/// Data-parallel validation: under `mpirun -np 2` each rank evaluates half of the validation
/// sequences and the loss sums and token counts are all-reduced; every figure `qat apply`
/// reports equals the one-process figure.
final class ShardedEvaluationEndToEndTests: XCTestCase, MPITesting {
    /// 9 validation sequences of 32 at eval batch 3: one process evaluates batches {0–2, 3–5,
    /// 6–8}, rank 0 {0–2, 3} and rank 1 {4–6, 7–8}. lr 0 keeps the weights fixed, so the
    /// unquantized and PTQ rows (ApplyRun), the in-training val_loss at steps 1 and 2 (of 3) and the
    /// final "after QAT" row (Trainer.evaluate) must all match the one-process run. Bound:
    /// |Δ| ≤ 1e-6 (fp64 summation order, plus fp32 logits where the GEMM blocking depends on
    /// the batch's row count); measured: 0 for every figure (printed). Where the detected BLAS
    /// kernels do not keep bits across row cuts (`Fixtures.detectedBLASKeepsRowCuts`), NVFP4
    /// amplifies that round-off: bound 2e-3 (a rank reporting only its share is off by far more).
    func testTwoRankValidationLossEqualsOneRank() throws {
        let bound = Fixtures.detectedBLASKeepsRowCuts ? 1e-6 : 2e-3
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-dp-eval")
        defer { try? FileManager.default.removeItem(at: dir) }
        let one = dir.appendingPathComponent("one"), two = dir.appendingPathComponent("two")
        let sets = ["--set", "data.validation_sequences=9", "--set", "train.lr=0"]
        for d in [one, two] { try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true) }
        let r1 = try Fixtures.runQAT(
            ["apply", try recipe(one, steps: 3, batch: 3, saveEvery: 0, evalEvery: 1)] + sets)
        XCTAssertEqual(r1.status, 0, r1.err)
        let r2 = try runMPI(
            mpirun, qat, ranks: 2, args: ["apply", try recipe(two, steps: 3, batch: 3, saveEvery: 0, evalEvery: 1)] + sets, dir: dir)
        XCTAssertEqual(r2.status, 0, r2.log)

        func figures(_ d: URL) throws -> [String: Double] {
            let s = try JSONValue.parse(try String(contentsOfFile: d.path + "/export/qat_summary.json", encoding: .utf8))
            var out: [String: Double] = [:]
            for k in ["unquantized", "ptq", "after_qat"] { out[k] = s[k]?["val_loss"]?.doubleValue }
            for line in try String(contentsOfFile: d.path + "/export.work/metrics.jsonl", encoding: .utf8).split(separator: "\n") {
                let v = try JSONValue.parse(String(line))
                if let l = v["val_loss"]?.doubleValue, let step = v["step"]?.intValue { out["val_loss@\(step)"] = l }
            }
            return out
        }
        let f1 = try figures(one), f2 = try figures(two)
        XCTAssertEqual(Set(f1.keys), ["unquantized", "ptq", "after_qat", "val_loss@1", "val_loss@2"])
        XCTAssertEqual(Set(f1.keys), Set(f2.keys))
        var worst = 0.0
        for (k, a) in f1 {
            guard let b = f2[k] else { continue }
            worst = max(worst, abs(a - b))
            XCTAssertEqual(a, b, accuracy: bound, k)
        }
        // Each rank reports the whole split (9 sequences), not its share.
        XCTAssertTrue(r2.log.contains("9 sequences"), r2.log)
        print(
            String(
                format: "sharded evaluation, 2 ranks vs 1: max |Δ val_loss| = %g over %d figures (unquantized %.9f)", worst, f1.count,
                f1["unquantized"] ?? .nan))
    }
}
