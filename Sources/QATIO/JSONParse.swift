import CJSONC
import QATCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Parsing through json-c.
///
/// json-c is used in strict mode (no comments, trailing commas or single quotes) with UTF-8
/// validation, a bounded nesting depth and a size cap, so that a hostile or corrupt file costs
/// at most a bounded amount of memory and stack. json-c keeps object members in insertion
/// order and keeps the source spelling of floating-point numbers, which is exactly what a
/// byte-identical rewrite needs.
extension JSONValue {
    /// Default cap on JSON text size (tokenizer.json files of large vocabularies stay far below).
    public static let defaultMaxBytes = 64 << 20
    /// Default cap on nesting depth (HF configs nest 3–4 levels).
    public static let defaultMaxDepth = 64

    /// Parses JSON text. `source` names the input in error messages.
    public static func parse(
        _ text: String, source: String = "JSON", maxBytes: Int = defaultMaxBytes,
        maxDepth: Int = defaultMaxDepth
    ) throws -> JSONValue {
        var t = text
        return try t.withUTF8 { try parse(bytes: UnsafeRawBufferPointer($0), source: source, maxBytes: maxBytes, maxDepth: maxDepth) }
    }

    /// Parses a JSON file (read whole; refused above `maxBytes`).
    public static func parse(file path: String, maxBytes: Int = defaultMaxBytes, maxDepth: Int = defaultMaxDepth) throws -> JSONValue {
        let bytes = try readFile(path, maxBytes: maxBytes)
        return try bytes.withUnsafeBytes { try parse(bytes: $0, source: path, maxBytes: maxBytes, maxDepth: maxDepth) }
    }

    /// Parses a file that must hold an object (config.json, index files); the returned
    /// object's `source` is the path, so accessor errors name the file.
    public static func parseObject(file path: String, maxBytes: Int = defaultMaxBytes) throws -> JSONObject {
        let v = try parse(file: path, maxBytes: maxBytes)
        guard var o = v.objectValue else { throw QATError("\(path): expected a JSON object at the top level, found \(v.kindName)") }
        o.source = path
        return o
    }

    /// Parses raw UTF-8 bytes (e.g. a safetensors header inside a mapping).
    public static func parse(
        bytes: UnsafeRawBufferPointer, source: String = "JSON", maxBytes: Int = defaultMaxBytes,
        maxDepth: Int = defaultMaxDepth
    ) throws -> JSONValue {
        guard bytes.count <= maxBytes, bytes.count <= Int(Int32.max) else {
            throw QATError("\(source): JSON text of \(bytes.count) bytes is larger than the \(maxBytes)-byte limit")
        }
        guard let base = bytes.baseAddress, bytes.count > 0 else { throw QATError("\(source): invalid JSON: the input is empty") }
        guard let tok = json_tokener_new_ex(Int32(max(1, min(maxDepth, 1 << 16)))) else {
            throw QATError("\(source): could not allocate a JSON tokener")
        }
        defer { json_tokener_free(tok) }
        json_tokener_set_flags(tok, JSON_TOKENER_STRICT | JSON_TOKENER_VALIDATE_UTF8)
        let cstr = base.assumingMemoryBound(to: CChar.self)
        let root = json_tokener_parse_ex(tok, cstr, Int32(bytes.count))
        let err = json_tokener_get_error(tok)
        let end = json_tokener_get_parse_end(tok)
        guard let obj = root, err == json_tokener_success else {
            if let root { json_object_put(root) }
            let desc: String
            if err == json_tokener_continue {
                desc = "unexpected end of input"
            } else if err == json_tokener_error_depth {
                desc = "nesting deeper than \(maxDepth) levels"
            } else if let d = json_tokener_error_desc(err) {
                desc = String(cString: d)
            } else {
                desc = "parse error"
            }
            let at = err == json_tokener_continue ? bytes.count : min(end, bytes.count)
            throw QATError("\(source): invalid JSON at \(position(in: bytes, offset: at)): \(desc)")
        }
        defer { json_object_put(obj) }
        if let (at, why) = strictViolation(bytes) {
            throw QATError("\(source): invalid JSON at \(position(in: bytes, offset: at)): \(why)")
        }
        // json-c stops after the first complete value; anything but whitespace after it is an error.
        var i = end
        while i < bytes.count {
            let c = bytes[i]
            if c != 0x20 && c != 0x0A && c != 0x0D && c != 0x09 {
                throw QATError(
                    "\(source): invalid JSON at \(position(in: bytes, offset: i)): unexpected data after the end of the JSON value")
            }
            i += 1
        }
        return convert(obj)
    }

