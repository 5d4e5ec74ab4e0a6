import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain

/// `qat selftest --device cuda`, LoRA / QLoRA: the NVFP4 decode of QLoRA's base and the LoRA
/// dropout mask bit for bit against the CPU; whole-model adapter gradients (A and B, the base
/// frozen) against the CPU; and three AdamW steps through the two step backends (the CPU's
/// `LocalStepBackend`, the GPU's `CUDAStepBackend`) with their losses compared.
extension CUDASelftest {
    mutating func loraChecks() throws {
        try nvfp4DecodeCheck()
        try dropoutMaskCheck()
        let (batch, seqLen) = (2, 40)
        let config = Self.modelConfigs[0].1
        var g = SplitMix64(seed: 61)
        let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
        targets[5] = CrossEntropy.ignoreIndex
        let micro = MicroBatch(tokens: tokens, targets: targets, batch: batch, seqLen: seqLen)
        // LoRA on the fp32 base with dropout (the masks on both devices), unquantized and under
        // NVFP4 W4A4 + FP8 KV with the clipped STE; QLoRA over the NVFP4 base, W4A4 + FP8 KV, and
        // with only the base quantized (a function bf16 can be compared on).
        let cases: [(String, Bool, Bool, Double, [Precision])] = [
            ("LoRA dropout 0.1", false, false, 0.1, Precision.allCases),
            ("LoRA dropout 0.1, NVFP4 W4A4+FP8 KV", false, true, 0.1, [.fp32]),
            ("QLoRA W4A4+FP8 KV", true, true, 0, [.fp32]),
            ("QLoRA W4 base, dropout 0.1", true, false, 0.1, Precision.allCases),
        ]
        for (label, qlora, quantizeActivations, dropout, precisions) in cases {
            let build = {
                try Self.loraModel(
                    config, qlora: qlora, quantizeActivations: quantizeActivations, dropout: dropout, calibration: tokens)
            }
            try loraGradientCheck(label, lora: try build(), micro: micro, precisions: precisions)
            if !quantizeActivations { try loraStepsCheck(label, cpu: try build(), gpu: try build(), micro: micro) }
        }
    }

    /// `nvfp4_decode` against `NVFP4.dequantize`: quantized weights, arbitrary bytes (every code,
    /// NaN scales included), a subnormal global scale; bit for bit, and its bf16 output equal to
    /// `to_bf16` of its fp32 output.
    private mutating func nvfp4DecodeCheck() throws {
        for (rows, cols) in [(40, 64), (37, 40), (3, 7)] {
            let sizes = NVFP4Layout.bytes(rows: rows, cols: cols)
            let x = Self.quantInput(rows: rows, cols: cols, seed: UInt64(rows * cols + 7))
            let q = NVFP4.quantize(x, rows: rows, cols: cols, globalAmax: Reduce.absMax(x, count: x.count) * 0.7)
            var g = SplitMix64(seed: UInt64(rows * 1000 + cols))
            let anyPacked = (0..<sizes.packed).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let anyScales = (0..<sizes.scales).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let inputs: [(String, [UInt8], [UInt8], Float)] = [
                ("quantized", q.packed, q.scales, q.globalScale), ("any bytes", anyPacked, anyScales, 0.37),
                ("subnormal scale", anyPacked, anyScales, 3e-39),
            ]
            for (label, packed, scales, gs) in inputs {
                let cpu = NVFP4.dequantize(packed: packed, scales: scales, globalScale: gs, rows: rows, cols: cols)
                let pd = try packed.withUnsafeBytes { try DeviceBuffer(device, copying: $0.baseAddress!, bytes: $0.count) }
                let sd = try scales.withUnsafeBytes { try DeviceBuffer(device, copying: $0.baseAddress!, bytes: $0.count) }
                let out = try DeviceBuffer(device, floats: rows * cols)
                let out16 = try DeviceBuffer(device, bytes: rows * cols * 2), ref16 = try DeviceBuffer(device, bytes: rows * cols * 2)
                try device.nvfp4Decode(
                    packed: pd.ptr, scales: sd.ptr, globalScale: gs, rows: rows, cols: cols, out: out.ptr, out16: out16.ptr)
                let gpu = try out.floats(rows * cols)
                let differ = zip(cpu, gpu).filter { $0.bitPattern != $1.bitPattern && !($0.isNaN && $1.isNaN) }.count
                add("nvfp4 decode [\(rows)×\(cols)] \(label)", Double(differ), 0, "bits ≠")
                try device.toBF16(out: ref16.ptr, out.ptr, count: rows * cols)
                var h1 = [UInt16](repeating: 0, count: rows * cols), h2 = h1
                try h1.withUnsafeMutableBytes { try out16.download($0.baseAddress!, bytes: $0.count) }
                try h2.withUnsafeMutableBytes { try ref16.download($0.baseAddress!, bytes: $0.count) }
                add("nvfp4 decode → bf16 [\(rows)×\(cols)] \(label)", Double(zip(h1, h2).filter { $0 != $1 }.count), 0, "bits ≠")
            }
        }
    }

