/// bfloat16 and IEEE half conversions (round half to even on the way down), as PyTorch does.
@inline(__always) public func bf16ToFloat(_ b: UInt16) -> Float {
    Float(bitPattern: UInt32(b) << 16)
}

@inline(__always) public func floatToBF16(_ f: Float) -> UInt16 {
    let bits = f.bitPattern
    if f.isNaN { return UInt16(truncatingIfNeeded: (bits >> 16) | 0x40) }
    let rounding: UInt32 = 0x7FFF + ((bits >> 16) & 1)
    return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
}

@inline(__always) public func f16ToFloat(_ h: UInt16) -> Float {
    Float(Float16(bitPattern: h))
}

@inline(__always) public func floatToF16(_ f: Float) -> UInt16 {
    Float16(f).bitPattern
}
