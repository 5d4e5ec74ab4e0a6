import ArgumentParser
import Foundation
import QATCore
import QATData
import QATIO
import QATModels
import QATQuant
import QATTrain

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure speed and memory of the real code paths, next to plain sgemm and memcpy (and the PyTorch peer).",
        discussion: """
        Shapes: fortune (the embedded fortune-lm, real weights and data) and smollm (a \
        SmolLM2-135M-shaped model with random weights: hidden 576, 30 layers, 9 heads, 3 KV \
        heads, intermediate 1536, vocab 49152), qwen3-moe (Qwen3-30B-A3B's layer shape with random \
        weights, reduced in depth: hidden 2048, 32 heads, 4 KV heads, head_dim 128, 128 experts of \
        intermediate 768, top-8 with renormalisation, vocab cut to 16384; see --moe-layers, --moe-experts; \
        QAT step only, with the share of the step spent in routing and dispatch). For each: forward tokens/s, QAT and QAD step \
        time (NVFP4 weights+inputs, FP8 KV, fwd+bwd+AdamW), achieved GFLOP/s of the QAT step, \
        peak RSS. Plus sgemm GFLOP/s of the model's MLP shape, memcpy GB/s and NVFP4 fake-quant \
        GB/s measured in the same run. With --peer PYTHON, the PyTorch peer \
        (../shared/peer/torch_qat_step.py) runs in the same session for ours/peer ratios.

        Example: qat bench --shapes fortune --peer /tmp/peer/bin/python --json
        """)

    @Option(help: "Comma-separated shapes: fortune, smollm, qwen3-moe.")
    var shapes: String = "fortune"

    @Option(name: .customLong("moe-experts"), help: "qwen3-moe shape: experts per layer (Qwen3-30B-A3B has 128).")
    var moeExperts: Int = 128

    @Option(name: .customLong("moe-layers"), help: "qwen3-moe shape: decoder layers (Qwen3-30B-A3B has 48).")
    var moeLayers: Int = 1

    @Option(help: "Sequences per step.")
    var batch: Int = 8

    @Option(help: "Tokens per sequence.")
    var seq: Int = 256

    @Option(help: "Measured optimizer steps per mode (after one warm-up step).")
    var steps: Int = 3

    @Option(help: "Python interpreter with torch + transformers to run the peer script.")
    var peer: String?

    @Option(name: .customLong("peer-script"), help: "Path of the peer script.")
    var peerScript: String = "../shared/peer/torch_qat_step.py"

    @Option(name: .customLong("loss-tokens"), help: "Token counts for the fused vs unfused KD loss benchmark (vocab 151,936, hidden 1,024), e.g. 1024,4096,16384; empty to skip.")
    var lossTokens: String = ""

    @Option(name: .long, help: "cpu, or cuda / cuda:N for the GPU forward benchmark (shapes qwen3-0.6b, llama-3.2-1b or a model directory).")
    var device: String = "cpu"

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    @Flag(help: "Time every phase of the model's forward and backward (StepProfiler) over the QAT and QAD steps; printed per shape.")
    var profile = false

    func run() throws {
        if device != "cpu" {
            try QAT.guarded {
                let shapeList = shapes == "fortune" ? ["qwen3-0.6b", "llama-3.2-1b"] : shapes.split(separator: ",").map(String.init)
                let script = peerScript.hasSuffix("torch_qat_step.py")
                    ? (peerScript as NSString).deletingLastPathComponent + "/modelopt_gpu_speed.py" : peerScript
                try GPUBench(device: try ComputeDevice(parsing: device), shapes: shapeList, batch: batch, seq: seq == 256 ? 1024 : seq,
                             repeats: 5, python: peer ?? "python3", peerScript: peer == nil ? nil : script,
                             profile: ProcessInfo.processInfo.environment["QAT_PROFILE"] == "1").run()
            }
            return
        }
        try QAT.guarded {
            var out = JSONObject()
            var lines: [String] = []
            func say(_ s: String) { if !json { FileHandle.standardError.write(Data((s + "\n").utf8)) } }
            out.set("threads", .int(Int64(Parallel.threads)))

            let copy = Microbench.memcpyGBs()
            let fq = Microbench.nvfp4FakeQuantGBs()
            out.set("memcpy_GBps", .double(copy))
            out.set("nvfp4_fake_quant_GBps", .double(fq))
            lines.append(String(format: "memcpy %.1f GB/s; NVFP4 fake quant %.1f GB/s (%.0f%% of memcpy)", copy, fq, 100 * fq / copy))
            say(lines.last!)
            let header = try IOBench.safetensorsHeaderSeconds(), bf16 = try IOBench.bf16DecodeGBs()
            out.set("safetensors_header_20k_s", .double(header))
            out.set("bf16_decode_GBps", .double(bf16))
            lines.append(String(format: "safetensors header of 20,000 tensors %.1f ms; bf16 → f32 decode %.2f GB/s", header * 1000, bf16))
            say(lines.last!)

            var shapeResults: [JSONValue] = []
            for name in shapes.split(separator: ",").map(String.init) {
                let r = name == "qwen3-moe" ? try MoEBench(experts: moeExperts, layers: moeLayers, batch: batch, seq: seq, steps: steps).run(say: say)
                    : try benchShape(name, say: say)
                shapeResults.append(.object(r.json))
                lines += r.lines
            }
            out.set("shapes", .array(shapeResults))
            let counts = lossTokens.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            if !counts.isEmpty {
                let lm = try LossMemoryBench.run(tokens: counts, say: say)
                out.set("kd_loss_memory", .array(lm.json))
                lines += lm.lines
            }
            if json { print(JSONValue.object(out).fileText, terminator: "") } else { print(lines.joined(separator: "\n")) }
        }
    }

    struct ShapeResult { var json = JSONObject(); var lines: [String] = [] }

    func benchShape(_ name: String, say: (String) -> Void) throws -> ShapeResult {
        var res = ShapeResult()
        let model: CausalLM
        let stream: [Int32]
        let modelDir = "models/fortune-lm"
        switch name {
        case "fortune":
            model = try CausalLM(directory: modelDir)
            stream = try TokenData.load(path: modelDir + "/tokens.h5", split: "train", tokenizer: nil)
        case "smollm":
            let c = ModelConfig(family: .llama, vocabSize: 49152, hiddenSize: 576, intermediateSize: 1536, numLayers: 30, numHeads: 9,
                                numKVHeads: 3, rmsNormEps: 1e-5, ropeTheta: 100000, maxPositionEmbeddings: 8192, tieWordEmbeddings: true)
            model = try CausalLM(config: c, seed: 1)
            var rng = SplitMix64(seed: 2)
            stream = (0..<(batch * seq * (steps + 3) + 1)).map { _ in Int32(rng.next() % 49152) }
        default:
            throw QATError("unknown shape \(name) (known: fortune, smollm)")
        }
        let c = model.config, T = seq, B = batch, N = B * T
        res.json.set("shape", .string(name))
        say("[\(name)] \(model.parameters.reduce(0) { $0 + $1.count }) parameters, batch \(B)×\(T)")

        // sgemm of the model's MLP shape: [N, hidden] × [inter, hidden]ᵀ.
        let sg = Microbench.sgemmGFLOPs(m: N, n: c.intermediateSize, k: c.hiddenSize)
        res.json.set("sgemm_GFLOPs", .double(sg))

        // Forward (evaluation path: one layer of activations).
        let evalStream = Array(stream.prefix(N * 2 + 1))
        _ = try Evaluation.evaluate(model: model, stream: evalStream, seqLen: T, batchSize: B, maxSequences: B)
        let e = try Evaluation.evaluate(model: model, stream: evalStream, seqLen: T, batchSize: B, maxSequences: 2 * B)
        let fwdTokS = Double(2 * N) / e.seconds
        res.json.set("forward_tokens_per_s", .double(fwdTokS))

        // QAT and QAD steps with nvfp4_default-kv_fp8.
        var stepSeconds: [String: Double] = [:]
        for mode in ["qat", "qad"] {
            let m = mode == "qat" ? model : try freshModel(name, like: model)
            let calib = try Calibration.sequences(from: stream, seqLen: T, count: B)
            let set = try Quantization.quantize(model: m, config: try QuantConfig.preset("nvfp4_default-kv_fp8"),
                                                forwardLoop: CalibrationLoop(sequences: calib, seqLen: T, batchSize: B))
            var spec = Recipe.TrainSpec()
            spec.steps = steps + 1; spec.batchSize = B; spec.evalEvery = 0; spec.saveEvery = 0; spec.lr = 1e-5
            spec.mode = mode == "qat" ? .qat : .qad
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qat-bench-\(getpid())").path
            var opts = Trainer.Options(outputDir: dir, checkpointDir: dir + "/ckpt")
            opts.quiet = true; opts.finalEvaluation = false
            var times: [Double] = []
            var last = Date()
            opts.onStep = { _ in let now = Date(); times.append(now.timeIntervalSince(last)); last = now }
            let trainer: Trainer
            if mode == "qat" {
                trainer = try QATTrainer(model: m, quantizers: set, calibrationSequences: calib, calibrationBatchSize: B, spec: spec, seqLen: T,
                                         trainStream: stream, validationStream: evalStream, validationSequences: 1, options: opts)
            } else {
                let teacher = try freshModel(name, like: model)
                trainer = try QADTrainer(model: m, teacher: teacher, quantizers: set, calibrationSequences: calib, calibrationBatchSize: B,
                                         spec: spec, seqLen: T, trainStream: stream, validationStream: evalStream, validationSequences: 1, options: opts)
            }
            last = Date()
            StepProfiler.reset()
            StepProfiler.enabled = profile
            _ = try trainer.run()
            StepProfiler.enabled = false
            if profile {
                let report = StepProfiler.report(steps: steps + 1)
                res.json.set("\(mode)_profile", .string(report))
                res.lines.append("[\(name)] \(mode.uppercased()) step phases (per step, warm-up included):\n" + report)
            }
            try? FileManager.default.removeItem(atPath: dir)
            if mode == "qat" {
                // Peak RSS so far (model, forward, one QAT run) against the paper figure.
                let paper = trainer.memoryEstimate.total / 1_048_576
                res.json.set("qat_peak_rss_MB", .double(peakRSSMegabytes()))
                res.json.set("qat_paper_MB", .double(paper))
                res.lines.append(String(format: "[%@] QAT peak RSS %.0f MB vs %.0f MB on paper (%.2f×): %@", name, peakRSSMegabytes(), paper,
                                        peakRSSMegabytes() / paper, trainer.memoryEstimate.description))
            }
            let measured = Array(times.dropFirst()).sorted()
            let median = measured.isEmpty ? times.last ?? 0 : measured[measured.count / 2]
            stepSeconds[mode] = median
            res.json.set("\(mode)_step_s", .double(median))
            res.json.set("\(mode)_tokens_per_s", .double(Double(N) / median))
        }
        let flops = Microbench.qatStepFLOPs(c, batch: B, seqLen: T)
        let achieved = flops / stepSeconds["qat"]! / 1e9
        res.json.set("qat_step_GFLOP", .double(flops / 1e9))
        res.json.set("qat_GFLOPs", .double(achieved))
        res.json.set("peak_rss_MB", .double(peakRSSMegabytes()))
        res.lines.append(String(format: "[%@] forward %.0f tok/s; QAT step %.3f s (%.0f tok/s); QAD step %.3f s (%.0f tok/s)",
                                name, fwdTokS, stepSeconds["qat"]!, Double(N) / stepSeconds["qat"]!, stepSeconds["qad"]!, Double(N) / stepSeconds["qad"]!))
        res.lines.append(String(format: "[%@] QAT step %.1f GFLOP at %.1f GFLOP/s = %.0f%% of sgemm %.1f GFLOP/s (same shape, same run); peak RSS %.0f MB",
                                name, flops / 1e9, achieved, 100 * achieved / sg, sg, peakRSSMegabytes()))
        say(res.lines[res.lines.count - 2]); say(res.lines.last!)

        if let py = peer, name == "fortune" {
            for mode in ["qat", "qad"] {
                let p = try Microbench.runPeer(python: py, script: peerScript, model: modelDir, batch: B, seq: T, mode: mode)
                res.json.set("peer_\(mode)_step_s", .double(p))
                let ratio = stepSeconds[mode]! / p
                res.json.set("ours_over_peer_\(mode)", .double(ratio))
                res.lines.append(String(format: "[%@] peer (PyTorch eager) %@ step %.3f s; ours/peer = %.2f (%.2f× faster)", name, mode, p, ratio, 1 / ratio))
                say(res.lines.last!)
            }
        }
        return res
    }

    func freshModel(_ name: String, like m: CausalLM) throws -> CausalLM {
        name == "fortune" ? try CausalLM(directory: "models/fortune-lm") : try CausalLM(config: m.config, seed: 1)
    }
}

