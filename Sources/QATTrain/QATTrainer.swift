import QATCore
import QATModels
import QATQuant

/// QAT = the base trainer + fake-quant quantizers calibrated before the first step (ModelOpt's
/// `QATTrainer`: quantize → calibrate → train with cross-entropy). Quantizer amax values are
/// part of every checkpoint so a resumed run continues with the same scales.
open class QATTrainer: Trainer {
    public let quantizers: QuantizerSet
    /// Calibration sequences, used when the quantizers are not calibrated yet.
    public let calibrationSequences: [[Int32]]
    public let calibrationBatchSize: Int

    public init(
        model: CausalLM, quantizers: QuantizerSet, calibrationSequences: [[Int32]], calibrationBatchSize: Int,
        spec: Recipe.TrainSpec, seqLen: Int, trainStream: [Int32], validationStream: [Int32],
        validationSequences: Int?, options: Options
    ) throws {
        self.quantizers = quantizers
        self.calibrationSequences = calibrationSequences
        self.calibrationBatchSize = calibrationBatchSize
        try super.init(
            model: model, spec: spec, seqLen: seqLen, trainStream: trainStream, validationStream: validationStream,
            validationSequences: validationSequences, options: options)
    }

    /// Whether every enabled quantizer has an amax.
    public var isCalibrated: Bool { quantizers.enabled.allSatisfy { $0.amax != nil } }

    open override func prepare() throws {
        if !isCalibrated {
            log("calibrating \(quantizers.enabled.count) quantizers on \(calibrationSequences.count) sequences")
            let loop = CalibrationLoop(
                sequences: calibrationSequences, seqLen: seqLen, batchSize: calibrationBatchSize,
                forward: options.pipeline?.forwardHook(model, seqLen: seqLen))
            try Calibration.run(model: model, quantizers: quantizers, loop: loop)
        }
    }

    open override func extraState() -> [(name: String, tensor: Tensor)] { quantizers.stateTensors() }

    open override func restoreExtraState(_ tensors: [String: Tensor]) throws { try quantizers.restore(tensors, model: model) }
}
