import Foundation
import QATCore
import QATModels
import QATTrain
import TestSupport
import XCTest

/// `TopKCache.write`'s device hook (`topKOf`, what `qat teacher-logprobs --device cuda` passes):
/// the writer is the CPU's, so a hook that returns what `selectTopK` returns must give the CPU's
/// cache byte for byte, in any slot order; a hook with the wrong row count is an error.
final class TopKCacheDeviceHookTests: XCTestCase {
    let L = 8

    func testHookWritesTheCPUsCache() throws {
        let teacher = try tinyModel(seed: 2)
        let V = teacher.config.vocabSize, K = 6
        var rng = SplitMix64(seed: 9)
        let s = (0..<(L * 5 + 2)).map { _ in Int32(rng.next() % UInt64(V)) }
        let dir = Fixtures.tempDir("topk-hook")
        let cpu = dir.appendingPathComponent("cpu.h5").path, hooked = dir.appendingPathComponent("hook.h5").path
        try TopKCache.write(teacher: teacher, stream: s, seqLen: L, topK: K, to: cpu, batchSize: 3)
        var calls = 0
        try TopKCache.write(
            teacher: teacher, stream: s, seqLen: L, topK: K, to: hooked, batchSize: 3,
            topKOf: { tokens, b in
                calls += 1
                let n = b * self.L
                let h = try teacher.forward(tokens: tokens, batch: b, seqLen: self.L, saveForBackward: false)
                let z = Tensor(shape: [n, V])
                try teacher.lmHead.forward(h, out: z.data, n: n)
                var ids = [Int32](repeating: 0, count: n * K), lps = [Float](repeating: 0, count: n * K)
                var rest = [Float](repeating: 0, count: n)
                TopKCache.selectTopK(logits: z.data, n: n, vocab: V, topK: K, ids: &ids, logprobs: &lps, restLogprob: &rest)
                // Slot order is free (the writer sorts by id): reverse each row.
                for r in 0..<n {
                    ids[(r * K)..<((r + 1) * K)].reverse(); lps[(r * K)..<((r + 1) * K)].reverse()
                }
                return (ids, lps, rest)
            })
        XCTAssertEqual(calls, 2)  // 5 sequences in batches of 3
        let a = try TopKCacheReader(path: cpu), b = try TopKCacheReader(path: hooked)
        XCTAssertEqual(a.header, b.header)
        for i in 0..<5 {
            let x = try a.sequence(i), y = try b.sequence(i)
            XCTAssertEqual(x.tokens, y.tokens)
            XCTAssertEqual(x.ids, y.ids)
            XCTAssertEqual(x.logprobs.map(\.bitPattern), y.logprobs.map(\.bitPattern))
            XCTAssertEqual(x.restLogprob.map(\.bitPattern), y.restLogprob.map(\.bitPattern))
        }
        let bad = dir.appendingPathComponent("bad.h5").path
        XCTAssertThrowsError(
            try TopKCache.write(
                teacher: teacher, stream: s, seqLen: L, topK: K, to: bad, topKOf: { _, _ in ([0], [0], [0]) })
        ) { XCTAssertTrue("\($0)".contains("device top-k"), "\($0)") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: bad))
        XCTAssertThrowsError(
            try TopKCache.write(
                teacher: teacher, stream: s, seqLen: L, topK: K, to: bad, sampled: true, topKOf: { _, _ in ([], [], []) }))
    }
}
