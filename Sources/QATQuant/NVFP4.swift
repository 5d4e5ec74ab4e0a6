import QATCore

/// NVFP4: E2M1 values in blocks of 16 along the last dimension, one E4M3 scale per block and
/// one fp32 global scale per tensor — ModelOpt 0.47's `NVFP4QTensor` (export) and its Triton
/// `fp4_fake_quant_block` kernel (training), reproduced number for number.
///
/// ## Export path (`quantize` / `dequantize`), `modelopt/torch/quantization/qtensor/nvfp4_tensor.py`
/// - the last dimension is padded with zeros to a multiple of 16 (`reduce_block_padding`), so
///   `packed` is `[rows, ceil(cols/16)*8]` and `scales` is `[rows, ceil(cols/16)]`; the padded
///   nibbles are zero codes;
/// - `gs = amax / (6*448)`; per block `s = blockmax / (6*gs)`, `s == 0 → 1.0`, clamped to
///   `[2^-9, 448]` (`_cast_per_block_scale_to_fp8`), cast to E4M3 (round half to even);
/// - value `x / (e4m3(s)*gs)` (one fp32 product, then a true division) rounded to E2M1 half to
///   even (`_cast_fp4`: searchsorted on the bounds plus the odd-bound nudge); nibble
///   `sign<<3 | index` with sign = `x < 0` (so a negative value that rounds to 0 is 0x8);
///   even element in the low nibble;
/// - dequantize: `e2m1[nibble] * (e4m3(s)*gs)`; nibble 0x8 decodes to +0.
///
/// ## Fake-quant path (`fakeQuant`), `modelopt/torch/quantization/triton/fp4_kernel.py`
/// `tensor_quant.py` routes `num_bits (2,1)` + `scale_bits (4,3)` dynamic block quant to
/// `fp4_fake_quant_block(x, amax)`, which differs from the export path in three places:
/// 1. the block scale is `min(blockmax/(6*gs), 448)` with **no lower clamp** and no `== 0 → 1`
///    rule before the E4M3 cast (so it can underflow to 0);
/// 2. the dequantized block scale `S = e4m3(s)*gs` is replaced by **1.0 when `S < 1e-5`**
///    (this also catches the underflow of 1.): such blocks are quantized with scale 1, which
///    in practice zeroes them (|x| ≤ 0.25);
/// 3. the sign is applied as `x >= 0 ? q*S : -(q*S)`, so negative inputs that round to 0 give −0.
/// `gs == 0` uses `1e-12` in the block-scale division (as the kernel does).
/// `FakeQuantMode.modelOpt` (the default) reproduces these; `FakeQuantMode.export` instead
/// gives exactly `dequantize(quantize(x))`, bit for bit (use it when training must agree
/// with the exported checkpoint on every block, including blocks whose max is below ~6e-5).
/// Both agree whenever every block has `S ≥ 1e-5` and no scale leaves [2^-9, 448]
/// (up to the sign of zero), which holds for ordinary weights and activations.
public enum NVFP4 {
    public static let blockSize = 16
    /// The E2M1 magnitudes, by 3-bit index.
    public static let e2m1Values: [Float] = [0, 0.5, 1, 1.5, 2, 3, 4, 6]

    public enum FakeQuantMode: String, Sendable, CaseIterable {
        /// ModelOpt's Triton fake-quant kernel (what ModelOpt QAT trains with).
        case modelOpt
        /// Exactly dequantize(quantize(x)): what the exported checkpoint computes.
        case export
    }

    /// Per-tensor scale `amax / (6*448)` (ModelOpt's `weights_scaling_factor_2`).
    @inline(__always) public static func globalScale(amax: Float) -> Float { amax / 2688 }

    /// Rounds a non-negative magnitude (already divided by its scale) to the E2M1 grid with
    /// round half to even and saturation at 6. Values are exact: steps are powers of two.
    @inline(__always) static func roundE2M1(_ v: Float) -> Float {
        let c = min(v, 6)
        let inv: Float = c < 2 ? 2 : (c < 4 ? 1 : 0.5)
        let step: Float = c < 2 ? 0.5 : (c < 4 ? 1 : 2)
        return (c * inv).rounded(.toNearestOrEven) * step
    }

    /// E2M1 nibble (sign<<3 | index) of a scaled value, round half to even, saturating at 6.
    @inline(__always) public static func encodeE2M1(_ x: Float) -> UInt8 {
        let q = roundE2M1(abs(x))
        let idx: UInt8
        if q < 2 { idx = UInt8(q * 2) } else if q < 4 { idx = UInt8(q) + 2 } else { idx = q == 4 ? 6 : 7 }
        return (x < 0 ? 8 : 0) | idx
    }

