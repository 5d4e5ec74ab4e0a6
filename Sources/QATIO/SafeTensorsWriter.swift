import QATCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Collects tensors, then writes them as one `.safetensors` file or a sharded checkpoint.
///
/// Tensors are laid out in the order added (so a diff of two exports lines up), the header is
/// compact JSON padded with spaces to a multiple of 8 bytes as the Rust `safetensors` crate
/// does (keeps the data region 8-byte aligned for readers that map it), and every file is
/// written atomically. Note that transformers refuses a file whose `__metadata__` lacks
/// `"format": "pt"` when metadata is present; pass it when the output is meant for HF.
public struct SafeTensorsWriter {
    public struct Entry {
        public let name: String
        public let dtype: DType
        public let shape: [Int]
        public let bytes: [UInt8]
    }

    public private(set) var entries: [Entry] = []
    private var nameSet: Set<String> = []

    public init() {}

    public var names: [String] { entries.map(\.name) }
    public var count: Int { entries.count }
    /// Sum of all tensor byte sizes (HF's `total_size`).
    public var totalBytes: Int { entries.reduce(0) { $0 + $1.bytes.count } }

    /// Adds raw little-endian bytes; their count must equal shape × dtype size.
    public mutating func add(name: String, dtype: DType, shape: [Int], bytes: [UInt8]) throws {
        guard !name.isEmpty else { throw QATError("safetensors writer: empty tensor name") }
        guard name != "__metadata__" else { throw QATError("safetensors writer: \"__metadata__\" is reserved and cannot name a tensor") }
        guard !nameSet.contains(name) else { throw QATError("safetensors writer: duplicate tensor name \"\(name)\"") }
        let n = try Self.elementCount(shape, name: name)
        let (need, overflow) = n.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow else { throw QATError("safetensors writer: tensor \"\(name)\": byte count of shape \(shape) overflows") }
        guard need == bytes.count else {
            throw QATError(
                "safetensors writer: tensor \"\(name)\": shape \(shape) of \(dtype.rawValue) needs \(need) bytes, got \(bytes.count)")
        }
        entries.append(Entry(name: name, dtype: dtype, shape: shape, bytes: bytes))
        nameSet.insert(name)
    }

    /// Adds an fp32 tensor stored as F32/F16/BF16 (round half to even) or F8_E4M3/F8_E5M2
    /// (saturating).
    public mutating func add(name: String, tensor: Tensor, as dtype: DType) throws {
        try add(name: name, floats: UnsafeBufferPointer(start: tensor.data, count: tensor.count), shape: tensor.shape, as: dtype)
    }

    public mutating func add(name: String, floats: UnsafeBufferPointer<Float>, shape: [Int], as dtype: DType) throws {
        let n = try Self.elementCount(shape, name: name)
        guard n == floats.count else {
            throw QATError("safetensors writer: tensor \"\(name)\": shape \(shape) holds \(n) elements, got \(floats.count) floats")
        }
        guard dtype.isFloatingPoint else {
            throw QATError(
                "safetensors writer: tensor \"\(name)\": cannot store floats as \(dtype.rawValue); use add(name:integers:shape:as:)")
        }
        var bytes = [UInt8](repeating: 0, count: n * dtype.byteSize)
        if n > 0, let src = floats.baseAddress {
            try bytes.withUnsafeMutableBytes { b in
                guard let d = b.baseAddress else { return }
                try DTypeConversion.fromFloat(src, count: n, as: dtype, into: d)
            }
        }
        try add(name: name, dtype: dtype, shape: shape, bytes: bytes)
    }

    public mutating func add(name: String, floats: [Float], shape: [Int], as dtype: DType) throws {
        try floats.withUnsafeBufferPointer { try add(name: name, floats: $0, shape: shape, as: dtype) }
    }

    /// Adds integers as I64/I32/I8/U8/BOOL, refusing values that do not fit.
    public mutating func add(name: String, integers: [Int64], shape: [Int], as dtype: DType) throws {
        let bytes: [UInt8]
        do { bytes = try DTypeConversion.fromInt64(integers, as: dtype) } catch let e as QATError {
            throw e.prefixed("safetensors writer: tensor \"\(name)\": ")
        }
        try add(name: name, dtype: dtype, shape: shape, bytes: bytes)
    }

    static func elementCount(_ shape: [Int], name: String) throws -> Int {
        var n = 1
        for d in shape {
            guard d >= 0 else { throw QATError("safetensors writer: tensor \"\(name)\": negative dimension in shape \(shape)") }
            let (m, o) = n.multipliedReportingOverflow(by: d)
            guard !o else { throw QATError("safetensors writer: tensor \"\(name)\": element count of shape \(shape) overflows") }
            n = m
        }
        return n
    }

