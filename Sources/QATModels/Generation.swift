import Foundation
import QATCore

/// Autoregressive decoding with a KV cache, one sequence at a time.
///
/// `step(tokens)` runs the model over tokens at positions `length ..< length + n` — the whole
/// prompt first (prefill), then one token at a time — with the same layer kernels as
/// `CausalLM.forward` (RMSNorm, `Linear.forward` with its weight and input quantizers, SwiGLU),
/// keeping every layer's keys (after RoPE and the KV quantizer) and values in the cache, so
/// each new token costs O(position) attention work plus the fixed matmuls, not a forward over
/// the whole sequence.
///
/// The KV cache is quantized as the layer's K/V quantizers do in training, or, with
/// `kvScales` (an export's `k_scale` / `v_scale`), as a deployed FP8 KV cache does: each
/// element stored as `e4m3(x / scale)` (saturating) and read back as `code · scale` (vLLM's
/// `reshape_and_cache` with `kv_cache_dtype fp8`).
public final class KVCacheDecoder {
    public let model: CausalLM
    public let capacity: Int
    /// Positions filled so far.
    public private(set) var length = 0
    /// Per layer, the deployed FP8 scales of K and V (nil: the layer's own quantizers).
    public var kvScales: [Int: (k: Float?, v: Float?)] = [:]

    private let keys: [Tensor], values: [Tensor]
    private var chunk = 0
    private var x, ln, q, k, v, attn, mid, gate, up, h, logits, rstd, scores: Tensor

    /// `capacity`: the most positions this decoder will hold (at most max_position_embeddings).
    public init(model: CausalLM, capacity: Int? = nil) throws {
        let c = model.config
        guard model.isFirstStage && model.isLastStage else { throw QATError("generation needs the whole model, not a pipeline stage") }
        let cap = min(capacity ?? c.maxPositionEmbeddings, model.rope.maxPositions)
        guard cap >= 1 else { throw QATError("generation: the model has max_position_embeddings \(c.maxPositionEmbeddings)") }
        self.model = model
        self.capacity = cap
        let kvw = c.numKVHeads * c.headDim
        keys = (0..<c.numLayers).map { _ in Tensor(shape: [cap, kvw], zeroed: false) }
        values = (0..<c.numLayers).map { _ in Tensor(shape: [cap, kvw], zeroed: false) }
        x = Tensor(shape: [0]); ln = x; q = x; k = x; v = x; attn = x; mid = x; gate = x; up = x; h = x; rstd = x
        logits = Tensor(shape: [c.vocabSize], zeroed: false)
        scores = Tensor(shape: [cap], zeroed: false)
    }

    /// Forgets every position (the next `step` starts a new sequence).
    public func reset() { length = 0 }

    private func ensure(_ n: Int) {
        guard n > chunk else { return }
        let c = model.config, C = c.hiddenSize, qw = c.numHeads * c.headDim, kvw = c.numKVHeads * c.headDim
        x = Tensor(shape: [n, C], zeroed: false); ln = Tensor(shape: [n, C], zeroed: false); mid = Tensor(shape: [n, C], zeroed: false)
        q = Tensor(shape: [n, qw], zeroed: false); attn = Tensor(shape: [n, qw], zeroed: false)
        k = Tensor(shape: [n, kvw], zeroed: false); v = Tensor(shape: [n, kvw], zeroed: false)
        gate = Tensor(shape: [n, c.intermediateSize], zeroed: false); up = Tensor(shape: [n, c.intermediateSize], zeroed: false)
        h = Tensor(shape: [n, c.intermediateSize], zeroed: false)
        rstd = Tensor(shape: [max(n * c.numHeads, n)], zeroed: false)
        chunk = n
    }

