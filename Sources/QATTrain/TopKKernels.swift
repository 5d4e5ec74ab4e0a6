import Foundation
import QATCore
import QATModels

/// Row kernels of the top-k objectives (`Recipe.TopKObjective`), in the conventions of
/// `DistillationKernels`: each row's student logits s [V] are replaced by
/// d(loss_row · gradScale)/ds, CE is at T = 1, the KD term is scaled by T², a row whose
/// target is −100 contributes nothing, and a cache slot with id < 0 is absent.
///
/// Per row the cache gives ids id_k, T = 1 teacher log-probabilities ℓ_k (over the full
/// vocabulary) and, for a top-k cache, the log rest mass ℓ_R = log Σ_{j∉top-k} p_j; for a
/// sampled cache, draw counts c_k. q = softmax(s) is the student at T = 1.
///
/// - coarse_kl: the exact KL between the (k+1)-bin coarsenings of teacher and student —
///   the k cached tokens and one "rest" bin. Student bins: log q_k = s_{id_k} − lse(s) and
///   log q_R = log Σ_{j∉top-k} q_j. Temperature acts on the bins: t = softmax_b(ℓ_b/T),
///   r = softmax_b(log q_b/T) over the k+1 bins b (so the minimiser is q_b = p_b at every T,
///   as for the full KL). KD = Σ_b t_b (log t_b − log r_b);
///   d(T²·KD)/ds_j = T·(r_b(j) − t_b(j))·w_j with w_j = 1 on the top-k and q_j / q_R in the
///   rest bin (the tail's shape is free, only its mass is matched). With k = V the rest bin
///   is empty and this is exactly the full forward KL(softmax(u/T) ‖ softmax(s/T)).
/// - both_normalized (axolotl's `normalize_topk`): t = softmax_k(ℓ_k/T), r = softmax_k(s_{id_k}/T),
///   both over the k entries only; KD = Σ_k t_k (log t_k − log r_k); the gradient touches
///   only the k logits. The student's mass outside the top-k is unconstrained.
/// - teacher_normalized (qat ≤ v1): `DistillationKernels.topKRow` — t over the k entries,
///   the student's full-vocabulary log-softmax; its minimiser puts all mass on the top-k.
/// - sampled (sparse logit sampling): the cache holds N = Σ c_k draws from p, so c_k/N is an
///   unbiased estimate of p. At temperature T the target p_T ∝ p^{1/T} is reached by
///   self-normalised importance weights w_k ∝ c_k·exp(ℓ_k (1/T − 1)) (exactly c_k/N at
///   T = 1); log p_T,k is estimated as ℓ_k/T − log Ẑ_T with Ẑ_T = Σ_k (c_k/N) exp(ℓ_k (1/T − 1)).
///   KD = Σ_k w_k (log p̂_T,k − log q_T[id_k]), q_T = softmax(s/T) over the full vocabulary;
///   d(T²·KD)/ds_j = T·(q_T,j − Σ_k w_k [id_k = j]). At T = 1 the KD value and its gradient
///   are unbiased estimates of KL(p ‖ q) and its gradient (at T ≠ 1 consistent, not unbiased).
public enum TopKKernels {
    /// Scratch floats a worker needs per row.
    static func scratchCount(vocab: Int, topK: Int) -> Int { 2 * vocab + 4 * topK }

    /// One row of `objective`; `rest` is ℓ_R (coarse_kl), `counts` the draw counts (sampled).
    @inline(__always)
    static func row(
        _ objective: Recipe.TopKObjective, s: UnsafeMutablePointer<Float>, vocab V: Int, ids: UnsafePointer<Int32>,
        logprobs: UnsafePointer<Float>, rest: Float, counts: UnsafePointer<Float>?, topK K: Int, target: Int32,
        k: DistillationConstants, c: DistillationKernels.Coefficients, scratch: UnsafeMutablePointer<Float>
    ) -> (ce: Double, kd: Double) {
        switch objective {
        case .teacherNormalized:
            return DistillationKernels.topKRow(
                s: s, vocab: V, ids: ids, logprobs: logprobs, topK: K, target: target, k: k, c: c, scratch: scratch)
        case .sampled:
            // The legacy kernel with teacher weights w_k in place of softmax_k(ℓ_k/T).
            let w = scratch + 2 * V + 2 * K, lw = w + K
            let kd = sampledWeights(logprobs: logprobs, counts: counts!, ids: ids, topK: K, invT: c.invT, w: w, logW: lw)
            return weightedRow(
                s: s, vocab: V, ids: ids, weights: w, logTarget: lw, topK: K, target: target, k: k, c: c,
                scratch: scratch, kdOn: kd)
        case .coarseKL:
            return coarseRow(
                s: s, vocab: V, ids: ids, logprobs: logprobs, rest: rest, topK: K, target: target, k: k, c: c, scratch: scratch)
        case .bothNormalized:
            return bothNormalizedRow(s: s, vocab: V, ids: ids, logprobs: logprobs, topK: K, target: target, k: k, c: c, scratch: scratch)
        }
    }

