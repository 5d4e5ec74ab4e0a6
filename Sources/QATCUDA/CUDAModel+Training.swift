import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant

/// Training on the GPU: the backward of every layer (the order of `CausalLM.backward`), the
/// fused chunked loss heads, and the gradients of the trainable parameters in one device arena.
/// The optimizer's device state lives in `CUDAOptimizer`.
extension CUDAModel {
    /// Device gradients of the trainable parameters (host `Parameter.grad != nil`), one arena.
    /// `zeroGradients` zeroes nothing: it marks every gradient pending, and a pending gradient reads as zero. The
    /// first product that writes a whole gradient writes it (cuBLAS's beta = 0, `gradientToWrite`), every other
    /// writer zeroes it first (`gradient`), and what reads the arena as a whole settles the rest (`gradientList`):
    /// so a step neither clears ~4.9 GB (Llama-3.2-1B's fp32 gradients) nor reads them back in its dW products.
    final class Gradients {
        let arena: DeviceBuffer
        let offsets: [ObjectIdentifier: (offset: Int, count: Int)]
        /// The gradients that read as zero but hold stale values (or none).
        var pending: Set<ObjectIdentifier> = []
        init(_ d: CUDADevice, parameters: [Parameter]) throws {
            var offsets: [ObjectIdentifier: (Int, Int)] = [:]
            var total = 0
            for p in parameters where p.grad != nil {  // (each once: a tied lm_head is the embedding)
                offsets[ObjectIdentifier(p)] = (total, p.count)
                total += (p.count + 63) / 64 * 64  // 256-byte aligned slices
            }
            arena = try DeviceBuffer(d, floats: max(total, 1))
            try arena.zero()
            self.offsets = offsets
        }
        func pointer(_ p: Parameter) -> CUdeviceptr? {
            offsets[ObjectIdentifier(p)].map { arena.ptr + CUdeviceptr($0.offset * 4) }
        }
    }

    /// Backward scratch of one batch shape.
    final class BackwardBuffers {
        let dres, dln, dh, dattn, dq, dqRaw, dk, dkRaw, dv, delta, dHidden, dy16, tmp: DeviceBuffer
        init(_ d: CUDADevice, b: Buffers, c: ModelConfig, precision: Precision) throws {
            let n = b.batch * b.seqLen, C = c.hiddenSize, qd = c.numHeads * c.headDim, kd = c.numKVHeads * c.headDim, I = c.intermediateSize
            dres = try DeviceBuffer(d, floats: n * C); dln = try DeviceBuffer(d, floats: n * C)
            // dh: bf16 in bf16 precision (an fp32 dh there goes to scratch), dgate/dup in fp32 only when read (`layerBackward`)
            dh = try DeviceBuffer(d, bytes: n * I * (precision == .bf16 ? 2 : 4))
            dattn = try DeviceBuffer(d, floats: n * qd); dq = try DeviceBuffer(d, floats: n * qd);
            dqRaw = try DeviceBuffer(d, floats: n * qd)
            dk = try DeviceBuffer(d, floats: n * kd); dkRaw = try DeviceBuffer(d, floats: n * kd); dv = try DeviceBuffer(d, floats: n * kd)
            delta = try DeviceBuffer(d, floats: b.batch * c.numHeads * b.seqLen)
            dHidden = try DeviceBuffer(d, floats: n * C)
            dy16 = try DeviceBuffer(d, bytes: n * b.widest * 2)
            tmp = try DeviceBuffer(d, floats: n * b.widest)
        }
    }

    /// The device gradient of `p` for a kernel that adds to it (zeroed first when pending), nil when `p` is frozen.
    func gradient(_ p: Parameter) throws -> CUdeviceptr? {
        guard let t = training, let ptr = t.gradients.pointer(p) else { return nil }
        if t.gradients.pending.remove(ObjectIdentifier(p)) != nil { try device.zero(ptr, bytes: p.count * 4) }
        return ptr
    }

    /// The device gradient of `p` for a product that writes all of it, with the product's beta: 0 when the gradient
    /// is pending (it is written, not added to: it is no longer pending), else 1. nil when `p` is frozen.
    func gradientToWrite(_ p: Parameter) -> (ptr: CUdeviceptr, beta: Float)? {
        guard let t = training, let ptr = t.gradients.pointer(p) else { return nil }
        return (ptr, t.gradients.pending.remove(ObjectIdentifier(p)) != nil ? 0 : 1)
    }

    /// Whether `p` has a device gradient (is trainable).
    func hasGradient(_ p: Parameter) -> Bool { training?.gradients.pointer(p) != nil }

