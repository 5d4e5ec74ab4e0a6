import Foundation
import QATCore
import QATIO

/// A Llama-family causal LM (Llama, Mistral, Qwen2, Qwen3) over fp32 master weights, with
/// a hand-written forward and backward (llm.c style) and fake-quant hooks on every Linear
/// and on the KV states.
///
/// `forward` returns the final normalised hidden states [B·T, C]; the lm_head and the loss
/// are applied by a loss head (plain or fused chunked) so that the full logits need not
/// exist. `backward` takes d loss / d hidden and accumulates every parameter gradient.
public final class CausalLM: @unchecked Sendable {
    public let config: ModelConfig
    /// Every parameter, in HF order, once (a tied lm_head shares the embedding), then any
    /// added with `addParameters` (LoRA adapters).
    public private(set) var parameters: [Parameter]
    /// True during a forward with saveForBackward (training); LoRA dropout is applied only then.
    public private(set) var isTrainingForward = false
    public let embed: Parameter
    public let layers: [DecoderLayer]
    public let finalNorm: Parameter
    public let lmHead: Linear
    let rope: RoPE

    /// Mixture-of-experts models: the load-balancing loss coefficient (0: off) and the factor
    /// its gradient is scaled by (the trainer's micro-batch averaging); see `routerAuxLoss`.
    public var routerAuxLossCoef: Float = 0
    public var routerAuxLossScale: Double = 1
    var auxGradientBuffer: Tensor?

    // Activation state of the last forward.
    private var shape: (batch: Int, seqLen: Int, saved: Bool, checkpointed: Bool)?
    private var tokens: [Int32] = []
    var residuals: [Tensor] = []  // saved: L+1 buffers [N, C]; else 1
    var acts: [LayerActivations] = []  // saved: L (1 reused with activation checkpointing); else 1 reused
    /// Activation checkpointing (`train.activation_checkpointing`): a training forward keeps
    /// only each layer's input and one reusable activation set; backward recomputes each layer
    /// (`CausalLM+Checkpointing.swift`). A `CUDAModel` of this model follows the same flag.
    public var activationCheckpointing = false
    private var finalHidden: Tensor?
    private var finalRstd: Tensor?
    private var grads: BackwardBuffers?

    public var parameterByName: [String: Parameter] { Dictionary(uniqueKeysWithValues: parameters.map { ($0.name, $0) }) }
    /// The Linears this model (stage) runs: its layers', then the lm_head on the last stage.
    public var linears: [Linear] { layers.flatMap(\.linears) + (isLastStage ? [lmHead] : []) }

    /// The decoder layers this model holds: all of them, or one pipeline stage's contiguous
    /// range. A stage holds the embedding only if it is the first (or the last, with tied
    /// embeddings) and the final norm and lm_head only if it is the last; the pieces it does
    /// not hold are empty placeholders, absent from `parameters` and `linears`.
    public let layerRange: Range<Int>
    public var isFirstStage: Bool { layerRange.lowerBound == 0 }
    public var isLastStage: Bool { layerRange.upperBound == config.numLayers }

    /// Whether a parameter name belongs to the layers in `range` (with the embedding on the
    /// first stage and the final norm / lm_head on the last; a tied embedding on both).
    public static func belongs(_ name: String, to range: Range<Int>, config: ModelConfig) -> Bool {
        if name.hasPrefix("model.layers.") {
            let rest = name.dropFirst("model.layers.".count)
            guard let i = Int(rest.prefix { $0.isNumber }) else { return false }
            return range.contains(i)
        }
        let last = range.upperBound == config.numLayers
        if name.hasPrefix("model.embed_tokens") { return range.lowerBound == 0 || (last && config.tieWordEmbeddings) }
        return last
    }

