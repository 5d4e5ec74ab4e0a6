import Foundation
import QATCore

/// One expert of a mixture-of-experts block: a SwiGLU MLP (gate, up, down).
public struct Expert: Sendable {
    public let gate, up, down: Linear
    public init(gate: Linear, up: Linear, down: Linear) { self.gate = gate; self.up = up; self.down = down }
}

/// A sparse mixture-of-experts MLP as transformers runs Qwen3-MoE, Qwen2-MoE and Mixtral:
///
///     p = softmax_fp32(x·Wrᵀ)            (router, [N, E])
///     (w, e) = topk(p, k)                 (ties: the lower expert index first)
///     w /= Σ w                            (when norm_topk_prob; Mixtral always)
///     y_t = Σ_j w_tj · expert_{e_tj}(x_t) (+ sigmoid(x_t·w_sᵀ) · shared(x_t), Qwen2-MoE)
///
/// Experts run per group: the tokens routed to an expert are gathered into one contiguous
/// block, each expert runs one matmul per projection over its block (through the usual
/// `Linear`, so its fake quantizers, LoRA adapters and profiler phases apply), and the outputs
/// are scattered back, weighted. Forward and backward work for any token count.
///
/// During calibration (any expert quantizer observing) every expert first sees every token,
/// as ModelOpt's `_QuantMoeSparseMoe` does (top_k = num_experts for one observing pass whose
/// output is discarded), so that no expert is left without an amax.
public final class MoEBlock: @unchecked Sendable {
    public let router: Linear
    public let experts: [Expert]
    public let sharedExpert: Expert?
    public let sharedExpertGate: Linear?
    public let topK: Int
    public let normTopKProb: Bool
    public let hidden: Int
    public let inter: Int

    /// Every Linear in HF module order: router, experts, shared expert, shared-expert gate.
    public var linears: [Linear] {
        var out = [router]
        for e in experts { out += [e.gate, e.up, e.down] }
        if let s = sharedExpert { out += [s.gate, s.up, s.down] }
        if let g = sharedExpertGate { out.append(g) }
        return out
    }
    public var numExperts: Int { router.outFeatures }

    public init(router: Linear, experts: [Expert], sharedExpert: Expert?, sharedExpertGate: Linear?, topK: Int, normTopKProb: Bool) {
        self.router = router; self.experts = experts; self.sharedExpert = sharedExpert; self.sharedExpertGate = sharedExpertGate
        self.topK = topK; self.normTopKProb = normTopKProb
        hidden = router.inFeatures
        inter = experts.first?.gate.outFeatures ?? 0
    }

    // MARK: - State of the last forward

    private var n = 0
    /// Router softmax [N, E] and its Linear's multiplied input.
    private var probs = Tensor(shape: [0])
    private var routerUsed: UnsafePointer<Float>?
    /// Per token t, slot j (j in expert-ascending order): expert, weight, grouped row.
    private var slotExpert: [Int32] = []
    private var slotWeight: [Float] = []
    private var slotRow: [Int32] = []
    /// Grouped rows: token of each row, and expert e's rows offsets[e]..<offsets[e+1].
    private var rowToken: [Int32] = []
    public private(set) var offsets: [Int] = []
    /// Grouped activations: inputs [R, C], gate/up/h [R, I], expert outputs [R, C].
    private var gx = Tensor(shape: [0]), gg = Tensor(shape: [0]), gu = Tensor(shape: [0]), gh = Tensor(shape: [0]), gy = Tensor(shape: [0])
    private var used: [(gate: UnsafePointer<Float>, up: UnsafePointer<Float>, down: UnsafePointer<Float>)?] = []
    /// Shared expert activations [N, I_s] ×3, output [N, C], gate logit sigmoid [N].
    private var sg = Tensor(shape: [0]), su = Tensor(shape: [0]), sh = Tensor(shape: [0])
    private var sy = Tensor(shape: [0]), ssig = Tensor(shape: [0])
    private var sharedUsed: (gate: UnsafePointer<Float>, up: UnsafePointer<Float>, down: UnsafePointer<Float>, sgate: UnsafePointer<Float>)?

