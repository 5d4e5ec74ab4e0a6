import ArgumentParser
import Foundation
import QATCUDA
import QATCore
import QATData
import QATExport
import QATModels
import QATQuant
import QATTrain

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validation loss and perplexity of a model on a token stream.",
        discussion: """
            The stream is cut into ⌊(N−1)/seq_len⌋ non-overlapping sequences of seq_len tokens; \
            each predicts its own tokens 2…seq_len, and the mean cross-entropy over all predicted \
            tokens is reported (the protocol of the fixtures' PyTorch figures).

            Example: qat eval --model models/fortune-lm --data models/fortune-lm/tokens.h5 --split validation --json
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(
        help: ArgumentHelp(
            "Token data: an HDF5 file with <split>/input_ids, or a .jsonl file of {\"text\": …} lines "
                + "(tokenized with the model's tokenizer.json)."))
    var data: String = "models/fortune-lm/tokens.h5"

    @Option(help: "Split (HDF5 group) to evaluate.")
    var split: String = "validation"

    @Option(name: .customLong("seq-len"), help: "Tokens per sequence.")
    var seqLen: Int = 256

    @Option(name: .customLong("batch-size"), help: "Sequences per forward pass.")
    var batchSize: Int = 8

    @Option(name: .customLong("max-sequences"), help: "Evaluate at most this many sequences.")
    var maxSequences: Int?

    @Option(help: "Evaluate post-training quantization: insert this recipe's quantizers, calibrate them on its train data, then evaluate.")
    var recipe: String?

    @Option(name: .customLong("set"), help: "Override a recipe key (repeatable), e.g. --set calibration.samples=32.")
    var overrides: [String] = []

    @Flag(name: .customLong("quant-summary"), help: "Print every quantizer with its state (with --recipe).")
    var quantSummary = false

    @Flag(help: "Print one JSON object instead of text.")
    var json = false

    func run() throws {
        try QAT.guarded {
            modelOptions.applyThreads()
            let (computeDevice, precision) = try modelOptions.compute()
            // Open the GPU first: a machine without one fails in a second, not after loading.
            let device = try DeviceRunner(computeDevice, precision: precision)
            let model = try loadModelForEval(directory: modelOptions.model)
            let gpuModel = try device.copy(model)
            let stream = try TokenData.load(path: data, split: split, modelDirectory: modelOptions.model, vocabSize: model.config.vocabSize)
            if let recipePath = recipe {
                var r = try Recipe.load(path: recipePath, overrides: overrides)
                r.data.seqLen = seqLen
                let set = try r.quantizePTQ(
                    model: model, modelDirectory: modelOptions.model, quiet: json,
                    forward: gpuModel?.calibrationForward(seqLen: seqLen))
                gpuModel?.markWeightsChanged()
                if quantSummary, let set { FileHandle.standardError.write(Data((QATQuant.quantSummary(set.all) + "\n").utf8)) }
            }
            let total = Evaluation.sequenceCount(tokens: stream.count, seqLen: seqLen, maxSequences: maxSequences)
            let bar = ProgressBar(total: max(total, 1), label: "eval", unit: "seq", enabled: !json)
            let r =
                try gpuModel?.evaluate(stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences) { done, _ in
                    bar.update(done)
                }
                ?? Evaluation.evaluate(
                    model: model, stream: stream, seqLen: seqLen, batchSize: batchSize,
                    maxSequences: maxSequences
                ) { done, _ in bar.update(done) }
            bar.finish()
            let tokensPerSecond = Double(r.sequences * seqLen) / max(r.seconds, 1e-9)
            if json {
                printJSON([
                    ("loss", r.loss), ("perplexity", r.perplexity), ("sequences", r.sequences), ("tokens", r.tokens),
                    ("seconds", r.seconds), ("tokens_per_second", tokensPerSecond),
                ])
            } else {
                print(
                    String(
                        format: "loss %.4f  perplexity %.2f  (%d sequences × %d, %d predicted tokens, %.1f s, %.0f tokens/s)",
                        r.loss, r.perplexity, r.sequences, seqLen, r.tokens, r.seconds, tokensPerSecond))
            }
        }
    }
}