    /// `lora_dropout` against the CPU's mask (`LoRAContext.keeps`, `dropoutScale`): written,
    /// accumulated, and as bf16; a key with the high bits set (64-bit arithmetic).
    private mutating func dropoutMaskCheck() throws {
        let n = 5003
        let x = Self.random(n, seed: 51), base = Self.random(n, seed: 52)
        let ctx = LoRAContext(rank: 4, alpha: 8, dropout: 0.3, seed: 9)
        let key: UInt64 = 0xF00D_CAFE_1234_5678, threshold = ctx.dropoutThreshold, scale = ctx.dropoutScale
        let cpu = (0..<n).map { LoRAContext.keeps(key: key, element: $0, threshold: threshold) ? x[$0] * scale : 0 }
        let xd = try gpu(x), out = try DeviceBuffer(device, floats: n), acc = try gpu(base)
        let out16 = try DeviceBuffer(device, bytes: n * 2), ref16 = try DeviceBuffer(device, bytes: n * 2)
        try device.loraDropout(
            xd.ptr, out: out.ptr, out16: out16.ptr, count: n, key: key, threshold: threshold, scale: scale, accumulate: false)
        try device.loraDropout(xd.ptr, out: acc.ptr, count: n, key: key, threshold: threshold, scale: scale, accumulate: true)
        let kept = Double(cpu.filter { $0 != 0 }.count) / Double(n)
        add("LoRA dropout mask p=0.3 (kept \(String(format: "%.3f", kept)))", Self.bitMismatches(cpu, try out.floats(n)), 0, "bits ≠")
        add("LoRA dropout mask, accumulated", Self.bitMismatches(zip(base, cpu).map { $0 + $1 }, try acc.floats(n)), 0, "bits ≠")
        try device.toBF16(out: ref16.ptr, out.ptr, count: n)
        var h1 = [UInt16](repeating: 0, count: n), h2 = h1
        try h1.withUnsafeMutableBytes { try out16.download($0.baseAddress!, bytes: $0.count) }
        try h2.withUnsafeMutableBytes { try ref16.download($0.baseAddress!, bytes: $0.count) }
        add("LoRA dropout mask → bf16", Double(zip(h1, h2).filter { $0 != $1 }.count), 0, "bits ≠")
        add("LoRA dropout mask: kept fraction vs 0.7", abs(kept - 0.7), 0.03, "|Δ|")
    }

