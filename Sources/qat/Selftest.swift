import ArgumentParser
import Foundation
import QATCUDA
import QATCore
import QATModels

/// Opening the GPU a command asked for, with the device named in the log.
enum GPU {
    static func open(_ device: ComputeDevice) throws -> CUDADevice {
        guard case .cuda(let n) = device else { throw QATError("internal: GPU.open(\(device))") }
        let d = try CUDADevice.open(n)
        FileHandle.standardError.write(Data("device: cuda:\(n) \(d.summary)\n".utf8))
        return d
    }
}

struct Selftest: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check the GPU path against the CPU path: every kernel and whole models.",
        discussion: """
            Runs every CUDA kernel and the whole forward of several model shapes (the tiny-llama and \
            tiny-qwen3 fixture configurations, Mistral's sliding window, Qwen2's biases, Llama 3's RoPE \
            scaling; fp32 and bf16; unquantized and NVFP4 + FP8 KV) on the GPU and on the CPU with the \
            same seeded inputs, prints the largest error of each, and exits 1 if any is above its \
            tolerance. The fake quantizers and max calibration must match bit for bit.

            With --compile-only it compiles every kernel with NVRTC for the given architectures and \
            needs no GPU (CI does this with NVRTC from PyPI).

            Example: qat selftest --device cuda
            """)

    @Option(name: .long, help: "cuda or cuda:N.")
    var device: String = "cuda"

    @Option(
        name: .customLong("compile-only"),
        help: "Only compile every kernel for these architectures (comma-separated, e.g. sm_90,sm_100); no GPU needed.")
    var compileOnly: String?

    @Option(name: .long, help: "The libnvrtc.so to use (default: $QAT_NVRTC, else found by name and in the usual CUDA folders).")
    var nvrtc: String?

    @Option(name: .long, help: "Run one group of checks only: distributed (the data-parallel and NCCL checks).")
    var only: String?

    func run() throws {
        try QAT.guarded {
            if let archs = compileOnly {
                let compiler = try KernelCompiler(path: nvrtc)
                var n = 0
                for arch in archs.split(separator: ",").map({ String($0).trimmingCharacters(in: .whitespaces) }) {
                    for file in KernelSources.files {
                        let cubin = try compiler.compile(KernelSources.program(file), name: file.name, arch: arch)
                        let kernels = KernelSources.kernelNames(in: file.source)
                        // Each declared name must be a symbol of the cubin (a name made by a macro would not be found at load).
                        for k in kernels where !cubin.containsSymbol(k) {
                            throw QATError("\(file.name).cu (\(arch)): kernel \(k) is declared but not in the cubin")
                        }
                        print("compiled \(file.name).cu for \(arch): \(cubin.count) bytes, kernels \(kernels.joined(separator: ", "))")
                        n += 1
                    }
                }
                print("kernels: \(n) compiled, 0 failed (NVRTC \(compiler.version.major).\(compiler.version.minor))")
                return
            }
            let d = try GPU.open(try ComputeDevice(parsing: device))
            var test = CUDASelftest(device: d) { print($0) }
            guard only == nil || only == "distributed" else { throw QATError("--only \(only!): the one group is distributed") }
            let ok = only == nil ? try test.run() : try test.runDistributed()
            let failed = test.checks.filter { !$0.passed }.count
            print("selftest: \(test.checks.count - failed) passed, \(failed) failed")
            if !ok { throw ExitCode(1) }
        }
    }
}

/// The GPU a command computes on (nil: the CPU), and the device copies of the host models it
/// has run. Commands ask it for hooks: the calibration forward, evaluation, verification logits.
final class DeviceRunner {
    let gpu: CUDADevice?
    let precision: Precision
    private var copies: [ObjectIdentifier: CUDAModel] = [:]
    /// The dtype the export will store each unquantized parameter in (`Exporter.storedDType`), when the models are
    /// trained for one: in bf16 precision the copies that can train then read the parameters it stores in bf16 as
    /// their bf16 rounding (`CUDAModel.readStoredDType`).
    let storedDType: ((String) -> DType)?

    init(_ device: ComputeDevice, precision: Precision, storedDType: ((String) -> DType)? = nil) throws {
        gpu = device.isCUDA ? try GPU.open(device) : nil
        self.precision = precision
        self.storedDType = storedDType
    }

    /// The device copy of `m` (made once; `inferenceOnly`: see `CUDAModel.init`), nil on the CPU.
    func copy(_ m: CausalLM, inferenceOnly: Bool = false) throws -> CUDAModel? {
        guard let gpu else { return nil }
        if let c = copies[ObjectIdentifier(m)] { return c }
        let c = try CUDAModel(model: m, device: gpu, precision: precision, inferenceOnly: inferenceOnly)
        if !inferenceOnly { try c.readStoredDType(bf16: Set(readAsStored(m).map(\.name))) }
        copies[ObjectIdentifier(m)] = c
        return c
    }

    /// The parameters of `m` that its training copy reads as their bf16 rounding: those of
    /// `CUDAModel.storedDTypeParameters` the export stores in bf16 (none without `storedDType`).
    func readAsStored(_ m: CausalLM) -> [Parameter] {
        guard let storedDType else { return [] }
        return CUDAModel.storedDTypeParameters(m).filter { storedDType($0.name) == .bf16 }
    }

    /// Drops the copy of `m` (its host weights are about to change: verification re-rounds them).
    func forget(_ m: CausalLM) { copies[ObjectIdentifier(m)] = nil }

    /// The calibration forward for `Calibration.run` (nil on the CPU).
    func calibrationForward(_ m: CausalLM, seqLen: Int) throws -> (
        (_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?
    )? {
        try copy(m)?.calibrationForward(seqLen: seqLen)
    }

    /// Where verification computes logits (nil: the CPU).
    var logitsOf: ((CausalLM, [Int32], Int, Int) throws -> Tensor)? {
        gpu == nil ? nil : { [self] m, tokens, b, t in try copy(m)!.logitsTensor(tokens: tokens, batch: b, seqLen: t) }
    }
}

extension Array where Element == UInt8 {
    /// Whether the NUL-terminated string `name` occurs after a NUL or a '.' (as in an ELF string table).
    func containsSymbol(_ name: String) -> Bool {
        let pattern = Array(name.utf8) + [0]
        guard pattern.count <= count else { return false }
        var i = 0
        while i + pattern.count <= count {
            let start = i == 0 || self[i - 1] == 0 || self[i - 1] == UInt8(ascii: ".")
            if start && self[i] == pattern[0] && Array(self[i..<(i + pattern.count)]) == pattern { return true }
            i += 1
        }
        return false
    }
}
