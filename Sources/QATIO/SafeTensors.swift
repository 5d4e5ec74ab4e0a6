import QATCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One tensor entry of a safetensors header. `begin`/`end` are byte offsets relative to the
/// start of the data region (just after the header), as the format defines them.
public struct SafeTensorInfo: Sendable, Equatable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let begin: Int
    public let end: Int

    public init(name: String, dtype: DType, shape: [Int], begin: Int, end: Int) {
        self.name = name; self.dtype = dtype; self.shape = shape; self.begin = begin; self.end = end
    }

    /// Product of the shape (1 for a 0-d scalar). Validated at load not to overflow.
    public var elementCount: Int { shape.reduce(1, &*) }
    public var byteCount: Int { end - begin }
}

/// Upper bound on a safetensors header. The Rust reference implementation uses the same
/// 100 MB limit: a header that large would describe millions of tensors, so anything above
/// is corruption or an attack, and refusing it bounds the memory the JSON parser may take.
public let safeTensorsMaxHeaderBytes = 100 << 20

/// A read-only memory mapping of one `.safetensors` file.
///
/// The whole file is mapped `MAP_PRIVATE` and the header is validated completely at `init`
/// (dtypes, shapes, offsets inside the data region, no overlaps, byte counts), so every later
/// accessor can hand out views without re-checking. Views from `bytes(_:)` are valid as long
/// as this object lives; `floats`/`integers` return copies.
public final class SafeTensorsFile: @unchecked Sendable {
    public let path: String
    /// `__metadata__`, in header order.
    public let metadata: [(key: String, value: String)]
    /// Tensors in header order.
    public let tensors: [SafeTensorInfo]
    /// Size of the whole file and of the JSON header (without the 8-byte length prefix).
    public let fileSize: Int
    public let headerSize: Int

