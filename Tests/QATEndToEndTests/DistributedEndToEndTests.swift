import Foundation
import QATIO
import TestSupport
import XCTest

/// Data-parallel `qat apply` under `mpirun -np 2` (Open MPI, loopback). Skipped when mpirun
/// is not installed (CI installs openmpi-bin through scripts/deps.sh).
final class DistributedEndToEndTests: XCTestCase, MPITesting {
    /// 2 ranks × batch 2 = 1 rank × batch 4: same sequences, same global valid-token count,
    /// gradients summed over ranks. Only the fp32 summation order of the weight gradients
    /// differs (each rank's GEMM sums 64 rows, then MPI adds the two halves), so the weights
    /// agree to round-off: asserted |Δw| ≤ 1e-6 + 1e-4·|w| after 6 AdamW steps at lr 1e-4
    /// (measured: max |Δw| = 4.3e-7; AdamW's m/√v turns round-off in near-zero gradients into
    /// steps of up to lr, hence the relative term), same step count, per-step losses within 1e-6.
    /// Where the detected BLAS kernels do not keep a product's bits when its rows are cut
    /// differently (the Haswell family: AVX2 CPUs, AMD Zen; `Fixtures.detectedBLASKeepsRowCuts`)
    /// the round-off of the two halves goes through NVFP4 (a weight or activation that lands on
    /// the other side of a rounding boundary moves by a whole E2M1 step) and AdamW, whose m/√v
    /// can turn it into a different step of up to lr on a near-zero gradient: every |Δw| within
    /// 1e-3 (6 steps of lr 1e-4, with room), ‖Δw‖/‖w‖ over the model within 5e-4, per-step
    /// losses and gradient norms within 2e-2 relative (measured on an AMD EPYC: 1.5e-4, 9.3e-5,
    /// 0.8% and 0.6%). A wrong reduction over ranks shows in the gradient norms: a rank-local
    /// token count or a missing sum is off by a factor of about 2 (AdamW itself is scale-free).
    func testTwoRanksMatchOneRankWithDoubledBatch() throws {
        let exact = Fixtures.detectedBLASKeepsRowCuts
        let (wAbs, wRel): (Float, Float) = exact ? (1e-6, 1e-4) : (1e-3, 0), rel = exact ? 1e-5 : 2e-2
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-dp")
        defer { try? FileManager.default.removeItem(at: dir) }
        let d1 = dir.appendingPathComponent("one"), d2 = dir.appendingPathComponent("two")
        for d in [d1, d2] { try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true) }
        let r1 = try Fixtures.runQAT(["apply", try recipe(d1, steps: 6, batch: 4), "--quiet"])
        XCTAssertEqual(r1.status, 0, r1.err)
        let r2 = try runMPI(mpirun, qat, ranks: 2, args: ["apply", try recipe(d2, steps: 6, batch: 2), "--quiet"], dir: dir)
        XCTAssertEqual(r2.status, 0, r2.log)
        // Rank 0 alone prints the table.
        XCTAssertEqual(r2.log.components(separatedBy: "after QAT").count - 1, 1, r2.log)

        let c1 = d1.path + "/export.work/checkpoints/checkpoint-000006", c2 = d2.path + "/export.work/checkpoints/checkpoint-000006"
        let w1 = try weights(c1), w2 = try weights(c2)
        XCTAssertEqual(Set(w1.keys), Set(w2.keys))
        var maxDiff: Float = 0, dd = 0.0, ww = 0.0
        for (n, a) in w1 {
            guard let b = w2[n], b.count == a.count else { XCTFail("\(n) missing or resized"); continue }
            for i in 0..<a.count {
                let d = abs(a[i] - b[i])
                maxDiff = max(maxDiff, d)
                dd += Double(d) * Double(d); ww += Double(a[i]) * Double(a[i])
                if d > wAbs + wRel * abs(a[i]) { XCTFail("\(n)[\(i)]: \(a[i]) vs \(b[i])"); return }
            }
        }
        let relNorm = (dd / max(ww, 1e-30)).squareRoot()
        print("2 ranks vs 1 rank (\(exact ? "row-cut-exact" : "Haswell-family") BLAS): max |Δw| = \(maxDiff), ‖Δw‖/‖w‖ = \(relNorm)")
        XCTAssertLessThanOrEqual(relNorm, exact ? 1e-5 : 5e-4)
        let m1 = try metricsLosses(d1.path + "/export.work/metrics.jsonl"), m2 = try metricsLosses(d2.path + "/export.work/metrics.jsonl")
        XCTAssertEqual(m1.count, 6); XCTAssertEqual(m2.count, 6)
        for (a, b) in zip(m1, m2) { XCTAssertEqual(a, b, accuracy: exact ? 1e-6 : rel * abs(a)) }
        print("per-step losses: max |Δ| = \(zip(m1, m2).map { abs($0 - $1) }.max() ?? 0)")
        // The gradient norm before clipping, per step: a wrong normalisation over ranks (e.g.
        // dividing by each rank's own token count, or not summing) shows here even where
        // AdamW's m/√v and clipping would hide it in the weights.
        let g1 = try metricsValues(d1.path + "/export.work/metrics.jsonl", key: "grad_norm")
        let g2 = try metricsValues(d2.path + "/export.work/metrics.jsonl", key: "grad_norm")
        XCTAssertEqual(g1.count, 6); XCTAssertEqual(g2.count, 6)
        for (step, (a, b)) in zip(g1, g2).enumerated() { XCTAssertEqual(a, b, accuracy: rel * a, "step \(step + 1) grad_norm") }
        print("grad_norm: max |Δ|/norm = \(zip(g1, g2).map { abs($0 - $1) / $0 }.max() ?? 0)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: d2.path + "/export/qat_summary.json"))
    }

    /// Killing one rank mid-training ends the job; rank 0's last checkpoint is complete and
    /// `--resume` under mpirun finishes the run.
    func testRankKilledMidRunLeavesResumableCheckpoint() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-dp-kill")
        defer { try? FileManager.default.removeItem(at: dir) }
        let steps = 300
        let path = try recipe(dir, steps: steps, batch: 2, saveEvery: 2)
        let ckpts = dir.path + "/export.work/checkpoints"
        try killRankAfterFirstCheckpoint(
            mpirun, qat, args: ["apply", path, "--quiet"], checkpoints: ckpts, log: dir.appendingPathComponent("run1.log"))

        let r = try runMPI(mpirun, qat, ranks: 2, args: ["apply", path, "--resume", "--quiet"], dir: dir)
        XCTAssertEqual(r.status, 0, r.log)
        let last = String(format: "%@/checkpoint-%06d", ckpts, steps)
        XCTAssertTrue(FileManager.default.fileExists(atPath: last + "/model.safetensors"), r.log)
        let losses = try metricsLosses(dir.path + "/export.work/metrics.jsonl")
        XCTAssertEqual(losses.count, steps)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.path + "/export/model.safetensors"))
    }

}