    /// A scratch buffer of at least `bytes`, kept by name and grown on demand.
    func scratch(_ key: String, bytes: Int) throws -> CUdeviceptr {
        if let s = scratchBuffers[key], s.bytes >= bytes { return s.ptr }
        scratchBuffers[key] = nil
        let s = try DeviceBuffer(device, bytes: max(bytes, 256))
        scratchBuffers[key] = s
        return s.ptr
    }

    /// Allocates the gradient arena for the parameters the host marks trainable (once).
    public func prepareTraining() throws {
        if training == nil { training = TrainingState(gradients: try Gradients(device, parameters: model.parameters)) }
    }

    /// Every gradient reads as zero from here (pending: nothing is cleared until it is written or read).
    public func zeroGradients() throws {
        guard let t = training else { return }
        t.gradients.pending = Set(t.gradients.offsets.keys)
    }

    /// The trainable parameters' device gradients, by name (host parameter order), every pending one zeroed first
    /// (what reads them all: the norm, the all-reduce, the checks).
    var gradientList: [(name: String, ptr: CUdeviceptr, count: Int)] {
        get throws {
            guard let t = training else { return [] }
            if t.gradients.pending.count == t.gradients.offsets.count {
                try t.gradients.arena.zero()
                t.gradients.pending = []
            }
            return try model.parameters.compactMap { p in try gradient(p).map { (p.name, $0, p.count) } }
        }
    }

    private func backwardBuffers(_ b: Buffers) throws -> BackwardBuffers {
        guard let t = training else { throw QATError.internal("backward before prepareTraining") }
        if let g = t.backward, g.dres.bytes == b.batch * b.seqLen * config.hiddenSize * 4 { return g }
        t.backward = nil
        let g = try BackwardBuffers(device, b: b, c: config, precision: precision)
        t.backward = g
        return g
    }

    // MARK: Linear backward

    /// The clipped STE's amax of a quantizer, nil when its backward passes gradients through.
    private func clipAmax(_ hook: FakeQuantHook?) -> Float? {
        guard let q = hook as? TensorQuantizer, q.enabled, !q.isCalibrating, q.ste == .clipped, let a = q.amax, q.isQuantizing else {
            return nil
        }
        return a
    }

    /// dx (+)= dy·W (through the input STE); dW += dyᵀ·x_used (through the weight STE);
    /// db += Σ dy (`Linear.backward`). `x` is the Linear's original input [n, in], dy [n, out];
    /// `input`: x_used already made (`sharedProductInput`). `dy16Ready`: `dy16` already holds
    /// dy's bf16 copy (its producer wrote it); dy itself may then be 0 unless a bias or an adapter reads it.
    /// `weightGradient: false`: no dW here (the caller makes it later over more rows, `weightGradientProduct`).
    /// `dx16`: dx is written in bf16 (bf16 products; nothing adds to it: no adapter, no clipped STE, not accumulated).
    func linearBackward(
        _ l: Linear, dy: CUdeviceptr, x: CUdeviceptr, n: Int, dx: CUdeviceptr?, accumulateDx: Bool, b: Buffers,
        g: BackwardBuffers, dy16 dy16Buffer: CUdeviceptr? = nil, dy16Ready: Bool = false, tmp tmpBuffer: CUdeviceptr? = nil,
        input made: CUdeviceptr? = nil, weightGradient: Bool = true, dx16: Bool = false
    ) throws {
        guard let dl = linears[ObjectIdentifier(l)] else { throw QATError.internal("\(l.name) has no device weights") }
        if dl.stale { try prepare(dl) }
        let bf = precision == .bf16, out = l.outFeatures, inp = l.inFeatures
        guard dy != 0 || (dy16Ready && l.bias == nil && !hasAdapter(l)) else { throw QATError.internal("\(l.name): no fp32 dy") }
        var dyIn = dy
        if bf {
            let d16 = dy16Buffer ?? g.dy16.ptr
            if !dy16Ready { try device.toBF16(out: d16, dy, count: n * out) }
            dyIn = d16
        }
        if weightGradient { try weightGradientProduct(l, dy: dyIn, x: x, n: n, b: b, input: made) }
        if let bias = l.bias, let gb = try gradient(bias) {
            try device.columnSum(
                out: gb, a: dy, n: n, c: out, scratch: try scratch("colsum", bytes: CUDADevice.columnSumScratch(n: n, c: out) * 4))
        }
        guard let dx else { return try adapterBackward(l, dy: dy, dy16: bf ? dyIn : nil, x: x, n: n, dx: nil) }
        let w = bf ? dl.bf16!.ptr : (dl.fakeQuant ?? dl.weight).ptr
        if dx16 && (!bf || accumulateDx || hasAdapter(l) || clipAmax(l.inputQuantizer) != nil) {
            throw QATError.internal("\(l.name): a bf16 dx that something adds to")
        }
        if let a = clipAmax(l.inputQuantizer) {
            let t = tmpBuffer ?? g.tmp.ptr
            try device.gemm(m: n, n: inp, k: out, a: dyIn, lda: out, b: w, ldb: inp, c: t, ldc: inp, bf16: bf)
            try device.steClip(out: dx, grad: t, x: x, amax: a, count: n * inp, accumulate: accumulateDx)
        } else {
            try device.gemm(
                m: n, n: inp, k: out, a: dyIn, lda: out, b: w, ldb: inp, c: dx, ldc: inp, beta: accumulateDx ? 1 : 0, bf16: bf, c16: dx16)
        }
        try adapterBackward(l, dy: dy, dy16: bf ? dyIn : nil, x: x, n: n, dx: dx)  // after dx is written, as `Linear.backward`
    }

