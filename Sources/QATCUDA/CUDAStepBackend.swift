import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain

/// Training steps on one GPU behind the trainer's `StepBackend` seam: forward, the fused loss
/// head and backward on the device, gradients and the AdamW state (fp32 moments) in device
/// memory, the update by the same element-wise arithmetic as the CPU's `AdamW`.
///
/// The host `CausalLM` and `AdamW` stay the record of the run: `synchronizeHost` copies the
/// device parameters and moments into them before a checkpoint is written and when training
/// ends, and `hostStateChanged` uploads them after a resume, so checkpoints keep one format
/// (a GPU run resumes on the CPU and the other way round).
public final class CUDAStepBackend: StepBackend {
    public let model: CUDAModel
    /// The device copy of a QAD teacher (made on first use).
    let teacherCopy: (CausalLM) throws -> CUDAModel
    /// The data-parallel ranks (one process per GPU under mpirun; `CUDAStepBackend+DataParallel`).
    public let dataParallel: Communicator
    /// Sums the device gradients over `dataParallel` (nil in a single process).
    public let gradientReducer: DeviceGradientReducer?
    private var moments: DeviceBuffer?
    private var momentOffsets: [Int] = []
    private var squares: [Double]?  // per-gradient Σ g² of the current step (before clipping)
    /// The `sumsq_chunks` table of the gradient list (rebuilt when the list changes).
    private var chunks: (plan: GradientChunks, table: DeviceBuffer)?
    /// Gradient clipping's coefficient for the next optimizer step (1: none). Clipping is
    /// folded into `adamw_update`, which reads g·clip: the device gradients stay unclipped
    /// between `clipGradients` and `optimizerStep` (the trainer reads none of them there, and
    /// neither a checkpoint nor `synchronizeHost` holds gradients).
    private var pendingClip: Float = 1

    public init(
        model: CUDAModel, dataParallel: Communicator = SingleProcessCommunicator(), gradientReducer: DeviceGradientReducer? = nil,
        teacherCopy: @escaping (CausalLM) throws -> CUDAModel
    ) {
        self.model = model
        self.dataParallel = dataParallel
        self.gradientReducer = gradientReducer
        self.teacherCopy = teacherCopy
    }

    public func globalValidCount(_ local: Int) throws -> Int { try globalSum(local) }

    public func forwardBackward(batches: [MicroBatch], loss: TrainingLoss, gradScale: Float, optimizer: AdamW) throws -> LossParts {
        try model.prepareTraining()
        squares = nil
        pendingClip = 1
        var parts = LossParts()
        for batch in batches {
            _ = try model.forward(tokens: batch.tokens, batch: batch.batch, seqLen: batch.seqLen, saveForBackward: true)
            let valid = batch.targets.filter { $0 != CrossEntropy.ignoreIndex }.count
            let r: (ce: Double, kd: Double, dHidden: CUdeviceptr)
            switch loss {
            case is CrossEntropyLoss:
                r = try model.lossBackward(.crossEntropy, targets: batch.targets, gradScale: gradScale)
                parts += LossParts(total: r.ce, ce: r.ce, kd: 0, valid: valid)
            case let d as DistillationLoss:
                // A larger teacher vocabulary (mask_extra_vocab): kd_rows reads the first V logits of each
                // teacher row (stride V_t), as the CPU's DistillationKernels.fullRow does.
                let teacher = try teacherCopy(d.teacher)
                let th = try teacher.forward(tokens: batch.tokens, batch: batch.batch, seqLen: batch.seqLen)
                let k = d.constants
                let (kind, beta): (Int, Float)
                switch k.divergence {
                case .forwardKL: (kind, beta) = (0, 0)
                case .reverseKL: (kind, beta) = (1, 1)
                case .jsd(let b): (kind, beta) = (2, Float(b))
                }
                r = try model.lossBackward(
                    .distillation(
                        teacher: teacher, hidden: th, kind: kind, beta: beta, temperature: k.temperature,
                        kdRatio: k.kdRatio), targets: batch.targets, gradScale: gradScale)
                parts += LossParts(total: (1 - k.kdRatio) * r.ce + k.kdRatio * r.kd, ce: r.ce, kd: r.kd, valid: valid)
            case let tk as TopKDistillationLoss:
                guard tk.studentVocab == model.config.vocabSize else {
                    throw QATError(
                        "top-k distillation: the loss's vocabulary \(tk.studentVocab) is not the model's \(model.config.vocabSize)")
                }
                let rows = try tk.teacherRows(for: batch)
                let k = tk.constants
                let teacher = try model.uploadTopKTeacher(
                    ids: rows.ids, logprobs: rows.logprobs, rest: rows.rest, counts: rows.counts, topK: tk.reader.header.topK,
                    objective: tk.objective, constants: k)
                r = try model.lossBackward(.topK(teacher), targets: batch.targets, gradScale: gradScale)
                parts += LossParts(total: (1 - k.kdRatio) * r.ce + k.kdRatio * r.kd, ce: r.ce, kd: r.kd, valid: valid)
            default:
                throw QATError.unsupported(
                    "\(loss.description) runs on the CPU only in this version (the GPU trains with cross-entropy, "
                        + "live-teacher distillation and a top-k teacher cache): use device: cpu"
                )
            }
            try model.backward(dHidden: r.dHidden)
        }
        return try reducedOverRanks(parts)
    }

