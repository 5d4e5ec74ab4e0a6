import Foundation
import QATData
import QATIO
import TestSupport
import XCTest

/// Data-parallel `qat apply` of the tiny Qwen3-MoE under `mpirun -np 2`: 2 ranks × batch 2
/// = 1 rank × batch 4 (same sequences, same routing, gradients summed over ranks), weights
/// within round-off after 4 steps, per-step losses within 1e-6. (Without the load-balancing
/// loss: transformers computes it per forward, so it is not batch-split invariant.)
final class MoEDistributedEndToEndTests: XCTestCase, MPITesting {
    func testTwoRanksMatchOneRankOnQwen3MoE() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-moe-dp")
        defer { try? FileManager.default.removeItem(at: dir) }
        let tokens = dir.appendingPathComponent("tokens.h5").path
        let source = try TokenData.readHDF5(path: Fixtures.fortuneLM + "/tokens.h5", split: "validation")
        do {
            let h5 = try HDF5File(path: tokens, mode: .create)
            for split in ["train", "validation"] { try h5.write("\(split)/input_ids", values: source.prefix(8_000).map { $0 % 256 }) }
        }
        func moeRecipe(_ d: URL, batch: Int) throws -> String {
            try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
            return try Fixtures.shortRecipe(
                in: d, steps: 4, batch: batch, evalEvery: 0, saveEvery: 4,
                model: Fixtures.path("tiny-qwen3-moe"),
                data: tokens, exportExtra: ["verify: false"])
        }
        let d1 = dir.appendingPathComponent("one"), d2 = dir.appendingPathComponent("two")
        let r1 = try Fixtures.runQAT(["apply", try moeRecipe(d1, batch: 4), "--quiet"])
        XCTAssertEqual(r1.status, 0, r1.err)
        let r2 = try runMPI(mpirun, qat, ranks: 2, args: ["apply", try moeRecipe(d2, batch: 2), "--quiet"], dir: dir)
        XCTAssertEqual(r2.status, 0, r2.log)
        let w1 = try weights(d1.path + "/export.work/checkpoints/checkpoint-000004")
        let w2 = try weights(d2.path + "/export.work/checkpoints/checkpoint-000004")
        XCTAssertEqual(Set(w1.keys), Set(w2.keys))
        XCTAssertTrue(w1.keys.contains("model.layers.1.mlp.experts.3.down_proj.weight"))
        for (n, a) in w1 {
            guard let b = w2[n], b.count == a.count else { XCTFail("\(n) missing or resized"); continue }
            for i in 0..<a.count where abs(a[i] - b[i]) > 1e-6 + 1e-4 * abs(a[i]) { XCTFail("\(n)[\(i)]: \(a[i]) vs \(b[i])"); return }
        }
        let m1 = try metricsLosses(d1.path + "/export.work/metrics.jsonl"), m2 = try metricsLosses(d2.path + "/export.work/metrics.jsonl")
        XCTAssertEqual(m1.count, 4); XCTAssertEqual(m2.count, 4)
        for (a, b) in zip(m1, m2) { XCTAssertEqual(a, b, accuracy: 1e-6) }
    }
}