    /// Builds the model around parameters (names and shapes are checked). With `layerRange`,
    /// a pipeline stage: `params` needs only the tensors that `belongs` to it.
    public init(config: ModelConfig, parameters params: [String: Tensor], layerRange: Range<Int>? = nil) throws {
        self.config = config
        let range = layerRange ?? 0..<config.numLayers
        guard range.lowerBound >= 0, range.upperBound <= config.numLayers, !range.isEmpty else {
            throw QATError("pipeline stage layers \(range) are outside the model's \(config.numLayers) layers")
        }
        self.layerRange = range
        let first = range.lowerBound == 0, last = range.upperBound == config.numLayers
        var ordered: [Parameter] = []
        func placeholder(_ name: String) -> Parameter { Parameter(name: name, value: Tensor(shape: [0, config.hiddenSize])) }
        func take(_ name: String, _ shape: [Int]) throws -> Parameter {
            guard let t = params[name] else {
                throw QATError("missing tensor \(name) (expected shape \(shape) for this \(config.family.rawValue) config)")
            }
            guard t.shape == shape else { throw QATError("tensor \(name) has shape \(t.shape), but config.json implies \(shape)") }
            let p = Parameter(name: name, value: t)
            ordered.append(p)
            return p
        }
        func linear(_ name: String, out: Int, inp: Int, bias: Bool) throws -> Linear {
            let w = try take(name + ".weight", [out, inp])
            let b = bias ? try take(name + ".bias", [out]) : nil
            return Linear(name: name, weight: w, bias: b)
        }
        let c = config, C = c.hiddenSize, D = c.headDim
        embed =
            first || (last && c.tieWordEmbeddings)
            ? try take("model.embed_tokens.weight", [c.vocabSize, C]) : placeholder("model.embed_tokens.weight")
        var layers: [DecoderLayer] = []
        for i in range {
            let p = "model.layers.\(i)"
            let inNorm = try take("\(p).input_layernorm.weight", [C])
            let q = try linear("\(p).self_attn.q_proj", out: c.numHeads * D, inp: C, bias: c.attentionBias)
            let k = try linear("\(p).self_attn.k_proj", out: c.numKVHeads * D, inp: C, bias: c.attentionBias)
            let v = try linear("\(p).self_attn.v_proj", out: c.numKVHeads * D, inp: C, bias: c.attentionBias)
            let o = try linear("\(p).self_attn.o_proj", out: C, inp: c.numHeads * D, bias: c.outputBias)
            let qn = c.qkNorm ? try take("\(p).self_attn.q_norm.weight", [D]) : nil
            let kn = c.qkNorm ? try take("\(p).self_attn.k_norm.weight", [D]) : nil
            let post = try take("\(p).post_attention_layernorm.weight", [C])
            if let m = c.moe, c.isSparse(layer: i) {
                let block = try CausalLM.moeBlock(m, layer: p, hidden: C, linear: linear)
                layers.append(
                    DecoderLayer(
                        index: i, inputNorm: inNorm, q: q, k: k, v: v, o: o, qNorm: qn, kNorm: kn,
                        postNorm: post, gate: nil, up: nil, down: nil, moe: block))
                continue
            }
            let g = try linear("\(p).mlp.gate_proj", out: c.intermediateSize, inp: C, bias: c.mlpBias)
            let u = try linear("\(p).mlp.up_proj", out: c.intermediateSize, inp: C, bias: c.mlpBias)
            let d = try linear("\(p).mlp.down_proj", out: C, inp: c.intermediateSize, bias: c.mlpBias)
            layers.append(
                DecoderLayer(
                    index: i, inputNorm: inNorm, q: q, k: k, v: v, o: o, qNorm: qn, kNorm: kn,
                    postNorm: post, gate: g, up: u, down: d))
        }
        self.layers = layers
        finalNorm = last ? try take("model.norm.weight", [C]) : placeholder("model.norm.weight")
        if c.tieWordEmbeddings {
            lmHead = Linear(name: "lm_head", weight: embed, bias: nil)
        } else {
            lmHead =
                last
                ? try linear("lm_head", out: c.vocabSize, inp: C, bias: false)
                : Linear(name: "lm_head", weight: placeholder("lm_head.weight"), bias: nil)
        }
        let known = Set(ordered.map(\.name))
        let extra = params.keys.filter {
            !known.contains($0) && !(c.tieWordEmbeddings && $0 == "lm_head.weight")
                && (layerRange == nil || CausalLM.belongs($0, to: range, config: c))
        }.sorted()
        if !extra.isEmpty {
            throw QATError(
                "unexpected tensors for this \(c.family.rawValue) config: "
                    + "\(extra.prefix(5).joined(separator: ", "))\(extra.count > 5 ? " … (\(extra.count) in all)" : "")")
        }
        parameters = ordered
        rope = RoPE(invFreq: c.ropeInvFreq, headDim: D, maxPositions: max(c.maxPositionEmbeddings, 1))
    }

