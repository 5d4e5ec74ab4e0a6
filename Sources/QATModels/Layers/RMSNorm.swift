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
    public static func backward(
        dinp: UnsafeMutablePointer<Float>, dweight: UnsafeMutablePointer<Float>?,
        dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        rstd: UnsafePointer<Float>, n: Int, c: Int, accumulate: Bool
    ) {
        if let dweight {
            // Weight gradient: a reduction over rows, split over column blocks (each column
            // summed serially in row order, so the result does not depend on the threads).
            let dw = SendablePointer(dweight)
            let x = SendablePointer(UnsafeMutablePointer(mutating: inp)), g = SendablePointer(UnsafeMutablePointer(mutating: dout))
            let r = SendablePointer(UnsafeMutablePointer(mutating: rstd))
            // Blocks of 16 columns (one cache line of dweight): enough blocks for 16 workers at C = 256.
            let colBlocks = (c + 15) / 16
            Parallel.forRange(colBlocks, costPerItem: n * 16 * 2) { b0, b1 in
                let j0 = b0 * 16, j1 = min(c, b1 * 16)
                for i in 0..<n {
                    let xi = x.p + i * c, gi = g.p + i * c, rs = r.p[i]
                    for j in j0..<j1 { dw.p[j] += gi[j] * (xi[j] * rs) }
                }
            }
        }
        let dx = SendablePointer(dinp), g = SendablePointer(UnsafeMutablePointer(mutating: dout))
        let x = SendablePointer(UnsafeMutablePointer(mutating: inp)), w = SendablePointer(UnsafeMutablePointer(mutating: weight))
        let r = SendablePointer(UnsafeMutablePointer(mutating: rstd))
        Parallel.forRange(n, costPerItem: c * 4) { start, end in
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
    }
}
