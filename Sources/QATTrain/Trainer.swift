import Foundation
import QATCore
import QATIO
import QATModels

#if canImport(Glibc)
import Glibc
#endif

/// One line of metrics.jsonl.
public struct StepMetrics: Sendable, Equatable {
    public var step: Int
    public var loss: Double
    public var ce: Double?
    public var kd: Double?
    public var lr: Double
    public var gradNorm: Double
    public var tokensPerSecond: Double
    public var peakRSSMB: Double
    public var validationLoss: Double?
    public var skipped = false
    /// Bytes this rank handed to MPI during the step, and the time it spent in MPI calls
    /// (distributed runs only).
    public var commBytes: Int? = nil
    public var commSeconds: Double? = nil
    /// Peak GPU memory of the run so far (device training only).
    public var gpuPeakMB: Double? = nil

    public var json: String {
        var o = JSONObject()
        o.set("step", .int(Int64(step)))
        o.set("loss", .double(loss))
        if let ce { o.set("ce", .double(ce)) }
        if let kd { o.set("kd", .double(kd)) }
        o.set("lr", .double(lr))
        o.set("grad_norm", .double(gradNorm))
        o.set("tokens_per_s", .double((tokensPerSecond * 10).rounded() / 10))
        o.set("peak_rss_mb", .double((peakRSSMB * 10).rounded() / 10))
        if let validationLoss { o.set("val_loss", .double(validationLoss)) }
        if skipped { o.set("skipped", .bool(true)) }
        if let commBytes { o.set("comm_mb", .double((Double(commBytes) / 1e5).rounded() / 10)) }
        if let commSeconds { o.set("comm_s", .double((commSeconds * 1e4).rounded() / 1e4)) }
        if let gpuPeakMB { o.set("gpu_peak_mb", .double((gpuPeakMB * 10).rounded() / 10)) }
        return JSONValue.object(o).serialized(indent: nil)
    }
}

/// Peak resident set size of this process in MiB (getrusage).
public func peakRSSMegabytes() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Double(u.ru_maxrss) / 1024
}

/// Set by a stop signal: the trainer finishes the current step, writes a checkpoint and
/// returns (under data parallel every rank stops at the same step). A second stop signal
/// kills the process as usual.
nonisolated(unsafe) public var trainingStopRequested: Int32 = 0

/// The stop signals: SIGINT (Ctrl-C), SIGTERM, and SIGUSR1/SIGUSR2. Under mpirun (Open MPI
/// 4.1) the ranks never see Ctrl-C: mpirun turns its own SIGINT/SIGTERM into SIGTERM to the
/// ranks after `odls_base_sigkill_timeout` seconds (default 1) and SIGKILL as long again later,
/// while SIGUSR1/SIGUSR2 are forwarded at once and nothing is killed — hence
/// `kill -USR1 <mpirun pid>` is the reliable way to stop a distributed run (README).
public func installStopHandler() {
    for s in [SIGINT, SIGTERM, SIGUSR1, SIGUSR2] {
        signal(s) { sig in
            if trainingStopRequested != 0 { signal(sig, SIG_DFL); raise(sig) }
            trainingStopRequested = 1
        }
    }
}

/// The base trainer (ModelOpt's `ModelOptHFTrainer` role): data, optimizer, schedule, loop,
/// evaluation, metrics, checkpoints and resume. QAT and QAD are thin specialisations that
/// prepare the model (calibration) and choose the loss.
open class Trainer {
    public struct Options {
        /// metrics.jsonl is written here.
        public var outputDir: String
        public var checkpointDir: String
        public var resume = false
        /// Identifies the recipe; a checkpoint written under another hash is refused on resume.
        public var recipeHash = ""
        public var forceResume = false
        public var quiet = false
        /// Called with each human-readable log line.
        public var log: (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }
        /// Evaluate on the validation split after the last step (benchmarks turn it off).
        public var finalEvaluation = true
        /// Called after every optimizer step (and its checkpoint) with its metrics.
        public var onStep: ((StepMetrics) -> Void)? = nil
        /// Pipeline parallelism: this rank runs one stage of the model (see `PipelineEngine`);
        /// nil: every rank holds the whole model (single process or data parallel).
        public var pipeline: PipelineEngine? = nil
        /// Every rank of the run (the default: the process-wide communicator; one process
        /// unless started by mpirun). Only its rank 0 writes files.
        public var world: Communicator = worldCommunicator
        /// How a step's work is split (nil: chosen from `pipeline` and `world`: pipeline,
        /// data parallel or local). A model outside `CausalLM`'s memory plugs in here.
        public var backend: StepBackend? = nil
        public init(outputDir: String, checkpointDir: String) { self.outputDir = outputDir; self.checkpointDir = checkpointDir }
    }