    private let base: UnsafeRawPointer?
    private let mappedSize: Int
    private let index: [String: Int]

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw QATError.io("\(path): cannot open safetensors file: \(errnoString())") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QATError.io("\(path): cannot stat: \(errnoString())") }
        if (st.st_mode & S_IFMT) == S_IFDIR { throw QATError("\(path): is a directory, expected a .safetensors file") }
        let size = Int(st.st_size)
        guard size >= 8 else {
            throw QATError("\(path): not a safetensors file: shorter than 8 bytes (\(size) bytes), no room for the header length")
        }
        guard let m = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), m != MAP_FAILED else {
            throw QATError.io("\(path): mmap of \(size) bytes failed: \(errnoString())")
        }
        let mapping = UnsafeRawPointer(m)
        var ok = false
        defer { if !ok { munmap(m, size) } }

        let n64 = UInt64(littleEndian: mapping.loadUnaligned(as: UInt64.self))
        guard n64 <= UInt64(safeTensorsMaxHeaderBytes) else {
            throw QATError(
                "\(path): header length \(n64) bytes is above the \(safeTensorsMaxHeaderBytes)-byte "
                    + "limit: corrupt or not a safetensors file")
        }
        let n = Int(n64)
        guard n <= size - 8 else {
            throw QATError(
                "\(path): header length \(n) bytes runs past the end of the file (\(size) bytes): truncated or not a safetensors file")
        }
        let headerBytes = UnsafeRawBufferPointer(start: mapping + 8, count: n)
        let parsed = try SafeTensorsFile.parseHeader(headerBytes, path: path, dataSize: size - 8 - n)

        self.fileSize = size
        self.headerSize = n
        self.metadata = parsed.metadata
        self.tensors = parsed.tensors
        var idx: [String: Int] = [:]
        for (i, t) in parsed.tensors.enumerated() { idx[t.name] = i }
        self.index = idx
        self.base = mapping
        self.mappedSize = size
        ok = true
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), mappedSize) }
    }

    /// Metadata value for `key`, if present.
    public func metadataValue(_ key: String) -> String? { metadata.first { $0.key == key }?.value }

    public var names: [String] { tensors.map(\.name) }

    public func info(_ name: String) -> SafeTensorInfo? { index[name].map { tensors[$0] } }

    func require(_ name: String) throws -> SafeTensorInfo {
        guard let t = info(name) else { throw QATError("\(path): no tensor named \"\(name)\"") }
        return t
    }

    /// Zero-copy view of a tensor's raw little-endian bytes inside the mapping.
    public func bytes(_ name: String) throws -> UnsafeRawBufferPointer {
        let t = try require(name)
        return view(t)
    }

    func view(_ t: SafeTensorInfo) -> UnsafeRawBufferPointer {
        guard let base else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: base + 8 + headerSize + t.begin, count: t.byteCount)
    }

    /// A floating-point tensor (F32/F16/BF16/F8_E4M3/F8_E5M2) converted to an fp32 `Tensor`
    /// of the same shape.
    public func floats(_ name: String) throws -> Tensor {
        let t = try require(name)
        let out = Tensor(shape: t.shape, zeroed: false)
        try convert(t, into: out.data)
        return out
    }

    /// Same as `floats(_:)` into caller memory of `info(name).elementCount` floats.
    public func floats(_ name: String, into dst: UnsafeMutablePointer<Float>) throws {
        try convert(try require(name), into: dst)
    }

    func convert(_ t: SafeTensorInfo, into dst: UnsafeMutablePointer<Float>) throws {
        guard t.dtype.isFloatingPoint else {
            throw QATError(
                "\(path): tensor \"\(t.name)\" is \(t.dtype.rawValue), not a floating-point tensor; read it with integers(_:) or bytes(_:)")
        }
        let v = view(t)
        guard let p = v.baseAddress else { return }
        try DTypeConversion.toFloat(p, dtype: t.dtype, count: t.elementCount, into: dst)
    }

    /// An integer or boolean tensor (I64/I32/I8/U8/BOOL) widened to Int64, flattened.
    public func integers(_ name: String) throws -> [Int64] {
        let t = try require(name)
        switch t.dtype {
        case .i64, .i32, .i8, .u8, .bool: break
        default:
            throw QATError("\(path): tensor \"\(name)\" is \(t.dtype.rawValue), not an integer tensor; read it with floats(_:)")
        }
        let v = view(t)
        guard let p = v.baseAddress else { return [] }
        return try DTypeConversion.toInt64(p, dtype: t.dtype, count: t.elementCount)
    }

    // MARK: - Header validation

    struct ParsedHeader {
        var metadata: [(key: String, value: String)]
        var tensors: [SafeTensorInfo]
    }

    /// Validates a header against a data region of `dataSize` bytes. Every error names the
    /// file, the tensor and what is wrong, since a user facing a corrupt checkpoint needs to
    /// know which download to redo.
    static func parseHeader(_ bytes: UnsafeRawBufferPointer, path: String, dataSize: Int) throws -> ParsedHeader {
        let json: JSONValue
        do {
            json = try JSONValue.parse(bytes: bytes, source: "\(path): header", maxBytes: safeTensorsMaxHeaderBytes)
        } catch let e as QATError {
            throw QATError("\(e.message) (the header is not valid JSON: corrupt or not a safetensors file)", kind: e.kind)
        }
        guard case .object(let root) = json else {
            throw QATError("\(path): header is not a JSON object (found \(json.kindName))")
        }
        // json-c keeps only the last of duplicate keys; find them in the text itself.
        let keys = topLevelKeys(bytes)
        if keys.count != root.count {
            var seen = Set<String>()
            for k in keys where !seen.insert(k).inserted {
                throw QATError("\(path): duplicate tensor name \"\(k)\" in the header")
            }
            throw QATError("\(path): duplicate names in the header")
        }

        var metadata: [(key: String, value: String)] = []
        var tensors: [SafeTensorInfo] = []
        tensors.reserveCapacity(root.count)
        for (name, value) in root.entries {
            if name == "__metadata__" {
                guard case .object(let m) = value else {
                    throw QATError("\(path): __metadata__ must be an object of strings, found \(value.kindName)")
                }
                for (k, v) in m.entries {
                    guard case .string(let s) = v else {
                        throw QATError("\(path): __metadata__ \"\(k)\" must be a string, found \(v.kindName) \(v.brief)")
                    }
                    metadata.append((key: k, value: s))
                }
                continue
            }
            tensors.append(try parseEntry(name: name, value: value, path: path, dataSize: dataSize))
        }

        // Overlap check on the non-empty tensors sorted by start offset.
        let order = tensors.indices.filter { tensors[$0].byteCount > 0 }.sorted {
            (tensors[$0].begin, tensors[$0].end) < (tensors[$1].begin, tensors[$1].end)
        }
        for (a, b) in zip(order, order.dropFirst()) where tensors[b].begin < tensors[a].end {
            let x = tensors[a], y = tensors[b]
            throw QATError(
                "\(path): tensors \"\(x.name)\" [\(x.begin), \(x.end)) and \"\(y.name)\" [\(y.begin), \(y.end)) overlap in the data region")
        }
        return ParsedHeader(metadata: metadata, tensors: tensors)
    }

    static func parseEntry(name: String, value: JSONValue, path: String, dataSize: Int) throws -> SafeTensorInfo {
        let at = "\(path): tensor \"\(name)\""
        guard case .object(let o) = value else { throw QATError("\(at): entry must be an object, found \(value.kindName)") }
        guard let dv = o["dtype"] else { throw QATError("\(at): missing \"dtype\"") }
        guard case .string(let ds) = dv else { throw QATError("\(at): dtype must be a string, found \(dv.kindName) \(dv.brief)") }
        guard let dtype = DType(rawValue: ds) else {
            let known = DType.allCases.map(\.rawValue).joined(separator: ", ")
            throw QATError.unsupported("\(at): unknown or unsupported dtype \"\(ds)\" (supported: \(known))")
        }
        guard let sv = o["shape"] else { throw QATError("\(at): missing \"shape\"") }
        guard case .array(let sa) = sv else { throw QATError("\(at): shape must be an array, found \(sv.kindName) \(sv.brief)") }
        var shape: [Int] = []
        shape.reserveCapacity(sa.count)
        var count = 1
        for d in sa {
            guard case .int(let i64) = d, let i = Int(exactly: i64) else {
                throw QATError("\(at): shape \(sv.brief) has a non-integer entry \(d.brief)")
            }
            guard i >= 0 else { throw QATError("\(at): shape \(sv.brief) has a negative dimension \(i)") }
            shape.append(i)
            let (c, overflow) = count.multipliedReportingOverflow(by: i)
            guard !overflow else { throw QATError("\(at): element count of shape \(sv.brief) overflows") }
            count = c
        }
        let (nbytes, overflow) = count.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow else { throw QATError("\(at): byte count of shape \(sv.brief) × \(dtype.rawValue) overflows") }

        guard let ov = o["data_offsets"] else { throw QATError("\(at): missing \"data_offsets\"") }
        guard case .array(let oa) = ov, oa.count == 2, case .int(let b64) = oa[0], case .int(let e64) = oa[1],
            let begin = Int(exactly: b64), let end = Int(exactly: e64), begin >= 0, end >= 0
        else {
            throw QATError("\(at): data_offsets must be two non-negative integers [begin, end], found \(ov.brief)")
        }
        guard begin <= end else { throw QATError("\(at): data_offsets [\(begin), \(end)] have begin > end") }
        guard end <= dataSize else {
            throw QATError(
                "\(at): data_offsets [\(begin), \(end)] run past the end of the data region (\(dataSize) bytes): the file is truncated")
        }
        guard end - begin == nbytes else {
            throw QATError(
                "\(at): shape \(shape) of \(dtype.rawValue) needs \(nbytes) bytes but data_offsets [\(begin), \(end)] span \(end - begin)")
        }
        return SafeTensorInfo(name: name, dtype: dtype, shape: shape, begin: begin, end: end)
    }

    /// The keys of the top-level object, duplicates included, decoded. The text is already
    /// known to be valid JSON, so a string at depth 1 right after `{` or `,` is a key.
    static func topLevelKeys(_ bytes: UnsafeRawBufferPointer) -> [String] {
        var keys: [String] = []
        var depth = 0
        var i = 0
        var expectKey = false
        let n = bytes.count
        while i < n {
            let c = bytes[i]
            switch c {
            case UInt8(ascii: "\""):
                let start = i
                var hasEscape = false
                i += 1
                while i < n && bytes[i] != UInt8(ascii: "\"") {
                    if bytes[i] == UInt8(ascii: "\\") { hasEscape = true; i += 1 }
                    i += 1
                }
                if depth == 1 && expectKey {
                    let raw = UnsafeRawBufferPointer(rebasing: bytes[start..<min(i + 1, n)])
                    if hasEscape, case .string(let s)? = try? JSONValue.parse(bytes: raw) {
                        keys.append(s)
                    } else {
                        keys.append(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[(start + 1)..<min(i, n)]), as: UTF8.self))
                    }
                    expectKey = false
                }
            case UInt8(ascii: "{"), UInt8(ascii: "["):
                depth += 1
                expectKey = depth == 1
            case UInt8(ascii: "}"), UInt8(ascii: "]"):
                depth -= 1
            case UInt8(ascii: ","):
                if depth == 1 { expectKey = true }
            default:
                break
            }
            i += 1
        }
        return keys
    }
}
