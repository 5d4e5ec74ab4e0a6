import Foundation
import QATCore

/// Rotary position embedding in HF's rotate-half layout: for i < D/2,
/// y[i] = x[i]·cos − x[i+D/2]·sin, y[i+D/2] = x[i+D/2]·cos + x[i]·sin.
public struct RoPE: Sendable {
    public let headDim: Int
    public let maxPositions: Int
    /// cos/sin tables [maxPositions, headDim/2].
    public let cos: [Float]
    public let sin: [Float]

    /// `invFreq` has headDim/2 entries. Angles are formed in fp32 (position × inv_freq, as
    /// HF's fp32 matmul does) and the trigonometry is evaluated in double then rounded.
    public init(invFreq: [Float], headDim: Int, maxPositions: Int, attentionScaling: Float = 1) {
        self.headDim = headDim
        self.maxPositions = maxPositions
        let half = headDim / 2
        var c = [Float](repeating: 0, count: maxPositions * half), s = c
        for t in 0..<maxPositions {
            for i in 0..<half {
                let angle = Float(t) * invFreq[i]
                c[t * half + i] = Float(Foundation.cos(Double(angle))) * attentionScaling
                s[t * half + i] = Float(Foundation.sin(Double(angle))) * attentionScaling
            }
        }
        cos = c
        sin = s
    }

    /// In place on x: [B, T, heads, D]; position of a row is its index t within the sequence.
    public func forward(_ x: UnsafeMutablePointer<Float>, batch: Int, seqLen: Int, heads: Int) {
        apply(x, batch: batch, seqLen: seqLen, heads: heads, sign: 1)
    }

    /// In place on the gradient: the transpose of the rotation (rotate by −angle).
    public func backward(_ dx: UnsafeMutablePointer<Float>, batch: Int, seqLen: Int, heads: Int) {
        apply(dx, batch: batch, seqLen: seqLen, heads: heads, sign: -1)
    }

    private func apply(_ x: UnsafeMutablePointer<Float>, batch: Int, seqLen: Int, heads: Int, sign: Float) {
        let half = headDim / 2, d = headDim
        let xp = SendablePointer(x)
        cos.withUnsafeBufferPointer { cb in
            sin.withUnsafeBufferPointer { sb in
                let cp = UncheckedBox(cb.baseAddress!), sp = UncheckedBox(sb.baseAddress!)
                Parallel.forRange(batch * seqLen, costPerItem: heads * d * 3) { start, end in
                    for row in start..<end {
                        let t = row % seqLen
                        let ct = cp.value + t * half, st = sp.value + t * half
                        for h in 0..<heads {
                            let v = xp.p + (row * heads + h) * d
                            for i in 0..<half {
                                let a = v[i], b = v[i + half], c = ct[i], s = sign * st[i]
                                v[i] = a * c - b * s
                                v[i + half] = b * c + a * s
                            }
                        }
                    }
                }
            }
        }
    }
}
