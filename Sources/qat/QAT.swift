import ArgumentParser
import Foundation
import QATCore

@main
struct QAT: ParsableCommand {
    /// Corrects OpenBLAS's kernel choice on CPUs it does not recognise (BLASCore), then runs the command.
    static func main() {
        BLASCore.ensureKernels()
        main(nil)
    }

    static let configuration = CommandConfiguration(
        commandName: "qat",
        abstract: "Quantization-aware training and NVFP4 export of Hugging Face causal LMs, on a CPU or an NVIDIA GPU.",
        discussion: """
            Start with `qat apply recipes/default.yaml`: QAT of the embedded fortune-lm to NVFP4 \
            (W4A4, FP8 KV cache), then a ModelOpt-format export that is read back and verified.

            Then: `qat eval` a model, a PTQ recipe or an export; `qat generate` text with it; `qat convert` an export \
            between the ModelOpt and compressed-tensors layouts; `qat inspect` a checkpoint; \
            `qat recipe show` a recipe with every default filled in.
            """,
        subcommands: [
            Apply.self, Eval.self, Export.self, Convert.self, Generate.self, Verify.self, Inspect.self, RecipeCommand.self,
            TeacherLogprobs.self, Bench.self, Selftest.self,
        ])

    /// Runs a command body, turning project errors into one clear line on stderr and exit
    /// code 1 instead of a stack trace.
    static func guarded(_ body: () throws -> Void) throws {
        do {
            try body()
        } catch let e as QATError {
            let bug = e.kind == .internal ? " (an internal error of qat: please report it)" : ""
            FileHandle.standardError.write(Data("error: \(e.message)\(bug)\n".utf8))
            throw ExitCode(1)
        }
    }
}

/// Options every model-reading command shares.
struct ModelOptions: ParsableArguments {
    @Option(name: .long, help: "Hugging Face model directory (config.json + *.safetensors).")
    var model: String = "models/fortune-lm"

    @Option(name: .long, help: "Worker threads for OpenBLAS and the kernels (default: all cores).")
    var threads: Int?

    @Option(name: .long, help: "Where to compute: cpu, cuda or cuda:N (NVIDIA GPU; CUDA is loaded at run time).")
    var device: String = "cpu"

    @Option(name: .long, help: "GPU matrix products: fp32 (no TF32, comparable with the CPU) or bf16 (fp32 accumulation).")
    var precision: String = "fp32"

    /// The parsed --device and --precision.
    func compute() throws -> (device: ComputeDevice, precision: Precision) {
        (try ComputeDevice(parsing: device), try Precision(parsing: precision))
    }

    func applyThreads() {
        if let t = threads, t > 0 {
            setenv("QAT_THREADS", String(t), 1)
            BLAS.setThreads(t)
        }
    }
}

func printJSON(_ object: [(String, Any)]) {
    let body = object.map { key, value -> String in
        let v: String
        switch value {
        case let d as Double: v = d.isFinite ? String(format: "%.6f", d) : "null"
        case let i as Int: v = String(i)
        case let s as String: v = "\"\(s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\""))\""
        default: v = "\(value)"
        }
        return "\"\(key)\": \(v)"
    }
    print("{" + body.joined(separator: ", ") + "}")
}
