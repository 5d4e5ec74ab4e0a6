import Foundation
import QATCore

/// Cross-entropy over vocabulary rows with HF's conventions: targets are already shifted
/// (row t holds the id of token t+1), −100 marks rows that contribute nothing.
public enum CrossEntropy {
    public static let ignoreIndex: Int32 = -100

    /// HF's causal shift: target[t] = labels[t+1] within each sequence, −100 for the last
    /// position. labels: [B, T] → targets [B, T].
    public static func shiftedTargets(labels: [Int32], batch: Int, seqLen: Int) -> [Int32] {
        var out = [Int32](repeating: ignoreIndex, count: labels.count)
        for b in 0..<batch {
            for t in 0..<(seqLen - 1) { out[b * seqLen + t] = labels[b * seqLen + t + 1] }
        }
        return out
    }

    /// Loss of one row: logsumexp(z) − z[target]. Optionally overwrites the row with
    /// d(scale·loss)/dz = scale·(softmax(z) − onehot). Returns 0 (and zero gradient) for an
    /// ignored row.
    @inline(__always)
    public static func row(_ z: UnsafeMutablePointer<Float>, vocab: Int, target: Int32, gradScale: Float?) -> Double {
        if target == ignoreIndex {
            if gradScale != nil { z.update(repeating: 0, count: vocab) }
            return 0
        }
        let m = Kernels.max(z, vocab)
        let zt = Double(z[Int(target)])
        if let scale = gradScale {
            let s = Kernels.expSubtract(z, vocab, m)
            Kernels.scale(z, vocab, scale / s)
            z[Int(target)] -= scale
            return Double(m) + log(Double(s)) - zt
        }
        let s = Kernels.expSum(z, vocab, m)
        let loss = Double(m) + log(Double(s)) - zt
        return loss
    }

    /// Sum of row losses over [n, vocab] logits (rows in parallel, summed in row order) and
    /// the number of valid rows. With gradScale the logits are replaced by their gradient.
    public static func forward(
        logits: UnsafeMutablePointer<Float>, targets: UnsafePointer<Int32>, n: Int, vocab: Int, gradScale: Float?
    ) -> (sum: Double, valid: Int) {
        let lp = SendablePointer(logits), tp = SendablePointer(UnsafeMutablePointer(mutating: targets))
        let sum = withUnsafeTemporaryAllocation(of: Double.self, capacity: Swift.max(n, 1)) { lb -> Double in
            let out = SendablePointer(lb.baseAddress!)
            Parallel.forRange(n, costPerItem: vocab * 4) { s, e in
                for i in s..<e { out.p[i] = row(lp.p + i * vocab, vocab: vocab, target: tp.p[i], gradScale: gradScale) }
            }
            var t = 0.0
            for i in 0..<n { t += lb[i] }
            return t
        }
        var valid = 0
        for i in 0..<n where targets[i] != ignoreIndex { valid += 1 }
        return (sum, valid)
    }
}
