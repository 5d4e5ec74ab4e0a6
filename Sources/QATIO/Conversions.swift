import QATCore

/// Bulk dtype conversions between raw little-endian safetensors bytes and fp32.
///
/// Plain pointer loops over unaligned loads: a tensor's offset inside the data region need
/// not be a multiple of its element size (the format does not promise it), and x86 loads
/// unaligned words at full speed. FP8 goes through a 256-entry table built once per call,
/// which is cheaper than decoding each byte.
public enum DTypeConversion {
    /// Decodes `count` elements of `dtype` at `src` into `dst`. Floating dtypes only.
    /// Large tensors are split over cores with `Parallel.forRange`.
    public static func toFloat(_ src: UnsafeRawPointer, dtype: DType, count: Int, into dst: UnsafeMutablePointer<Float>) throws {
        guard dtype.isFloatingPoint else {
            throw QATError("cannot convert \(dtype.rawValue) to float: not a floating-point dtype")
        }
        if count == 0 { return }
        let out = SendablePointer(dst)
        let input = UncheckedBox(src)
        switch dtype {
        case .f32:
            Parallel.forRange(count, costPerItem: 1) { s, e in
                (out.p + s).withMemoryRebound(to: UInt8.self, capacity: (e - s) * 4) { d in
                    UnsafeMutableRawPointer(d).copyMemory(from: input.value + s * 4, byteCount: (e - s) * 4)
                }
            }
        case .bf16:
            Parallel.forRange(count, costPerItem: 2) { s, e in
                let p = input.value, d = out.p
                for i in s..<e {
                    d[i] = bf16ToFloat(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: i &* 2, as: UInt16.self)))
                }
            }
        case .f16:
            Parallel.forRange(count, costPerItem: 4) { s, e in
                let p = input.value, d = out.p
                for i in s..<e {
                    d[i] = f16ToFloat(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: i &* 2, as: UInt16.self)))
                }
            }
        case .f8e4m3, .f8e5m2:
            var table = [Float](repeating: 0, count: 256)
            for b in 0..<256 {
                table[b] = dtype == .f8e4m3 ? e4m3ToFloat(UInt8(b)) : e5m2ToFloat(UInt8(b))
            }
            table.withUnsafeBufferPointer { tb in
                let t = UncheckedBox(tb)
                Parallel.forRange(count, costPerItem: 2) { s, e in
                    let p = input.value.assumingMemoryBound(to: UInt8.self), d = out.p
                    for i in s..<e { d[i] = t.value[Int(p[i])] }
                }
            }
        default:
            break
        }
    }

    /// Encodes `count` floats as `dtype` into `dst` (`count * dtype.byteSize` bytes):
    /// F16/BF16 round half to even, F8_E4M3 saturates to ±448 (as ModelOpt and PyTorch's
    /// clamp-then-cast do), F8_E5M2 follows `floatToE5M2`.
    public static func fromFloat(_ src: UnsafePointer<Float>, count: Int, as dtype: DType, into dst: UnsafeMutableRawPointer) throws {
        guard dtype.isFloatingPoint else {
            throw QATError("cannot store floats as \(dtype.rawValue): not a floating-point dtype (pass integer data as bytes)")
        }
        if count == 0 { return }
        let input = UncheckedBox(src)
        let out = UncheckedBox(dst)
        switch dtype {
        case .f32:
            dst.copyMemory(from: src, byteCount: count * 4)
        case .bf16:
            Parallel.forRange(count, costPerItem: 2) { s, e in
                let p = input.value, d = out.value
                for i in s..<e { d.storeBytes(of: floatToBF16(p[i]).littleEndian, toByteOffset: i &* 2, as: UInt16.self) }
            }
        case .f16:
            Parallel.forRange(count, costPerItem: 4) { s, e in
                let p = input.value, d = out.value
                for i in s..<e { d.storeBytes(of: floatToF16(p[i]).littleEndian, toByteOffset: i &* 2, as: UInt16.self) }
            }
        case .f8e4m3:
            Parallel.forRange(count, costPerItem: 16) { s, e in
                let p = input.value, d = out.value.assumingMemoryBound(to: UInt8.self)
                for i in s..<e { d[i] = floatToE4M3(p[i]) }
            }
        case .f8e5m2:
            Parallel.forRange(count, costPerItem: 16) { s, e in
                let p = input.value, d = out.value.assumingMemoryBound(to: UInt8.self)
                for i in s..<e { d[i] = floatToE5M2(p[i]) }
            }
        default:
            break
        }
    }

    /// Widens integer/bool elements to Int64 (BOOL: any non-zero byte is 1).
    public static func toInt64(_ src: UnsafeRawPointer, dtype: DType, count: Int) throws -> [Int64] {
        var out = [Int64](repeating: 0, count: count)
        out.withUnsafeMutableBufferPointer { b in
            guard let d = b.baseAddress else { return }
            switch dtype {
            case .i64:
                for i in 0..<count { d[i] = Int64(littleEndian: src.loadUnaligned(fromByteOffset: i &* 8, as: Int64.self)) }
            case .i32:
                for i in 0..<count { d[i] = Int64(Int32(littleEndian: src.loadUnaligned(fromByteOffset: i &* 4, as: Int32.self))) }
            case .i8:
                let p = src.assumingMemoryBound(to: Int8.self)
                for i in 0..<count { d[i] = Int64(p[i]) }
            case .u8:
                let p = src.assumingMemoryBound(to: UInt8.self)
                for i in 0..<count { d[i] = Int64(p[i]) }
            case .bool:
                let p = src.assumingMemoryBound(to: UInt8.self)
                for i in 0..<count { d[i] = p[i] != 0 ? 1 : 0 }
            default:
                break
            }
        }
        switch dtype {
        case .i64, .i32, .i8, .u8, .bool: return out
        default: throw QATError("cannot read \(dtype.rawValue) as integers: not an integer dtype")
        }
    }

    /// Narrows Int64 values to an integer dtype's bytes, refusing values that do not fit.
    public static func fromInt64(_ values: [Int64], as dtype: DType) throws -> [UInt8] {
        func check(_ lo: Int64, _ hi: Int64) throws {
            for (i, v) in values.enumerated() where v < lo || v > hi {
                throw QATError("value \(v) at index \(i) does not fit in \(dtype.rawValue)")
            }
        }
        var out = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        switch dtype {
        case .i64: break
        case .i32: try check(Int64(Int32.min), Int64(Int32.max))
        case .i8: try check(Int64(Int8.min), Int64(Int8.max))
        case .u8: try check(0, 255)
        case .bool: try check(0, 1)
        default: throw QATError("cannot store integers as \(dtype.rawValue): not an integer dtype")
        }
        out.withUnsafeMutableBytes { d in
            guard let base = d.baseAddress else { return }
            for (i, v) in values.enumerated() {
                switch dtype {
                case .i64: base.storeBytes(of: v.littleEndian, toByteOffset: i * 8, as: Int64.self)
                case .i32: base.storeBytes(of: Int32(truncatingIfNeeded: v).littleEndian, toByteOffset: i * 4, as: Int32.self)
                default: base.storeBytes(of: UInt8(truncatingIfNeeded: v), toByteOffset: i, as: UInt8.self)
                }
            }
        }
        return out
    }
}
