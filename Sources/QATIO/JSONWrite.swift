import QATCore

/// Serialization that matches Python's `json.dumps` byte for byte.
///
/// transformers writes config.json with `json.dumps(d, indent=2, sort_keys=...) + "\n"`; a
/// tool that rewrites one key must produce a file whose diff is that key alone, so the layout,
/// the `\uXXXX` escapes of `ensure_ascii=True` and Python's float spelling are reproduced
/// exactly. Keys are written in the object's order (sort them yourself for `sort_keys=True`).
extension JSONValue {
    /// `indent: 2` gives Python's `json.dumps(indent=2)` layout (no trailing newline);
    /// `indent: nil` gives the compact `separators=(",", ":")` form used in safetensors headers.
    /// `asciiOnly` escapes every non-ASCII character as `\uXXXX` (Python's `ensure_ascii=True`).
    public func serialized(indent: Int? = 2, asciiOnly: Bool = true) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        write(into: &out, indent: indent, asciiOnly: asciiOnly)
        return String(decoding: out, as: UTF8.self)
    }

    /// The bytes of `serialized(indent:asciiOnly:)`, without the String round trip.
    public func serializedBytes(indent: Int? = 2, asciiOnly: Bool = true) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(256)
        write(into: &out, indent: indent, asciiOnly: asciiOnly)
        return out
    }

    /// The text of a config.json as transformers writes it: 2-space indent plus a final newline.
    public var fileText: String { serialized(indent: 2) + "\n" }

    /// Writes `fileText` atomically (temporary file, fsync, rename).
    public func write(toFile path: String) throws {
        var bytes = serializedBytes(indent: 2)
        bytes.append(0x0A)
        try atomicWrite(path: path) { w in try bytes.withUnsafeBytes { try w.write($0) } }
    }

    public func write(into out: inout [UInt8], indent: Int?, asciiOnly: Bool) {
        writeValue(self, into: &out, indent: indent, level: 0, asciiOnly: asciiOnly)
    }
}

extension JSONObject {
    public func serialized(indent: Int? = 2, asciiOnly: Bool = true) -> String {
        JSONValue.object(self).serialized(indent: indent, asciiOnly: asciiOnly)
    }
    public var fileText: String { JSONValue.object(self).fileText }
    public func write(toFile path: String) throws { try JSONValue.object(self).write(toFile: path) }
}

private func appendString(_ s: String, to out: inout [UInt8]) { out.append(contentsOf: s.utf8) }

private func newline(_ out: inout [UInt8], _ indent: Int, _ level: Int) {
    out.append(0x0A)
    out.append(contentsOf: repeatElement(0x20, count: indent * level))
}

private func writeValue(_ v: JSONValue, into out: inout [UInt8], indent: Int?, level: Int, asciiOnly: Bool) {
    switch v {
    case .null: appendString("null", to: &out)
    case .bool(let b): appendString(b ? "true" : "false", to: &out)
    case .int(let i): appendString(String(i), to: &out)
    case .double(let d, let text): appendString(text ?? pythonFloatRepr(d), to: &out)
    case .string(let s): writeJSONString(s, into: &out, asciiOnly: asciiOnly)
    case .array(let a):
        if a.isEmpty { appendString("[]", to: &out); return }
        out.append(UInt8(ascii: "["))
        for (i, e) in a.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            if let indent { newline(&out, indent, level + 1) }
            writeValue(e, into: &out, indent: indent, level: level + 1, asciiOnly: asciiOnly)
        }
        if let indent { newline(&out, indent, level) }
        out.append(UInt8(ascii: "]"))
    case .object(let o):
        if o.isEmpty { appendString("{}", to: &out); return }
        out.append(UInt8(ascii: "{"))
        for (i, e) in o.entries.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            if let indent { newline(&out, indent, level + 1) }
            writeJSONString(e.key, into: &out, asciiOnly: asciiOnly)
            out.append(UInt8(ascii: ":"))
            if indent != nil { out.append(0x20) }
            writeValue(e.value, into: &out, indent: indent, level: level + 1, asciiOnly: asciiOnly)
        }
        if let indent { newline(&out, indent, level) }
        out.append(UInt8(ascii: "}"))
    }
}

private let hexDigits: [UInt8] = Array("0123456789abcdef".utf8)