    public struct Result: Sendable {
        public var steps: Int
        public var finalValidation: EvalResult?
        public var interrupted: Bool
        public var seconds: Double
        public var resumedFrom: Int?
    }

    public let model: CausalLM
    public let spec: Recipe.TrainSpec
    public let seqLen: Int
    public let loader: DataLoader
    public let validationStream: [Int32]
    public let validationSequences: Int?
    public let optimizer: AdamW
    public let schedule: LRSchedule
    public let totalSteps: Int
    public var options: Options
    public var loss: TrainingLoss
    public private(set) var step = 0
    public private(set) var history: [StepMetrics] = []
    /// Memory the run holds on paper (checked against MemAvailable before training).
    public private(set) var memoryEstimate = MemoryEstimate()
    /// Local, data-parallel or pipeline steps: forward/backward, reductions, gradient norm,
    /// checkpoint gathering (`StepBackend`).
    public let backend: StepBackend
    /// Data-parallel ranks sharing each step's batch (under pipeline parallelism: the number
    /// of pipelines side by side).
    public var dataParallelSize: Int { dataParallel.size }
    /// The ranks that share each step's batch: the world, or under pipeline parallelism the
    /// ranks holding the same stage of the side-by-side pipelines.
    public var dataParallel: Communicator { backend.dataParallel }

