import Foundation
import QATCore
import QATModels

/// The per-row constants of a distillation loss, resolved once from a `Recipe.DistillSpec`
/// and the step's gradient scale.
///
/// Conventions (one for every path — fused, unfused, top-k):
/// - Row t of student and teacher predicts token t+1; the targets are already shifted; a row
///   whose target is −100 contributes nothing (no CE, no KD, zero gradient).
/// - With student logits s, teacher logits u and temperature T: q_T = softmax(s/T),
///   p_T = softmax(u/T).
/// - forward KL = KL(p_T ‖ q_T); reverse KL = KL(q_T ‖ p_T).
/// - generalized JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q, with the endpoints
///   β = 0 and β = 1 defined as forward KL(p‖q) and reverse KL(q‖p). This is the definition
///   of the GKD paper (Agarwal et al. 2023, eq. 1) as implemented by TRL's
///   `GKDTrainer.generalized_jsd_loss` (`F.kl_div(mixture, teacher)` weighted by β,
///   `F.kl_div(mixture, student)` by 1−β; `beta == 0` / `beta == 1` special-cased to
///   `kl_div(student, teacher)` / `kl_div(teacher, student)`) and by Liger-Kernel's
///   `LigerJSD` / `LigerFusedLinearJSD` (P = teacher, Q = student, M = βP + (1−β)Q, β = 0
///   forward KL, β = 1 reverse KL). Note the mixture formula itself tends to 0 at both ends
///   (JSD(β) ≈ β·KL(p‖q) for small β), so the loss is *not* continuous at β = 0 or 1: the
///   endpoints are the KL limits of JSD(β)/β and JSD(β)/(1−β). We keep the same special
///   cases so that a recipe means what it means in TRL/Liger.
/// - The KD term is multiplied by T² (Hinton et al.: keeps gradient magnitudes comparable
///   across temperatures); CE is always at T = 1; per row
///   loss = (1 − kd_ratio)·CE + kd_ratio·T²·KD. With kd_ratio = 1 CE is not computed.
public struct DistillationConstants: Sendable, Equatable {
    public enum Divergence: Sendable, Equatable { case forwardKL, reverseKL, jsd(beta: Double) }

    public let divergence: Divergence
    public let temperature: Double
    public let kdRatio: Double
    public let computeCE: Bool

    /// Validates the spec (temperature > 0, kd_ratio and beta in [0, 1]).
    public init(spec: Recipe.DistillSpec) throws {
        guard spec.temperature > 0, spec.temperature.isFinite else {
            throw QATError("distill.temperature must be > 0 (got \(spec.temperature))")
        }
        guard (0...1).contains(spec.kdRatio) else { throw QATError("distill.kd_ratio must be in [0, 1] (got \(spec.kdRatio))") }
        switch spec.loss {
        case .forwardKL: divergence = .forwardKL
        case .reverseKL: divergence = .reverseKL
        case .jsd:
            guard (0...1).contains(spec.beta) else { throw QATError("distill.beta must be in [0, 1] (got \(spec.beta))") }
            // Endpoints are exactly the KLs (see the type's doc comment).
            divergence = spec.beta == 0 ? .forwardKL : spec.beta == 1 ? .reverseKL : .jsd(beta: spec.beta)
        }
        temperature = spec.temperature
        kdRatio = spec.kdRatio
        computeCE = spec.kdRatio < 1
    }
}

/// Row kernels shared by the fused, unfused and top-k distillation paths. Each row's
/// logits are overwritten with d(loss_row · gradScale)/d logits, so that the caller can
/// hand the buffer straight to the lm_head backward.
///
/// Kernels are plain pointer loops; exponentials are fp32, every reduction over the
/// vocabulary is accumulated in Double (KL is a small difference of large sums).
public enum DistillationKernels {
    /// Gradient coefficients of one call: cKD multiplies d(T²·KD)/d s = T·(∂KD/∂(s/T)),
    /// cCE multiplies ∂CE/∂s.
    @usableFromInline
    struct Coefficients {
        let invT: Double
        let cKD: Float
        let cCE: Float
        let t2: Double
        init(_ k: DistillationConstants, gradScale: Float) {
            invT = 1 / k.temperature
            cKD = Float(k.kdRatio * Double(gradScale) * k.temperature)
            cCE = Float((1 - k.kdRatio) * Double(gradScale))
            t2 = k.temperature * k.temperature
        }
    }

