import ArgumentParser
import Foundation
import QATCore
import QATCUDA

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

    @Option(name: .customLong("compile-only"), help: "Only compile every kernel for these architectures (comma-separated, e.g. sm_90,sm_100); no GPU needed.")
    var compileOnly: String?

    @Option(name: .long, help: "The libnvrtc.so to use (default: $QAT_NVRTC, else found by name and in the usual CUDA folders).")
    var nvrtc: String?

    func run() throws {
        try QAT.guarded {
            if let archs = compileOnly {
                let compiler = try KernelCompiler(path: nvrtc)
                var n = 0
                for arch in archs.split(separator: ",").map({ String($0).trimmingCharacters(in: .whitespaces) }) {
                    for file in KernelSources.files {
                        let cubin = try compiler.compile(KernelSources.program(file), name: file.name, arch: arch)
                        let kernels = KernelSources.kernelNames(in: file.source)
                        print("compiled \(file.name).cu for \(arch): \(cubin.count) bytes, kernels \(kernels.joined(separator: ", "))")
                        n += 1
                    }
                }
                print("kernels: \(n) compiled, 0 failed (NVRTC \(compiler.version.major).\(compiler.version.minor))")
                return
            }
            let d = try GPU.open(try ComputeDevice(parsing: device))
            var test = CUDASelftest(device: d) { print($0) }
            let ok = try test.run()
            let failed = test.checks.filter { !$0.passed }.count
            print("selftest: \(test.checks.count - failed) passed, \(failed) failed")
            if !ok { throw ExitCode(1) }
        }
    }
}
