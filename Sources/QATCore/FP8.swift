/// 8-bit floating point codecs: E4M3FN (NVIDIA/OCP "fn" variant: no infinities, NaN only at
/// S.1111.111, max ±448) and E5M2 (IEEE-like, max finite ±57344).
///
/// Encoding rounds half to even and **saturates** out-of-range magnitudes (including ±inf)
/// to the largest finite value, which is what PyTorch gives for `x.clamp(-max, max).to(fp8)`.
/// NaN encodes to 0x7F for both formats (a NaN in each).

/// E4M3FN byte → Float. 0x7F / 0xFF decode to NaN; subnormals are m · 2⁻⁹.
@inlinable @inline(__always) public func e4m3ToFloat(_ b: UInt8) -> Float {
    let sign: UInt32 = UInt32(b & 0x80) << 24
    let e = UInt32((b >> 3) & 0xF), m = UInt32(b & 0x7)
    if e == 0 {
        // m · 2^-9, exact in Float.
        let v = Float(m) * 0.001953125
        return Float(bitPattern: v.bitPattern | sign)
    }
    if e == 15 && m == 7 { return Float.nan }
    // Rebias 7 → 127: exponent field e + 120, mantissa bits at the top of Float's 23.
    return Float(bitPattern: sign | ((e + 120) << 23) | (m << 20))
}

/// Float → E4M3FN byte: round half to even, saturate to ±448, NaN → 0x7F.
@inlinable @inline(__always) public func floatToE4M3(_ f: Float) -> UInt8 {
    let bits = f.bitPattern
    let sign = UInt8(truncatingIfNeeded: (bits >> 24) & 0x80)
    let abits = bits & 0x7FFF_FFFF
    if abits > 0x7F80_0000 { return 0x7F }  // NaN
    if abits >= 0x43E0_0000 { return sign | 0x7E }  // ≥ 448 (and inf): saturate
    if abits < 0x3C80_0000 {  // < 2^-6: subnormal range
        let a = Float(bitPattern: abits)
        let q = (a * 512).rounded(.toNearestOrEven)  // exact scaling by 2^9; q ∈ 0...8
        return sign | UInt8(q)  // q == 8 is the min normal 0x08
    }
    // Normal: keep 3 mantissa bits with round-half-even on the 20 dropped ones (a carry
    // bumps the exponent, which is what we want), then rebias 127 → 7.
    let r = (abits &+ 0x7_FFFF &+ ((abits >> 20) & 1)) >> 20
    let code = r &- (120 << 3)
    if code > 0x7E { return sign | 0x7E }  // rounded past 448 (cannot happen below 448, kept for safety)
    return sign | UInt8(truncatingIfNeeded: code)
}

/// E5M2 byte → Float (IEEE semantics: 0x7C = inf, 0x7D...0x7F = NaN).
@inlinable @inline(__always) public func e5m2ToFloat(_ b: UInt8) -> Float {
    let sign: UInt32 = UInt32(b & 0x80) << 24
    let e = UInt32((b >> 2) & 0x1F), m = UInt32(b & 0x3)
    if e == 0 {
        let v = Float(m) * 1.52587890625e-05  // m · 2^-16
        return Float(bitPattern: v.bitPattern | sign)
    }
    if e == 31 { return m == 0 ? Float(bitPattern: sign | 0x7F80_0000) : Float.nan }
    return Float(bitPattern: sign | ((e + 112) << 23) | (m << 21))
}

/// Float → E5M2 byte: round half to even, saturate to ±57344 (inf included), NaN → 0x7F.
@inlinable @inline(__always) public func floatToE5M2(_ f: Float) -> UInt8 {
    let bits = f.bitPattern
    let sign = UInt8(truncatingIfNeeded: (bits >> 24) & 0x80)
    let abits = bits & 0x7FFF_FFFF
    if abits > 0x7F80_0000 { return 0x7F }
    if abits >= 0x4760_0000 { return sign | 0x7B }  // ≥ 57344: saturate
    if abits < 0x3880_0000 {  // < 2^-14: subnormal range
        let a = Float(bitPattern: abits)
        let q = (a * 65536).rounded(.toNearestOrEven)  // q ∈ 0...4
        return sign | UInt8(q)
    }
    let r = (abits &+ 0xF_FFFF &+ ((abits >> 21) & 1)) >> 21
    let code = r &- (112 << 2)
    if code > 0x7B { return sign | 0x7B }
    return sign | UInt8(truncatingIfNeeded: code)
}

/// Rounds `f` to the nearest E4M3FN value and returns it as a Float, i.e.
/// `e4m3ToFloat(floatToE4M3(f))` without the byte round trip (what fake-quant kernels need):
/// round half to even, saturate to ±448, NaN stays NaN, the sign of zero is kept.
@inlinable @inline(__always) public func e4m3Round(_ f: Float) -> Float {
    let bits = f.bitPattern
    let sign = bits & 0x8000_0000
    let abits = bits & 0x7FFF_FFFF
    if abits >= 0x43E0_0000 {
        return abits > 0x7F80_0000 ? Float.nan : Float(bitPattern: sign | 0x43E0_0000)
    }
    if abits < 0x3C80_0000 {
        let q = (Float(bitPattern: abits) * 512).rounded(.toNearestOrEven) * 0.001953125
        return Float(bitPattern: q.bitPattern | sign)
    }
    return Float(bitPattern: sign | ((abits &+ 0x7_FFFF &+ ((abits >> 20) & 1)) & 0xFFF0_0000))
}
