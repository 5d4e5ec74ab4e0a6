import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain

/// `qat selftest --device cuda`: the GPU against the CPU where whole training features meet —
/// a QAD teacher with a larger vocabulary (`mask_extra_vocab`), the trainer's gradient
/// accumulation with lr_config groups and the no-decay rule, and an honest account of where
/// NVFP4 W4A4 runs of the two devices part (E2M1 codes flipped by summation-order ulps).
extension CUDASelftest {
    mutating func parity() throws {
        try maskExtraVocabCheck()
        try trainerCheck()
        try weightRefreshCheck()
        try storedDTypeCheck()
        try nvfp4FlipDiagnostic()
    }

    /// A teacher whose vocabulary is 64 ids larger than the student's, the extra ids ignored
    /// (the CPU's `DistillationKernels.fullRow` reads the first V logits of each teacher row;
    /// the GPU's `kd_rows` the same, through `teacherStride`).
    private mutating func maskExtraVocabCheck() throws {
        let (batch, seqLen) = (2, 40)
        let config = Self.modelConfigs[1].1
        var tc = config
        tc.vocabSize = config.vocabSize + 64
        let student = try Self.selftestModel(config), teacher = try CausalLM(config: tc, seed: 33, std: 0.08)
        var g = SplitMix64(seed: 23)
        let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        let targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
        for (loss, beta) in [(Recipe.KDLoss.forwardKL, 0.5), (.jsd, 0.3)] {
            var spec = Recipe.DistillSpec()
            spec.loss = loss; spec.beta = beta; spec.temperature = 2; spec.kdRatio = 0.5
            let kd = try DistillationLoss(teacher: teacher, studentVocab: config.vocabSize, spec: spec, maskExtraVocab: true)
            try gradientCheck(
                "tiny-qwen3 QAD \(loss.rawValue), teacher vocab +64 (mask_extra_vocab)", model: student, tokens: tokens,
                targets: targets, batch: batch, seqLen: seqLen, loss: kd)
        }
    }

