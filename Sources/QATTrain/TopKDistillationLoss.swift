import Foundation
import QATCore
import QATModels

/// QAD from an offline teacher cache (`TopKCache`, written by `qat teacher-logprobs`): no
/// teacher in memory, the student's lm_head fused and chunked as in `DistillationLoss`.
///
/// Per valid row: loss = (1 − kd_ratio)·CE(s, target) + kd_ratio·T²·KD, with CE at T = 1
/// (not computed when kd_ratio = 1), the causal shift / ignore rule of every KD path, and KD
/// given by `train.distill.topk_objective` (formulas and temperature in `TopKKernels`):
/// - `coarse_kl`: the exact forward KL between teacher and student coarsened to the
///   k cached tokens plus one rest bin. Its minimiser is the teacher's coarsening — the
///   student keeps the teacher's tail mass — and with k = V it is the full forward KL.
/// - `teacher_normalized` (qat ≤ v1): teacher renormalised over its top-k, student's
///   full-vocabulary log-softmax. Its minimiser puts all of the student's mass on the top-k
///   (on fortune-lm, k = 64 holds 0.88 of the teacher's mass): the student becomes
///   overconfident, and QAD ends worse than PTQ.
/// - `both_normalized` (default; axolotl's `normalize_topk`): both sides renormalised over the top-k;
///   the tail mass is left free.
/// - `sampled`: sparse logit sampling (Anshumann et al. 2025): a cache of k draws per
///   position from the teacher (`qat teacher-logprobs --sample`), an unbiased estimate of the
///   full KL and its gradient at T = 1 (importance-weighted at T ≠ 1).
/// Only forward KL is defined on a sparse support: reverse KL and JSD need the teacher's
/// probability of every token the student puts mass on.
///
/// Compared with axolotl's chunked top-k logprob KD (`integrations/kd`): `both_normalized`
/// is its default student/teacher normalisation (teacher T₁ log-probs rescaled as
/// p ∝ p₁^(T₁/T) over the k entries, T² scaling). We differ in (1) normalisation: axolotl's
/// chunked loss divides by the number of valid (position, k) *entries*, we return sums that
/// the trainer divides once by valid *tokens*, the same normaliser as CE; (2) the shift: our
/// cache row t already holds the prediction of token t+1, like MicroBatch targets; (3) the
/// cache is validated against the batch (seq_len, vocabulary, sequence count and the tokens
/// themselves), so a cache built from other data is an error, not a silently wrong target.
public final class TopKDistillationLoss: TrainingLoss {
    public let reader: TopKCacheReader
    public let spec: Recipe.DistillSpec
    public let constants: DistillationConstants
    public let studentVocab: Int
    public let seqLen: Int
    public let maskExtraVocab: Bool
    public let chunkRows: Int
    public let objective: Recipe.TopKObjective
    private let logits: Tensor

    public var description: String {
        "top-k distillation (\(objective.rawValue), "
            + "\(reader.header.kind == .sampled ? "\(reader.header.topK) draws" : "k=\(reader.header.topK)") "
            + "from \(reader.path), T=\(constants.temperature), kd_ratio=\(constants.kdRatio), fused lm_head, "
            + "\(chunkRows)-row chunks)"
    }

