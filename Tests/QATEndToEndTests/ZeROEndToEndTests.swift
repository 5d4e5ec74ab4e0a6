import Foundation
import QATIO
import TestSupport
import XCTest

/// ZeRO-1 (`train.shard_optimizer_state: true`) under `mpirun -np 2`: the same weights and
/// optimizer moments, bit for bit, as the unsharded data-parallel run; the checkpoint keeps
/// the unsharded format and resumes sharded or not.
final class ZeROEndToEndTests: XCTestCase, MPITesting {
    static let sharded = "shard_optimizer_state: true"

    func checkpoint(_ dir: URL, _ step: Int) -> String { dir.path + String(format: "/export.work/checkpoints/checkpoint-%06d", step) }

    func meanTokensPerSecond(_ dir: URL) throws -> Double {
        let v = try String(contentsOfFile: dir.path + "/export.work/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONValue.parse(String($0))["tokens_per_s"]?.doubleValue }
        return v.dropFirst().reduce(0, +) / Double(max(v.count - 1, 1))  // the first step warms up
    }

    /// 4 steps at 2 ranks × batch 2, checkpoints at steps 2 and 4. Sharded and unsharded give
    /// identical weights and moments (max |Δ| = 0: the owner's AdamW update is the same
    /// arithmetic on the same all-reduced gradients). Resuming the sharded step-2 checkpoint,
    /// sharded or unsharded (another optimizer layout, same files), reproduces step 4 exactly.
    func testShardedMatchesUnshardedBitForBitAndResumes() throws {
        let (mpirun, qat) = try prerequisites()
        let dir = Fixtures.tempDir("qat-zero")
        defer { try? FileManager.default.removeItem(at: dir) }
        let plain = dir.appendingPathComponent("plain"), zero = dir.appendingPathComponent("zero")
        for d in [plain, zero] { try FileManager.default.createDirectory(at: d, withIntermediateDirectories: true) }
        let rp = try runMPI(mpirun, qat, ranks: 2, args: ["apply", try recipe(plain, steps: 4, batch: 2, saveEvery: 2)], dir: dir)
        XCTAssertEqual(rp.status, 0, rp.log)
        let zeroRecipe = try recipe(zero, steps: 4, batch: 2, saveEvery: 2, trainExtra: [Self.sharded])
        let rz = try runMPI(mpirun, qat, ranks: 2, args: ["apply", zeroRecipe], dir: dir)
        XCTAssertEqual(rz.status, 0, rz.log)
        XCTAssertTrue(rz.log.contains("optimizer state sharded over 2 data-parallel ranks (ZeRO-1)"), rz.log)
        if let line = rz.log.split(separator: "\n").first(where: { $0.contains("sharded over") }) { print(line) }
        if let line = rz.log.split(separator: "\n").first(where: { $0.contains("memory on paper") }) { print("sharded " + line) }
        if let line = rp.log.split(separator: "\n").first(where: { $0.contains("memory on paper") }) { print("unsharded " + line) }

        let dw = maxAbsDiff(try weights(checkpoint(plain, 4)), try weights(checkpoint(zero, 4)))
        let plainMoments = try tensors(checkpoint(plain, 4) + "/optimizer.safetensors")
        let dm = maxAbsDiff(plainMoments, try tensors(checkpoint(zero, 4) + "/optimizer.safetensors"))
        XCTAssertEqual(dw, 0); XCTAssertEqual(dm, 0)
        XCTAssertFalse(plainMoments.isEmpty)
        XCTAssertEqual(
            try metricsLosses(plain.path + "/export.work/metrics.jsonl"), try metricsLosses(zero.path + "/export.work/metrics.jsonl"))
        print(
            String(
                format: "ZeRO vs plain, 2 ranks, 4 steps: max |Δw| = %g, max |Δm|,|Δv| = %g; tokens/s plain %.0f, sharded %.0f",
                dw, dm, try meanTokensPerSecond(plain), try meanTokensPerSecond(zero)))

        // Resume the sharded step-2 checkpoint, sharded and then unsharded (--set changes the
        // recipe hash, hence --force-resume): both land on the same step-4 state.
        let reference = (w: try weights(checkpoint(zero, 4)), m: try tensors(checkpoint(zero, 4) + "/optimizer.safetensors"))
        for extra in [[String](), ["--set", "train.shard_optimizer_state=false", "--force-resume"]] {
            try FileManager.default.removeItem(atPath: checkpoint(zero, 4))
            let r = try runMPI(mpirun, qat, ranks: 2, args: ["apply", zeroRecipe, "--resume"] + extra, dir: dir)
            XCTAssertEqual(r.status, 0, r.log)
            XCTAssertTrue(r.log.contains("resumed from") && r.log.contains("checkpoint-000002"), r.log)
            XCTAssertEqual(maxAbsDiff(reference.w, try weights(checkpoint(zero, 4))), 0, "resume \(extra)")
            XCTAssertEqual(maxAbsDiff(reference.m, try tensors(checkpoint(zero, 4) + "/optimizer.safetensors")), 0, "resume \(extra)")
        }
    }

    /// One process: the option is a no-op (logged), and the run is the plain one.
    func testSingleProcessIgnoresSharding() throws {
        let dir = Fixtures.tempDir("qat-zero-1")
        defer { try? FileManager.default.removeItem(at: dir) }
        guard Fixtures.qatBinary != nil else { throw XCTSkip("qat binary not built") }
        let r = try Fixtures.runQAT(["apply", try recipe(dir, steps: 1, batch: 2, saveEvery: 0, trainExtra: [Self.sharded])])
        XCTAssertEqual(r.status, 0, r.err)
        XCTAssertTrue(r.err.contains("nothing to shard with one data-parallel rank"), r.err)
    }
}
