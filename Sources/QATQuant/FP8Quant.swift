import QATCore

/// Per-tensor FP8 E4M3 fake quantization, as ModelOpt's `scaled_e4m3_impl`
/// (`modelopt/torch/quantization/tensor_quant.py`, the unfused path it takes by default):
///
///     scale = 448 / amax
///     y     = e4m3(x * scale) / scale        (round half to even, saturate to ±448)
///     y     = 0 where |x| < 2^-24            ("tiny values" are zeroed)
///
/// Note the multiply-by-`448/amax` then divide form: it can differ in the last bit from
/// `e4m3(x / (amax/448)) * (amax/448)`; we follow ModelOpt. The exported `k_scale`/`v_scale`
/// is `amax/448` (what inference engines multiply by).
public enum FP8 {
    public static let maxE4M3: Float = 448

    /// Fused, parallel fake quantization of `count` values; `out` may alias `x`.
    /// `amax` must be finite and > 0 (TensorQuantizer checks this and names the quantizer).
    public static func fakeQuant(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, count: Int, amax: Float) {
        let scale = maxE4M3 / amax
        let op = SendablePointer(out)
        let tiny: Float = 1.0 / Float(1 << 24)
        Parallel.forRange(count, costPerItem: 8) { s, e in
            for i in s..<e {
                let v = x[i]
                let q = e4m3Round(v * scale) / scale
                op.p[i] = abs(v) < tiny ? 0 : q
            }
        }
    }
}

/// Per-tensor symmetric INT8 fake quantization (ModelOpt's default attributes: `num_bits 8`,
/// `axis None`, `narrow_range True`, `unsigned False`): `scale = 127/amax`,
/// `y = clamp(rint(x*scale), -127, 127) / scale`.
public enum INT8 {
    public static func fakeQuant(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, count: Int, amax: Float) {
        let scale: Float = 127 / amax
        let op = SendablePointer(out)
        Parallel.forRange(count, costPerItem: 8) { s, e in
            for i in s..<e {
                let q = min(max((x[i] * scale).rounded(.toNearestOrEven), -127), 127)
                op.p[i] = q / scale
            }
        }
    }
}