    /// Tokens routed to each expert over the calibration forwards (reset by calibration).
    public var routedDuringCalibration: [Int] = []
    /// Tokens routed to each expert by the last forward (per slot j summed).
    public var tokensPerExpert: [Int] { (0..<numExperts).map { offsets[$0 + 1] - offsets[$0] } }
    /// The last forward's router probabilities [N, E] (for the auxiliary loss).
    var routerProbs: UnsafePointer<Float> { UnsafePointer(probs.data) }
    var lastTokens: Int { n }
    /// Expert chosen at token t, slot j (expert-ascending order within the token).
    func selected(_ t: Int, _ j: Int) -> Int { Int(slotExpert[t * topK + j]) }

    /// A block with a router and no experts, for routing alone (`route`).
    public static func routerOnly(weight: Tensor, topK: Int, normTopKProb: Bool) -> MoEBlock {
        MoEBlock(
            router: Linear(name: "router", weight: Parameter(name: "router.weight", value: weight), bias: nil),
            experts: [], sharedExpert: nil, sharedExpertGate: nil, topK: topK, normTopKProb: normTopKProb)
    }

    /// Routes x [N, C]: per token its k experts (in expert order) and their weights, [N·k] each.
    public func route(_ x: UnsafePointer<Float>, n N: Int) throws -> (experts: [Int], weights: [Float]) {
        n = N
        ensure(&probs, N * numExperts)
        routerUsed = try router.forward(x, out: probs.data, n: N)
        route(N)
        return (slotExpert.map { Int($0) }, slotWeight)
    }

    private func ensure(_ t: inout Tensor, _ count: Int) {
        if t.count < count { t = Tensor(shape: [count], zeroed: false) }
    }

    private var isCalibrating: Bool {
        experts.contains { e in
            [e.gate, e.up, e.down].contains { $0.weightQuantizer?.isCalibrating == true || $0.inputQuantizer?.isCalibrating == true }
        }
    }

    // MARK: - Forward

    /// x: [N, C] (the post-attention-norm hidden states) → out: [N, C] (written).
    public func forward(_ x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, n N: Int) throws {
        let C = hidden, I = inter, E = numExperts, K = topK, R = N * K
        n = N
        let calibrating = isCalibrating
        if calibrating { try observeAllExperts(x, n: N) }
        ensure(&probs, N * E)
        routerUsed = try router.forward(x, out: probs.data, n: N)
        StepProfiler.measure("moe.route") { route(N) }
        if calibrating, routedDuringCalibration.count == E {
            for (e, c) in tokensPerExpert.enumerated() { routedDuringCalibration[e] += c }
        }
        ensure(&gx, R * C); ensure(&gg, R * I); ensure(&gu, R * I); ensure(&gh, R * I); ensure(&gy, R * C)
        StepProfiler.measure("moe.dispatch") { gather(x, N) }
        used = Array(repeating: nil, count: E)
        for e in 0..<E where offsets[e + 1] > offsets[e] {
            let o = offsets[e], ne = offsets[e + 1] - o, ex = experts[e]
            let ug = try ex.gate.forward(gx.data + o * C, out: gg.data + o * I, n: ne)
            let uu = try ex.up.forward(gx.data + o * C, out: gu.data + o * I, n: ne)
            used[e] = (ug, uu, ug)
        }
        StepProfiler.measure("fwd.swiglu") { SwiGLU.forward(out: gh.data, gate: gg.data, up: gu.data, n: R * I) }
        for e in 0..<E where offsets[e + 1] > offsets[e] {
            let o = offsets[e], ne = offsets[e + 1] - o
            let ud = try experts[e].down.forward(gh.data + o * I, out: gy.data + o * C, n: ne)
            used[e]!.down = ud
        }
        StepProfiler.measure("moe.dispatch") { scatter(out, N) }
        if let s = sharedExpert, let sgate = sharedExpertGate {
            let Is = s.gate.outFeatures
            ensure(&sg, N * Is); ensure(&su, N * Is); ensure(&sh, N * Is); ensure(&sy, N * C); ensure(&ssig, N)
            let ug = try s.gate.forward(x, out: sg.data, n: N)
            let uu = try s.up.forward(x, out: su.data, n: N)
            StepProfiler.measure("fwd.swiglu") { SwiGLU.forward(out: sh.data, gate: sg.data, up: su.data, n: N * Is) }
            let ud = try s.down.forward(sh.data, out: sy.data, n: N)
            let usg = try sgate.forward(x, out: ssig.data, n: N)
            sharedUsed = (ug, uu, ud, usg)
            let o = SendablePointer(out), y = SendablePointer(sy.data), z = SendablePointer(ssig.data)
            Parallel.forRange(N, costPerItem: 2 * C) { s0, e0 in
                for t in s0..<e0 {
                    let sig = 1 / (1 + expf(-z.p[t]))
                    z.p[t] = sig
                    for c in 0..<C { o.p[t * C + c] += sig * y.p[t * C + c] }
                }
            }
        }
    }