    /// Loads config.json and the safetensors weights of an HF model directory (bf16/f16/f32
    /// converted to fp32).
    public convenience init(directory: String, layerRange: Range<Int>? = nil) throws {
        let config = try ModelConfig.load(directory: directory)
        let range = layerRange ?? 0..<config.numLayers
        let ckpt = try ModelWeights(path: directory)
        // Shapes are checked against the config before any tensor is converted, so a
        // mismatched or hostile checkpoint fails fast and allocates nothing big (the layer
        // count first: a config claiming millions of layers must not build their name list).
        try config.checkLayerCount(against: ckpt.names, source: directory)
        for (name, shape) in CausalLM.parameterShapes(config) where CausalLM.belongs(name, to: range, config: config) {
            guard let info = ckpt.info(name) else {
                throw QATError("\(directory): missing tensor \(name) (expected shape \(shape) for this \(config.family.rawValue) config)")
            }
            guard info.shape == shape else {
                throw QATError("\(directory): tensor \(name) has shape \(info.shape), but config.json implies \(shape)")
            }
        }
        var params: [String: Tensor] = [:]
        for name in ckpt.names where CausalLM.belongs(name, to: range, config: config) { params[name] = try ckpt.floats(name) }
        try self.init(config: config, parameters: params, layerRange: layerRange)
    }

    /// Random N(0, std²) weights and unit norms, for benchmarks on a model shape.
    public convenience init(config: ModelConfig, seed: UInt64, std: Float = 0.02) throws {
        // One SplitMix64 stream over every random tensor in model order, two draws per value;
        // SplitMix64's state is a counter, so a chunk starting at value j starts its own
        // generator at seed + 2j·γ and the chunks fill in parallel with the sequential values.
        var drawn: UInt64 = 0  // values drawn before the current tensor
        var params: [String: Tensor] = [:]
        for (name, shape) in CausalLM.parameterShapes(config) {
            let t = Tensor(shape: shape, zeroed: false)
            if name.hasSuffix("norm.weight") {
                t.buffer.update(repeating: 1)
            } else if name.hasSuffix(".bias") {
                t.zero()
            } else {
                let out = t.data, first = drawn
                Parallel.forRange(t.count, costPerItem: 64) { start, end in
                    var rng = SplitMix64(seed: seed &+ (2 &* (first &+ UInt64(start))) &* SplitMix64.gamma)
                    for i in start..<end { out[i] = rng.nextGaussian() * std }
                }
                drawn &+= UInt64(t.count)
            }
            params[name] = t
        }
        try self.init(config: config, parameters: params)
    }

