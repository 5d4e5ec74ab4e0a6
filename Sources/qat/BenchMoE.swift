import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant
import QATTrain

/// `qat bench --shapes qwen3-moe`: a QAT step (NVFP4 W4A4, FP8 KV, fwd + bwd + AdamW) on
/// Qwen3-30B-A3B's layer shape with random weights, reduced in depth, timed per step, with
/// the share of the step spent in routing (router softmax, top-k, grouping and their
/// backward) and dispatch (gathering tokens per expert, scattering weighted outputs, and the
/// backward of both) — the MoE overhead around the experts' matmuls. The vocabulary is cut
/// to 16384 (Qwen3's is 151936) so that the step is the layers' and not the lm_head's.
struct MoEBench {
    var experts: Int, layers: Int, batch: Int, seq: Int, steps: Int

    var config: ModelConfig {
        ModelConfig(
            family: .qwen3Moe, vocabSize: 16_384, hiddenSize: 2048, intermediateSize: 6144, numLayers: layers, numHeads: 32,
            numKVHeads: 4, headDim: 128, rmsNormEps: 1e-6, ropeTheta: 1_000_000, maxPositionEmbeddings: 40960, qkNorm: true,
            moe: MoEConfig(
                naming: .qwen, numExperts: experts, topK: min(8, experts), expertIntermediateSize: 768,
                normTopKProb: true))
    }

    func run(say: (String) -> Void) throws -> Bench.ShapeResult {
        guard experts >= 1, layers >= 1 else { throw QATError("--moe-experts and --moe-layers must be at least 1") }
        var res = Bench.ShapeResult()
        let c = config, T = seq, B = batch, N = B * T
        let model = try CausalLM(config: c, seed: 1)
        // Routing in a random model: the router rows get a larger scale so that tokens spread
        // over the experts the way a trained router's decisive choices do.
        for b in model.moeBlocks { for i in 0..<b.router.weight.count { b.router.weight.value[i] *= 25 } }
        var rng = SplitMix64(seed: 2)
        let stream = (0..<(N * (steps + 3) + 1)).map { _ in Int32(rng.next() % UInt64(c.vocabSize)) }
        let params = model.parameters.reduce(0) { $0 + $1.count }
        res.json.set("shape", .string("qwen3-moe"))
        res.json.set("experts", .int(Int64(experts))); res.json.set("layers", .int(Int64(layers)))
        say("[qwen3-moe] \(params) parameters (\(layers) layer(s), \(experts) experts top-\(c.moe!.topK)), batch \(B)×\(T)")

        let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"))
        let calib = try Calibration.sequences(from: stream, seqLen: T, count: B)
        var spec = Recipe.TrainSpec()
        spec.steps = steps + 1; spec.batchSize = B; spec.evalEvery = 0; spec.saveEvery = 0; spec.lr = 1e-5; spec.mode = .qat
        // Train the layers; the embedding and head stay frozen (not what this shape measures).
        spec.trainableParams = ["model.layers.*"]
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qat-bench-moe-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var opts = Trainer.Options(outputDir: dir, checkpointDir: dir + "/ckpt")
        opts.quiet = true; opts.finalEvaluation = false
        var times: [Double] = [], routing: [Double] = [], dispatch: [Double] = []
        var last = Date()
        opts.onStep = { _ in
            let now = Date()
            times.append(now.timeIntervalSince(last)); last = now
            routing.append(StepProfiler.wallSeconds(prefix: "moe.route")); dispatch.append(StepProfiler.wallSeconds(prefix: "moe.dispatch"))
            if ProcessInfo.processInfo.environment["QAT_BENCH_PROFILE"] != nil {
                FileHandle.standardError.write(Data((StepProfiler.report() + "\n").utf8))
            }
            StepProfiler.reset()
        }
        let trainer = try QATTrainer(
            model: model, quantizers: set, calibrationSequences: calib, calibrationBatchSize: B, spec: spec,
            seqLen: T, trainStream: stream, validationStream: Array(stream.prefix(N + 1)), validationSequences: 1,
            options: opts)
        StepProfiler.enabled = true
        defer { StepProfiler.enabled = false }
        last = Date()
        StepProfiler.reset()
        _ = try trainer.run()
        // Median of the measured steps (the first is warm-up).
        let idx = Array(times.indices.dropFirst()).sorted { times[$0] < times[$1] }
        let m = idx.isEmpty ? times.count - 1 : idx[idx.count / 2]
        let step = times[m], route = routing[m], disp = dispatch[m]
        res.json.set("qat_step_s", .double(step))
        res.json.set("qat_tokens_per_s", .double(Double(N) / step))
        res.json.set("routing_share", .double(route / step))
        res.json.set("dispatch_share", .double(disp / step))
        res.json.set("peak_rss_MB", .double(peakRSSMegabytes()))
        let counts = model.moeBlocks[0].tokensPerExpert
        res.json.set("tokens_per_expert_min", .int(Int64(counts.min() ?? 0)))
        res.json.set("tokens_per_expert_max", .int(Int64(counts.max() ?? 0)))
        res.lines.append(
            String(
                format: "[qwen3-moe] QAT step %.3f s (%.0f tok/s); routing %.1f%%, dispatch %.1f%% of the step; "
                    + "tokens per expert %d…%d; peak RSS %.0f MB",
                step, Double(N) / step, 100 * route / step, 100 * disp / step, counts.min() ?? 0, counts.max() ?? 0,
                peakRSSMegabytes()))
        say(res.lines.last!)
        return res
    }
}
