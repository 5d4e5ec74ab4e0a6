import QATCore
import QATModels

/// Loss sums of one micro-batch (not yet normalised): the trainer divides once by the
/// valid-token count of the whole optimizer step.
public struct LossParts: Sendable, Equatable {
    /// Σ of the combined loss over valid rows.
    public var total = 0.0
    /// Σ cross-entropy (at T = 1) over valid rows; 0 when not computed.
    public var ce = 0.0
    /// Σ KD term (with T² applied) over valid rows; 0 without distillation.
    public var kd = 0.0
    public var valid = 0

    public init(total: Double = 0, ce: Double = 0, kd: Double = 0, valid: Int = 0) {
        self.total = total; self.ce = ce; self.kd = kd; self.valid = valid
    }

    public static func += (a: inout LossParts, b: LossParts) {
        a.total += b.total; a.ce += b.ce; a.kd += b.kd; a.valid += b.valid
    }
}

/// The micro-batch a loss is computing: its tokens [batch, seqLen], the shifted targets, and
/// which packed sequences of the training stream they are (for offline teacher caches).
public struct MicroBatch: Sendable {
    public var tokens: [Int32]
    public var targets: [Int32]
    public var batch: Int
    public var seqLen: Int
    public var sequenceIndices: [Int]
    public init(tokens: [Int32], targets: [Int32], batch: Int, seqLen: Int, sequenceIndices: [Int] = []) {
        self.tokens = tokens; self.targets = targets; self.batch = batch; self.seqLen = seqLen; self.sequenceIndices = sequenceIndices
    }
    public var rows: Int { batch * seqLen }
}

/// What the trainer asks of a loss: given the student's final hidden states of a micro-batch,
/// return the loss sums, write d(Σ loss · gradScale)/d hidden into `dHidden`, and accumulate
/// the lm_head gradient. QAT uses cross-entropy; QAD plugs in a distillation loss.
public protocol TrainingLoss: AnyObject {
    var description: String { get }
    func run(
        model: CausalLM, hidden: UnsafePointer<Float>, batch: MicroBatch,
        gradScale: Float, dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts
}

/// Fused chunked lm_head + cross-entropy (the QAT loss).
public final class CrossEntropyLoss: TrainingLoss {
    let head: ChunkedCrossEntropy
    public var description: String { "cross-entropy (fused lm_head, \(head.chunkRows)-row chunks)" }

    public init(vocab: Int, budgetBytes: Int = ChunkedCrossEntropy.defaultBudgetBytes) {
        head = ChunkedCrossEntropy(vocab: vocab, budgetBytes: budgetBytes)
    }

    public func run(
        model: CausalLM, hidden: UnsafePointer<Float>, batch: MicroBatch,
        gradScale: Float, dHidden: UnsafeMutablePointer<Float>
    ) throws -> LossParts {
        let r = try head.run(
            head: model.lmHead, hidden: hidden, targets: batch.targets, n: batch.rows, gradScale: gradScale, dHidden: dHidden)
        return LossParts(total: r.sum, ce: r.sum, kd: 0, valid: r.valid)
    }
}
