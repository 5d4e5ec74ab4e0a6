import Foundation
import QATCore
import QATModels
import QATTrain
import TestSupport
import XCTest

/// The top-k objectives written out directly in Double from their definitions (see
/// `TopKKernels`), for one row: student logits s [V], slot ids (−1 absent), T = 1 teacher
/// log-probs, the log rest mass (coarse_kl) and draw counts (sampled). Returns KD (not × T²).
enum TopKObjectiveReference {
    static func logSoftmax(_ x: [Double]) -> [Double] {
        let m = x.max()!
        guard m > -.infinity else { return x }
        let lse = m + log(x.reduce(0) { $0 + exp($1 - m) })
        return x.map { $0 - lse }
    }

    static func kl(_ lp: [Double], _ lq: [Double]) -> Double {
        zip(lp, lq).reduce(0) { $1.0 == -.infinity ? $0 : $0 + exp($1.0) * ($1.0 - $1.1) }
    }

    static func kd(_ o: Recipe.TopKObjective, s: [Double], ids: [Int], logprobs: [Double], rest: Double, counts: [Double], T: Double)
        -> Double
    {
        let slots = ids.indices.filter { ids[$0] >= 0 }
        switch o {
        case .teacherNormalized:
            let lp = logSoftmax(slots.map { logprobs[$0] / T }), lq = logSoftmax(s.map { $0 / T })
            return kl(lp, slots.map { lq[ids[$0]] })
        case .bothNormalized:
            return kl(logSoftmax(slots.map { logprobs[$0] / T }), logSoftmax(slots.map { s[ids[$0]] / T }))
        case .coarseKL:
            let lq = logSoftmax(s)
            let inTop = Set(slots.map { ids[$0] })
            let tail = lq.indices.filter { !inTop.contains($0) }.map { exp(lq[$0]) }.reduce(0, +)
            let t = logSoftmax(slots.map { logprobs[$0] / T } + [rest / T])
            let r = logSoftmax(slots.map { lq[ids[$0]] / T } + [log(tail) / T])
            return kl(t, r)
        case .sampled:
            let drawn = slots.filter { counts[$0] > 0 }
            let n = drawn.map { counts[$0] }.reduce(0, +)
            let z = drawn.map { counts[$0] / n * exp(logprobs[$0] * (1 / T - 1)) }.reduce(0, +)
            let lq = logSoftmax(s.map { $0 / T })
            return drawn.map { i in
                counts[i] / n * exp(logprobs[i] * (1 / T - 1)) / z * (logprobs[i] / T - log(z) - lq[ids[i]])
            }.reduce(0, +)
        }
    }
}

/// What each top-k objective converges to, how temperature acts, and the sampled estimator's
/// expectation — on explicit toy distributions through `TopKKernels.rows` (the training kernel).
final class TopKObjectiveTests: XCTestCase {
    /// A teacher over V = 32 with a heavy tail: its top-4 holds about 0.6 of the mass.
    let V = 32, K = 4
    lazy var teacherLogits: [Float] = (0..<V).map { j in Float(-0.9 * log(Double(j + 1)) + 0.3 * sin(Double(j) * 1.7)) }
    var teacherLogp: [Double] { TopKObjectiveReference.logSoftmax(teacherLogits.map(Double.init)) }

    /// The teacher's top-k row (exact float32 log-probs and rest mass).
    func topKRow() -> (ids: [Int32], logprobs: [Float], rest: Float) {
        var ids = [Int32](repeating: 0, count: K), lps = [Float](repeating: 0, count: K), rest: Float = 0
        TopKCache.selectTopK(logits: teacherLogits, n: 1, vocab: V, topK: K, ids: &ids, logprobs: &lps, restLogprob: &rest)
        return (ids, lps, rest)
    }