    public init(
        model: CausalLM, spec: Recipe.TrainSpec, seqLen: Int, trainStream: [Int32], validationStream: [Int32],
        validationSequences: Int?, options: Options
    ) throws {
        self.model = model; self.spec = spec; self.seqLen = seqLen; self.options = options
        self.validationStream = validationStream; self.validationSequences = validationSequences
        try Trainer.configureRouterAuxLoss(model: model, spec: spec, pipeline: options.pipeline != nil)
        model.activationCheckpointing = spec.activationCheckpointing  // (a CUDAModel of it follows the flag)
        if spec.activationCheckpointing { try model.checkCheckpointable() }
        // Data parallel: the loader draws the global batch (world size × batch_size) and each
        // rank keeps its own rows (see `trainStep`).
        let world = options.pipeline?.dataParallel.size ?? options.world.size
        loader = try DataLoader(stream: trainStream, seqLen: seqLen, batchSize: spec.batchSize * world, seed: spec.seed)
        if let e = spec.epochs {
            totalSteps = max(1, Int((e * Double(loader.sequenceCount) / Double(spec.batchSize * world * spec.gradAccum)).rounded(.up)))
        } else {
            totalSteps = spec.steps
        }
        // Parameter selection and groups, then gradients only for trainable parameters.
        let lrConfig = try spec.lrConfigYAML.map { try LRConfig.parse(yaml: $0, source: spec.lrConfigSource ?? "lr_config") }
        let config = OptimizerConfig(
            defaults: AdamWHyperparameters(
                lr: spec.lr, weightDecay: spec.weightDecay, beta1: spec.betas[0], beta2: spec.betas[1], eps: spec.eps),
            selection: try ParameterSelection(trainable: spec.trainableParams, frozen: spec.frozenParams), lrConfig: lrConfig)
        let plan = try ParamGroupPlan.build(names: model.parameters.map(\.name), config: config)
        let trainable = Set(plan.groups.flatMap(\.parameterNames))
        var wholeModelGroups: [ParamGroup] = []
        if options.pipeline != nil {  // the whole model's slot order (for the exact clipping norm)
            let whole = try ParamGroupPlan.build(names: CausalLM.parameterShapes(model.config).map(\.0), config: config)
            wholeModelGroups = whole.groups
            guard whole.groups.contains(where: { !$0.parameterNames.isEmpty }) || totalSteps == 0 else {
                throw QATError("no trainable parameters: trainable_params/frozen_params leave nothing to train")
            }
        } else {
            guard !trainable.isEmpty || totalSteps == 0 else {
                throw QATError("no trainable parameters: trainable_params/frozen_params leave nothing to train")
            }
        }
        for p in model.parameters { p.setRequiresGrad(trainable.contains(p.name)) }
        // ZeRO-1 (ZeRO.swift) over the data-parallel ranks: the world, or under pipeline
        // parallelism the ranks holding the same stage in the pipelines side by side.
        let zero = spec.shardOptimizerState && world > 1
        optimizer = try AdamW(
            parameters: model.parameters.map { ($0.name, $0.value, $0.grad) }, plan: plan,
            shardOver: zero ? options.pipeline?.dataParallel ?? options.world : nil)
        schedule = try LRSchedule(
            kind: LRSchedule.kind(named: spec.schedule), totalSteps: totalSteps,
            warmupSteps: spec.warmupSteps, warmupRatio: spec.warmupRatio ?? 0)
        loss = CrossEntropyLoss(vocab: model.config.vocabSize)
        // Stop before the big allocations when the run cannot fit (estimate in the message).
        let quantized = model.linears.filter { $0.weightQuantizer != nil }.reduce(0) { $0 + $1.weight.count }
        var stageConfig = model.config  // a pipeline stage holds its own layers' activations
        stageConfig.numLayers = model.layers.count
        memoryEstimate = MemoryEstimate.training(
            config: stageConfig, batch: spec.batchSize, seqLen: seqLen, parameterCount: model.parameters.reduce(0) { $0 + $1.count },
            trainableCount: optimizer.slots.reduce(0) { $0 + $1.value.count }, optimizerStateCount: optimizer.stateElementCount,
            quantizedWeightCount: quantized,
            liveTeacher: spec.mode == .qad && spec.distill.teacherLogprobs == nil, lossBufferBytes: 256 << 20)
        if let pp = options.pipeline {  // per micro-batch: an input, a send each way, the teacher's output
            let perMicroBatch = 4.0 * Double(spec.batchSize * seqLen * model.config.hiddenSize)
            let live = spec.mode == .qad && spec.distill.teacherLogprobs == nil
            memoryEstimate.pipelineBuffers = perMicroBatch * Double(spec.gradAccum) * (3 + (live && pp.layout.isLast ? 1 : 0))
        }
        try memoryEstimate.check(what: "training \(model.config.family.rawValue) (batch \(spec.batchSize) × \(seqLen))")
        let dHidden = Tensor(shape: [spec.batchSize * seqLen, model.config.hiddenSize])
        if let backend = options.backend {
            self.backend = backend
        } else if let engine = options.pipeline {
            backend = PipelineStepBackend(engine: engine, model: model, dHidden: dHidden, wholeModelGroups: wholeModelGroups)
        } else if options.world.isDistributed {
            backend = DataParallelStepBackend(model: model, dHidden: dHidden, comm: options.world)
        } else {
            backend = LocalStepBackend(model: model, dHidden: dHidden)
        }
        // MoE load balancing: each micro-batch of each rank carries its share of coef · aux.
        let auxShare = 1 / Double(spec.gradAccum * max(1, options.world.size))
        (backend as? LocalStepBackend)?.routerAuxShare = auxShare
        (backend as? DataParallelStepBackend)?.local.routerAuxShare = auxShare
        if spec.shardOptimizerState {
            let total = optimizer.slots.reduce(0) { $0 + $1.value.count }
            log(
                zero
                    ? "optimizer state sharded over \(world) data-parallel ranks (ZeRO-1): this rank holds "
                        + "\(optimizer.stateElementCount) of \(total) elements"
                    : "train.shard_optimizer_state: nothing to shard with one data-parallel "
                        + "rank\(options.pipeline != nil ? " (one pipeline)" : ""); ignored")
        }
    }

    /// Called once before the first step of a fresh (not resumed) run. QAT calibrates here.
    open func prepare() throws {}

    /// Extra state to checkpoint (QAT: quantizer amax) and its restore.
    open func extraState() -> [(name: String, tensor: Tensor)] { [] }
    open func restoreExtraState(_ tensors: [String: Tensor]) throws {}

