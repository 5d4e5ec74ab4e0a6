import CCUDA
import Foundation
import QATCore
import QATDistributed
import QATModels

/// Sums a model's device gradient arena over the data-parallel ranks, bucket by bucket
/// (`GradientBuckets`): with NCCL on the device buffers (one GPU per rank), or staged through
/// host memory and the MPI communicator (`QAT_GRAD_REDUCE=mpi`; also what runs when NCCL
/// cannot be loaded, or when ranks share a GPU, which NCCL refuses). Every rank holds the same
/// sums afterwards, so the gradient norm, the non-finite check and the AdamW step agree.
/// The reduction runs after the whole backward (no overlap with it yet).
public final class DeviceGradientReducer {
    public let mode: GPUDataParallel.ReduceMode
    public let device: CUDADevice
    /// The control channel (MPI): the staged path's all-reduce, and NCCL's bootstrap.
    public let control: Communicator
    public let nccl: NCCLCommunicator?
    public let bucketElements: Int
    private var plan: (key: [Int], buckets: GradientBuckets)?
    private var staging: [Float] = []

    public init(mode: GPUDataParallel.ReduceMode, device: CUDADevice, control: Communicator, bucketElements: Int) throws {
        self.mode = mode; self.device = device; self.control = control; self.bucketElements = bucketElements
        nccl = mode == .nccl ? try NCCLCommunicator(device: device, control: control) : nil
    }

    /// The reducer of this run: the mode `GPUDataParallel.reduceMode` picks from the
    /// environment, agreed by every rank (if NCCL fails to load on any rank, none uses it, or
    /// all stop when `QAT_GRAD_REDUCE=nccl` asked for it).
    public static func make(device: CUDADevice, world: Communicator, environment env: [String: String]) throws -> DeviceGradientReducer {
        var loadError: Error? = nil
        if env[GPUDataParallel.reduceVariable]?.lowercased() != "mpi" {
            do { _ = try NCCLLibrary.load() } catch { loadError = error }
        }
        var failures = [loadError == nil ? 0.0 : 1.0]
        try world.allReduceSum(&failures)
        let share = GPUDataParallel.ranksShareGPUs(
            localSize: GPUDataParallel.localSize(environment: env), deviceCount: try CUDADevice.deviceCount())
        let mode = try GPUDataParallel.reduceMode(environment: env, ncclLoads: failures[0] == 0, ranksShareGPUs: share)
        if mode == .nccl && failures[0] != 0 {
            throw loadError ?? QATError("NCCL could not be loaded on \(Int(failures[0])) rank(s) (\(GPUDataParallel.reduceVariable)=nccl)")
        }
        return try DeviceGradientReducer(
            mode: mode, device: device, control: world, bucketElements: try GPUDataParallel.bucketElements(environment: env))
    }

    /// One line for the log.
    public var description: String {
        let mb = bucketElements >> 18
        switch mode {
        case .nccl: return "gradients all-reduced by NCCL \(nccl?.library.version ?? "?") on the GPU, buckets of \(mb) MiB"
        case .mpi:
            return "gradients all-reduced through host memory and MPI (\(GPUDataParallel.reduceVariable)=mpi path), buckets of \(mb) MiB"
        }
    }

    /// Sums `model`'s trainable gradients over the ranks, in place.
    public func reduce(_ model: CUDAModel) throws {
        guard control.isDistributed, let arena = model.training?.gradients.arena else { return }
        let tensors = try model.gradientList.map { (offset: Int($0.ptr - arena.ptr) / 4, count: $0.count) }
        let key = tensors.flatMap { [$0.offset, $0.count] }
        if plan?.key != key { plan = (key, GradientBuckets(tensors: tensors, bucketElements: bucketElements)) }
        try reduce(base: arena.ptr, buckets: plan!.buckets)
    }

    /// Sums the arena at `base` over the ranks, bucket by bucket (the selftest calls this directly).
    public func reduce(base: CUdeviceptr, buckets: GradientBuckets) throws {
        switch mode {
        case .nccl:
            guard let nccl else { throw QATError.internal("NCCL reduction without a communicator") }
            for r in buckets.ranges { try nccl.allReduceSum(base + CUdeviceptr(r.lowerBound * 4), count: r.count) }
        case .mpi:
            if staging.count < buckets.largest { staging = [Float](repeating: 0, count: buckets.largest) }
            let d = device
            try staging.withUnsafeMutableBufferPointer { s in
                try StagedReduction.run(
                    buckets, staging: s.baseAddress!,
                    download: { r, host in
                        try d.check(d.api.cuMemcpyDtoH(host, base + CUdeviceptr(r.lowerBound * 4), r.count * 4), "cuMemcpyDtoH(gradients)")
                    },
                    reduce: { buffer, count in try control.allReduceSum(buffer, count: count) },
                    upload: { r, host in
                        try d.check(d.api.cuMemcpyHtoD(base + CUdeviceptr(r.lowerBound * 4), host, r.count * 4), "cuMemcpyHtoD(gradients)")
                    })
            }
        }
    }
}

extension CUDAModel {
    /// Validation loss as `evaluate(stream:…)`, with the sequences shared among the ranks of
    /// `comm` (each its contiguous share, `Evaluation.shardRange`) and the sums added over them:
    /// every rank gets the one-process figure.
    public func evaluate(
        stream: [Int32], seqLen: Int, batchSize: Int, maxSequences: Int?, over comm: Communicator,
        progress: ((Int, Int) -> Void)? = nil
    ) throws -> EvalResult {
        guard comm.isDistributed else {
            return try evaluate(stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences, progress: progress)
        }
        let reduce: (inout [Double]) throws -> Void = { try comm.allReduceSum(&$0) }
        return try Evaluation.evaluate(
            stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences, progress: progress,
            shard: (comm.rank, comm.size), reduce: reduce
        ) { tokens, targets, b in
            let hidden = try forward(tokens: tokens, batch: b, seqLen: seqLen)
            return try lossSums(hidden: hidden, targets: targets, n: b * seqLen)
        }
    }
}