    /// softmax over the present entries of x·scale (+ one extra bin `extra`·scale when given):
    /// writes probabilities to `p` and log-probabilities to `lp`; returns (log p_extra, whether
    /// any entry is finite).
    @inline(__always)
    static func binSoftmax(
        _ x: (Int) -> Double, present: (Int) -> Bool, count K: Int, extra: Double, scale: Double,
        p: UnsafeMutablePointer<Double>, lp: UnsafeMutablePointer<Double>
    ) -> (lpExtra: Double, any: Bool) {
        var m = extra * scale
        for i in 0..<K where present(i) { m = max(m, x(i) * scale) }
        guard m > -Double.infinity else { return (-Double.infinity, false) }
        var sum = exp(extra * scale - m)
        for i in 0..<K where present(i) { sum += exp(x(i) * scale - m) }
        let l = m + log(sum)
        for i in 0..<K {
            if present(i) { lp[i] = x(i) * scale - l; p[i] = exp(lp[i]) } else { lp[i] = -Double.infinity; p[i] = 0 }
        }
        return (extra * scale - l, true)
    }

    /// The coarse_kl row (see the type's doc comment).
    @inline(__always)
    static func coarseRow(
        s: UnsafeMutablePointer<Float>, vocab V: Int, ids: UnsafePointer<Int32>, logprobs: UnsafePointer<Float>, rest: Float,
        topK K: Int, target: Int32, k: DistillationConstants, c: DistillationKernels.Coefficients, scratch: UnsafeMutablePointer<Float>
    ) -> (ce: Double, kd: Double) {
        if target == CrossEntropy.ignoreIndex { s.update(repeating: 0, count: V); return (0, 0) }
        var ms = -Float.infinity
        for j in 0..<V { ms = max(ms, s[j]) }
        let e = scratch, saved = scratch + V
        var sumS = 0.0
        for j in 0..<V { let x = expf(s[j] - ms); e[j] = x; sumS += Double(x) }
        let lse = Double(ms) + log(sumS)
        // The student's rest mass Σ_{j∉top-k} e_j: total − top-k, or, when that difference has
        // cancelled (the top-k holds ≥ 99.9% of the mass), summed directly over the tail.
        var sumK = 0.0
        for i in 0..<K where ids[i] >= 0 { sumK += Double(e[Int(ids[i])]) }
        var restS = sumS - sumK
        if restS < 1e-3 * sumS {
            for i in 0..<K where ids[i] >= 0 { saved[i] = e[Int(ids[i])]; e[Int(ids[i])] = 0 }
            restS = 0
            for j in 0..<V { restS += Double(e[j]) }
            for i in 0..<K where ids[i] >= 0 { e[Int(ids[i])] = saved[i] }
        }
        let logRestQ = restS > 0 ? log(restS) + Double(ms) - lse : -Double.infinity
        let dp = UnsafeMutableRawPointer(scratch + 2 * V).bindMemory(to: Double.self, capacity: 4 * K)
        let tp = dp, tlp = dp + K, rp = dp + 2 * K, rlp = dp + 3 * K
        let invT = c.invT
        // Teacher bins at T (its rest bin from the cache); student bins at T.
        let t = binSoftmax({ Double(logprobs[$0]) }, present: { ids[$0] >= 0 }, count: K, extra: Double(rest), scale: invT, p: tp, lp: tlp)
        let r = binSoftmax(
            { Double(s[Int(ids[$0])]) - lse }, present: { ids[$0] >= 0 }, count: K, extra: logRestQ, scale: invT,
            p: rp, lp: rlp)
        var kd = 0.0
        var gRest = 0.0
        if t.any {
            for i in 0..<K where ids[i] >= 0 && tp[i] > 0 { kd += tp[i] * (tlp[i] - rlp[i]) }
            let tR = exp(t.lpExtra), rR = exp(r.lpExtra)
            if tR > 0 { kd += tR * (t.lpExtra - max(r.lpExtra, -745)) }
            gRest = rR - tR
        }
        var ce = 0.0
        if k.computeCE { ce = lse - Double(s[Int(target)]) }
        let cKD = Double(c.cKD), cCE = c.cCE, iS = Float(1 / sumS)
        let tail = Float(t.any && restS > 0 ? cKD * gRest / restS : 0)
        if k.computeCE {
            for j in 0..<V { s[j] = (tail + cCE * iS) * e[j] }
        } else {
            for j in 0..<V { s[j] = tail * e[j] }
        }
        if t.any {
            for i in 0..<K where ids[i] >= 0 {
                let j = Int(ids[i])
                s[j] = Float(cKD * (rp[i] - tp[i])) + (k.computeCE ? cCE * iS * e[j] : 0)
            }
        }
        if k.computeCE { s[Int(target)] -= cCE }
        return (ce, c.t2 * kd)
    }