    public func log(_ s: String) { if !options.quiet && comm.isRoot { options.log(s) } }

    /// Every rank of the run (`Options.world`). Only rank 0 writes files.
    public var comm: Communicator { options.world }

    public func evaluate() throws -> EvalResult {
        if let r = try backend.evaluate(
            stream: validationStream, seqLen: seqLen, batchSize: spec.batchSize,
            maxSequences: validationSequences)
        {
            return r
        }
        return try Distributed.evaluate(
            model: model, stream: validationStream, seqLen: seqLen, batchSize: spec.batchSize,
            maxSequences: validationSequences, pipeline: options.pipeline, world: comm)
    }

    /// Trains to `totalSteps` (or until Ctrl-C), evaluating and checkpointing on schedule.
    public func run() throws -> Result {
        let start = Date()
        var resumedFrom: Int? = nil
        try FileManager.default.createDirectory(atPath: options.outputDir, withIntermediateDirectories: true)
        if comm.isRoot { AtomicDirectory.cleanLeftovers(in: options.checkpointDir) }
        try comm.barrier()
        if options.resume, let latest = TrainingCheckpoint.latest(in: options.checkpointDir) {
            try restore(from: latest)
            resumedFrom = step
            log("resumed from \(latest) at step \(step)")
        } else {
            if options.resume { log("no checkpoint in \(options.checkpointDir): starting from the beginning") }
            try prepare()
            try resetMetricsFile(keepingThrough: 0)
        }
        let metricsPath = options.outputDir + "/metrics.jsonl"
        let bar = ProgressBar(total: totalSteps, label: "train", unit: "tok", enabled: !options.quiet && comm.isRoot)
        var interrupted = false
        var lastSaved = step
        var tokensDone = 0
        let loopStart = Date()
        while step < totalSteps {
            if comm.isDistributed {  // every rank stops at the same step
                var stop = [Double(trainingStopRequested)]
                try comm.allReduceSum(&stop)
                if stop[0] != 0 { interrupted = true; break }
            }
            // (Distributed, only the agreed decision above counts: a signal that lands between the
            // all-reduce and here on one rank alone must not make it leave the others in a collective.)
            if !comm.isDistributed && trainingStopRequested != 0 { interrupted = true; break }
            let t0 = Date(), traffic0 = comm.traffic
            var record = try trainStep()
            if comm.isDistributed {
                let t = comm.traffic - traffic0
                record.commBytes = t.payloadBytes; record.commSeconds = t.seconds
            }
            tokensDone += spec.batchSize * dataParallelSize * spec.gradAccum * seqLen
            record.tokensPerSecond =
                Double(spec.batchSize * dataParallelSize * spec.gradAccum * seqLen) / max(Date().timeIntervalSince(t0), 1e-9)
            if spec.evalEvery > 0, step % spec.evalEvery == 0, step < totalSteps {
                bar.finish()
                record.validationLoss = try evaluate().loss
            }
            history.append(record)
            if comm.isRoot { try appendLine(metricsPath, record.json) }
            let rate = Double(tokensDone) / max(Date().timeIntervalSince(loopStart), 1e-9)
            bar.update(step, units: tokensDone, extra: String(format: "loss %.4f", record.loss))
            if !ProgressBar.stderrIsTerminal && (step % spec.logEvery == 0 || step == totalSteps || record.validationLoss != nil) {
                var line = String(
                    format: "step %d/%d  loss %.4f  lr %.3g  grad_norm %.3f  %.0f tok/s", step, totalSteps, record.loss, record.lr,
                    record.gradNorm, rate)
                if let v = record.validationLoss { line += String(format: "  val_loss %.4f", v) }
                if record.skipped { line += "  (batch skipped: non-finite)" }
                log(line)
            } else if let v = record.validationLoss {
                log(String(format: "step %d/%d  val_loss %.4f", step, totalSteps, v))
            }
            if spec.saveEvery > 0, step % spec.saveEvery == 0, step < totalSteps {
                try saveCheckpoint(); lastSaved = step
            }
            options.onStep?(record)
        }
        bar.finish()
        if interrupted {
            // Rank 0 decides (a save may be collective: pipeline stages, ZeRO-1), so ranks that
            // do not share the checkpoint folder still agree.
            var save = [comm.isRoot && (step != lastSaved || TrainingCheckpoint.latest(in: options.checkpointDir) == nil) ? 1.0 : 0]
            try comm.allReduceSum(&save)
            if save[0] != 0 { try saveCheckpoint() }
            try backend.synchronizeHost(optimizer)
            log("interrupted at step \(step): checkpoint written; continue with --resume")
            return Result(
                steps: step, finalValidation: nil, interrupted: true, seconds: Date().timeIntervalSince(start), resumedFrom: resumedFrom)
        }
        // The final state is checkpointed whenever checkpoints are on, so `qat export --checkpoint`
        // and a later --resume with more steps can start from it.
        if spec.saveEvery > 0 && step != lastSaved { try saveCheckpoint() }
        try backend.synchronizeHost(optimizer)  // the export reads the host model
        let final = options.finalEvaluation ? try evaluate() : nil
        return Result(
            steps: step, finalValidation: final, interrupted: false, seconds: Date().timeIntervalSince(start), resumedFrom: resumedFrom)
    }

