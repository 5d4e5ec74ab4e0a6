import QATCore
import QATModels
import TestSupport
import XCTest

/// `Evaluation.evaluate` with a shard: the shares partition the sequences, and their sums add
/// up to the one-process figure.
final class ShardedEvaluationTests: XCTestCase {
    func testShardRangesPartitionTheSequences() {
        for total in [0, 1, 5, 9, 180] {
            for n in 1...5 {
                let ranges = (0..<n).map { Evaluation.shardRange(total, ($0, n)) }
                XCTAssertEqual(ranges.first?.lowerBound, 0)
                XCTAssertEqual(ranges.last?.upperBound, total)
                for (a, b) in zip(ranges, ranges.dropFirst()) { XCTAssertEqual(a.upperBound, b.lowerBound) }
                XCTAssertLessThanOrEqual(ranges.map(\.count).max()! - ranges.map(\.count).min()!, 1)
            }
        }
    }

    /// Three shards of 7 sequences, each reduced by a closure that adds the other shards'
    /// sums (what the all-reduce does): every shard returns the whole split's loss.
    func testShardsReduceToTheUnshardedLoss() throws {
        let model = try CausalLM(directory: Fixtures.fortuneLM)
        var state: UInt64 = 12345
        let stream: [Int32] = (0..<(7 * 16 + 1)).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int32((state >> 33) % UInt64(model.config.vocabSize))
        }
        let full = try Evaluation.evaluate(model: model, stream: stream, seqLen: 16, batchSize: 3)
        // The per-shard sums, with no reduce.
        var sums: [[Double]] = []
        for r in 0..<3 {
            let e = try Evaluation.evaluate(model: model, stream: stream, seqLen: 16, batchSize: 3, shard: (r, 3))
            sums.append([e.loss * Double(e.tokens), Double(e.tokens)])
        }
        XCTAssertEqual(sums.reduce(0) { $0 + $1[1] }, Double(full.tokens))
        for r in 0..<3 {
            let e = try Evaluation.evaluate(model: model, stream: stream, seqLen: 16, batchSize: 3, shard: (r, 3)) { s in
                for o in 0..<3 where o != r { s[0] += sums[o][0]; s[1] += sums[o][1] }
            }
            XCTAssertEqual(e.sequences, 7); XCTAssertEqual(e.tokens, full.tokens)
            XCTAssertEqual(e.loss, full.loss, accuracy: 1e-6 * full.loss)
        }
        XCTAssertThrowsError(try Evaluation.evaluate(model: model, stream: stream, seqLen: 16, shard: (3, 3)))
    }
}
