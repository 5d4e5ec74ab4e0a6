import Foundation
import QATCore
import QATData
import QATIO
import TestSupport
import XCTest

/// How the binary regression inputs under `Tests/Fuzz/regressions/` were made (the text
/// ones are plain files). Each crashed (trap, stack overflow or out-of-memory kill) the
/// parser before its fix; `ParserFuzzTests` replays them on every run. Regenerate with
/// `QAT_FUZZ_MAKE_REGRESSIONS=1 swift test --filter RegressionInputs`.
final class RegressionInputs: XCTestCase {
    func dir(_ parser: String) -> URL {
        let d = Fuzz.fuzzRoot.appendingPathComponent("regressions").appendingPathComponent(parser)
        try? FileManager.default.createDirectory(at: d, withIntermediateDirectories: true)
        return d
    }

    func testMakeRegressionFiles() throws {
        guard Fuzz.env["QAT_FUZZ_MAKE_REGRESSIONS"] != nil else { throw XCTSkip("set QAT_FUZZ_MAKE_REGRESSIONS=1 to rewrite them") }
        // tokens.h5 whose 1-D stream declares 2^40 int32 (4 TiB) over unwritten chunks:
        // the reader allocated the whole dataset before reading.
        do {
            let p = dir("tokens-h5").appendingPathComponent("declares-4TiB.h5").path
            try? FileManager.default.removeItem(atPath: p)
            let f = try HDF5File(path: p, mode: .create)
            try f.createDataset("train/input_ids", of: Int32.self, shape: [1 << 40], chunkRows: 1 << 16)
            try f.flush()
        }
        // A 10 KB top-k cache whose attributes match datasets of [1, 2^15, 2^15 − 1]: reading
        // sequence 0 allocated 4 GiB per dataset (HDF5 caps a chunk at 4 GiB, else larger).
        do {
            let p = dir("topk-cache").appendingPathComponent("row-of-4GiB.h5").path
            try? FileManager.default.removeItem(atPath: p)
            let f = try HDF5File(path: p, mode: .create)
            let L = 1 << 15, K = (1 << 15) - 1
            try f.createDataset("input_ids", of: Int32.self, shape: [1, L], chunkRows: 1)
            try f.createDataset("topk_ids", of: Int32.self, shape: [1, L, K], chunkRows: 1)
            try f.createDataset("topk_logprobs", of: Float.self, shape: [1, L, K], chunkRows: 1)
            for (k, v) in [
                ("format", "qat-topk-logprobs-v1"), ("seq_len", String(L)), ("top_k", String(K)), ("vocab_size", "48"), ("sequences", "1"),
            ] {
                try f.setAttribute(k, v)
            }
            try f.flush()
        }
    }
}