    /// The HF parameter names and shapes a config implies, in model order.
    public static func parameterShapes(_ c: ModelConfig) -> [(String, [Int])] {
        let C = c.hiddenSize, D = c.headDim
        var out: [(String, [Int])] = [("model.embed_tokens.weight", [c.vocabSize, C])]
        for i in 0..<c.numLayers {
            let p = "model.layers.\(i)"
            out.append(("\(p).input_layernorm.weight", [C]))
            for (n, o, inp, b) in [
                ("q_proj", c.numHeads * D, C, c.attentionBias), ("k_proj", c.numKVHeads * D, C, c.attentionBias),
                ("v_proj", c.numKVHeads * D, C, c.attentionBias), ("o_proj", C, c.numHeads * D, c.outputBias),
            ] {
                out.append(("\(p).self_attn.\(n).weight", [o, inp]))
                if b { out.append(("\(p).self_attn.\(n).bias", [o])) }
            }
            if c.qkNorm { out += [("\(p).self_attn.q_norm.weight", [D]), ("\(p).self_attn.k_norm.weight", [D])] }
            out.append(("\(p).post_attention_layernorm.weight", [C]))
            if let m = c.moe, c.isSparse(layer: i) {
                out += moeShapes(m, layer: p, hidden: C)
                continue
            }
            for (n, o, inp) in [
                ("gate_proj", c.intermediateSize, C), ("up_proj", c.intermediateSize, C), ("down_proj", C, c.intermediateSize),
            ] {
                out.append(("\(p).mlp.\(n).weight", [o, inp]))
                if c.mlpBias { out.append(("\(p).mlp.\(n).bias", [o])) }
            }
        }
        out.append(("model.norm.weight", [C]))
        if !c.tieWordEmbeddings { out.append(("lm_head.weight", [c.vocabSize, C])) }
        return out
    }

    /// Appends parameters that are not in the HF checkpoint (LoRA adapters): training,
    /// checkpoints and `parameterByName` then see them.
    public func addParameters(_ extra: [Parameter]) { parameters += extra }

    /// Drops parameters from `parameters` (QLoRA: base weights held compressed elsewhere are
    /// neither trained nor checkpointed). Layers keep their references.
    public func removeParameters(named names: Set<String>) { parameters.removeAll { names.contains($0.name) } }

    /// Marks every fake-quant weight stale (call after an optimizer step or a quantizer change).
    public func markWeightsChanged() { for l in linears { l.markWeightChanged() } }

    // MARK: - Forward

    /// tokens: [B, T] row-major. With `saveForBackward` every layer's activations are kept
    /// (training); without, one layer's buffers are reused (evaluation, the QAD teacher).
    /// Returns the final normalised hidden states [B·T, C], valid until the next forward.
    public func forward(tokens: [Int32], batch: Int, seqLen: Int, saveForBackward: Bool) throws -> UnsafeMutablePointer<Float> {
        try forward(tokens: tokens, input: nil, batch: batch, seqLen: seqLen, saveForBackward: saveForBackward)
    }

    /// A pipeline stage's forward: the first stage embeds `tokens`, a later one starts from
    /// `input` (the previous stage's output [B·T, C]); the last stage returns the final
    /// normalised hidden states, an earlier one the residual stream after its last layer
    /// (to send on). `tokens` are needed on every stage (the embedding backward uses them).
    public func forward(tokens: [Int32], input: UnsafePointer<Float>?, batch: Int, seqLen: Int, saveForBackward: Bool) throws
        -> UnsafeMutablePointer<Float>
    {
        let c = config, C = c.hiddenSize, N = batch * seqLen
        guard isFirstStage || input != nil else { throw QATError("pipeline stage \(layerRange) needs the previous stage's hidden states") }
        guard tokens.count == N else { throw QATError("forward: \(tokens.count) tokens for batch \(batch) × seq_len \(seqLen)") }
        guard seqLen <= rope.maxPositions else {
            throw QATError("sequence length \(seqLen) exceeds max_position_embeddings (\(rope.maxPositions)) of this model")
        }
        for (i, t) in tokens.enumerated() where t < 0 || Int(t) >= c.vocabSize {
            throw QATError("token id \(t) at position \(i) is outside the vocabulary (size \(c.vocabSize))")
        }
        if saveForBackward && activationCheckpointing { try checkCheckpointable() }
        ensureBuffers(batch: batch, seqLen: seqLen, saved: saveForBackward)
        isTrainingForward = saveForBackward
        auxGradientBuffer = nil
        self.tokens = tokens
        let x0 = residuals[0].data
        if let input, !isFirstStage {
            x0.update(from: input, count: N * C)
        } else {
            StepProfiler.measure("fwd.embedding") {
                tokens.withUnsafeBufferPointer { Embedding.forward(out: x0, tokens: $0.baseAddress!, table: embed.value.data, n: N, c: C) }
            }
        }
        for (l, layer) in layers.enumerated() {
            let a = saveForBackward && !activationCheckpointing ? acts[l] : acts[0]
            let xin = saveForBackward ? residuals[l].data : x0
            let xout = saveForBackward ? residuals[l + 1].data : x0
            try layerForward(layer, a, xin: xin, xout: xout, batch: batch, seqLen: seqLen)
        }
        let last = residuals[saveForBackward ? layers.count : 0].data
        guard isLastStage else { return last }
        StepProfiler.measure("fwd.rmsnorm") {
            RMSNorm.forward(
                out: finalHidden!.data, rstd: finalRstd!.data, inp: last, weight: finalNorm.value.data, n: N, c: C, eps: c.rmsNormEps)
        }
        return finalHidden!.data
    }