    /// Runs `tokens` at the next positions and returns the logits of the last one
    /// (valid until the next call).
    @discardableResult
    public func step(_ tokens: [Int32]) throws -> UnsafeBufferPointer<Float> {
        let c = model.config, n = tokens.count, C = c.hiddenSize
        guard n > 0 else { throw QATError("generation: no tokens to run") }
        guard length + n <= capacity else {
            throw QATError("generation: \(length + n) positions exceed the model's context of \(capacity) (max_position_embeddings)")
        }
        for t in tokens where t < 0 || Int(t) >= c.vocabSize {
            throw QATError("token id \(t) is outside the vocabulary (size \(c.vocabSize))")
        }
        ensure(n)
        tokens.withUnsafeBufferPointer {
            Embedding.forward(out: x.data, tokens: $0.baseAddress!, table: model.embed.value.data, n: n, c: C)
        }
        for layer in model.layers { try layerStep(layer, n: n) }
        // Only the last position's logits are needed.
        let last = x.data + (n - 1) * C
        RMSNorm.forward(out: ln.data, rstd: rstd.data, inp: last, weight: model.finalNorm.value.data, n: 1, c: C, eps: c.rmsNormEps)
        try model.lmHead.forward(ln.data, out: logits.data, n: 1)
        length += n
        return UnsafeBufferPointer(start: logits.data, count: c.vocabSize)
    }

    private func layerStep(_ L: DecoderLayer, n: Int) throws {
        let c = model.config, C = c.hiddenSize, H = c.numHeads, Hkv = c.numKVHeads, D = c.headDim, eps = c.rmsNormEps
        let kvw = Hkv * D, p0 = length
        RMSNorm.forward(out: ln.data, rstd: rstd.data, inp: x.data, weight: L.inputNorm.value.data, n: n, c: C, eps: eps)
        try L.qProj.forward(ln.data, out: q.data, n: n)
        try L.kProj.forward(ln.data, out: k.data, n: n)
        try L.vProj.forward(ln.data, out: v.data, n: n)
        if let qn = L.qNorm, let kn = L.kNorm {
            RMSNorm.forward(out: q.data, rstd: rstd.data, inp: q.data, weight: qn.value.data, n: n * H, c: D, eps: eps)
            RMSNorm.forward(out: k.data, rstd: rstd.data, inp: k.data, weight: kn.value.data, n: n * Hkv, c: D, eps: eps)
        }
        rotate(q.data, n: n, heads: H, from: p0)
        rotate(k.data, n: n, heads: Hkv, from: p0)
        let kc = keys[L.index].data + p0 * kvw, vc = values[L.index].data + p0 * kvw
        let scales = kvScales[L.index]
        try storeKV(k.data, into: kc, count: n * kvw, rows: n * Hkv, cols: D, hook: L.kQuantizer, scale: scales?.k)
        try storeKV(v.data, into: vc, count: n * kvw, rows: n * Hkv, cols: D, hook: L.vQuantizer, scale: scales?.v)
        attend(keys[L.index].data, values[L.index].data, n: n, from: p0)
        try L.oProj.forward(attn.data, out: mid.data, n: n)
        Kernels.addParallel(mid.data, x.data, n * C)
        RMSNorm.forward(out: ln.data, rstd: rstd.data, inp: mid.data, weight: L.postNorm.value.data, n: n, c: C, eps: eps)
        if let moe = L.moe {  // mixture of experts: routed per token, as in the full forward
            try moe.forward(ln.data, out: x.data, n: n)
        } else if let g = L.gateProj, let u = L.upProj, let d = L.downProj {
            try g.forward(ln.data, out: gate.data, n: n)
            try u.forward(ln.data, out: up.data, n: n)
            SwiGLU.forward(out: h.data, gate: gate.data, up: up.data, n: n * c.intermediateSize)
            try d.forward(h.data, out: x.data, n: n)
        }
        Kernels.addParallel(x.data, mid.data, n * C)
    }

    /// RoPE at absolute positions `from ..< from + n` (`RoPE.forward`'s rotate-half formula).
    private func rotate(_ t: UnsafeMutablePointer<Float>, n: Int, heads: Int, from p0: Int) {
        let rope = model.rope, half = rope.headDim / 2, d = rope.headDim
        rope.cos.withUnsafeBufferPointer { cb in
            rope.sin.withUnsafeBufferPointer { sb in
                for r in 0..<n {
                    let ct = cb.baseAddress! + (p0 + r) * half, st = sb.baseAddress! + (p0 + r) * half
                    for hh in 0..<heads {
                        let row = t + (r * heads + hh) * d
                        for i in 0..<half {
                            let a = row[i], b = row[i + half], cs = ct[i], sn = st[i]
                            row[i] = a * cs - b * sn
                            row[i + half] = b * cs + a * sn
                        }
                    }
                }
            }
        }
    }

