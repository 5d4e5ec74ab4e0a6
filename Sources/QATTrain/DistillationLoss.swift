import Foundation
import QATCore
import QATModels

/// The QAD loss with a live teacher: the teacher runs forward-only on the micro-batch's
/// tokens, then a fused chunked pass over both lm_heads computes the KD (+ CE) sums and the
/// student's gradient, chunk by chunk, so that neither model's [tokens × vocab] logits
/// exist (Liger's fused-linear-JSD pattern, here on the CPU with a byte budget).
///
/// The numerics (shift, mask, divergences, T², kd_ratio mixing) are those documented on
/// `DistillationConstants`. Sums are returned un-normalised (`LossParts`); the trainer
/// divides once by the step's valid-token count and passes gradScale = 1/that count, so
/// micro-batching does not change the loss. The teacher runs inside `run`, per micro-batch,
/// so each micro-batch is distilled against its own teacher logits (the NeMo PP-KD review
/// found only the last micro-batch's teacher logits kept).
///
/// Vocabulary: teacher and student must have the same vocabulary size, except that a
/// teacher with a *larger* vocabulary is accepted with `maskExtraVocab` (padded embedding
/// rows, e.g. a teacher padded to a multiple of 128): its logits beyond the student's
/// vocabulary are treated as −∞ in both distributions, i.e. the teacher's softmax is taken
/// over the shared ids only. A student vocabulary larger than the teacher's is an error.
public final class DistillationLoss: TrainingLoss {
    public let teacher: CausalLM
    public let spec: Recipe.DistillSpec
    public let constants: DistillationConstants
    public let maskExtraVocab: Bool
    public let studentVocab: Int
    public let teacherVocab: Int
    /// Rows per chunk: the student [rows, V_s] and teacher [rows, V_t] logits fit the budget.
    public let chunkRows: Int
    // Allocated on first use (a pipeline stage before the last never computes the loss).
    private lazy var studentLogits = Tensor(shape: [chunkRows * studentVocab], zeroed: false)
    private lazy var teacherLogits = Tensor(shape: [chunkRows * teacherVocab], zeroed: false)

    public var description: String {
        let kind: String
        switch constants.divergence {
        case .forwardKL: kind = "forward KL"
        case .reverseKL: kind = "reverse KL"
        case .jsd(let b): kind = "generalized JSD(β=\(b))"
        }
        return "distillation (\(kind), T=\(constants.temperature), kd_ratio=\(constants.kdRatio), fused lm_heads, \(chunkRows)-row chunks)"
    }

    /// `budgetBytes` bounds the two chunk logits buffers together (default 256 MiB).
    ///
    /// Why so large (ChunkedCrossEntropy's default is 128 MiB, for its one buffer): every
    /// chunk's lm_head backward reads and writes the whole [V, C] weight gradient and reads
    /// both [V, C] weights, so small chunks make the pass memory-bound. Measured at
    /// V = 151,936, C = 1,024, 1k tokens on the 2-core machine: 32 MiB (27-row chunks)
    /// 16.4 s, 64 MiB 10.8 s, 128 MiB 9.0 s, 256 MiB (220 rows) 8.2 s, unfused (1.2 GB of
    /// logits) 7.2 s. The buffers stay bounded by the budget whatever the token count.
    public init(
        teacher: CausalLM, studentVocab: Int, spec: Recipe.DistillSpec, maskExtraVocab: Bool = false,
        budgetBytes: Int = 256 << 20
    ) throws {
        constants = try DistillationConstants(spec: spec)
        let tv = teacher.config.vocabSize  // (a pipeline stage before the last holds no lm_head)
        try DistillationLoss.checkVocab(student: studentVocab, teacher: tv, maskExtraVocab: maskExtraVocab)
        self.teacher = teacher; self.spec = spec; self.maskExtraVocab = maskExtraVocab
        self.studentVocab = studentVocab; teacherVocab = tv
        chunkRows = max(1, budgetBytes / max(1, (studentVocab + tv) * 4))
    }

    /// The vocabulary rule (see the type's doc comment), as an error naming both sizes.
    public static func checkVocab(student: Int, teacher: Int, maskExtraVocab: Bool) throws {
        if student == teacher { return }
        if teacher > student {
            guard maskExtraVocab else {
                throw QATError(
                    "teacher vocabulary (\(teacher)) differs from the student's (\(student)): distillation "
                        + "needs the same vocabulary; if the teacher's extra \(teacher - student) ids are padding, "
                        + "enable mask_extra_vocab to ignore them")
            }
            return
        }
        throw QATError(
            "student vocabulary (\(student)) is larger than the teacher's (\(teacher)): the teacher "
                + "has no logits for ids \(teacher)..<\(student); distillation needs the same vocabulary")
    }