    /// dW += dyᵀ·x_used (through the weight STE) of a Linear whose weight is trainable; `dy` [n, out] is
    /// in the products' precision (bf16 or fp32), `x` the Linear's original input [n, in] (`x16`: its
    /// bf16 copy when its producer wrote one), `input`: x_used already made.
    func weightGradientProduct(
        _ l: Linear, dy: CUdeviceptr, x: CUdeviceptr, x16: CUdeviceptr? = nil, n: Int, b: Buffers, input made: CUdeviceptr? = nil
    ) throws {
        guard let (gw, beta) = gradientToWrite(l.weight) else { return }
        guard let dl = linears[ObjectIdentifier(l)] else { throw QATError.internal("\(l.name) has no device weights") }
        let bf = precision == .bf16, out = l.outFeatures, inp = l.inFeatures
        let xu = try made ?? productInput(l, x, x16: x16, n: n, buffers: b)
        if let a = clipAmax(l.weightQuantizer) {
            let t = try scratch("weight-ste", bytes: out * inp * 4)
            try device.gemm(transA: true, m: out, n: inp, k: n, a: dy, lda: out, b: xu, ldb: inp, c: t, ldc: inp, bf16: bf)
            try device.steClip(out: gw, grad: t, x: dl.weight.ptr, amax: a, count: out * inp, accumulate: beta != 0)
        } else {
            try device.gemm(transA: true, m: out, n: inp, k: n, a: dy, lda: out, b: xu, ldb: inp, c: gw, ldc: inp, beta: beta, bf16: bf)
        }
    }

    /// RMSNorm backward with its weight gradient (when trainable).
    private func rmsnormBackward(
        _ weight: Parameter, dinp: CUdeviceptr, dout: CUdeviceptr, inp: CUdeviceptr, rstd: CUdeviceptr,
        n: Int, c: Int, accumulate: Bool, dinp16: CUdeviceptr = 0, dinp16Rows: (group: Int, stride: Int)? = nil
    ) throws {
        let dw = try gradient(weight).map { ($0, try scratch("colsum", bytes: CUDADevice.rmsnormBackwardScratch(n: n, c: c) * 4)) }
        try device.rmsnormBackward(
            dinp: dinp, dout: dout, inp: inp, weight: try read(weight), rstd: rstd, n: n, c: c, accumulate: accumulate, dinp16: dinp16,
            dinp16Rows: dinp16Rows, weightGradient: dw)
    }

    /// Linears that read one product input (a layer's q, k and v; its gate and up) and whose backward products
    /// can run as one.
    struct FusedProjections {
        let linears: [Linear]
        /// Their bf16 product copies, adjacent in order (`adjacentProductCopies`): one [Σ out, in] weight.
        let w16: CUdeviceptr
        /// Their weights' gradients, adjacent in order in the arena: one [Σ out, in] gradient.
        let gradient: CUdeviceptr
        /// The product input they share (`sharedProductInput`'s, or x's bf16 copy).
        let input: CUdeviceptr
        var width: Int { linears.reduce(0) { $0 + $1.outFeatures } }
    }