    /// E2M1 nibble → Float (0x8 decodes to +0, as ModelOpt's table does).
    @inline(__always) public static func decodeE2M1(_ nibble: UInt8) -> Float {
        let m = e2m1Magnitude(nibble & 7)
        return nibble & 8 != 0 && m != 0 ? -m : m
    }

    @inline(__always) static func e2m1Magnitude(_ i: UInt8) -> Float {
        // 0, .5, 1, 1.5, 2, 3, 4, 6 without a table lookup.
        if i < 4 { return Float(i) * 0.5 }
        return i == 7 ? 6 : Float(i) - 2
    }

    /// Number of 16-blocks per row.
    @inline(__always) public static func blocksPerRow(_ cols: Int) -> Int { (cols + 15) / 16 }

    /// Export-path E4M3 block scale code for a block max (see the type's doc).
    @inline(__always) static func exportScaleCode(blockMax: Float, sixGS: Float) -> UInt8 {
        var s = blockMax / sixGS
        if s == 0 { s = 1 }
        s = min(max(s, 0.001953125), 448)
        return floatToE4M3(s)
    }

    // MARK: - Export

    /// Quantizes a row-major `[rows, cols]` fp32 tensor to NVFP4 with the given global amax
    /// (ModelOpt uses the weight quantizer's calibrated `_amax`; pass `absMax(x)` for its
    /// dynamic path). Returns packed nibbles `[rows, ceil(cols/16)*8]`, E4M3 scale bytes
    /// `[rows, ceil(cols/16)]`, and the global scale `amax/(6*448)`.
    ///
    /// `globalAmax == 0` (an all-zero tensor) gives zero codes, scales 1.0 and global scale 0
    /// (ModelOpt would produce NaN scales there).
    public static func quantize(_ x: UnsafePointer<Float>, rows: Int, cols: Int, globalAmax: Float)
        -> (packed: [UInt8], scales: [UInt8], globalScale: Float)
    {
        let nb = blocksPerRow(cols)
        let gs = globalScale(amax: globalAmax)
        var packed = [UInt8](repeating: 0, count: rows * nb * 8)
        var scales = [UInt8](repeating: 0x38, count: rows * nb)
        if gs == 0 || rows == 0 || cols == 0 { return (packed, scales, gs) }
        let sixGS = 6 * gs
        packed.withUnsafeMutableBufferPointer { pb in
            scales.withUnsafeMutableBufferPointer { sb in
                let pp = SendablePointer(pb.baseAddress!), sp = SendablePointer(sb.baseAddress!)
                Parallel.forRange(rows * nb, costPerItem: 64) { start, end in
                    var scaled = (
                        Float(0), Float(0), Float(0), Float(0), Float(0), Float(0), Float(0), Float(0),
                        Float(0), Float(0), Float(0), Float(0), Float(0), Float(0), Float(0), Float(0)
                    )
                    withUnsafeMutableBytes(of: &scaled) { raw in
                        let tmp = raw.baseAddress!.assumingMemoryBound(to: Float.self)
                        for b in start..<end {
                            let r = b / nb, j = b - r * nb
                            let c0 = j * 16, w = min(16, cols - c0)
                            let src = x + r * cols + c0
                            var bmax: Float = 0
                            for i in 0..<w { bmax = max(bmax, abs(src[i])) }
                            let code = exportScaleCode(blockMax: bmax, sixGS: sixGS)
                            sp.p[b] = code
                            let s = e4m3ToFloat(code) * gs
                            for i in 0..<16 { tmp[i] = i < w ? src[i] / s : 0 }
                            let dst = pp.p + b * 8
                            for k in 0..<8 {
                                dst[k] = encodeE2M1(tmp[2 * k]) | (encodeE2M1(tmp[2 * k + 1]) << 4)
                            }
                        }
                    }
                }
            }
        }
        return (packed, scales, gs)
    }

    /// Array convenience for `quantize`.
    public static func quantize(_ x: [Float], rows: Int, cols: Int, globalAmax: Float)
        -> (packed: [UInt8], scales: [UInt8], globalScale: Float)
    {
        precondition(x.count == rows * cols, "NVFP4.quantize: \(x.count) values for [\(rows), \(cols)]")
        return x.withUnsafeBufferPointer { quantize($0.baseAddress!, rows: rows, cols: cols, globalAmax: globalAmax) }
    }

