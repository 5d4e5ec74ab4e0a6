import Foundation
import TestSupport
import XCTest

/// Results do not depend on the thread count: the same short `qat apply` (fortune-lm, 64-token
/// sequences in batches of 4, so the matrix products, the fake quant and the attention are split
/// over the workers) run with 1, 2, 3, 4 and 16 threads (4, 16: the products split into 2-D grids) ends
/// with byte-identical master weights (the last checkpoint) and a byte-identical export, for
/// QAT and for QAD (live teacher).
final class ThreadDeterminismEndToEndTests: XCTestCase {
    func final(_ mode: String, threads: Int, steps: Int = 4) throws -> (weights: Data, export: Data) {
        let dir = Fixtures.tempDir("qat-threads-\(mode)-\(threads)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = try Fixtures.shortRecipe(in: dir, steps: steps, batch: 4, evalEvery: 0, saveEvery: steps, mode: mode)
        let r = try Fixtures.runQAT([
            "apply", path, "--quiet", "--threads", String(threads), "--set", "data.seq_len=64",
            "--set", "export.verify=false",
        ])
        XCTAssertEqual(r.status, 0, r.err)
        let ckpt = dir.appendingPathComponent(String(format: "export.work/checkpoints/checkpoint-%06d/model.safetensors", steps))
        return (try Data(contentsOf: ckpt), try Data(contentsOf: dir.appendingPathComponent("export/model.safetensors")))
    }

    func testQATWeightsDoNotDependOnThreadCount() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let one = try final("qat", threads: 1)
        XCTAssertGreaterThan(one.weights.count, 1_000_000)
        for t in [2, 3, 4, 16] {
            let other = try final("qat", threads: t)
            XCTAssertTrue(one.weights == other.weights, "QAT master weights differ between 1 and \(t) threads")
            XCTAssertTrue(one.export == other.export, "QAT export differs between 1 and \(t) threads")
        }
    }

    func testQADWeightsDoNotDependOnThreadCount() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let one = try final("qad", threads: 1)
        XCTAssertGreaterThan(one.weights.count, 1_000_000)
        for t in [2, 4] {
            let other = try final("qad", threads: t)
            XCTAssertTrue(one.weights == other.weights, "QAD master weights differ between 1 and \(t) threads")
            XCTAssertTrue(one.export == other.export, "QAD export differs between 1 and \(t) threads")
        }
    }
}
