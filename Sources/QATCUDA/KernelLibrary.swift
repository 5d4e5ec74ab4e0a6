import CCUDA
import Foundation
import QATCore

/// The CUDA C kernels (`Kernels/*.cu`, package resources embedded in the binary), compiled by
/// NVRTC at first use for the device's compute capability and cached on disk, keyed by the
/// source hash, the architecture and NVRTC's version. The host's NVRTC is used: PTX or cubin
/// from an NVRTC newer than the driver would not load.
///
/// `QAT_KERNEL_SOURCES=DIR` reads the `.cu` files from DIR instead (a developer's switch: a kernel
/// fix runs with an existing bundle, without rebuilding it); a file missing there fails to compile.
public enum KernelSources {
    /// Prepended to every file: shared helpers (bf16, E4M3 rounding, reductions).
    public static let common = source("common", PackageResources.common_cu)
    /// One file per layer family, forward (and backward) side by side.
    public static let files: [(name: String, source: String)] = [
        ("elementwise", source("elementwise", PackageResources.elementwise_cu)),
        ("rmsnorm", source("rmsnorm", PackageResources.rmsnorm_cu)),
        ("rope", source("rope", PackageResources.rope_cu)),
        ("attention", source("attention", PackageResources.attention_cu)),
        ("quant", source("quant", PackageResources.quant_cu)),
        ("loss", source("loss", PackageResources.loss_cu)),
        ("topk", source("topk", PackageResources.topk_cu)),
        ("optim", source("optim", PackageResources.optim_cu)),
        ("lora", source("lora", PackageResources.lora_cu)),
    ]

    /// The directory of `QAT_KERNEL_SOURCES`, if set.
    public static let overrideDirectory: String? = {
        guard let d = ProcessInfo.processInfo.environment["QAT_KERNEL_SOURCES"], !d.isEmpty else { return nil }
        return d
    }()

    private static func source(_ name: String, _ embedded: [UInt8]) -> String {
        guard let dir = overrideDirectory else { return String(decoding: embedded, as: UTF8.self) }
        guard let data = FileManager.default.contents(atPath: "\(dir)/\(name).cu") else {
            // NVRTC then fails on this file with the reason.
            return "#error \"QAT_KERNEL_SOURCES=\(dir) has no \(name).cu\"\n"
        }
        return String(decoding: data, as: UTF8.self)
    }

    /// The kernels a file defines (`extern "C" __global__ void NAME(`).
    public static func kernelNames(in source: String) -> [String] {
        var names: [String] = []
        let marker = "extern \"C\" __global__ void "
        var rest = Substring(source)
        while let r = rest.range(of: marker) {
            var after = rest[r.upperBound...]
            if after.hasPrefix("__launch_bounds__("), let close = after.firstIndex(of: ")") {
                after = after[after.index(after: close)...].drop { $0 == " " }
            }
            names.append(String(after.prefix { $0.isLetter || $0.isNumber || $0 == "_" }))
            rest = after
        }
        return names
    }

    /// The full text NVRTC compiles for a file.
    public static func program(_ file: (name: String, source: String)) -> String {
        common + "\n#line 1 \"\(file.name).cu\"\n" + file.source
    }
}

/// NVRTC, opened at run time.
public final class KernelCompiler: @unchecked Sendable {
    let api: QATNvrtcAPI
    public let version: (major: Int, minor: Int)

    /// `path`: a libnvrtc.so to use (default: $QAT_NVRTC, else libnvrtc.so.13/.12 by name and in
    /// the usual CUDA folders).
    public init(path: String? = nil) throws {
        var api = QATNvrtcAPI()
        var err = [CChar](repeating: 0, count: 512)
        let p = path ?? ProcessInfo.processInfo.environment["QAT_NVRTC"]
        if qat_nvrtc_load(&api, p, &err, err.count) != 0 { throw QATError(String(cString: err)) }
        self.api = api
        var ma: Int32 = 0, mi: Int32 = 0
        _ = api.nvrtcVersion(&ma, &mi)
        version = (Int(ma), Int(mi))
    }

