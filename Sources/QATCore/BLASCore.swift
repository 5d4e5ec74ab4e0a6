import CBLAS
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// OpenBLAS's choice of kernels for this CPU, corrected where its detection fails.
///
/// OpenBLAS (DYNAMIC_ARCH) picks its kernels once, when the library loads, from the CPU model
/// it knows. A CPU newer than the library (measured: OpenBLAS 0.3.26 on an Emerald Rapids Xeon
/// under KVM, family 6 model 207) falls back to "Prescott", the SSE3 kernels: sgemm at 128
/// GFLOP/s on 16 cores instead of 551 with the Cooperlake (AVX-512 + BF16) kernels, and a QAT
/// step 3× slower. `ensureKernels` runs first thing in `qat`: when OpenBLAS chose such a
/// fallback while the CPU has AVX2/AVX-512 and the user did not set OPENBLAS_CORETYPE, it sets
/// OPENBLAS_CORETYPE to the best kernel family the CPU's flags allow and re-executes the process
/// (the variable is read only at load time). QAT_KEEP_BLAS_CORE=1 turns this off.
public enum BLASCore {
    /// Kernel families OpenBLAS falls back to for CPUs it does not recognise (no AVX).
    static let fallbacks: Set<String> = [
        "prescott", "nehalem", "core2", "penryn", "dunnington", "katmai", "coppermine",
        "northwood", "banias", "atom", "unknown", "generic",
    ]

    /// The kernel family OpenBLAS uses (openblas_get_corename).
    public static var coreName: String { openblas_get_corename().map { String(cString: $0) } ?? "?" }

    /// The best OpenBLAS kernel family for a CPU with these /proc/cpuinfo flags, nil when none
    /// beats the generic ones.
    public static func bestCore(flags: Set<String>) -> String? {
        if flags.isSuperset(of: ["avx512f", "avx512bw", "avx512vl", "avx512dq"]) {
            return flags.contains("avx512_bf16") ? "Cooperlake" : "SkylakeX"
        }
        if flags.isSuperset(of: ["avx2", "fma"]) { return "Haswell" }
        return nil
    }

    /// The flags of the first CPU in /proc/cpuinfo (empty where there is none).
    public static func cpuFlags() -> Set<String> {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }),
            let colon = line.firstIndex(of: ":")
        else { return [] }
        return Set(line[line.index(after: colon)...].split(separator: " ").map(String.init))
    }

    /// Re-executes the process with OPENBLAS_CORETYPE set when OpenBLAS fell back to generic
    /// kernels on a CPU with AVX2/AVX-512 (see the type's doc). Returns when nothing is to be done.
    public static func ensureKernels() {
        let env = ProcessInfo.processInfo.environment
        guard (env["OPENBLAS_CORETYPE"] ?? "").isEmpty, env["QAT_KEEP_BLAS_CORE"] != "1",  // (empty: "detect", as OpenBLAS reads it)
            fallbacks.contains(coreName.lowercased()), let best = bestCore(flags: cpuFlags())
        else { return }
        setenv("OPENBLAS_CORETYPE", best, 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // exec failed (no /proc): carry on with the kernels OpenBLAS chose.
        unsetenv("OPENBLAS_CORETYPE")
    }
}
