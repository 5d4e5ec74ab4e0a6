import Foundation
import QATCore
import QATData
import QATModels
import QATQuant

/// The steps `qat apply` and `qat eval --recipe` share: read the recipe's data, insert the
/// recipe's quantizers and calibrate them.
public enum Pipeline {
    /// Tokens of a data file for a split (`.h5` dataset `<split>/input_ids`, or `.jsonl`
    /// tokenized with the model's tokenizer), checked against the vocabulary.
    public static func tokens(path: String, split: String, modelDirectory: String, vocabSize: Int) throws -> [Int32] {
        let tokenizer = path.hasSuffix(".jsonl") ? try Tokenizer(path: modelDirectory) : nil
        return try TokenData.load(path: path, split: split, tokenizer: tokenizer, vocabSize: vocabSize)
    }

    /// Inserts the recipe's quantizers into `model` and max-calibrates them on the first
    /// `calibration.samples` sequences of `calibrationStream`. Returns nil when the recipe
    /// quantizes nothing.
    /// `forward` replaces the CPU forward during calibration (the CUDA model's hook).
    public static func quantize(model: CausalLM, recipe: Recipe, calibrationStream: [Int32], quiet: Bool = false,
                                forward: ((_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?)? = nil) throws -> QuantizerSet? {
        guard let config = recipe.quantize else { return nil }
        let set = QuantizerSet(model: model, config: config, ste: recipe.steMode, nvfp4Mode: recipe.nvfp4Mode)
        guard !set.enabled.isEmpty else { return set }
        let seqs = try Calibration.sequences(from: calibrationStream, seqLen: recipe.data.seqLen, count: recipe.calibration.samples)
        let bar = ProgressBar(total: seqs.count, label: "calibrate", unit: "seq", enabled: !quiet)
        try Calibration.run(model: model, quantizers: set, sequences: seqs, seqLen: recipe.data.seqLen,
                            batchSize: recipe.calibration.batchSize, progress: { done, _ in bar.update(done) }, forward: forward)
        bar.finish()
        return set
    }
}
