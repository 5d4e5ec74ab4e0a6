import CCUDA
import Foundation
import QATCore
import QATDistributed
import QATModels
import QATTrain

/// `qat selftest --device cuda`, data-parallel half (one GPU suffices): the gradient reducer's
/// staged path over a bucketed arena, the GPU step backend under a stand-in two-rank
/// communicator against one process, and NCCL with a one-rank communicator (skipped, with the
/// reason printed, when libnccl.so.2 cannot be loaded).
extension CUDASelftest {
    /// The data-parallel checks alone (`qat selftest --device cuda --only distributed`); true when all pass.
    public mutating func runDistributed() throws -> Bool {
        try distributed()
        return checks.allSatisfy(\.passed)
    }

    mutating func distributed() throws {
        try stagedReductionCheck()
        try dataParallelBackendCheck()
        try ncclCheck()
    }

    /// An arena with gaps, buckets small enough to split tensors and to merge across padding.
    private static let arenaTensors: [(offset: Int, count: Int)] = [(0, 100_000), (100_032, 70_001), (170_048, 129_000), (299_072, 5)]
    private static let arenaCount = 299_136

    /// Mismatching elements of the arena after a reduction: inside the buckets `factor`·x, outside x.
    private func arenaMismatches(_ arena: DeviceBuffer, _ x: [Float], _ buckets: GradientBuckets, factor: Float) throws -> Double {
        let y = try arena.floats(x.count)
        var expected = x
        for r in buckets.ranges { for i in r { expected[i] = factor * x[i] } }
        return Double(zip(expected, y).filter { $0.0.bitPattern != $0.1.bitPattern }.count)
    }

    /// The staged path (device → host, the control communicator's sum, host → device): with one
    /// process the arena comes back bit for bit; with a communicator whose sum doubles, every
    /// bucketed element is doubled and nothing outside the buckets is touched.
    private mutating func stagedReductionCheck() throws {
        let x = Self.random(Self.arenaCount, seed: 71)
        let buckets = GradientBuckets(tensors: Self.arenaTensors, bucketElements: 65_536)
        for (label, control, factor) in [
            ("one process", SingleProcessCommunicator() as Communicator, Float(1)), ("doubling stand-in", DoublingCommunicator(), 2),
        ] {
            let arena = try gpu(x)
            let reducer = try DeviceGradientReducer(mode: .mpi, device: device, control: control, bucketElements: 65_536)
            try reducer.reduce(base: arena.ptr, buckets: buckets)
            add("data parallel: staged reduction, \(label)", try arenaMismatches(arena, x, buckets, factor: factor), 0, "mismatches")
        }
    }

