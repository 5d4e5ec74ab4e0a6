import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain

/// `qat selftest --device cuda`, training half: whole-model gradients of the fused loss heads
/// (cross-entropy and the three divergences) and the AdamW update on the GPU against the CPU.
extension CUDASelftest {
    mutating func training() throws {
        let (batch, seqLen) = (2, 40)
        for (index, (name, config)) in Self.modelConfigs.enumerated() {
            let model = try Self.selftestModel(config)
            var g = SplitMix64(seed: 21)
            let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
            var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
            targets[3] = CrossEntropy.ignoreIndex
            // Plain, then (on two shapes) NVFP4 W4A4 + FP8 KV with the clipped STE everywhere.
            for quantized in index < 2 ? [false, true] : [false] {
                if quantized {
                    let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"), ste: .clipped)
                    try Calibration.run(model: model, quantizers: set, sequences: [tokens], seqLen: seqLen * batch, batchSize: 1)
                }
                let label = "\(name)\(quantized ? " NVFP4+FP8 KV, clipped STE" : "")"
                try gradientCheck(
                    label, model: model, tokens: tokens, targets: targets, batch: batch, seqLen: seqLen, loss: nil,
                    quantized: quantized)
            }
        }
        // Distillation: each divergence, T = 2, kd_ratio 0.5 (CE and KD both), on the tiny-qwen3 shape.
        let config = Self.modelConfigs[1].1
        let student = try Self.selftestModel(config), teacher = try CausalLM(config: config, seed: 31, std: 0.08)
        var g = SplitMix64(seed: 22)
        let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        let targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
        for (loss, beta) in [(Recipe.KDLoss.forwardKL, 0.5), (.reverseKL, 0.5), (.jsd, 0.3)] {
            var spec = Recipe.DistillSpec()
            spec.loss = loss; spec.beta = beta; spec.temperature = 2; spec.kdRatio = 0.5
            let kd = try DistillationLoss(teacher: teacher, studentVocab: config.vocabSize, spec: spec)
            try gradientCheck(
                "tiny-qwen3 QAD \(loss.rawValue)", model: student, tokens: tokens, targets: targets, batch: batch, seqLen: seqLen,
                loss: kd)
        }
        try topKTraining()
        try adamwCheck()
        try lossRows()
    }

    static func selftestModel(_ config: ModelConfig) throws -> CausalLM {
        let model = try CausalLM(config: config, seed: 11, std: 0.08)
        for p in model.parameters where p.name.hasSuffix(".bias") {  // random biases, not zeros
            let r = random(p.value.count, seed: 12, scale: 0.1)
            for i in 0..<r.count { p.value[i] = r[i] }
        }
        return model
    }