    /// (KD, d(T²·KD)/ds) of one row at student logits s.
    func gradient(
        _ o: Recipe.TopKObjective, s: [Float], ids: [Int32], logprobs: [Float], rest: Float, counts: [Float] = [],
        T: Double = 1
    ) throws -> (kd: Double, grad: [Float]) {
        var d = Recipe.DistillSpec()
        d.temperature = T
        d.topkObjective = o
        let k = try DistillationConstants(spec: d)
        var g = s
        let K = ids.count
        let r = ids.withUnsafeBufferPointer { ib in
            logprobs.withUnsafeBufferPointer { lb in
                counts.withUnsafeBufferPointer { cb in
                    withUnsafePointer(to: rest) { rp in
                        TopKKernels.rows(
                            o, student: &g, n: 1, vocab: V, ids: ib.baseAddress!, logprobs: lb.baseAddress!,
                            rest: o == .coarseKL ? rp : nil, counts: o == .sampled ? cb.baseAddress : nil, topK: K,
                            targets: [0], k: k, gradScale: 1)
                    }
                }
            }
        }
        return (r.kd, g)
    }

    /// Gradient descent on free student logits (from uniform): coarse_kl converges to the
    /// teacher's coarsened distribution — each top-k probability and the tail mass (0.4 here)
    /// — while teacher_normalized drives the tail mass to ~0 and misses every top-k
    /// probability; both_normalized matches only the top-k's ratios (its tail mass is not the
    /// teacher's). Sampled KD with fresh draws each step converges to the whole teacher,
    /// the tail's shape included.
    func testToyConvergence() throws {
        let row = topKRow()
        let p = teacherLogp.map(exp)
        let top = row.ids.map(Int.init)
        let pTail = 1 - top.map { p[$0] }.reduce(0, +)
        XCTAssertGreaterThan(pTail, 0.3)
        func descend(_ o: Recipe.TopKObjective, steps: Int, lr: Float) throws -> [Double] {
            var s = [Float](repeating: 0, count: V)
            for _ in 0..<steps {
                let g = try gradient(o, s: s, ids: row.ids, logprobs: row.logprobs, rest: row.rest).grad
                for j in 0..<V { s[j] -= lr * g[j] }
            }
            return TopKObjectiveReference.logSoftmax(s.map(Double.init)).map(exp)
        }
        let coarse = try descend(.coarseKL, steps: 1500, lr: 2)
        for j in top { XCTAssertEqual(coarse[j], p[j], accuracy: 1e-4, "coarse_kl top-k token \(j)") }
        XCTAssertEqual(1 - top.map { coarse[$0] }.reduce(0, +), pTail, accuracy: 1e-4, "coarse_kl tail mass")
        let old = try descend(.teacherNormalized, steps: 1500, lr: 2)
        XCTAssertLessThan(1 - top.map { old[$0] }.reduce(0, +), 0.02, "teacher_normalized empties the tail")
        for j in top { XCTAssertGreaterThan(abs(old[j] - p[j]), 0.05, "teacher_normalized top-k token \(j)") }
        let both = try descend(.bothNormalized, steps: 1500, lr: 2)
        let pTop = top.map { p[$0] }.reduce(0, +), bTop = top.map { both[$0] }.reduce(0, +)
        for j in top { XCTAssertEqual(both[j] / bTop, p[j] / pTop, accuracy: 1e-4, "both_normalized ratio \(j)") }
        // Its gradient touches only the top-k logits and sums to 0 over them: the tail logits
        // stay 0 and the top-k logits end at log p_k − mean_k log p_k — the tail mass is
        // whatever that leaves, not the teacher's.
        let meanLog = top.map { log(p[$0]) }.reduce(0, +) / Double(K)
        let tailWant = Double(V - K) / (Double(V - K) + top.map { exp(log(p[$0]) - meanLog) }.reduce(0, +))
        XCTAssertEqual(1 - bTop, tailWant, accuracy: 1e-4, "both_normalized tail mass")
        XCTAssertGreaterThan(abs(tailWant - pTail), 0.05)

        // Sampled: 64 fresh draws per step, a decaying step size (Robbins–Monro).
        var s = [Float](repeating: 0, count: V)
        var rng = SplitMix64(seed: 9)
        var avg = [Double](repeating: 0, count: V)
        let steps = 8000
        for step in 0..<steps {
            var ids = [Int32](repeating: 0, count: 64), lps = [Float](repeating: 0, count: 64), counts = [Float](repeating: 0, count: 64)
            TopKCache.sampleRows(
                logits: teacherLogits, n: 1, vocab: V, draws: 64, seed: rng.next(), firstRow: 0, ids: &ids,
                logprobs: &lps, counts: &counts)
            for i in 0..<64 where counts[i] == 0 { ids[i] = -1 }
            let g = try gradient(.sampled, s: s, ids: ids, logprobs: lps, rest: 0, counts: counts).grad
            let lr = Float(4 / (1 + Double(step) / 100))
            for j in 0..<V { s[j] -= lr * g[j] }
            if step >= steps / 2 {
                let q = TopKObjectiveReference.logSoftmax(s.map(Double.init)).map(exp)
                for j in 0..<V { avg[j] += q[j] / Double(steps / 2) }
            }
        }
        // Within SGD noise (a few % of each probability); coarse_kl's tail, by contrast, stays
        // uniform: its tokens are off by up to 60% of their probability.
        for j in 0..<V { XCTAssertEqual(avg[j], p[j], accuracy: 0.05 * p[j] + 2e-4, "sampled token \(j)") }
        let tailTokens = (0..<V).filter { !top.contains($0) }
        XCTAssertGreaterThan(tailTokens.map { abs(coarse[$0] - p[$0]) / p[$0] }.max()!, 0.3)
    }