/// Reference measurements taken in the same process as the model benchmarks.
enum Microbench {
    static func best(_ reps: Int, _ body: () -> Void) -> Double {
        var b = Double.infinity
        for _ in 0..<reps { let t = Date(); body(); b = min(b, Date().timeIntervalSince(t)) }
        return b
    }

    static func memcpyGBs() -> Double {
        let n = 16 << 20  // floats (64 MiB)
        let a = Tensor(shape: [n]), b = Tensor(shape: [n])
        for i in stride(from: 0, to: n, by: 1024) { a[i] = Float(i) }
        let t = best(5) { b.data.update(from: a.data, count: n) }
        return Double(2 * n * 4) / t / 1e9  // read + write
    }

    static func nvfp4FakeQuantGBs() -> Double {
        let rows = 4096, cols = 4096, n = rows * cols
        let x = Tensor(shape: [n], zeroed: false), y = Tensor(shape: [n], zeroed: false)
        var rng = SplitMix64(seed: 3)
        for i in 0..<n { x[i] = rng.nextGaussian() }
        let amax = NVFP4.absMax(x.data, count: n)
        let t = best(5) { NVFP4.fakeQuant(x.data, y.data, rows: rows, cols: cols, globalAmax: amax, mode: .export) }
        return Double(2 * n * 4) / t / 1e9
    }

