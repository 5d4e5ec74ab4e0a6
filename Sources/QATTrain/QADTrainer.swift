import QATCore
import QATModels
import QATQuant

/// QAD = QAT + a teacher (ModelOpt's `QADTrainer`): the same quantize → calibrate → train
/// flow, with the loss replaced by distillation from the teacher — a live forward-only model
/// (by default the unquantized original), or an offline top-k log-probability cache.
public final class QADTrainer: QATTrainer {
    /// The live teacher; nil when training from a top-k cache.
    public let teacher: CausalLM?

    public init(
        model: CausalLM, teacher: CausalLM?, quantizers: QuantizerSet, calibrationSequences: [[Int32]],
        calibrationBatchSize: Int, spec: Recipe.TrainSpec, seqLen: Int, trainStream: [Int32], validationStream: [Int32],
        validationSequences: Int?, options: Options
    ) throws {
        self.teacher = teacher
        try super.init(
            model: model, quantizers: quantizers, calibrationSequences: calibrationSequences,
            calibrationBatchSize: calibrationBatchSize, spec: spec, seqLen: seqLen, trainStream: trainStream,
            validationStream: validationStream, validationSequences: validationSequences, options: options)
        let vocab = model.config.vocabSize
        if let cache = spec.distill.teacherLogprobs {
            loss = try TopKDistillationLoss(
                cache: cache, studentVocab: vocab, seqLen: seqLen, spec: spec.distill,
                sequenceCount: loader.sequenceCount)
        } else {
            guard let teacher else {
                throw QATError("QAD needs a teacher: train.distill.teacher, the original model, or train.distill.teacher_logprobs")
            }
            loss = try DistillationLoss(teacher: teacher, studentVocab: vocab, spec: spec.distill)
        }
    }
}