    /// `CUDAStepBackend` as rank 0 of two whose peer holds the same batch (the doubling
    /// stand-in): the global valid count doubles, so the gradient scale halves, and the summed
    /// gradients must equal one process's; loss sums double, the gradient norm is the same.
    private mutating func dataParallelBackendCheck() throws {
        let config = Self.modelConfigs[0].1
        let (batch, seqLen) = (2, 24)
        let model = try Self.selftestModel(config)
        for p in model.parameters { p.setRequiresGrad(true); p.grad!.zero() }
        defer { for p in model.parameters { p.setRequiresGrad(false) } }
        var g = SplitMix64(seed: 73)
        let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
        targets[5] = CrossEntropy.ignoreIndex
        let micro = MicroBatch(tokens: tokens, targets: targets, batch: batch, seqLen: seqLen, sequenceIndices: Array(0..<batch))
        let valid = targets.filter { $0 != CrossEntropy.ignoreIndex }.count
        let cfg = OptimizerConfig(
            defaults: AdamWHyperparameters(lr: 1e-3, weightDecay: 0, beta1: 0.9, beta2: 0.95, eps: 1e-8),
            selection: try ParameterSelection(trainable: nil, frozen: nil), lrConfig: nil)
        let optimizer = try AdamW(parameters: model.parameters.map { ($0.name, $0.value, $0.grad) }, config: cfg)
        let loss = CrossEntropyLoss(vocab: config.vocabSize)
        func run(_ comm: Communicator?) throws -> (parts: LossParts, valid: Int, norm: Double, grads: [Float]) {
            let gm = try CUDAModel(model: model, device: device, precision: .fp32)
            let reducer = try comm.map { try DeviceGradientReducer(mode: .mpi, device: device, control: $0, bucketElements: 4096) }
            let backend = CUDAStepBackend(
                model: gm, dataParallel: comm ?? SingleProcessCommunicator(), gradientReducer: reducer,
                teacherCopy: { _ in throw QATError.internal("no teacher") })
            try backend.zeroGradients(optimizer)
            let v = try backend.globalValidCount(valid)
            let parts = try backend.forwardBackward(batches: [micro], loss: loss, gradScale: 1 / Float(v), optimizer: optimizer)
            let norm = try backend.clipGradients(optimizer, maxNorm: nil)
            var grads: [Float] = []
            for e in try gm.gradientList {
                var h = [Float](repeating: 0, count: e.count)
                try h.withUnsafeMutableBytes { try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, e.ptr, $0.count), "cuMemcpyDtoH") }
                grads += h
            }
            return (parts, v, norm, grads)
        }
        let one = try run(nil), two = try run(DoublingCommunicator())
        add("data parallel: global valid count", Double(abs(two.valid - 2 * one.valid)), 0, "|Δ| tokens")
        add(
            "data parallel: loss sums over ranks", abs(two.parts.total - 2 * one.parts.total) / max(abs(one.parts.total), 1e-30), 1e-9,
            "|Δ|/|x|")
        let m = Double(one.grads.map { abs($0) }.max() ?? 0)
        let e = one.grads.count == two.grads.count && !one.grads.isEmpty ? Self.maxAbsDiff(one.grads, two.grads) / max(m, 1e-30) : .nan
        add("data parallel: reduced gradients = one process", e, 1e-6, "max |Δ|/max")
        add("data parallel: gradient norm", abs(two.norm - one.norm) / max(one.norm, 1e-30), 1e-6, "|Δ|/|x|")
    }

    /// NCCL with one rank: all-reduce and broadcast give back their input bit for bit, the
    /// bucketed reducer leaves an arena as it was, and NCCL_NVLS_ENABLE is 0 after loading.
    private mutating func ncclCheck() throws {
        let library: NCCLLibrary
        do { library = try NCCLLibrary.load() } catch {
            log("skip  NCCL checks: \(error) (set QAT_NCCL_LIB to libnccl.so.2 to run them)")
            return
        }
        log("NCCL \(library.version)")
        let nvls = ProcessInfo.processInfo.environment["NCCL_NVLS_ENABLE"]
        add("NCCL: NCCL_NVLS_ENABLE=0 after loading (was \(nvls ?? "unset"))", nvls == "0" ? 0 : 1, 0, "mismatches")
        let comm = try NCCLCommunicator(device: device, control: SingleProcessCommunicator())
        let x = Self.random(10_007, seed: 75)
        func mismatches(_ b: DeviceBuffer) throws -> Double {
            Double(zip(x, try b.floats(x.count)).filter { $0.0.bitPattern != $0.1.bitPattern }.count)
        }
        let a = try gpu(x)
        try comm.allReduceSum(a.ptr, count: x.count)
        add("NCCL: one-rank all-reduce returns its input", try mismatches(a), 0, "mismatches")
        let b = try gpu(x)
        try comm.broadcast(b.ptr, count: x.count, root: 0)
        add("NCCL: one-rank broadcast returns its input", try mismatches(b), 0, "mismatches")
        let arenaValues = Self.random(Self.arenaCount, seed: 77)
        let arena = try gpu(arenaValues)
        let buckets = GradientBuckets(tensors: Self.arenaTensors, bucketElements: 65_536)
        let reducer = try DeviceGradientReducer(mode: .nccl, device: device, control: SingleProcessCommunicator(), bucketElements: 65_536)
        try reducer.reduce(base: arena.ptr, buckets: buckets)
        add("NCCL: bucketed arena reduction, one rank", try arenaMismatches(arena, arenaValues, buckets, factor: 1), 0, "mismatches")
    }
}

/// A stand-in for rank 0 of two ranks whose peer holds the same data: every sum doubles
/// (exactly, in floating point), maxima and broadcasts leave values as they are.
final class DoublingCommunicator: Communicator {
    var rank: Int { 0 }
    var size: Int { 2 }
    func allReduceSum(_ buf: UnsafeMutablePointer<Float>, count: Int) throws { for i in 0..<count { buf[i] *= 2 } }
    func allReduceSum(_ buf: UnsafeMutablePointer<Double>, count: Int) throws { for i in 0..<count { buf[i] *= 2 } }
    func allReduceMax(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
    func send(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws { throw QATError("stand-in: no send") }
    func recv(_ buf: UnsafeMutablePointer<Float>, count: Int, from peer: Int, tag: Int) throws { throw QATError("stand-in: no recv") }
    func broadcast(_ buf: UnsafeMutablePointer<Float>, count: Int, root: Int) throws {}
    func isend(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws -> SendRequest {
        throw QATError("stand-in: no send")
    }
    func wait(_ request: SendRequest) throws {}
    var traffic: CommTraffic { CommTraffic() }
    func barrier() throws {}
    func split(color: Int, key: Int) throws -> Communicator { self }
    func finalize() {}
    func abort(code: Int32) -> Never { exit(code) }
}