    /// Opens and validates the cache: its seq_len must be the run's, its vocabulary the
    /// student's (or larger with `maskExtraVocab`: ids ≥ the student's vocabulary are then
    /// dropped and the teacher renormalised over the rest), and, when `sequenceCount` (the
    /// trainer's ⌊(N−1)/L⌋) is given, it must hold that many sequences. `budgetBytes` bounds
    /// the student's chunk logits (default 128 MiB: large chunks keep the lm_head backward,
    /// which sweeps the whole weight gradient per chunk, compute-bound; see DistillationLoss).
    public init(
        cache path: String, studentVocab: Int, seqLen: Int, spec: Recipe.DistillSpec, sequenceCount: Int? = nil,
        maskExtraVocab: Bool = false, budgetBytes: Int = 128 << 20
    ) throws {
        constants = try DistillationConstants(spec: spec)
        guard constants.divergence == .forwardKL else {
            throw QATError(
                "an offline top-k teacher cache supports forward_kl only (got "
                    + "\(spec.loss.rawValue)\(spec.loss == .jsd ? " with beta \(spec.beta)" : "")): reverse KL "
                    + "and JSD need the teacher's full distribution; run the teacher live instead")
        }
        let r = try TopKCacheReader(path: path)
        let h = r.header
        objective = spec.topkObjective
        if h.kind == .sampled, objective != .sampled {
            throw QATError(
                "\(path) holds sampled teacher tokens (written with --sample): set "
                    + "train.distill.topk_objective: sampled (got \(objective.rawValue))")
        }
        if h.kind == .topK, objective == .sampled {
            throw QATError(
                "\(path) holds the teacher's top-\(h.topK), not sampled tokens: write a sampled cache "
                    + "with `qat teacher-logprobs --sample`, or use topk_objective coarse_kl")
        }
        guard h.seqLen == seqLen else {
            throw QATError(
                "\(path): the cache was written with seq_len \(h.seqLen), but this run uses seq_len "
                    + "\(seqLen); rewrite it with `qat teacher-logprobs --seq-len \(seqLen)`")
        }
        do { try DistillationLoss.checkVocab(student: studentVocab, teacher: h.vocabSize, maskExtraVocab: maskExtraVocab) } catch let e
            as QATError
        {
            throw QATError("\(path): \(e.message)")
        }
        if let n = sequenceCount, n != h.sequences {
            throw QATError(
                "\(path): the cache holds \(h.sequences) sequences, but the training data has \(n) "
                    + "sequences of \(seqLen) (data \(h.data.isEmpty ? "?" : h.data), split "
                    + "\(h.split.isEmpty ? "?" : h.split) when written); rewrite the cache for this data")
        }
        reader = r; self.spec = spec; self.studentVocab = studentVocab; self.seqLen = seqLen; self.maskExtraVocab = maskExtraVocab
        chunkRows = max(1, budgetBytes / max(1, studentVocab * 4))
        logits = Tensor(shape: [chunkRows * studentVocab], zeroed: false)
    }

    /// Reads the cache rows of the batch's sequences — ids, log-probs and counts [B·L·K], rest
    /// [B·L] — validating tokens and ids.
    public func teacherRows(for batch: MicroBatch) throws -> (ids: [Int32], logprobs: [Float], rest: [Float], counts: [Float]) {
        let K = reader.header.topK, L = seqLen
        guard batch.seqLen == L else { throw QATError("batch seq_len \(batch.seqLen) differs from the cache's \(L)") }
        guard batch.sequenceIndices.count == batch.batch else {
            throw QATError(
                "top-k distillation needs the batch's sequence indices (got \(batch.sequenceIndices.count) for \(batch.batch) sequences)")
        }
        var ids = [Int32](), lps = [Float](), rest = [Float](), counts = [Float]()
        ids.reserveCapacity(batch.rows * K); lps.reserveCapacity(batch.rows * K)
        for (b, index) in batch.sequenceIndices.enumerated() {
            let row = try reader.sequence(index)
            guard row.tokens.elementsEqual(batch.tokens[(b * L)..<((b + 1) * L)]) else {
                throw QATError(
                    "\(reader.path): the cached tokens of sequence \(index) differ from the batch's: the "
                        + "cache was written from other data (\(reader.header.data) \(reader.header.split))")
            }
            ids += row.ids; lps += row.logprobs; rest += row.restLogprob; counts += row.counts
        }
        for i in ids.indices where ids[i] < 0 || Int(ids[i]) >= studentVocab {
            if ids[i] == -1, reader.header.kind == .sampled { continue }
            if maskExtraVocab, ids[i] >= 0, Int(ids[i]) < reader.header.vocabSize { ids[i] = -1; continue }
            throw QATError("\(reader.path): token id \(ids[i]) in the cache is outside the vocabulary (size \(studentVocab))")
        }
        return (ids, lps, rest, counts)
    }

