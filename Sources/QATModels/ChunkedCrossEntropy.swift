import QATCore

/// lm_head + cross-entropy over token chunks (Liger's fused linear cross-entropy): each
/// chunk's logits [rows, V] are formed, turned into their gradient in place, and consumed
/// by the lm_head backward before the next chunk, so the [tokens × vocab] logits of the
/// whole batch never exist. Chunk rows come from a byte budget.
public final class ChunkedCrossEntropy {
    public let chunkRows: Int
    private let logits: Tensor

    /// `budgetBytes` bounds the chunk's logits buffer (default 16 MiB).
    public init(vocab: Int, budgetBytes: Int = 16 << 20) {
        chunkRows = max(1, budgetBytes / max(1, vocab * 4))
        logits = Tensor(shape: [chunkRows * vocab], zeroed: false)
    }

    /// Σ CE over rows of `hidden` [n, C] against `targets` (already shifted, −100 ignored).
    /// With `dHidden`, also writes d(Σ CE · gradScale)/d hidden into it and accumulates the
    /// lm_head gradient. Returns the summed loss and the number of valid rows.
    public func run(
        head: Linear, hidden: UnsafePointer<Float>, targets: [Int32], n: Int,
        gradScale: Float? = nil, dHidden: UnsafeMutablePointer<Float>? = nil
    ) throws -> (sum: Double, valid: Int) {
        let V = head.outFeatures, C = head.inFeatures
        var total = 0.0, valid = 0
        try targets.withUnsafeBufferPointer { tb in
            var start = 0
            while start < n {
                let rows = min(chunkRows, n - start)
                let h = hidden + start * C
                let used = try head.forward(h, out: logits.data, n: rows)
                let r = StepProfiler.measure("ce.softmax") {
                    CrossEntropy.forward(
                        logits: logits.data, targets: tb.baseAddress! + start, n: rows, vocab: V,
                        gradScale: dHidden == nil ? nil : (gradScale ?? 1))
                }
                total += r.sum
                valid += r.valid
                if let dh = dHidden {
                    head.backward(dy: logits.data, x: h, xUsed: used, n: rows, dx: dh + start * C, accumulateDx: false)
                }
                start += rows
            }
        }
        return (total, valid)
    }
}
