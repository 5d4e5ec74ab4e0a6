import Foundation
import QATCore
import QATData
import QATModels
import QATQuant

/// A recipe's `quantize:` and `calibration:` sections applied to a model, through the one
/// entry point `Quantization.quantize` (ModelOpt's `quantize(model, config, forward_loop)`).
extension Recipe {
    /// The recipe's quantizers inserted into `model`, not calibrated (nil: no quantize
    /// section): for a model whose amax values come from elsewhere (a training checkpoint, the
    /// stages of a pipeline). Every quantizer set of a recipe is built here, so none misses
    /// the recipe's STE or NVFP4 fake-quant mode.
    public func insertQuantizers(into model: CausalLM) -> QuantizerSet? {
        quantize.map { QuantizerSet(model: model, config: $0, ste: steMode, nvfp4Mode: nvfp4Mode) }
    }

    /// The calibration loop of this recipe: the first `calibration.samples` sequences of
    /// `stream`, in batches of `calibration.batch_size`.
    public func calibrationLoop(stream: [Int32], progress: ((Int, Int) -> Void)? = nil) throws -> CalibrationLoop {
        CalibrationLoop(
            sequences: try Calibration.sequences(from: stream, seqLen: data.seqLen, count: calibration.samples),
            seqLen: data.seqLen, batchSize: calibration.batchSize, progress: progress)
    }

    /// Post-training quantization in one process: the recipe's quantizers inserted into `model`
    /// and calibrated on the first `calibration.samples` sequences of its train data (nil: no
    /// quantize section).
    /// `forward` replaces the CPU forward during calibration (the CUDA model's hook).
    public func quantizePTQ(
        model: CausalLM, modelDirectory: String, quiet: Bool,
        forward: ((_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?)? = nil
    ) throws -> QuantizerSet? {
        guard quantize != nil else { return nil }
        let stream = try TokenData.load(
            path: data.train, split: data.trainSplit, modelDirectory: modelDirectory,
            vocabSize: model.config.vocabSize)
        var loop = try calibrationLoop(stream: stream)
        let bar = ProgressBar(total: loop.sequences.count, label: "calibrate", unit: "seq", enabled: !quiet)
        loop.progress = { done, _ in bar.update(done) }
        loop.forward = forward
        defer { bar.finish() }
        return try applyQuantization(to: model, forwardLoop: loop)
    }

    /// `Quantization.quantize` with the recipe's config, STE and NVFP4 mode (nil: no quantize
    /// section).
    public func applyQuantization(to model: CausalLM, forwardLoop: CalibrationLoop) throws -> QuantizerSet? {
        guard let config = quantize else { return nil }
        return try Quantization.quantize(model: model, config: config, ste: steMode, nvfp4Mode: nvfp4Mode, forwardLoop: forwardLoop)
    }
}