    /// Scratch floats a worker needs per row of `vocab` for `fullRow`.
    public static func scratchCount(vocab: Int) -> Int { 4 * vocab }

    /// Full-vocabulary KD (+ CE) over one row. `s`: student logits [V] (replaced by its
    /// gradient); `u`: teacher logits, of which the first V are used (a larger teacher
    /// vocabulary with `maskExtraVocab` treats the rest as −∞, i.e. ignores them).
    /// Returns (CE at T = 1 or 0, T²·KD).
    @inline(__always)
    static func fullRow(
        s: UnsafeMutablePointer<Float>, u: UnsafePointer<Float>, vocab V: Int, target: Int32,
        k: DistillationConstants, c: Coefficients, scratch: UnsafeMutablePointer<Float>
    ) -> (ce: Double, kd: Double) {
        if target == CrossEntropy.ignoreIndex {
            s.update(repeating: 0, count: V)
            return (0, 0)
        }
        let invT = c.invT, invTf = Float(invT)
        var ms = -Float.infinity, mu = -Float.infinity
        for j in 0..<V { ms = max(ms, s[j]); mu = max(mu, u[j]) }
        let maxA = Float(Double(ms) * invT), maxB = Float(Double(mu) * invT)
        let eA = scratch, eB = scratch + V, eS = scratch + 2 * V, lm = scratch + 3 * V
        let ceSeparate = k.computeCE && k.temperature != 1
        var sumA = 0.0, sumB = 0.0, sumS = 0.0
        var dotPD = 0.0, dotQD = 0.0  // Σ eB·(u − s), Σ eA·(s − u)
        for j in 0..<V {
            let ea = expf(s[j] * invTf - maxA), eb = expf(u[j] * invTf - maxB)
            eA[j] = ea; eB[j] = eb
            sumA += Double(ea); sumB += Double(eb)
            let d = Double(u[j]) - Double(s[j])
            dotPD += Double(eb) * d
            dotQD -= Double(ea) * d
        }
        if ceSeparate {
            for j in 0..<V { let e = expf(s[j] - ms); eS[j] = e; sumS += Double(e) }
        }
        let lseA = Double(maxA) + log(sumA), lseB = Double(maxB) + log(sumB)
        var ce = 0.0
        var iS: Float = 0
        var eCE = eA
        if k.computeCE {
            let t = Int(target)
            if ceSeparate {
                ce = Double(ms) + log(sumS) - Double(s[t]); iS = Float(1 / sumS); eCE = eS
            } else {
                ce = lseA - Double(s[t]); iS = Float(1 / sumA)
            }
        }
        let iA = Float(1 / sumA), iB = Float(1 / sumB)
        let cKD = c.cKD, cCE = c.cCE, useCE = k.computeCE
        var kd: Double
        switch k.divergence {
        case .forwardKL:
            // KL(p‖q) = Σ p (b − a) + lseA − lseB; ∂/∂a = q − p.
            kd = invT * dotPD / sumB + lseA - lseB
            for j in 0..<V {
                var g = cKD * (eA[j] * iA - eB[j] * iB)
                if useCE { g += cCE * eCE[j] * iS }
                s[j] = g
            }
        case .reverseKL:
            // KL(q‖p) = Σ q (a − b) − lseA + lseB; ∂/∂a_j = q_j (log q_j − log p_j − KL).
            let r = invT * dotQD / sumA - lseA + lseB
            kd = r
            let shift = -lseA + lseB - r
            for j in 0..<V {
                let q = eA[j] * iA
                var g = cKD * q * Float((Double(s[j]) - Double(u[j])) * invT + shift)
                if useCE { g += cCE * eCE[j] * iS }
                s[j] = g
            }
        case .jsd(let betaD):
            // J = β Σ p (log p − log m) + (1−β) Σ q (log q − log m);
            // ∂J/∂a_j = (1−β) q_j (log q_j − log m_j − KL(q‖m)).
            let beta = Float(betaD)
            var j2 = 0.0, klQM = 0.0
            for j in 0..<V {
                let p = eB[j] * iB, q = eA[j] * iA
                let m = beta * p + (1 - beta) * q
                guard m > 0 else { lm[j] = 0; continue }
                let logm = Double(logf(m))
                lm[j] = Float(logm)
                let lp = Double(u[j]) * invT - lseB, lq = Double(s[j]) * invT - lseA
                let tq = Double(q) * (lq - logm)
                j2 += betaD * Double(p) * (lp - logm) + (1 - betaD) * tq
                klQM += tq
            }
            kd = j2
            let w = cKD * (1 - beta)
            for j in 0..<V {
                let q = eA[j] * iA
                var g: Float = 0
                if q > 0 { g = w * q * Float(Double(s[j]) * invT - lseA - Double(lm[j]) - klQM) }
                if useCE { g += cCE * eCE[j] * iS }
                s[j] = g
            }
        }
        if useCE { s[Int(target)] -= cCE }
        return (ce, c.t2 * kd)
    }

