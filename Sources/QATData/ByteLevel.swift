/// GPT-2's reversible byte ↔ unicode map, used by byte-level BPE.
///
/// BPE vocabularies are strings, but byte-level BPE works on raw UTF-8 bytes, so every byte
/// is given a printable stand-in character: the printable Latin-1 bytes (`!`…`~`, `¡`…`¬`,
/// `®`…`ÿ`) stand for themselves and the remaining 68 bytes (controls, space, soft hyphen…)
/// are assigned U+0100, U+0101, … in byte order — which is why a leading space shows up as
/// `Ġ` (U+0120, byte 0x20) in vocabularies.
public enum ByteLevel {
    /// `byteToScalar[b]` is the stand-in character of byte `b`.
    public static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Unicode.Scalar(UInt8(b))
            } else {
                table[b] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    /// The inverse: the byte a stand-in character encodes, or nil for any other character.
    public static func byte(for scalar: Unicode.Scalar) -> UInt8? {
        let v = scalar.value
        guard v < 512 else { return nil }
        let b = scalarToByte[Int(v)]
        return b < 0 ? nil : UInt8(b)
    }

    private static let scalarToByte: [Int16] = {
        var inv = [Int16](repeating: -1, count: 512)
        for (b, s) in byteToScalar.enumerated() { inv[Int(s.value)] = Int16(b) }
        return inv
    }()

    /// The byte-level string for some UTF-8 bytes.
    public static func encode<S: Sequence>(_ bytes: S) -> String where S.Element == UInt8 {
        var s = String.UnicodeScalarView()
        for b in bytes { s.append(byteToScalar[Int(b)]) }
        return String(s)
    }

    /// The bytes of a byte-level token string; nil if it holds a character outside the map.
    public static func decode(_ token: String) -> [UInt8]? {
        var out: [UInt8] = []
        out.reserveCapacity(token.unicodeScalars.count)
        for s in token.unicodeScalars {
            guard let b = byte(for: s) else { return nil }
            out.append(b)
        }
        return out
    }
}