    public func run(
        model: CausalLM, hidden: UnsafePointer<Float>, batch: MicroBatch,
        gradScale: Float, dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        let t = try teacherRows(for: batch)
        return try fused(
            student: model.lmHead, hidden: hidden, ids: t.ids, logprobs: t.logprobs, rest: t.rest, counts: t.counts,
            targets: batch.targets, n: batch.rows, gradScale: gradScale, dHidden: dHidden)
    }

    /// The fused chunked pass given the teacher rows: [n·K] ids (−1 = absent) and T = 1
    /// log-probabilities, the [n] log rest masses (coarse_kl) or [n·K] draw counts (sampled).
    public func fused(
        student head: Linear, hidden: UnsafePointer<Float>, ids: [Int32], logprobs: [Float], rest: [Float] = [],
        counts: [Float] = [], targets: [Int32], n: Int, gradScale: Float,
        dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        let K = reader.header.topK, V = studentVocab, C = head.inFeatures
        guard head.outFeatures == V else { throw QATError("student lm_head has \(head.outFeatures) outputs, expected \(V)") }
        guard targets.count == n, ids.count == n * K, logprobs.count == n * K else {
            throw QATError(
                "top-k distillation: \(targets.count) targets, \(ids.count) ids, \(logprobs.count) logprobs for \(n) rows of k = \(K)")
        }
        if objective == .coarseKL, rest.count != n {
            throw QATError("top-k distillation (coarse_kl): \(rest.count) rest masses for \(n) rows")
        }
        if objective == .sampled, counts.count != n * K {
            throw QATError("top-k distillation (sampled): \(counts.count) counts for \(n) rows of \(K)")
        }
        for t in targets where t != CrossEntropy.ignoreIndex && (t < 0 || Int(t) >= V) {
            throw QATError("target id \(t) is outside the student vocabulary (size \(V))")
        }
        var ce = 0.0, kd = 0.0, valid = 0
        var start = 0
        while start < n {
            let rows = min(chunkRows, n - start)
            let h = hidden + start * C
            let used = try head.forward(h, out: logits.data, n: rows)
            let r = kernel(
                start: start, rows: rows, ids: ids, logprobs: logprobs, rest: rest, counts: counts, targets: targets,
                gradScale: gradScale)
            ce += r.ce; kd += r.kd
            head.backward(dy: logits.data, x: h, xUsed: used, n: rows, dx: dHidden + start * C, accumulateDx: false)
            start += rows
        }
        for t in targets where t != CrossEntropy.ignoreIndex { valid += 1 }
        let k = constants.kdRatio
        return LossParts(total: (1 - k) * ce + k * kd, ce: ce, kd: kd, valid: valid)
    }

    /// The objective's row kernel over rows start..<start+rows of the chunk logits (rest and
    /// counts are passed only when non-empty, i.e. when the objective uses them).
    private func kernel(
        start: Int, rows: Int, ids: [Int32], logprobs: [Float], rest: [Float], counts: [Float], targets: [Int32],
        gradScale: Float
    ) -> (ce: Double, kd: Double) {
        let K = reader.header.topK
        return ids.withUnsafeBufferPointer { ib in
            logprobs.withUnsafeBufferPointer { lb in
                rest.withUnsafeBufferPointer { rb in
                    counts.withUnsafeBufferPointer { nb in
                        targets.withUnsafeBufferPointer { tb in
                            TopKKernels.rows(
                                objective, student: logits.data, n: rows, vocab: studentVocab, ids: ib.baseAddress! + start * K,
                                logprobs: lb.baseAddress! + start * K, rest: rest.isEmpty ? nil : rb.baseAddress! + start,
                                counts: counts.isEmpty ? nil : nb.baseAddress! + start * K, topK: K,
                                targets: tb.baseAddress! + start, k: constants, gradScale: gradScale)
                        }
                    }
                }
            }
        }
    }
}
