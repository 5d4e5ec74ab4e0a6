import Foundation
import QATCore

/// SwiGLU gate: h = silu(gate) ∘ up, silu(g) = g·σ(g). 8-wide, with `Kernels.exp`.
public enum SwiGLU {
    typealias V8 = Kernels.V8

    /// gate, up, out: [n] (n = tokens × intermediate).
    public static func forward(out: UnsafeMutablePointer<Float>, gate: UnsafePointer<Float>, up: UnsafePointer<Float>, n: Int) {
        let o = SendablePointer(out), g = SendablePointer(UnsafeMutablePointer(mutating: gate)),
            u = SendablePointer(UnsafeMutablePointer(mutating: up))
        Parallel.forRange((n + 7) / 8, costPerItem: 64) { s, e in
            for c in s..<e {
                let i = c * 8
                if i + 8 <= n {
                    let x = Kernels.load(g.p + i)
                    Kernels.store(x / (1 + Kernels.exp(-x)) * Kernels.load(u.p + i), o.p + i)
                } else {
                    for j in i..<n { let x = g.p[j]; o.p[j] = x / (1 + Kernels.exp(-x)) * u.p[j] }
                }
            }
        }
    }

    /// dgate = dh·up·σ(g)(1 + g(1−σ(g))), dup = dh·silu(g). Written (not accumulated).
    public static func backward(
        dgate: UnsafeMutablePointer<Float>, dup: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>,
        gate: UnsafePointer<Float>, up: UnsafePointer<Float>, n: Int
    ) {
        let dg = SendablePointer(dgate), du = SendablePointer(dup), d = SendablePointer(UnsafeMutablePointer(mutating: dout))
        let g = SendablePointer(UnsafeMutablePointer(mutating: gate)), u = SendablePointer(UnsafeMutablePointer(mutating: up))
        Parallel.forRange((n + 7) / 8, costPerItem: 80) { s, e in
            for c in s..<e {
                let i = c * 8
                if i + 8 <= n {
                    let x = Kernels.load(g.p + i), dh = Kernels.load(d.p + i)
                    let sig = 1 / (1 + Kernels.exp(-x))
                    Kernels.store(dh * x * sig, du.p + i)
                    Kernels.store(dh * Kernels.load(u.p + i) * sig * (1 + x * (1 - sig)), dg.p + i)
                } else {
                    for j in i..<n {
                        let x = g.p[j], sig = 1 / (1 + Kernels.exp(-x)), dh = d.p[j]
                        du.p[j] = dh * x * sig
                        dg.p[j] = dh * u.p[j] * sig * (1 + x * (1 - sig))
                    }
                }
            }
        }
    }
}