    /// The header bytes (compact JSON + space padding to a multiple of 8) for `entries`.
    static func header(for entries: ArraySlice<Entry>, metadata: [(String, String)]) -> [UInt8] {
        // Built as one list: names are already unique, and `JSONObject.set` would make a
        // header of n tensors cost O(n²) lookups.
        var members: [(key: String, value: JSONValue)] = []
        members.reserveCapacity(entries.count + 1)
        if !metadata.isEmpty {
            members.append((key: "__metadata__", value: .object(JSONObject(metadata.map { (key: $0.0, value: JSONValue.string($0.1)) }))))
        }
        var offset = 0
        for e in entries {
            let end = offset + e.bytes.count
            let shape: [JSONValue] = e.shape.map { JSONValue.int(Int64($0)) }
            let offsets: [JSONValue] = [.int(Int64(offset)), .int(Int64(end))]
            let entry = JSONObject([
                (key: "dtype", value: .string(e.dtype.rawValue)),
                (key: "shape", value: .array(shape)),
                (key: "data_offsets", value: .array(offsets)),
            ])
            members.append((key: e.name, value: .object(entry)))
            offset = end
        }
        let root = JSONObject(members)
        var bytes = JSONValue.object(root).serializedBytes(indent: nil, asciiOnly: false)
        let pad = (8 - bytes.count % 8) % 8
        bytes.append(contentsOf: repeatElement(0x20, count: pad))
        return bytes
    }

    /// Writes one `.safetensors` file atomically (never a half-written file at `path`).
    public func write(to path: String, metadata: [(String, String)] = []) throws {
        try Self.writeFile(entries[...], to: path, metadata: metadata)
    }

    static func writeFile(_ entries: ArraySlice<Entry>, to path: String, metadata: [(String, String)]) throws {
        var names = Set<String>()
        for (k, _) in metadata where !names.insert(k).inserted {
            throw QATError("\(path): duplicate __metadata__ key \"\(k)\"")
        }
        let header = header(for: entries, metadata: metadata)
        try atomicWrite(path: path) { w in
            var len = UInt64(header.count).littleEndian
            try withUnsafeBytes(of: &len) { try w.write($0) }
            try w.write(header)
            for e in entries { try w.write(e.bytes) }
        }
    }

    /// Writes a model directory the way transformers' `save_pretrained` lays it out: a single
    /// `model.safetensors` when everything fits in `maxShardBytes`, otherwise
    /// `model-00001-of-0000M.safetensors` shards (filled greedily in the order added; a tensor
    /// larger than the limit gets a shard of its own) plus `model.safetensors.index.json`
    /// (`metadata.total_size` and a key-sorted `weight_map`). The index is written last, so a
    /// crash leaves either the previous index or a complete new set. A stale layout of the
    /// other kind (index vs. single file) is removed so loaders cannot pick up old weights.
    /// Returns the paths written, the index last.
    @discardableResult
    public static func writeSharded(
        _ writer: SafeTensorsWriter, directory: String, maxShardBytes: Int,
        metadata: [(String, String)] = []
    ) throws -> [String] {
        guard maxShardBytes > 0 else { throw QATError("writeSharded: maxShardBytes must be positive, got \(maxShardBytes)") }
        try makeDirectories(directory)
        let single = joinPath(directory, "model.safetensors")
        let indexPath = joinPath(directory, "model.safetensors.index.json")
        let total = writer.totalBytes
        if total <= maxShardBytes {
            try writeFile(writer.entries[...], to: single, metadata: metadata)
            if fileExists(indexPath) { unlink(indexPath) }
            return [single]
        }
        var shards: [Range<Int>] = []
        var start = 0, size = 0
        for (i, e) in writer.entries.enumerated() {
            if i > start && size + e.bytes.count > maxShardBytes {
                shards.append(start..<i)
                start = i; size = 0
            }
            size += e.bytes.count
        }
        shards.append(start..<writer.entries.count)

        func pad5(_ n: Int) -> String { let s = String(n); return String(repeating: "0", count: max(0, 5 - s.count)) + s }
        var written: [String] = []
        var weightMap: [(String, String)] = []
        for (k, r) in shards.enumerated() {
            let file = "model-\(pad5(k + 1))-of-\(pad5(shards.count)).safetensors"
            let p = joinPath(directory, file)
            try writeFile(writer.entries[r], to: p, metadata: metadata)
            written.append(p)
            for e in writer.entries[r] { weightMap.append((e.name, file)) }
        }
        // Python's sort_keys=True orders by code point, which is UTF-8 byte order.
        weightMap.sort { $0.0.utf8.lexicographicallyPrecedes($1.0.utf8) }
        let map = JSONObject(weightMap.map { (key: $0.0, value: JSONValue.string($0.1)) })
        let meta = JSONObject([(key: "total_size", value: .int(Int64(total)))])
        let index = JSONObject([(key: "metadata", value: .object(meta)), (key: "weight_map", value: .object(map))])
        try index.write(toFile: indexPath)
        if fileExists(single) { unlink(single) }
        written.append(indexPath)
        return written
    }

    /// Instance spelling of `writeSharded(_:directory:maxShardBytes:metadata:)`.
    @discardableResult
    public func writeSharded(directory: String, maxShardBytes: Int, metadata: [(String, String)] = []) throws -> [String] {
        try Self.writeSharded(self, directory: directory, maxShardBytes: maxShardBytes, metadata: metadata)
    }
}

/// `mkdir -p`.
func makeDirectories(_ path: String) throws {
    if isDirectory(path) { return }
    let parent = directoryName(path)
    if parent != path && !parent.isEmpty && parent != "." && parent != "/" { try makeDirectories(parent) }
    if mkdir(path, 0o755) != 0 && errno != EEXIST {
        throw QATError.io("\(path): cannot create directory: \(errnoString())")
    }
}
