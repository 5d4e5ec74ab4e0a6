import Synchronization

/// Gradient clipping by global L2 norm, as `torch.nn.utils.clip_grad_norm_` (norm_type 2):
/// `total = sqrt(sum over tensors of sum g^2)`, `coef = max_norm / (total + 1e-6)`,
/// gradients scaled by `min(coef, 1)`.
///
/// Differences from PyTorch, on purpose: the sum of squares is accumulated in Double (PyTorch
/// reduces each tensor in fp32), over fixed 16k-element blocks whose partial sums are added in
/// order, so the norm does not depend on the thread count; a non-finite norm leaves the
/// gradients untouched (PyTorch would multiply them by NaN/0) so that the caller can report
/// `firstNonFinite` and skip the step.
public enum GradientClipping {
    static let block = 16_384

    /// Sum of squares of one tensor, in Double, deterministic for any thread count.
    public static func sumOfSquares(_ t: Tensor) -> Double {
        let n = t.count
        if n == 0 { return 0 }
        let nBlocks = (n + block - 1) / block
        return withUnsafeTemporaryAllocation(of: Double.self, capacity: nBlocks) { partials in
            let out = SendablePointer(partials.baseAddress!)
            let src = SendablePointer(t.data)
            Parallel.forRange(nBlocks, costPerItem: block) { b0, b1 in
                for b in b0..<b1 {
                    let start = b * block, end = min(n, start + block)
                    out.p[b] = blockSumOfSquares(UnsafePointer(src.p) + start, end - start)
                }
            }
            var total = 0.0
            for b in 0..<nBlocks { total += partials[b] }
            return total
        }
    }

    /// SIMD sum of x² in Double over `count` floats (8 lanes, fixed order).
    @inline(__always)
    static func blockSumOfSquares(_ x: UnsafePointer<Float>, _ count: Int) -> Double {
        var acc = SIMD8<Double>(repeating: 0)
        var i = 0
        let raw = UnsafeRawPointer(x)
        while i + 8 <= count {
            let f = raw.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
            let d = SIMD8<Double>(f)
            acc = acc + d * d
            i += 8
        }
        var tail = 0.0
        while i < count {
            let d = Double(x[i])
            tail += d * d
            i += 1
        }
        return acc.sum() + tail
    }

    /// The blocks of several tensors as one list, tensor by tensor, each tensor cut into
    /// `block`-element blocks from its start exactly as `sumOfSquares(_:)` cuts it.
    struct Blocks {
        /// (tensor index, element range in it) of every block.
        var items: [(tensor: Int, start: Int, end: Int)] = []
        /// First block of each tensor, then one past the last block (tensors + 1 entries).
        var first: [Int] = [0]
        init(_ tensors: [Tensor]) {
            for (t, x) in tensors.enumerated() {
                for s in stride(from: 0, to: x.count, by: GradientClipping.block) {
                    items.append((t, s, min(x.count, s + GradientClipping.block)))
                }
                first.append(items.count)
            }
        }

        /// Runs `body(block, tensor, start, end)` for every block, in one parallel region (each
        /// block computed on its own, so the split does not matter).
        func inParallel(_ body: (_ block: Int, _ tensor: Int, _ start: Int, _ end: Int) -> Void) {
            Parallel.forRange(items.count, costPerItem: GradientClipping.block) { b0, b1 in
                for b in b0..<b1 { body(b, items[b].tensor, items[b].start, items[b].end) }
            }
        }

        /// `value(elements, count)` of every block of `tensors` (the list this was built from), in block order.
        func values<T>(_ tensors: [Tensor], initial: T, _ value: (UnsafePointer<Float>, Int) -> T) -> [T] {
            let bases = tensors.map { UncheckedBox(UnsafePointer($0.data)) }
            var out = [T](repeating: initial, count: items.count)
            out.withUnsafeMutableBufferPointer { ob in
                let o = SendablePointer(ob.baseAddress!)
                inParallel { b, t, s, e in o.p[b] = value(bases[t].value + s, e - s) }
            }
            return out
        }
    }

