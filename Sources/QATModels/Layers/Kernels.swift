import QATCore

/// Small shared loops. Reductions accumulate in Double so that results do not depend on
/// vector width; the data sizes here (a row) keep that cheap.
public enum Kernels {
    @inline(__always)
    public static func sumOfSquares(_ x: UnsafePointer<Float>, _ n: Int) -> Double {
        var s0: Float = 0, s1: Float = 0, s2: Float = 0, s3: Float = 0
        var j = 0
        while j + 4 <= n {
            s0 += x[j] * x[j]; s1 += x[j + 1] * x[j + 1]; s2 += x[j + 2] * x[j + 2]; s3 += x[j + 3] * x[j + 3]
            j += 4
        }
        var s = Double(s0) + Double(s1) + Double(s2) + Double(s3)
        while j < n { s += Double(x[j] * x[j]); j += 1 }
        return s
    }

    /// y += x (n elements).
    @inline(__always)
    public static func add(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int) {
        for i in 0..<n { y[i] += x[i] }
    }

    /// Parallel y += x for large buffers.
    public static func addParallel(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int) {
        let yp = SendablePointer(y), xp = SendablePointer(UnsafeMutablePointer(mutating: x))
        Parallel.forRange(n) { s, e in for i in s..<e { yp.p[i] += xp.p[i] } }
    }
}