    /// `ls` as one `FusedProjections`, nil when their products must run one by one (`linearBackward`): not bf16, a
    /// frozen weight, a trainable bias (its sum of the fp32 dy stays with `linearBackward`; the arena holds it right
    /// after its weight, so a layer whose Linears all have one has no adjacent gradients anyway), product copies or
    /// gradients not adjacent (QLoRA's shared decode), an adapter, a clipped STE (each changes its own products), or
    /// no product input common to all: `shared` (`sharedProductInput`'s), else, when no input quantizer quantizes,
    /// x's bf16 copy made once here.
    func fusedProjections(_ ls: [Linear], shared: CUdeviceptr?, x: CUdeviceptr, n: Int, buffers b: Buffers) throws -> FusedProjections? {
        guard precision == .bf16, let first = ls.first else { return nil }
        guard shared != nil || (x != 0 && ls.allSatisfy { $0.inputQuantizer?.isQuantizing != true }) else { return nil }
        var starts: (w16: CUdeviceptr, gradient: CUdeviceptr)? = nil
        var next: (w16: CUdeviceptr, gradient: CUdeviceptr) = (0, 0)  // where the next Linear's copy and gradient must start
        for l in ls {
            guard let dl = linears[ObjectIdentifier(l)], dl.packed == nil, !dl.frozen, !hasAdapter(l), l.inFeatures == first.inFeatures,
                clipAmax(l.inputQuantizer) == nil, clipAmax(l.weightQuantizer) == nil, !(l.bias.map(hasGradient) ?? false),
                let gw = training?.gradients.pointer(l.weight)
            else { return nil }
            if dl.stale { try prepare(dl) }
            guard let copy = dl.bf16, starts == nil || (copy.ptr == next.w16 && gw == next.gradient) else { return nil }
            if starts == nil { starts = (copy.ptr, gw) }
            let count = CUdeviceptr(l.outFeatures * l.inFeatures)
            next = (copy.ptr + 2 * count, gw + 4 * count)
        }
        guard let starts else { return nil }
        let input = try shared ?? productInput(first, x, n: n, buffers: b)
        return FusedProjections(linears: ls, w16: starts.w16, gradient: starts.gradient, input: input)
    }

    /// The backward of `f` as `linearBackward` of each (no bias gradient: `fusedProjections`), with its products as
    /// one: dW += dyᵀ·x_used over the Linears' rows together ([Σ out, in]), then dx = dy·W over K = Σ out (written,
    /// not added). `dy16`: the Linears' bf16 dys as the rows of one [n, Σ out] matrix.
    /// The gradient is written (beta 0) when every Linear's is pending, else added to (the pending ones zeroed first).
    func fusedProjectionBackward(_ f: FusedProjections, dy16: CUdeviceptr, n: Int, dx: CUdeviceptr) throws {
        let width = f.width, inp = f.linears[0].inFeatures
        let pending = f.linears.filter { training?.gradients.pending.contains(ObjectIdentifier($0.weight)) == true }
        let beta: Float = pending.count == f.linears.count ? 0 : 1
        for l in pending {
            if beta == 0 { _ = gradientToWrite(l.weight) } else { _ = try gradient(l.weight) }
        }
        try device.gemm(
            transA: true, m: width, n: inp, k: n, a: dy16, lda: width, b: f.input, ldb: inp, c: f.gradient, ldc: inp, beta: beta,
            bf16: true)
        try device.gemm(m: n, n: inp, k: width, a: dy16, lda: width, b: f.w16, ldb: inp, c: dx, ldc: inp, bf16: true)
    }

    // MARK: Backward

    /// d loss / d final hidden (`dHidden` [B·T, C], e.g. the loss head's) → every trainable
    /// parameter's device gradient accumulated. Needs a forward with saveForBackward (with
    /// activation checkpointing, each layer's forward is recomputed just before its backward).
    public func backward(dHidden: CUdeviceptr) throws {
        guard let b = buffers, b.training else { throw QATError.internal("backward needs a forward with saveForBackward") }
        let g = try backwardBuffers(b)
        let c = config, C = c.hiddenSize, N = b.batch * b.seqLen
        // bf16: every RMSNorm backward also writes the residual gradient's bf16 copy into g.dy16, where the next
        // product that reads it as dy (down_proj after the final or an input norm, o_proj after a post-attention
        // norm) finds it (`dy16Ready`); nothing writes g.dy16 in between.
        try rmsnormBackward(
            model.finalNorm, dinp: g.dres.ptr, dout: dHidden, inp: b.residuals[model.layers.count].ptr,
            rstd: b.finalRstd.ptr, n: N, c: C, accumulate: false, dinp16: precision == .bf16 ? g.dy16.ptr : 0)
        for l in stride(from: model.layers.count - 1, through: 0, by: -1) {
            if b.checkpointed { try recomputeLayer(l, b) }
            try layerBackward(model.layers[l], b.layers[b.checkpointed ? 0 : l], xin: b.residuals[l].ptr, b: b, g: g)
        }
        if let de = try gradient(model.embed) {
            guard let groups = embeddingGroups else { throw QATError.internal("embedding backward before a training forward") }
            try device.embeddingBackward(dtable: de, dout: g.dres.ptr, groups: groups, c: C)
        }
    }