    /// Temperature with cached T = 1 log-probs. coarse_kl scales the bins (t = softmax(ℓ_b/T),
    /// r = softmax(log q_b/T)): a student whose coarsening equals the teacher's has KD = 0 and
    /// gradient 0 at every T, and any other student has KD > 0. both_normalized and
    /// teacher_normalized: softmax_k(ℓ_k/T) = p^{1/T} renormalised over the k entries (checked
    /// against the Double reference in TopKDistillationTests). sampled: importance weights
    /// towards p^{1/T} — with many draws its KD and gradient approach the full
    /// KL(softmax(u/T) ‖ softmax(s/T)) and T·(q_T − p_T).
    func testTemperature() throws {
        let row = topKRow()
        // The teacher's own logits, tail reshuffled: same coarsening, different distribution.
        var s = teacherLogits
        let top = Set(row.ids.map(Int.init))
        let tail = (0..<V).filter { !top.contains($0) }
        let tailLse = log(tail.map { exp(Double(s[$0])) }.reduce(0, +))
        for j in tail { s[j] = Float(tailLse - log(Double(tail.count))) }
        for T in [0.5, 1.0, 2.0, 4.0] {
            let r = try gradient(.coarseKL, s: s, ids: row.ids, logprobs: row.logprobs, rest: row.rest, T: T)
            XCTAssertEqual(r.kd, 0, accuracy: 1e-9, "coarse_kl at its minimiser, T \(T)")
            XCTAssertLessThan(r.grad.map { abs($0) }.max()!, 1e-6, "coarse_kl gradient at its minimiser, T \(T)")
            var off = s
            off[Int(row.ids[0])] += 0.5
            let o = try gradient(.coarseKL, s: off, ids: row.ids, logprobs: row.logprobs, rest: row.rest, T: T)
            XCTAssertGreaterThan(o.kd, 1e-4, "coarse_kl away from its minimiser, T \(T)")
            let want = TopKObjectiveReference.kd(
                .coarseKL, s: off.map(Double.init), ids: row.ids.map(Int.init),
                logprobs: row.logprobs.map(Double.init), rest: Double(row.rest), counts: [], T: T)
            XCTAssertEqual(o.kd, T * T * want, accuracy: 1e-6 * T * T * want)
        }
        // Sampled at T = 2 with 400,000 draws against the full KL at T = 2 (the estimate's
        // standard error is about 1.5% here).
        let draws = 400_000
        var ids = [Int32](repeating: 0, count: draws), lps = [Float](repeating: 0, count: draws),
            counts = [Float](repeating: 0, count: draws)
        TopKCache.sampleRows(
            logits: teacherLogits, n: 1, vocab: V, draws: draws, seed: 3, firstRow: 0, ids: &ids, logprobs: &lps, counts: &counts)
        for i in 0..<draws where counts[i] == 0 { ids[i] = -1 }
        let student = (0..<V).map { Float(0.2 * cos(Double($0))) }
        let T = 2.0
        let r = try gradient(.sampled, s: student, ids: ids, logprobs: lps, rest: 0, counts: counts, T: T)
        let lpT = TopKObjectiveReference.logSoftmax(teacherLogits.map { Double($0) / T })
        let lqT = TopKObjectiveReference.logSoftmax(student.map { Double($0) / T })
        let full = TopKObjectiveReference.kl(lpT, lqT)
        XCTAssertEqual(r.kd, T * T * full, accuracy: 0.05 * T * T * full)
        let want = (0..<V).map { T * (exp(lqT[$0]) - exp(lpT[$0])) }
        assertClose(r.grad, want, rel: 0.04, "sampled gradient at T = 2")
        // Not the T = 1 target: the weights matter.
        let atT1 = (0..<V).map { T * (exp(lqT[$0]) - exp(teacherLogp[$0])) }
        XCTAssertGreaterThan(zip(atT1, want).map { abs($0 - $1) }.max()!, 0.2 * want.map { abs($0) }.max()!)
    }