    /// Sums of squares of every tensor (in Double), each equal bit for bit to `sumOfSquares(_:)`
    /// of that tensor, computed in one parallel region over all their blocks: a model's few
    /// hundred gradients (most far smaller than a block per worker at 16 threads: a norm's 576
    /// elements, a k_proj's 110k in 7 blocks) would otherwise enter one small region each.
    public static func sumsOfSquares(_ tensors: [Tensor]) -> [Double] {
        let blocks = Blocks(tensors)
        let partials = blocks.values(tensors, initial: 0.0) { blockSumOfSquares($0, $1) }
        return tensors.indices.map { i in
            var total = 0.0
            for b in blocks.first[i]..<blocks.first[i + 1] { total += partials[b] }
            return total
        }
    }

    /// Global L2 norm of `grads` (Double accumulation): Σ over tensors, in order, of each
    /// tensor's `sumOfSquares`.
    public static func globalNorm<S: Sequence>(_ grads: S) -> Double where S.Element == Tensor {
        var total = 0.0
        for v in sumsOfSquares(Array(grads)) { total += v }
        return total.squareRoot()
    }

    /// Scales `grads` in place so that their global L2 norm is at most `maxNorm`; returns the
    /// norm before clipping. A non-finite norm leaves them as they are.
    @discardableResult
    public static func clipByGlobalNorm<S: Collection>(_ grads: S, maxNorm: Double) -> Double where S.Element == Tensor {
        let norm = globalNorm(grads)
        scale(grads, norm: norm, maxNorm: maxNorm)
        return norm
    }

    /// The scaling half of `clipByGlobalNorm`, for a norm computed elsewhere (across pipeline
    /// stages): gradients × min(maxNorm / (norm + 1e-6), 1); a non-finite norm changes nothing.
    /// One parallel region over every tensor's blocks.
    public static func scale<S: Collection>(_ grads: S, norm: Double, maxNorm: Double) where S.Element == Tensor {
        guard norm.isFinite else { return }
        let coef = maxNorm / (norm + 1e-6)
        guard coef < 1 else { return }
        let c = Float(coef), tensors = Array(grads)
        let bases = tensors.map { SendablePointer($0.data) }
        Blocks(tensors).inParallel { _, t, s, e in
            let p = bases[t].p
            for i in s..<e { p[i] *= c }
        }
    }

    /// Sets every element of `tensors` to zero, in one parallel region over all their blocks.
    public static func zero(_ tensors: [Tensor]) {
        let bases = tensors.map { SendablePointer($0.data) }
        Blocks(tensors).inParallel { _, t, s, e in (bases[t].p + s).update(repeating: 0, count: e - s) }
    }

    /// The index of the first of `tensors` holding a NaN or an infinity, nil when all are
    /// finite: one parallel region over all their blocks.
    public static func firstNonFinite(_ tensors: [Tensor]) -> Int? {
        let blocks = Blocks(tensors)
        let finite = blocks.values(tensors, initial: true) { isFinite($0, $1) }
        return finite.firstIndex(of: false).map { blocks.items[$0].tensor }
    }

    /// Whether every element of `t` is finite (x*0 is 0 for finite x, NaN otherwise; the
    /// sum vectorizes where a per-element `isFinite` branch would not).
    public static func isFinite(_ t: Tensor) -> Bool {
        let n = t.count
        let nBlocks = (n + block - 1) / block
        if nBlocks <= 1 { return isFinite(t.data, n) }
        let bad = Atomic<Bool>(false)
        let src = SendablePointer(t.data)
        Parallel.forRange(nBlocks, costPerItem: block) { b0, b1 in
            let start = b0 * block, end = min(n, b1 * block)
            if !isFinite(src.p + start, end - start) { bad.store(true, ordering: .relaxed) }
        }
        return !bad.load(ordering: .relaxed)
    }

    /// No NaN or infinity among `n` floats (x·0 is 0 for every finite x, NaN otherwise).
    @inline(__always)
    static func isFinite(_ x: UnsafePointer<Float>, _ n: Int) -> Bool {
        var acc = SIMD8<Float>(repeating: 0)
        var i = 0
        let raw = UnsafeRawPointer(x)
        while i + 8 <= n {
            acc = acc + raw.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) * 0
            i += 8
        }
        var tail: Float = 0
        while i < n { tail += x[i] * 0; i += 1 }
        return (acc.sum() + tail) == 0
    }

    /// Name of the first tensor (in the given order) holding a NaN or an infinity, for fault
    /// reports ("non-finite gradient in model.layers.3.mlp.down_proj.weight at step 120").
    public static func firstNonFinite<S: Sequence>(_ named: S) -> String? where S.Element == (name: String, grad: Tensor) {
        for (name, g) in named where !isFinite(g) { return name }
        return nil
    }
}
