import Foundation
import QATCore

/// Causal grouped-query scaled dot-product attention over one [B, T] batch.
///
/// q: [B, T, H, D]; k, v: [B, T, Hkv, D]; out: [B, T, H, D]; probs: [B, H, T, T] (saved
/// for backward; entries above the diagonal are zero). Query head h reads kv head
/// h / (H / Hkv). Each head's scores are one sgemm; OpenBLAS threads inside it.
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

    public static func forward(
        out: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>,
        q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>, shape s: Shape
    ) {
        let T = s.seqLen, D = s.headDim, qs = s.heads * D, ks = s.kvHeads * D
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                let g = h / s.group
                let qh = q + b * T * qs + h * D, kh = k + b * T * ks + g * D, vh = v + b * T * ks + g * D
                let p = probs + (b * s.heads + h) * T * T
                BLAS.gemm(transB: true, m: T, n: T, k: D, alpha: s.scale, a: qh, lda: qs, b: kh, ldb: ks, c: p)
                softmaxCausal(p, T: T, window: s.window)
                BLAS.gemm(m: T, n: D, k: T, a: p, b: vh, ldb: ks, c: out + b * T * qs + h * D, ldc: qs)
            }
        }
    }

    /// Row-wise softmax over keys j ≤ i (and i − j < window); masked entries become 0.
    static func softmaxCausal(_ p: UnsafeMutablePointer<Float>, T: Int, window: Int?) {
        let pp = SendablePointer(p)
        Parallel.forRange(T, costPerItem: T * 2) { start, end in
            for i in start..<end {
                let row = pp.p + i * T
                let lo = window.map { max(0, i - $0 + 1) } ?? 0
                var m = -Float.infinity
                for j in lo...i { m = max(m, row[j]) }
                var sum: Float = 0
                for j in lo...i { let e = expf(row[j] - m); row[j] = e; sum += e }
                let inv = 1 / sum
                for j in 0..<lo { row[j] = 0 }
                for j in lo...i { row[j] *= inv }
                for j in (i + 1)..<T { row[j] = 0 }
            }
        }
    }

    /// dq is written; dk and dv are written (zeroed here, then accumulated over the heads of
    /// a group). scratch: [T, T].
    public static func backward(
        dq: UnsafeMutablePointer<Float>, dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>,
        dout: UnsafePointer<Float>, q: UnsafePointer<Float>, k: UnsafePointer<Float>, v: UnsafePointer<Float>,
        probs: UnsafePointer<Float>, scratch: UnsafeMutablePointer<Float>, shape s: Shape
    ) {
        let T = s.seqLen, D = s.headDim, qs = s.heads * D, ks = s.kvHeads * D
        dk.update(repeating: 0, count: s.batch * T * ks)
        dv.update(repeating: 0, count: s.batch * T * ks)
        for b in 0..<s.batch {
            for h in 0..<s.heads {
                let g = h / s.group
                let qo = b * T * qs + h * D, ko = b * T * ks + g * D
                let p = probs + (b * s.heads + h) * T * T
                // dV_g += Pᵀ dO
                BLAS.gemm(transA: true, m: T, n: D, k: T, a: p, b: dout + qo, ldb: qs, beta: 1, c: dv + ko, ldc: ks)
                // dP = dO Vᵀ
                BLAS.gemm(transB: true, m: T, n: T, k: D, a: dout + qo, lda: qs, b: v + ko, ldb: ks, c: scratch)
                softmaxBackward(scratch, p, T: T)
                // dQ = dS K · scale ; dK_g += dSᵀ Q · scale
                BLAS.gemm(m: T, n: D, k: T, alpha: s.scale, a: scratch, b: k + ko, ldb: ks, c: dq + qo, ldc: qs)
                BLAS.gemm(transA: true, m: T, n: D, k: T, alpha: s.scale, a: scratch, b: q + qo, ldb: qs, beta: 1, c: dk + ko, ldc: ks)
            }
        }
    }

    /// In place: dP → dS = P ∘ (dP − Σ_j dP∘P).
    static func softmaxBackward(_ dp: UnsafeMutablePointer<Float>, _ p: UnsafePointer<Float>, T: Int) {
        let d = SendablePointer(dp), pp = SendablePointer(UnsafeMutablePointer(mutating: p))
        Parallel.forRange(T, costPerItem: T * 3) { start, end in
            for i in start..<end {
                let dr = d.p + i * T, pr = pp.p + i * T
                var dot: Float = 0
                for j in 0...i { dot += dr[j] * pr[j] }
                for j in 0..<T { dr[j] = pr[j] * (dr[j] - dot) }
            }
        }
    }
}
