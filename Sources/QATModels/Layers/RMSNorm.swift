import QATCore

/// RMSNorm as in HF Llama: y = w ∘ x / sqrt(mean(x²) + eps), over the last dim C.
/// Also used per head (C = head_dim) for Qwen3's q/k norms.
public enum RMSNorm {
    /// out, inp: [N, C]; weight: [C]; rstd: [N] (saved for backward).
    public static func forward(
        out: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>,
        inp: UnsafePointer<Float>, weight: UnsafePointer<Float>, n: Int, c: Int, eps: Float
    ) {
        let o = SendablePointer(out), r = SendablePointer(rstd)
        let x = SendablePointer(UnsafeMutablePointer(mutating: inp)), w = SendablePointer(UnsafeMutablePointer(mutating: weight))
        Parallel.forRange(n, costPerItem: c * 3) { start, end in
            for i in start..<end {
                let xi = x.p + i * c, oi = o.p + i * c
                let s = Kernels.sumOfSquares(xi, c)
                let rs = 1 / (Float(s / Double(c)) + eps).squareRoot()
                r.p[i] = rs
                for j in 0..<c { oi[j] = w.p[j] * (xi[j] * rs) }
            }
        }
    }

    /// dinp (+)= dx; dweight += Σ_rows dout ∘ x̂. dinp may alias dout only when !accumulate.
    ///
    /// The weight gradient is a reduction over rows, split over blocks of whole 16-column groups
    /// (cache lines of dweight), each column summed serially in row order; dx is per row. Both
    /// run in one parallel region of dynamically claimed tasks (the column blocks first, then
    /// blocks of `dxRows(c)` rows), so the few column blocks (36 at C = 576, 4 at a head norm's
    /// C = 64) do not leave most of 16 workers idle, as a region of their own did (16 workers
    /// took 2 or 3 of the 36 blocks each: 3 where 2.25 was the share): the dx rows fill them.
    /// Every element is computed by one task, the same way whichever worker runs it, so the
    /// result does not depend on the threads. When dinp aliases dout, dx would overwrite what
    /// the column blocks read: the two passes then run one after the other.
    public static func backward(
        dinp: UnsafeMutablePointer<Float>, dweight: UnsafeMutablePointer<Float>?,
        dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        rstd: UnsafePointer<Float>, n: Int, c: Int, accumulate: Bool
    ) {
        guard n > 0, c > 0 else { return }
        let dx = SendablePointer(dinp), g = SendablePointer(UnsafeMutablePointer(mutating: dout))
        let x = SendablePointer(UnsafeMutablePointer(mutating: inp)), w = SendablePointer(UnsafeMutablePointer(mutating: weight))
        let r = SendablePointer(UnsafeMutablePointer(mutating: rstd))
        // Weight-gradient tasks of `span` 16-column blocks: one block each when that makes
        // fewer than two per worker (36 at C = 576 for 16 workers), wider at fewer workers
        // (whole cache lines of more columns per row read; each column is summed the same way).
        let blocks16 = dweight == nil ? 0 : (c + 15) / 16
        let span = max(1, blocks16 / (2 * max(1, Parallel.threads)))
        let colBlocks = (blocks16 + span - 1) / span
        let rowsPerTask = dxRows(c), rowTasks = (n + rowsPerTask - 1) / rowsPerTask
        let dw = dweight.map { SendablePointer($0) }
        // Weight-gradient task b: columns 16 · span · b ..< 16 · span · (b + 1), every row in order.
        func weightTask(_ b: Int) {
            guard let dw else { return }
            let j0 = b * 16 * span, j1 = min(c, j0 + 16 * span)
            for i in 0..<n {
                let xi = x.p + i * c, gi = g.p + i * c, rs = r.p[i]
                for j in j0..<j1 { dw.p[j] += gi[j] * (xi[j] * rs) }
            }
        }
        // dx task t: rows t · rowsPerTask ..< (t + 1) · rowsPerTask.
        func rowTask(_ t: Int) {
            let start = t * rowsPerTask, end = min(n, start + rowsPerTask)
            for i in start..<end {
                let xi = x.p + i * c, gi = g.p + i * c, di = dx.p + i * c, rs = r.p[i]
                // dot = Σ w·g·x, 8-wide.
                var acc = Kernels.V8()
                var j = 0
                while j + 8 <= c {
                    acc.addProduct(Kernels.load(w.p + j) * Kernels.load(gi + j), Kernels.load(xi + j))
                    j += 8
                }
                var dot = acc.sum()
                while j < c { dot += w.p[j] * gi[j] * xi[j]; j += 1 }
                let k = dot * rs * rs / Float(c)
                if accumulate {
                    for j in 0..<c { di[j] += rs * (w.p[j] * gi[j] - xi[j] * k) }
                } else {
                    for j in 0..<c { di[j] = rs * (w.p[j] * gi[j] - xi[j] * k) }
                }
            }
        }
        let lo = UnsafeRawPointer(dinp), hi = UnsafeRawPointer(dinp + n * c)
        let aliased = colBlocks > 0 && lo < UnsafeRawPointer(dout + n * c) && UnsafeRawPointer(dout) < hi
        // Below ~32k operations (as `Parallel.forRange`) the region costs more than the work.
        if n * c * 6 < 32_768 || Parallel.threads <= 1 {
            for b in 0..<colBlocks { weightTask(b) }
            for t in 0..<rowTasks { rowTask(t) }
        } else if aliased {
            Parallel.tasks(colBlocks) { weightTask($0) }
            Parallel.tasks(rowTasks) { rowTask($0) }
        } else {
            Parallel.tasks(colBlocks + rowTasks) { t in t < colBlocks ? weightTask(t) : rowTask(t - colBlocks) }
        }
    }

    /// Rows per dx task: about 16k elements (C = 576: 28 rows, 74 tasks at 2,048 rows), a
    /// function of the width only.
    static func dxRows(_ c: Int) -> Int { max(1, 16_384 / max(1, c)) }
}