    /// Scratch floats a worker needs per row of `vocab` for `topKRow`.
    public static func topKScratchCount(vocab: Int, topK: Int) -> Int { 2 * vocab + 2 * topK }

    /// Top-k KD (+ CE) over one row: teacher p_k = softmax(logprob_k / T) over its k entries
    /// (entries with id < 0 are absent), student log q_T = log_softmax(s/T) over the full
    /// vocabulary gathered at the k ids; KD = Σ_k p_k (log p_k − log q_T[id_k]).
    /// ∂KD/∂(s_j/T) = q_T,j − Σ_k p_k [id_k = j]. Returns (CE at T = 1 or 0, T²·KD).
    @inline(__always)
    static func topKRow(
        s: UnsafeMutablePointer<Float>, vocab V: Int, ids: UnsafePointer<Int32>, logprobs: UnsafePointer<Float>, topK K: Int,
        target: Int32, k: DistillationConstants, c: Coefficients, scratch: UnsafeMutablePointer<Float>
    ) -> (ce: Double, kd: Double) {
        if target == CrossEntropy.ignoreIndex {
            s.update(repeating: 0, count: V)
            return (0, 0)
        }
        let invT = c.invT, invTf = Float(invT)
        var ms = -Float.infinity
        for j in 0..<V { ms = max(ms, s[j]) }
        let maxA = Float(Double(ms) * invT)
        let eA = scratch, eS = scratch + V, pk = scratch + 2 * V
        let ceSeparate = k.computeCE && k.temperature != 1
        var sumA = 0.0, sumS = 0.0
        for j in 0..<V { let e = expf(s[j] * invTf - maxA); eA[j] = e; sumA += Double(e) }
        if ceSeparate { for j in 0..<V { let e = expf(s[j] - ms); eS[j] = e; sumS += Double(e) } }
        let lseA = Double(maxA) + log(sumA)
        // Teacher over its support, at temperature T.
        var mz = -Double.infinity
        for i in 0..<K where ids[i] >= 0 { mz = max(mz, Double(logprobs[i]) * invT) }
        var kd = 0.0
        if mz > -Double.infinity {
            var sw = 0.0
            for i in 0..<K where ids[i] >= 0 { sw += exp(Double(logprobs[i]) * invT - mz) }
            let lsw = mz + log(sw)
            for i in 0..<K {
                guard ids[i] >= 0 else { pk[i] = 0; continue }
                let lp = Double(logprobs[i]) * invT - lsw
                let p = exp(lp)
                pk[i] = Float(p)
                let lq = Double(s[Int(ids[i])]) * invT - lseA
                kd += p * (lp - lq)
            }
        } else {
            for i in 0..<K { pk[i] = 0 }
        }
        var ce = 0.0
        var iS: Float = 0
        var eCE = eA
        if k.computeCE {
            let t = Int(target)
            if ceSeparate {
                ce = Double(ms) + log(sumS) - Double(s[t]); iS = Float(1 / sumS); eCE = eS
            } else {
                ce = lseA - Double(s[t]); iS = Float(1 / sumA)
            }
        }
        let iA = Float(1 / sumA), cKD = c.cKD, cCE = c.cCE
        // A row with no teacher support (every id masked) has KD = 0 and no KD gradient.
        let kdOn: Float = mz > -Double.infinity ? 1 : 0
        if k.computeCE {
            for j in 0..<V { s[j] = kdOn * cKD * eA[j] * iA + cCE * eCE[j] * iS }
            s[Int(target)] -= cCE
        } else {
            for j in 0..<V { s[j] = kdOn * cKD * eA[j] * iA }
        }
        for i in 0..<K where ids[i] >= 0 { s[Int(ids[i])] -= cKD * pk[i] }
        return (ce, c.t2 * kd)
    }