    /// Softmax over the router logits in place (fp32, max-subtracted), top-k with the lower
    /// index first among equal probabilities, optional renormalisation; then the grouping.
    private func route(_ N: Int) {
        let E = numExperts, K = topK
        slotExpert = Array(repeating: 0, count: N * K); slotWeight = Array(repeating: 0, count: N * K)
        let p = SendablePointer(probs.data)
        slotExpert.withUnsafeMutableBufferPointer { se in
            slotWeight.withUnsafeMutableBufferPointer { sw in
                let sep = SendablePointer(se.baseAddress!), swp = SendablePointer(sw.baseAddress!)
                let norm = normTopKProb
                Parallel.forRange(N, costPerItem: 4 * E + K * E) { s, e in
                    var pick = [Int](repeating: 0, count: K)
                    for t in s..<e {
                        let row = p.p + t * E
                        var m = -Float.infinity
                        for i in 0..<E { m = Swift.max(m, row[i]) }
                        var sum: Float = 0
                        for i in 0..<E { row[i] = expf(row[i] - m); sum += row[i] }
                        for i in 0..<E { row[i] /= sum }
                        // top-k: K passes of argmax over the unpicked (strict >: lower index wins ties).
                        for j in 0..<K {
                            var best = -1, bv = -Float.infinity
                            for i in 0..<E where !pick[0..<j].contains(i) && (best < 0 || row[i] > bv) { best = i; bv = row[i] }
                            pick[j] = best
                        }
                        var total: Float = 0
                        for j in 0..<K { total += row[pick[j]] }
                        // Slots in expert-ascending order (the order transformers accumulates experts in).
                        let sorted = pick.sorted()
                        for j in 0..<K {
                            sep.p[t * K + j] = Int32(sorted[j])
                            swp.p[t * K + j] = norm ? row[sorted[j]] / total : row[sorted[j]]
                        }
                    }
                }
            }
        }
        // Group: counting sort by expert, tokens ascending within an expert.
        var counts = [Int](repeating: 0, count: E + 1)
        for v in slotExpert { counts[Int(v) + 1] += 1 }
        for e in 0..<E { counts[e + 1] += counts[e] }
        offsets = counts
        var next = Array(counts[0..<E])
        rowToken = Array(repeating: 0, count: N * K); slotRow = Array(repeating: 0, count: N * K)
        for t in 0..<N {
            for j in 0..<K {
                let e = Int(slotExpert[t * K + j]), r = next[e]
                next[e] += 1
                rowToken[r] = Int32(t); slotRow[t * K + j] = Int32(r)
            }
        }
    }

    private func gather(_ x: UnsafePointer<Float>, _ N: Int) {
        let C = hidden, R = N * topK
        let src = SendablePointer(UnsafeMutablePointer(mutating: x)), dst = SendablePointer(gx.data)
        rowToken.withUnsafeBufferPointer { rt in
            let tok = SendablePointer(UnsafeMutablePointer(mutating: rt.baseAddress!))
            Parallel.forRange(R, costPerItem: C) { s, e in
                for r in s..<e { (dst.p + r * C).update(from: src.p + Int(tok.p[r]) * C, count: C) }
            }
        }
    }

    /// out[t] = Σ_j w_tj · y[row(t, j)], accumulated in expert-ascending order.
    private func scatter(_ out: UnsafeMutablePointer<Float>, _ N: Int) {
        let C = hidden, K = topK
        let o = SendablePointer(out), y = SendablePointer(gy.data)
        slotRow.withUnsafeBufferPointer { srb in
            slotWeight.withUnsafeBufferPointer { swb in
                let sr = SendablePointer(UnsafeMutablePointer(mutating: srb.baseAddress!))
                let sw = SendablePointer(UnsafeMutablePointer(mutating: swb.baseAddress!))
                Parallel.forRange(N, costPerItem: K * C) { s, e in
                    for t in s..<e {
                        let dst = o.p + t * C
                        dst.update(repeating: 0, count: C)
                        for j in 0..<K {
                            let w = sw.p[t * K + j], src = y.p + Int(sr.p[t * K + j]) * C
                            for c in 0..<C { dst[c] += src[c] * w }
                        }
                    }
                }
            }
        }
    }