    /// Σ g² of every trainable gradient (one `sumsq_chunks` launch per step over the whole
    /// arena, shared by the non-finite check and the norm).
    private func gradientSquares() throws -> [Double] {
        if let s = squares { return s }
        let list = try model.gradientList
        let plan = GradientChunks(list.map { (UInt64($0.ptr), $0.count) })
        if chunks?.plan != plan {
            let table = try DeviceBuffer(model.device, bytes: max(1, plan.table.count) * 8)
            try plan.table.withUnsafeBytes { if $0.count > 0 { try table.upload($0.baseAddress!, bytes: $0.count) } }
            chunks = (plan, table)
        }
        let partials = try model.scratch("sumsq", bytes: max(1, plan.count) * 8)
        try model.device.sumOfSquares(chunks: chunks!.table.ptr, count: plan.count, partials: partials)
        var host = [Double](repeating: 0, count: plan.count)
        try host.withUnsafeMutableBytes {
            if $0.count > 0 { try model.device.check(model.device.api.cuMemcpyDtoH($0.baseAddress!, partials, $0.count), "cuMemcpyDtoH") }
        }
        let result = plan.tensorSums(host)
        squares = result
        return result
    }

    public func firstNonFiniteGradient(_ optimizer: AdamW) throws -> String? {
        let s = try gradientSquares()
        return zip(try model.gradientList, s).first { !$0.1.isFinite }?.0.name
    }

    /// The norm; the scaling itself is left to `optimizerStep` (`pendingClip`).
    public func clipGradients(_ optimizer: AdamW, maxNorm: Double?) throws -> Double {
        let norm = try gradientSquares().reduce(0, +).squareRoot()
        pendingClip = Self.clipCoefficient(norm: norm, maxNorm: maxNorm)
        return norm
    }

    /// The fp32 factor by which `GradientClipping.scale` multiplies every gradient for this
    /// norm: Float(maxNorm / (norm + 1e-6)) when that is below 1, else 1 (no maxNorm, a
    /// non-finite norm, or a norm within the bound leave the gradients as they are, and ×1 is
    /// exact).
    public static func clipCoefficient(norm: Double, maxNorm: Double?) -> Float {
        guard let maxNorm, norm.isFinite else { return 1 }
        let coef = maxNorm / (norm + 1e-6)
        return coef < 1 ? Float(coef) : 1
    }

    public func zeroGradients(_ optimizer: AdamW) throws {
        try model.prepareTraining()
        try model.zeroGradients()
        squares = nil
        pendingClip = 1
    }

    /// The device moments, laid out in slot order (allocated and uploaded from the host on first use).
    private func deviceMoments(_ optimizer: AdamW) throws -> DeviceBuffer {
        if let m = moments { return m }
        var offsets: [Int] = [], total = 0
        for s in optimizer.slots { offsets.append(total); total += (s.value.count + 63) / 64 * 64 }
        let m = try DeviceBuffer(model.device, floats: max(1, 2 * total))
        moments = m
        momentOffsets = offsets + [total]
        try uploadMoments(optimizer)
        return m
    }

