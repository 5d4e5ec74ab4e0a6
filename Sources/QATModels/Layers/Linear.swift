import QATCore

/// y = x·Wᵀ + b with optional fake quantizers on the weight and on the input, as
/// ModelOpt's `QuantLinear`. W is HF's `[out, in]`.
///
/// The fake-quant weight is computed once per optimizer step (`refreshQuantizedWeight`),
/// not per micro-batch; the quantized input is kept for the weight gradient and the STE.
public final class Linear: @unchecked Sendable {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    public let name: String
    public let inFeatures: Int
    public let outFeatures: Int
    public let weight: Parameter
    public let bias: Parameter?
    public var weightQuantizer: FakeQuantHook?
    public var inputQuantizer: FakeQuantHook?
    /// A side path added to the output (LoRA, see `LinearAdapter`): forward adds it to `out`
    /// from the original input; backward accumulates its gradients and adds its dx.
    public var adapter: LinearAdapter?
    /// Supplies the weight the matmuls use instead of the master weight or its fake-quant copy
    /// (QLoRA: a frozen NVFP4 base decoded on demand, see `LinearWeightSource`).
    public var weightSource: LinearWeightSource?

    private var quantizedWeight: Tensor?
    private var quantizedWeightStale = true
    private var quantizedInput: Tensor?
    private var scratch: Tensor?
    /// Profiler phase names ("lm_head." or "linear." + what).
    private let pFQIn, pFQW, pGemmF, pGemmDW, pGemmDX, pSTE: String

    public init(name: String, weight: Parameter, bias: Parameter?) {
        self.name = name
        self.weight = weight
        self.bias = bias
        outFeatures = weight.shape[0]
        inFeatures = weight.shape[1]
        let tag = name == "lm_head" ? "lm_head." : "linear."
        pFQIn = tag + "fq.input"; pFQW = tag + "fq.weight"; pGemmF = tag + "gemm.fwd"
        pGemmDW = tag + "gemm.dW"; pGemmDX = tag + "gemm.dX"; pSTE = tag + "ste+acc"
    }

    /// The weight the matmul uses: the fake-quant copy when the weight quantizer quantizes.
    public var effectiveWeight: UnsafePointer<Float> {
        if let s = weightSource { return s.weight(for: self) }
        if let q = quantizedWeight, weightQuantizer?.isQuantizing == true { return UnsafePointer(q.data) }
        return UnsafePointer(weight.value.data)
    }

    /// Marks the fake-quant weight out of date (the master weight or the quantizer changed);
    /// the next forward recomputes it.
    public func markWeightChanged() { quantizedWeightStale = true }

    /// Recomputes the fake-quant weight from the master weight. While the weight quantizer
    /// calibrates, this records its amax.
    public func refreshQuantizedWeight() throws {
        quantizedWeightStale = false
        guard let wq = weightQuantizer else { quantizedWeight = nil; return }
        if wq.isCalibrating {
            try wq.forward(weight.value.data, scratchBuffer(weight.count), rows: outFeatures, cols: inFeatures)
            return
        }
        guard wq.isQuantizing else { quantizedWeight = nil; return }
        if quantizedWeight == nil { quantizedWeight = Tensor(shape: weight.shape, zeroed: false) }
        try wq.forward(weight.value.data, quantizedWeight!.data, rows: outFeatures, cols: inFeatures)
    }

