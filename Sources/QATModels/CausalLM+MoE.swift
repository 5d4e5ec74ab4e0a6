import QATCore

/// Mixture-of-experts pieces of `CausalLM`: the expert parameter names and shapes, building a
/// layer's `MoEBlock`, and the load-balancing auxiliary loss.
extension CausalLM {
    /// The HF parameters of one sparse layer's MLP, in module order.
    static func moeShapes(_ m: MoEConfig, layer p: String, hidden C: Int) -> [(String, [Int])] {
        let I = m.expertIntermediateSize
        var out: [(String, [Int])] = [(m.routerName(p) + ".weight", [m.numExperts, C])]
        for e in 0..<m.numExperts {
            let n = m.expertNames(p, e)
            out += [(n.gate + ".weight", [I, C]), (n.up + ".weight", [I, C]), (n.down + ".weight", [C, I])]
        }
        if m.sharedExpertIntermediateSize > 0 {
            let Is = m.sharedExpertIntermediateSize
            out += [
                ("\(p).mlp.shared_expert.gate_proj.weight", [Is, C]), ("\(p).mlp.shared_expert.up_proj.weight", [Is, C]),
                ("\(p).mlp.shared_expert.down_proj.weight", [C, Is]), ("\(p).mlp.shared_expert_gate.weight", [1, C]),
            ]
        }
        return out
    }

    /// Builds a sparse layer's block; `linear(name, out, in, bias)` takes (and checks) a weight.
    static func moeBlock(
        _ m: MoEConfig, layer p: String, hidden C: Int,
        linear: (String, Int, Int, Bool) throws -> Linear
    ) throws -> MoEBlock {
        let I = m.expertIntermediateSize
        let router = try linear(m.routerName(p), m.numExperts, C, false)
        var experts: [Expert] = []
        for e in 0..<m.numExperts {
            let n = m.expertNames(p, e)
            experts.append(
                Expert(
                    gate: try linear(n.gate, I, C, false), up: try linear(n.up, I, C, false),
                    down: try linear(n.down, C, I, false)))
        }
        var shared: Expert?, sharedGate: Linear?
        if m.sharedExpertIntermediateSize > 0 {
            let Is = m.sharedExpertIntermediateSize, s = "\(p).mlp.shared_expert"
            shared = Expert(
                gate: try linear("\(s).gate_proj", Is, C, false), up: try linear("\(s).up_proj", Is, C, false),
                down: try linear("\(s).down_proj", C, Is, false))
            sharedGate = try linear("\(p).mlp.shared_expert_gate", 1, C, false)
        }
        return MoEBlock(
            router: router, experts: experts, sharedExpert: shared, sharedExpertGate: sharedGate,
            topK: m.topK, normTopKProb: m.normTopKProb)
    }

    /// The sparse layers' blocks this model (stage) holds.
    public var moeBlocks: [MoEBlock] { layers.compactMap(\.moe) }

    /// The load-balancing loss of the last forward, transformers' `load_balancing_loss_func`
    /// over every sparse layer's router (no attention mask):
    ///
    ///     aux = E · Σ_e (count_e / R) · (Σ p_e / R)
    ///
    /// with R = sparse layers × tokens, count_e the top-k selections of expert e and p the
    /// router softmax. nil for dense models. (Unscaled: the model loss adds coef · aux.)
    public func routerAuxLoss() -> Double? {
        guard let stats = routerStats() else { return nil }
        var s = 0.0
        for e in 0..<stats.counts.count { s += (stats.counts[e] / stats.rows) * (stats.probSums[e] / stats.rows) }
        return s * Double(stats.counts.count)
    }

    /// Selection counts and probability sums over the sparse layers of the last forward.
    func routerStats() -> (counts: [Double], probSums: [Double], rows: Double)? {
        let blocks = moeBlocks
        guard let E = blocks.first?.numExperts, blocks.allSatisfy({ $0.lastTokens > 0 }) else { return nil }
        var counts = [Double](repeating: 0, count: E), sums = [Double](repeating: 0, count: E)
        var rows = 0
        for b in blocks {
            let N = b.lastTokens, p = b.routerProbs
            for t in 0..<N {
                for j in 0..<b.topK { counts[b.selected(t, j)] += 1 }
                for e in 0..<E { sums[e] += Double(p[t * E + e]) }
            }
            rows += N
        }
        return (counts, sums, Double(rows))
    }

    /// d(coef · aux · scale) / d p for one layer's router probabilities [N, E] (the same for
    /// every sparse layer: E · count_e / R² per entry), or nil when the auxiliary loss is off.
    func auxGradient(_ layer: DecoderLayer) -> UnsafePointer<Float>? {
        guard routerAuxLossCoef != 0, let b = layer.moe else { return nil }
        if auxGradientBuffer == nil {
            guard let stats = routerStats() else { return nil }
            let E = b.numExperts, N = b.lastTokens
            let t = Tensor(shape: [N * E], zeroed: false)
            let k = Double(routerAuxLossCoef) * routerAuxLossScale * Double(E) / (stats.rows * stats.rows)
            for i in 0..<N { for e in 0..<E { t[i * E + e] = Float(k * stats.counts[e]) } }
            auxGradientBuffer = t
        }
        return UnsafePointer(auxGradientBuffer!.data)
    }
}
