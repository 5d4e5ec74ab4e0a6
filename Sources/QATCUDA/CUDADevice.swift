import CCUDA
import Foundation
import QATCore

/// One NVIDIA GPU, opened through the driver API loaded at run time (`CCUDA`): its primary
/// context, a cuBLAS handle and the compiled kernels. Everything runs on the default stream, so
/// work is ordered and a download waits for what came before it.
///
/// Device memory is tracked here (`bytesInUse`, `peakBytes`): the figures `gpu_peak_mb` and the
/// benchmarks report are this allocator's high-water mark, reset per configuration.
public final class CUDADevice: @unchecked Sendable {
    let api: QATCudaAPI
    let context: CUcontext?
    let blas: cublasHandle_t?
    public let ordinal: Int
    public let name: String
    public let computeCapability: (major: Int, minor: Int)
    public let multiprocessors: Int
    public let totalMemory: Int
    public let driverVersion: Int
    public private(set) var bytesInUse = 0
    public private(set) var peakBytes = 0
    lazy var kernels = KernelLibrary(device: self)
    /// `qat bench --profile`'s per-launch device times (`startProfile` … `profileReport`); nil: off.
    var profiler: DeviceProfiler?

    /// Runs `body` (one launch), timing it when profiling under `name` (made only then);
    /// `flops`: the launch's floating-point operations (products), for the report's TFLOP/s.
    func timed(_ name: @autoclosure () -> String, flops: Double = 0, _ body: () throws -> Void) throws {
        guard let p = profiler else { return try body() }
        try p.time(name(), flops: flops, sync: synchronize, body)
    }

    /// Times every launch from here until `profileReport`.
    public func startProfile() { profiler = DeviceProfiler(api: api) }

    /// Ends the profile: a headline naming `what` and its `limit` most expensive operations, one line each.
    public func profileReport(_ what: String, limit: Int) throws -> [String] {
        guard let p = profiler else { return [] }
        profiler = nil
        try p.finish()
        return p.report(what, limit: limit)
    }

    nonisolated(unsafe) private static var opened: [Int: CUDADevice] = [:]

    /// Opens device `ordinal` (once per process). Throws a one-line `QATError` when the driver,
    /// cuBLAS or a GPU is missing.
    public static func open(_ ordinal: Int = 0) throws -> CUDADevice {
        if let d = opened[ordinal] { return d }
        let d = try CUDADevice(ordinal: ordinal)
        opened[ordinal] = d
        return d
    }