    public func run(
        model: CausalLM, hidden: UnsafePointer<Float>, batch: MicroBatch,
        gradScale: Float, dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        guard model !== teacher else {
            throw QATError("the teacher must be a separate model instance: its forward would overwrite the student's saved activations")
        }
        guard batch.targets.count == batch.rows else {
            throw QATError("distillation: \(batch.targets.count) targets for \(batch.rows) rows")
        }
        // Teacher forward on the same tokens: one layer of activations, no backward state.
        let th = try teacher.forward(tokens: batch.tokens, batch: batch.batch, seqLen: batch.seqLen, saveForBackward: false)
        return try fused(
            student: model.lmHead, hidden: hidden, teacherHidden: UnsafePointer(th), targets: batch.targets,
            n: batch.rows, gradScale: gradScale, dHidden: dHidden)
    }

    /// The fused chunked pass over precomputed final hidden states: for each chunk, student
    /// and teacher logits, loss sums and d(loss·gradScale)/d student logits in place, then the
    /// student lm_head backward (weight gradient accumulated, through its weight quantizer's
    /// STE when active; dHidden rows of the chunk overwritten).
    public func fused(
        student head: Linear, hidden: UnsafePointer<Float>, teacherHidden: UnsafePointer<Float>, targets: [Int32],
        n: Int, gradScale: Float, dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        try checkHeads(head, n: n, targets: targets)
        let V = studentVocab, Vt = teacherVocab, C = head.inFeatures, Ct = teacher.lmHead.inFeatures
        var parts = LossParts()
        try targets.withUnsafeBufferPointer { tb in
            var start = 0
            while start < n {
                let rows = min(chunkRows, n - start)
                let h = hidden + start * C
                let used = try head.forward(h, out: studentLogits.data, n: rows)
                try teacher.lmHead.forward(teacherHidden + start * Ct, out: teacherLogits.data, n: rows)
                let r = DistillationKernels.fullRows(
                    student: studentLogits.data, teacher: teacherLogits.data, teacherStride: Vt, n: rows,
                    vocab: V, targets: tb.baseAddress! + start, k: constants, gradScale: gradScale)
                parts += combine(r, targets: tb.baseAddress! + start, n: rows)
                head.backward(dy: studentLogits.data, x: h, xUsed: used, n: rows, dx: dHidden + start * C, accumulateDx: false)
                start += rows
            }
        }
        return parts
    }

    /// The unfused reference: materialises the full [n, V] logits of both models, computes
    /// every row with the same conventions, and runs one lm_head backward over all rows.
    /// Memory O(n·(V_s + V_t)); for tests and measurements, not training.
    public func reference(
        student head: Linear, hidden: UnsafePointer<Float>, teacherHidden: UnsafePointer<Float>, targets: [Int32],
        n: Int, gradScale: Float, dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        try checkHeads(head, n: n, targets: targets)
        let s = Tensor(shape: [n, studentVocab], zeroed: false), t = Tensor(shape: [n, teacherVocab], zeroed: false)
        let used = try head.forward(hidden, out: s.data, n: n)
        try teacher.lmHead.forward(teacherHidden, out: t.data, n: n)
        let r = targets.withUnsafeBufferPointer {
            DistillationKernels.fullRows(
                student: s.data, teacher: t.data, teacherStride: teacherVocab, n: n, vocab: studentVocab,
                targets: $0.baseAddress!, k: constants, gradScale: gradScale)
        }
        let parts = targets.withUnsafeBufferPointer { combine(r, targets: $0.baseAddress!, n: n) }
        head.backward(dy: s.data, x: hidden, xUsed: used, n: n, dx: dHidden, accumulateDx: false)
        return parts
    }

    /// `reference` for a full micro-batch: runs the teacher, then the unfused computation.
    public func reference(
        model: CausalLM, hidden: UnsafePointer<Float>, batch: MicroBatch, gradScale: Float,
        dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        let th = try teacher.forward(tokens: batch.tokens, batch: batch.batch, seqLen: batch.seqLen, saveForBackward: false)
        return try reference(
            student: model.lmHead, hidden: hidden, teacherHidden: UnsafePointer(th), targets: batch.targets,
            n: batch.rows, gradScale: gradScale, dHidden: dHidden)
    }

    private func checkHeads(_ head: Linear, n: Int, targets: [Int32]) throws {
        guard head.outFeatures == studentVocab else {
            throw QATError(
                "student lm_head has \(head.outFeatures) outputs, but this distillation loss was built for vocabulary \(studentVocab)")
        }
        guard targets.count == n else { throw QATError("distillation: \(targets.count) targets for \(n) rows") }
        for t in targets where t != CrossEntropy.ignoreIndex && (t < 0 || Int(t) >= studentVocab) {
            throw QATError("target id \(t) is outside the student vocabulary (size \(studentVocab))")
        }
    }

    private func combine(_ r: (ce: Double, kd: Double), targets: UnsafePointer<Int32>, n: Int) -> LossParts {
        var valid = 0
        for i in 0..<n where targets[i] != CrossEntropy.ignoreIndex { valid += 1 }
        let k = constants.kdRatio
        return LossParts(total: (1 - k) * r.ce + k * r.kd, ce: r.ce, kd: r.kd, valid: valid)
    }
}
