import Foundation
import QATCUDA
import QATCore
import QATModels
import QATQuant
import QATTrain

/// `qat bench --device cuda`: forward (evaluation) throughput of model shapes on the GPU, bf16
/// and fp32, unquantized and NVFP4 W4A4 + FP8 KV, with peak device memory; then QAT and QAD
/// training steps (NVFP4 W4A4 + FP8 KV, bf16, the trainer's own loop through
/// `CUDAStepBackend`), next to the peer script's modes (PyTorch's eager forward, ModelOpt's
/// QAT and QAD steps) run in the same session.
struct GPUBench {
    let device: ComputeDevice
    let shapes: [String]
    let batch: Int
    let seq: Int
    let repeats: Int
    let python: String
    let peerScript: String?
    /// The peer script's modes (`--peer-modes`).
    var peerModes = "fwd,qat,qad"
    /// Also print a per-operation time breakdown of one step (synchronised launches).
    var profile = false

    /// The peer script's shapes (`../shared/peer/modelopt_gpu_speed.py`), random weights.
    static func config(_ shape: String) throws -> ModelConfig {
        switch shape {
        case "qwen3-0.6b":
            return ModelConfig(
                family: .qwen3, vocabSize: 151_936, hiddenSize: 1024, intermediateSize: 3072, numLayers: 28, numHeads: 16,
                numKVHeads: 8, headDim: 128, rmsNormEps: 1e-6, ropeTheta: 1e6, maxPositionEmbeddings: 40960,
                tieWordEmbeddings: true, qkNorm: true)
        case "llama-3.2-1b":
            return ModelConfig(
                family: .llama, vocabSize: 128_256, hiddenSize: 2048, intermediateSize: 8192, numLayers: 16, numHeads: 32,
                numKVHeads: 8, headDim: 64, rmsNormEps: 1e-5, ropeTheta: 5e5, maxPositionEmbeddings: 131_072,
                tieWordEmbeddings: true)
        default:
            if FileManager.default.fileExists(atPath: shape + "/config.json") { return try ModelConfig.load(directory: shape) }
            throw QATError("unknown GPU bench shape \(shape): qwen3-0.6b, llama-3.2-1b or a model directory")
        }
    }

    /// The bf16 dense matmul rate MFU is stated against: the H200's, as the CUDA issues measured it
    /// (about 790 TFLOP/s; the data sheet says 989).
    static let peakTFLOPs = 790.0

    /// Model FLOPs of one step, the convention of the issue (and of PaLM's MFU): a forward is
    /// 2 · matmul parameters · tokens (every Linear and the lm_head; not the embedding lookup)
    /// plus causal attention, 2 · layers · T · heads · head_dim per token (QKᵀ and PV, each over
    /// T/2 keys on average); a training step is 3 forwards (the backward twice the forward); QAD
    /// adds the teacher's forward. Both sides of a comparison are counted by this one formula.
    static func stepFLOPs(_ c: ModelConfig, batch: Int, seq: Int, mode: Recipe.Mode?) -> Double {
        let h = Double(c.hiddenSize), q = Double(c.numHeads * c.headDim), kv = Double(c.numKVHeads * c.headDim)
        let perLayer = h * q + 2 * h * kv + q * h + 3 * h * Double(c.intermediateSize)
        let matmul = Double(c.numLayers) * perLayer + Double(c.vocabSize) * h
        let tokens = Double(batch * seq)
        let forward = 2 * matmul * tokens + 2 * Double(c.numLayers) * Double(seq) * q * tokens
        switch mode {
        case nil, .some(.none): return forward
        case .some(.qat): return 3 * forward
        case .some(.qad): return 4 * forward
        }
    }

    /// "  N TFLOP/s  M% MFU" of a step of `flops` in `seconds`.
    static func mfu(_ flops: Double, seconds: Double) -> String {
        let rate = flops / seconds / 1e12
        return String(format: "   %6.1f TFLOP/s %5.1f%% MFU", rate, 100 * rate / peakTFLOPs)
    }

    /// One line to stdout at once (unbuffered: a run cut short keeps what it measured).
    func emit(_ line: String) { FileHandle.standardOutput.write(Data((line + "\n").utf8)) }

