import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant

/// `qat selftest --device cuda`: activation checkpointing (`train.activation_checkpointing`)
/// gives the same gradients, bit for bit, as the run that keeps every layer's activations, and
/// takes less device memory.
extension CUDASelftest {
    /// A 4-layer tiny-qwen3 (q/k norms, tied head), two accumulated micro-batches, fp32 and bf16,
    /// unquantized and NVFP4 W4A4 + FP8 KV with the clipped STE: every gradient and the loss with
    /// checkpointing on against off (0 bits may differ), and the peak device memory of both, whose
    /// difference must be the (L − 1) activation sets checkpointing does not keep.
    mutating func checkpointing() throws {
        let config = ModelConfig(
            family: .qwen3, vocabSize: 512, hiddenSize: 128, intermediateSize: 384, numLayers: 4, numHeads: 4,
            numKVHeads: 2, headDim: 48, rmsNormEps: 1e-6, ropeTheta: 1e6, maxPositionEmbeddings: 256,
            tieWordEmbeddings: true, qkNorm: true)
        let (batch, seqLen, micro) = (2, 48, 2)
        let model = try Self.selftestModel(config)
        var g = SplitMix64(seed: 61)
        let tokens = (0..<micro).map { _ in (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) } }
        let targets = tokens.map { CrossEntropy.shiftedTargets(labels: $0, batch: batch, seqLen: seqLen) }
        let scale = 1 / Float(targets.joined().filter { $0 != CrossEntropy.ignoreIndex }.count)
        for p in model.parameters { p.setRequiresGrad(true) }
        defer {
            for p in model.parameters { p.setRequiresGrad(false) }
            model.activationCheckpointing = false
        }
        for quantized in [false, true] {
            if quantized {
                let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"), ste: .clipped)
                try Calibration.run(model: model, quantizers: set, sequences: [tokens[0]], seqLen: seqLen * batch, batchSize: 1)
            }
            for precision in Precision.allCases {
                var runs: [(grads: [Float], loss: Double, peak: Int)] = []
                var layerBytes = 0
                for on in [false, true] {
                    model.activationCheckpointing = on
                    let before = device.bytesInUse
                    device.resetPeak()
                    var grads: [Float] = [], loss = 0.0
                    do {
                        let gm = try CUDAModel(model: model, device: device, precision: precision)
                        try gm.prepareTraining()
                        try gm.zeroGradients()
                        for m in 0..<micro {
                            _ = try gm.forward(tokens: tokens[m], batch: batch, seqLen: seqLen, saveForBackward: true)
                            let r = try gm.lossBackward(.crossEntropy, targets: targets[m], gradScale: scale)
                            try gm.backward(dHidden: r.dHidden)
                            loss += r.ce
                        }
                        for p in model.parameters {
                            guard let ptr = try gm.gradient(p) else { continue }
                            var dg = [Float](repeating: 0, count: p.count)
                            try dg.withUnsafeMutableBytes {
                                try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, ptr, p.count * 4), "cuMemcpyDtoH")
                            }
                            grads += dg
                        }
                        layerBytes = gm.layerActivationBytes
                    }
                    runs.append((grads, loss, device.peakBytes - before))
                }
                let label = "checkpointing \(quantized ? "NVFP4+FP8 KV " : "")\(precision.rawValue)"
                let differ = Self.bitMismatches(runs[0].grads, runs[1].grads) + (runs[0].loss == runs[1].loss ? 0 : 1)
                add("\(label): gradients + loss, on vs off", differ, 0, "bits ≠")
                let expected = (config.numLayers - 1) * layerBytes, saved = runs[0].peak - runs[1].peak
                log(
                    "      peak device memory: \(runs[0].peak >> 10) KiB without, \(runs[1].peak >> 10) KiB with checkpointing "
                        + "(saved \(saved >> 10) KiB; \(config.numLayers - 1) activation sets = \(expected >> 10) KiB)")
                add("\(label): peak memory saved vs expected", max(0, 1 - Double(saved) / Double(max(expected, 1))), 0.01, "shortfall")
            }
        }
    }
}
