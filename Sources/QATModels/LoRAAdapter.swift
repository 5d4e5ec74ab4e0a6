import QATCore

/// A trainable side path of a `Linear` (LoRA). `Linear.forward` calls `forward` last, with
/// the original (not fake-quantized) input; `Linear.backward` calls `backward` last, after it
/// wrote or accumulated its own dx.
public protocol LinearAdapter: AnyObject {
    /// out[n, outFeatures] += adapter(x) for x [n, inFeatures].
    func forward(_ x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, n: Int) throws
    /// Accumulates the adapter's parameter gradients for dy [n, outFeatures] and adds its input
    /// gradient to dx (when non-nil).
    func backward(dy: UnsafePointer<Float>, x: UnsafePointer<Float>, n: Int, dx: UnsafeMutablePointer<Float>?)
}

/// Supplies the weight a `Linear`'s matmuls use in place of its master weight and fake-quant
/// copy (QLoRA: a frozen base held compressed and decoded on demand).
public protocol LinearWeightSource: AnyObject {
    /// The `[out, in]` weight; valid until the next call on any Linear sharing this source.
    func weight(for linear: Linear) -> UnsafePointer<Float>
}

/// LoRA settings shared by a model's adapters, and the dropout key schedule.
///
/// Dropout masks are a pure function of (seed, optimizer step, micro-batch within the step,
/// adapter index, element): no running generator, so a resumed run draws the same masks.
public final class LoRAContext: @unchecked Sendable {
    public let rank: Int
    public let alpha: Double
    public let dropout: Float
    public let seed: UInt64
    /// alpha / rank.
    public var scaling: Float { Float(alpha / Double(rank)) }
    /// The step the next training forward belongs to (the trainer's completed-step count).
    public var step: () -> Int = { 0 }
    /// Whether the current forward trains (dropout is applied only then).
    public var isTraining: () -> Bool = { false }
    private var lastStep = Int.min
    private var micro = 0
    private var scratch: Tensor?

    public init(rank: Int, alpha: Double, dropout: Double, seed: UInt64) {
        precondition(rank >= 1 && dropout >= 0 && dropout < 1)
        self.rank = rank; self.alpha = alpha; self.dropout = Float(dropout); self.seed = seed
    }

    /// Called by the first adapter of every training forward (the CPU's, or the GPU model's in
    /// its place): the micro-batch counter.
    public func beginForward() {
        let s = step()
        if s != lastStep { lastStep = s; micro = 0 } else { micro += 1 }
    }

    /// Forgets the micro-batch counter: the next training forward is micro-batch 0 of its step
    /// (the GPU selftest runs the same micro-batch on both devices).
    public func resetMicroBatches() { lastStep = Int.min; micro = 0 }

    /// The dropout mask key of adapter `adapter` in the current training forward.
    public func key(adapter: Int) -> UInt64 {
        var g = SplitMix64(seed: seed ^ 0x4C6F_5241_4452_4F50)
        var k = g.next() ^ UInt64(truncatingIfNeeded: lastStep) &* 0x9E37_79B9_7F4A_7C15
        k = SplitMix64.mix(k ^ UInt64(micro) &* 0xC2B2_AE3D_27D4_EB4F)
        return SplitMix64.mix(k ^ UInt64(adapter) &* 0x1656_67B1_9E37_79F9)
    }

    func scratchBuffer(_ count: Int) -> UnsafeMutablePointer<Float> {
        if scratch == nil || scratch!.count < count { scratch = Tensor(shape: [count], zeroed: false) }
        return scratch!.data
    }

    /// An element is kept when the top 24 bits of its draw are ≥ this (p · 2²⁴, rounded).
    public var dropoutThreshold: UInt64 { UInt64((Double(dropout) * 16_777_216).rounded()) }
    /// What a kept element is multiplied by: 1 / (1 − p) in fp32.
    public var dropoutScale: Float { 1 / (1 - dropout) }

    /// Whether element `i` survives the mask `key` (the GPU's `lora_dropout` kernel draws the same).
    @inline(__always) public static func keeps(key: UInt64, element i: Int, threshold: UInt64) -> Bool {
        (SplitMix64.mix(key &+ UInt64(i) &* 0x9E37_79B9_7F4A_7C15) >> 40) >= threshold
    }

    /// out[i] = keep(key, i) ? x[i] / (1 − p) : 0 (or, with `accumulate`, out[i] += that).
    func applyMask(key: UInt64, _ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, count: Int, accumulate: Bool) {
        let threshold = dropoutThreshold
        let scale = dropoutScale
        let o = SendablePointer(out)
        Parallel.forRange(count, costPerItem: 8) { s, e in
            for i in s..<e {
                let keep = Self.keeps(key: key, element: i, threshold: threshold)
                let v = keep ? x[i] * scale : 0
                if accumulate { o.p[i] += v } else { o.p[i] = v }
            }
        }
    }
}