    func layerForward(
        _ L: DecoderLayer, _ a: LayerActivations, xin: UnsafeMutablePointer<Float>, xout: UnsafeMutablePointer<Float>,
        batch: Int, seqLen: Int
    ) throws {
        let c = config, C = c.hiddenSize, N = batch * seqLen, H = c.numHeads, Hkv = c.numKVHeads, D = c.headDim
        let eps = c.rmsNormEps
        StepProfiler.measure("fwd.rmsnorm") {
            RMSNorm.forward(out: a.ln1.data, rstd: a.rstd1.data, inp: xin, weight: L.inputNorm.value.data, n: N, c: C, eps: eps)
        }
        a.qUsed = try L.qProj.forward(a.ln1.data, out: c.qkNorm ? a.qRaw.data : a.q.data, n: N)
        // k and v reuse q's quantized input when their quantizers quantize alike (one amax after calibration).
        a.kUsed = try L.kProj.forward(a.ln1.data, out: c.qkNorm ? a.kRaw.data : a.kRope.data, n: N, sharing: (L.qProj, a.qUsed!))
        a.vUsed = try L.vProj.forward(a.ln1.data, out: a.vRaw.data, n: N, sharing: (L.qProj, a.qUsed!))
        if let qn = L.qNorm, let kn = L.kNorm {
            StepProfiler.measure("fwd.rmsnorm") {
                RMSNorm.forward(out: a.q.data, rstd: a.qRstd.data, inp: a.qRaw.data, weight: qn.value.data, n: N * H, c: D, eps: eps)
            }
            StepProfiler.measure("fwd.rmsnorm") {
                RMSNorm.forward(out: a.kRope.data, rstd: a.kRstd.data, inp: a.kRaw.data, weight: kn.value.data, n: N * Hkv, c: D, eps: eps)
            }
        }
        StepProfiler.measure("fwd.rope") { rope.forward(a.q.data, batch: batch, seqLen: seqLen, heads: H) }
        StepProfiler.measure("fwd.rope") { rope.forward(a.kRope.data, batch: batch, seqLen: seqLen, heads: Hkv) }
        try StepProfiler.measure("fwd.kvquant") { try applyKV(L.kQuantizer, a.kRope, a.k, rows: N * Hkv, cols: D) }
        try StepProfiler.measure("fwd.kvquant") { try applyKV(L.vQuantizer, a.vRaw, a.v, rows: N * Hkv, cols: D) }
        let shape = Attention.Shape(batch: batch, seqLen: seqLen, heads: H, kvHeads: Hkv, headDim: D, window: c.slidingWindow)
        StepProfiler.measure("fwd.attention") {
            Attention.forward(out: a.attnOut.data, probs: a.probs.data, q: a.q.data, k: a.k.data, v: a.v.data, shape: shape)
        }
        a.oUsed = try L.oProj.forward(a.attnOut.data, out: a.mid.data, n: N)
        StepProfiler.measure("fwd.residual") { Kernels.addParallel(a.mid.data, xin, N * C) }  // mid = x + attn
        StepProfiler.measure("fwd.rmsnorm") {
            RMSNorm.forward(out: a.ln2.data, rstd: a.rstd2.data, inp: a.mid.data, weight: L.postNorm.value.data, n: N, c: C, eps: eps)
        }
        if let moe = L.moe {
            try moe.forward(a.ln2.data, out: xout, n: N)
        } else if let gp = L.gateProj, let up = L.upProj, let dp = L.downProj {
            a.gateUsed = try gp.forward(a.ln2.data, out: a.gate.data, n: N)
            a.upUsed = try up.forward(a.ln2.data, out: a.up.data, n: N, sharing: (gp, a.gateUsed!))
            StepProfiler.measure("fwd.swiglu") {
                SwiGLU.forward(out: a.h.data, gate: a.gate.data, up: a.up.data, n: N * c.intermediateSize)
            }
            a.downUsed = try dp.forward(a.h.data, out: xout, n: N)
        }
        StepProfiler.measure("fwd.residual") { Kernels.addParallel(xout, a.mid.data, N * C) }  // out = mid + mlp
    }

