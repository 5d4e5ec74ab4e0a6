import Foundation
import QATCore
import QATModels

/// How the work of one optimizer step is split: one process, data-parallel ranks, or the
/// stages of a pipeline. `Trainer` draws the batches, schedules, steps the optimizer and
/// writes checkpoints; the backend runs forward and backward over this rank's micro-batches,
/// reduces over the ranks, measures the gradient norm and gathers the state a checkpoint
/// holds. This is the seam a model other than `CausalLM` (one that lives in device memory)
/// plugs in at: implement these calls and hand the backend to `Trainer.Options.backend`.
public protocol StepBackend: AnyObject {
    /// The ranks sharing each step's batch (a single-process communicator when none).
    var dataParallel: Communicator { get }
    /// Sum of this rank's valid-token count over the ranks sharing the step.
    func globalValidCount(_ local: Int) throws -> Int
    /// Forward and backward of this rank's micro-batches, gradients scaled by `gradScale` and
    /// accumulated into the optimizer's gradient tensors; returns the step's loss sums over
    /// every rank (gradients summed too).
    func forwardBackward(batches: [MicroBatch], loss: TrainingLoss, gradScale: Float, optimizer: AdamW) throws -> LossParts
    /// The name of the first non-finite gradient on any rank, nil when all are finite.
    func firstNonFiniteGradient(_ optimizer: AdamW) throws -> String?
    /// The global L2 norm of the gradients before clipping; scales them to `maxNorm` when set.
    func clipGradients(_ optimizer: AdamW, maxNorm: Double?) throws -> Double
    /// A checkpoint's tensors as one process would write them, on the rank that writes; nil
    /// on the others (which take part in the gathering).
    func gatherCheckpoint(_ state: CheckpointTensors) throws -> CheckpointTensors?

    // A backend whose model lives in device memory (the GPU) overrides these; the defaults
    // (below) are those of a model in host memory.
    /// Zeroes the trainable gradients before a step (and after a skipped one).
    func zeroGradients(_ optimizer: AdamW) throws
    /// The optimizer step with the gradients as clipped; then the fake-quant weights are stale.
    func optimizerStep(_ optimizer: AdamW, model: CausalLM, lrFactor: Double) throws
    /// Makes the host model's parameters and the optimizer's moments current (before a
    /// checkpoint is written and when training ends).
    func synchronizeHost(_ optimizer: AdamW) throws
    /// The host parameters, moments or quantizer amax were replaced (a resumed checkpoint).
    func hostStateChanged(_ optimizer: AdamW, model: CausalLM) throws
    /// Validation loss on the backend's device; nil: the trainer evaluates the host model.
    func evaluate(stream: [Int32], seqLen: Int, batchSize: Int, maxSequences: Int?) throws -> EvalResult?
    /// The device's peak memory in MiB since the run started (metrics.jsonl `gpu_peak_mb`); nil on the host.
    var devicePeakMB: Double? { get }
}

extension StepBackend {
    public func zeroGradients(_ optimizer: AdamW) throws { optimizer.zeroGrad() }
    public func optimizerStep(_ optimizer: AdamW, model: CausalLM, lrFactor: Double) throws {
        optimizer.step(lrFactor: lrFactor)
        model.markWeightsChanged()
    }
    public func synchronizeHost(_ optimizer: AdamW) throws {}
    public func hostStateChanged(_ optimizer: AdamW, model: CausalLM) throws { model.markWeightsChanged() }
    public func evaluate(stream: [Int32], seqLen: Int, batchSize: Int, maxSequences: Int?) throws -> EvalResult? { nil }
    public var devicePeakMB: Double? { nil }
}

/// What a training checkpoint holds besides trainer_state.json's counters.
public struct CheckpointTensors {
    public var parameters: [Parameter]
    public var moments: [(name: String, tensor: Tensor)]
    public var extra: [(name: String, tensor: Tensor)]
    public var metadata: AdamWStateMetadata
}

/// One process holds the whole model (also each rank of data parallelism, below).
public final class LocalStepBackend: StepBackend {
    let model: CausalLM
    let dHidden: Tensor
    public let dataParallel: Communicator = SingleProcessCommunicator()

    /// This rank's micro-batches' share of the MoE load-balancing loss (1 / (grad_accum · ranks)).
    public var routerAuxShare: Double = 1

    public init(model: CausalLM, dHidden: Tensor) { self.model = model; self.dHidden = dHidden }

    public func globalValidCount(_ local: Int) throws -> Int { local }

    public func forwardBackward(batches: [MicroBatch], loss: TrainingLoss, gradScale: Float, optimizer: AdamW) throws -> LossParts {
        var parts = LossParts()
        for batch in batches {
            let hidden = try model.forward(tokens: batch.tokens, batch: batch.batch, seqLen: batch.seqLen, saveForBackward: true)
            parts += try loss.run(model: model, hidden: hidden, batch: batch, gradScale: gradScale, dHidden: dHidden.data)
            parts.total += routerAuxLossTerm(model: model, share: routerAuxShare, validTokens: Int((1 / Double(gradScale)).rounded()))
            try model.backward(dHidden: dHidden.data)
        }
        return parts
    }

    public func firstNonFiniteGradient(_ optimizer: AdamW) throws -> String? { optimizer.firstNonFiniteGradient() }

    public func clipGradients(_ optimizer: AdamW, maxNorm: Double?) throws -> Double {
        maxNorm.map { optimizer.clipGradNorm(maxNorm: $0) } ?? GradientClipping.globalNorm(optimizer.gradients)
    }

    public func gatherCheckpoint(_ state: CheckpointTensors) throws -> CheckpointTensors? { state }
}