    private func layerBackward(_ L: DecoderLayer, _ a: LayerActivations, xin: CUdeviceptr, b: Buffers, g: BackwardBuffers) throws {
        let c = config, C = c.hiddenSize, N = b.batch * b.seqLen, H = c.numHeads, Hkv = c.numKVHeads, D = c.headDim
        guard let gp = L.gateProj, let up = L.upProj, let dp = L.downProj else { throw QATError.internal("layer \(L.index) has no MLP") }
        let dres = g.dres.ptr
        // MLP: out = mid + down(silu(gate(ln2)) ∘ up(ln2))
        let I = c.intermediateSize
        // down_proj's input as the forward made it in one pass (`fusedDownInput`), else h again (not kept per layer).
        let downInput = a.made(.downInput)
        let h = downInput == nil ? try hBuffer(b) : 0  // (with downInput nothing reads h)
        if downInput == nil { try device.swiglu(out: h, gate: a.gate.ptr, up: a.up.ptr, count: N * I, in16: a.gateUp16) }
        let bf = precision == .bf16, dres16 = bf ? g.dy16.ptr : 0  // (dres's bf16 copy, see `backward`)
        // dh in bf16 (the product's sums rounded: what the SwiGLU backward reads, half the bytes) with bf16 gate and up,
        // unless something adds to the product's dx (an adapter, the clipped STE)
        let dh16 = a.gateUp16 && !hasAdapter(dp) && clipAmax(dp.inputQuantizer) == nil
        let dh = bf && !dh16 ? try scratch("dh32", bytes: N * I * 4) : g.dh.ptr  // (g.dh holds bf16 in bf16 precision)
        try linearBackward(
            dp, dy: dres, x: h, n: N, dx: dh, accumulateDx: false, b: b, g: g, dy16Ready: bf, input: downInput, dx16: dh16)
        // (the products' input as the forward's `normForward` made it, or made again from its fp32 rows)
        let ln2 = a.made(.ln2) ?? 0
        let gateUp = try a.made(.gateUpInput) ?? sharedProductInput([gp, up], ln2, n: N, buffers: b)
        if let fused = try fusedProjections([gp, up], shared: gateUp, x: ln2, n: N, buffers: b) {
            // only the bf16 copies, as the rows [dgate | dup] of the fused products' dy (nothing reads fp32 ones)
            let d16 = try scratch("dgateup16", bytes: N * 2 * I * 2)
            try device.swigluBackward(
                dgate: 0, dup: 0, dout: dh, gate: a.gate.ptr, up: a.up.ptr, count: N * I, cols: I, dgate16: d16,
                dup16: d16 + CUdeviceptr(I * 2), stride16: 2 * I, in16: a.gateUp16, dout16: dh16)
            try fusedProjectionBackward(fused, dy16: d16, n: N, dx: g.dln.ptr)
        } else {
            // bf16: the products read dgate/dup's bf16 copies, written by the backward kernel itself;
            // the fp32 ones only when a bias or an adapter reads them.
            let fp32Grads = !bf || [gp, up].contains { $0.bias != nil || hasAdapter($0) }
            let dgate = fp32Grads ? try scratch("dgate32", bytes: N * I * 4) : 0
            let dup = fp32Grads ? try scratch("dup32", bytes: N * I * 4) : 0
            let dgate16 = bf ? g.dy16.ptr : 0, dup16 = bf ? try scratch("dup16", bytes: N * I * 2) : 0
            try device.swigluBackward(
                dgate: dgate, dup: dup, dout: dh, gate: a.gate.ptr, up: a.up.ptr, count: N * I, cols: I, dgate16: dgate16,
                dup16: dup16, in16: a.gateUp16, dout16: dh16)
            try linearBackward(
                gp, dy: dgate, x: ln2, n: N, dx: g.dln.ptr, accumulateDx: false, b: b, g: g,
                dy16: bf ? dgate16 : nil, dy16Ready: bf, input: gateUp)
            try linearBackward(
                up, dy: dup, x: ln2, n: N, dx: g.dln.ptr, accumulateDx: true, b: b, g: g,
                dy16: bf ? dup16 : nil, dy16Ready: bf, input: gateUp)
        }
        try rmsnormBackward(
            L.postNorm, dinp: dres, dout: g.dln.ptr, inp: a.mid.ptr, rstd: a.rstd2.ptr, n: N, c: C, accumulate: true, dinp16: dres16)
        // Attention: mid = x + o(attn(rope(q), kq(rope(k)), vq(v)))
        try linearBackward(
            L.oProj, dy: dres, x: a.attn.ptr, n: N, dx: g.dattn.ptr, accumulateDx: false, b: b, g: g, dy16Ready: bf,
            input: a.made(.oInput))
        try device.attentionBackward(
            dq: g.dq.ptr, dk: g.dk.ptr, dv: g.dv.ptr, dout: g.dattn.ptr, out: a.attn.ptr, lse: a.lse.ptr,
            q: a.q.ptr, k: a.kUsed, v: a.vUsed, delta: g.delta.ptr, batch: b.batch, seqLen: b.seqLen, heads: H,
            kvHeads: Hkv, headDim: D, window: c.slidingWindow, bf16: precision == .bf16, scratch16: try attentionScratch16(b),
            inputs16: try attentionInputs16(a, D))
        if a.kUsed != a.kRope.ptr, let amax = clipAmax(L.kQuantizer) {
            try device.steClip(out: g.dk.ptr, grad: g.dk.ptr, x: a.kRope.ptr, amax: amax, count: N * Hkv * D, accumulate: false)
        }
        if a.vUsed != a.vRaw.ptr, let amax = clipAmax(L.vQuantizer) {
            try device.steClip(out: g.dv.ptr, grad: g.dv.ptr, x: a.vRaw.ptr, amax: amax, count: N * Hkv * D, accumulate: false)
        }
        // dq, dk: the rope backward, then (Qwen3) the q/k norms' backward. In bf16 the last of these kernels before
        // each product also writes its bf16 copy (so no to_bf16 pass): into g.dy16, which that product reads as dy
        // (q's chain runs, then q's product, then k's chain and product), or into the rows of the fused products'
        // dy (`fusedProjectionBackward`).
        /// The chain of q or k from d (the attention's gradient): returns the product's fp32 dy (d, or the norm's
        /// dRaw); its bf16 copy goes to d16 (rows `stride` elements apart). norm: the per-head norm's weight, its
        /// input's gradient buffer, its input and rstd.
        func chain(
            _ d: CUdeviceptr, heads: Int, norm: (Parameter, dRaw: CUdeviceptr, raw: CUdeviceptr, rstd: CUdeviceptr)?,
            d16: CUdeviceptr, stride: Int
        ) throws -> CUdeviceptr {
            guard let (weight, dRaw, raw, rstd) = norm else {
                try device.rope(
                    d, cos: cosTable.ptr, sin: sinTable.ptr, rows: N, seqLen: b.seqLen, heads: heads, headDim: D, sign: -1, x16: d16,
                    x16Stride: stride)
                return d
            }
            try device.rope(d, cos: cosTable.ptr, sin: sinTable.ptr, rows: N, seqLen: b.seqLen, heads: heads, headDim: D, sign: -1)
            try rmsnormBackward(
                weight, dinp: dRaw, dout: d, inp: raw, rstd: rstd, n: N * heads, c: D, accumulate: false, dinp16: d16,
                dinp16Rows: (heads, stride))
            return dRaw
        }
        let qNorm = L.qNorm.map { ($0, dRaw: g.dqRaw.ptr, raw: a.qRaw.ptr, rstd: a.qRstd.ptr) }
        let kNorm = L.kNorm.map { ($0, dRaw: g.dkRaw.ptr, raw: a.kRaw.ptr, rstd: a.kRstd.ptr) }
        let ln = a.made(.ln) ?? 0
        let qkv = try a.made(.qkvInput) ?? sharedProductInput([L.qProj, L.kProj, L.vProj], ln, n: N, buffers: b)
        if let fused = try fusedProjections([L.qProj, L.kProj, L.vProj], shared: qkv, x: ln, n: N, buffers: b) {
            // (in g.dy16 when it is wide enough: o_proj has read dres's copy there, the input norm writes the next)
            let ld = H * D + 2 * Hkv * D, d16 = g.dy16.bytes >= N * ld * 2 ? g.dy16.ptr : try scratch("dqkv16", bytes: N * ld * 2)
            _ = try chain(g.dq.ptr, heads: H, norm: qNorm, d16: d16, stride: ld)
            _ = try chain(g.dk.ptr, heads: Hkv, norm: kNorm, d16: d16 + CUdeviceptr(H * D * 2), stride: ld)
            try device.toBF16(out: d16 + CUdeviceptr((H + Hkv) * D * 2), stride: ld, g.dv.ptr, rows: N, cols: Hkv * D)
            try fusedProjectionBackward(fused, dy16: d16, n: N, dx: g.dln.ptr)
        } else {
            let d16 = bf ? g.dy16.ptr : 0
            let dq = try chain(g.dq.ptr, heads: H, norm: qNorm, d16: d16, stride: H * D)
            try linearBackward(L.qProj, dy: dq, x: ln, n: N, dx: g.dln.ptr, accumulateDx: false, b: b, g: g, dy16Ready: bf, input: qkv)
            let dk = try chain(g.dk.ptr, heads: Hkv, norm: kNorm, d16: d16, stride: Hkv * D)
            try linearBackward(L.kProj, dy: dk, x: ln, n: N, dx: g.dln.ptr, accumulateDx: true, b: b, g: g, dy16Ready: bf, input: qkv)
            try linearBackward(L.vProj, dy: g.dv.ptr, x: ln, n: N, dx: g.dln.ptr, accumulateDx: true, b: b, g: g, input: qkv)
        }
        try rmsnormBackward(
            L.inputNorm, dinp: dres, dout: g.dln.ptr, inp: xin, rstd: a.rstd1.ptr, n: N, c: C, accumulate: true, dinp16: dres16)
    }