    /// KV states pass through their quantizer (FP8 KV cache) or are copied unchanged.
    private func applyKV(_ q: FakeQuantHook?, _ x: Tensor, _ out: Tensor, rows: Int, cols: Int) throws {
        if let q, q.isQuantizing || q.isCalibrating {
            try q.forward(x.data, out.data, rows: rows, cols: cols)
        } else {
            out.copy(from: x)
        }
    }

    // MARK: - Backward

    /// dHidden: d loss / d final hidden [B·T, C] (as returned by the loss head). Accumulates
    /// into every trainable parameter's gradient. Requires a forward with saveForBackward.
    ///
    /// On a pipeline stage `dHidden` is d loss / d this stage's output (the next stage's
    /// input gradient); the result is d loss / d this stage's input [B·T, C] to send back
    /// (valid until the next backward), nil on the first stage.
    @discardableResult
    public func backward(dHidden: UnsafePointer<Float>) throws -> UnsafePointer<Float>? {
        guard let s = shape, s.saved, let g = grads else { throw QATError("backward needs a forward with saveForBackward") }
        let c = config, C = c.hiddenSize, N = s.batch * s.seqLen
        if isLastStage {
            StepProfiler.measure("bwd.rmsnorm") {
                RMSNorm.backward(
                    dinp: g.dres.data, dweight: finalNorm.grad?.data, dout: dHidden, inp: residuals[layers.count].data,
                    weight: finalNorm.value.data, rstd: finalRstd!.data, n: N, c: C, accumulate: false)
            }
        } else {
            g.dres.data.update(from: dHidden, count: N * C)
        }
        for l in stride(from: layers.count - 1, through: 0, by: -1) {
            if s.checkpointed { try recomputeLayer(l, batch: s.batch, seqLen: s.seqLen) }
            layerBackward(layers[l], acts[s.checkpointed ? 0 : l], xin: residuals[l].data, g: g, batch: s.batch, seqLen: s.seqLen)
        }
        guard isFirstStage else { return UnsafePointer(g.dres.data) }
        if let de = embed.grad {
            StepProfiler.measure("bwd.embedding") {
                tokens.withUnsafeBufferPointer {
                    Embedding.backward(dtable: de.data, dout: g.dres.data, tokens: $0.baseAddress!, n: N, c: C)
                }
            }
        }
        return nil
    }