private func appendU(_ u: UInt32, _ out: inout [UInt8]) {
    out.append(UInt8(ascii: "\\")); out.append(UInt8(ascii: "u"))
    for shift in stride(from: 12, through: 0, by: -4) { out.append(hexDigits[Int((u >> UInt32(shift)) & 0xF)]) }
}

/// Python's escaping: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other controls as `\u00xx`
/// (lowercase hex); with `asciiOnly` everything outside space…`~` as `\uxxxx`, astral
/// characters as a surrogate pair.
func writeJSONString(_ s: String, into out: inout [UInt8], asciiOnly: Bool) {
    out.append(UInt8(ascii: "\""))
    for scalar in s.unicodeScalars {
        let u = scalar.value
        switch u {
        case 0x22: out.append(0x5C); out.append(0x22)
        case 0x5C: out.append(0x5C); out.append(0x5C)
        case 0x0A: out.append(0x5C); out.append(UInt8(ascii: "n"))
        case 0x0D: out.append(0x5C); out.append(UInt8(ascii: "r"))
        case 0x09: out.append(0x5C); out.append(UInt8(ascii: "t"))
        case 0x08: out.append(0x5C); out.append(UInt8(ascii: "b"))
        case 0x0C: out.append(0x5C); out.append(UInt8(ascii: "f"))
        case 0..<0x20: appendU(u, &out)
        case 0x20..<0x7F: out.append(UInt8(u))
        default:
            if !asciiOnly {
                out.append(contentsOf: String(scalar).utf8)
            } else if u >= 0x10000 {
                let v = u - 0x10000
                appendU(0xD800 + (v >> 10), &out)
                appendU(0xDC00 + (v & 0x3FF), &out)
            } else {
                appendU(u, &out)
            }
        }
    }
    out.append(UInt8(ascii: "\""))
}

/// Python's `repr(float)` as `json.dumps` writes it: the shortest digits that round-trip,
/// fixed notation when the decimal exponent is in [-4, 16), otherwise `d.ddde±XX`; `.0` on
/// integral values; `NaN`, `Infinity`, `-Infinity` for the non-finite ones.
///
/// Swift's `description` already yields the shortest round-trip digits (as Python's dtoa does);
/// only the layout differs, so the digits are taken from it and re-laid out.
public func pythonFloatRepr(_ x: Double) -> String {
    if x.isNaN { return "NaN" }
    if x.isInfinite { return x < 0 ? "-Infinity" : "Infinity" }
    if x == 0 { return x.sign == .minus ? "-0.0" : "0.0" }
    let desc = x.magnitude.description
    var digits: [UInt8] = []
    var intDigits = 0
    var seenDot = false
    var exp = 0
    var bytes = Array(desc.utf8)[...]
    while let c = bytes.first {
        if c == UInt8(ascii: "e") || c == UInt8(ascii: "E") {
            bytes = bytes.dropFirst()
            exp = Int(String(decoding: bytes, as: UTF8.self)) ?? 0
            break
        }
        if c == UInt8(ascii: ".") {
            seenDot = true
        } else {
            digits.append(c)
            if !seenDot { intDigits += 1 }
        }
        bytes = bytes.dropFirst()
    }
    // value = 0.DIGITS × 10^decpt
    var decpt = intDigits + exp
    var lead = 0
    while lead < digits.count - 1 && digits[lead] == UInt8(ascii: "0") { lead += 1 }
    digits.removeFirst(lead)
    decpt -= lead
    while digits.count > 1 && digits.last == UInt8(ascii: "0") { digits.removeLast() }
    let d = String(decoding: digits, as: UTF8.self)
    let sign = x < 0 ? "-" : ""
    if decpt <= -4 || decpt > 16 {
        let e = decpt - 1
        let mant = digits.count > 1 ? "\(d.prefix(1)).\(d.dropFirst())" : d
        let eDigits = String(abs(e))
        return "\(sign)\(mant)e\(e < 0 ? "-" : "+")\(eDigits.count < 2 ? "0" + eDigits : eDigits)"
    }
    if decpt <= 0 { return "\(sign)0.\(String(repeating: "0", count: -decpt))\(d)" }
    if decpt >= digits.count { return "\(sign)\(d)\(String(repeating: "0", count: decpt - digits.count)).0" }
    return "\(sign)\(d.prefix(decpt)).\(d.dropFirst(decpt))"
}