    private func momentPointers(_ i: Int) -> (m: CUdeviceptr, v: CUdeviceptr) {
        let total = momentOffsets.last!, base = moments!.ptr
        return (base + CUdeviceptr(momentOffsets[i] * 4), base + CUdeviceptr((total + momentOffsets[i]) * 4))
    }

    private func uploadMoments(_ optimizer: AdamW) throws {
        guard moments != nil else { return }
        for (i, s) in optimizer.slots.enumerated() where s.m.count == s.value.count {
            let (m, v) = momentPointers(i)
            try model.device.check(model.device.api.cuMemcpyHtoD(m, s.m.data, s.m.count * 4), "cuMemcpyHtoD")
            try model.device.check(model.device.api.cuMemcpyHtoD(v, s.v.data, s.v.count * 4), "cuMemcpyHtoD")
        }
    }

    public func optimizerStep(_ optimizer: AdamW, model host: CausalLM, lrFactor: Double) throws {
        _ = try deviceMoments(optimizer)
        let clip = pendingClip
        pendingClip = 1
        let byName = Dictionary(model.model.parameters.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        // The Linears' bf16 product copies are rewritten by the same kernel where it can (`weightRefreshes`).
        let refreshes = try model.weightRefreshes()
        var refreshed: [CUDAModel.WeightRefresh] = []
        try optimizer.step(lrFactor: lrFactor) { i, slot, c in
            guard let p = byName[slot.name], let g = try model.gradient(p) else {
                throw QATError.internal("optimizer slot \(slot.name) has no device gradient")
            }
            let (m, v) = momentPointers(i), w = model.tensor(p)
            let r = refreshes[ObjectIdentifier(p)].flatMap { $0.fits(p: w, g: g, m: m, v: v, count: p.count) ? $0 : nil }
            try model.device.adamw(
                p: w, g: g, m: m, v: v, count: p.count, decay: c.decay, lerpSmall: c.lerpSmall,
                lerpWeight: c.lerpWeight, beta2: c.beta2, oneMinusBeta2: c.oneMinusBeta2, bc2Sqrt: c.bc2Sqrt, eps: c.eps,
                negStepSize: c.negStepSize, clip: clip, refresh: r)
            if let r { refreshed.append(r) }
        }
        model.weightsStepped(refreshed: refreshed)
    }

    public func synchronizeHost(_ optimizer: AdamW) throws {
        for p in model.model.parameters {  // (each once: a tied lm_head is the embedding)
            try model.device.check(model.device.api.cuMemcpyDtoH(p.value.data, model.tensor(p), p.count * 4), "cuMemcpyDtoH(\(p.name))")
        }
        guard moments != nil else { return }
        for (i, s) in optimizer.slots.enumerated() where s.m.count == s.value.count {
            let (m, v) = momentPointers(i)
            try model.device.check(model.device.api.cuMemcpyDtoH(s.m.data, m, s.m.count * 4), "cuMemcpyDtoH")
            try model.device.check(model.device.api.cuMemcpyDtoH(s.v.data, v, s.v.count * 4), "cuMemcpyDtoH")
        }
    }

    public func hostStateChanged(_ optimizer: AdamW, model host: CausalLM) throws {
        for p in model.model.parameters {
            try model.device.check(model.device.api.cuMemcpyHtoD(model.tensor(p), p.value.data, p.count * 4), "cuMemcpyHtoD(\(p.name))")
        }
        try uploadMoments(optimizer)
        host.markWeightsChanged()
        model.markWeightsChanged()
    }

    public func evaluate(stream: [Int32], seqLen: Int, batchSize: Int, maxSequences: Int?) throws -> EvalResult? {
        try model.evaluate(stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences, over: dataParallel)
    }

    public var devicePeakMB: Double? { Double(model.device.peakBytes) / 1_048_576 }

    /// Rank 0 writes (every rank holds the same state after `synchronizeHost`).
    public func gatherCheckpoint(_ state: CheckpointTensors) throws -> CheckpointTensors? { dataParallel.isRoot ? state : nil }
}
