import ArgumentParser
import Foundation
import QATCore
import QATData
import QATExport
import QATTrain

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check that an export (ModelOpt or compressed-tensors) reproduces its fake-quant model's logits.",
        discussion: """
            Rebuilds the fake-quant model from --against (a model directory: PTQ with the recipe's \
            calibration, snapped to the exported scales; or a training checkpoint: its weights and \
            amax) and compares full logits with the export read back, on the first --sequences \
            validation sequences of the recipe's data. The reference uses the export-exact NVFP4 \
            weight fake quant and the export's dtype for unquantized tensors (see \
            Verification in QATExport), so a faithful export gives max |Δlogit| = 0. \
            Exits 1 when max |Δlogit| exceeds --tolerance.

            Example: qat verify export/fortune-lm-nvfp4 --against models/fortune-lm --recipe recipes/default.yaml
            """)

    @Argument(help: "Export directory.")
    var export: String

    @Option(help: "Model directory (PTQ) or training checkpoint the export was made from.")
    var against: String

    @Option(help: "Recipe the export was made with.")
    var recipe: String

    @Option(name: .customLong("set"), help: "Override a recipe key (repeatable).")
    var overrides: [String] = []

    @Option(help: "Model directory for config.json when --against is a training checkpoint (default: the recipe's model).")
    var model: String?

    @Option(help: "Validation sequences to compare.")
    var sequences: Int = 8

    @Option(help: "Largest max |Δlogit| accepted.")
    var tolerance: Double = 0

    @Option(help: "Worker threads for OpenBLAS and the kernels (default: all cores).")
    var threads: Int?

    @Option(name: .long, help: "Where to compute: cpu, cuda or cuda:N.")
    var device: String = "cpu"

    @Option(name: .long, help: "GPU matrix products: fp32 (exact comparison) or bf16.")
    var precision: String = "fp32"

    @Flag(help: "Print one JSON object instead of text.")
    var json = false

    func run() throws {
        try QAT.guarded {
            if let t = threads, t > 0 { setenv("QAT_THREADS", String(t), 1); BLAS.setThreads(t) }
            let r = try Recipe.load(path: recipe, overrides: overrides)
            let isCheckpoint =
                FileManager.default.fileExists(atPath: "\(against)/trainer_state.json") || TrainingCheckpoint.latest(in: against) != nil
            let modelDir = isCheckpoint ? (model ?? r.model) : against
            let runner = try DeviceRunner(try ComputeDevice(parsing: device), precision: try Precision(parsing: precision))
            let source = try QuantizedSource.build(
                modelDirectory: modelDir, recipe: r, checkpoint: isCheckpoint ? against : nil, quiet: json,
                device: runner)
            runner.forget(source.model)
            let stream = try TokenData.load(
                path: r.data.validation, split: r.data.validationSplit, modelDirectory: modelDir,
                vocabSize: source.model.config.vocabSize)
            let data = VerificationData(stream: stream, seqLen: r.data.seqLen, sequences: sequences)
            let v = try ExportAndVerify.verify(
                directory: export, model: source.model, quantizers: source.quantizers, data: data,
                logitsOf: runner.logitsOf
            ).comparison
            if json {
                printJSON([
                    ("export", export), ("against", source.description), ("max_abs_logit_diff", Double(v.maxAbsDiff)),
                    ("mean_abs_logit_diff", v.meanAbsDiff), ("identical", v.identical), ("logits", v.count),
                    ("sequences", v.sequences), ("reference_loss", v.referenceLoss), ("export_loss", v.candidateLoss),
                ])
            } else {
                print("against \(source.description)")
                print(verificationLine(v))
            }
            if !(Double(v.maxAbsDiff) <= tolerance) {
                FileHandle.standardError.write(Data("error: max |Δlogit| \(v.maxAbsDiff) exceeds the tolerance \(tolerance)\n".utf8))
                throw ExitCode(1)
            }
        }
    }
}