    /// Calibration: every expert observes every token (the output is discarded).
    private func observeAllExperts(_ x: UnsafePointer<Float>, n N: Int) throws {
        let C = hidden, I = inter
        let g = Tensor(shape: [N * I], zeroed: false), u = Tensor(shape: [N * I], zeroed: false)
        let h = Tensor(shape: [N * I], zeroed: false), y = Tensor(shape: [N * C], zeroed: false)
        for ex in experts {
            try ex.gate.forward(x, out: g.data, n: N)
            try ex.up.forward(x, out: u.data, n: N)
            SwiGLU.forward(out: h.data, gate: g.data, up: u.data, n: N * I)
            try ex.down.forward(h.data, out: y.data, n: N)
        }
    }

    // MARK: - Backward

    /// dout: d loss / d block output [N, C]; x: the forward input; dx: written [N, C].
    /// `dProbs`, when given, is an extra d loss / d router probability [N, E] (the auxiliary
    /// loss), added before the softmax backward.
    public func backward(
        dout: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>,
        dProbs: UnsafePointer<Float>? = nil
    ) {
        let N = n, C = hidden, I = inter, E = numExperts, K = topK, R = N * K
        let dy = Tensor(shape: [R * C], zeroed: false), dh = Tensor(shape: [R * I], zeroed: false)
        let dg = Tensor(shape: [R * I], zeroed: false), du = Tensor(shape: [R * I], zeroed: false)
        var dw = [Float](repeating: 0, count: N * K)
        // dw_tj = <dout_t, y_row>, dy_row = w_tj · dout_t.
        StepProfiler.measure("moe.dispatch") {
            let d = SendablePointer(UnsafeMutablePointer(mutating: dout)), y = SendablePointer(gy.data), dyp = SendablePointer(dy.data)
            slotRow.withUnsafeBufferPointer { srb in
                slotWeight.withUnsafeBufferPointer { swb in
                    dw.withUnsafeMutableBufferPointer { dwb in
                        let sr = SendablePointer(UnsafeMutablePointer(mutating: srb.baseAddress!))
                        let sw = SendablePointer(UnsafeMutablePointer(mutating: swb.baseAddress!))
                        let dwp = SendablePointer(dwb.baseAddress!)
                        Parallel.forRange(N, costPerItem: 2 * K * C) { s, e in
                            for t in s..<e {
                                let g = d.p + t * C
                                for j in 0..<K {
                                    let r = Int(sr.p[t * K + j]), w = sw.p[t * K + j]
                                    dwp.p[t * K + j] = Kernels.dot(g, y.p + r * C, C)
                                    let dst = dyp.p + r * C
                                    for c in 0..<C { dst[c] = g[c] * w }
                                }
                            }
                        }
                    }
                }
            }
        }
        for e in 0..<E where offsets[e + 1] > offsets[e] {
            let o = offsets[e], ne = offsets[e + 1] - o
            experts[e].down.backward(
                dy: dy.data + o * C, x: gh.data + o * I, xUsed: used[e]!.down, n: ne,
                dx: dh.data + o * I, accumulateDx: false)
        }
        StepProfiler.measure("bwd.swiglu") {
            SwiGLU.backward(dgate: dg.data, dup: du.data, dout: dh.data, gate: gg.data, up: gu.data, n: R * I)
        }
        // dy is reused as d(grouped input) [R, C].
        let dgx = dy
        for e in 0..<E where offsets[e + 1] > offsets[e] {
            let o = offsets[e], ne = offsets[e + 1] - o, ex = experts[e]
            ex.gate.backward(
                dy: dg.data + o * I, x: gx.data + o * C, xUsed: used[e]!.gate, n: ne,
                dx: dgx.data + o * C, accumulateDx: false)
            ex.up.backward(dy: du.data + o * I, x: gx.data + o * C, xUsed: used[e]!.up, n: ne, dx: dgx.data + o * C, accumulateDx: true)
        }
        // dx_t = Σ_j d(grouped input)[row(t, j)].
        StepProfiler.measure("moe.dispatch") {
            let dxp = SendablePointer(dx), src = SendablePointer(dgx.data)
            slotRow.withUnsafeBufferPointer { srb in
                let sr = SendablePointer(UnsafeMutablePointer(mutating: srb.baseAddress!))
                Parallel.forRange(N, costPerItem: K * C) { s, e in
                    for t in s..<e {
                        let dst = dxp.p + t * C
                        dst.update(from: src.p + Int(sr.p[t * K]) * C, count: C)
                        for j in 1..<K { Kernels.add(dst, src.p + Int(sr.p[t * K + j]) * C, C) }
                    }
                }
            }
        }
        // Router: through the renormalisation and the softmax to the logits.
        let dlogits = Tensor(shape: [N * E])
        StepProfiler.measure("moe.route") {
            let p = SendablePointer(probs.data), dl = SendablePointer(dlogits.data)
            let dpx = dProbs.map { SendablePointer(UnsafeMutablePointer(mutating: $0)) }
            let norm = normTopKProb
            slotExpert.withUnsafeBufferPointer { seb in
                slotWeight.withUnsafeBufferPointer { swb in
                    dw.withUnsafeBufferPointer { dwb in
                        let se = SendablePointer(UnsafeMutablePointer(mutating: seb.baseAddress!))
                        let sw = SendablePointer(UnsafeMutablePointer(mutating: swb.baseAddress!))
                        let dwp = SendablePointer(UnsafeMutablePointer(mutating: dwb.baseAddress!))
                        Parallel.forRange(N, costPerItem: 4 * E) { s, e in
                            for t in s..<e {
                                let row = p.p + t * E, d = dl.p + t * E
                                if let dpx { d.update(from: dpx.p + t * E, count: E) } else { d.update(repeating: 0, count: E) }
                                if norm {
                                    var total: Float = 0, wdw: Float = 0
                                    for j in 0..<K { total += row[Int(se.p[t * K + j])]; wdw += dwp.p[t * K + j] * sw.p[t * K + j] }
                                    for j in 0..<K { d[Int(se.p[t * K + j])] += (dwp.p[t * K + j] - wdw) / total }
                                } else {
                                    for j in 0..<K { d[Int(se.p[t * K + j])] += dwp.p[t * K + j] }
                                }
                                var dot: Float = 0
                                for i in 0..<E { dot += d[i] * row[i] }
                                for i in 0..<E { d[i] = row[i] * (d[i] - dot) }
                            }
                        }
                    }
                }
            }
        }
        router.backward(dy: dlogits.data, x: x, xUsed: routerUsed!, n: N, dx: dx, accumulateDx: true)
        if let s = sharedExpert, let sgate = sharedExpertGate, let su_ = sharedUsed {
            let Is = s.gate.outFeatures
            let dsy = Tensor(shape: [N * C], zeroed: false), dz = Tensor(shape: [N], zeroed: false)
            let d = SendablePointer(UnsafeMutablePointer(mutating: dout)), y = SendablePointer(sy.data), z = SendablePointer(ssig.data)
            let dsyp = SendablePointer(dsy.data), dzp = SendablePointer(dz.data)
            Parallel.forRange(N, costPerItem: 2 * C) { s0, e0 in
                for t in s0..<e0 {
                    let sig = z.p[t]
                    dzp.p[t] = Kernels.dot(d.p + t * C, y.p + t * C, C) * sig * (1 - sig)
                    for c in 0..<C { dsyp.p[t * C + c] = d.p[t * C + c] * sig }
                }
            }
            sgate.backward(dy: dz.data, x: x, xUsed: su_.sgate, n: N, dx: dx, accumulateDx: true)
            let dsh = Tensor(shape: [N * Is], zeroed: false), dsg = Tensor(shape: [N * Is], zeroed: false)
            let dsu = Tensor(shape: [N * Is], zeroed: false)
            s.down.backward(dy: dsy.data, x: sh.data, xUsed: su_.down, n: N, dx: dsh.data, accumulateDx: false)
            StepProfiler.measure("bwd.swiglu") {
                SwiGLU.backward(dgate: dsg.data, dup: dsu.data, dout: dsh.data, gate: sg.data, up: su.data, n: N * Is)
            }
            s.gate.backward(dy: dsg.data, x: x, xUsed: su_.gate, n: N, dx: dx, accumulateDx: true)
            s.up.backward(dy: dsu.data, x: x, xUsed: su_.up, n: N, dx: dx, accumulateDx: true)
        }
    }
}