    /// `fullRow` over n rows in parallel (row-ordered sums, deterministic). Student rows have
    /// stride `vocab`, teacher rows stride `teacherStride` (≥ vocab).
    static func fullRows(
        student: UnsafeMutablePointer<Float>, teacher: UnsafePointer<Float>, teacherStride: Int, n: Int, vocab V: Int,
        targets: UnsafePointer<Int32>, k: DistillationConstants, gradScale: Float
    ) -> (ce: Double, kd: Double) {
        let c = Coefficients(k, gradScale: gradScale)
        var ces = [Double](repeating: 0, count: n), kds = [Double](repeating: 0, count: n)
        let sp = SendablePointer(student), tp = SendablePointer(UnsafeMutablePointer(mutating: teacher))
        let tg = SendablePointer(UnsafeMutablePointer(mutating: targets))
        ces.withUnsafeMutableBufferPointer { cb in
            kds.withUnsafeMutableBufferPointer { kb in
                let co = SendablePointer(cb.baseAddress!), ko = SendablePointer(kb.baseAddress!)
                Parallel.forRange(n, costPerItem: V * 16) { lo, hi in
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: scratchCount(vocab: V))
                    defer { scratch.deallocate() }
                    for i in lo..<hi {
                        let r = fullRow(
                            s: sp.p + i * V, u: tp.p + i * teacherStride, vocab: V, target: tg.p[i], k: k, c: c, scratch: scratch)
                        co.p[i] = r.ce; ko.p[i] = r.kd
                    }
                }
            }
        }
        return (ces.reduce(0, +), kds.reduce(0, +))
    }

    /// `fullRows` for a caller outside this module (the GPU selftest's reference for `kd_rows`):
    /// returns (Σ CE, Σ T²·KD) over the n rows; the student rows become their gradients.
    public static func fullRowsReference(
        student: UnsafeMutablePointer<Float>, teacher: UnsafePointer<Float>, teacherStride: Int, n: Int, vocab V: Int,
        targets: UnsafePointer<Int32>, constants k: DistillationConstants, gradScale: Float
    ) -> (ce: Double, kd: Double) {
        fullRows(
            student: student, teacher: teacher, teacherStride: teacherStride, n: n, vocab: V, targets: targets, k: k, gradScale: gradScale)
    }

    /// `topKRow` over n rows in parallel (row-ordered sums).
    static func topKRows(
        student: UnsafeMutablePointer<Float>, n: Int, vocab V: Int, ids: UnsafePointer<Int32>, logprobs: UnsafePointer<Float>,
        topK K: Int, targets: UnsafePointer<Int32>, k: DistillationConstants, gradScale: Float
    ) -> (ce: Double, kd: Double) {
        let c = Coefficients(k, gradScale: gradScale)
        var ces = [Double](repeating: 0, count: n), kds = [Double](repeating: 0, count: n)
        let sp = SendablePointer(student)
        let ip = SendablePointer(UnsafeMutablePointer(mutating: ids)), lp = SendablePointer(UnsafeMutablePointer(mutating: logprobs))
        let tg = SendablePointer(UnsafeMutablePointer(mutating: targets))
        ces.withUnsafeMutableBufferPointer { cb in
            kds.withUnsafeMutableBufferPointer { kb in
                let co = SendablePointer(cb.baseAddress!), ko = SendablePointer(kb.baseAddress!)
                Parallel.forRange(n, costPerItem: V * 8) { lo, hi in
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: topKScratchCount(vocab: V, topK: K))
                    defer { scratch.deallocate() }
                    for i in lo..<hi {
                        let r = topKRow(
                            s: sp.p + i * V, vocab: V, ids: ip.p + i * K, logprobs: lp.p + i * K, topK: K,
                            target: tg.p[i], k: k, c: c, scratch: scratch)
                        co.p[i] = r.ce; ko.p[i] = r.kd
                    }
                }
            }
        }
        return (ces.reduce(0, +), kds.reduce(0, +))
    }
}