extension SplitMix64 {
    /// The SplitMix64 finaliser: a stateless 64-bit hash.
    @inline(__always) static func mix(_ z0: UInt64) -> UInt64 {
        var z = z0 &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// One LoRA adapter (PEFT's `lora.Linear`): y += (alpha/rank)·(dropout(x)·Aᵀ)·Bᵀ with
/// A `[rank, in]` (kaiming-uniform, a = √5, i.e. U(±1/√in), as PEFT) and B `[out, rank]`
/// (zero), named `<module>.lora_A.weight` / `<module>.lora_B.weight`.
public final class LoRAAdapter: LinearAdapter, @unchecked Sendable {
    public let module: String
    /// Position among the model's adapters (model order); keys the dropout masks.
    public let index: Int
    public let A: Parameter
    public let B: Parameter
    public let context: LoRAContext
    public let inFeatures: Int
    public let outFeatures: Int
    private var h: Tensor?  // [n, rank] of the last forward
    private var maskKey: UInt64?  // dropout key of the last forward (nil: no dropout)

    public init(module: String, index: Int, inFeatures: Int, outFeatures: Int, context: LoRAContext) {
        self.module = module; self.index = index; self.context = context
        self.inFeatures = inFeatures; self.outFeatures = outFeatures
        let r = context.rank
        let a = Tensor(shape: [r, inFeatures], zeroed: false)
        var g = SplitMix64(seed: SplitMix64.mix(context.seed ^ 0x4C6F_5241_5F41_494E) ^ UInt64(index))
        let bound = 1 / Float(inFeatures).squareRoot()
        for i in 0..<a.count { a[i] = (Float(g.next() >> 40) / 16_777_216 * 2 - 1) * bound }
        A = Parameter(name: module + ".lora_A.weight", value: a)
        B = Parameter(name: module + ".lora_B.weight", value: Tensor(shape: [outFeatures, r]))
    }

    public var parameters: [Parameter] { [A, B] }

    public func forward(_ x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, n: Int) throws {
        let r = context.rank, c = context
        if h == nil || h!.count < n * r { h = Tensor(shape: [n * r], zeroed: false) }
        var xd = x
        maskKey = nil
        if c.isTraining() {
            if index == 0 { c.beginForward() }
            if c.dropout > 0 {
                let key = c.key(adapter: index)
                let buf = c.scratchBuffer(n * inFeatures)
                c.applyMask(key: key, x, buf, count: n * inFeatures, accumulate: false)
                xd = UnsafePointer(buf)
                maskKey = key
            }
        }
        BLAS.gemm(transB: true, m: n, n: r, k: inFeatures, a: xd, b: A.value.data, c: h!.data)
        BLAS.gemm(transB: true, m: n, n: outFeatures, k: r, alpha: c.scaling, a: h!.data, b: B.value.data, beta: 1, c: out)
    }

    public func backward(dy: UnsafePointer<Float>, x: UnsafePointer<Float>, n: Int, dx: UnsafeMutablePointer<Float>?) {
        let r = context.rank, c = context, s = c.scaling
        guard let h else { return }
        if let gB = B.grad {
            BLAS.gemm(transA: true, m: outFeatures, n: r, k: n, alpha: s, a: dy, b: h.data, beta: 1, c: gB.data)
        }
        guard A.grad != nil || dx != nil else { return }
        let dh = Tensor(shape: [n * r], zeroed: false)
        BLAS.gemm(m: n, n: r, k: outFeatures, alpha: s, a: dy, b: B.value.data, c: dh.data)
        if let gA = A.grad {
            var xd = x
            if let key = maskKey {
                let buf = c.scratchBuffer(n * inFeatures)
                c.applyMask(key: key, x, buf, count: n * inFeatures, accumulate: false)
                xd = UnsafePointer(buf)
            }
            BLAS.gemm(transA: true, m: r, n: inFeatures, k: n, a: dh.data, b: xd, beta: 1, c: gA.data)
        }
        guard let dx else { return }
        if let key = maskKey {
            let buf = c.scratchBuffer(n * inFeatures)
            BLAS.gemm(m: n, n: inFeatures, k: r, a: dh.data, b: A.value.data, c: buf)
            c.applyMask(key: key, UnsafePointer(buf), dx, count: n * inFeatures, accumulate: true)
        } else {
            BLAS.gemm(m: n, n: inFeatures, k: r, a: dh.data, b: A.value.data, beta: 1, c: dx)
        }
    }

    /// W + (alpha/rank)·B·A into `out` `[out, in]` (`base` may equal `out`).
    public func merge(base: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>) {
        if UnsafePointer(out) != base { out.update(from: base, count: outFeatures * inFeatures) }
        BLAS.gemm(m: outFeatures, n: inFeatures, k: context.rank, alpha: context.scaling, a: B.value.data, b: A.value.data, beta: 1, c: out)
    }
}
