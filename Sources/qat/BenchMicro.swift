import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant

/// Reference measurements taken in the same process as the model benchmarks, each the
/// spread of `repeats` laps after one warm-up (`Laps`).
enum Microbench {
    static func memcpyGBs(repeats: Int) throws -> Spread {
        let n = 16 << 20  // floats (64 MiB)
        let a = Tensor(shape: [n]), b = Tensor(shape: [n])
        for i in stride(from: 0, to: n, by: 1024) { a[i] = Float(i) }
        let laps = try Laps.run(repeats: repeats) { b.data.update(from: a.data, count: n) }
        return laps.time.map { Double(2 * n * 4) / $0 / 1e9 }  // read + write
    }

    static func nvfp4FakeQuantGBs(repeats: Int) throws -> Spread {
        let rows = 4096, cols = 4096, n = rows * cols
        let x = Tensor(shape: [n], zeroed: false), y = Tensor(shape: [n], zeroed: false)
        var rng = SplitMix64(seed: 3)
        for i in 0..<n { x[i] = rng.nextGaussian() }
        let amax = NVFP4.absMax(x.data, count: n)
        let laps = try Laps.run(repeats: repeats) {
            NVFP4.fakeQuant(x.data, y.data, rows: rows, cols: cols, globalAmax: amax, mode: .export)
        }
        return laps.time.map { Double(2 * n * 4) / $0 / 1e9 }
    }

    static func sgemmGFLOPs(m: Int, n: Int, k: Int, repeats: Int) throws -> Spread {
        let a = Tensor(shape: [m, k]), b = Tensor(shape: [n, k]), c = Tensor(shape: [m, n])
        for i in 0..<a.count { a[i] = Float(i % 7) * 0.01 }
        for i in 0..<b.count { b[i] = Float(i % 5) * 0.01 }
        let laps = try Laps.run(repeats: repeats) { BLAS.gemm(transB: true, m: m, n: n, k: k, a: a.data, b: b.data, c: c.data) }
        return laps.time.map { 2 * Double(m) * Double(n) * Double(k) / $0 / 1e9 }
    }

    /// Matmul FLOPs one QAT step executes (forward, input and weight gradients of every
    /// Linear incl. the lm_head, and the attention score/value products, full T×T as computed).
    static func qatStepFLOPs(_ c: ModelConfig, batch: Int, seqLen: Int) -> Double {
        let N = Double(batch * seqLen), C = Double(c.hiddenSize), I = Double(c.intermediateSize)
        let qd = Double(c.numHeads * c.headDim), kvd = Double(c.numKVHeads * c.headDim)
        let linearParams = C * qd + 2 * C * kvd + qd * C + 3 * C * I
        let perLayerLinear = 6 * N * linearParams
        let attention = Double(batch * c.numHeads) * 12 * Double(seqLen * seqLen) * Double(c.headDim)
        let head = 6 * N * Double(c.vocabSize) * C
        return Double(c.numLayers) * (perLayerLinear + attention) + head
    }

    /// One run of the PyTorch peer: the median seconds per optimizer step over its own `steps`
    /// measured steps (after its warm-up step).
    static func runPeer(
        python: String, script: String, model: String, batch: Int, seq: Int, mode: String, steps: Int,
        threads: Int? = nil
    ) throws -> Double {
        guard FileManager.default.fileExists(atPath: script) else { throw QATError("peer script not found: \(script) (--peer-script)") }
        let p = Process()
        // A bare command name (python3) is looked up in PATH, as a shell would.
        p.executableURL = URL(fileURLWithPath: python.contains("/") ? python : "/usr/bin/env")
        p.arguments =
            (python.contains("/") ? [] : [python])
            + [script, model, "--batch", String(batch), "--seq", String(seq), "--mode", mode, "--steps", String(steps)]
            + (threads.map { ["--threads", String($0)] } ?? [])
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { throw QATError("cannot run the peer with \(python): \(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0, let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }),
            let v = try? JSONValue.parse(String(line))
        else {
            throw QATError("the peer failed (exit \(p.terminationStatus)): \(text.suffix(400))")
        }
        for key in ["median_step_s", "seconds_per_step", "step_s", "median_s"] { if let s = v[key]?.doubleValue { return s } }
        throw QATError("the peer's JSON has no step time: \(line)")
    }
}