    /// Compiles one program to a cubin for `arch` (e.g. "sm_90"). Throws with NVRTC's log.
    public func compile(_ source: String, name: String, arch: String) throws -> [UInt8] {
        var prog: nvrtcProgram? = nil
        var r = api.nvrtcCreateProgram(&prog, source, name + ".cu", 0, nil, nil)
        guard r == 0 else { throw QATError("NVRTC: cannot create program \(name) (nvrtc error \(r))") }
        defer { _ = api.nvrtcDestroyProgram(&prog) }
        // IEEE division and square root (the defaults), no FMA contraction: the bit-exact paths
        // (fake quant) must round as the CPU does.
        let options = ["--gpu-architecture=\(arch)", "--fmad=false", "--std=c++17", "-default-device"]
        let cOpts = options.map { strdup($0) }
        defer { for p in cOpts { Foundation.free(p) } }
        r = cOpts.withUnsafeBufferPointer { buf in
            buf.baseAddress!.withMemoryRebound(to: UnsafePointer<CChar>?.self, capacity: buf.count) {
                api.nvrtcCompileProgram(prog, Int32(options.count), $0)
            }
        }
        var logSize = 0
        _ = api.nvrtcGetProgramLogSize(prog, &logSize)
        var log = [CChar](repeating: 0, count: max(logSize, 1))
        _ = api.nvrtcGetProgramLog(prog, &log)
        guard r == 0 else {
            throw QATError(
                "NVRTC: \(name).cu does not compile for \(arch): \(String(cString: log).trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        var size = 0
        guard api.nvrtcGetCUBINSize(prog, &size) == 0, size > 0 else { throw QATError("NVRTC: no cubin for \(name).cu (\(arch))") }
        var cubin = [UInt8](repeating: 0, count: size)
        _ = cubin.withUnsafeMutableBufferPointer { b in
            b.baseAddress!.withMemoryRebound(to: CChar.self, capacity: size) { api.nvrtcGetCUBIN(prog, $0) }
        }
        return cubin
    }

    /// Compiled through the on-disk cache ($QAT_KERNEL_CACHE, else ~/.cache/qat/kernels).
    public func compileCached(_ file: (name: String, source: String), arch: String) throws -> [UInt8] {
        let text = KernelSources.program(file)
        let key = String(format: "%016llx", fnv1a(text + "|\(arch)|nvrtc \(version.major).\(version.minor)"))
        let dir = KernelCompiler.cacheDirectory
        let path = "\(dir)/\(file.name)-\(arch)-\(key).cubin"
        if let d = FileManager.default.contents(atPath: path), !d.isEmpty { return [UInt8](d) }
        let cubin = try compile(text, name: file.name, arch: arch)
        // The cache is an optimisation: a read-only home only costs a recompile next time.
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let tmp = path + ".tmp\(getpid())"
        if FileManager.default.createFile(atPath: tmp, contents: Data(cubin)) { _ = rename(tmp, path) }
        return cubin
    }

    static var cacheDirectory: String {
        let env = ProcessInfo.processInfo.environment
        if let d = env["QAT_KERNEL_CACHE"], !d.isEmpty { return d }
        if let x = env["XDG_CACHE_HOME"], !x.isEmpty { return x + "/qat/kernels" }
        return (env["HOME"] ?? "/tmp") + "/.cache/qat/kernels"
    }

    private func fnv1a(_ s: String) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }
}

/// A kernel argument, passed by value.
public enum KernelArg {
    case ptr(CUdeviceptr)
    case buf(DeviceBuffer)
    case i32(Int)
    case i64(Int)
    case f32(Float)
    case f64(Double)
}

/// The device's loaded kernels, by name.
final class KernelLibrary {
    unowned let device: CUDADevice
    private var functions: [String: CUfunction] = [:]
    private var loaded = false
    /// Synchronise after every launch (QAT_CUDA_SYNC=1, and selftest): errors surface at the kernel.
    var syncEachLaunch = ProcessInfo.processInfo.environment["QAT_CUDA_SYNC"] == "1"

    init(device: CUDADevice) { self.device = device }

    private func load() throws {
        let compiler = try KernelCompiler()
        let arch = "sm_\(device.computeCapability.major)\(device.computeCapability.minor)"
        for file in KernelSources.files {
            let cubin = try compiler.compileCached(file, arch: arch)
            var module: CUmodule? = nil
            try cubin.withUnsafeBytes { try device.check(device.api.cuModuleLoadData(&module, $0.baseAddress!), "loading \(file.name).cu") }
            for k in KernelSources.kernelNames(in: file.source) {
                var f: CUfunction? = nil
                try device.check(device.api.cuModuleGetFunction(&f, module, k), "cuModuleGetFunction(\(k))")
                functions[k] = f
            }
        }
        loaded = true
    }

    func function(_ name: String) throws -> CUfunction {
        if !loaded { try load() }
        guard let f = functions[name] else { throw QATError("internal: no CUDA kernel named \(name)") }
        return f
    }

    /// Raises a kernel's dynamic shared memory limit (needed above 48 KiB).
    func allowSharedMemory(_ name: String, bytes: Int) throws {
        try device.check(
            device.api.cuFuncSetAttribute(try function(name), Int32(QAT_CU_FUNC_MAX_DYNAMIC_SHARED), Int32(bytes)),
            "cuFuncSetAttribute(\(name), \(bytes) B shared)")
    }

    func launch(_ name: String, grid: (Int, Int, Int), block: (Int, Int, Int), shared: Int = 0, _ args: [KernelArg]) throws {
        let f = try function(name)
        let slots = UnsafeMutableRawPointer.allocate(byteCount: max(args.count, 1) * 8, alignment: 8)
        defer { slots.deallocate() }
        var ptrs = [UnsafeMutableRawPointer?](repeating: nil, count: args.count)
        for (i, a) in args.enumerated() {
            let p = slots + i * 8
            switch a {
            case .ptr(let v): p.storeBytes(of: v, as: CUdeviceptr.self)
            case .buf(let b): p.storeBytes(of: b.ptr, as: CUdeviceptr.self)
            case .i32(let v): p.storeBytes(of: Int32(v), as: Int32.self)
            case .i64(let v): p.storeBytes(of: Int64(v), as: Int64.self)
            case .f32(let v): p.storeBytes(of: v, as: Float.self)
            case .f64(let v): p.storeBytes(of: v, as: Double.self)
            }
            ptrs[i] = p
        }
        try device.timed(name) {
            let r = ptrs.withUnsafeMutableBufferPointer { pb in
                var api = device.api
                return qat_cuda_launch(
                    &api, f, UInt32(grid.0), UInt32(grid.1), UInt32(grid.2), UInt32(block.0), UInt32(block.1),
                    UInt32(block.2), UInt32(shared), pb.baseAddress)
            }
            try device.check(r, "launching \(name)")
        }
        if syncEachLaunch { try device.check(device.api.cuCtxSynchronize(), "kernel \(name)") }
    }

    /// A 1-D grid-stride launch over `n` items.
    func launch1D(_ name: String, _ n: Int, _ args: [KernelArg]) throws {
        let blocks = max(1, min((n + 255) / 256, device.multiprocessors * 16))
        try launch(name, grid: (blocks, 1, 1), block: (256, 1, 1), args)
    }
}
