import QATCore

/// Small shared loops, written on 8-wide SIMD vectors (one AVX2 register) with fixed lane
/// assignment, so that results depend only on the data, never on threads or timing.
public enum Kernels {
    public typealias V8 = SIMD8<Float>

    @inline(__always) static func load(_ p: UnsafePointer<Float>) -> V8 {
        UnsafeRawPointer(p).loadUnaligned(as: V8.self)
    }

    @inline(__always) static func store(_ v: V8, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V8.self)
    }

    /// Σ x² (two 8-wide fp32 accumulators, lanes summed in Double).
    @inline(__always)
    public static func sumOfSquares(_ x: UnsafePointer<Float>, _ n: Int) -> Double {
        var a0 = V8(), a1 = V8()
        var j = 0
        while j + 16 <= n {
            let u = load(x + j), v = load(x + j + 8)
            a0.addProduct(u, u); a1.addProduct(v, v)
            j += 16
        }
        if j + 8 <= n { let u = load(x + j); a0.addProduct(u, u); j += 8 }
        let a = a0 + a1
        var s = 0.0
        for l in 0..<8 { s += Double(a[l]) }
        while j < n { s += Double(x[j] * x[j]); j += 1 }
        return s
    }

    /// Σ a·b in fp32 (8-wide accumulators).
    @inline(__always)
    public static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var s0 = V8(), s1 = V8()
        var j = 0
        while j + 16 <= n {
            s0.addProduct(load(a + j), load(b + j)); s1.addProduct(load(a + j + 8), load(b + j + 8))
            j += 16
        }
        if j + 8 <= n { s0.addProduct(load(a + j), load(b + j)); j += 8 }
        var s = (s0 + s1).sum()
        while j < n { s += a[j] * b[j]; j += 1 }
        return s
    }

    /// max x[j] (n ≥ 1).
    @inline(__always)
    public static func max(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var j = 0
        var m: Float = -.infinity
        if n >= 8 {
            var v = load(x)
            j = 8
            while j + 8 <= n { let w = load(x + j); v = v.replacing(with: w, where: w .> v); j += 8 }
            m = v.max()
        }
        while j < n { m = Swift.max(m, x[j]); j += 1 }
        return m
    }

    /// x[j] = exp(x[j] − m) in place; returns Σ of the results (fp32).
    @inline(__always)
    public static func expSubtract(_ x: UnsafeMutablePointer<Float>, _ n: Int, _ m: Float) -> Float {
        var acc = V8()
        let mv = V8(repeating: m)
        var j = 0
        while j + 8 <= n {
            let e = exp(load(x + j) - mv)
            store(e, x + j)
            acc += e
            j += 8
        }
        var s = acc.sum()
        if j < n {
            var t = V8(repeating: -.infinity)
            for l in 0..<(n - j) { t[l] = x[j + l] }
            let e = exp(t - mv)
            for l in 0..<(n - j) { x[j + l] = e[l]; s += e[l] }
        }
        return s
    }

    /// Σ exp(x[j] − m) without writing x.
    @inline(__always)
    public static func expSum(_ x: UnsafePointer<Float>, _ n: Int, _ m: Float) -> Float {
        var acc = V8()
        let mv = V8(repeating: m)
        var j = 0
        while j + 8 <= n { acc += exp(load(x + j) - mv); j += 8 }
        var s = acc.sum()
        if j < n {
            var t = V8(repeating: -.infinity)
            for l in 0..<(n - j) { t[l] = x[j + l] }
            let e = exp(t - mv)
            for l in 0..<(n - j) { s += e[l] }
        }
        return s
    }

    /// x *= s.
    @inline(__always)
    public static func scale(_ x: UnsafeMutablePointer<Float>, _ n: Int, _ s: Float) {
        for j in 0..<n { x[j] *= s }
    }

    /// d[j] = p[j]·(d[j] − c) (softmax backward).
    @inline(__always)
    public static func softmaxGrad(_ d: UnsafeMutablePointer<Float>, _ p: UnsafePointer<Float>, _ n: Int, _ c: Float) {
        for j in 0..<n { d[j] = p[j] * (d[j] - c) }
    }

    /// Vectorised e^x: Cody–Waite reduction by ln 2 and Cephes' degree-6 polynomial, about
    /// 1 ulp over the range. Inputs are clamped to [−87.3, 88] (so e^−∞ gives ~1e−38 rather
    /// than 0, and there is no overflow to +∞); NaN stays NaN.
    @inline(__always)
    public static func exp(_ x0: V8) -> V8 {
        let hi = V8(repeating: 88.0), lo = V8(repeating: -87.33654)
        var x = x0.replacing(with: hi, where: x0 .> hi)
        x = x.replacing(with: lo, where: x .< lo)
        let magic = V8(repeating: 12_582_912)  // 1.5·2^23: adding it rounds to an integer
        let t = x * V8(repeating: 1.442_695_040_888_963_4) + magic
        let n = t - magic
        var r = x - n * V8(repeating: 0.693_359_375)
        r = r - n * V8(repeating: -2.121_944_400_546_905_8e-4)
        var p = V8(repeating: 1.987_569_150_0e-4)
        p = p * r + V8(repeating: 1.398_199_950_7e-3)
        p = p * r + V8(repeating: 8.333_451_907_3e-3)
        p = p * r + V8(repeating: 4.166_579_589_4e-2)
        p = p * r + V8(repeating: 1.666_666_545_9e-1)
        p = p * r + V8(repeating: 5.000_000_120_1e-1)
        p = p * (r * r) + r + V8(repeating: 1)
        let ti: SIMD8<Int32> = unsafeBitCast(t, to: SIMD8<Int32>.self) &- SIMD8<Int32>(repeating: 0x4B40_0000)
        let pow2: V8 = unsafeBitCast((ti &+ 127) &<< 23, to: V8.self)
        return p * pow2
    }

    /// Scalar e^x with the same approximation as the vector one (for tails).
    @inline(__always)
    public static func exp(_ x: Float) -> Float { exp(V8(repeating: x))[0] }

    /// y += x (n elements).
    @inline(__always)
    public static func add(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int) {
        for i in 0..<n { y[i] += x[i] }
    }

    /// Parallel y += x for large buffers.
    public static func addParallel(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int) {
        let yp = SendablePointer(y), xp = SendablePointer(UnsafeMutablePointer(mutating: x))
        Parallel.forRange(n, costPerItem: 2) { s, e in for i in s..<e { yp.p[i] += xp.p[i] } }
    }
}