    /// One optimizer step over grad_accum micro-batches. The loss is the sum over every valid
    /// token of the step divided once by their count.
    func trainStep() throws -> StepMetrics {
        try StepProfiler.measure("opt.zero_grad") { try backend.zeroGradients(optimizer) }
        let B = spec.batchSize, T = seqLen
        let batches = (0..<spec.gradAccum).map { _ -> MicroBatch in
            var tokens = loader.next()
            var indices = loader.lastIndices
            if dataParallelSize > 1 {  // this rank's rows of the global batch
                let r = dataParallel.rank
                tokens = Array(tokens[(r * B * T)..<((r + 1) * B * T)])
                indices = Array(indices[(r * B)..<((r + 1) * B)])
            }
            return MicroBatch(
                tokens: tokens, targets: CrossEntropy.shiftedTargets(labels: tokens, batch: B, seqLen: T),
                batch: B, seqLen: T, sequenceIndices: indices)
        }
        // The loss is normalised by the global step's valid-token count.
        let valid = try backend.globalValidCount(batches.reduce(0) { $0 + $1.targets.filter { $0 != CrossEntropy.ignoreIndex }.count })
        let parts = try backend.forwardBackward(batches: batches, loss: loss, gradScale: 1 / Float(max(valid, 1)), optimizer: optimizer)
        let n = Double(max(valid, 1))
        let lr = spec.lr * schedule.factor(step: optimizer.stepCount)
        var record = StepMetrics(
            step: step + 1, loss: parts.total / n, ce: parts.ce > 0 ? parts.ce / n : nil,
            kd: parts.kd > 0 ? parts.kd / n : nil, lr: lr, gradNorm: 0, tokensPerSecond: 0,
            peakRSSMB: peakRSSMegabytes())
        record.gpuPeakMB = backend.devicePeakMB
        let badTensor =
            parts.total.isFinite
            ? try StepProfiler.measure("opt.finite_check") { try backend.firstNonFiniteGradient(optimizer) } : "loss"
        if let bad = badTensor {
            if spec.onNonFinite == "skip" {
                log("step \(step + 1): non-finite \(bad == "loss" ? "loss" : "gradient of \(bad)"); batch skipped (on_nonfinite: skip)")
                try backend.zeroGradients(optimizer)
                record.skipped = true
                record.gradNorm = .nan
                step += 1
                return record
            }
            throw QATError(
                "step \(step + 1): non-finite "
                    + "\(bad == "loss" ? "loss (\(parts.total / n))" : "gradient in \(bad)"); the last "
                    + "checkpoint in \(options.checkpointDir) is intact. Lower train.lr, or set "
                    + "train.on_nonfinite: skip")
        }
        record.gradNorm = try StepProfiler.measure("opt.clip") { try backend.clipGradients(optimizer, maxNorm: spec.maxGradNorm) }
        try StepProfiler.measure("opt.adamw") {
            try backend.optimizerStep(optimizer, model: model, lrFactor: schedule.factor(step: optimizer.stepCount))
        }
        step += 1
        return record
    }