    static func sgemmGFLOPs(m: Int, n: Int, k: Int) -> Double {
        let a = Tensor(shape: [m, k]), b = Tensor(shape: [n, k]), c = Tensor(shape: [m, n])
        for i in 0..<a.count { a[i] = Float(i % 7) * 0.01 }
        for i in 0..<b.count { b[i] = Float(i % 5) * 0.01 }
        let t = best(5) { BLAS.gemm(transB: true, m: m, n: n, k: k, a: a.data, b: b.data, c: c.data) }
        return 2 * Double(m) * Double(n) * Double(k) / t / 1e9
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

    /// Median seconds per optimizer step of the PyTorch peer.
    static func runPeer(python: String, script: String, model: String, batch: Int, seq: Int, mode: String) throws -> Double {
        guard FileManager.default.fileExists(atPath: script) else { throw QATError("peer script not found: \(script) (--peer-script)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = [script, model, "--batch", String(batch), "--seq", String(seq), "--mode", mode]
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { throw QATError("cannot run the peer with \(python): \(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard p.terminationStatus == 0, let line = text.split(separator: "\n").last(where: { $0.hasPrefix("{") }),
              let v = try? JSONValue.parse(String(line)) else {
            throw QATError("the peer failed (exit \(p.terminationStatus)): \(text.suffix(400))")
        }
        for key in ["median_step_s", "seconds_per_step", "step_s", "median_s"] { if let s = v[key]?.doubleValue { return s } }
        throw QATError("the peer's JSON has no step time: \(line)")
    }
}

/// Peak memory and time of the fused chunked KD loss against the unfused one (full
/// [tokens × vocab] logits of student and teacher) at Qwen3's vocabulary. Peak RSS is reset
/// between runs through /proc/self/clear_refs, so each figure is that run's own high-water
/// mark above the weights and hidden states.
enum LossMemoryBench {
    static let vocab = 151_936, hidden = 1_024

    static func rss() -> (current: Double, peak: Double) {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return (0, 0) }
        func field(_ k: String) -> Double {
            guard let line = s.split(separator: "\n").first(where: { $0.hasPrefix(k) }) else { return 0 }
            return Double(line.split(separator: " ").compactMap { Double($0) }.first ?? 0) / 1024  // kB → MiB
        }
        return (field("VmRSS:"), field("VmHWM:"))
    }

    static func resetPeak() { try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8) }

    static func run(tokens counts: [Int], say: (String) -> Void) throws -> (json: [JSONValue], lines: [String]) {
        // One layer, tied heads: the lm_head weights (151,936 × 1,024, 594 MiB each) dominate.
        let c = ModelConfig(family: .llama, vocabSize: vocab, hiddenSize: hidden, intermediateSize: 64, numLayers: 1, numHeads: 8,
                            numKVHeads: 8, tieWordEmbeddings: true)
        let student = try CausalLM(config: c, seed: 1), teacher = try CausalLM(config: c, seed: 2)
        student.lmHead.weight.setRequiresGrad(true)
        var spec = Recipe.DistillSpec()
        spec.kdRatio = 0.5
        let loss = try DistillationLoss(teacher: teacher, studentVocab: vocab, spec: spec)
        var json: [JSONValue] = [], lines: [String] = []
        for n in counts {
            var rng = SplitMix64(seed: UInt64(n))
            let h = Tensor(shape: [n, hidden], zeroed: false), th = Tensor(shape: [n, hidden], zeroed: false), dh = Tensor(shape: [n, hidden])
            for i in 0..<h.count { h[i] = rng.nextGaussian(); th[i] = rng.nextGaussian() }
            let targets = (0..<n).map { i in i % 17 == 16 ? CrossEntropy.ignoreIndex : Int32(rng.next() % UInt64(vocab)) }
            let hiddenMiB = Double(3 * n * hidden * 4) / 1_048_576
            var row = JSONObject()
            row.set("tokens", .int(Int64(n)))
            row.set("hidden_states_MiB", .double(hiddenMiB))
            for fused in [true, false] {
                let name = fused ? "fused" : "unfused"
                // The unfused path holds student and teacher logits (and the gradient in place).
                let paperMiB = Double(2 * n * vocab * 4) / 1_048_576
                if !fused, paperMiB > 0.6 * Double(ProcessInfo.processInfo.physicalMemory) / 1_048_576 {
                    row.set("unfused_paper_MiB", .double(paperMiB))
                    lines.append(String(format: "[kd loss] %d tokens: unfused skipped (its logits alone need %.0f MiB on paper, more than this machine can hold)", n, paperMiB))
                    say(lines.last!)
                    continue
                }
                let base = rss().current
                resetPeak()
                let t0 = Date()
                if fused {
                    _ = try loss.fused(student: student.lmHead, hidden: h.data, teacherHidden: th.data, targets: targets, n: n,
                                       gradScale: 1 / Float(n), dHidden: dh.data)
                } else {
                    _ = try loss.reference(student: student.lmHead, hidden: h.data, teacherHidden: th.data, targets: targets, n: n,
                                           gradScale: 1 / Float(n), dHidden: dh.data)
                }
                let seconds = Date().timeIntervalSince(t0)
                let extra = max(0, rss().peak - base)
                row.set("\(name)_peak_extra_MiB", .double((extra * 10).rounded() / 10))
                row.set("\(name)_seconds", .double(seconds))
                lines.append(String(format: "[kd loss] %d tokens: %@ peak +%.0f MiB over weights and hidden states (hidden states %.0f MiB), %.2f s",
                                    n, name, extra, hiddenMiB, seconds))
                say(lines.last!)
            }
            json.append(.object(row))
        }
        return (json, lines)
    }
}