    /// x: [n, in] → out: [n, out]. Returns the pointer of the input actually multiplied
    /// (the fake-quant copy when the input quantizer quantizes), which backward needs.
    /// `sharing`: another Linear that has just multiplied the same x, and what its forward
    /// returned; when its input quantizer quantizes like this one's (q/k/v, gate/up after
    /// calibration), that copy is used instead of quantizing x again (the same values). It must
    /// live as long as this layer's backward needs it, as the other Linear's own does.
    @discardableResult
    public func forward(
        _ x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, n: Int, sharing: (Linear, UnsafePointer<Float>)? = nil
    ) throws -> UnsafePointer<Float> {
        if quantizedWeightStale, weightQuantizer != nil { try StepProfiler.measure(pFQW) { try refreshQuantizedWeight() } }
        var xin = x
        if let iq = inputQuantizer {
            if let (other, used) = sharing, used != x, other.inFeatures == inFeatures, let oq = other.inputQuantizer,
                iq.quantizesLike(oq)
            {
                xin = used
            } else if iq.isQuantizing {
                if quantizedInput == nil || quantizedInput!.count < n * inFeatures {
                    quantizedInput = Tensor(shape: [n * inFeatures], zeroed: false)
                }
                try StepProfiler.measure(pFQIn) { try iq.forward(x, quantizedInput!.data, rows: n, cols: inFeatures) }
                xin = UnsafePointer(quantizedInput!.data)
            } else if iq.isCalibrating {
                try iq.forward(x, scratchBuffer(n * inFeatures), rows: n, cols: inFeatures)
            }
        }
        StepProfiler.measure(pGemmF) { BLAS.gemm(transB: true, m: n, n: outFeatures, k: inFeatures, a: xin, b: effectiveWeight, c: out) }
        if let b = bias {
            let o = SendablePointer(out), bp = SendablePointer(b.value.data), cols = outFeatures
            Parallel.forRange(n, costPerItem: cols) { s, e in
                for i in s..<e { Kernels.add(o.p + i * cols, bp.p, cols) }
            }
        }
        if let a = adapter { try a.forward(x, out: out, n: n) }
        return xin
    }

    /// dx (+)= dy·W (through the input STE); dW += dyᵀ·x_used (through the weight STE);
    /// db += Σ dy. `x` is the original input, `xUsed` what forward returned.
    public func backward(
        dy: UnsafePointer<Float>, x: UnsafePointer<Float>, xUsed: UnsafePointer<Float>, n: Int,
        dx: UnsafeMutablePointer<Float>?, accumulateDx: Bool
    ) {
        defer { adapter?.backward(dy: dy, x: x, n: n, dx: dx) }  // after dx is written
        if let g = weight.grad {
            if let wq = weightQuantizer, wq.isQuantizing {
                let tmp = scratchBuffer(weight.count)
                StepProfiler.measure(pGemmDW) { BLAS.gemm(transA: true, m: outFeatures, n: inFeatures, k: n, a: dy, b: xUsed, c: tmp) }
                StepProfiler.measure(pSTE) {
                    wq.backward(x: weight.value.data, gradOut: tmp, gradIn: tmp, count: weight.count)
                    Kernels.addParallel(g.data, tmp, weight.count)
                }
            } else {
                StepProfiler.measure(pGemmDW) {
                    BLAS.gemm(transA: true, m: outFeatures, n: inFeatures, k: n, a: dy, b: xUsed, beta: 1, c: g.data)
                }
            }
        }
        if let b = bias, let g = b.grad {
            for i in 0..<n { Kernels.add(g.data, dy + i * outFeatures, outFeatures) }
        }
        guard let dx else { return }
        // A pass-through input STE (ModelOpt's default) writes dx directly: the same product, no copy.
        if let iq = inputQuantizer, iq.isQuantizing, accumulateDx || !iq.isPassThrough {
            let tmp = scratchBuffer(n * inFeatures)
            StepProfiler.measure(pGemmDX) { BLAS.gemm(m: n, n: inFeatures, k: outFeatures, a: dy, b: effectiveWeight, c: tmp) }
            StepProfiler.measure(pSTE) {
                if accumulateDx {
                    iq.backward(x: x, gradOut: tmp, gradIn: tmp, count: n * inFeatures)
                    Kernels.addParallel(dx, tmp, n * inFeatures)
                } else {
                    iq.backward(x: x, gradOut: tmp, gradIn: dx, count: n * inFeatures)
                }
            }
        } else {
            StepProfiler.measure(pGemmDX) {
                BLAS.gemm(m: n, n: inFeatures, k: outFeatures, a: dy, b: effectiveWeight, beta: accumulateDx ? 1 : 0, c: dx)
            }
        }
    }

    private func scratchBuffer(_ count: Int) -> UnsafeMutablePointer<Float> {
        if scratch == nil || scratch!.count < count { scratch = Tensor(shape: [count], zeroed: false) }
        return scratch!.data
    }
}
