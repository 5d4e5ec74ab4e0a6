import Foundation
import QATCore

/// SwiGLU gate: h = silu(gate) ∘ up, silu(g) = g·σ(g).
public enum SwiGLU {
    /// gate, up, out: [n] (n = tokens × intermediate).
    public static func forward(out: UnsafeMutablePointer<Float>, gate: UnsafePointer<Float>, up: UnsafePointer<Float>, n: Int) {
        let o = SendablePointer(out), g = SendablePointer(UnsafeMutablePointer(mutating: gate)), u = SendablePointer(UnsafeMutablePointer(mutating: up))
        Parallel.forRange(n, costPerItem: 8) { s, e in
            for i in s..<e {
                let x = g.p[i]
                o.p[i] = x / (1 + exp(-x)) * u.p[i]
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
        Parallel.forRange(n, costPerItem: 10) { s, e in
            for i in s..<e {
                let x = g.p[i], sig = 1 / (1 + exp(-x)), dh = d.p[i]
                du.p[i] = dh * x * sig
                dg.p[i] = dh * u.p[i] * sig * (1 + x * (1 - sig))
            }
        }
    }
}
