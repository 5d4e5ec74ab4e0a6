import Foundation
import QATCore

/// Causal grouped-query scaled dot-product attention over one [B, T] batch.
///
/// q: [B, T, H, D]; k, v: [B, T, Hkv, D]; out: [B, T, H, D]; probs: [B, H, T, T] (saved
/// for backward; entries above the diagonal are zero). Query head h reads kv head
/// h / (H / Hkv).
///
/// Work is split over (batch, head, causal block) in forward and over (batch, kv head) in
/// backward, twice (dV; dS, dQ and dK), so that the dK/dV accumulation over a group's heads
/// stays in one task, in head order. The products are single-threaded sgemms over causal
/// blocks of `blockRows` query rows: block r only multiplies the keys 0 ..< its last row + 1,
/// skipping most of the masked upper triangle (about 40% of the attention FLOPs at T = 256).
public enum Attention {
    public struct Shape: Sendable {
        public let batch, seqLen, heads, kvHeads, headDim: Int
        /// Keys at distance ≥ window are masked (Mistral's sliding window); nil: full causal.
        public let window: Int?
        public init(batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int, window: Int? = nil) {
            self.batch = batch; self.seqLen = seqLen; self.heads = heads; self.kvHeads = kvHeads
            self.headDim = headDim; self.window = window
        }
        var scale: Float { 1 / Float(headDim).squareRoot() }
        var group: Int { heads / kvHeads }
    }

    /// Query rows per causal block.
    static let blockRows = 64

    public static func forward(
        out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
        q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>, shape s: Shape
    ) {
        let T = s.seqLen, D = s.headDim, qs = s.heads * D, ks = s.kvHeads * D
        let op = SendablePointer(out), pp = SendablePointer(probs)
        let qp = UncheckedBox(q), kp = UncheckedBox(k), vp = UncheckedBox(v)
        // One task per (batch, head, causal block), the costliest blocks (the last rows, which
        // see the most keys) handed out first: 8 × 9 (batch, head) pairs as tasks left 16
        // workers a last round of 8 (72 / 16 = 4.5 rounds of work in 5); blocks of unequal cost,
        // largest first, even out. Each block is computed the same way in any task order.
        let pairs = s.batch * s.heads, blocks = (T + blockRows - 1) / blockRows
        Parallel.forEachDynamic(pairs * blocks) { _, t in
            let bh = t % pairs, r0 = (blocks - 1 - t / pairs) * blockRows, r1 = min(T, r0 + blockRows)
            let b = bh / s.heads, h = bh - b * s.heads, g = h / s.group
            let qh = qp.value + b * T * qs + h * D, kh = kp.value + b * T * ks + g * D, vh = vp.value + b * T * ks + g * D
            let p = pp.p + bh * T * T, o = op.p + b * T * qs + h * D
            BLAS.gemm(
                transB: true, m: r1 - r0, n: r1, k: D, alpha: s.scale, a: qh + r0 * qs, lda: qs, b: kh, ldb: ks,
                c: p + r0 * T, ldc: T, parallel: false)
            for i in r0..<r1 { softmaxRow(p + i * T, i: i, T: T, window: s.window) }
            BLAS.gemm(m: r1 - r0, n: D, k: r1, a: p + r0 * T, lda: T, b: vh, ldb: ks, c: o + r0 * qs, ldc: qs, parallel: false)
        }
    }

    /// Softmax of row i over keys j ≤ i (and i − j < window); every other entry becomes 0.
    @inline(__always)
    static func softmaxRow(_ row: UnsafeMutablePointer<Float>, i: Int, T: Int, window: Int?) {
        let lo = window.map { max(0, i - $0 + 1) } ?? 0
        let n = i + 1 - lo, x = row + lo
        let m = Kernels.max(x, n)
        let sum = Kernels.expSubtract(x, n, m)
        Kernels.scale(x, n, 1 / sum)
        if lo > 0 { row.update(repeating: 0, count: lo) }
        if i + 1 < T { (row + i + 1).update(repeating: 0, count: T - i - 1) }
    }

    /// Row-wise softmax over keys j ≤ i (and i − j < window) of a [T, T] matrix.
    static func softmaxCausal(_ p: UnsafeMutablePointer<Float>, T: Int, window: Int?) {
        for i in 0..<T { softmaxRow(p + i * T, i: i, T: T, window: window) }
    }