/// Data parallel: every rank holds the whole model and runs its rows of the global batch;
/// gradients and loss sums are summed over `comm` (bucketed), so the step equals one
/// process's on the whole batch up to summation order.
public final class DataParallelStepBackend: StepBackend {
    let local: LocalStepBackend
    public let dataParallel: Communicator

    public init(model: CausalLM, dHidden: Tensor, comm: Communicator) {
        local = LocalStepBackend(model: model, dHidden: dHidden); dataParallel = comm
    }

    public func globalValidCount(_ count: Int) throws -> Int {
        var total = [Double(count)]
        try dataParallel.allReduceSum(&total)
        return Int(total[0])
    }

    public func forwardBackward(batches: [MicroBatch], loss: TrainingLoss, gradScale: Float, optimizer: AdamW) throws -> LossParts {
        var parts = try local.forwardBackward(batches: batches, loss: loss, gradScale: gradScale, optimizer: optimizer)
        try dataParallel.allReduceSum(tensors: Array(optimizer.gradients))
        var sums = [parts.total, parts.ce, parts.kd]
        try dataParallel.allReduceSum(&sums)
        parts.total = sums[0]; parts.ce = sums[1]; parts.kd = sums[2]
        return parts
    }

    /// Gradients are identical on every rank after the all-reduce.
    public func firstNonFiniteGradient(_ optimizer: AdamW) throws -> String? { optimizer.firstNonFiniteGradient() }

    public func clipGradients(_ optimizer: AdamW, maxNorm: Double?) throws -> Double {
        try local.clipGradients(optimizer, maxNorm: maxNorm)
    }

    /// Rank 0 writes; ZeRO-1's moments are gathered by the trainer's sharded save.
    public func gatherCheckpoint(_ state: CheckpointTensors) throws -> CheckpointTensors? { dataParallel.isRoot ? state : nil }
}

/// Pipeline parallel: this rank runs one stage's layers (`PipelineEngine`), pipelines side by
/// side share each step's batch over `engine.dataParallel`; the gradient norm, the
/// non-finite check and checkpoints span every stage, in one process's order.
public final class PipelineStepBackend: StepBackend {
    let engine: PipelineEngine
    let model: CausalLM
    let dHidden: Tensor
    /// The whole model's parameter groups (what one process would have).
    let wholeModelGroups: [ParamGroup]
    var globalSlotOrder: [String] { wholeModelGroups.flatMap(\.parameterNames) }
    public var dataParallel: Communicator { engine.dataParallel }

    public init(engine: PipelineEngine, model: CausalLM, dHidden: Tensor, wholeModelGroups: [ParamGroup]) {
        self.engine = engine; self.model = model; self.dHidden = dHidden; self.wholeModelGroups = wholeModelGroups
    }

    public func globalValidCount(_ count: Int) throws -> Int {
        guard dataParallel.size > 1 else { return count }
        var total = [Double(count)]
        try dataParallel.allReduceSum(&total)
        return Int(total[0])
    }

    public func forwardBackward(batches: [MicroBatch], loss: TrainingLoss, gradScale: Float, optimizer: AdamW) throws -> LossParts {
        var parts = try engine.forwardBackward(student: model, loss: loss, batches: batches, gradScale: gradScale, dHidden: dHidden)
        if dataParallel.size > 1 {  // the pipelines side by side: gradients and loss sums of the global step
            try dataParallel.allReduceSum(tensors: Array(optimizer.gradients))
            var sums = [parts.total, parts.ce, parts.kd]
            try dataParallel.allReduceSum(&sums)
            parts.total = sums[0]; parts.ce = sums[1]; parts.kd = sums[2]
        }
        return parts
    }

    public func firstNonFiniteGradient(_ optimizer: AdamW) throws -> String? { try engine.firstNonFiniteGradient(optimizer: optimizer) }

    public func clipGradients(_ optimizer: AdamW, maxNorm: Double?) throws -> Double {
        let norm = try engine.globalGradNorm(optimizer: optimizer, order: globalSlotOrder)
        if let maxNorm { GradientClipping.scale(optimizer.gradients, norm: norm, maxNorm: maxNorm) }
        return norm
    }

    /// Rank 0 collects every stage's parameters, moments and extra state and orders them as
    /// one process writes them (the checkpoint is then byte-identical to one process's).
    public func gatherCheckpoint(_ state: CheckpointTensors) throws -> CheckpointTensors? {
        guard dataParallel.rank == 0 else { return nil }  // the other pipelines hold the same state
        let parameters = try engine.gather(state.parameters.map { ($0.name, $0.value) })
        let moments = try engine.gather(state.moments), extra = try engine.gather(state.extra)
        guard let parameters, let moments, let extra else { return nil }
        let order = Dictionary(uniqueKeysWithValues: CausalLM.parameterShapes(model.config).enumerated().map { ($1.0, $0) })
        let slot = Dictionary(
            uniqueKeysWithValues: globalSlotOrder.enumerated().flatMap { index, name in
                [(AdamW.expAvgName(name), 2 * index), (AdamW.expAvgSqName(name), 2 * index + 1)]
            })
        var metadata = state.metadata
        metadata.parameters = globalSlotOrder
        metadata.groups = wholeModelGroups.map {
            .init(hyper: $0.hyper, pattern: $0.pattern, decays: $0.decays, parameters: $0.parameterNames)
        }
        return CheckpointTensors(
            parameters: parameters.sorted { order[$0.name, default: .max] < order[$1.name, default: .max] }
                .map { Parameter(name: $0.name, value: $0.tensor) },
            moments: moments.sorted { slot[$0.name, default: .max] < slot[$1.name, default: .max] },
            extra: extra, metadata: metadata)
    }
}
