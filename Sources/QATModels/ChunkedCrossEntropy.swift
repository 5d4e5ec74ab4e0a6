import QATCore

/// lm_head + cross-entropy over token chunks (Liger's fused linear cross-entropy): each
/// chunk's logits [rows, V] are formed, turned into their gradient in place, and consumed
/// by the lm_head backward before the next chunk, so the [tokens × vocab] logits of the
/// whole batch never exist. Chunk rows come from a byte budget.
public final class ChunkedCrossEntropy {
    /// The default budget of the chunk's logits buffer: 128 MiB.
    ///
    /// Why not smaller: every chunk's lm_head backward reads and writes the whole [V, C] weight
    /// gradient and reads the [V, C] weight twice (forward and dX), and a chunk of few rows makes
    /// three thin products (rows × V × C) that split badly over many workers: at SmolLM2's
    /// V = 49,152, 16 MiB gave 85-row chunks, 25 of each lm_head product per 2,048-token batch,
    /// which took 454 ms of a 2,146 ms QAT step on 16 threads (the distillation head's 682-row
    /// chunks: 313 ms). 128 MiB gives 682 rows, so 4 balanced chunks of 512. The budget is fixed
    /// (not a function of the thread count), so the chunks, and the results, are the same for
    /// any thread count; the buffer is sized by the rows actually used.
    public static let defaultBudgetBytes = 128 << 20

    /// The most rows a chunk holds (the budget over one row of logits).
    public let chunkRows: Int
    private let vocab: Int
    private var logits: Tensor?

    /// `budgetBytes` bounds the chunk's logits buffer (default `defaultBudgetBytes`).
    public init(vocab: Int, budgetBytes: Int = ChunkedCrossEntropy.defaultBudgetBytes) {
        self.vocab = vocab
        chunkRows = max(1, budgetBytes / max(1, vocab * 4))
    }

    /// The chunks of `n` rows: the fewest that keep each within `chunkRows`, as equal as
    /// possible (chunk i is rows ⌊n·i/c⌋ ..< ⌊n·(i+1)/c⌋), so no thin last chunk (at 2,048 rows
    /// and 682-row chunks: 512 × 4, not 682 × 3 + 2). A function of n and the budget only.
    public func chunks(_ n: Int) -> [Range<Int>] {
        guard n > 0 else { return [] }
        let count = (n + chunkRows - 1) / chunkRows
        return (0..<count).map { n * $0 / count..<n * ($0 + 1) / count }
    }

    /// Σ CE over rows of `hidden` [n, C] against `targets` (already shifted, −100 ignored).
    /// With `dHidden`, also writes d(Σ CE · gradScale)/d hidden into it and accumulates the
    /// lm_head gradient. Returns the summed loss and the number of valid rows.
    public func run(
        head: Linear, hidden: UnsafePointer<Float>, targets: [Int32], n: Int,
        gradScale: Float? = nil, dHidden: UnsafeMutablePointer<Float>? = nil
    ) throws -> (sum: Double, valid: Int) {
        let V = head.outFeatures, C = head.inFeatures
        guard V == vocab else {
            throw QATError("chunked cross-entropy: lm_head has \(V) outputs but the loss was built for a vocabulary of \(vocab)")
        }
        guard targets.count >= n else {
            throw QATError("chunked cross-entropy: \(targets.count) targets for \(n) rows")
        }
        let parts = chunks(n)
        let most = parts.map(\.count).max() ?? 0
        if logits == nil || logits!.count < most * V { logits = Tensor(shape: [most * V], zeroed: false) }
        let buffer = logits!.data
        var total = 0.0, valid = 0
        try targets.withUnsafeBufferPointer { tb in
            for part in parts {
                let start = part.lowerBound, rows = part.count
                let h = hidden + start * C
                let used = try head.forward(h, out: buffer, n: rows)
                let r = StepProfiler.measure("ce.softmax") {
                    CrossEntropy.forward(
                        logits: buffer, targets: tb.baseAddress! + start, n: rows, vocab: V,
                        gradScale: dHidden == nil ? nil : (gradScale ?? 1))
                }
                total += r.sum
                valid += r.valid
                if let dh = dHidden {
                    head.backward(dy: buffer, x: h, xUsed: used, n: rows, dx: dh + start * C, accumulateDx: false)
                }
            }
        }
        return (total, valid)
    }
}
