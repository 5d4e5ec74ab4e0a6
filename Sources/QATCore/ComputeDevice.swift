import Foundation

/// Where a run computes: the CPU (the reference path) or an NVIDIA GPU through the CUDA
/// backend (`QATCUDA`). Parsed from the recipe's `device:` key or a command's `--device`.
public enum ComputeDevice: Equatable, Sendable, CustomStringConvertible {
    case cpu
    /// CUDA device ordinal.
    case cuda(Int)

    /// "cpu", "cuda" (device 0) or "cuda:N".
    public init(parsing s: String) throws {
        let t = s.trimmingCharacters(in: .whitespaces).lowercased()
        if t == "cpu" { self = .cpu; return }
        if t == "cuda" || t == "gpu" { self = .cuda(0); return }
        if t.hasPrefix("cuda:"), let n = Int(t.dropFirst(5)), n >= 0 { self = .cuda(n); return }
        throw QATError("device \"\(s)\" is not one of cpu, cuda, cuda:N")
    }

    public var description: String {
        switch self {
        case .cpu: return "cpu"
        case .cuda(let n): return n == 0 ? "cuda" : "cuda:\(n)"
        }
    }

    public var isCUDA: Bool { if case .cuda = self { return true }; return false }
}

/// Arithmetic of the GPU path's matrix products. `fp32`: fp32 inputs and accumulation, no
/// TF32 (for exact comparison with the CPU). `bf16`: bf16 inputs with fp32 accumulation on the
/// tensor cores; norms, softmax, RoPE, quantizers and losses stay fp32. The CPU path is fp32.
public enum Precision: String, Sendable, CaseIterable {
    case fp32, bf16

    public init(parsing s: String) throws {
        guard let p = Precision(rawValue: s.trimmingCharacters(in: .whitespaces).lowercased()) else {
            throw QATError("precision \"\(s)\" is not one of fp32, bf16")
        }
        self = p
    }
}