    /// Decodes NVFP4 (`packed` `[rows, ceil(cols/16)*8]`, `scales` `[rows, ceil(cols/16)]`
    /// E4M3 bytes) into `out` `[rows, cols]` (padding dropped): `e2m1 * (scale*gs)`.
    public static func dequantize(
        packed: UnsafePointer<UInt8>, scales: UnsafePointer<UInt8>, globalScale gs: Float,
        rows: Int, cols: Int, out: UnsafeMutablePointer<Float>
    ) {
        let nb = blocksPerRow(cols)
        let op = SendablePointer(out)
        Parallel.forRange(rows, costPerItem: max(cols, 1)) { r0, r1 in
            for r in r0..<r1 {
                for j in 0..<nb {
                    let s = e4m3ToFloat(scales[r * nb + j]) * gs
                    let c0 = j * 16, w = min(16, cols - c0)
                    let src = packed + (r * nb + j) * 8
                    let dst = op.p + r * cols + c0
                    for i in 0..<w {
                        let byte = src[i >> 1]
                        let nib = i & 1 == 0 ? byte & 0xF : byte >> 4
                        dst[i] = decodeE2M1(nib) * s
                    }
                }
            }
        }
    }

    /// Array convenience for `dequantize`.
    public static func dequantize(packed: [UInt8], scales: [UInt8], globalScale: Float, rows: Int, cols: Int) -> [Float] {
        let nb = blocksPerRow(cols)
        precondition(
            packed.count == rows * nb * 8 && scales.count == rows * nb,
            "NVFP4.dequantize: packed \(packed.count) / scales \(scales.count) for [\(rows), \(cols)]")
        var out = [Float](repeating: 0, count: rows * cols)
        packed.withUnsafeBufferPointer { p in
            scales.withUnsafeBufferPointer { s in
                out.withUnsafeMutableBufferPointer { o in
                    dequantize(
                        packed: p.baseAddress!, scales: s.baseAddress!, globalScale: globalScale,
                        rows: rows, cols: cols, out: o.baseAddress!)
                }
            }
        }
        return out
    }

    // MARK: - Fake quant (training)

    /// Fused NVFP4 fake quantization of a row-major `[rows, cols]` tensor: one pass per
    /// 16-block (block max, E4M3 scale, E2M1 round, rescale), parallel over blocks, no
    /// allocation. `out` may alias `x`. See the type's doc for `mode`.
    public static func fakeQuant(
        _ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int, cols: Int,
        globalAmax: Float, mode: FakeQuantMode = .modelOpt
    ) {
        let nb = blocksPerRow(cols)
        let total = rows * nb
        guard total > 0 else { return }
        let gs = globalScale(amax: globalAmax)
        let op = SendablePointer(out)
        Parallel.forRange(total, costPerItem: 64) { start, end in
            var r = start / nb, j = start - r * nb
            for _ in start..<end {
                let c0 = j * 16
                let src = x + r * cols + c0
                let dst = op.p + r * cols + c0
                if c0 + 16 <= cols {
                    fakeQuantBlock16(src, dst, gs: gs, mode: mode)
                } else {
                    fakeQuantPartial(src, dst, count: cols - c0, gs: gs, mode: mode)
                }
                j += 1
                if j == nb { j = 0; r += 1 }
            }
        }
    }

    /// The dequantized block scale `S` for a block max, per mode.
    @inline(__always) static func blockScale(_ bmax: Float, gs: Float, mode: FakeQuantMode) -> Float {
        switch mode {
        case .modelOpt:
            let gsSafe: Float = gs > 0 ? gs : 1e-12
            let s = min(bmax / (6 * gsSafe), 448)
            let S = e4m3Round(s) * gs
            return S >= 1e-5 ? S : 1
        case .export:
            if gs == 0 { return 0 }
            var s = bmax / (6 * gs)
            if s == 0 { s = 1 }
            s = min(max(s, 0.001953125), 448)
            return e4m3Round(s) * gs
        }
    }

    /// One element: E2M1 round trip of `v` with dequantized block scale `S`, the sign applied
    /// by flipping the sign bit where v < 0 (ModelOpt's `where(x >= 0, q, -q)`), then
    /// `+ zeroFix`: +0 in export mode (turns −0 into +0, as dequantize does), −0 otherwise
    /// (an identity). Branch-free so the 16-wide loops vectorize; the division is a true
    /// division because ties (0.25, 0.75, …, 5) must be decided exactly as ModelOpt does.
    @inline(__always) static func fakeElem(_ v: Float, _ S: Float, _ zeroFix: Float) -> Float {
        let bits = v.bitPattern
        let a = Float(bitPattern: bits & 0x7FFF_FFFF) / S
        let c = a < 6 ? a : 6  // saturate (NaN → 6, as the kernel's where-chain)
        // Round half to even onto the E2M1 grid (steps 0.5 / 1 / 2 below 2 / 4 / 6) in one
        // add-subtract: 2^22, 2^23 and 2^24 have exactly those ulps. Bit-identical to
        // rounding c/step to an integer and multiplying back (both are exact but the rounding).
        let magic: Float = c < 2 ? 4_194_304 : (c < 4 ? 8_388_608 : 16_777_216)
        let r = ((c + magic) - magic) * S
        let neg: UInt32 = v < 0 ? 0x8000_0000 : 0
        return Float(bitPattern: r.bitPattern ^ neg) + zeroFix
    }

