import Foundation
import QATCore
import QATIO

/// Parser and conversion speeds of the safetensors reader (measured here, asserted nowhere:
/// the unit tests check what these paths return).
enum IOBench {
    /// Seconds to open a safetensors file whose header lists 20,000 tensors (best of 3).
    static func safetensorsHeaderSeconds() throws -> Double {
        var w = SafeTensorsWriter()
        for i in 0..<20_000 { try w.add(name: "model.layers.\(i / 10).t\(i % 10).weight", dtype: .u8, shape: [1], bytes: [UInt8(i & 255)]) }
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("qat-bench-header-\(getpid()).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try w.write(to: path)
        var best = Double.infinity
        for _ in 0..<3 {
            let start = Date()
            let f = try SafeTensorsFile(path: path)
            best = min(best, Date().timeIntervalSince(start))
            guard f.tensors.count == 20_000 else { throw QATError("bench: header read back \(f.tensors.count) of 20000 tensors") }
        }
        return best
    }

    /// GB/s (of f32 output) of reading a 4M-element bf16 tensor as floats (best of 3).
    static func bf16DecodeGBs() throws -> Double {
        let n = 4 << 20
        var w = SafeTensorsWriter()
        try w.add(name: "x", floats: [Float](repeating: 0.5, count: n), shape: [n], as: .bf16)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("qat-bench-bf16-\(getpid()).safetensors").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try w.write(to: path)
        let f = try SafeTensorsFile(path: path)
        var best = Double.infinity
        for _ in 0..<3 {
            let start = Date()
            let t = try f.floats("x")
            best = min(best, Date().timeIntervalSince(start))
            guard t.count == n else { throw QATError("bench: bf16 tensor read back \(t.count) of \(n) values") }
        }
        return Double(4 * n) / best / 1e9
    }
}
