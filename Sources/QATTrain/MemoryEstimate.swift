import Foundation
import QATCore
import QATModels

/// What a training run will hold in memory, computed on paper from the model shape, so a run
/// that cannot fit stops before it starts (with the estimate) instead of being killed by the
/// OOM killer halfway through.
public struct MemoryEstimate: Sendable, CustomStringConvertible {
    public var weights = 0.0, gradients = 0.0, optimizer = 0.0, fakeQuantWeights = 0.0
    public var activations = 0.0, teacher = 0.0, lossBuffers = 0.0
    /// Pipeline stages: each micro-batch's received input, in-flight sends and (last stage,
    /// live teacher) teacher hidden states.
    public var pipelineBuffers = 0.0

    public var total: Double { weights + gradients + optimizer + fakeQuantWeights + activations + teacher + lossBuffers + pipelineBuffers }

    static func gib(_ b: Double) -> String { String(format: "%.2f GiB", b / 1_073_741_824) }

    public var description: String {
        "\(MemoryEstimate.gib(total)) (weights \(MemoryEstimate.gib(weights)), gradients "
            + "\(MemoryEstimate.gib(gradients)), AdamW \(MemoryEstimate.gib(optimizer)), fake-quant "
            + "weights \(MemoryEstimate.gib(fakeQuantWeights)), activations "
            + "\(MemoryEstimate.gib(activations)), teacher \(MemoryEstimate.gib(teacher)), loss buffers "
            + "\(MemoryEstimate.gib(lossBuffers))\(pipelineBuffers > 0 ? ", pipeline buffers \(MemoryEstimate.gib(pipelineBuffers))" : ""))"
    }

    /// fp32 everywhere: weights (+ the fake-quant copy of each quantized weight), gradients
    /// and two AdamW moments for trainable parameters (for `optimizerStateCount` of them when
    /// ZeRO-1 shards the state: this rank's share), every layer's saved activations for
    /// [batch × seqLen] tokens, and with a live teacher its weights plus one layer.
    public static func training(
        config c: ModelConfig, batch: Int, seqLen: Int, parameterCount: Int, trainableCount: Int,
        optimizerStateCount: Int? = nil,
        quantizedWeightCount: Int, liveTeacher: Bool, lossBufferBytes: Int
    ) -> MemoryEstimate {
        let n = Double(batch * seqLen), C = Double(c.hiddenSize), I = Double(c.intermediateSize)
        let qd = Double(c.numHeads * c.headDim), kvd = Double(c.numKVHeads * c.headDim)
        let probs = Double(batch * c.numHeads) * Double(seqLen) * Double(seqLen)
        // LayerActivations: ln1, mid, ln2 [n, C]; q/qRaw/attnOut [n, qd]; kRaw/kRope/k/vRaw/v [n, kvd];
        // gate/up/h [n, I]; probs; the quantized input copies of the 7 Linears.
        let attention = n * (3 * C + 3 * qd + 5 * kvd) + probs + n * (C + qd)
        let dense = n * (3 * I) + n * (C + I)
        // A mixture-of-experts layer (`MoEBlock`): router probabilities [n, E]; per routed row
        // (n·k) the gathered input and expert output [C], gate/up/h [Ie] and the quantized
        // inputs of gate, up [C] and down [Ie]; the shared expert like a dense MLP; backward
        // scratch of the same size as the routed rows.
        var moeLayer = 0.0, moeBackward = 0.0
        if let m = c.moe {
            let R = n * Double(m.topK), Ie = Double(m.expertIntermediateSize), Is = Double(m.sharedExpertIntermediateSize)
            moeLayer = n * Double(m.numExperts) + R * (2 * C + 3 * Ie) + R * (2 * C + Ie) + n * (3 * Is + 2 * C + Is + 1)
            moeBackward = R * (C + 3 * Ie) + n * Double(m.numExperts) + n * (C + 3 * Is)
        }
        let sparseLayers = Double((0..<c.numLayers).filter { c.isSparse(layer: $0) }.count)
        let denseLayers = Double(c.numLayers) - sparseLayers
        let backward = n * (2 * C + (denseLayers > 0 ? 3 * I : 0) + 3 * qd + 3 * kvd) + moeBackward
        var e = MemoryEstimate()
        e.weights = 4 * Double(parameterCount)
        e.gradients = 4 * Double(trainableCount)
        e.optimizer = 8 * Double(optimizerStateCount ?? trainableCount)
        e.fakeQuantWeights = 4 * Double(quantizedWeightCount)
        // Every layer's saved buffers hold gate/up/h [n, I] as soon as one layer is dense.
        let denseBuffers = denseLayers > 0 ? Double(c.numLayers) * 3 * n * I + denseLayers * n * (C + I) : 0
        e.activations =
            4
            * (Double(c.numLayers) * attention + denseBuffers + sparseLayers * moeLayer
                + Double(c.numLayers + 1) * n * C + backward)
        // The teacher is the full model in fp32 (also under QLoRA, where the student's own
        // parameter list lacks the compressed base).
        let fullModel = CausalLM.parameterShapes(c).reduce(0.0) { $0 + Double($1.1.reduce(1, *)) }
        if liveTeacher { e.teacher = 4 * (fullModel + attention + (sparseLayers > 0 ? max(dense, moeLayer) : dense) + 2 * n * C) }
        e.lossBuffers = Double(lossBufferBytes)
        return e
    }

    /// Memory the system can still give this process (MemAvailable), nil where unknown.
    public static func availableBytes() -> Double? {
        guard let s = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8),
            let line = s.split(separator: "\n").first(where: { $0.hasPrefix("MemAvailable:") }),
            let kb = line.split(separator: " ").compactMap({ Double($0) }).first
        else { return nil }
        return kb * 1024
    }

    /// Throws when the estimate does not fit in the available memory.
    public func check(what: String) throws {
        guard let avail = MemoryEstimate.availableBytes() else { return }
        if total > avail {
            throw QATError(
                "\(what) needs about \(description), but only \(MemoryEstimate.gib(avail)) is available: "
                    + "lower train.batch_size or data.seq_len (and raise train.grad_accum to keep the batch), "
                    + "freeze parameters, or use a machine with more memory")
        }
    }
}
