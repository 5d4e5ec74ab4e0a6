import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant

/// How close two models' logits are.
public struct LogitComparison: Sendable {
    public var maxAbsDiff: Float
    public var meanAbsDiff: Double
    /// Logits compared (positions × vocabulary).
    public var count: Int
    /// Logits that are bit-identical.
    public var identical: Int
    public var sequences: Int
    /// Mean next-token CE of each model over the compared sequences.
    public var referenceLoss: Double
    public var candidateLoss: Double
}

/// Checks that an export reproduces the fake-quant model it came from.
///
/// Exact equality is reachable, with three adjustments to the reference that make it compute
/// what the checkpoint encodes, none of which changes an ordinary model beyond an ulp:
/// 1. NVFP4 weight quantizers switch to `FakeQuantMode.export`, i.e. exactly
///    `dequantize(quantize(w))`. ModelOpt's Triton fake quant (the training default) differs
///    only on blocks whose dequantized scale is below 1e-5 or whose block scale falls below
///    2^-9 (`NVFP4`'s doc); `ExportSummary.weightMismatches` counts such elements.
/// 2. Every tensor the export stores unquantized is rounded to the dtype it was stored in
///    (an fp32-trained embedding written as bf16 is a different model otherwise).
/// 3. Every quantizer's amax is snapped to the value the export stores exactly
///    (`Exporter.snapScales`, ≤ 1 ulp; a no-op when the model was snapped before export).
/// Input and KV quantizers keep their mode: the loader re-creates them with the same scale.
/// FP8 *weights* cannot be bit-exact (ModelOpt's fake quant multiplies by 448/amax, the
/// export divides by amax/448); they differ where an element sits on an E4M3 rounding
/// boundary, by one code (counted in `ExportSummary.weightMismatches`).
public enum Verification {
    /// Applies the three adjustments above to the in-memory reference model.
    public static func alignReference(model: CausalLM, quantizers: QuantizerSet, exportDirectory: String) throws {
        let ckpt = try ModelWeights(path: exportDirectory)
        var quantizedWeights = Set<String>()
        for l in model.linears {
            guard let q = quantizers.byName[l.name + ".weight_quantizer"], q.enabled else { continue }
            if case .nvfp4 = q.format { q.nvfp4Mode = .export }
            quantizedWeights.insert(l.weight.name)
        }
        for p in model.parameters where !quantizedWeights.contains(p.name) {
            guard let d = ckpt.info(p.name)?.dtype, d == .bf16 || d == .f16 else { continue }
            var bytes = [UInt8](repeating: 0, count: p.count * 2)
            try bytes.withUnsafeMutableBytes { try DTypeConversion.fromFloat(p.value.data, count: p.count, as: d, into: $0.baseAddress!) }
            try bytes.withUnsafeBytes { try DTypeConversion.toFloat($0.baseAddress!, dtype: d, count: p.count, into: p.value.data) }
        }
        Exporter.snapScales(model: model, quantizers: quantizers)
        model.markWeightsChanged()
    }

    /// Full logits `[B·T, V]` of `model` on `tokens` (B sequences of seqLen).
    public static func logits(_ model: CausalLM, tokens: [Int32], batch: Int, seqLen: Int) throws -> Tensor {
        let n = batch * seqLen
        let hidden = try model.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: false)
        let out = Tensor(shape: [n, model.config.vocabSize], zeroed: false)
        try model.lmHead.forward(hidden, out: out.data, n: n)
        return out
    }

    /// Compares the logits of `reference` and `candidate` on `sequences` (each seqLen long).
    /// `logitsOf` computes a model's logits [B·T, V] elsewhere (the CUDA backend); default: the CPU.
    public static func compare(
        reference: CausalLM, candidate: CausalLM, sequences: [[Int32]], batchSize: Int = 4,
        logitsOf: ((CausalLM, [Int32], Int, Int) throws -> Tensor)? = nil
    ) throws -> LogitComparison {
        let logits = logitsOf ?? { try Verification.logits($0, tokens: $1, batch: $2, seqLen: $3) }
        guard let seqLen = sequences.first?.count, seqLen >= 2 else {
            throw QATError("verification needs at least one sequence of 2+ tokens")
        }
        guard reference.config.vocabSize == candidate.config.vocabSize else {
            throw QATError("the export has vocabulary \(candidate.config.vocabSize), the reference \(reference.config.vocabSize)")
        }
        let V = reference.config.vocabSize
        var maxDiff: Float = 0, sumDiff = 0.0, count = 0, same = 0
        var refLoss = 0.0, candLoss = 0.0, predicted = 0
        var done = 0
        while done < sequences.count {
            let b = min(batchSize, sequences.count - done)
            let tokens = Array(sequences[done..<(done + b)].joined())
            let r = try logits(reference, tokens, b, seqLen)
            let c = try logits(candidate, tokens, b, seqLen)
            for i in 0..<r.count {
                let d = abs(r[i] - c[i])
                if d.isNaN { maxDiff = .nan } else if !maxDiff.isNaN { maxDiff = max(maxDiff, d) }
                sumDiff += Double(d)
                if r[i].bitPattern == c[i].bitPattern { same += 1 }
            }
            count += r.count
            for s in 0..<b {
                for t in 0..<(seqLen - 1) {
                    let row = (s * seqLen + t) * V, target = Int(tokens[s * seqLen + t + 1])
                    refLoss += crossEntropy(r.data + row, V, target)
                    candLoss += crossEntropy(c.data + row, V, target)
                    predicted += 1
                }
            }
            done += b
        }
        return LogitComparison(
            maxAbsDiff: maxDiff, meanAbsDiff: sumDiff / Double(max(count, 1)), count: count, identical: same,
            sequences: sequences.count, referenceLoss: refLoss / Double(max(predicted, 1)),
            candidateLoss: candLoss / Double(max(predicted, 1)))
    }

    static func crossEntropy(_ row: UnsafeMutablePointer<Float>, _ v: Int, _ target: Int) -> Double {
        var m = -Float.infinity
        for j in 0..<v { m = max(m, row[j]) }
        var s = 0.0
        for j in 0..<v { s += exp(Double(row[j] - m)) }
        return log(s) + Double(m) - Double(row[target])
    }
}
