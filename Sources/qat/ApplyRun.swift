import Foundation
import QATCUDA
import QATCore
import QATData
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
        let train = recipe.train
        guard train.mode == .qad else { return }
        if let cache = train.distill.teacherLogprobs {
            guard FileManager.default.fileExists(atPath: cache) else {
                throw QATError(
                    "teacher cache not found: \(cache) (train.distill.teacher_logprobs); write it with `qat "
                        + "teacher-logprobs --out \(cache)`")
            }
        } else {
            let dir = train.distill.teacher ?? recipe.model
            guard FileManager.default.fileExists(atPath: dir + "/config.json") else {
                throw QATError("teacher not found: \(dir) (train.distill.teacher) has no config.json")
            }
        }
    }

    // State the phases hand on.
    var summary = ApplySummary()
    var pipeline: PipelineEngine? = nil
    var model: CausalLM! = nil
    var quantizers: QuantizerSet? = nil
    var lora: LoRA? = nil
    var trainStream: [Int32] = []
    var validationStream: [Int32] = []
    var calibrationSequences: [[Int32]] = []
    /// The communicator of the whole run (every rank), passed to whatever needs one.
    let world: Communicator = worldCommunicator

    /// The phases of `qat apply`, in order. Returns early when training is interrupted, or
    /// on every rank but rank 0 after training (rank 0 alone exports and writes the summary).
    func execute() throws -> ApplySummary {
        summary.mode = recipe.train.mode.rawValue
        summary.quantize = recipe.quantizeDescription
        log("recipe \(recipePath): model \(recipe.model), quantize \(recipe.quantizeDescription), mode \(recipe.train.mode.rawValue)")
        try checkDeviceSupport()
        try preflight()
        try planPipeline()
        try loadModelAndData()
        summary.rows.append(.init(name: "unquantized", loss: try evaluate(model, "unquantized")))
        try quantizeAndCalibrate()
        try attachLoRA()
        if recipe.train.mode != .none {
            guard try train() else { return finished() }
            try gatherPipelineStages()
            guard world.isRoot else { return finished() }
        }
        try export()
        try appendSamples(to: &summary)  // report.prompts (Samples.swift)
        try writeReport(finished())
        return summary
    }

    /// Stamps the elapsed time on the summary.
    func finished() -> ApplySummary {
        summary.seconds = Date().timeIntervalSince(start)
        return summary
    }

    /// Pipeline parallel: this rank loads and runs one stage's layers (student and teacher).
    func planPipeline() throws {
        let stages = recipe.train.pipelineStages
        guard stages > 1 else { return }
        guard recipe.train.mode != .none else { throw QATError("train.pipeline_stages needs train.mode qat or qad") }
        guard recipe.train.lora == nil else {
            throw QATError.unsupported("train.pipeline_stages with train.lora is not supported: use data parallelism for LoRA")
        }
        let layers = try ModelConfig.load(directory: recipe.model).numLayers
        let engine = try PipelineEngine(world: world, stages: stages, layers: layers)
        pipeline = engine
        let ranges = engine.layout.ranges.map { "\($0.lowerBound)…\($0.upperBound - 1)" }.joined(separator: " | ")
        log("pipeline parallel: \(engine.dataParallel.size) pipeline(s) of \(engine.layout.stages) stages, layers \(ranges)")
    }

    /// `device: cuda`: the GPU and the device copies of the models it has run.
    var device: DeviceRunner?

    func onGPU(_ m: CausalLM) throws -> CUDAModel? { try device?.copy(m) }

    /// `device: cuda`: every phase runs on the GPU (calibration, QAT/QAD training through
    /// `CUDAStepBackend`, evaluation, verification); what this version trains on the CPU only was
    /// refused by `checkDeviceSupport`, before any work.
    func openDevice() throws {
        guard recipe.device.isCUDA else { return }
        var config: ModelConfig?
        if recipe.train.mode != .none { config = try ModelConfig.load(directory: recipe.model) }
        device = try DeviceRunner(
            try rankDevice(), precision: recipe.precision,
            storedDType: config.map { Exporter.storedDType(saveDtype: recipe.export.saveDtype, sourceDirectory: recipe.model, config: $0) })
    }

    /// The GPU of this rank: the recipe's device alone, or under mpirun GPU (N + local rank)
    /// mod (GPUs on the host) for `cuda:N` (`GPUDataParallel.ordinal`), with NVLink multicast
    /// off (NCCL_NVLS_ENABLE=0, inherited by child processes) before anything loads NCCL.
    func rankDevice() throws -> ComputeDevice {
        guard world.isDistributed, case .cuda(let requested) = recipe.device else { return recipe.device }
        GPUDataParallel.disableNVLinkMulticast()
        let env = ProcessInfo.processInfo.environment
        let local = GPUDataParallel.localRank(environment: env, worldRank: world.rank)
        return .cuda(try GPUDataParallel.ordinal(requested: requested, localRank: local, deviceCount: try CUDADevice.deviceCount()))
    }

    /// What this version trains on the CPU only, refused for `device: cuda` before any work.
    func checkDeviceSupport() throws {
        guard recipe.device.isCUDA, recipe.train.mode != .none else { return }
        let train = recipe.train
        // Data parallelism on GPUs is built (one rank per GPU); these layouts are not yet.
        let cpuOnly: String? =
            train.pipelineStages > 1
            ? "train.pipeline_stages"
            : world.isDistributed && train.shardOptimizerState ? "train.shard_optimizer_state (ZeRO-1)" : nil
        if let what = cpuOnly {
            throw QATError.unsupported("\(what) is not supported with device: cuda yet: use device: cpu, or leave it out")
        }
    }

    func loadModelAndData() throws {
        try openDevice()
        model = try CausalLM(directory: recipe.model, layerRange: pipeline?.layout.range)
        if let device, recipe.precision == .bf16 {
            let read = device.readAsStored(model)
            if !read.isEmpty {
                log(
                    "bf16: the embedding, norm weights and biases (\(read.count) tensors) are read as their bf16 rounding, "
                        + "as the export stores them"
                )
            }
        }
        let data = recipe.data, vocab = model.config.vocabSize
        trainStream = try TokenData.load(path: data.train, split: data.trainSplit, modelDirectory: recipe.model, vocabSize: vocab)
        validationStream = try TokenData.load(
            path: data.validation, split: data.validationSplit, modelDirectory: recipe.model,
            vocabSize: vocab)
        log(
            "data: \(trainStream.count) train tokens (\(data.trainSplit)), \(validationStream.count) validation tokens "
                + "(\(data.validationSplit)), seq_len \(data.seqLen)")
        calibrationSequences = try Calibration.sequences(from: trainStream, seqLen: data.seqLen, count: recipe.calibration.samples)
    }

    /// Validation loss of `model`: distributed (each rank or pipeline its share, sums
    /// all-reduced over the world), or in this process alone (`distributed: false`, for the
    /// export, which rank 0 alone holds).
    func evaluate(_ model: CausalLM, _ label: String, distributed: Bool = true) throws -> Double {
        let data = recipe.data
        let total = Evaluation.sequenceCount(tokens: validationStream.count, seqLen: data.seqLen, maxSequences: data.validationSequences)
        let shard = distributed ? Distributed.evaluationShard(pipeline: pipeline, world: world) : nil
        let bar = ProgressBar(
            total: shard.map { Evaluation.shardRange(total, $0).count } ?? total, label: "eval \(label)", unit: "seq",
            enabled: !quiet)
        let result =
            try onGPU(model)?.evaluate(
                stream: validationStream, seqLen: data.seqLen, batchSize: recipe.train.batchSize,
                maxSequences: data.validationSequences, over: distributed ? world : SingleProcessCommunicator()
            ) { done, _ in bar.update(done) }
            ?? (distributed
                ? try Distributed.evaluate(
                    model: model, stream: validationStream, seqLen: data.seqLen, batchSize: recipe.train.batchSize,
                    maxSequences: data.validationSequences, pipeline: pipeline, world: world
                ) { done, _ in
                    bar.update(done)
                }
                : try Evaluation.evaluate(
                    model: model, stream: validationStream, seqLen: data.seqLen, batchSize: recipe.train.batchSize,
                    maxSequences: data.validationSequences
                ) { done, _ in bar.update(done) })
        bar.finish()
        log(
            String(
                format: "%@: validation loss %.4f (perplexity %.2f, %d sequences)", label, result.loss, result.perplexity,
                result.sequences))
        return result.loss
    }

    /// PTQ: the recipe's quantizers inserted and max-calibrated (data parallel: each rank
    /// observes its share and amax is MAX-reduced; pipeline: every stage observes every
    /// sequence through its own layers), then evaluated.
    func quantizeAndCalibrate() throws {
        guard recipe.quantize != nil else { return }
        let bar = ProgressBar(total: calibrationSequences.count, label: "calibrate", unit: "seq", enabled: !quiet)
        let local = CalibrationLoop(
            sequences: calibrationSequences, seqLen: recipe.data.seqLen, batchSize: recipe.calibration.batchSize,
            progress: { done, _ in bar.update(done) })
        var loop = Distributed.calibrationLoop(local, model: model, pipeline: pipeline, world: world)
        if let hook = try device?.calibrationForward(model, seqLen: recipe.data.seqLen) { loop.forward = hook }
        log("calibrating (max) on \(calibrationSequences.count) sequences")
        quantizers = try recipe.applyQuantization(to: model, forwardLoop: loop)
        try onGPU(model)?.markWeightsChanged()
        bar.finish()
        if let set = quantizers {
            log("quantizers: \(set.enabled.count) enabled of \(set.all.count)")
            if let line = set.calibrationReport?.logLine { log(line) }
        }
        summary.rows.append(.init(name: "PTQ", loss: try evaluate(model, "PTQ")))
    }

    /// LoRA / QLoRA: adapters on the frozen base (QLoRA: a new model over the NVFP4 base; the
    /// fp32 model is dropped here).
    func attachLoRA() throws {
        guard let spec = recipe.train.lora else { return }
        guard recipe.train.mode != .none else { throw QATError("train.lora needs train.mode qat or qad") }
        // The device copy made before the adapters has none (LoRA), or is of the dropped fp32 model
        // (QLoRA): the next `onGPU` copies the model with its adapters and packed base.
        device?.forget(model)
        let built = try LoRA.build(on: model, quantizers: quantizers, recipe: recipe)
        model = built.model
        quantizers = built.quantizers
        lora = built
        if let base = built.base {
            log(
                "QLoRA: base of \(base.tensors.count) Linears held in NVFP4: \(formatBytes(base.bytes)) "
                    + "(fp32 \(formatBytes(base.fp32Bytes)) released; decode buffer \(formatBytes(base.scratchBytes)))")
        }
        let count = built.adapters.reduce(0) { $0 + $1.A.count + $1.B.count }
        log(
            "LoRA: \(built.adapters.count) adapters, rank \(spec.rank), alpha \(spec.alpha), dropout \(spec.dropout), "
                + "\(count) adapter parameters (fp32)")
    }

    /// QAT or QAD from the calibrated model. Returns false when interrupted (Ctrl-C: the
    /// trainer wrote a checkpoint).
    func train() throws -> Bool {
        try FileManager.default.createDirectory(atPath: workDir, withIntermediateDirectories: true)
        var options = Trainer.Options(outputDir: workDir, checkpointDir: checkpointDir)
        options.resume = resume; options.forceResume = forceResume; options.recipeHash = recipeHash; options.quiet = quiet
        options.pipeline = pipeline
        options.world = world
        if let device, let gpuModel = try onGPU(model) {
            // Data parallel (mpirun): gradients summed on the GPUs (NCCL, or staged through MPI).
            let reducer =
                world.isDistributed
                ? try DeviceGradientReducer.make(device: gpuModel.device, world: world, environment: ProcessInfo.processInfo.environment)
                : nil
            if let reducer { log("data parallel on GPUs: \(world.size) ranks, \(reducer.description)") }
            options.backend = CUDAStepBackend(model: gpuModel, dataParallel: world, gradientReducer: reducer) { teacher in
                // Forward-only: in bf16 its Linear weights live on the device in bf16 only.
                guard let copy = try device.copy(teacher, inferenceOnly: true) else {
                    throw QATError.internal("no device copy of the teacher")
                }
                return copy
            }
            if gpuModel.packedBaseBytes > 0 {
                log("QLoRA on the GPU: base packed in device memory (\(formatBytes(gpuModel.packedBaseBytes))), decoded at each use")
            }
        }
        var spec = recipe.train
        if lora != nil && spec.trainableParams == nil && spec.frozenParams == nil { spec.trainableParams = LoRA.trainableGlobs }
        let set = quantizers ?? QuantizerSet(model: model, config: QuantConfig(entries: []))
        let data = recipe.data
        let trainer: Trainer
        if recipe.train.mode == .qat {
            trainer = try QATTrainer(
                model: model, quantizers: set, calibrationSequences: calibrationSequences,
                calibrationBatchSize: recipe.calibration.batchSize, spec: spec, seqLen: data.seqLen,
                trainStream: trainStream, validationStream: validationStream,
                validationSequences: data.validationSequences, options: options)
        } else {
            trainer = try QADTrainer(
                model: model, teacher: try loadTeacher(), quantizers: set, calibrationSequences: calibrationSequences,
                calibrationBatchSize: recipe.calibration.batchSize, spec: spec, seqLen: data.seqLen,
                trainStream: trainStream, validationStream: validationStream,
                validationSequences: data.validationSequences, options: options)
        }
        log("memory on paper: \(trainer.memoryEstimate)")
        log(
            "training: \(trainer.totalSteps) steps × \(spec.batchSize)×\(spec.gradAccum) sequences of \(data.seqLen), lr \(spec.lr) "
                + "(\(spec.schedule)), loss: \(trainer.loss.description)")
        lora?.bind(to: trainer)
        installStopHandler()
        let result = try trainer.run()
        summary.steps = result.steps
        if result.interrupted {
            summary.interrupted = true
            return false
        }
        let label = recipe.train.mode == .qat ? "after QAT" : "after QAD"
        if world.isRoot, let validation = result.finalValidation {
            log(String(format: "%@: validation loss %.4f (perplexity %.2f)", label, validation.loss, validation.perplexity))
            summary.rows.append(.init(name: label, loss: validation.loss))
        }
        return true
    }

    /// QAD's live teacher (nil with an offline top-k cache): the unquantized model, forward
    /// only; under pipeline parallelism this stage's layers of it.
    func loadTeacher() throws -> CausalLM? {
        guard recipe.train.distill.teacherLogprobs == nil else { return nil }
        let dir = recipe.train.distill.teacher ?? recipe.model
        guard FileManager.default.fileExists(atPath: dir) else { throw QATError("teacher not found: \(dir) (train.distill.teacher)") }
        let range = try pipeline.map { engine in
            try PipelineLayout(
                layers: try ModelConfig.load(directory: dir).numLayers, stages: engine.layout.stages,
                stage: engine.layout.stage
            ).range
        }
        let teacher = try CausalLM(directory: dir, layerRange: range)
        let layers = range.map { ", layers \($0.lowerBound)…\($0.upperBound - 1) on this stage" } ?? ""
        log("teacher: \(dir) (unquantized, forward-only\(layers))")
        return teacher
    }

    /// Pipeline parallel: rank 0 assembles the whole trained model (and its quantizers' amax)
    /// from every stage; the other pipelines hold the same model.
    func gatherPipelineStages() throws {
        guard let engine = pipeline, engine.dataParallel.rank == 0 else { return }
        let parameters = try engine.gather(model.parameters.map { ($0.name, $0.value) })
        let amax = try engine.gather(quantizers?.stateTensors() ?? [])
        guard let parameters, let amax else { return }  // (names and shapes checked by the model's init)
        let whole = try CausalLM(config: model.config, parameters: Dictionary(parameters, uniquingKeysWith: { first, _ in first }))
        if let set = recipe.insertQuantizers(into: whole) {
            try set.restore(Dictionary(amax, uniquingKeysWith: { first, _ in first }), model: whole)
            quantizers = set
        }
        model = whole
    }

    /// Export: PEFT adapters, or the (merged) fake-quant model in ModelOpt's format, verified
    /// against the model and evaluated.
    func export() throws {
        summary.exportDir = recipe.export.dir
        if let lora, lora.spec.export == .adapters {
            // PEFT adapters are trained in fp32 and saved so unless export.save_dtype says otherwise.
            let bytes = try lora.exportAdapters(to: recipe.export.dir, baseModel: recipe.model, dtype: recipe.export.saveDtype ?? .f32)
            summary.exportBytes = bytes
            log("export: \(recipe.export.dir) (PEFT LoRA adapters, \(formatBytes(bytes)) of tensors)")
            return
        }
        var exportModel = model!, exportQuantizers = quantizers
        if let lora {
            (exportModel, exportQuantizers) = try lora.mergedModel(recipe: recipe)
            log("LoRA: adapters merged into the base (fp32), weight amax re-calibrated on the merged weights")
        }
        guard let exportQuantizers, !exportQuantizers.enabled.isEmpty else {
            log("export: skipped (the recipe quantizes nothing)")
            return
        }
        let spec = recipe.export
        let verifySequences = min(8, recipe.data.validationSequences ?? 8)
        let verify = spec.verify ? VerificationData(stream: validationStream, seqLen: recipe.data.seqLen, sequences: verifySequences) : nil
        let options = try ExportOptions(
            saveDtype: spec.saveDtype, maxShardBytes: spec.maxShardBytes, format: ExportFormat.parse(spec.format))
        // (Verification re-rounds the reference's weights: its device copy is made afresh.)
        device?.forget(exportModel)
        let result = try ExportAndVerify.run(
            model: exportModel, quantizers: exportQuantizers, sourceDirectory: recipe.model, to: spec.dir,
            options: options, verify: verify, logitsOf: device?.logitsOf)
        let written = result.summary
        summary.exportBytes = written.tensorBytes
        summary.sourceBytes = (try? ModelWeights(path: recipe.model).totalBytes) ?? 0
        let algorithm = written.hfQuantConfig["quantization"]?["quant_algo"]?.stringValue ?? "?"
        log("export: \(spec.dir) (\(algorithm), \(formatBytes(written.tensorBytes)) of tensors, \(written.files.count) files)")
        guard let comparison = result.comparison, let exported = result.exported else { return }
        summary.verifyMaxAbsDiff = Double(comparison.maxAbsDiff)
        log(verificationLine(comparison))
        if comparison.maxAbsDiff > 1e-3 {
            log("warning: the export does not reproduce the fake-quant model (max |Δlogit| \(comparison.maxAbsDiff)); check `qat verify`")
        }
        summary.rows.append(.init(name: "exported", loss: try evaluate(exported.model, "exported", distributed: false)))
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
        if let last = summary.rows.last(where: { $0.name.hasPrefix("after") })?.loss, summary.steps > 0 {
            val.append((summary.steps, last))
        }
        let refs = summary.rows.filter { $0.name == "unquantized" || $0.name == "PTQ" }.compactMap { row in
            row.loss.map { (label: row.name, loss: $0) }
        }
        let svg = LossCurve.svg(
            train: train, validation: val, reference: refs,
            title: "\(recipe.train.mode.rawValue.uppercased()) of "
                + "\((recipe.model as NSString).lastPathComponent) — \(recipe.quantizeDescription)")
        try atomicWrite(path: dir + "/loss_curve.svg") { try $0.write(Array(svg.utf8)) }
    }
}
