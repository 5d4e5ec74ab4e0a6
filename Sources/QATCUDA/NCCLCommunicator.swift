import CCUDA
import Foundation
import QATCore
import QATDistributed

/// NCCL opened with dlopen (`qat_nccl_load`: no NVIDIA header or library at build time).
/// Loading sets NCCL_NVLS_ENABLE=0 first (NVLink multicast off, for this process and its children).
public final class NCCLLibrary: @unchecked Sendable {
    let api: QATNcclAPI
    /// NCCL's version as major.minor.patch.
    public let version: String

    nonisolated(unsafe) private static var loaded: NCCLLibrary?

    /// Opens NCCL once per process; a missing library is a one-line `QATError` naming it.
    public static func load() throws -> NCCLLibrary {
        if let l = loaded { return l }
        var api = QATNcclAPI()
        var err = [CChar](repeating: 0, count: 512)
        if qat_nccl_load(&api, nil, &err, err.count) != 0 { throw QATError(String(cString: err)) }
        var v: Int32 = 0
        _ = api.ncclGetVersion(&v)
        let l = NCCLLibrary(api: api, version: NCCLLibrary.versionString(Int(v)))
        loaded = l
        return l
    }

    private init(api: QATNcclAPI, version: String) { self.api = api; self.version = version }

    /// NCCL's version code (major·10000 + minor·100 + patch since 2.9, major·1000 + … before).
    public static func versionString(_ code: Int) -> String {
        if code >= 10000 { return "\(code / 10000).\(code / 100 % 100).\(code % 100)" }
        return "\(code / 1000).\(code / 100 % 10).\(code % 100)"
    }

    func check(_ r: ncclResult_t, _ what: @autoclosure () -> String) throws {
        guard r != 0 else { return }
        let why = api.ncclGetErrorString(r).map { String(cString: $0) } ?? "error"
        throw QATError("NCCL: \(what()) failed: \(why) (\(r))")
    }
}

/// An NCCL communicator over the ranks of `control` (one GPU each), bootstrapped as NCCL
/// prescribes: rank 0 makes the unique id, `control` (MPI) broadcasts it, every rank joins with
/// `ncclCommInitRank` on its current GPU. Collectives are fp32 and run on the default stream,
/// where the model's kernels run, so they are ordered after the backward that wrote the
/// gradients and before anything that reads them.
public final class NCCLCommunicator {
    public let library: NCCLLibrary
    public let device: CUDADevice
    public let rank: Int
    public let size: Int
    private var comm: ncclComm_t?

    public init(device: CUDADevice, control: Communicator) throws {
        library = try NCCLLibrary.load()
        self.device = device
        rank = control.rank; size = control.size
        var id = [UInt8](repeating: 0, count: Int(QAT_NCCL_UNIQUE_ID_BYTES))
        var failure: Error? = nil
        if control.isRoot {
            let lib = library
            let r = id.withUnsafeMutableBytes { bytes in withUnsafePointer(to: lib.api) { qat_nccl_unique_id_bytes($0, bytes.baseAddress!) }
            }
            do { try lib.check(r, "ncclGetUniqueId") } catch { failure = error }
        }
        var failed: [Double] = [failure == nil ? 0 : 1]
        try control.allReduceSum(&failed)  // every rank stops if rank 0 could not make the id
        if let failure { throw failure }
        guard failed[0] == 0 else { throw QATError("NCCL: ncclGetUniqueId failed on rank 0") }
        try control.broadcast(bytes: &id, root: 0)
        try device.check(device.api.cuCtxSetCurrent(device.context), "cuCtxSetCurrent")  // NCCL takes the current GPU
        var c: ncclComm_t? = nil
        let r = id.withUnsafeBytes { idBytes in
            withUnsafePointer(to: library.api) { api in qat_nccl_comm_init_rank(api, &c, Int32(size), idBytes.baseAddress!, Int32(rank)) }
        }
        try library.check(r, "ncclCommInitRank (rank \(rank) of \(size) on cuda:\(device.ordinal))")
        comm = c
    }

    deinit { if let c = comm { _ = library.api.ncclCommDestroy(c) } }

    /// In-place sum of `count` floats at `buffer` over the ranks (enqueued on the default stream).
    public func allReduceSum(_ buffer: CUdeviceptr, count: Int) throws {
        guard count > 0 else { return }
        let p = UnsafeMutableRawPointer(bitPattern: UInt(buffer))
        try library.check(
            library.api.ncclAllReduce(p, p, count, Int32(QAT_NCCL_FLOAT32), Int32(QAT_NCCL_SUM), comm, nil), "ncclAllReduce(\(count))")
    }

    /// In-place broadcast of `count` floats at `buffer` from `root`.
    public func broadcast(_ buffer: CUdeviceptr, count: Int, root: Int) throws {
        guard count > 0 else { return }
        let p = UnsafeMutableRawPointer(bitPattern: UInt(buffer))
        try library.check(
            library.api.ncclBroadcast(p, p, count, Int32(QAT_NCCL_FLOAT32), Int32(root), comm, nil), "ncclBroadcast(\(count))")
    }
}

extension CUDADevice {
    /// How many GPUs the driver shows this process (CUDA_VISIBLE_DEVICES applied).
    public static func deviceCount() throws -> Int {
        var api = QATCudaAPI()
        var err = [CChar](repeating: 0, count: 512)
        if qat_cuda_load(&api, &err, err.count) != 0 { throw QATError(String(cString: err)) }
        let r = api.cuInit(0)
        if r == 100 { return 0 }
        var count: Int32 = 0
        guard r == 0, api.cuDeviceGetCount(&count) == 0 else {
            throw QATError("CUDA: cuInit/cuDeviceGetCount failed: \(describe(api, r))")
        }
        return Int(count)
    }
}

extension GPUDataParallel {
    /// NCCL_NVLS_ENABLE=0 in this process's environment, whatever it was (child processes
    /// inherit it): NVLink multicast can put a shared host's GPUs out of service.
    public static func disableNVLinkMulticast() { qat_nccl_disable_nvls() }
}