    private func layerBackward(
        _ L: DecoderLayer, _ a: LayerActivations, xin: UnsafeMutablePointer<Float>, g: BackwardBuffers, batch: Int, seqLen: Int
    ) {
        let c = config, C = c.hiddenSize, N = batch * seqLen, H = c.numHeads, Hkv = c.numKVHeads, D = c.headDim
        let dres = g.dres.data
        // MLP: out = mid + down(silu(gate(ln2)) ∘ up(ln2))
        if let moe = L.moe {
            moe.backward(dout: dres, x: a.ln2.data, dx: g.dln.data, dProbs: auxGradient(L))
        } else if let gp = L.gateProj, let up = L.upProj, let dp = L.downProj {
            dp.backward(dy: dres, x: a.h.data, xUsed: a.downUsed!, n: N, dx: g.dh.data, accumulateDx: false)
            StepProfiler.measure("bwd.swiglu") {
                SwiGLU.backward(
                    dgate: g.dgate.data, dup: g.dup.data, dout: g.dh.data, gate: a.gate.data, up: a.up.data,
                    n: N * c.intermediateSize)
            }
            gp.backward(dy: g.dgate.data, x: a.ln2.data, xUsed: a.gateUsed!, n: N, dx: g.dln.data, accumulateDx: false)
            up.backward(dy: g.dup.data, x: a.ln2.data, xUsed: a.upUsed!, n: N, dx: g.dln.data, accumulateDx: true)
        }
        StepProfiler.measure("bwd.rmsnorm") {
            RMSNorm.backward(
                dinp: dres, dweight: L.postNorm.grad?.data, dout: g.dln.data, inp: a.mid.data, weight: L.postNorm.value.data,
                rstd: a.rstd2.data, n: N, c: C, accumulate: true)
        }
        // Attention: mid = x + o(attn(rope(q), kq(rope(k)), vq(v)))
        L.oProj.backward(dy: dres, x: a.attnOut.data, xUsed: a.oUsed!, n: N, dx: g.dattn.data, accumulateDx: false)
        let shape = Attention.Shape(batch: batch, seqLen: seqLen, heads: H, kvHeads: Hkv, headDim: D, window: c.slidingWindow)
        StepProfiler.measure("bwd.attention") {
            Attention.backward(
                dq: g.dq.data, dk: g.dk.data, dv: g.dv.data, dout: g.dattn.data, q: a.q.data, k: a.k.data, v: a.v.data,
                probs: a.probs.data, scratch: g.scratch.data, scratchSlots: g.scratchSlots, shape: shape)
        }
        StepProfiler.measure("bwd.kvste") {
            if let kq = L.kQuantizer, kq.isQuantizing {
                kq.backward(x: a.kRope.data, gradOut: g.dk.data, gradIn: g.dk.data, count: N * Hkv * D)
            }
        }
        StepProfiler.measure("bwd.kvste") {
            if let vq = L.vQuantizer, vq.isQuantizing {
                vq.backward(x: a.vRaw.data, gradOut: g.dv.data, gradIn: g.dv.data, count: N * Hkv * D)
            }
        }
        StepProfiler.measure("bwd.rope") { rope.backward(g.dq.data, batch: batch, seqLen: seqLen, heads: H) }
        StepProfiler.measure("bwd.rope") { rope.backward(g.dk.data, batch: batch, seqLen: seqLen, heads: Hkv) }
        var dqIn = g.dq.data, dkIn = g.dk.data
        if let qn = L.qNorm, let kn = L.kNorm {
            StepProfiler.measure("bwd.rmsnorm") {
                RMSNorm.backward(
                    dinp: g.dqRaw.data, dweight: qn.grad?.data, dout: g.dq.data, inp: a.qRaw.data, weight: qn.value.data,
                    rstd: a.qRstd.data, n: N * H, c: D, accumulate: false)
            }
            StepProfiler.measure("bwd.rmsnorm") {
                RMSNorm.backward(
                    dinp: g.dkRaw.data, dweight: kn.grad?.data, dout: g.dk.data, inp: a.kRaw.data, weight: kn.value.data,
                    rstd: a.kRstd.data, n: N * Hkv, c: D, accumulate: false)
            }
            dqIn = g.dqRaw.data; dkIn = g.dkRaw.data
        }
        L.qProj.backward(dy: dqIn, x: a.ln1.data, xUsed: a.qUsed!, n: N, dx: g.dln.data, accumulateDx: false)
        L.kProj.backward(dy: dkIn, x: a.ln1.data, xUsed: a.kUsed!, n: N, dx: g.dln.data, accumulateDx: true)
        L.vProj.backward(dy: g.dv.data, x: a.ln1.data, xUsed: a.vUsed!, n: N, dx: g.dln.data, accumulateDx: true)
        StepProfiler.measure("bwd.rmsnorm") {
            RMSNorm.backward(
                dinp: dres, dweight: L.inputNorm.grad?.data, dout: g.dln.data, inp: xin, weight: L.inputNorm.value.data,
                rstd: a.rstd1.data, n: N, c: C, accumulate: true)
        }
    }

