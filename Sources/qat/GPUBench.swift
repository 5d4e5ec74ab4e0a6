import Foundation
import QATCore
import QATCUDA
import QATModels
import QATQuant

/// `qat bench --device cuda`: forward (evaluation) throughput of model shapes on the GPU, bf16
/// and fp32, unquantized and NVFP4 W4A4 + FP8 KV, with peak device memory, next to PyTorch's
/// eager forward (the peer script's `fwd` mode) run in the same session.
struct GPUBench {
    let device: ComputeDevice
    let shapes: [String]
    let batch: Int
    let seq: Int
    let repeats: Int
    let python: String
    let peerScript: String?
    /// Also print a per-operation time breakdown of one step (synchronised launches).
    var profile = false

    /// The peer script's shapes (`../shared/peer/modelopt_gpu_speed.py`), random weights.
    static func config(_ shape: String) throws -> ModelConfig {
        switch shape {
        case "qwen3-0.6b":
            return ModelConfig(family: .qwen3, vocabSize: 151_936, hiddenSize: 1024, intermediateSize: 3072, numLayers: 28, numHeads: 16,
                               numKVHeads: 8, headDim: 128, rmsNormEps: 1e-6, ropeTheta: 1e6, maxPositionEmbeddings: 40960,
                               tieWordEmbeddings: true, qkNorm: true)
        case "llama-3.2-1b":
            return ModelConfig(family: .llama, vocabSize: 128_256, hiddenSize: 2048, intermediateSize: 8192, numLayers: 16, numHeads: 32,
                               numKVHeads: 8, headDim: 64, rmsNormEps: 1e-5, ropeTheta: 5e5, maxPositionEmbeddings: 131_072,
                               tieWordEmbeddings: true)
        default:
            if FileManager.default.fileExists(atPath: shape + "/config.json") { return try ModelConfig.load(directory: shape) }
            throw QATError("unknown GPU bench shape \(shape): qwen3-0.6b, llama-3.2-1b or a model directory")
        }
    }

    func run() throws {
        guard case .cuda = device else { throw QATError("internal: GPUBench on \(device)") }
        let gpu = try GPU.open(device)
        print("GPU forward (evaluation: forward + chunked lm_head cross-entropy), \(batch)×\(seq) "
            + "tokens per step, median of \(repeats) after 2 warm-ups")
        print("shape          mode                 ms/step   [min, max]      tokens/s   peak GPU MiB")
        for shape in shapes {
            let config = try Self.config(shape)
            let t0 = Date()
            let model = FileManager.default.fileExists(atPath: shape + "/config.json")
                ? try CausalLM(directory: shape) : try CausalLM(config: config, seed: 1, std: 0.02)
            FileHandle.standardError.write(Data(("\(shape): \(model.parameters.reduce(0) { $0 + $1.value.count } / 1_000_000)M parameters "
                + "ready in \(String(format: "%.1f", Date().timeIntervalSince(t0))) s\n").utf8))
            var g = SplitMix64(seed: 7)
            let tokens = (0..<(batch * seq)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
            let targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seq)
            for quantized in [false, true] {
                var set: QuantizerSet? = nil
                if quantized {
                    set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"))
                }
                for precision in [Precision.bf16, .fp32] {
                    let before = gpu.bytesInUse
                    gpu.resetPeak()
                    var line = ""
                    do {
                        let gm = try CUDAModel(model: model, device: gpu, precision: precision)
                        if let set {
                            try Calibration.run(model: model, quantizers: set, sequences: [Array(tokens.prefix(seq))], seqLen: seq, batchSize: 1,
                                                forward: gm.calibrationForward(seqLen: seq))
                            gm.markWeightsChanged()
                        }
                        var times: [Double] = []
                        var loss = 0.0
                        for i in 0..<(repeats + 2) {
                            try gpu.synchronize()
                            let s = Date()
                            let hidden = try gm.forward(tokens: tokens, batch: batch, seqLen: seq)
                            let r = try gm.lossSums(hidden: hidden, targets: targets, n: batch * seq)
                            try gpu.synchronize()
                            if i >= 2 { times.append(Date().timeIntervalSince(s)) }
                            loss = r.sum / Double(r.valid)
                        }
                        times.sort()
                        let med = times[times.count / 2]
                        let mode = (quantized ? "nvfp4+fp8kv " : "unquantized ") + precision.rawValue
                        line = String(format: "%-14@ %-20@ %7.1f   [%.1f, %.1f]   %9.0f   %8d   (loss %.3f)", shape as NSString, mode as NSString,
                                      med * 1e3, times.first! * 1e3, times.last! * 1e3, Double(batch * seq) / med,
                                      (gpu.peakBytes - before) >> 20, loss)
                    }
                    print(line)
                    if profile {
                        gpu.profile = [:]
                        let gm = try CUDAModel(model: model, device: gpu, precision: precision)
                        let hidden = try gm.forward(tokens: tokens, batch: batch, seqLen: seq)
                        _ = try gm.lossSums(hidden: hidden, targets: targets, n: batch * seq)
                        for line in gpu.profileReport().prefix(14) { print(line) }
                        gpu.profile = nil
                    }
                }
            }
            if let script = peerScript {
                print(peer(script: script, shape: shape))
            }
        }
    }

    /// PyTorch's eager bf16 forward with the full logits (the peer script's `fwd` mode).
    func peer(script: String, shape: String) -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [python, script, shape, "--modes", "fwd", "--batch", String(batch), "--seq", String(seq), "--steps", String(repeats + 2)]
        let pipe = Pipe()
        p.standardOutput = pipe
        do { try p.run() } catch { return "peer: could not run \(python) \(script): \(error)" }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let out = String(decoding: data, as: UTF8.self)
        guard let line = out.split(separator: "\n").last(where: { $0.contains("\"mode\"") }) else { return "peer: no result (exit \(p.terminationStatus))" }
        return "peer (PyTorch eager, bf16, sdpa): \(line)"
    }
}