    /// json-c's strict mode still accepts a few things Python's `json.loads` rejects:
    /// single-quoted strings, `1.` without fraction digits and raw control characters inside
    /// strings. One linear pass over already-parsed text finds them, so files we accept are
    /// files transformers can read.
    static func strictViolation(_ b: UnsafeRawBufferPointer) -> (Int, String)? {
        var inString = false
        var i = 0
        let n = b.count
        while i < n {
            let c = b[i]
            if inString {
                if c == 0x5C { i += 2; continue }
                if c == 0x22 { inString = false } else if c < 0x20 { return (i, "unescaped control character in a string") }
            } else if c == 0x22 {
                inString = true
            } else if c == 0x27 {
                return (i, "single-quoted strings are not JSON")
            } else if c == 0x2E && (i + 1 >= n || b[i + 1] < 0x30 || b[i + 1] > 0x39) {
                return (i, "a digit must follow the decimal point")
            }
            i += 1
        }
        return nil
    }

    /// "line L, column C (byte B)" with 1-based line and column, for editors.
    static func position(in bytes: UnsafeRawBufferPointer, offset: Int) -> String {
        var line = 1, col = 1
        for i in 0..<min(offset, bytes.count) {
            if bytes[i] == 0x0A { line += 1; col = 1 } else if bytes[i] & 0xC0 != 0x80 { col += 1 }
        }
        return "line \(line), column \(col) (byte \(offset))"
    }

    private static func convert(_ o: OpaquePointer?) -> JSONValue {
        guard let o else { return .null }
        let type = json_object_get_type(o)
        switch type {
        case json_type_null:
            return .null
        case json_type_boolean:
            return .bool(json_object_get_boolean(o) != 0)
        case json_type_int:
            // Values above Int64.max come back as uint64; keep their text so they round-trip.
            let i = json_object_get_int64(o)
            if i == Int64.max {
                let u = json_object_get_uint64(o)
                if u > UInt64(Int64.max) { return .double(Double(u), text: String(u)) }
            }
            return .int(i)
        case json_type_double:
            let d = json_object_get_double(o)
            // For parsed numbers json-c's serializer returns the source text verbatim.
            var text: String? = nil
            if let s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN) { text = String(cString: s) }
            return .double(d, text: text)
        case json_type_string:
            let n = Int(json_object_get_string_len(o))
            guard let p = json_object_get_string(o) else { return .string("") }
            let buf = UnsafeRawBufferPointer(start: p, count: n)
            return .string(String(decoding: buf, as: UTF8.self))
        case json_type_array:
            let n = json_object_array_length(o)
            var out: [JSONValue] = []
            out.reserveCapacity(n)
            for i in 0..<n { out.append(convert(json_object_array_get_idx(o, i))) }
            return .array(out)
        case json_type_object:
            var entries: [(key: String, value: JSONValue)] = []
            entries.reserveCapacity(Int(json_object_object_length(o)))
            var it = json_object_iter_begin(o)
            var endIt = json_object_iter_end(o)
            while json_object_iter_equal(&it, &endIt) == 0 {
                let name = json_object_iter_peek_name(&it).map { String(cString: $0) } ?? ""
                entries.append((key: name, value: convert(json_object_iter_peek_value(&it))))
                json_object_iter_next(&it)
            }
            return .object(JSONObject(entries))
        default:
            return .null
        }
    }
}

/// Reads a whole file, refusing files above `maxBytes` before allocating.
public func readFile(_ path: String, maxBytes: Int = Int.max) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw QATError.io("\(path): cannot open: \(errnoString())") }
    defer { close(fd) }
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw QATError.io("\(path): cannot stat: \(errnoString())") }
    if (st.st_mode & S_IFMT) == S_IFDIR { throw QATError("\(path): is a directory, expected a file") }
    let size = Int(st.st_size)
    guard size <= maxBytes else { throw QATError("\(path): file of \(size) bytes is larger than the \(maxBytes)-byte limit") }
    var out = [UInt8](repeating: 0, count: size)
    var got = 0
    try out.withUnsafeMutableBytes { buf in
        while got < size {
            guard let base = buf.baseAddress else { break }
            let r = read(fd, base + got, size - got)
            if r < 0 {
                if errno == EINTR { continue }
                throw QATError.io("\(path): read failed: \(errnoString())")
            }
            if r == 0 { break }
            got += r
        }
    }
    if got < size { out.removeLast(size - got) }
    return out
}

func errnoString() -> String { String(cString: strerror(errno)) }