    /// The both_normalized row (see the type's doc comment).
    @inline(__always)
    static func bothNormalizedRow(
        s: UnsafeMutablePointer<Float>, vocab V: Int, ids: UnsafePointer<Int32>, logprobs: UnsafePointer<Float>,
        topK K: Int, target: Int32, k: DistillationConstants, c: DistillationKernels.Coefficients, scratch: UnsafeMutablePointer<Float>
    ) -> (ce: Double, kd: Double) {
        if target == CrossEntropy.ignoreIndex { s.update(repeating: 0, count: V); return (0, 0) }
        let dp = UnsafeMutableRawPointer(scratch + 2 * V).bindMemory(to: Double.self, capacity: 4 * K)
        let tp = dp, tlp = dp + K, rp = dp + 2 * K, rlp = dp + 3 * K
        let t = binSoftmax(
            { Double(logprobs[$0]) }, present: { ids[$0] >= 0 }, count: K, extra: -Double.infinity, scale: c.invT, p: tp, lp: tlp)
        _ = binSoftmax(
            { Double(s[Int(ids[$0])]) }, present: { ids[$0] >= 0 }, count: K, extra: -Double.infinity, scale: c.invT, p: rp, lp: rlp)
        var kd = 0.0
        if t.any { for i in 0..<K where ids[i] >= 0 && tp[i] > 0 { kd += tp[i] * (tlp[i] - rlp[i]) } }
        var ce = 0.0
        if k.computeCE {
            var ms = -Float.infinity
            for j in 0..<V { ms = max(ms, s[j]) }
            var sum = 0.0
            for j in 0..<V { let x = expf(s[j] - ms); scratch[j] = x; sum += Double(x) }
            ce = Double(ms) + log(sum) - Double(s[Int(target)])
            let f = c.cCE * Float(1 / sum)
            for j in 0..<V { s[j] = f * scratch[j] }
            s[Int(target)] -= c.cCE
        } else {
            s.update(repeating: 0, count: V)
        }
        if t.any { for i in 0..<K where ids[i] >= 0 { s[Int(ids[i])] += Float(Double(c.cKD) * (rp[i] - tp[i])) } }
        return (ce, c.t2 * kd)
    }

    /// Self-normalised importance weights of a sampled row at 1/T = `invT` into `w`, and the
    /// estimated log p_T of each drawn id into `logW`. Returns 1 when the row has draws, else 0.
    @inline(__always)
    static func sampledWeights(
        logprobs: UnsafePointer<Float>, counts: UnsafePointer<Float>, ids: UnsafePointer<Int32>, topK K: Int,
        invT: Double, w: UnsafeMutablePointer<Float>, logW: UnsafeMutablePointer<Float>
    ) -> Float {
        var n = 0.0, m = -Double.infinity
        for i in 0..<K where ids[i] >= 0 && counts[i] > 0 { n += Double(counts[i]); m = max(m, Double(logprobs[i]) * (invT - 1)) }
        guard n > 0, m > -Double.infinity else {
            for i in 0..<K { w[i] = 0; logW[i] = 0 }
            return 0
        }
        // Σ_k (c_k/N)·exp(ℓ_k (1/T − 1)) = Ẑ_T, computed relative to exp(m).
        var z = 0.0
        for i in 0..<K where ids[i] >= 0 && counts[i] > 0 { z += Double(counts[i]) / n * exp(Double(logprobs[i]) * (invT - 1) - m) }
        let logZ = m + log(z)
        for i in 0..<K {
            guard ids[i] >= 0, counts[i] > 0 else { w[i] = 0; logW[i] = 0; continue }
            let a = Double(logprobs[i]) * (invT - 1)
            w[i] = Float(Double(counts[i]) / n * exp(a - logZ))
            logW[i] = Float(Double(logprobs[i]) * invT - logZ)
        }
        return 1
    }