    // MARK: - Buffers

    private func ensureBuffers(batch: Int, seqLen: Int, saved: Bool) {
        let checkpointed = saved && activationCheckpointing
        if let s = shape, s.batch == batch, s.seqLen == seqLen, s.saved == saved, s.checkpointed == checkpointed { return }
        let c = config, N = batch * seqLen
        let lc = LayerActivations.Config(
            batch: batch, seqLen: seqLen, hidden: c.hiddenSize, heads: c.numHeads,
            kvHeads: c.numKVHeads, headDim: c.headDim,
            inter: layers.contains { $0.moe == nil } ? c.intermediateSize : 0)
        // Release the old set first so peak memory is one set, not two.
        residuals = []; acts = []; grads = nil
        residuals = (0..<(saved ? layers.count + 1 : 1)).map { _ in Tensor(shape: [N, c.hiddenSize]) }
        acts = (0..<(saved && !checkpointed ? layers.count : 1)).map { _ in LayerActivations(n: N, c: lc) }
        finalHidden = Tensor(shape: [N, c.hiddenSize])
        finalRstd = Tensor(shape: [N])
        grads = saved ? BackwardBuffers(n: N, c: lc) : nil
        shape = (batch, seqLen, saved, checkpointed)
    }
}

/// Gradient buffers shared by all layers during backward.
final class BackwardBuffers {
    let dres, dln, dh, dgate, dup, dattn, dq, dqRaw, dk, dkRaw, dv, scratch: Tensor
    /// [T, T] attention scratch matrices in `scratch`, one per worker.
    let scratchSlots: Int
    init(n: Int, c: LayerActivations.Config) {
        dres = Tensor(shape: [n, c.hidden]); dln = Tensor(shape: [n, c.hidden])
        dh = Tensor(shape: [n, c.inter]); dgate = Tensor(shape: [n, c.inter]); dup = Tensor(shape: [n, c.inter])
        dattn = Tensor(shape: [n, c.qDim]); dq = Tensor(shape: [n, c.qDim]); dqRaw = Tensor(shape: [n, c.qDim])
        dk = Tensor(shape: [n, c.kvDim]); dkRaw = Tensor(shape: [n, c.kvDim]); dv = Tensor(shape: [n, c.kvDim])
        scratchSlots = max(1, Parallel.threads)
        scratch = Tensor(shape: [scratchSlots * c.seqLen * c.seqLen], zeroed: false)
    }
}

/// A small, fast, seedable generator (SplitMix64) so that runs are reproducible.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    /// The state's increment per draw.
    public static let gamma: UInt64 = 0x9E37_79B9_7F4A_7C15
    public mutating func next() -> UInt64 {
        state &+= Self.gamma
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Standard normal (Box–Muller).
    public mutating func nextGaussian() -> Float {
        let u1 = max(Double(next() >> 11) / Double(1 << 53), 1e-300), u2 = Double(next() >> 11) / Double(1 << 53)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}
