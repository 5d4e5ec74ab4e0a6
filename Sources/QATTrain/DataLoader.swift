import QATCore
import QATModels

/// Training batches from a token stream: the stream is cut into ⌊(N−1)/seq_len⌋ packed
/// sequences of seq_len tokens, visited in a seeded random order that is drawn anew each
/// epoch. The position (epoch, cursor) is all the state there is, so a checkpoint restores
/// the exact next batch.
public final class DataLoader {
    public let seqLen: Int
    public let batchSize: Int
    public let seed: UInt64
    public let sequenceCount: Int
    public private(set) var epoch = 0
    public private(set) var cursor = 0
    /// Indices (into the packed sequences) of the batch `next()` returned last, so that a
    /// loss can look up per-sequence data such as an offline teacher cache.
    public private(set) var lastIndices: [Int] = []
    private let stream: [Int32]
    private var order: [Int] = []

    public init(stream: [Int32], seqLen: Int, batchSize: Int, seed: UInt64) throws {
        let count = stream.count > 0 ? (stream.count - 1) / seqLen : 0
        guard count >= 1 else {
            throw QATError(
                "the training stream has \(stream.count) tokens: not one sequence of \(seqLen); use more data or a smaller seq_len")
        }
        self.stream = stream; self.seqLen = seqLen; self.batchSize = batchSize; self.seed = seed
        sequenceCount = count
        order = DataLoader.permutation(count, seed: seed, epoch: 0)
    }

    /// Sequences consumed so far (over all epochs).
    public var sequencesSeen: Int { epoch * sequenceCount + cursor }

    /// The next `batchSize` sequences, row-major [batchSize, seqLen]; wraps into a new epoch.
    public func next() -> [Int32] {
        var out = [Int32]()
        out.reserveCapacity(batchSize * seqLen)
        lastIndices.removeAll(keepingCapacity: true)
        for _ in 0..<batchSize {
            if cursor == sequenceCount {
                epoch += 1; cursor = 0
                order = DataLoader.permutation(sequenceCount, seed: seed, epoch: epoch)
            }
            lastIndices.append(order[cursor])
            let s = order[cursor] * seqLen
            out.append(contentsOf: stream[s..<(s + seqLen)])
            cursor += 1
        }
        return out
    }

    /// Restores a position saved by a checkpoint.
    public func seek(epoch: Int, cursor: Int) throws {
        guard epoch >= 0, epoch < 1 << 40, cursor >= 0, cursor <= sequenceCount else {
            throw QATError(
                "checkpoint data position (epoch \(epoch), cursor \(cursor)) does not fit this data "
                    + "(\(sequenceCount) sequences); the data changed since the checkpoint")
        }
        self.epoch = epoch; self.cursor = cursor
        order = DataLoader.permutation(sequenceCount, seed: seed, epoch: epoch)
    }

    /// Fisher–Yates with a generator seeded from (seed, epoch).
    static func permutation(_ n: Int, seed: UInt64, epoch: Int) -> [Int] {
        var rng = SplitMix64(seed: seed &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(epoch) &* 0xD1B5_4A32_D192_ED03 &+ 1)
        var p = Array(0..<n)
        if n > 1 {
            for i in stride(from: n - 1, to: 0, by: -1) {
                let j = Int(rng.next() % UInt64(i + 1))
                p.swapAt(i, j)
            }
        }
        return p
    }
}