    /// KD against fixed target weights w_k (Σ w = 1) at ids id_k with target log-probs logTarget_k:
    /// KD = Σ_k w_k (logTarget_k − log q_T[id_k]), gradient T·(q_T − w) (+ CE at T = 1).
    @inline(__always)
    static func weightedRow(
        s: UnsafeMutablePointer<Float>, vocab V: Int, ids: UnsafePointer<Int32>, weights w: UnsafePointer<Float>,
        logTarget: UnsafePointer<Float>, topK K: Int, target: Int32, k: DistillationConstants, c: DistillationKernels.Coefficients,
        scratch: UnsafeMutablePointer<Float>, kdOn: Float
    ) -> (ce: Double, kd: Double) {
        if target == CrossEntropy.ignoreIndex { s.update(repeating: 0, count: V); return (0, 0) }
        let invTf = Float(c.invT)
        var ms = -Float.infinity
        for j in 0..<V { ms = max(ms, s[j]) }
        let maxA = Float(Double(ms) * c.invT)
        let eA = scratch, eS = scratch + V
        let ceSeparate = k.computeCE && k.temperature != 1
        var sumA = 0.0, sumS = 0.0
        for j in 0..<V { let x = expf(s[j] * invTf - maxA); eA[j] = x; sumA += Double(x) }
        if ceSeparate { for j in 0..<V { let x = expf(s[j] - ms); eS[j] = x; sumS += Double(x) } }
        let lseA = Double(maxA) + log(sumA)
        var kd = 0.0
        for i in 0..<K where ids[i] >= 0 && w[i] > 0 {
            kd += Double(w[i]) * (Double(logTarget[i]) - (Double(s[Int(ids[i])]) * c.invT - lseA))
        }
        var ce = 0.0, iS: Float = 0, eCE = eA
        if k.computeCE {
            let t = Int(target)
            if ceSeparate {
                ce = Double(ms) + log(sumS) - Double(s[t]); iS = Float(1 / sumS); eCE = eS
            } else {
                ce = lseA - Double(s[t]); iS = Float(1 / sumA)
            }
        }
        let iA = Float(1 / sumA), cKD = c.cKD * kdOn, cCE = c.cCE
        if k.computeCE {
            for j in 0..<V { s[j] = cKD * eA[j] * iA + cCE * eCE[j] * iS }
            s[Int(target)] -= cCE
        } else {
            for j in 0..<V { s[j] = cKD * eA[j] * iA }
        }
        for i in 0..<K where ids[i] >= 0 { s[Int(ids[i])] -= cKD * w[i] }
        return (ce, c.t2 * kd * Double(kdOn))
    }

    /// `row` over n rows in parallel (row-ordered sums, deterministic). `rest` is [n] (coarse_kl),
    /// `counts` [n·K] (sampled).
    public static func rows(
        _ objective: Recipe.TopKObjective, student: UnsafeMutablePointer<Float>, n: Int, vocab V: Int, ids: UnsafePointer<Int32>,
        logprobs: UnsafePointer<Float>, rest: UnsafePointer<Float>?, counts: UnsafePointer<Float>?, topK K: Int,
        targets: UnsafePointer<Int32>, k: DistillationConstants, gradScale: Float
    ) -> (ce: Double, kd: Double) {
        let c = DistillationKernels.Coefficients(k, gradScale: gradScale)
        var ces = [Double](repeating: 0, count: n), kds = [Double](repeating: 0, count: n)
        let sp = SendablePointer(student)
        let ip = SendablePointer(UnsafeMutablePointer(mutating: ids)), lp = SendablePointer(UnsafeMutablePointer(mutating: logprobs))
        let rp = rest.map { SendablePointer(UnsafeMutablePointer(mutating: $0)) }
        let np = counts.map { SendablePointer(UnsafeMutablePointer(mutating: $0)) }
        let tg = SendablePointer(UnsafeMutablePointer(mutating: targets))
        ces.withUnsafeMutableBufferPointer { cb in
            kds.withUnsafeMutableBufferPointer { kb in
                let co = SendablePointer(cb.baseAddress!), ko = SendablePointer(kb.baseAddress!)
                Parallel.forRange(n, costPerItem: V * 8) { lo, hi in
                    // Doubles for the bins live after 2V floats: 4K doubles = 8K floats.
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 2 * V + 8 * K + 2)
                    defer { scratch.deallocate() }
                    for i in lo..<hi {
                        let r = row(
                            objective, s: sp.p + i * V, vocab: V, ids: ip.p + i * K, logprobs: lp.p + i * K,
                            rest: rp.map { $0.p[i] } ?? -.infinity, counts: np.map { UnsafePointer($0.p + i * K) }, topK: K,
                            target: tg.p[i], k: k, c: c, scratch: scratch)
                        co.p[i] = r.ce; ko.p[i] = r.kd
                    }
                }
            }
        }
        return (ces.reduce(0, +), kds.reduce(0, +))
    }
}
