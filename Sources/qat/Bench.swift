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
            heads, intermediate 1536, vocab 49152). For each: forward tokens/s, QAT and QAD step \
            time (NVFP4 weights+inputs, FP8 KV, fwd+bwd+AdamW), achieved GFLOP/s of the QAT step, \
            and each step's own peak memory. Plus sgemm GFLOP/s of the model's MLP shape, memcpy \
            GB/s and NVFP4 fake-quant GB/s measured in the same run. With --peer PYTHON, the \
            PyTorch peer (../shared/peer/torch_qat_step.py) runs in the same session, one peer run \
            after each of our measured steps, for ours/peer ratios of the medians.

            Every timing is the median of --repeats laps after a warm-up, printed with [min, max]. \
            Every peak is the configuration's own: the process's high-water mark is reset before \
            each lap (/proc/self/clear_refs) and read after it (VmHWM), counted above what was \
            resident before the configuration was set up.

            Example: qat bench --shapes fortune --peer /tmp/peer/bin/python --json
            """)

    @Option(
        help: """
            Comma-separated shapes: fortune, smollm, qwen3-moe; empty to skip (default fortune; fortune,smollm with --scaling). \
            With --device cuda: qwen3-0.6b, llama-3.2-1b or model directories.
            """)
    var shapes: String?

    @Option(name: .long, help: "Worker threads (default: the cores this process may use); the peer gets as many.")
    var threads: Int?

    @Flag(
        help: """
            Scaling: tokens/s of the forward, QAT step and QAD step at 1, 2, 4, … threads up to all cores (and the core \
            count itself), per shape, instead of the other figures.
            """)
    var scaling = false

    @Option(
        name: .customLong("scaling-threads"),
        help: "Thread counts for --scaling, e.g. 1,2,4,8,16 (default: powers of two up to all cores).")
    var scalingThreads: String?

    /// The shapes to measure.
    var shapeNames: [String] {
        (shapes ?? (scaling ? "fortune,smollm" : "fortune")).split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
            .filter { !$0.isEmpty }
    }

    @Option(name: .customLong("moe-experts"), help: "qwen3-moe shape: experts per layer (Qwen3-30B-A3B has 128).")
    var moeExperts: Int = 128

    @Option(name: .customLong("moe-layers"), help: "qwen3-moe shape: decoder layers (Qwen3-30B-A3B has 48).")
    var moeLayers: Int = 1

    @Option(name: .long, help: "cpu, or cuda / cuda:N for the GPU forward benchmark (GPUBench.swift).")
    var device: String = "cpu"

    @Flag(
        help: """
            Time every phase of the model's forward and backward (StepProfiler) over the QAT and QAD steps; printed per shape. \
            With --device cuda: every kernel and product of one step, between CUDA events.
            """)
    var profile = false

    @Option(help: "Sequences per step.")
    var batch: Int = 8

    @Option(help: "Tokens per sequence.")
    var seq: Int = 256

    @Option(
        help: """
            Measured laps of every configuration (optimizer steps, passes), after one warm-up lap; figures are their median [min, max].
            """)
    var repeats: Int = 5

    @Option(help: "Python interpreter with torch + transformers to run the peer script.")
    var peer: String?

    @Option(name: .customLong("peer-script"), help: "Path of the peer script.")
    var peerScript: String = "../shared/peer/torch_qat_step.py"

    @Option(name: .customLong("peer-steps"), help: "Measured steps inside each peer run (its figure is their median).")
    var peerSteps: Int = 3

    @Option(
        name: .customLong("peer-modes"),
        help: "With --device cuda: the GPU peer script's modes (fwd: PyTorch's forward; qat, qad: ModelOpt's steps).")
    var peerModes: String = "fwd,qat,qad"

    @Option(
        name: .customLong("loss-tokens"),
        help: "Token counts for the fused vs unfused KD loss benchmark (vocab 151,936, hidden 1,024), e.g. 1024,4096,16384.")
    var lossTokens: String = ""

    @Flag(name: .customLong("no-micro"), help: "Skip the memcpy and NVFP4 fake-quant reference figures.")
    var noMicro = false

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    func validate() throws {
        guard repeats >= 1 else { throw ValidationError("--repeats must be at least 1") }
        guard batch >= 1, seq >= 2 else { throw ValidationError("--batch must be at least 1 and --seq at least 2") }
        guard peerSteps >= 1 else { throw ValidationError("--peer-steps must be at least 1") }
        let modes = peerModes.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        guard !modes.isEmpty, modes.allSatisfy({ ["fwd", "qat", "qad"].contains($0) }) else {
            throw ValidationError("--peer-modes: '\(peerModes)' is not a list of fwd, qat, qad")
        }
        _ = try lossTokenCounts()
        _ = try scalingThreadCounts()
        if let t = threads, t < 1 { throw ValidationError("--threads must be at least 1") }
        if peer != nil, !FileManager.default.fileExists(atPath: peerScript) {
            throw ValidationError("peer script not found: \(peerScript) (--peer-script)")
        }
    }

    func run() throws {
        if let t = threads { setenv("QAT_THREADS", String(t), 1); BLAS.setThreads(t) }
        if device != "cpu" {
            try QAT.guarded {
                let shapeList = shapes == nil || shapes == "fortune" ? ["qwen3-0.6b", "llama-3.2-1b"] : shapeNames
                let script =
                    peerScript.hasSuffix("torch_qat_step.py")
                    ? (peerScript as NSString).deletingLastPathComponent + "/modelopt_gpu_speed.py" : peerScript
                try GPUBench(
                    device: try ComputeDevice(parsing: device), shapes: shapeList, batch: batch, seq: seq == 256 ? 1024 : seq,
                    repeats: repeats, python: peer ?? "python3", peerScript: peer == nil ? nil : script, peerModes: peerModes,
                    profile: profile || ProcessInfo.processInfo.environment["QAT_PROFILE"] == "1"
                ).run()
            }
            return
        }
        if scaling {
            try QAT.guarded { try runScaling() }
            return
        }
        try QAT.guarded {
            var out = JSONObject()
            var lines: [String] = []
            func say(_ s: String) { if !json { FileHandle.standardError.write(Data((s + "\n").utf8)) } }
            out.set("threads", .int(Int64(Parallel.threads)))
            out.set("cores", .int(Int64(Parallel.availableCores)))
            out.set("openblas", .string(BLAS.configuration))
            lines.append("threads \(Parallel.threads) of \(Parallel.availableCores) cores; \(BLAS.configuration)")
            say(lines.last!)
            out.set("repeats", .int(Int64(repeats)))
            out.set("peak_reset", .bool(PeakMemory.canReset))
            lines.append(
                "\(repeats) measured laps per configuration after a warm-up: median [min, max]; peaks are each configuration's own"
                    + (PeakMemory.canReset ? "" : " (not measured: /proc/self/clear_refs cannot be written here)"))
            say(lines.last!)

            if !noMicro {
                let copy = try Microbench.memcpyGBs(repeats: repeats)
                let fq = try Microbench.nvfp4FakeQuantGBs(repeats: repeats)
                out.set("memcpy_GBps", copy.json)
                out.set("nvfp4_fake_quant_GBps", fq.json)
                lines.append(
                    "memcpy \(copy.text(1)) GB/s; NVFP4 fake quant \(fq.text(1)) GB/s = "
                        + String(format: "%.0f%% of memcpy (ratio of medians)", 100 * fq.median / copy.median))
                say(lines.last!)
            }

            var shapeResults: [JSONValue] = []
            for name in shapeNames {
                let r =
                    name == "qwen3-moe"
                    ? try MoEBench(experts: moeExperts, layers: moeLayers, batch: batch, seq: seq, steps: repeats).run(say: say)
                    : try benchShape(name, say: say)
                shapeResults.append(.object(r.json))
                lines += r.lines
            }
            out.set("shapes", .array(shapeResults))
            let counts = try lossTokenCounts()
            if !counts.isEmpty {
                let lm = try LossMemoryBench.run(tokens: counts, repeats: repeats, say: say)
                out.set("kd_loss_memory", lm.json)
                lines += lm.lines
            }
            if json { print(JSONValue.object(out).fileText, terminator: "") } else { print(lines.joined(separator: "\n")) }
        }
    }

    func lossTokenCounts() throws -> [Int] {
        let parts = lossTokens.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        return try parts.map { p -> Int in
            guard let n = Int(p), n > 0 else { throw ValidationError("--loss-tokens: '\(p)' is not a positive token count") }
            return n
        }
    }

    struct ShapeResult { var json = JSONObject(); var lines: [String] = [] }

    /// The model and token stream of a shape: fortune (the embedded fortune-lm, real weights and
    /// data) or smollm (SmolLM2-135M-shaped, random weights, random tokens).
    func loadShape(_ name: String) throws -> (model: CausalLM, stream: [Int32]) {
        switch name {
        case "fortune":
            let modelDir = "models/fortune-lm"
            return (try CausalLM(directory: modelDir), try TokenData.load(path: modelDir + "/tokens.h5", split: "train", tokenizer: nil))
        case "smollm":
            let c = ModelConfig(
                family: .llama, vocabSize: 49152, hiddenSize: 576, intermediateSize: 1536, numLayers: 30, numHeads: 9,
                numKVHeads: 3, rmsNormEps: 1e-5, ropeTheta: 100000, maxPositionEmbeddings: 8192, tieWordEmbeddings: true)
            var rng = SplitMix64(seed: 2)
            let stream = (0..<(batch * seq * (repeats + 4) + 1)).map { _ in Int32(rng.next() % 49152) }
            return (try CausalLM(config: c, seed: 1), stream)
        default:
            throw QATError("unknown shape \(name) (known: fortune, smollm)")
        }
    }

    /// Times `repeats` optimizer steps (after a warm-up step that includes calibration) of the real
    /// QAT or QAD trainer (nvfp4_default-kv_fp8), one lap per step through the trainer's step callback.
    /// `between` runs after each measured lap (the peer); `beforeRun` after setup, before the steps.
    func trainerLaps(
        _ name: String, mode: String, like model: CausalLM, stream: [Int32], evalStream: [Int32], peaks: Bool,
        profile: Bool = false, between: (() throws -> Void)? = nil
    ) throws -> (laps: Laps, trainer: Trainer) {
        let B = batch, T = seq
        let laps = Laps(warmup: 1, repeats: repeats, peaks: peaks)
        if peaks { laps.reference = PeakMemory.reset() }  // the configuration's peak counts its own model, state and activations
        let m = try freshModel(name, like: model)
        let set = QuantizerSet(model: m, config: try QuantConfig.preset("nvfp4_default-kv_fp8"))
        let calib = try Calibration.sequences(from: stream, seqLen: T, count: B)
        try Calibration.run(model: m, quantizers: set, sequences: calib, seqLen: T, batchSize: B)
        var spec = Recipe.TrainSpec()
        spec.steps = repeats + 1; spec.batchSize = B; spec.evalEvery = 0; spec.saveEvery = 0; spec.lr = 1e-5
        spec.mode = mode == "qat" ? .qat : .qad
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qat-bench-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var opts = Trainer.Options(outputDir: dir, checkpointDir: dir + "/ckpt")
        opts.quiet = true; opts.finalEvaluation = false
        opts.onStep = { _ in laps.end() }
        let trainer: Trainer
        if mode == "qat" {
            trainer = try QATTrainer(
                model: m, quantizers: set, calibrationSequences: calib, calibrationBatchSize: B, spec: spec, seqLen: T,
                trainStream: stream, validationStream: evalStream, validationSequences: 1, options: opts)
        } else {
            let teacher = try freshModel(name, like: model)
            trainer = try QADTrainer(
                model: m, teacher: teacher, quantizers: set, calibrationSequences: calib, calibrationBatchSize: B,
                spec: spec, seqLen: T, trainStream: stream, validationStream: evalStream, validationSequences: 1, options: opts)
        }
        laps.between = between
        StepProfiler.reset()
        StepProfiler.enabled = profile
        defer { StepProfiler.enabled = false }
        laps.begin()  // the first lap (calibration inside the trainer, first step) is the warm-up
        _ = try trainer.run()
        StepProfiler.enabled = false
        try laps.check()
        return (laps, trainer)
    }

    func benchShape(_ name: String, say: (String) -> Void) throws -> ShapeResult {
        var res = ShapeResult()
        let (model, stream) = try loadShape(name)
        let modelDir = "models/fortune-lm"
        let c = model.config, T = seq, B = batch, N = B * T
        res.json.set("shape", .string(name))
        say("[\(name)] \(model.parameters.reduce(0) { $0 + $1.count }) parameters, batch \(B)×\(T)")

        // sgemm of the model's MLP shape: [N, hidden] × [inter, hidden]ᵀ.
        let sg = try Microbench.sgemmGFLOPs(m: N, n: c.intermediateSize, k: c.hiddenSize, repeats: repeats)
        res.json.set("sgemm_GFLOPs", sg.json)

        // Forward (evaluation path: one layer of activations), 2·B sequences per lap.
        let evalStream = Array(stream.prefix(N * 2 + 1))
        let fwd = try Laps.run(repeats: repeats) {
            _ = try Evaluation.evaluate(model: model, stream: evalStream, seqLen: T, batchSize: B, maxSequences: 2 * B)
        }
        let fwdTokS = fwd.time.map { Double(2 * N) / $0 }
        res.json.set("forward_tokens_per_s", fwdTokS.json)
        res.lines.append("[\(name)] sgemm of the MLP shape \(sg.text(1)) GFLOP/s; forward \(fwdTokS.text(0)) tok/s")
        say(res.lines.last!)

        // QAT and QAD steps with nvfp4_default-kv_fp8; each optimizer step is one lap.
        let flops = Microbench.qatStepFLOPs(c, batch: B, seqLen: T)
        res.json.set("qat_step_GFLOP", .double(flops / 1e9))
        for mode in ["qat", "qad"] {
            // With a peer, one peer run (its own median over --peer-steps) after each of our measured steps.
            var peerTimes: [Double] = []
            var between: (() throws -> Void)?
            if let py = peer, name == "fortune" {
                between = {
                    peerTimes.append(
                        try Microbench.runPeer(
                            python: py, script: peerScript, model: modelDir, batch: B, seq: T, mode: mode,
                            steps: peerSteps, threads: threads))
                }
            }
            let (laps, trainer) = try trainerLaps(
                name, mode: mode, like: model, stream: stream, evalStream: evalStream, peaks: true,
                profile: profile, between: between)
            if profile {
                let report = StepProfiler.report(steps: repeats + 1)
                res.json.set("\(mode)_profile", .string(report))
                res.lines.append("[\(name)] \(mode.uppercased()) step phases (per step, warm-up included):\n" + report)
            }

            let step = laps.time, tokS = step.map { Double(N) / $0 }
            res.json.set("\(mode)_step_s", step.json)
            res.json.set("\(mode)_tokens_per_s", tokS.json)
            var line = "[\(name)] \(mode.uppercased()) step \(step.text(3)) s = \(tokS.text(0)) tok/s"
            if mode == "qat" {
                let gf = step.map { flops / $0 / 1e9 }
                res.json.set("qat_GFLOPs", gf.json)
                line +=
                    String(format: "; %.1f GFLOP at ", flops / 1e9) + "\(gf.text(1)) GFLOP/s = "
                    + String(format: "%.0f%% of sgemm (medians)", 100 * gf.median / sg.median)
            }
            let paper = trainer.memoryEstimate.total / 1_048_576
            res.json.set("\(mode)_paper_MiB", .double(paper))
            if let peak = laps.peakMiB {
                res.json.set("\(mode)_step_peak_MiB", peak.json)
                line +=
                    "; step peak \(peak.text(0)) MiB vs \(Spread.number(paper, 0)) MiB on paper"
                    + String(format: " (%.2f×): ", peak.median / paper) + trainer.memoryEstimate.description
            }
            res.lines.append(line)
            say(line)
            if !peerTimes.isEmpty {
                let p = Spread(peerTimes)
                let ratios = Spread(zip(step.samples, peerTimes).map { $0.0 / $0.1 })
                res.json.set("peer_\(mode)_step_s", p.json)
                res.json.set("ours_over_peer_\(mode)", .double(step.median / p.median))
                res.json.set("ours_over_peer_\(mode)_pairs", ratios.json)
                res.lines.append(
                    "[\(name)] peer (PyTorch eager) \(mode.uppercased()) step \(p.text(3)) s, "
                        + "\(peerTimes.count) runs interleaved with ours; "
                        + String(
                            format: "ours/peer = %.2f (%.2f× faster; medians), per pair ",
                            step.median / p.median, p.median / step.median)
                        + ratios.text(2))
                say(res.lines.last!)
            }
        }
        return res
    }

    func freshModel(_ name: String, like m: CausalLM) throws -> CausalLM {
        name == "fortune" ? try CausalLM(directory: "models/fortune-lm") : try CausalLM(config: m.config, seed: 1)
    }
}