    /// A LoRA (rank 4, alpha 8) model of `config`, built as `qat apply` builds it: calibrated
    /// NVFP4 W4A4 + FP8 KV (clipped STE) when quantized, QLoRA over its NVFP4 base, B random
    /// (not zero) so that every gradient is non-trivial. `quantizeActivations` false: only the
    /// weights (the QLoRA base) are quantized. Deterministic: two calls give the same model.
    private static func loraModel(
        _ config: ModelConfig, qlora: Bool, quantizeActivations: Bool, dropout: Double, calibration: [Int32]
    ) throws -> LoRA {
        let model = try selftestModel(config)
        var spec = Recipe.LoRASpec()
        spec.rank = 4; spec.alpha = 8; spec.dropout = dropout; spec.qlora = qlora
        let lora: LoRA
        if qlora || quantizeActivations {
            let preset = try QuantConfig.preset("nvfp4_default-kv_fp8")
            let set = QuantizerSet(model: model, config: preset, ste: .clipped)
            try Calibration.run(model: model, quantizers: set, sequences: [calibration], seqLen: calibration.count, batchSize: 1)
            lora =
                qlora
                ? try LoRA.qlora(
                    source: model, quantizers: set, config: preset, ste: .clipped, nvfp4Mode: .export, spec: spec, seed: 5)
                : try LoRA.attach(to: model, quantizers: set, spec: spec, seed: 5)
            if !quantizeActivations {
                for q in lora.quantizers!.all where !q.name.hasSuffix("weight_quantizer") { q.enabled = false }
            }
        } else {
            lora = try LoRA.attach(to: model, quantizers: nil, spec: spec, seed: 5)
        }
        for (i, a) in lora.adapters.enumerated() {
            let r = random(a.B.count, seed: 70 + UInt64(i), scale: 0.05)
            for j in 0..<r.count { a.B.value[j] = r[j] }
        }
        lora.model.markWeightsChanged()
        return lora
    }

    /// Marks the adapters trainable and the base frozen, as `trainable_params` does under LoRA.
    private static func trainAdaptersOnly(_ model: CausalLM) {
        for p in model.parameters {
            p.setRequiresGrad(LoRA.trainableGlobs.contains { Glob.matches($0, p.name) })
            p.grad?.zero()
        }
    }