    func run() throws {
        guard case .cuda = device else { throw QATError("internal: GPUBench on \(device)") }
        let gpu = try GPU.open(device)
        emit(
            "GPU forward (evaluation: forward + chunked lm_head cross-entropy), \(batch)×\(seq) tokens per step, "
                + "median of \(repeats) after 2 warm-ups"
        )
        emit(
            "shape          mode                 ms/step   [min, max]      tokens/s   peak GPU MiB              model FLOPs "
                + "(MFU: of \(Int(Self.peakTFLOPs)) TFLOP/s)")
        for shape in shapes {
            let config = try Self.config(shape)
            let t0 = Date()
            let model =
                FileManager.default.fileExists(atPath: shape + "/config.json")
                ? try CausalLM(directory: shape) : try CausalLM(config: config, seed: 1, std: 0.02)
            let millions = model.parameters.reduce(0) { $0 + $1.value.count } / 1_000_000
            let seconds = String(format: "%.1f", Date().timeIntervalSince(t0))
            FileHandle.standardError.write(Data("\(shape): \(millions)M parameters ready in \(seconds) s\n".utf8))
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
                            try Calibration.run(
                                model: model, quantizers: set, sequences: [Array(tokens.prefix(seq))], seqLen: seq, batchSize: 1,
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
                        line =
                            String(
                                format: "%-14@ %-20@ %7.1f   [%.1f, %.1f]   %9.0f   %8d   (loss %.3f)", shape as NSString, mode as NSString,
                                med * 1e3, times.first! * 1e3, times.last! * 1e3, Double(batch * seq) / med,
                                (gpu.peakBytes - before) >> 20, loss)
                            + Self.mfu(Self.stepFLOPs(config, batch: batch, seq: seq, mode: nil), seconds: med)
                    }
                    emit(line)
                    if profile {  // the second forward, as the timed ones (the first also converts the weights)
                        let gm = try CUDAModel(model: model, device: gpu, precision: precision)
                        _ = try gm.lossSums(
                            hidden: try gm.forward(tokens: tokens, batch: batch, seqLen: seq), targets: targets, n: batch * seq)
                        gpu.startProfile()
                        let hidden = try gm.forward(tokens: tokens, batch: batch, seqLen: seq)
                        _ = try gm.lossSums(hidden: hidden, targets: targets, n: batch * seq)
                        for line in try gpu.profileReport("one forward", limit: 20) { emit(line) }
                    }
                }
            }
            // Training: the quantized model of the rows above (NVFP4 W4A4 + FP8 KV, calibrated
            // on the GPU), a copy of its master weights as the QAD teacher.
            let teacher = try CausalLM(
                config: config, parameters: Dictionary(uniqueKeysWithValues: model.parameters.map { ($0.name, $0.value.copy()) }))
            // Each mode without and with activation checkpointing (step time and peak memory side by side).
            for mode in [Recipe.Mode.qat, .qad] {
                for checkpointing in [false, true] {
                    do {
                        emit(
                            try trainSteps(
                                shape: shape, model: model, teacher: teacher, tokens: tokens, gpu: gpu, mode: mode,
                                checkpointing: checkpointing))
                    } catch {
                        emit(String(format: "%-14@ %@ step: failed: %@", shape as NSString, mode.rawValue, "\(error)"))
                    }
                }
            }
            model.activationCheckpointing = false
            if let script = peerScript {
                peer(script: script, shape: shape, modes: peerModes, config: config)
            }
        }
    }

    /// QAT or QAD steps of NVFP4 W4A4 + FP8 KV in bf16 on the GPU, through the trainer's loop
    /// (`Trainer.run` with `CUDAStepBackend`: forward, fused loss head, backward, gradient norm
    /// and clipping at 1.0, AdamW): median step time after 2 warm-up steps, and the run's peak
    /// GPU memory (the QAD teacher included). `checkpointing`: train.activation_checkpointing.
    func trainSteps(
        shape: String, model: CausalLM, teacher: CausalLM, tokens: [Int32], gpu: CUDADevice, mode: Recipe.Mode, checkpointing: Bool
    ) throws -> String {
        let config = model.config
        let before = gpu.bytesInUse
        gpu.resetPeak()
        let gm = try CUDAModel(model: model, device: gpu, precision: .bf16)
        // As `qat apply` trains a bf16 checkpoint for a bf16 export (ModelOpt's side is a bf16 model too).
        try gm.readStoredDType(bf16: Set(model.parameters.map(\.name)))
        var spec = Recipe.TrainSpec()
        // With --profile one more step runs, every launch timed (DeviceProfiler), outside the median.
        spec.mode = mode; spec.steps = repeats + (profile ? 3 : 2); spec.batchSize = batch; spec.lr = 1e-5; spec.schedule = "constant"
        spec.evalEvery = 0; spec.saveEvery = 0; spec.maxGradNorm = 1; spec.activationCheckpointing = checkpointing
        var g = SplitMix64(seed: 9)
        let stream = (0..<((spec.steps + 1) * batch * seq)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        let dir = NSTemporaryDirectory() + "qat-gpu-bench-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = Trainer.Options(outputDir: dir, checkpointDir: dir + "/checkpoints")
        options.quiet = true; options.finalEvaluation = false
        var teacherCopy: CUDAModel?
        options.backend = CUDAStepBackend(model: gm) { teacher in
            if let t = teacherCopy { return t }
            let t = try CUDAModel(model: teacher, device: gpu, precision: .bf16, inferenceOnly: true)
            teacherCopy = t
            return t
        }
        var times: [Double] = []
        var loss = 0.0
        var profiled = false
        options.onStep = { [profile, steps = spec.steps] m in
            if m.step > 2 && !profiled { times.append(Double(batch * seq) / m.tokensPerSecond) }
            loss = m.loss
            if profile && m.step == steps - 1 {
                gpu.startProfile()
                profiled = true
            }
        }
        let trainer = try Trainer(
            model: model, spec: spec, seqLen: seq, trainStream: stream, validationStream: [], validationSequences: nil,
            options: options)
        if mode == .qad {
            var d = Recipe.DistillSpec()
            d.kdRatio = 1
            trainer.loss = try DistillationLoss(teacher: teacher, studentVocab: config.vocabSize, spec: d)
        }
        _ = try trainer.run()
        try gpu.synchronize()
        for line in try gpu.profileReport("one \(mode.rawValue) step", limit: 36) { emit(line) }
        times.sort()
        let med = times[times.count / 2]
        return String(
            format: "%-14@ %-20@ %7.1f   [%.1f, %.1f]   %9.0f   %8d   (loss %.3f)", shape as NSString,
            "\(mode.rawValue.uppercased()) \(checkpointing ? "ckpt" : "step") nvfp4 bf16" as NSString, med * 1e3, times.first! * 1e3,
            times.last! * 1e3,
            Double(batch * seq) / med, (gpu.peakBytes - before) >> 20, loss)
            + Self.mfu(Self.stepFLOPs(config, batch: batch, seq: seq, mode: mode), seconds: med)
    }

    /// The peer script's modes: PyTorch's eager bf16 forward with the full logits (`fwd`),
    /// ModelOpt's QAT and QAD steps (`qat`, `qad`; they need nvidia-modelopt on the host).
    func peer(script: String, shape: String, modes: String, config: ModelConfig) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = [
            python, script, shape, "--modes", modes, "--batch", String(batch), "--seq", String(seq), "--steps", String(repeats + 2),
        ]
        let pipe = Pipe()
        p.standardOutput = pipe
        do { try p.run() } catch { return emit("peer: could not run \(python) \(script): \(error)") }
        // Each mode's line as it comes (a run cut short keeps the modes that finished).
        var pending = Data(), results = 0
        func flush(_ line: String) {
            guard line.contains("\"mode\"") else { return }
            results += 1
            emit("peer (PyTorch eager bf16 sdpa / ModelOpt 0.47): \(line)\(peerFigures(line, config: config))")
        }
        while case let chunk = pipe.fileHandleForReading.availableData, !chunk.isEmpty {
            pending.append(chunk)
            while let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                flush(String(decoding: pending[pending.startIndex..<nl], as: UTF8.self))
                pending = Data(pending[(nl + 1)...])
            }
        }
        flush(String(decoding: pending, as: UTF8.self))
        p.waitUntilExit()
        if results == 0 { emit("peer: no result (exit \(p.terminationStatus))") }
    }

    /// The model TFLOP/s and MFU of a peer result line (its median step time, by the same formula as ours).
    func peerFigures(_ line: String, config: ModelConfig) -> String {
        guard let json = try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any],
            let ms = (json["median_step_ms"] as? NSNumber)?.doubleValue, let name = json["mode"] as? String
        else { return "" }
        let mode: Recipe.Mode? = name == "qat" || name == "bf16" ? .qat : name == "qad" ? .qad : name == "fwd" ? nil : .some(.none)
        guard mode != .some(.none) else { return "" }
        return Self.mfu(Self.stepFLOPs(config, batch: batch, seq: seq, mode: mode), seconds: ms / 1e3)
    }
}
