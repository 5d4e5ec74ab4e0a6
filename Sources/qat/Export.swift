import ArgumentParser
import Foundation
import QATCore
import QATData
import QATExport
import QATIO
import QATModels
import QATQuant
import QATTrain

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Export a quantized model as a ModelOpt-format (NVFP4 / FP8) or compressed-tensors (NVFP4) Hugging Face checkpoint.",
        discussion: """
            Without --checkpoint: post-training quantization — the recipe's quantizers are inserted \
            and max-calibrated on its train data, then exported. With --checkpoint (a training \
            checkpoint directory, or a directory of them: the latest is taken): its weights and \
            quantizer amax are exported. The export is built in a temporary directory and renamed \
            into place only when complete, then (unless --no-verify or export.verify: false) read \
            back and checked against the fake-quant model on validation sequences.

            Example: qat export --model models/fortune-lm --recipe recipes/default.yaml --out export/fortune-lm-nvfp4
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "Recipe YAML: quantize, calibration, data and export sections are used.")
    var recipe: String

    @Option(name: .customLong("set"), help: "Override a recipe key (repeatable), e.g. --set calibration.samples=32.")
    var overrides: [String] = []

    @Option(help: "Training checkpoint (checkpoint-NNNNNN directory, or the directory holding them) to export instead of calibrating.")
    var checkpoint: String?

    @Option(help: "Output directory (default: the recipe's export.dir).")
    var out: String?

    @Option(
        name: .customLong("save-dtype"),
        help: ArgumentHelp(
            "dtype of the unquantized tensors: bfloat16, float16, float32, or keep (each tensor's "
                + "source dtype). Default: the recipe's export.save_dtype."))
    var saveDtype: String?

    @Option(
        name: .customLong("max-shard-bytes"), help: "Shard the safetensors above this size (default: the recipe's export.max_shard_bytes).")
    var maxShardBytes: Int?

    @Option(help: "Checkpoint layout: modelopt or compressed-tensors (default: the recipe's export.format).")
    var format: String?

    @Flag(name: .customLong("no-verify"), help: "Skip reading the export back and comparing logits.")
    var noVerify = false

    @Option(name: .customLong("verify-sequences"), help: "Validation sequences for the verification.")
    var verifySequences: Int = 8

    @Flag(help: "Print one JSON object instead of text.")
    var json = false

    func run() throws {
        try QAT.guarded {
            modelOptions.applyThreads()
            let r = try Recipe.load(path: recipe, overrides: overrides)
            var options = ExportOptions(maxShardBytes: maxShardBytes ?? r.export.maxShardBytes)
            options.saveDtype = try resolveSaveDtype(saveDtype, recipeValue: r.export.saveDtype)
            options.format = try ExportFormat.parse(format ?? r.export.format)
            let outDir = out ?? r.export.dir
            let (computeDevice, precision) = try modelOptions.compute()
            let device = try DeviceRunner(computeDevice, precision: precision)
            let source = try QuantizedSource.build(
                modelDirectory: modelOptions.model, recipe: r, checkpoint: checkpoint, quiet: json,
                device: device)
            device.forget(source.model)
            var verify: VerificationData? = nil
            if !noVerify && r.export.verify {
                let stream = try TokenData.load(
                    path: r.data.validation, split: r.data.validationSplit, modelDirectory: modelOptions.model,
                    vocabSize: source.model.config.vocabSize)
                verify = VerificationData(stream: stream, seqLen: r.data.seqLen, sequences: verifySequences)
            }
            let result = try ExportAndVerify.run(
                model: source.model, quantizers: source.quantizers, sourceDirectory: modelOptions.model,
                to: outDir, options: options, verify: verify, logitsOf: device.logitsOf)
            let summary = result.summary
            for w in summary.weightMismatches where !json {
                FileHandle.standardError.write(
                    Data(
                        ("note: \(w.name): \(w.elements) elements of the exported weight differ from the training "
                            + "fake quant (corner-case blocks, see NVFP4.FakeQuantMode)\n").utf8))
            }
            for name in summary.unrecoverableScales where !json {
                FileHandle.standardError.write(
                    Data("note: \(name): amax is not exactly recoverable from its exported scale (1 ulp)\n".utf8))
            }
            let sourceBytes = (try? ModelWeights(path: modelOptions.model).totalBytes) ?? 0
            let factor = summary.tensorBytes > 0 ? Double(sourceBytes) / Double(summary.tensorBytes) : 0
            let verification = result.comparison
            if json {
                var fields: [(String, Any)] = [
                    ("out", outDir), ("quant_algo", summary.plan.quantAlgo ?? "none"),
                    ("kv_cache_quant_algo", summary.plan.kvCacheQuantAlgo ?? "none"),
                    ("source", source.description), ("tensor_bytes", summary.tensorBytes),
                    ("total_bytes", summary.totalBytes), ("source_tensor_bytes", sourceBytes),
                    ("compression", factor), ("files", summary.files.joined(separator: ",")),
                ]
                if let v = verification {
                    fields += [
                        ("verify_max_abs_logit_diff", Double(v.maxAbsDiff)), ("verify_reference_loss", v.referenceLoss),
                        ("verify_export_loss", v.candidateLoss), ("verify_sequences", v.sequences),
                    ]
                }
                printJSON(fields)
            } else {
                print(
                    "exported \(source.description) to \(outDir): quant_algo "
                        + "\(summary.plan.quantAlgo ?? "none"), kv_cache \(summary.plan.kvCacheQuantAlgo ?? "none"), "
                        + "exclude \(summary.plan.excludeModules)")
                print(
                    String(
                        format: "  %@ of tensors (source %@, %.2fx smaller), %d files: %@", formatBytes(summary.tensorBytes),
                        formatBytes(sourceBytes), factor, summary.files.count, summary.files.joined(separator: ", ")))
                if let v = verification { print(verificationLine(v)) }
            }
        }
    }
}

/// `--save-dtype` when given (`keep`: each tensor's source dtype), else the recipe's
/// `export.save_dtype` (parsed once, by `Recipe`).
func resolveSaveDtype(_ flag: String?, recipeValue: DType?) throws -> DType? {
    guard let flag else { return recipeValue }
    if ["keep", "null"].contains(flag.lowercased()) { return nil }
    guard let dtype = DType(torchName: flag) else { throw QATError("--save-dtype \(flag): expected bfloat16, float16, float32 or keep") }
    return dtype
}

/// The fake-quant model an export is made from (and verified against): a calibrated PTQ
/// model, or a training checkpoint's weights with its quantizer amax restored.
struct QuantizedSource {
    var model: CausalLM
    var quantizers: QuantizerSet
    var description: String

    /// `device`: where PTQ calibration runs (default: the CPU).
    static func build(
        modelDirectory: String, recipe r: Recipe, checkpoint: String?, quiet: Bool,
        device: DeviceRunner? = nil
    ) throws -> QuantizedSource {
        guard let qc = r.quantize else { throw QATError("\(r.source): the recipe has no quantize section: there is nothing to export") }
        if let checkpoint {
            let path = try resolveCheckpoint(checkpoint)
            let loaded = try TrainingCheckpoint.read(path)
            if loaded.parameters.keys.contains(where: { $0.hasSuffix(".lora_A.weight") }) || r.train.lora != nil {
                return try merged(path: path, loaded: loaded, modelDirectory: modelDirectory, recipe: r, config: qc)
            }
            let model = try CausalLM(config: try ModelConfig.load(directory: modelDirectory), parameters: loaded.parameters)
            let quantizers = QuantizerSet(model: model, config: qc, ste: r.steMode, nvfp4Mode: r.nvfp4Mode)
            try quantizers.restore(loaded.extra, model: model)
            return QuantizedSource(model: model, quantizers: quantizers, description: "\(path) (step \(loaded.state.step))")
        }
        let model = try CausalLM(directory: modelDirectory)
        guard
            let set = try r.quantizePTQ(
                model: model, modelDirectory: modelDirectory, quiet: quiet,
                forward: device?.calibrationForward(model, seqLen: r.data.seqLen))
        else {
            throw QATError("\(r.source): the recipe quantizes nothing")
        }
        // Calibration already snapped every amax to the value its exported scale encodes,
        // so the PTQ model and its export are the same model.
        return QuantizedSource(
            model: model, quantizers: set,
            description: "PTQ of \(modelDirectory) (\(r.quantizeDescription), \(r.calibration.samples) calibration sequences)")
    }

    /// A LoRA / QLoRA checkpoint: the run's model rebuilt as `qat apply` built it (the original
    /// weights, under QLoRA compressed to NVFP4 with the checkpoint's weight amax; adapters
    /// attached), the checkpoint's tensors loaded, and the adapters merged as `qat apply`'s
    /// export merges them (weight amax re-calibrated on the merged weights).
    static func merged(
        path: String, loaded: TrainingCheckpoint.Loaded, modelDirectory: String, recipe r: Recipe,
        config qc: QuantConfig
    ) throws -> QuantizedSource {
        guard let spec = r.train.lora else {
            throw QATError("\(path) holds LoRA adapters: pass the recipe it was trained with (its train.lora section) as --recipe")
        }
        let model = try CausalLM(directory: modelDirectory)
        let set = QuantizerSet(model: model, config: qc, ste: r.steMode, nvfp4Mode: r.nvfp4Mode)
        try set.restore(loaded.extra, model: model)
        let lora = try LoRA.build(on: model, quantizers: set, recipe: r)
        for p in lora.model.parameters {
            guard let t = loaded.parameters[p.name], t.count == p.count else {
                throw QATError(
                    "\(path) has no \(p.name) of \(p.count) elements: was it written with this recipe's "
                        + "train.lora (rank \(spec.rank), target_modules)?")
            }
            p.value.copy(from: t)
        }
        lora.model.markWeightsChanged()
        let m = try lora.mergedModel(recipe: r)
        guard let quantizers = m.quantizers else { throw QATError("\(r.source): the recipe quantizes nothing") }
        return QuantizedSource(
            model: m.model, quantizers: quantizers,
            description: "\(path) (step \(loaded.state.step), \(spec.qlora ? "QLoRA" : "LoRA") adapters merged)")
    }

    static func resolveCheckpoint(_ path: String) throws -> String {
        if FileManager.default.fileExists(atPath: "\(path)/trainer_state.json") { return path }
        if let latest = TrainingCheckpoint.latest(in: path) { return latest }
        throw QATError("\(path): not a training checkpoint (no trainer_state.json) and holds no checkpoint-* directories")
    }
}
