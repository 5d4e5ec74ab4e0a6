import Foundation
import QATCore
import QATExport
import QATIO
import QATModels
import QATQuant
import QATTrain

/// One `qat apply` run, step by step. Each step logs one line; figures land in the summary.
final class ApplyRun {
    let recipe: Recipe
    let recipePath: String
    let overrides: [String]
    let resume: Bool
    let forceResume: Bool
    let quiet: Bool
    let start = Date()

    init(recipe: Recipe, recipePath: String, overrides: [String], resume: Bool, forceResume: Bool, quiet: Bool) {
        self.recipe = recipe; self.recipePath = recipePath; self.overrides = overrides
        self.resume = resume; self.forceResume = forceResume; self.quiet = quiet
    }

    func log(_ s: String) { if !quiet { FileHandle.standardError.write(Data((s + "\n").utf8)) } }

    /// Where checkpoints and metrics live while training (the export directory itself is
    /// replaced atomically at export time).
    var workDir: String { recipe.train.checkpointDir.map { ($0 as NSString).deletingLastPathComponent } ?? recipe.export.dir + ".work" }
    var checkpointDir: String { recipe.train.checkpointDir ?? workDir + "/checkpoints" }

    /// FNV-1a of the recipe file and overrides: identifies the run for --resume.
    var recipeHash: String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        let text = (try? String(contentsOfFile: recipePath, encoding: .utf8)) ?? recipePath
        for b in (text + "\u{0}" + overrides.joined(separator: "\u{0}")).utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return String(format: "%016llx", h)
    }

    /// Inputs that would otherwise fail only after minutes of evaluation and calibration.
    func preflight() throws {
        let t = recipe.train
        guard t.mode == .qad else { return }
        if let cache = t.distill.teacherLogprobs {
            guard FileManager.default.fileExists(atPath: cache) else {
                throw QATError("teacher cache not found: \(cache) (train.distill.teacher_logprobs); write it with `qat teacher-logprobs --out \(cache)`")
            }
        } else {
            let dir = t.distill.teacher ?? recipe.model
            guard FileManager.default.fileExists(atPath: dir + "/config.json") else {
                throw QATError("teacher not found: \(dir) (train.distill.teacher) has no config.json")
            }
        }
    }

    func execute() throws -> ApplySummary {
        var summary = ApplySummary()
        summary.mode = recipe.train.mode.rawValue
        summary.quantize = recipe.quantizeDescription
        let r = recipe
        log("recipe \(recipePath): model \(r.model), quantize \(r.quantizeDescription), mode \(r.train.mode.rawValue)")
        try preflight()

        // Pipeline parallel: this rank loads and runs one stage's layers (student and teacher).
        let comm = worldCommunicator
        var pipeline: PipelineEngine? = nil
        if r.train.pipelineStages > 1 {
            guard r.train.mode != .none else { throw QATError("train.pipeline_stages needs train.mode qat or qad") }
            guard r.train.lora == nil else { throw QATError("train.pipeline_stages with train.lora is not supported: use data parallelism for LoRA") }
            let layers = try ModelConfig.load(directory: r.model).numLayers
            let pp = try PipelineEngine(world: comm, stages: r.train.pipelineStages, layers: layers)
            pipeline = pp
            log("pipeline parallel: \(pp.dataParallel.size) pipeline(s) of \(pp.layout.stages) stages, layers \(pp.layout.ranges.map { "\($0.lowerBound)…\($0.upperBound - 1)" }.joined(separator: " | "))")
        }
        var model = try CausalLM(directory: r.model, layerRange: pipeline?.layout.range)
        let vocab = model.config.vocabSize
        let trainStream = try Pipeline.tokens(path: r.data.train, split: r.data.trainSplit, modelDirectory: r.model, vocabSize: vocab)
        let valStream = try Pipeline.tokens(path: r.data.validation, split: r.data.validationSplit, modelDirectory: r.model, vocabSize: vocab)
        log("data: \(trainStream.count) train tokens (\(r.data.trainSplit)), \(valStream.count) validation tokens (\(r.data.validationSplit)), seq_len \(r.data.seqLen)")

        func evaluate(_ m: CausalLM, _ label: String) throws -> Double {
            let total = min(r.data.validationSequences ?? .max, max(1, (valStream.count - 1) / r.data.seqLen))
            // Distributed: each rank (or pipeline) evaluates its share; the sums are all-reduced.
            let shard = Distributed.evaluationShard(pipeline: pipeline)
            let bar = ProgressBar(total: shard.map { Evaluation.shardRange(total, $0).count } ?? total, label: "eval \(label)", unit: "seq", enabled: !quiet)
            let e = try Distributed.evaluate(model: m, stream: valStream, seqLen: r.data.seqLen, batchSize: r.train.batchSize,
                                             maxSequences: r.data.validationSequences, pipeline: pipeline) { d, _ in bar.update(d) }
            bar.finish()
            log(String(format: "%@: validation loss %.4f (perplexity %.2f, %d sequences)", label, e.loss, e.perplexity, e.sequences))
            return e.loss
        }

        summary.rows.append(.init(name: "unquantized", loss: try evaluate(model, "unquantized")))

        // Quantize + calibrate (PTQ).
        let calibration = try Calibration.sequences(from: trainStream, seqLen: r.data.seqLen, count: r.calibration.samples)
        var quantizers: QuantizerSet? = nil
        if let config = r.quantize {
            let set = QuantizerSet(model: model, config: config, ste: r.steMode, nvfp4Mode: r.nvfp4Mode)
            log("quantizers: \(set.enabled.count) enabled of \(set.all.count); calibrating (max) on \(calibration.count) sequences")
            let bar = ProgressBar(total: calibration.count, label: "calibrate", unit: "seq", enabled: !quiet)
            // Data parallel: each rank observes its share of the sequences; amax is MAX-reduced.
            // Pipeline parallel: every stage observes every sequence through its own layers.
            let dp = pipeline?.dataParallel ?? comm
            let dataParallel = dp.isDistributed
            let shard = dataParallel && calibration.count >= dp.size
                ? calibration.enumerated().filter { $0.offset % dp.size == dp.rank }.map(\.element) : calibration
            let report = try Calibration.run(model: model, quantizers: set, sequences: shard, seqLen: r.data.seqLen,
                                batchSize: r.calibration.batchSize, progress: { d, _ in bar.update(d) },
                                reduceMax: dataParallel ? { try dp.allReduceMax(&$0) } : nil,
                                forward: pipeline?.forwardHook(model, seqLen: r.data.seqLen))
            bar.finish()
            if let line = report.logLine { log(line) }
            quantizers = set
            summary.rows.append(.init(name: "PTQ", loss: try evaluate(model, "PTQ")))
        }

        // LoRA / QLoRA: adapters on the frozen base (QLoRA: a new model over the NVFP4 base;
        // the fp32 model is dropped here).
        var lora: LoRA? = nil
        var trainSpec = r.train
        if let ls = r.train.lora {
            guard r.train.mode != .none else { throw QATError("train.lora needs train.mode qat or qad") }
            if ls.qlora {
                guard let config = r.quantize, let set = quantizers else { throw QATError("train.lora.qlora needs a quantize section with NVFP4 weights") }
                let l = try LoRA.qlora(source: model, quantizers: set, config: config, ste: r.steMode, nvfp4Mode: r.nvfp4Mode, spec: ls, seed: r.train.seed)
                model = l.model; quantizers = l.quantizers; lora = l
                let b = l.base!
                log("QLoRA: base of \(b.tensors.count) Linears held in NVFP4: \(formatBytes(b.bytes)) (fp32 \(formatBytes(b.fp32Bytes)) released; decode buffer \(formatBytes(b.scratchBytes)))")
            } else {
                lora = try LoRA.attach(to: model, quantizers: quantizers, spec: ls, seed: r.train.seed)
            }
            if trainSpec.trainableParams == nil && trainSpec.frozenParams == nil { trainSpec.trainableParams = LoRA.trainableGlobs }
            let n = lora!.adapters.reduce(0) { $0 + $1.A.count + $1.B.count }
            log("LoRA: \(lora!.adapters.count) adapters, rank \(ls.rank), alpha \(ls.alpha), dropout \(ls.dropout), \(n) adapter parameters (fp32)")
        }

        // Train.
        if r.train.mode != .none {
            try FileManager.default.createDirectory(atPath: workDir, withIntermediateDirectories: true)
            var opts = Trainer.Options(outputDir: workDir, checkpointDir: checkpointDir)
            opts.resume = resume; opts.forceResume = forceResume; opts.recipeHash = recipeHash; opts.quiet = quiet
            opts.pipeline = pipeline
            let set = quantizers ?? QuantizerSet(model: model, config: QuantConfig(entries: []))
            let trainer: Trainer
            if r.train.mode == .qat {
                trainer = try QATTrainer(model: model, quantizers: set, calibrationSequences: calibration, calibrationBatchSize: r.calibration.batchSize,
                                         spec: trainSpec, seqLen: r.data.seqLen, trainStream: trainStream, validationStream: valStream,
                                         validationSequences: r.data.validationSequences, options: opts)
            } else {  // .qad
                var teacher: CausalLM? = nil
                if r.train.distill.teacherLogprobs == nil {
                    let dir = r.train.distill.teacher ?? r.model
                    guard FileManager.default.fileExists(atPath: dir) else { throw QATError("teacher not found: \(dir) (train.distill.teacher)") }
                    let range = try pipeline.map { pp in
                        try PipelineLayout(layers: try ModelConfig.load(directory: dir).numLayers, stages: pp.layout.stages, stage: pp.layout.stage).range
                    }
                    teacher = try CausalLM(directory: dir, layerRange: range)
                    log("teacher: \(dir) (unquantized, forward-only\(range.map { ", layers \($0.lowerBound)…\($0.upperBound - 1) on this stage" } ?? ""))")
                }
                trainer = try QADTrainer(model: model, teacher: teacher, quantizers: set, calibrationSequences: calibration,
                                         calibrationBatchSize: r.calibration.batchSize, spec: trainSpec, seqLen: r.data.seqLen,
                                         trainStream: trainStream, validationStream: valStream,
                                         validationSequences: r.data.validationSequences, options: opts)
            }
            log("memory on paper: \(trainer.memoryEstimate)")
            log("training: \(trainer.totalSteps) steps × \(r.train.batchSize)×\(r.train.gradAccum) sequences of \(r.data.seqLen), lr \(r.train.lr) (\(r.train.schedule)), loss: \(trainer.loss.description)")
            lora?.bind(to: trainer)
            installStopHandler()
            let result = try trainer.run()
            summary.steps = result.steps
            if result.interrupted {
                summary.interrupted = true
                summary.seconds = Date().timeIntervalSince(start)
                return summary
            }
            // Pipeline parallel: rank 0 assembles the whole trained model from every stage.
            if let pp = pipeline, pp.dataParallel.rank == 0 {  // (the other pipelines hold the same model)
                let params = try pp.gather(model.parameters.map { ($0.name, $0.value) })
                let amax = try pp.gather(quantizers?.stateTensors() ?? [])
                if let params, let amax {  // (names and shapes checked by the model's init)
                    let whole = try CausalLM(config: model.config, parameters: Dictionary(params, uniquingKeysWith: { a, _ in a }))
                    if let config = r.quantize {
                        let set = QuantizerSet(model: whole, config: config, ste: r.steMode, nvfp4Mode: r.nvfp4Mode)
                        try set.restore(Dictionary(amax, uniquingKeysWith: { a, _ in a }), model: whole)
                        quantizers = set
                    }
                    model = whole
                }
            }
            // Data parallel: rank 0 alone exports and writes the summary.
            if !comm.isRoot { summary.seconds = Date().timeIntervalSince(start); return summary }
            let label = r.train.mode == .qat ? "after QAT" : "after QAD"
            if let v = result.finalValidation {
                log(String(format: "%@: validation loss %.4f (perplexity %.2f)", label, v.loss, v.perplexity))
                summary.rows.append(.init(name: label, loss: v.loss))
            }
        }

        if let lora, lora.spec.export == .adapters {
            let dtype = r.export.saveDtype.flatMap { DType(torchName: $0) } ?? .f32
            let bytes = try lora.exportAdapters(to: r.export.dir, baseModel: r.model, dtype: dtype)
            summary.exportDir = r.export.dir
            summary.exportBytes = bytes
            log("export: \(r.export.dir) (PEFT LoRA adapters, \(formatBytes(bytes)) of tensors)")
        } else if let lora {
            let merged = try lora.mergedModel(config: r.quantize, ste: r.steMode, nvfp4Mode: r.nvfp4Mode)
            log("LoRA: adapters merged into the base (fp32), weight amax re-calibrated on the merged weights")
            try exportAndVerify(model: merged.model, quantizers: merged.quantizers, summary: &summary)
        } else {
            try exportAndVerify(model: model, quantizers: quantizers, summary: &summary)
        }
        summary.seconds = Date().timeIntervalSince(start)
        try writeReport(summary)
        return summary
    }

    /// Export (ModelOpt HF format, atomically), read the export back, check that it
    /// reproduces the fake-quant model's logits, and evaluate it.
    func exportAndVerify(model: CausalLM, quantizers: QuantizerSet?, summary: inout ApplySummary) throws {
        let r = recipe
        summary.exportDir = r.export.dir
        guard let quantizers, !quantizers.enabled.isEmpty else {
            log("export: skipped (the recipe quantizes nothing)")
            return
        }
        let dtype = try r.export.saveDtype.map { s -> DType in
            guard let d = DType(torchName: s) else { throw QATError("export.save_dtype \(s): expected bfloat16, float16, float32 or null") }
            return d
        }
        let es = try Exporter.export(model: model, quantizers: quantizers, sourceDirectory: r.model, to: r.export.dir,
                                     options: ExportOptions(saveDtype: dtype, maxShardBytes: r.export.maxShardBytes))
        summary.exportBytes = es.tensorBytes
        summary.sourceBytes = (try? Checkpoint(path: r.model).totalBytes) ?? 0
        log("export: \(r.export.dir) (\(es.hfQuantConfig["quantization"]?["quant_algo"]?.stringValue ?? "?"), \(formatBytes(es.tensorBytes)) of tensors, \(es.files.count) files)")
        guard r.export.verify else { return }
        let exported = try ExportedModel.load(directory: r.export.dir)
        // The reference is the trained fake-quant model with its unquantized tensors rounded
        // to the dtype they were saved in (what the export holds by construction).
        try Verification.alignReference(model: model, quantizers: quantizers, exportDirectory: r.export.dir)
        let valStream = try Pipeline.tokens(path: r.data.validation, split: r.data.validationSplit, modelDirectory: r.model,
                                            vocabSize: model.config.vocabSize)
        let seqs = try Calibration.sequences(from: valStream, seqLen: r.data.seqLen, count: min(8, r.data.validationSequences ?? 8))
        let cmp = try Verification.compare(reference: model, candidate: exported.model, sequences: seqs)
        summary.verifyMaxAbsDiff = Double(cmp.maxAbsDiff)
        log(verificationLine(cmp))
        if cmp.maxAbsDiff > 1e-3 {
            log("warning: the export does not reproduce the fake-quant model (max |Δlogit| \(cmp.maxAbsDiff)); check `qat verify`")
        }
        let total = min(r.data.validationSequences ?? .max, max(1, (valStream.count - 1) / r.data.seqLen))
        let bar = ProgressBar(total: total, label: "eval exported", unit: "seq", enabled: !quiet)
        let e = try Evaluation.evaluate(model: exported.model, stream: valStream, seqLen: r.data.seqLen, batchSize: r.train.batchSize,
                                        maxSequences: r.data.validationSequences) { d, _ in bar.update(d) }
        bar.finish()
        log(String(format: "exported: validation loss %.4f (perplexity %.2f)", e.loss, e.perplexity))
        summary.rows.append(.init(name: "exported", loss: e.loss))
    }

    /// qat_summary.json, metrics.jsonl and loss_curve.svg beside the exported model.
    func writeReport(_ summary: ApplySummary) throws {
        let dir = recipe.export.dir
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try atomicWrite(path: dir + "/qat_summary.json") { try $0.write(Array(summary.json.utf8)) }
        let metricsPath = workDir + "/metrics.jsonl"
        var train: [(step: Int, loss: Double)] = [], val: [(step: Int, loss: Double)] = []
        if let text = try? String(contentsOfFile: metricsPath, encoding: .utf8) {
            try atomicWrite(path: dir + "/metrics.jsonl") { try $0.write(Array(text.utf8)) }
            for line in text.split(separator: "\n") {
                guard let v = try? JSONValue.parse(String(line)), let s = v["step"]?.intValue else { continue }
                if let l = v["loss"]?.doubleValue { train.append((s, l)) }
                if let l = v["val_loss"]?.doubleValue { val.append((s, l)) }
            }
        }
        if let last = summary.rows.last(where: { $0.name.hasPrefix("after") })?.loss, summary.steps > 0 { val.append((summary.steps, last)) }
        let refs = summary.rows.filter { $0.name == "unquantized" || $0.name == "PTQ" }.compactMap { row in row.loss.map { (label: row.name, loss: $0) } }
        let svg = LossCurve.svg(train: train, validation: val, reference: refs,
                                title: "\(recipe.train.mode.rawValue.uppercased()) of \((recipe.model as NSString).lastPathComponent) — \(recipe.quantizeDescription)")
        try atomicWrite(path: dir + "/loss_curve.svg") { try $0.write(Array(svg.utf8)) }
    }
}
