import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain

/// `qat selftest --device cuda`: bf16 training for a bf16 export (`CUDAModel.readStoredDType`).
extension CUDASelftest {
    /// A model whose embedding, norm weights and biases lie off the bf16 grid (the selftest's random values), read as
    /// their bf16 rounding, against a copy of it with those values rounded on the host and read as they are: the
    /// same loss and every gradient bit for bit, unquantized and with NVFP4 W4A4 + FP8 KV (the same amax on both;
    /// the fused `rmsnorm_nvfp4` reads the norm weights then). On the tiny-qwen3 shape (q/k norms, a tied head) and
    /// the qwen2 one (q/k/v biases).
    mutating func storedDTypeCheck() throws {
        let (batch, seqLen) = (2, 32)
        for index in [1, 3] {
            let (name, config) = Self.modelConfigs[index]
            let model = try Self.selftestModel(config), copy = try Self.selftestModel(config)
            var names = Set<String>()
            for p in CUDAModel.storedDTypeParameters(copy) {
                for i in 0..<p.count { p.value[i] = bf16ToFloat(floatToBF16(p.value[i])) }
                names.insert(p.name)
            }
            var g = SplitMix64(seed: 93)
            let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
            let targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
            let scale = 1 / Float(targets.filter { $0 != CrossEntropy.ignoreIndex }.count)
            for quantized in [false, true] {
                if quantized {
                    let preset = try QuantConfig.preset("nvfp4_default-kv_fp8")
                    let setCopy = QuantizerSet(model: copy, config: preset), set = QuantizerSet(model: model, config: preset)
                    try Calibration.run(model: copy, quantizers: setCopy, sequences: [tokens], seqLen: seqLen * batch, batchSize: 1)
                    try set.restore(Dictionary(setCopy.stateTensors(), uniquingKeysWith: { a, _ in a }), model: model)
                }
                func run(_ m: CausalLM, rounding: Set<String>?) throws -> (loss: Double, grads: [[Float]]) {
                    for p in m.parameters { p.setRequiresGrad(true) }
                    defer { for p in m.parameters { p.setRequiresGrad(false) } }
                    let gm = try CUDAModel(model: m, device: device, precision: .bf16)
                    if let rounding { try gm.readStoredDType(bf16: rounding) }
                    try gm.prepareTraining()
                    try gm.zeroGradients()
                    _ = try gm.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: true)
                    let r = try gm.lossBackward(.crossEntropy, targets: targets, gradScale: scale)
                    try gm.backward(dHidden: r.dHidden)
                    return (r.ce, try deviceGradients(gm, m))
                }
                let a = try run(model, rounding: names), b = try run(copy, rounding: nil)
                let differ = zip(a.grads, b.grads).reduce(0.0) { $0 + Self.bitMismatches($1.0, $1.1) }
                add(
                    "bf16 read as stored, \(name)\(quantized ? " NVFP4+FP8 KV" : ""): loss and gradients vs the host-rounded copy "
                        + "(\(names.count) parameters rounded)",
                    a.loss.bitPattern == b.loss.bitPattern && names.count > 3 ? differ : .nan, 0, "values differ")
            }
        }
    }
}