    /// One micro-batch's loss and every parameter gradient, CPU against GPU (fp32 and bf16);
    /// `loss`: nil (cross-entropy), a `DistillationLoss` or a `TopKDistillationLoss` (whose cache
    /// holds the batch's sequences 0..<batch).
    mutating func gradientCheck(
        _ label: String, model: CausalLM, tokens: [Int32], targets: [Int32], batch: Int, seqLen: Int,
        loss other: TrainingLoss?, quantized: Bool = false
    ) throws {
        let kd = other as? DistillationLoss, topK = other as? TopKDistillationLoss
        // (Quantized: both sides use the host's calibration, so the fake quant sees the same amax.)
        let n = batch * seqLen, C = model.config.hiddenSize
        let valid = targets.filter { $0 != CrossEntropy.ignoreIndex }.count, scale = 1 / Float(valid)
        for p in model.parameters { p.setRequiresGrad(true); p.grad!.zero() }
        model.markWeightsChanged()
        let hidden = try model.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: true)
        let dHidden = Tensor(shape: [n, C])
        let micro = MicroBatch(tokens: tokens, targets: targets, batch: batch, seqLen: seqLen, sequenceIndices: Array(0..<batch))
        let loss: TrainingLoss = other ?? CrossEntropyLoss(vocab: model.config.vocabSize)
        let cpu = try loss.run(model: model, hidden: hidden, batch: micro, gradScale: scale, dHidden: dHidden.data)
        try model.backward(dHidden: dHidden.data)
        let cpuGrads = model.parameters.map { Array(UnsafeBufferPointer(start: $0.grad!.data, count: $0.count)) }
        // bf16 rounds the quantizers' inputs, which moves elements across E2M1 code boundaries:
        // a quantized model in bf16 is another function, so it is compared in fp32 only.
        for precision in quantized ? [Precision.fp32] : Precision.allCases {
            let gm = try CUDAModel(model: model, device: device, precision: precision)
            try gm.prepareTraining()
            try gm.zeroGradients()
            _ = try gm.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: true)
            let head: CUDAModel.LossHead
            if let kd {
                // Inference-only, as the trainer's (bf16: the Linear weights on the device in bf16 only).
                let teacher = try CUDAModel(model: kd.teacher, device: device, precision: precision, inferenceOnly: true)
                let th = try teacher.forward(tokens: tokens, batch: batch, seqLen: seqLen)
                let k = kd.constants
                let kind = k.divergence == .forwardKL ? 0 : (k.divergence == .reverseKL ? 1 : 2)
                let beta: Float = {
                    if case .jsd(let b) = k.divergence { return Float(b) }; return 0
                }()
                head = .distillation(teacher: teacher, hidden: th, kind: kind, beta: beta, temperature: k.temperature, kdRatio: k.kdRatio)
            } else if let topK {
                let t = try topK.teacherRows(for: micro)
                head = .topK(
                    try gm.uploadTopKTeacher(
                        ids: t.ids, logprobs: t.logprobs, rest: t.rest, counts: t.counts, topK: topK.reader.header.topK,
                        objective: topK.objective, constants: topK.constants))
            } else {
                head = .crossEntropy
            }
            let r = try gm.lossBackward(head, targets: targets, gradScale: scale)
            try gm.backward(dHidden: r.dHidden)
            let tag = precision == .fp32 ? "fp32" : "bf16"
            let lossError = abs(r.ce - cpu.ce) / Double(valid) + abs(r.kd - cpu.kd) / Double(valid)
            add("train \(label): loss \(tag)", lossError, precision == .fp32 ? 1e-5 : 2e-2, "|Δ| mean")
            let gpuGrads = try deviceGradients(gm, model)
            let (worst, worstName) = Self.worstRelative(cpuGrads, gpuGrads, model)
            add(
                "train \(label): gradients \(tag) (worst \(worstName.isEmpty ? "-" : worstName))", worst,
                precision == .fp32 ? 2e-3 : 1e-1, "max |Δ|/max")
            if precision == .fp32 {
                // zeroGradients clears nothing (`CUDAModel.Gradients`): the same step after it must give the same gradients
                // bit for bit over the stale ones, and once more without it twice them (every writer adds then; to fp32
                // round-off: the embedding's rows add their tokens' gradients one by one onto what is there).
                var steps: [[[Float]]] = []
                for zero in [true, false] {
                    if zero { try gm.zeroGradients() }
                    _ = try gm.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: true)
                    try gm.backward(dHidden: try gm.lossBackward(head, targets: targets, gradScale: scale).dHidden)
                    steps.append(try deviceGradients(gm, model))
                }
                let doubled = gpuGrads.map { $0.map { 2 * $0 } }
                let (again, againName) = Self.worstRelative(gpuGrads, steps[0], model)
                let (twice, twiceName) = Self.worstRelative(doubled, steps[1], model)
                add("train \(label): the step again after zeroGradients (worst \(againName.isEmpty ? "-" : againName))", again, 0)
                add("train \(label): the step again without zeroGradients = 2× (worst \(twiceName.isEmpty ? "-" : twiceName))", twice, 1e-6)
            }
            guard precision == .bf16 else { continue }
            // The same step with the loss in chunks of 7 rows: 12 chunks, the lm_head's weight gradient one product
            // per group of 8 (the last group 4 chunks, its last chunk 3 rows). The losses must be equal. The
            // gradients match to bf16 round-off, not fp32's: besides the order of the lm_head dW sums, the dX
            // products have other shapes (7 rows, not 80), which cuBLAS may sum in another order, and a last-bit
            // change of dHidden can flip the bf16 rounding of a later dy (on the H200: 1.75e-3 on the Mistral shape,
            // under 3.3e-7 on the others). A wrong group offset or row count would be off by O(1).
            gm.lossChunkRows = 7
            try gm.zeroGradients()
            _ = try gm.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: true)
            let rc = try gm.lossBackward(head, targets: targets, gradScale: scale)
            try gm.backward(dHidden: rc.dHidden)
            let (w, wn) = Self.worstRelative(gpuGrads, try deviceGradients(gm, model), model)
            let lossDelta = abs(rc.ce - r.ce) + abs(rc.kd - r.kd)
            add(
                "train \(label): bf16 loss in 12 chunks (lm_head dW per 8) vs 1 (worst \(wn.isEmpty ? "-" : wn)), loss |Δ| \(lossDelta)",
                lossDelta > 1e-6 * Double(valid) ? .nan : w, 2e-2, "max |Δ|/max")
        }
        for p in model.parameters { p.setRequiresGrad(false) }
    }

    /// Every parameter's device gradient (an empty array where the model has none).
    func deviceGradients(_ gm: CUDAModel, _ model: CausalLM) throws -> [[Float]] {
        try model.parameters.map { p in
            guard let ptr = try gm.gradient(p) else { return [] }
            var dg = [Float](repeating: 0, count: p.count)
            try dg.withUnsafeMutableBytes { try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, ptr, p.count * 4), "cuMemcpyDtoH") }
            return dg
        }
    }

    /// The largest max |Δ|/max over the parameters that both gradient lists have, and its parameter's name.
    static func worstRelative(_ a: [[Float]], _ b: [[Float]], _ model: CausalLM) -> (Double, String) {
        var worst = 0.0, worstName = ""
        for (p, (x, y)) in zip(model.parameters, zip(a, b)) where !x.isEmpty && !y.isEmpty {
            let m = Double(x.map { abs($0) }.max() ?? 0)
            let e = maxAbsDiff(x, y) / max(m, 1e-12)
            if e > worst || e.isNaN { worst = e; worstName = p.name }
            if e.isNaN { break }
        }
        return (worst, worstName)
    }

    /// Three AdamW steps on the device against the CPU optimizer, bit for bit; the second with
    /// its gradient clipped (the CPU scales the gradient by `GradientClipping.scale`, the device
    /// reads the unclipped one times `CUDAStepBackend.clipCoefficient` in `adamw_update`). Three
    /// layouts: float4 only, float4 and a tail of 3, and arrays one float off 16-byte alignment (element by element).
    private mutating func adamwCheck() throws {
        try adamwRefreshCheck()
        for (count, offset) in [(5000, 0), (5003, 0), (5001, 1)] {
            let value = Tensor(shape: [count], values: Self.random(count, seed: 41)), grad = Tensor(shape: [count])
            let cfg = OptimizerConfig(
                defaults: AdamWHyperparameters(lr: 1e-3, weightDecay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8),
                selection: try ParameterSelection(trainable: nil, frozen: nil), lrConfig: nil)
            let opt = try AdamW(parameters: [("w.weight", value, grad)], config: cfg)
            let skip = CUdeviceptr(4 * offset)
            let p = try gpu([Float](repeating: 0, count: offset) + Self.random(count, seed: 41))
            let gd = try DeviceBuffer(device, floats: count + offset)
            let m = try DeviceBuffer(device, floats: count + offset), v = try DeviceBuffer(device, floats: count + offset)
            try m.zero(); try v.zero()
            var clipped: Float = 1
            for step in 0..<3 {
                let gv = [Float](repeating: 0, count: offset) + Self.random(count, seed: 42 + UInt64(step), scale: 0.01)
                for i in 0..<count { grad[i] = gv[offset + i] }
                try gv.withUnsafeBytes { try gd.upload($0.baseAddress!, bytes: $0.count) }
                var clip: Float = 1
                if step == 1 {
                    let norm = GradientClipping.globalNorm([grad]), maxNorm = 0.37 * norm
                    GradientClipping.scale([grad], norm: norm, maxNorm: maxNorm)
                    clip = CUDAStepBackend.clipCoefficient(norm: norm, maxNorm: maxNorm)
                    clipped = clip
                }
                opt.step(lrFactor: 0.5)
                let c = AdamW.coefficients(opt.groups[0].hyper, lr: opt.groups[0].hyper.lr * 0.5, step: step + 1)
                try device.adamw(
                    p: p.ptr + skip, g: gd.ptr + skip, m: m.ptr + skip, v: v.ptr + skip, count: count, decay: c.decay,
                    lerpSmall: c.lerpSmall, lerpWeight: c.lerpWeight, beta2: c.beta2, oneMinusBeta2: c.oneMinusBeta2,
                    bc2Sqrt: c.bc2Sqrt, eps: c.eps, negStepSize: c.negStepSize, clip: clip)
            }
            let host = Array(UnsafeBufferPointer(start: value.data, count: count))
            let mismatches = Self.bitMismatches(host, Array(try p.floats(count + offset).dropFirst(offset)))
            // (A coefficient of 1 would not exercise the clipped read: then the check itself is wrong.)
            add(
                "AdamW 3 steps (weight decay, lr factor, clip \(clipped)), \(count) floats\(offset > 0 ? ", unaligned" : "")",
                clipped < 1 ? mismatches : .nan, 0, "mismatches")
        }
    }

    /// One AdamW step that also rewrites the weight's bf16 product copy (`CUDAModel.WeightRefresh`): the new fp32
    /// weights bit for bit as the CPU optimizer's, and the copy as the bf16 rounding of those weights (a tail of 3
    /// included) or of their NVFP4 fake quant on the CPU (`NVFP4.fakeQuant`, both modes, rows of 3 and 5 16-blocks),
    /// or, for a norm weight or bias read as stored (`readStoredDType`), the fp32 value of that bf16 rounding.
    private mutating func adamwRefreshCheck() throws {
        let cases: [(rows: Int, cols: Int, nvfp4: NVFP4.FakeQuantMode?, rounded: Bool)] = [
            (61, 48, .modelOpt, false), (37, 80, .export, false), (1, 5003, nil, false), (1, 2051, nil, true),
        ]
        for (rows, cols, mode, roundedCopy) in cases {
            let count = rows * cols
            let value = Tensor(shape: [count], values: Self.random(count, seed: 51)), grad = Tensor(shape: [count])
            let cfg = OptimizerConfig(
                defaults: AdamWHyperparameters(lr: 1e-2, weightDecay: 0.1, beta1: 0.9, beta2: 0.95, eps: 1e-8),
                selection: try ParameterSelection(trainable: nil, frozen: nil), lrConfig: nil)
            let opt = try AdamW(parameters: [("w.weight", value, grad)], config: cfg)
            let gv = Self.random(count, seed: 52, scale: 0.01)
            for i in 0..<count { grad[i] = gv[i] }
            let p = try gpu(Self.random(count, seed: 51)), gd = try gpu(gv)
            let m = try DeviceBuffer(device, floats: count), v = try DeviceBuffer(device, floats: count),
                w16 = try DeviceBuffer(device, bytes: count * (roundedCopy ? 4 : 2))
            try m.zero(); try v.zero()
            opt.step(lrFactor: 1)
            let c = AdamW.coefficients(opt.groups[0].hyper, lr: opt.groups[0].hyper.lr, step: 1)
            let host = Array(UnsafeBufferPointer(start: value.data, count: count))
            let amax = Reduce.absMax(host, count: count) * 0.8  // (some blocks saturate)
            try device.adamw(
                p: p.ptr, g: gd.ptr, m: m.ptr, v: v.ptr, count: count, decay: c.decay, lerpSmall: c.lerpSmall, lerpWeight: c.lerpWeight,
                beta2: c.beta2, oneMinusBeta2: c.oneMinusBeta2, bc2Sqrt: c.bc2Sqrt, eps: c.eps, negStepSize: c.negStepSize,
                refresh: CUDAModel.WeightRefresh(
                    copy: roundedCopy
                        ? .rounded(ObjectIdentifier(value))
                        : .product(linear: ObjectIdentifier(value), nvfp4: mode.map { (amax: amax, export: $0 == .export) }),
                    w16: w16.ptr))
            var expected = host
            if let mode { NVFP4.fakeQuant(host, &expected, rows: rows, cols: cols, globalAmax: amax, mode: mode) }
            let what = mode.map { "NVFP4 \($0.rawValue) [\(rows)×\(cols)]" } ?? "bf16\(roundedCopy ? " as fp32" : ""), \(count) floats"
            let copyMismatches =
                roundedCopy
                ? Self.bitMismatches(Self.roundedBF16(expected), try w16.floats(count))
                : try bf16Mismatches(w16, of: expected)
            add(
                "AdamW step with the product copy refreshed (\(what)): weights, copy",
                Self.bitMismatches(host, try p.floats(count)) + copyMismatches, 0, "mismatches")
        }
    }
}