    /// dq is written; dk and dv are written (zeroed here, then accumulated over the heads of
    /// a group). scratch: `scratchSlots` × [T, T] (one per worker; 1 runs serially).
    ///
    /// Two tasks per (batch, kv head): the group's dV (about a quarter of the work: it needs
    /// only P and dO), and its dS, dQ and dK, handed out first. With one task per group, the
    /// 8 × 3 groups of SmolLM2's 8 × 256 batch took 16 workers two rounds for 1.5 rounds of
    /// work; as 24 large tasks then 24 small ones, the workers left idle by the second round of
    /// large tasks take the small ones. Each output block still gets the same products in the
    /// same order (over the group's heads, in head order), so the bits are unchanged.
    public static func backward(
        dq: UnsafeMutablePointer<Float>, dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>,
        dout: UnsafePointer<Float>, q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
        probs: UnsafePointer<Float>, scratch: UnsafeMutablePointer<Float>, scratchSlots: Int = 1, shape s: Shape
    ) {
        let T = s.seqLen, D = s.headDim, qs = s.heads * D, ks = s.kvHeads * D
        let dqp = SendablePointer(dq), dkp = SendablePointer(dk), dvp = SendablePointer(dv), sp = SendablePointer(scratch)
        let dop = UncheckedBox(dout), qp = UncheckedBox(q), kp = UncheckedBox(k), vp = UncheckedBox(v), pp = UncheckedBox(probs)
        let groups = s.batch * s.kvHeads
        Parallel.forEachDynamic(2 * groups, maxWorkers: max(1, scratchSlots)) { w, task in
            let bg = task % groups, valueTask = task >= groups
            let b = bg / s.kvHeads, g = bg - b * s.kvHeads
            let ko = b * T * ks + g * D
            if valueTask {
                // dV_g[r0..<r1] += P[r0..<T, r0..<r1]ᵀ dO[r0..<T] over the group's heads (P is zero above the diagonal)
                let dvg = dvp.p + ko
                for t in 0..<T { (dvg + t * ks).update(repeating: 0, count: D) }
                for h in (g * s.group)..<((g + 1) * s.group) {
                    let p = pp.value + (b * s.heads + h) * T * T, doh = dop.value + b * T * qs + h * D
                    var r0 = 0
                    while r0 < T {
                        let r1 = min(T, r0 + blockRows)
                        BLAS.gemm(
                            transA: true, m: r1 - r0, n: D, k: T - r0, a: p + r0 * T + r0, lda: T, b: doh + r0 * qs, ldb: qs,
                            beta: 1, c: dvg + r0 * ks, ldc: ks, parallel: false)
                        r0 = r1
                    }
                }
                return
            }
            let ds = sp.p + w * T * T
            let dkg = dkp.p + ko, kg = kp.value + ko, vg = vp.value + ko
            for t in 0..<T { (dkg + t * ks).update(repeating: 0, count: D) }
            for h in (g * s.group)..<((g + 1) * s.group) {
                let qo = b * T * qs + h * D
                let p = pp.value + (b * s.heads + h) * T * T
                let doh = dop.value + qo, qh = qp.value + qo, dqh = dqp.p + qo
                var r0 = 0
                while r0 < T {
                    let r1 = min(T, r0 + blockRows)
                    // dP[r0..<r1, 0..<r1] = dO Vᵀ, then dS = P ∘ (dP − Σ_j dP∘P) in place
                    BLAS.gemm(
                        transB: true, m: r1 - r0, n: r1, k: D, a: doh + r0 * qs, lda: qs, b: vg, ldb: ks,
                        c: ds + r0 * T, ldc: T, parallel: false)
                    for i in r0..<r1 { softmaxBackwardRow(ds + i * T, p + i * T, i: i, width: r1) }
                    // dQ[r0..<r1] = scale · dS K
                    BLAS.gemm(
                        m: r1 - r0, n: D, k: r1, alpha: s.scale, a: ds + r0 * T, lda: T, b: kg, ldb: ks,
                        c: dqh + r0 * qs, ldc: qs, parallel: false)
                    r0 = r1
                }
                // dK_g[c0..<c1] += scale · dS[c0..<T, c0..<c1]ᵀ Q[c0..<T]
                var c0 = 0
                while c0 < T {
                    let c1 = min(T, c0 + blockRows)
                    BLAS.gemm(
                        transA: true, m: c1 - c0, n: D, k: T - c0, alpha: s.scale, a: ds + c0 * T + c0, lda: T,
                        b: qh + c0 * qs, ldb: qs, beta: 1, c: dkg + c0 * ks, ldc: ks, parallel: false)
                    c0 = c1
                }
            }
        }
    }

    /// One row in place: dP → dS = P ∘ (dP − Σ_j dP∘P) over j < width (P is 0 for j > i).
    @inline(__always)
    static func softmaxBackwardRow(_ dr: UnsafeMutablePointer<Float>, _ pr: UnsafePointer<Float>, i: Int, width: Int) {
        let dot = Kernels.dot(dr, pr, i + 1)
        Kernels.softmaxGrad(dr, pr, i + 1, dot)
        if i + 1 < width { (dr + i + 1).update(repeating: 0, count: width - i - 1) }
    }

    /// In place: dP → dS = P ∘ (dP − Σ_j dP∘P) for a full [T, T] matrix.
    static func softmaxBackward(_ dp: UnsafeMutablePointer<Float>, _ p: UnsafePointer<Float>, T: Int) {
        for i in 0..<T { softmaxBackwardRow(dp + i * T, p + i * T, i: i, width: T) }
    }
}