    // MARK: - Checkpoints

    /// The trainer_state.json of a checkpoint taken now.
    func checkpointState(optimizer metadata: AdamWStateMetadata) -> TrainingCheckpoint.State {
        TrainingCheckpoint.State(
            step: step, epoch: loader.epoch, cursor: loader.cursor, seed: spec.seed,
            recipeHash: options.recipeHash, optimizer: metadata)
    }

    public func saveCheckpoint() throws {
        try backend.synchronizeHost(optimizer)
        // ZeRO-1: rank 0 gathers the moments.
        if optimizer.partition != nil && options.pipeline == nil { return try saveShardedCheckpoint() }
        var moments = optimizer.stateTensors()
        if optimizer.partition != nil {  // ZeRO-1 across pipelines: this stage's moments to pipeline 0
            var gathered: [(name: String, tensor: Tensor)] = []
            try optimizer.forEachGatheredMoment { name, shape, values in
                gathered.append((name, Tensor(shape: shape, values: Array(values))))
            }
            moments = gathered
        }
        // Rank 0 gets every stage's state, in the order one process writes it.
        let local = CheckpointTensors(
            parameters: model.parameters, moments: moments, extra: extraState(),
            metadata: optimizer.stateMetadata())
        guard let state = try backend.gatherCheckpoint(local), comm.isRoot else { return }
        try TrainingCheckpoint.write(
            directory: options.checkpointDir, state: checkpointState(optimizer: state.metadata),
            parameters: state.parameters, optimizer: state.moments, extra: state.extra, keep: spec.keepCheckpoints)
    }

    func restore(from path: String) throws {
        let c = try TrainingCheckpoint.read(path, optimizerTensors: optimizer.ownsStateTensor)  // ZeRO-1: this rank's moments
        if !options.recipeHash.isEmpty, c.state.recipeHash != options.recipeHash, !options.forceResume {
            throw QATError(
                "\(path) was written by a different recipe (hash \(c.state.recipeHash), this one "
                    + "\(options.recipeHash)); use the same recipe, or --force-resume to continue anyway")
        }
        guard c.state.seed == spec.seed else {
            throw QATError("\(path) was trained with seed \(c.state.seed), the recipe says \(spec.seed)")
        }
        for p in model.parameters {
            guard let t = c.parameters[p.name] else { throw QATError("\(path): checkpoint lacks parameter \(p.name)") }
            guard t.count == p.count else { throw QATError("\(path): parameter \(p.name) has \(t.count) elements, the model \(p.count)") }
            p.value.copy(from: t)
        }
        var metadata = c.state.optimizer
        if options.pipeline != nil {  // this stage's share of the whole model's optimizer state
            metadata.parameters = metadata.parameters.filter { CausalLM.belongs($0, to: model.layerRange, config: model.config) }
        }
        try optimizer.loadState(tensors: c.optimizer, metadata: metadata)
        try restoreExtraState(c.extra)
        try loader.seek(epoch: c.state.epoch, cursor: c.state.cursor)
        step = c.state.step
        try backend.hostStateChanged(optimizer, model: model)
        try resetMetricsFile(keepingThrough: step)
    }

    /// Keeps metrics.jsonl lines up to `step` (a resumed run rewrites what follows).
    func resetMetricsFile(keepingThrough last: Int) throws {
        guard comm.isRoot else { return }
        let path = options.outputDir + "/metrics.jsonl"
        var kept: [String] = []
        if last > 0, let text = try? String(contentsOfFile: path, encoding: .utf8) {
            for line in text.split(separator: "\n") {
                if let v = try? JSONValue.parse(String(line)), let s = v["step"]?.intValue, s <= last { kept.append(String(line)) }
            }
        }
        let body = kept.isEmpty ? "" : kept.joined(separator: "\n") + "\n"
        try atomicWrite(path: path) { try $0.write(Array(body.utf8)) }
    }

    func appendLine(_ path: String, _ line: String) throws {
        guard let h = FileHandle(forWritingAtPath: path) else { throw QATError("cannot append to \(path)") }
        defer { try? h.close() }
        h.seekToEndOfFile()
        h.write(Data((line + "\n").utf8))
    }
}