    /// Three `Trainer` steps of 2 accumulated micro-batches, fp32 and unquantized, on the CPU
    /// (`LocalStepBackend`) and on the GPU (`CUDAStepBackend`), with weight decay (never on norms
    /// and biases), two lr_config groups (one overriding weight_decay), a frozen tensor, a
    /// warm-up schedule and clipping: every step's loss, and every tensor's final weights
    /// relative to how far that tensor moved. (eps 1e-3 keeps AdamW's first step from turning a
    /// gradient element that is ~0 on both devices into ±lr on one.)
    private mutating func trainerCheck() throws {
        let device = self.device
        let config = Self.modelConfigs[3].1  // qwen2: q/k/v biases (no-decay), tied head
        let (batch, seqLen) = (2, 32)
        var spec = Recipe.TrainSpec()
        spec.mode = .qat; spec.steps = 3; spec.batchSize = batch; spec.gradAccum = 2; spec.lr = 2e-3
        spec.schedule = "linear"; spec.warmupSteps = 1; spec.weightDecay = 0.1; spec.eps = 1e-3; spec.maxGradNorm = 0.5
        spec.evalEvery = 0; spec.saveEvery = 0
        spec.frozenParams = ["*layers.1.self_attn.k_proj.weight"]
        spec.lrConfigYAML = "\"*mlp*\":\n  lr: 5.0e-3\n  weight_decay: 0.3\n\"*input_layernorm*\":\n  lr: 4.0e-3\n"
        spec.lrConfigSource = "selftest"
        var g = SplitMix64(seed: 71)
        let stream = (0..<((spec.steps * spec.gradAccum + 1) * batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        func train(gpu: Bool) throws -> (losses: [Double], weights: [[Float]]) {
            let model = try Self.selftestModel(config)
            let dir = NSTemporaryDirectory() + "qat-selftest-trainer-\(getpid())-\(gpu ? "gpu" : "cpu")"
            defer { try? FileManager.default.removeItem(atPath: dir) }
            var options = Trainer.Options(outputDir: dir, checkpointDir: dir + "/checkpoints")
            options.quiet = true; options.finalEvaluation = false
            if gpu {
                let gm = try CUDAModel(model: model, device: device, precision: .fp32)
                options.backend = CUDAStepBackend(model: gm) { _ in throw QATError.internal("selftest: no teacher") }
            }
            var losses: [Double] = []
            options.onStep = { losses.append($0.loss) }
            let trainer = try Trainer(
                model: model, spec: spec, seqLen: seqLen, trainStream: stream, validationStream: [], validationSequences: nil,
                options: options)
            _ = try trainer.run()
            let weights = model.parameters.map { Array(UnsafeBufferPointer(start: $0.value.data, count: $0.count)) }
            for p in model.parameters { p.setRequiresGrad(false) }
            return (losses, weights)
        }
        let cpu = try train(gpu: false), gpu = try train(gpu: true)
        let initial = try Self.selftestModel(config).parameters.map { Array(UnsafeBufferPointer(start: $0.value.data, count: $0.count)) }
        let lossError =
            cpu.losses.count == spec.steps && gpu.losses.count == spec.steps
            ? zip(cpu.losses, gpu.losses).map { abs($0 - $1) / abs($0) }.max()! : .nan
        add("trainer grad_accum 2 + lr_config: step losses fp32, relative", lossError, 1e-5, "max |Δ|/loss")
        var worst = 0.0, moved = 0
        for ((c, gw), w0) in zip(zip(cpu.weights, gpu.weights), initial) {
            let move = Self.maxAbsDiff(c, w0)
            if move > 0 { moved += 1 }
            let e = move > 0 ? Self.maxAbsDiff(c, gw) / move : Self.maxAbsDiff(c, gw)
            if e > worst || e.isNaN { worst = e }
        }
        log("      \(moved) of \(initial.count) tensors moved (one is frozen); CPU step losses \(cpu.losses), GPU \(gpu.losses)")
        add("trainer grad_accum 2 + lr_config: weights fp32", worst, 1e-3, "max |Δ|/move")
    }

    /// Two `Trainer` steps in bf16 with NVFP4 W4A4 on a model with a tied head: every Linear product copy the
    /// optimizer step rewrote in its own pass (`CUDAModel.weightRefreshes`, current afterwards) equals the copy
    /// `prepare` makes from the stepped weights, value for value, and there are such copies (the NVFP4 weights and
    /// the tied head's plain bf16 one).
    private mutating func weightRefreshCheck() throws {
        let config = Self.modelConfigs[3].1  // qwen2: tied head
        let (batch, seqLen) = (2, 32)
        let model = try Self.selftestModel(config)
        var g = SplitMix64(seed: 72)
        let stream = (0..<(3 * batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"))
        try Calibration.run(
            model: model, quantizers: set, sequences: [Array(stream.prefix(batch * seqLen))], seqLen: batch * seqLen, batchSize: 1)
        var spec = Recipe.TrainSpec()
        spec.mode = .qat; spec.steps = 2; spec.batchSize = batch; spec.lr = 1e-3; spec.evalEvery = 0; spec.saveEvery = 0
        let dir = NSTemporaryDirectory() + "qat-selftest-refresh-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = Trainer.Options(outputDir: dir, checkpointDir: dir + "/checkpoints")
        options.quiet = true; options.finalEvaluation = false
        let gm = try CUDAModel(model: model, device: device, precision: .bf16)
        try gm.readStoredDType(bf16: Set(model.parameters.map(\.name)))
        options.backend = CUDAStepBackend(model: gm) { _ in throw QATError.internal("selftest: no teacher") }
        let trainer = try Trainer(
            model: model, spec: spec, seqLen: seqLen, trainStream: stream, validationStream: [], validationSequences: nil,
            options: options)
        _ = try trainer.run()
        var current = 0, nvfp4 = 0, differ = 0
        for dl in gm.linears.values where !dl.stale {
            guard let b = dl.bf16 else { continue }
            let count = dl.linear.outFeatures * dl.linear.inFeatures
            var stepped = [UInt16](repeating: 0, count: count), prepared = stepped
            try stepped.withUnsafeMutableBytes { try b.download($0.baseAddress!, bytes: $0.count) }
            try gm.prepare(dl)
            try prepared.withUnsafeMutableBytes { try dl.bf16!.download($0.baseAddress!, bytes: $0.count) }
            current += 1
            if gm.nvfp4Quantizing(dl.linear.weightQuantizer) != nil { nvfp4 += 1 }
            differ += zip(stepped, prepared).filter { $0 != $1 }.count
        }
        // The norm weights' and biases' roundings (`readStoredDType`): current after the step, each the bf16 rounding
        // of its new master.
        var rounded = 0, roundedDiffer = 0.0
        for p in model.parameters {
            guard let r = gm.rounded[ObjectIdentifier(p)], !gm.roundedStale.contains(ObjectIdentifier(p)) else { continue }
            let master = try gm.tensors[ObjectIdentifier(p)]!.floats(p.count)
            roundedDiffer += Self.bitMismatches(Self.roundedBF16(master), try r.floats(p.count))
            rounded += 1
        }
        for p in model.parameters { p.setRequiresGrad(false) }
        add(
            "bf16 NVFP4 trainer steps: product copies rewritten by AdamW (\(current), \(nvfp4) NVFP4) vs prepare's",
            current > nvfp4 && nvfp4 > 0 ? Double(differ) : .nan, 0, "values differ")
        add(
            "bf16 NVFP4 trainer steps: roundings of norm weights and biases rewritten by AdamW (\(rounded) of \(gm.rounded.count))",
            rounded == gm.rounded.count && rounded > 0 ? roundedDiffer : .nan, 0, "values differ")
    }

    /// Where fp32 NVFP4 runs of the GPU and the CPU part. Logits of the same fp32 model on both
    /// devices, quantization off (products summed in another order: ~1e-6) and NVFP4 W4A4 + FP8
    /// KV on (the same amax on both sides); then the E2M1 codes and E4M3 block scales of the
    /// activations entering three Linears: layer 0's q_proj (its input, RMSNorm of the embedding,
    /// differs between the devices by rounding alone), layer 0's o_proj (the attention output:
    /// products and softmax summed in another order, after the q/k/v inputs' and the FP8 KV
    /// codes) and the last layer's down_proj (after every upstream flip). A differing code of
    /// layer 0's q_proj must sit next to a rounding boundary: the boundary lies between the
    /// CPU's and the GPU's value, which differ by at most `flipUlps` ulps, so a different code
    /// is a flip, not a wrong kernel. The deeper inputs can carry an upstream flip (an NVFP4 or
    /// FP8 code one step apart moves what follows by far more than ulps), so their counts are
    /// printed, not bounded.
    private mutating func nvfp4FlipDiagnostic() throws {
        let config = Self.modelConfigs[1].1
        let (batch, seqLen) = (2, 128)
        let model = try Self.selftestModel(config)
        var g = SplitMix64(seed: 81)
        let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        let cpuOff = try hostLogits(model, tokens, batch, seqLen)
        let scale = Double(cpuOff.map { abs($0) }.max()!)
        let gpuOff = try CUDAModel(model: model, device: device, precision: .fp32).logits(tokens: tokens, batch: batch, seqLen: seqLen)
        add("NVFP4 flips: logits fp32, quantization off, relative", Self.maxAbsDiff(cpuOff, gpuOff) / scale, 1e-5, "max |Δ|/max")

        let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"))
        try Calibration.run(model: model, quantizers: set, sequences: [tokens], seqLen: seqLen * batch, batchSize: 1)
        let last = model.layers.count - 1
        guard let down = model.layers[last].downProj else { throw QATError.internal("selftest model has no MLP") }
        let probes = [model.layers[0].qProj, model.layers[0].oProj, down]
        let recorders = probes.map { RecordingHook($0.inputQuantizer) }
        for (l, r) in zip(probes, recorders) { l.inputQuantizer = r }
        let cpuOn = try hostLogits(model, tokens, batch, seqLen)
        for (l, r) in zip(probes, recorders) { l.inputQuantizer = r.inner }
        let gm = try CUDAModel(model: model, device: device, precision: .fp32)
        let gpuOn = try gm.logits(tokens: tokens, batch: batch, seqLen: seqLen)
        // Measured, not bounded: how far the flips below carry (the selftest's models() bounds a shorter batch).
        log(
            String(
                format: "      NVFP4 flips: logits fp32, NVFP4 W4A4 + FP8 KV on: max |Δ|/max %.3g (quantization off: %.3g)",
                Self.maxAbsDiff(cpuOn, gpuOn) / scale, Self.maxAbsDiff(cpuOff, gpuOff) / scale))
        // The GPU's inputs of the three Linears: a training forward keeps every layer's activations.
        _ = try gm.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: true)
        guard let b = gm.buffers else { throw QATError.internal("no device buffers after a forward") }
        let n = batch * seqLen
        // (the last layer's h: each layer's is written to this scratch in turn)
        guard let h = gm.scratchBuffers[CUDAModel.hScratch] else { throw QATError.internal("selftest: no fp32 h after an fp32 forward") }
        let gpuInputs = [
            try b.layers[0].buffer(.ln).floats(n * config.hiddenSize), try b.layers[0].attn.floats(n * config.numHeads * config.headDim),
            try h.floats(n * config.intermediateSize),
        ]
        for (i, (l, r)) in zip(probes, recorders).enumerated() {
            guard let q = r.inner as? TensorQuantizer, let amax = q.amax, let x = r.captured else {
                throw QATError.internal("selftest: \(l.name) has no calibrated input quantizer or was not reached")
            }
            let f = Self.nvfp4Flips(cpu: x, gpu: gpuInputs[i], rows: n, cols: l.inFeatures, globalAmax: amax, ulps: Self.flipUlps)
            log(
                String(
                    format: "      %@ input [%d×%d]: %d of %d E2M1 codes differ (%d in %d blocks whose E4M3 scale differs; "
                        + "%d not a flip of values within %.0f ulps), "
                        + "|Δx| max %.3g of max|x| (%.0f ulps of its block max); "
                        + "farthest differing code %.1f ulps (of its block max) from its boundary",
                    l.name as NSString, n, l.inFeatures, f.codes, n * l.inFeatures, f.underScaleFlips, f.scaleFlips,
                    f.notNearBoundary, Double(Self.flipUlps), f.maxInputDiff,
                    f.maxInputUlps, f.maxBoundaryUlps))
            if i == 0 {  // (the other two: printed)
                add("NVFP4 flips: \(l.name) codes not at a boundary", Double(f.notNearBoundary), 0, "count")
            }
        }
    }

    /// How far apart (ulps of the block's largest magnitude) two values that straddle a rounding
    /// boundary may be for their different codes to count as a flip: rounding-level differences
    /// (the RMSNorm's are 1–3 ulps) against one E2M1 step of at least 1/12 of the block max.
    static let flipUlps: Float = 16

    /// Differences between the NVFP4 encodings (`NVFP4.quantize`, the export path's codes) of
    /// the CPU's (`cpu`) and the GPU's (`gpu`) copies of one activation [rows, cols]. A differing
    /// E2M1 code under equal block scales is a flip when a rounding boundary (a midpoint of the
    /// E2M1 grid times the block scale, or 0 for the sign) lies between the two values and they
    /// differ by at most `ulps` ulps of the block's largest magnitude (so the boundary is that
    /// close to both); a differing block scale is a flip when the two block maxima are within
    /// `ulps` ulps. `notNearBoundary` counts the differing codes that are not flips (a block
    /// whose scale moved far counts its differing codes, at least 1). Input differences and
    /// distances are in ulps of each block's largest magnitude; `maxInputDiff` is relative to
    /// the tensor's largest magnitude.
    public static func nvfp4Flips(cpu x: [Float], gpu y: [Float], rows: Int, cols: Int, globalAmax: Float, ulps: Float = 16) -> (
        codes: Int, scaleFlips: Int, underScaleFlips: Int, notNearBoundary: Int, maxInputDiff: Double, maxInputUlps: Double,
        maxBoundaryUlps: Double
    ) {
        precondition(x.count == rows * cols && y.count == rows * cols, "nvfp4Flips: sizes")
        let a = NVFP4.quantize(x, rows: rows, cols: cols, globalAmax: globalAmax)
        let b = NVFP4.quantize(y, rows: rows, cols: cols, globalAmax: globalAmax)
        let nb = NVFP4.blocksPerRow(cols)
        let xmax = Double(x.map { abs($0) }.max() ?? 0)
        var codes = 0, scaleFlips = 0, under = 0, far = 0, maxDiff = 0.0, maxUlps = 0.0, maxBoundary = 0.0
        let midpoints: [Float] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5]
        for r in 0..<rows {
            for j in 0..<nb {
                let blk = r * nb + j, c0 = r * cols + j * 16, w = min(16, cols - j * 16)
                var bm: Float = 0, bmGPU: Float = 0
                for i in 0..<w {
                    bm = max(bm, abs(x[c0 + i])); bmGPU = max(bmGPU, abs(y[c0 + i]))
                    maxDiff = max(maxDiff, Double(abs(x[c0 + i] - y[c0 + i])) / max(xmax, 1e-30))
                }
                let unit = max(bm.ulp, Float.leastNormalMagnitude)
                for i in 0..<w { maxUlps = max(maxUlps, Double(abs(x[c0 + i] - y[c0 + i]) / unit)) }
                func code(_ p: [UInt8], _ i: Int) -> UInt8 { (p[blk * 8 + i / 2] >> (4 * UInt8(i % 2))) & 15 }
                let differing = (0..<w).filter { code(a.packed, $0) != code(b.packed, $0) }
                codes += differing.count
                if a.scales[blk] != b.scales[blk] {
                    scaleFlips += 1
                    under += differing.count
                    let d = abs(bm - bmGPU) / unit
                    maxBoundary = max(maxBoundary, Double(d))
                    if d > ulps { far += max(differing.count, 1) }
                    continue
                }
                let s = e4m3ToFloat(a.scales[blk]) * a.globalScale
                for i in differing {
                    let u = x[c0 + i], v = y[c0 + i]
                    // The boundary nearest to u, and whether one lies between u and v.
                    var best = abs(u), between = (u < 0) != (v < 0) || u == 0 || v == 0
                    for m in midpoints {
                        let edge = m * s
                        best = min(best, abs(abs(u) - edge))
                        if (abs(u) - edge) * (abs(v) - edge) <= 0 { between = true }
                    }
                    maxBoundary = max(maxBoundary, Double(best / unit))
                    if !between || abs(u - v) / unit > ulps { far += 1 }
                }
            }
        }
        return (codes, scaleFlips, under, far, maxDiff, maxUlps, maxBoundary)
    }
}

/// Wraps a Linear's input quantizer to keep a copy of what it is given (the CPU's activation
/// entering the Linear), then quantizes as the wrapped quantizer does.
final class RecordingHook: FakeQuantHook {
    let inner: FakeQuantHook?
    var captured: [Float]?
    init(_ inner: FakeQuantHook?) { self.inner = inner }
    var name: String { inner?.name ?? "recording" }
    var isQuantizing: Bool { true }  // so that Linear.forward calls forward
    var isCalibrating: Bool { false }
    func forward(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int, cols: Int) throws {
        captured = Array(UnsafeBufferPointer(start: x, count: rows * cols))
        if let inner, inner.isQuantizing {
            try inner.forward(x, out, rows: rows, cols: cols)
        } else if UnsafePointer(out) != x {
            out.update(from: x, count: rows * cols)
        }
    }
    func backward(x: UnsafePointer<Float>, gradOut: UnsafePointer<Float>, gradIn: UnsafeMutablePointer<Float>, count: Int) {
        inner?.backward(x: x, gradOut: gradOut, gradIn: gradIn, count: count)
    }
}
