import Foundation
import QATCore

/// Validation loss as the project (and the fixtures' PyTorch protocol) defines it.
public struct EvalResult: Sendable, Equatable {
    /// Mean cross-entropy over all predicted tokens (nats).
    public var loss: Double
    public var perplexity: Double { exp(loss) }
    public var sequences: Int
    /// Predicted tokens: sequences × (seq_len − 1).
    public var tokens: Int
    public var seconds: Double
    public var tokensPerSecond: Double { seconds > 0 ? Double(sequences * (tokens / max(sequences, 1) + 1)) / seconds : 0 }

    public init(loss: Double, sequences: Int, tokens: Int, seconds: Double) {
        self.loss = loss; self.sequences = sequences; self.tokens = tokens; self.seconds = seconds
    }
}

public enum Evaluation {
    /// Cuts `stream` into ⌊(N−1)/seqLen⌋ non-overlapping sequences of seqLen tokens (at most
    /// `maxSequences`), each predicting its own tokens 2…seqLen, and returns the mean CE.
    ///
    /// Sharded (data parallel): with `shard` (rank r of `count`) this process evaluates the
    /// contiguous share [⌊r·S/count⌋, ⌊(r+1)·S/count⌋) of the S sequences, and `reduce` sums
    /// [loss sum, valid tokens] over the group in place (an all-reduce), so every rank returns
    /// the whole split's figure: the one-process loss up to the order of the fp64 additions.
    /// `progress` then counts this rank's share. `forward` replaces `model.forward` for a
    /// pipeline stage: it returns the final hidden states on the last stage and nil on the
    /// others, which compute no loss (their zero sums go into `reduce`).
    public static func evaluate(
        model: CausalLM, stream: [Int32], seqLen: Int, batchSize: Int = 8, maxSequences: Int? = nil,
        progress: ((_ done: Int, _ total: Int) -> Void)? = nil,
        shard: (rank: Int, count: Int)? = nil, reduce: ((inout [Double]) throws -> Void)? = nil,
        forward: ((_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?)? = nil
    ) throws -> EvalResult {
        lazy var head = ChunkedCrossEntropy(vocab: model.config.vocabSize)
        return try evaluate(
            stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences, progress: progress,
            shard: shard, reduce: reduce
        ) { tokens, targets, b in
            // A pipeline stage's forward returns the final hidden states on the last stage only.
            let out =
                try forward.map { try $0(tokens, b) } ?? model.forward(tokens: tokens, batch: b, seqLen: seqLen, saveForBackward: false)
            guard let hidden = out else { return nil }
            return try head.run(head: model.lmHead, hidden: hidden, targets: targets, n: b * seqLen)
        }
    }

    /// The evaluation protocol with any model: `score` returns the CE sum and the count of
    /// valid targets of one batch of `batch` sequences (nil on a pipeline stage that computes
    /// no loss). The CPU model above and the CUDA model (`QATCUDA`) both go through here.
    public static func evaluate(
        stream: [Int32], seqLen: Int, batchSize: Int = 8, maxSequences: Int? = nil,
        progress: ((_ done: Int, _ total: Int) -> Void)? = nil,
        shard: (rank: Int, count: Int)? = nil, reduce: ((inout [Double]) throws -> Void)? = nil,
        score: (_ tokens: [Int32], _ targets: [Int32], _ batch: Int) throws -> (sum: Double, valid: Int)?
    ) throws -> EvalResult {
        guard seqLen >= 2 else { throw QATError("seq_len must be at least 2 (got \(seqLen))") }
        guard batchSize >= 1 else { throw QATError("batch size must be at least 1") }
        let count = sequenceCount(tokens: stream.count, seqLen: seqLen, maxSequences: maxSequences)
        guard count > 0 else {
            throw QATError(
                "the evaluation stream has \(stream.count) tokens: fewer than one sequence of \(seqLen) + "
                    + "1; use a smaller --seq-len or more data")
        }
        if let s = shard {
            guard s.count >= 1, (0..<s.count).contains(s.rank) else {
                throw QATError("evaluation shard \(s.rank) of \(s.count) is out of range")
            }
        }
        let start = Date()
        let mine = shard.map { shardRange(count, $0) } ?? 0..<count
        let first = mine.lowerBound, end = mine.upperBound
        var total = 0.0, valid = 0, done = 0
        while done < end - first {
            let b = min(batchSize, end - first - done)
            let tokens = Array(stream[((first + done) * seqLen)..<((first + done + b) * seqLen)])
            let targets = CrossEntropy.shiftedTargets(labels: tokens, batch: b, seqLen: seqLen)
            if let r = try score(tokens, targets, b) {
                total += r.sum
                valid += r.valid
            }
            done += b
            progress?(done, end - first)
        }
        if let reduce {
            var sums = [total, Double(valid)]
            try reduce(&sums)
            total = sums[0]; valid = Int(sums[1])
        }
        let loss = total / Double(valid)
        guard loss.isFinite else { throw QATError("evaluation loss is not finite (\(loss)): the model produces NaN/Inf logits") }
        return EvalResult(loss: loss, sequences: count, tokens: valid, seconds: Date().timeIntervalSince(start))
    }

    /// How many sequences `evaluate` cuts from a stream of `tokens` tokens: ⌊(N−1)/seqLen⌋, at
    /// most `maxSequences` (every count of evaluation sequences is this one).
    public static func sequenceCount(tokens: Int, seqLen: Int, maxSequences: Int? = nil) -> Int {
        let count = tokens > 0 && seqLen > 0 ? (tokens - 1) / seqLen : 0
        return maxSequences.map { min(count, $0) } ?? count
    }

    /// The sequences rank r of `count` evaluates out of `total`: a contiguous ⌊total/count⌋ or
    /// ⌈total/count⌉ of them.
    public static func shardRange(_ total: Int, _ shard: (rank: Int, count: Int)) -> Range<Int> {
        (total * shard.rank / shard.count)..<(total * (shard.rank + 1) / shard.count)
    }
}