    private init(ordinal: Int) throws {
        var api = QATCudaAPI()
        var err = [CChar](repeating: 0, count: 512)
        if qat_cuda_load(&api, &err, err.count) != 0 { throw QATError(String(cString: err)) }
        self.api = api
        func chk(_ r: CUresult, _ what: String) throws {
            if r != 0 { throw QATError("CUDA: \(what) failed: \(CUDADevice.describe(api, r))") }
        }
        let r = api.cuInit(0)
        if r == 100 { throw QATError("no CUDA GPU found (cuInit: no device); run on a machine with an NVIDIA GPU or use --device cpu") }
        try chk(r, "cuInit")
        var count: Int32 = 0
        try chk(api.cuDeviceGetCount(&count), "cuDeviceGetCount")
        guard count > 0 else { throw QATError("no CUDA GPU found; run on a machine with an NVIDIA GPU or use --device cpu") }
        guard ordinal < Int(count) else {
            throw QATError("device cuda:\(ordinal) does not exist: this machine has \(count) GPU(s) (cuda:0…cuda:\(count - 1))")
        }
        var dev: CUdevice = 0
        try chk(api.cuDeviceGet(&dev, Int32(ordinal)), "cuDeviceGet")
        var nameBuf = [CChar](repeating: 0, count: 256)
        try chk(api.cuDeviceGetName(&nameBuf, 256, dev), "cuDeviceGetName")
        func attr(_ a: Int32) throws -> Int {
            var v: Int32 = 0
            try chk(api.cuDeviceGetAttribute(&v, a, dev), "cuDeviceGetAttribute")
            return Int(v)
        }
        var total = 0
        try chk(api.cuDeviceTotalMem(&total, dev), "cuDeviceTotalMem")
        var ctx: CUcontext? = nil
        try chk(api.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain")
        try chk(api.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        var drv: Int32 = 0
        _ = api.cuDriverGetVersion(&drv)
        var handle: cublasHandle_t? = nil
        let s = api.cublasCreate(&handle)
        if s != 0 { throw QATError("cuBLAS: cublasCreate failed (status \(s))") }
        self.ordinal = ordinal
        name = String(cString: nameBuf)
        computeCapability = (try attr(Int32(QAT_CU_ATTR_CC_MAJOR)), try attr(Int32(QAT_CU_ATTR_CC_MINOR)))
        multiprocessors = try attr(Int32(QAT_CU_ATTR_MULTIPROCESSOR_COUNT))
        totalMemory = total
        driverVersion = Int(drv)
        context = ctx
        blas = handle
    }

    static func describe(_ api: QATCudaAPI, _ r: CUresult) -> String {
        var s: UnsafePointer<CChar>? = nil
        _ = api.cuGetErrorString(r, &s)
        return s.map { "\(String(cString: $0)) (\(r))" } ?? "error \(r)"
    }

    func check(_ r: CUresult, _ what: @autoclosure () -> String) throws {
        if r != 0 { throw QATError("CUDA: \(what()) failed: \(CUDADevice.describe(api, r))") }
    }

    public var summary: String {
        "\(name) (sm_\(computeCapability.major)\(computeCapability.minor), \(multiprocessors) SMs, "
            + "\(totalMemory >> 20) MiB, driver \(driverVersion / 1000).\(driverVersion % 1000 / 10))"
    }

    // MARK: Memory

    func allocate(_ bytes: Int) throws -> CUdeviceptr {
        var p: CUdeviceptr = 0
        let r = api.cuMemAlloc(&p, max(bytes, 16))
        if r == 2 {
            throw QATError(
                "out of GPU memory allocating \(bytes >> 20) MiB (\(bytesInUse >> 20) MiB in use by qat "
                    + "on \(name)); lower the batch size or sequence length")
        }
        try check(r, "cuMemAlloc(\(bytes))")
        bytesInUse += bytes
        peakBytes = max(peakBytes, bytesInUse)
        return p
    }

    func free(_ p: CUdeviceptr, bytes: Int) {
        _ = api.cuMemFree(p)
        bytesInUse -= bytes
    }

    /// Starts a new high-water mark at the current use (per benchmark configuration).
    public func resetPeak() { peakBytes = bytesInUse }

    /// Free and total device memory as the driver sees it (all processes).
    public func memoryInfo() -> (free: Int, total: Int) {
        var f = 0, t = 0
        _ = api.cuMemGetInfo(&f, &t)
        return (f, t)
    }

    public func synchronize() throws { try check(api.cuCtxSynchronize(), "cuCtxSynchronize") }
}

/// A device allocation, freed when the last reference goes; or a view of part of one (which keeps it alive).
public final class DeviceBuffer: @unchecked Sendable {
    public let device: CUDADevice
    public let ptr: CUdeviceptr
    public let bytes: Int
    /// The allocation a view is part of (nil: this buffer owns its memory).
    private let owner: DeviceBuffer?

    public init(_ device: CUDADevice, bytes: Int) throws {
        self.device = device
        self.bytes = bytes
        ptr = try device.allocate(bytes)
        owner = nil
    }

    /// Bytes offset ..< offset + bytes of `parent`.
    public init(viewOf parent: DeviceBuffer, offset: Int, bytes: Int) {
        precondition(offset >= 0 && bytes >= 0 && offset + bytes <= parent.bytes, "a view past the end of a device buffer")
        device = parent.device
        ptr = parent.ptr + CUdeviceptr(offset)
        self.bytes = bytes
        owner = parent
    }

    /// fp32 values of `count` floats.
    public convenience init(_ device: CUDADevice, floats count: Int) throws {
        try self.init(device, bytes: count * 4)
    }

    /// A copy of host memory.
    public convenience init(_ device: CUDADevice, copying host: UnsafeRawPointer, bytes: Int) throws {
        try self.init(device, bytes: bytes)
        try upload(host, bytes: bytes)
    }

    public convenience init(_ device: CUDADevice, floats: [Float]) throws {
        try self.init(device, bytes: floats.count * 4)
        try floats.withUnsafeBytes { try upload($0.baseAddress!, bytes: $0.count) }
    }

    public convenience init(_ device: CUDADevice, ints: [Int32]) throws {
        try self.init(device, bytes: ints.count * 4)
        try ints.withUnsafeBytes { try upload($0.baseAddress!, bytes: $0.count) }
    }

    deinit { if owner == nil { device.free(ptr, bytes: bytes) } }

    public func upload(_ host: UnsafeRawPointer, bytes n: Int, offset: Int = 0) throws {
        precondition(offset + n <= bytes, "upload past the end of a device buffer")
        if n == 0 { return }
        try device.check(device.api.cuMemcpyHtoD(ptr + CUdeviceptr(offset), host, n), "cuMemcpyHtoD(\(n))")
    }

    public func download(_ host: UnsafeMutableRawPointer, bytes n: Int, offset: Int = 0) throws {
        precondition(offset + n <= bytes, "download past the end of a device buffer")
        if n == 0 { return }
        try device.check(device.api.cuMemcpyDtoH(host, ptr + CUdeviceptr(offset), n), "cuMemcpyDtoH(\(n))")
    }

    public func floats(_ count: Int, offset: Int = 0) throws -> [Float] {
        var out = [Float](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try download($0.baseAddress!, bytes: count * 4, offset: offset * 4) }
        return out
    }

    public func zero() throws { try device.check(device.api.cuMemsetD8(ptr, 0, bytes), "cuMemsetD8") }
}