    /// One micro-batch's loss and the adapters' gradients, CPU against GPU; the GPU holds no
    /// gradient of anything else, and (QLoRA) no fp32 copy of a packed base weight.
    private mutating func loraGradientCheck(_ label: String, lora: LoRA, micro: MicroBatch, precisions: [Precision]) throws {
        let model = lora.model, n = micro.batch * micro.seqLen
        let valid = micro.targets.filter { $0 != CrossEntropy.ignoreIndex }.count, scale = 1 / Float(valid)
        Self.trainAdaptersOnly(model)
        lora.context.resetMicroBatches()
        let hidden = try model.forward(tokens: micro.tokens, batch: micro.batch, seqLen: micro.seqLen, saveForBackward: true)
        let dHidden = Tensor(shape: [n, model.config.hiddenSize])
        let cpu = try CrossEntropyLoss(vocab: model.config.vocabSize).run(
            model: model, hidden: hidden, batch: micro, gradScale: scale, dHidden: dHidden.data)
        try model.backward(dHidden: dHidden.data)
        let trainable = model.parameters.filter { $0.grad != nil }
        let cpuGrads = trainable.map { Array(UnsafeBufferPointer(start: $0.grad!.data, count: $0.count)) }
        for precision in precisions {
            let gm = try CUDAModel(model: model, device: device, precision: precision)
            try gm.prepareTraining()
            try gm.zeroGradients()
            lora.context.resetMicroBatches()  // the same (step, micro-batch): the CPU's dropout masks
            _ = try gm.forward(tokens: micro.tokens, batch: micro.batch, seqLen: micro.seqLen, saveForBackward: true)
            let r = try gm.lossBackward(.crossEntropy, targets: micro.targets, gradScale: scale)
            try gm.backward(dHidden: r.dHidden)
            let tag = precision == .fp32 ? "fp32" : "bf16"
            add("train \(label): loss \(tag)", abs(r.ce - cpu.ce) / Double(valid), precision == .fp32 ? 1e-5 : 2e-2, "|Δ| mean")
            var worst = 0.0, worstName = ""
            for (p, cg) in zip(trainable, cpuGrads) {
                guard let ptr = try gm.gradient(p) else { worst = .nan; worstName = p.name + " (none)"; break }
                var dg = [Float](repeating: 0, count: p.count)
                try dg.withUnsafeMutableBytes {
                    try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, ptr, p.count * 4), "cuMemcpyDtoH")
                }
                let m = Double(cg.map { abs($0) }.max() ?? 0)
                let e = m == 0 ? .nan : Self.maxAbsDiff(cg, dg) / m  // (every adapter gradient is non-zero here)
                if e > worst || e.isNaN { worst = e; worstName = p.name }
                if e.isNaN { break }
            }
            add(
                "train \(label): A/B gradients \(tag) (worst \(worstName.isEmpty ? "-" : worstName))", worst,
                precision == .fp32 ? 2e-3 : 1e-1, "max |Δ|/max")
            let extra = try gm.gradientList.filter { e in !LoRA.trainableGlobs.contains { Glob.matches($0, e.name) } }.count
            let packedWeights = lora.model.linears.filter { lora.base?.tensors[$0.name] != nil }
            let resident = packedWeights.filter { gm.tensors[ObjectIdentifier($0.weight)] != nil }.count
            add(
                "train \(label): frozen gradients + resident fp32 base copies \(tag) (packed base \(gm.packedBaseBytes) B)",
                Double(extra + resident) + (lora.base != nil && gm.packedBaseBytes == 0 ? 1 : 0), 0, "count")
        }
        for p in model.parameters { p.setRequiresGrad(false) }
    }

    /// Three AdamW steps (lr 1e-2, weight decay, clipping at 1) of the same LoRA model on each
    /// device through its step backend, dropout masks keyed to the optimizer step; the losses
    /// per step and the trained adapters (read back by `synchronizeHost`) compared.
    private mutating func loraStepsCheck(_ label: String, cpu: LoRA, gpu: LoRA, micro: MicroBatch) throws {
        let n = micro.batch * micro.seqLen, vocab = cpu.model.config.vocabSize
        let valid = micro.targets.filter { $0 != CrossEntropy.ignoreIndex }.count
        var losses: [[Double]] = [], trained: [[Float]] = []
        for lora in [cpu, gpu] {
            let model = lora.model
            Self.trainAdaptersOnly(model)
            let cfg = OptimizerConfig(
                defaults: AdamWHyperparameters(lr: 1e-2, weightDecay: 0.01, beta1: 0.9, beta2: 0.95, eps: 1e-8),
                selection: try ParameterSelection(trainable: nil, frozen: nil), lrConfig: nil)
            let opt = try AdamW(parameters: model.parameters.filter { $0.grad != nil }.map { ($0.name, $0.value, $0.grad) }, config: cfg)
            lora.context.step = { [unowned opt] in opt.stepCount }
            let backend: StepBackend =
                lora === cpu
                ? LocalStepBackend(model: model, dHidden: Tensor(shape: [n, model.config.hiddenSize]))
                : CUDAStepBackend(model: try CUDAModel(model: model, device: device, precision: .fp32)) { _ in
                    throw QATError.internal("no teacher in this check")
                }
            var l: [Double] = []
            for _ in 0..<3 {
                try backend.zeroGradients(opt)
                let parts = try backend.forwardBackward(
                    batches: [micro], loss: CrossEntropyLoss(vocab: vocab), gradScale: 1 / Float(valid), optimizer: opt)
                l.append(parts.total / Double(valid))
                _ = try backend.clipGradients(opt, maxNorm: 1)
                try backend.optimizerStep(opt, model: model, lrFactor: 1)
            }
            try backend.synchronizeHost(opt)
            lora.context.step = { 0 }  // (the optimizer goes with this scope)
            losses.append(l)
            trained.append(
                lora.adapters.flatMap { [$0.A, $0.B] }.flatMap { Array(UnsafeBufferPointer(start: $0.value.data, count: $0.count)) })
            for p in model.parameters { p.setRequiresGrad(false) }
        }
        let lossError = zip(losses[0], losses[1]).map { abs($0 - $1) / abs($0) }.max() ?? .nan
        let moved = String(format: "%.4f→%.4f", losses[0].first ?? 0, losses[0].last ?? 0)
        add("train \(label): 3 AdamW steps, losses fp32 (CPU \(moved))", lossError, 1e-4, "max |Δ|/loss")
        var d2 = 0.0, n2 = 0.0
        for (a, b) in zip(trained[0], trained[1]) { d2 += Double(a - b) * Double(a - b); n2 += Double(a) * Double(a) }
        add("train \(label): adapters after 3 steps fp32 (read back)", (d2 / max(n2, 1e-30)).squareRoot(), 1e-2, "‖Δ‖/‖A,B‖")
    }
}
