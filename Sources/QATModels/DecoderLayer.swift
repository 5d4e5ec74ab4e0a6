import QATCore

/// One pre-norm decoder block of the Llama family: attention (GQA, RoPE, optional q/k
/// norm and biases) and an MLP — the dense SwiGLU (`gateProj`/`upProj`/`downProj`) or a
/// mixture of experts (`moe`) — each around a residual connection.
public final class DecoderLayer: @unchecked Sendable {
    public let index: Int
    public let inputNorm: Parameter
    public let qProj, kProj, vProj, oProj: Linear
    public let qNorm, kNorm: Parameter?
    public let postNorm: Parameter
    /// The dense SwiGLU MLP (nil in a mixture-of-experts layer).
    public let gateProj, upProj, downProj: Linear?
    /// The mixture-of-experts MLP (nil in a dense layer).
    public let moe: MoEBlock?
    /// FP8 KV-cache quantizers on the key/value states after RoPE (ModelOpt's
    /// `self_attn.k_bmm_quantizer` / `v_bmm_quantizer`).
    public var kQuantizer: FakeQuantHook?
    public var vQuantizer: FakeQuantHook?

    init(
        index: Int, inputNorm: Parameter, q: Linear, k: Linear, v: Linear, o: Linear, qNorm: Parameter?, kNorm: Parameter?,
        postNorm: Parameter, gate: Linear?, up: Linear?, down: Linear?, moe: MoEBlock? = nil
    ) {
        self.index = index; self.inputNorm = inputNorm; qProj = q; kProj = k; vProj = v; oProj = o
        self.qNorm = qNorm; self.kNorm = kNorm; self.postNorm = postNorm; gateProj = gate; upProj = up; downProj = down
        self.moe = moe
    }

    public var prefix: String { "model.layers.\(index)" }
    public var linears: [Linear] {
        [qProj, kProj, vProj, oProj] + (moe?.linears ?? [gateProj, upProj, downProj].compactMap { $0 })
    }
    /// Linears that inference engines run as one fused GEMM and that therefore share one
    /// weight global scale and one input scale: q/k/v, and gate/up of the dense MLP or of
    /// each expert (vLLM's fused-MoE w13) and of the shared expert.
    public var fusedGroups: [[Linear]] {
        var out: [[Linear]] = [[qProj, kProj, vProj]]
        if let m = moe {
            out += m.experts.map { [$0.gate, $0.up] }
            if let s = m.sharedExpert { out.append([s.gate, s.up]) }
        } else if let g = gateProj, let u = upProj {
            out.append([g, u])
        }
        return out
    }
}

/// Per-layer saved activations for backward (N = B·T tokens). The `*Used` pointers are the
/// inputs each Linear actually multiplied (its own fake-quant copy or the plain input).
final class LayerActivations {
    let ln1, rstd1, qRaw, qRstd, kRaw, kRstd, q, kRope, k, vRaw, v, probs, attnOut, mid, ln2, rstd2, gate, up, h: Tensor
    var qUsed, kUsed, vUsed, oUsed, gateUsed, upUsed, downUsed: UnsafePointer<Float>?

    init(n: Int, c: Config) {
        ln1 = Tensor(shape: [n, c.hidden]); rstd1 = Tensor(shape: [n])
        qRaw = Tensor(shape: [n, c.qDim]); qRstd = Tensor(shape: [n * c.heads])
        kRaw = Tensor(shape: [n, c.kvDim]); kRstd = Tensor(shape: [n * c.kvHeads])
        q = Tensor(shape: [n, c.qDim]); kRope = Tensor(shape: [n, c.kvDim]); k = Tensor(shape: [n, c.kvDim])
        vRaw = Tensor(shape: [n, c.kvDim]); v = Tensor(shape: [n, c.kvDim])
        probs = Tensor(shape: [c.batch * c.heads * c.seqLen * c.seqLen])
        attnOut = Tensor(shape: [n, c.qDim]); mid = Tensor(shape: [n, c.hidden])
        ln2 = Tensor(shape: [n, c.hidden]); rstd2 = Tensor(shape: [n])
        gate = Tensor(shape: [n, c.inter]); up = Tensor(shape: [n, c.inter]); h = Tensor(shape: [n, c.inter])
    }

    struct Config {
        let batch, seqLen, hidden, heads, kvHeads, headDim, inter: Int
        var qDim: Int { heads * headDim }
        var kvDim: Int { kvHeads * headDim }
    }
}
