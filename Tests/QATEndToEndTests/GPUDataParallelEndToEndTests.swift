import Foundation
import TestSupport
import XCTest

/// `qat apply` with device: cuda under mpirun, as far as a machine without a GPU goes: the
/// layouts not built for GPUs yet are refused in one line before any work (on every rank),
/// and data parallelism itself gets as far as opening the GPU.
final class GPUDataParallelEndToEndTests: XCTestCase, MPITesting {
    func testLayoutsNotBuiltForGPUsAreRefusedInOneLine() throws {
        let dir = Fixtures.tempDir("qat-gpu-dp")
        defer { try? FileManager.default.removeItem(at: dir) }
        let recipe = try self.recipe(dir, steps: 2, batch: 2)
        // Pipeline stages: refused in one process too, before the pipeline is planned.
        let pp = try Fixtures.runQAT(["apply", recipe, "--device", "cuda", "--set", "train.pipeline_stages=2"])
        XCTAssertEqual(pp.status, 1, pp.err)
        XCTAssertTrue(pp.err.contains("train.pipeline_stages is not supported with device: cuda yet: use device: cpu"), pp.err)
        let (mpirun, qat) = try prerequisites()
        let zero = try runMPI(
            mpirun, qat, ranks: 2, args: ["apply", recipe, "--device", "cuda", "--set", "train.shard_optimizer_state=true"], dir: dir)
        XCTAssertNotEqual(zero.status, 0, zero.log)
        XCTAssertTrue(zero.log.contains("train.shard_optimizer_state (ZeRO-1) is not supported with device: cuda yet"), zero.log)
        // Plain data parallelism is no longer refused: without a GPU it stops at the driver.
        let dp = try runMPI(mpirun, qat, ranks: 2, args: ["apply", recipe, "--device", "cuda"], dir: dir)
        XCTAssertNotEqual(dp.status, 0, dp.log)
        XCTAssertFalse(dp.log.contains("runs on the CPU only"), dp.log)
        XCTAssertTrue(dp.log.contains("CUDA") || dp.log.contains("GPU"), dp.log)
    }
}