    /// Writes new K or V rows into the cache: through the deployed FP8 scale, else the
    /// layer's quantizer (FP8 fake quant, as training), else unchanged.
    private func storeKV(
        _ src: UnsafeMutablePointer<Float>, into dst: UnsafeMutablePointer<Float>, count: Int, rows: Int, cols: Int,
        hook: FakeQuantHook?, scale: Float?
    ) throws {
        if let s = scale {
            for i in 0..<count { dst[i] = e4m3ToFloat(floatToE4M3(src[i] / s)) * s }
        } else if let hook, hook.isQuantizing {
            try hook.forward(src, dst, rows: rows, cols: cols)
        } else {
            dst.update(from: src, count: count)
        }
    }

    /// Causal grouped-query attention of the n new queries over the cached keys 0 ... own
    /// position (and within the sliding window).
    private func attend(_ layerKeys: UnsafePointer<Float>, _ layerValues: UnsafePointer<Float>, n: Int, from p0: Int) {
        let c = model.config, H = c.numHeads, Hkv = c.numKVHeads, D = c.headDim, group = H / Hkv
        let kvw = Hkv * D, qw = H * D, scale = 1 / Float(D).squareRoot()
        for r in 0..<n {
            let pos = p0 + r
            let lo = c.slidingWindow.map { max(0, pos - $0 + 1) } ?? 0
            let count = pos + 1 - lo
            for hh in 0..<H {
                let g = hh / group
                let qh = q.data + r * qw + hh * D
                let s = scores.data
                for j in 0..<count { s[j] = scale * Kernels.dot(qh, layerKeys + (lo + j) * kvw + g * D, D) }
                let m = Kernels.max(s, count)
                let sum = Kernels.expSubtract(s, count, m)
                Kernels.scale(s, count, 1 / sum)
                let o = attn.data + r * qw + hh * D
                o.update(repeating: 0, count: D)
                for j in 0..<count {
                    let w = s[j], vr = layerValues + (lo + j) * kvw + g * D
                    for i in 0..<D { o[i] += w * vr[i] }
                }
            }
        }
    }
}

/// Next-token choice as transformers' `generate` makes it: greedy (`temperature` 0, the first
/// largest logit as `torch.argmax`), or sampling from softmax(logits / temperature) after the
/// top-k and top-p (nucleus) filters, in that order (`TemperatureLogitsWarper`,
/// `TopKLogitsWarper`, `TopPLogitsWarper`: tokens whose ascending cumulative probability is
/// ≤ 1 − top_p are dropped, the most likely always kept).
public struct Sampler: Sendable {
    public var temperature: Float
    public var topK: Int?
    public var topP: Float?
    public var rng: SplitMix64

    public init(temperature: Float = 0, topK: Int? = nil, topP: Float? = nil, seed: UInt64 = 0) {
        self.temperature = temperature; self.topK = topK; self.topP = topP; rng = SplitMix64(seed: seed)
    }

    public static func argmax(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        var best = 0
        for i in 1..<logits.count where logits[i] > logits[best] { best = i }
        return Int32(best)
    }

    public mutating func next(_ logits: UnsafeBufferPointer<Float>) -> Int32 {
        guard temperature > 0 else { return Self.argmax(logits) }
        let n = logits.count
        var order = Array(0..<n)
        order.sort { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }
        var keep = n
        if let k = topK, k > 0 { keep = min(keep, k) }
        let m = logits[order[0]] / temperature
        var probs = [Double](repeating: 0, count: keep)
        var sum = 0.0
        for i in 0..<keep {
            probs[i] = Foundation.exp(Double(logits[order[i]] / temperature - m))
            sum += probs[i]
        }
        for i in 0..<keep { probs[i] /= sum }
        if let p = topP, p < 1 {
            // Keep the smallest prefix (most likely first) whose mass reaches top_p.
            var cum = 0.0, cut = keep
            for i in 0..<keep {
                cum += probs[i]
                if cum >= Double(p) { cut = i + 1; break }
            }
            keep = max(1, cut)
            let s = probs[0..<keep].reduce(0, +)
            for i in 0..<keep { probs[i] /= s }
        }
        let u = Double(rng.next() >> 11) / Double(1 << 53)
        var acc = 0.0
        for i in 0..<keep {
            acc += probs[i]
            if u < acc { return Int32(order[i]) }
        }
        return Int32(order[keep - 1])
    }
}