    /// At T = 1 the sampled estimate is unbiased: averaged over many independent caches of 8
    /// draws, its KD and gradient match the full KL(p ‖ q) and q − p (within 4σ of the mean
    /// of 3,000 estimates), although a single estimate is far off.
    func testSampledUnbiased() throws {
        let student = (0..<V).map { Float(0.3 * sin(Double($0) * 0.7)) }
        let lp = teacherLogp, lq = TopKObjectiveReference.logSoftmax(student.map(Double.init))
        let full = TopKObjectiveReference.kl(lp, lq)
        let m = 3000, draws = 8
        var kds = [Double](), grads = [[Double]]()
        for i in 0..<m {
            var ids = [Int32](repeating: 0, count: draws), lps = [Float](repeating: 0, count: draws),
                counts = [Float](repeating: 0, count: draws)
            TopKCache.sampleRows(
                logits: teacherLogits, n: 1, vocab: V, draws: draws, seed: 77, firstRow: i, ids: &ids, logprobs: &lps,
                counts: &counts)
            for j in 0..<draws where counts[j] == 0 { ids[j] = -1 }
            let r = try gradient(.sampled, s: student, ids: ids, logprobs: lps, rest: 0, counts: counts)
            kds.append(r.kd); grads.append(r.grad.map(Double.init))
        }
        func check(_ xs: [Double], _ want: Double, _ what: String) {
            let mean = xs.reduce(0, +) / Double(xs.count)
            let sd = (xs.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(xs.count - 1)).squareRoot()
            XCTAssertLessThan(
                abs(mean - want), 4 * sd / Double(xs.count).squareRoot() + 1e-6, "\(what): mean \(mean) vs \(want) (sd \(sd))")
        }
        check(kds, full, "KD")
        XCTAssertGreaterThan(kds.map { abs($0 - full) }.max()!, 0.2 * full, "single estimates vary")
        for j in 0..<V { check(grads.map { $0[j] }, exp(lq[j]) - exp(lp[j]), "gradient \(j)") }
    }
}