    /// max over 16 sign-cleared bit patterns, as a balanced tree of independent maxes (which
    /// the SLP vectorizer turns into three vector max steps instead of a 16-step chain).
    @inline(__always) static func blockMaxBits16(_ src: UnsafePointer<Float>) -> UInt32 {
        let p = UnsafeRawPointer(src).assumingMemoryBound(to: UInt32.self)
        let k: UInt32 = 0x7FFF_FFFF
        var t0 = max(p[0] & k, p[8] & k), t1 = max(p[1] & k, p[9] & k), t2 = max(p[2] & k, p[10] & k)
        var t3 = max(p[3] & k, p[11] & k)
        let t4 = max(p[4] & k, p[12] & k), t5 = max(p[5] & k, p[13] & k), t6 = max(p[6] & k, p[14] & k)
        let t7 = max(p[7] & k, p[15] & k)
        t0 = max(t0, t4); t1 = max(t1, t5); t2 = max(t2, t6); t3 = max(t3, t7)
        t0 = max(t0, t2); t1 = max(t1, t3)
        return max(t0, t1)
    }

    @inline(__always) static func fakeQuantBlock16(
        _ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, gs: Float, mode: FakeQuantMode
    ) {
        // Block max as an integer max over sign-cleared bit patterns: exact and vectorizes.
        let S = blockScale(Float(bitPattern: blockMaxBits16(src)), gs: gs, mode: mode)
        if mode == .export && S == 0 {
            for i in 0..<16 { dst[i] = 0 }
            return
        }
        let zeroFix: Float = mode == .export ? 0 : -0.0
        for i in 0..<16 { dst[i] = fakeElem(src[i], S, zeroFix) }
    }

    static func fakeQuantPartial(
        _ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, count w: Int, gs: Float, mode: FakeQuantMode
    ) {
        var m: UInt32 = 0
        for i in 0..<w { m = max(m, src[i].bitPattern & 0x7FFF_FFFF) }
        let S = blockScale(Float(bitPattern: m), gs: gs, mode: mode)
        if mode == .export && S == 0 {
            for i in 0..<w { dst[i] = 0 }
            return
        }
        let zeroFix: Float = mode == .export ? 0 : -0.0
        for i in 0..<w { dst[i] = fakeElem(src[i], S, zeroFix) }
    }

    /// max |x| over `count` values (parallel; NaN-ignoring, like a max reduction on floats).
    public static func absMax(_ x: UnsafePointer<Float>, count: Int) -> Float {
        Reduce.absMax(x, count: count)
    }
}

/// Small parallel reductions used by calibration.
public enum Reduce {
    /// max |x[i]| over `count` values; 0 for an empty range. NaN inputs propagate as NaN so
    /// that calibration can report them.
    public static func absMax(_ x: UnsafePointer<Float>, count: Int) -> Float {
        guard count > 0 else { return 0 }
        let workers = max(1, min(Parallel.threads, count / 65_536))
        if workers == 1 { return absMaxSerial(x, count) }
        var partial = [Float](repeating: 0, count: workers)
        partial.withUnsafeMutableBufferPointer { pb in
            let pp = SendablePointer(pb.baseAddress!)
            Parallel.forRange(workers, costPerItem: 1 << 20) { w0, w1 in
                for w in w0..<w1 {
                    let s = count * w / workers, e = count * (w + 1) / workers
                    pp.p[w] = absMaxSerial(x + s, e - s)
                }
            }
        }
        var m: Float = 0
        for v in partial { if v.isNaN { return .nan }; m = max(m, v) }
        return m
    }

    @inline(__always) static func absMaxSerial(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        // For sign-cleared floats the bit patterns order like the values and NaN patterns
        // sort above +inf, so an integer max (which vectorizes) keeps NaN visible.
        var m: UInt32 = 0
        for i in 0..<n { m = max(m, x[i].bitPattern & 0x7FFF_FFFF) }
        return Float(bitPattern: m)
    }
}