    /// The bf16 copies of q, k and v the forward kept for the tensor-core attention's backward (nil off the tensor cores).
    private func attentionInputs16(_ a: LayerActivations, _ headDim: Int) throws -> (q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr)? {
        guard CUDADevice.attentionOnTensorCores(bf16: precision == .bf16, headDim: headDim) else { return nil }
        guard let q = a.made(.q16), let k = a.made(.k16), let v = a.made(.v16) else {
            throw QATError.internal("attention backward: the forward kept no bf16 copies of q, k and v")
        }
        return (q, k, v)
    }

    // MARK: Loss heads

    /// What the fused loss head computes per chunk of logits.
    public enum LossHead {
        /// Cross-entropy (QAT).
        case crossEntropy
        /// Distillation against `teacher`'s final hidden states [n, C_t] (already computed):
        /// kind 0 forward KL, 1 reverse KL, 2 JSD(beta) (`kd_rows`).
        case distillation(teacher: CUDAModel, hidden: CUdeviceptr, kind: Int, beta: Float, temperature: Double, kdRatio: Double)
        /// QAD from a top-k teacher cache: the micro-batch's cache rows on the device (`topk_kd_rows`,
        /// CUDAModel+TopK.swift).
        case topK(TopKTeacher)
    }

    /// The fused chunked lm_head loss over this model's last training forward: returns (Σ CE,
    /// Σ T²·KD) over the valid rows, writes d(Σ loss · gradScale)/d hidden into the backward
    /// buffers' dHidden (pass it to `backward`) and accumulates the lm_head gradient. No [n × V]
    /// logits are held.
    public func lossBackward(_ head: LossHead, targets: [Int32], gradScale: Float) throws -> (ce: Double, kd: Double, dHidden: CUdeviceptr)
    {
        guard let b = buffers, b.training else { throw QATError.internal("loss before a training forward") }
        let g = try backwardBuffers(b)
        let n = b.batch * b.seqLen, V = config.vocabSize, C = config.hiddenSize, rows = chunkRows(n)
        guard targets.count == n else { throw QATError("loss: \(targets.count) targets for \(n) rows") }
        // bf16: the lm_head's weight gradient is one product per `group` chunks (k = group·rows, their
        // bf16 dlogits kept meanwhile), not one per chunk: each such product reads and writes the whole
        // fp32 [V × C] gradient (1 GiB at Llama-3.2-1B's shape), which at k ≈ 500 costs more than its arithmetic.
        let bf = precision == .bf16
        let group = bf && hasGradient(model.lmHead.weight) ? Self.lmHeadGroup(rows: rows, n: n) : 1
        let dy16 = bf ? try scratch("logits-bf16", bytes: group * rows * V * 2) : nil
        // The fp32 dlogits are written only when something reads them besides the bf16 products (a bias, an adapter).
        let keepFP32 = !bf || model.lmHead.bias != nil || hasAdapter(model.lmHead)
        // Otherwise the logits themselves are bf16, as a bf16 model in transformers computes them (so are the
        // teacher's, when its lm_head is such a product too): the lm_head product writes them into this chunk's
        // slot of dy16, where the loss row kernel reads them and writes their gradient (`_bf16` kernels, loss.cu).
        let logits16: Bool
        switch head {
        case .crossEntropy: logits16 = !keepFP32
        case .distillation(let teacher, _, _, _, _, _):
            logits16 =
                !keepFP32 && teacher.precision == .bf16 && teacher.model.lmHead.bias == nil && !teacher.hasAdapter(teacher.model.lmHead)
        case .topK: logits16 = false
        }
        let logits = logits16 ? 0 : try scratch("logits", bytes: rows * V * 4)
        var groupStart = 0
        // Per-row results of every chunk (CE: a float per row, distillation: two doubles), read back once after the
        // loop, so the host does not wait for the device between chunks.
        let rowOut = try scratch("row-out", bytes: n * 16)
        let targetBuffer = try scratch("targets", bytes: n * 4)
        try targets.withUnsafeBytes { try device.check(device.api.cuMemcpyHtoD(targetBuffer, $0.baseAddress!, n * 4), "cuMemcpyHtoD") }
        var ce = 0.0, kd = 0.0
        var start = 0
        while start < n {
            let r = min(rows, n - start)
            let h = b.final.ptr + CUdeviceptr(start * C * 4), h16 = b.final16.map { $0.ptr + CUdeviceptr(start * C * 2) }
            let t = targetBuffer + CUdeviceptr(start * 4)
            let slot = dy16.map { $0 + CUdeviceptr((start - groupStart) * V * 2) }  // this chunk's bf16 dlogits
            if logits16, let slot {
                try linear(model.lmHead, h, x16: h16, out: slot, n: r, buffers: b, out16: true)
            } else {
                try linear(model.lmHead, h, x16: h16, out: logits, n: r, buffers: b)
            }
            var slotReady = false
            switch head {
            case .crossEntropy where logits16:
                try device.crossEntropyBackwardBF16(
                    rowLoss: rowOut + CUdeviceptr(start * 4), logits16: slot ?? 0, targets: t, rows: r, vocab: V, gradScale: gradScale)
                slotReady = true
            case .crossEntropy:
                try device.crossEntropyBackward(
                    rowLoss: rowOut + CUdeviceptr(start * 4), logits: logits, targets: t, rows: r, vocab: V, gradScale: gradScale,
                    logits16: slot ?? 0, keepFP32: keepFP32)
                slotReady = slot != nil
            case .distillation(let teacher, let teacherHidden, let kind, let beta, let T, let kdRatio):
                let Vt = teacher.config.vocabSize, Ct = teacher.config.hiddenSize
                let tl = try scratch(logits16 ? "teacher-logits16" : "teacher-logits", bytes: rows * Vt * (logits16 ? 2 : 4))
                guard let tb = teacher.buffers else { throw QATError.internal("teacher forward missing") }
                let th16 = teacherHidden == tb.final.ptr ? tb.final16.map { $0.ptr + CUdeviceptr(start * Ct * 2) } : nil
                try teacher.linear(
                    teacher.model.lmHead, teacherHidden + CUdeviceptr(start * Ct * 4), x16: th16, out: tl, n: r, buffers: tb,
                    out16: logits16)
                let invT = Float(1 / T), cKD = Float(kdRatio * Double(gradScale) * T), cCE = Float((1 - kdRatio) * Double(gradScale))
                slotReady = slot != nil
                if logits16 {
                    try device.distillationRowsBF16(
                        rowOut: rowOut + CUdeviceptr(start * 16), student16: slot ?? 0, teacher16: tl, teacherStride: Vt,
                        targets: t, rows: r, vocab: V, kind: kind, beta: beta, invT: invT, cKD: cKD, cCE: cCE, computeCE: kdRatio < 1)
                    break
                }
                try device.distillationRows(
                    rowOut: rowOut + CUdeviceptr(start * 16), student: logits, teacher: tl, teacherStride: Vt, targets: t, rows: r,
                    vocab: V, kind: kind, beta: beta, invT: invT, cKD: cKD, cCE: cCE, computeCE: kdRatio < 1, student16: slot ?? 0,
                    keepFP32: keepFP32)
            case .topK(let teacher):
                let p = try topKChunk(
                    teacher, logits: logits, targets: t, hostTargets: targets, start: start, rows: r, gradScale: gradScale, rowOut: rowOut)
                ce += p.ce; kd += p.kd
            }
            try linearBackward(
                model.lmHead, dy: logits, x: h, n: r, dx: g.dHidden.ptr + CUdeviceptr(start * C * 4), accumulateDx: false,
                b: b, g: g, dy16: slot, dy16Ready: slotReady, tmp: try scratch("lm-head-dx", bytes: r * C * 4),
                weightGradient: group == 1)
            start += r
            if group > 1 && (start - groupStart == group * rows || start == n), let dy16 {
                try weightGradientProduct(
                    model.lmHead, dy: dy16, x: b.final.ptr + CUdeviceptr(groupStart * C * 4),
                    x16: b.final16.map { $0.ptr + CUdeviceptr(groupStart * C * 2) }, n: start - groupStart, b: b)
                groupStart = start
            }
        }
        switch head {  // the rows' sums in row order
        case .crossEntropy:
            var losses = [Float](repeating: 0, count: n)
            try losses.withUnsafeMutableBytes { try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, rowOut, n * 4), "cuMemcpyDtoH") }
            for i in 0..<n where targets[i] != CrossEntropy.ignoreIndex { ce += Double(losses[i]) }
        case .distillation(_, _, _, _, let T, _):
            try device.addDistillationSums(rowOut, targets: targets[0..<n], temperature: T, ce: &ce, kd: &kd)
        case .topK:
            break
        }
        return (ce, kd, g.dHidden.ptr)
    }

    /// Chunks of `rows` (of n) whose lm_head weight gradient is one product: about 2,048 rows, at most 8 chunks.
    public static func lmHeadGroup(rows: Int, n: Int) -> Int {
        let r = max(rows, 1)
        return max(1, min(8, (2048 + r / 2) / r, (n + r - 1) / r))
    }
}

/// The training state of a `CUDAModel` (gradients and backward scratch).
final class TrainingState {
    let gradients: CUDAModel.Gradients
    var backward: CUDAModel.BackwardBuffers?
    init(gradients: CUDAModel.Gradients) { self.gradients = gradients }
}
