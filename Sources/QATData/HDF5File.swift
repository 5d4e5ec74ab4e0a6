import CHDF5
import Foundation

/// Element types that `HDF5File` reads and writes. Each names the in-memory (native) type
/// HDF5 converts to on read, and the little-endian standard type it stores on write, so a
/// file written here reads the same on any machine.
public protocol HDF5Scalar: Numeric, Sendable {
    static var h5Native: hid_t { get }
    static var h5File: hid_t { get }
    /// Whether this is an integer type (reads from float datasets are refused).
    static var h5IsInteger: Bool { get }
    static var h5Name: String { get }
}

extension Int32: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_native_int32() }
    public static var h5File: hid_t { qat_h5t_std_i32le() }
    public static var h5IsInteger: Bool { true }
    public static var h5Name: String { "int32" }
}
extension Int64: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_native_int64() }
    public static var h5File: hid_t { qat_h5t_std_i64le() }
    public static var h5IsInteger: Bool { true }
    public static var h5Name: String { "int64" }
}
extension UInt8: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_native_uint8() }
    public static var h5File: hid_t { qat_h5t_std_u8le() }
    public static var h5IsInteger: Bool { true }
    public static var h5Name: String { "uint8" }
}
extension UInt16: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_native_uint16() }
    public static var h5File: hid_t { qat_h5t_std_u16le() }
    public static var h5IsInteger: Bool { true }
    public static var h5Name: String { "uint16" }
}
/// IEEE half, stored as HDF5's little-endian binary16 (what h5py writes for float16). Reads
/// of float16 datasets into `Float` are converted by HDF5 (exact widening).
extension Float16: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_ieee_f16le() }
    public static var h5File: hid_t { qat_h5t_ieee_f16le() }
    public static var h5IsInteger: Bool { false }
    public static var h5Name: String { "float16" }
}
extension Float: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_native_float() }
    public static var h5File: hid_t { qat_h5t_ieee_f32le() }
    public static var h5IsInteger: Bool { false }
    public static var h5Name: String { "float32" }
}
extension Double: HDF5Scalar {
    public static var h5Native: hid_t { qat_h5t_native_double() }
    public static var h5File: hid_t { qat_h5t_ieee_f64le() }
    public static var h5IsInteger: Bool { false }
    public static var h5Name: String { "float64" }
}

/// What a dataset holds, as stored in the file.
public struct HDF5DatasetInfo: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: String, Sendable { case signedInteger = "int", unsignedInteger = "uint", float, string, other }
    public let shape: [Int]
    public let kind: Kind
    /// Bytes per element as stored.
    public let elementSize: Int
    public var count: Int { shape.reduce(1, *) }
    public var isInteger: Bool { kind == .signedInteger || kind == .unsignedInteger }
    /// `int32`, `uint8`, `float32`, …
    public var typeName: String {
        switch kind {
        case .signedInteger: return "int\(elementSize * 8)"
        case .unsignedInteger: return "uint\(elementSize * 8)"
        case .float: return "float\(elementSize * 8)"
        case .string: return "string"
        case .other: return "non-numeric type"
        }
    }
    public var description: String { "\(typeName)\(shape)" }
}

/// A small safe wrapper over one libhdf5 file handle.
///
/// Every HDF5 identifier opened inside a method is closed before it returns (`defer`), so
/// the only long-lived handle is the file's own, closed in `deinit`. HDF5's automatic
/// error printing to stderr is switched off once per process; failures become `QATError`s
/// naming the file and dataset instead. The serial libhdf5 build is not thread-safe, so an
/// `HDF5File` is deliberately not `Sendable`: use one per thread, and not concurrently.
public final class HDF5File {
    /// Narrow floating-point storage types (see `createDataset`).
    public enum Storage: Sendable { case bfloat16, float16 }

    public enum Mode: Sendable { case readOnly, readWrite, create }

    public let path: String
    public let mode: Mode
    private let fid: hid_t

    /// Turns HDF5's stderr error stack printing off (once): we report our own errors.
    private static let silenced: Void = {
        _ = H5open()
        _ = H5Eset_auto2(qat_h5e_default(), nil, nil)
    }()

    /// Opens `path`: `.readOnly` / `.readWrite` need an existing HDF5 file, `.create`
    /// creates it, truncating any existing file.
    public init(path: String, mode: Mode = .readOnly) throws {
        _ = HDF5File.silenced
        self.path = path
        self.mode = mode
        let id: hid_t
        switch mode {
        case .readOnly, .readWrite:
            guard FileManager.default.fileExists(atPath: path) else {
                throw QATError("HDF5 file not found: \(path)")
            }
            guard H5Fis_hdf5(path) > 0 else { throw QATError("\(path) is not an HDF5 file") }
            id = H5Fopen(path, mode == .readOnly ? qat_h5f_acc_rdonly() : qat_h5f_acc_rdwr(), qat_h5p_default())
        case .create:
            id = H5Fcreate(path, qat_h5f_acc_trunc(), qat_h5p_default(), qat_h5p_default())
        }
        guard id >= 0 else { throw QATError("cannot \(mode == .create ? "create" : "open") HDF5 file \(path)") }
        fid = id
    }

    deinit { H5Fclose(fid) }

    /// Writes buffered data to disk now (it is also flushed when the file is closed).
    public func flush() throws {
        guard H5Fflush(fid, H5F_SCOPE_LOCAL) >= 0 else { throw QATError.io("\(path): flush failed") }
    }

    // MARK: - Queries

    /// Whether an object (group or dataset) exists at `name` ("train/input_ids").
    /// Checks each path component in turn, because `H5Lexists` fails, rather than answering
    /// false, when an intermediate group is missing.
    public func exists(_ name: String) -> Bool {
        var prefix = ""
        for part in name.split(separator: "/") {
            prefix += (prefix.isEmpty ? "" : "/") + part
            if H5Lexists(fid, prefix, qat_h5p_default()) <= 0 { return false }
        }
        return !prefix.isEmpty
    }

    /// Shape and stored type of dataset `name`.
    public func info(_ name: String) throws -> HDF5DatasetInfo {
        let d = try openDataset(name)
        defer { H5Dclose(d) }
        return try info(of: d, name: name)
    }

    /// Names of the direct children (groups and datasets) of `group` ("/" for the root).
    public func children(of group: String = "/") throws -> [String] {
        let g = H5Gopen2(fid, group, qat_h5p_default())
        guard g >= 0 else { throw QATError("\(path): no group '\(group)'") }
        defer { H5Gclose(g) }
        var ginfo = H5G_info_t()
        guard H5Gget_info(g, &ginfo) >= 0 else { throw QATError("\(path): cannot list '\(group)'") }
        var names: [String] = []
        for i in 0..<ginfo.nlinks {
            let n = H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, nil, 0, qat_h5p_default())
            guard n >= 0 else { continue }
            var buf = [CChar](repeating: 0, count: Int(n) + 1)
            H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, i, &buf, Int(n) + 1, qat_h5p_default())
            names.append(String(decoding: buf.prefix(Int(n)).map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        return names
    }

    // MARK: - Reading

    /// Reads the whole dataset, converted to `T`, with its shape (row-major values).
    ///
    /// Integer reads refuse float datasets (a token stream stored as float is a bug
    /// upstream, not something to truncate), and an integer that does not fit `T` (an int64
    /// id above Int32.max) fails the read instead of saturating silently.
    public func read<T: HDF5Scalar>(_ name: String, as type: T.Type = T.self) throws -> (values: [T], shape: [Int]) {
        let d = try openDataset(name)
        defer { H5Dclose(d) }
        let inf = try info(of: d, name: name)
        try checkConvertible(inf, to: T.self, name: name)
        try checkReadable(d, inf, name: name, elements: inf.count, as: T.self)
        let values: [T] = try readSelection(d, name: name, count: inf.count, memSpace: qat_h5s_all(), fileSpace: qat_h5s_all())
        return (values, inf.shape)
    }

    /// Reads a dataset that must have rank `rank` (checked), e.g. a 1-D token stream.
    public func read<T: HDF5Scalar>(_ name: String, as type: T.Type = T.self, rank: Int) throws -> (values: [T], shape: [Int]) {
        let inf = try info(name)
        guard inf.shape.count == rank else {
            throw QATError("\(path): dataset '\(name)' has rank \(inf.shape.count) (shape \(inf.shape)); expected rank \(rank)")
        }
        return try read(name, as: T.self)
    }

    /// Reads rows `rows` along the first dimension of an N-D dataset (elements of a 1-D
    /// one), row-major, for streaming large datasets without loading them whole.
    public func readRows<T: HDF5Scalar>(_ name: String, rows: Range<Int>, as type: T.Type = T.self) throws -> [T] {
        let d = try openDataset(name)
        defer { H5Dclose(d) }
        let inf = try info(of: d, name: name)
        try checkConvertible(inf, to: T.self, name: name)
        guard let n0 = inf.shape.first else { throw QATError("\(path): dataset '\(name)' is a scalar; it has no rows") }
        guard rows.lowerBound >= 0, rows.upperBound <= n0 else {
            throw QATError("\(path): rows \(rows) out of range for dataset '\(name)' with \(n0) rows (shape \(inf.shape))")
        }
        let rowSize = inf.shape.dropFirst().reduce(1, *)
        if rows.isEmpty || rowSize == 0 { return [] }
        try checkReadable(d, inf, name: name, elements: rows.count * rowSize, as: T.self)
        let fileSpace = H5Dget_space(d)
        guard fileSpace >= 0 else { throw QATError("\(path): cannot get dataspace of '\(name)'") }
        defer { H5Sclose(fileSpace) }
        var start = [hsize_t](repeating: 0, count: inf.shape.count)
        var count = inf.shape.map { hsize_t($0) }
        start[0] = hsize_t(rows.lowerBound)
        count[0] = hsize_t(rows.count)
        guard H5Sselect_hyperslab(fileSpace, H5S_SELECT_SET, start, nil, count, nil) >= 0 else {
            throw QATError("\(path): cannot select rows \(rows) of '\(name)'")
        }
        let memSpace = H5Screate_simple(Int32(count.count), count, nil)
        guard memSpace >= 0 else { throw QATError.io("\(path): cannot create memory dataspace for '\(name)'") }
        defer { H5Sclose(memSpace) }
        return try readSelection(d, name: name, count: rows.count * rowSize, memSpace: memSpace, fileSpace: fileSpace)
    }

    /// A 1-D or N-D integer dataset as Int32 (int64 and other integer widths converted,
    /// with out-of-range values an error). The usual entry point for token ids.
    public func readInt32(_ name: String) throws -> [Int32] { try read(name, as: Int32.self).values }
    public func readInt64(_ name: String) throws -> [Int64] { try read(name, as: Int64.self).values }
    public func readFloat32(_ name: String) throws -> [Float] { try read(name, as: Float.self).values }
    public func readUInt8(_ name: String) throws -> [UInt8] { try read(name, as: UInt8.self).values }

    // MARK: - Writing

    /// Creates dataset `name` (intermediate groups included) with the given shape, stored
    /// as `T`, chunked and gzip-compressed. `chunkRows` rows along the first dimension per
    /// chunk (default: about 256 KiB per chunk); `gzipLevel` 0…9, nil for no compression;
    /// `extendable` makes the first dimension unlimited so `resize` can grow it; `shuffle`
    /// adds HDF5's byte-shuffle filter before gzip (groups the bytes of equal significance);
    /// `storage` stores `T` values as another floating-point type (`HDF5File.bfloat16`,
    /// `.float16`), converted by HDF5 on write and read (round values first: the narrowing
    /// conversion is HDF5's).
    public func createDataset<T: HDF5Scalar>(
        _ name: String, of type: T.Type, shape: [Int], chunkRows: Int? = nil,
        gzipLevel: Int? = 4, extendable: Bool = false, shuffle: Bool = false,
        storage: HDF5File.Storage? = nil
    ) throws {
        try requireWritable()
        guard !shape.isEmpty, shape.allSatisfy({ $0 >= 0 }) else {
            throw QATError("\(path): invalid shape \(shape) for dataset '\(name)'")
        }
        guard !exists(name) else { throw QATError("\(path): dataset '\(name)' already exists") }
        var dims = shape.map { hsize_t($0) }
        var maxDims = dims
        if extendable { maxDims[0] = qat_h5s_unlimited() }
        let space = H5Screate_simple(Int32(dims.count), &dims, &maxDims)
        guard space >= 0 else { throw QATError.io("\(path): cannot create dataspace \(shape) for '\(name)'") }
        defer { H5Sclose(space) }
        let dcpl = H5Pcreate(qat_h5p_dataset_create())
        defer { H5Pclose(dcpl) }
        // Chunk: whole rows, about 256 KiB, never 0 (HDF5 rejects zero chunk dims).
        let rowSize = max(1, shape.dropFirst().reduce(1, *))
        let bytes = MemoryLayout<T>.size
        let defaultRows = max(1, (256 * 1024) / (rowSize * bytes))
        var chunk = shape.map { hsize_t(max(1, $0)) }
        chunk[0] = hsize_t(max(1, min(chunkRows ?? defaultRows, extendable ? Int.max : max(1, shape[0]))))
        guard H5Pset_chunk(dcpl, Int32(chunk.count), chunk) >= 0 else {
            throw QATError("\(path): cannot set chunking \(chunk) for '\(name)'")
        }
        if shuffle, gzipLevel != nil {
            guard H5Pset_shuffle(dcpl) >= 0 else { throw QATError("\(path): shuffle filter unavailable") }
        }
        if let level = gzipLevel {
            guard (0...9).contains(level) else { throw QATError("gzip level must be 0…9, got \(level)") }
            guard H5Pset_deflate(dcpl, UInt32(level)) >= 0 else { throw QATError("\(path): gzip filter unavailable") }
        }
        let lcpl = H5Pcreate(qat_h5p_link_create())
        defer { H5Pclose(lcpl) }
        H5Pset_create_intermediate_group(lcpl, 1)
        let fileType: hid_t
        switch storage {
        case .bfloat16?: fileType = qat_h5t_bf16le()
        case .float16?: fileType = qat_h5t_ieee_f16le()
        case nil: fileType = T.h5File
        }
        let d = H5Dcreate2(fid, name, fileType, space, lcpl, dcpl, qat_h5p_default())
        guard d >= 0 else { throw QATError.io("\(path): cannot create dataset '\(name)' \(T.h5Name)\(shape)") }
        H5Dclose(d)
    }

    /// Creates `name` with `shape` and writes `values` into it in one call.
    public func write<T: HDF5Scalar>(
        _ name: String, values: [T], shape: [Int]? = nil, chunkRows: Int? = nil,
        gzipLevel: Int? = 4
    ) throws {
        let shape = shape ?? [values.count]
        guard shape.reduce(1, *) == values.count else {
            throw QATError("\(path): \(values.count) values for dataset '\(name)' of shape \(shape)")
        }
        try createDataset(name, of: T.self, shape: shape, chunkRows: chunkRows, gzipLevel: gzipLevel)
        try writeRows(name, at: 0, values: values)
    }

    /// Writes whole rows starting at row `start` (first dimension) of an existing dataset;
    /// `values.count` must be a multiple of the row size.
    public func writeRows<T: HDF5Scalar>(_ name: String, at start: Int, values: [T]) throws {
        try requireWritable()
        let d = try openDataset(name)
        defer { H5Dclose(d) }
        let inf = try info(of: d, name: name)
        let rowSize = inf.shape.dropFirst().reduce(1, *)
        guard rowSize > 0 || values.isEmpty else { throw QATError("\(path): dataset '\(name)' has empty rows") }
        if values.isEmpty { return }
        guard values.count % rowSize == 0 else {
            throw QATError("\(path): \(values.count) values is not a whole number of rows of \(rowSize) for '\(name)' \(inf.shape)")
        }
        let nRows = values.count / rowSize
        guard start >= 0, start + nRows <= inf.shape[0] else {
            throw QATError("\(path): rows \(start)..<\(start + nRows) out of range for '\(name)' with \(inf.shape[0]) rows")
        }
        let fileSpace = H5Dget_space(d)
        defer { H5Sclose(fileSpace) }
        var offset = [hsize_t](repeating: 0, count: inf.shape.count)
        var count = inf.shape.map { hsize_t($0) }
        offset[0] = hsize_t(start)
        count[0] = hsize_t(nRows)
        guard H5Sselect_hyperslab(fileSpace, H5S_SELECT_SET, offset, nil, count, nil) >= 0 else {
            throw QATError("\(path): cannot select rows of '\(name)'")
        }
        let memSpace = H5Screate_simple(Int32(count.count), count, nil)
        defer { H5Sclose(memSpace) }
        let status = values.withUnsafeBytes { H5Dwrite(d, T.h5Native, memSpace, fileSpace, qat_h5p_default(), $0.baseAddress) }
        guard status >= 0 else { throw QATError.io("\(path): writing \(T.h5Name) rows to '\(name)' failed") }
    }

    /// Grows (or shrinks) the first dimension of a dataset created with `extendable: true`.
    public func resize(_ name: String, rows: Int) throws {
        try requireWritable()
        let d = try openDataset(name)
        defer { H5Dclose(d) }
        var dims = try info(of: d, name: name).shape.map { hsize_t($0) }
        dims[0] = hsize_t(rows)
        guard H5Dset_extent(d, dims) >= 0 else {
            throw QATError("\(path): cannot resize '\(name)' to \(rows) rows (was it created extendable?)")
        }
    }

    // MARK: - String attributes

    /// Sets (replacing) a UTF-8 string attribute on the object at `object` ("/" = file).
    public func setAttribute(_ attr: String, _ value: String, on object: String = "/") throws {
        try requireWritable()
        let obj = H5Oopen(fid, object, qat_h5p_default())
        guard obj >= 0 else { throw QATError("\(path): no object '\(object)' to set attribute '\(attr)' on") }
        defer { H5Oclose(obj) }
        if H5Aexists(obj, attr) > 0 { H5Adelete(obj, attr) }
        let bytes = Array(value.utf8)
        let t = H5Tcopy(qat_h5t_c_s1())
        defer { H5Tclose(t) }
        H5Tset_size(t, max(1, bytes.count))
        H5Tset_cset(t, H5T_CSET_UTF8)
        H5Tset_strpad(t, H5T_STR_NULLPAD)
        let space = H5Screate(H5S_SCALAR)
        defer { H5Sclose(space) }
        let a = H5Acreate2(obj, attr, t, space, qat_h5p_default(), qat_h5p_default())
        guard a >= 0 else { throw QATError.io("\(path): cannot create attribute '\(attr)' on '\(object)'") }
        defer { H5Aclose(a) }
        let buf = bytes.isEmpty ? [UInt8(0)] : bytes
        guard H5Awrite(a, t, buf) >= 0 else { throw QATError.io("\(path): cannot write attribute '\(attr)'") }
    }

    /// Reads a string attribute (fixed-length or variable-length, as h5py writes them).
    public func stringAttribute(_ attr: String, on object: String = "/") throws -> String {
        let obj = H5Oopen(fid, object, qat_h5p_default())
        guard obj >= 0 else { throw QATError("\(path): no object '\(object)'") }
        defer { H5Oclose(obj) }
        guard H5Aexists(obj, attr) > 0 else { throw QATError("\(path): '\(object)' has no attribute '\(attr)'") }
        let a = H5Aopen(obj, attr, qat_h5p_default())
        guard a >= 0 else { throw QATError("\(path): cannot open attribute '\(attr)' on '\(object)'") }
        defer { H5Aclose(a) }
        let ft = H5Aget_type(a)
        defer { H5Tclose(ft) }
        guard H5Tget_class(ft) == H5T_STRING else { throw QATError("\(path): attribute '\(attr)' on '\(object)' is not a string") }
        let space = H5Aget_space(a)
        defer { H5Sclose(space) }
        guard H5Sget_simple_extent_npoints(space) == 1 else {
            throw QATError("\(path): attribute '\(attr)' on '\(object)' is not a single string")
        }
        if H5Tis_variable_str(ft) > 0 {
            let mt = H5Tcopy(qat_h5t_c_s1())
            defer { H5Tclose(mt) }
            H5Tset_size(mt, qat_h5t_variable())
            H5Tset_cset(mt, H5Tget_cset(ft))
            var p: UnsafeMutablePointer<CChar>? = nil
            guard H5Aread(a, mt, &p) >= 0 else { throw QATError("\(path): cannot read attribute '\(attr)'") }
            defer { if let p { H5free_memory(p) } }
            return p.map { String(cString: $0) } ?? ""
        }
        let size = H5Tget_size(ft)
        guard size > 0, size <= HDF5File.maxAttributeBytes else {
            throw QATError(
                "\(path): attribute '\(attr)' on '\(object)' declares a string of \(size) bytes (limit "
                    + "\(HDF5File.maxAttributeBytes)): corrupt file")
        }
        var buf = [UInt8](repeating: 0, count: size + 1)
        guard H5Aread(a, ft, &buf) >= 0 else { throw QATError("\(path): cannot read attribute '\(attr)'") }
        let end = buf.firstIndex(of: 0) ?? size
        return String(decoding: buf[..<end], as: UTF8.self)
    }

    // MARK: - Internals

    /// Largest fixed-length string attribute read (ours are a few hundred bytes).
    public static let maxAttributeBytes = 1 << 20

    private func requireWritable() throws {
        guard mode != .readOnly else { throw QATError("\(path) is open read-only") }
    }

    private func openDataset(_ name: String) throws -> hid_t {
        guard exists(name) else {
            let top = (try? children()).map { " (top level holds: \($0.joined(separator: ", ")))" } ?? ""
            throw QATError("\(path): no dataset '\(name)'\(top)")
        }
        let d = H5Dopen2(fid, name, qat_h5p_default())
        guard d >= 0 else { throw QATError("\(path): '\(name)' is not a dataset") }
        return d
    }

    private func info(of d: hid_t, name: String) throws -> HDF5DatasetInfo {
        let space = H5Dget_space(d)
        guard space >= 0 else { throw QATError("\(path): cannot get dataspace of '\(name)'") }
        defer { H5Sclose(space) }
        let rank = Int(H5Sget_simple_extent_ndims(space))
        guard rank >= 0 else { throw QATError("\(path): dataset '\(name)' has no simple dataspace") }
        var dims = [hsize_t](repeating: 0, count: rank)
        H5Sget_simple_extent_dims(space, &dims, nil)
        // A corrupt or hostile file may declare any 64-bit dims: refuse those whose element
        // count does not even fit an Int, so `count` and every size derived from it are safe.
        var total = 1
        for d in dims {
            guard d <= UInt64(Int.max) else {
                throw QATError("\(path): dataset '\(name)' has an impossible dimension \(d) (dims \(dims)): corrupt file")
            }
            let (t, o) = total.multipliedReportingOverflow(by: Int(d))
            guard !o else {
                throw QATError("\(path): dataset '\(name)' dims \(dims) have more elements than can be addressed: corrupt file")
            }
            total = t
        }
        let t = H5Dget_type(d)
        guard t >= 0 else { throw QATError("\(path): cannot get type of '\(name)'") }
        defer { H5Tclose(t) }
        let kind: HDF5DatasetInfo.Kind
        switch H5Tget_class(t) {
        case H5T_INTEGER: kind = H5Tget_sign(t) == H5T_SGN_NONE ? .unsignedInteger : .signedInteger
        case H5T_FLOAT: kind = .float
        case H5T_STRING: kind = .string
        default: kind = .other
        }
        return HDF5DatasetInfo(shape: dims.map { Int($0) }, kind: kind, elementSize: Int(H5Tget_size(t)))
    }

    private func checkConvertible<T: HDF5Scalar>(_ inf: HDF5DatasetInfo, to: T.Type, name: String) throws {
        if T.h5IsInteger {
            guard inf.isInteger else {
                throw QATError("\(path): dataset '\(name)' holds \(inf.typeName), not integers; cannot read it as \(T.h5Name)")
            }
        } else {
            guard inf.isInteger || inf.kind == .float else {
                throw QATError("\(path): dataset '\(name)' holds \(inf.typeName); cannot read it as \(T.h5Name)")
            }
        }
    }

    /// Largest read accepted in one call: physical memory (a larger dataset cannot be
    /// loaded whole anyway, and failing here gives a message instead of an OOM kill).
    static var maxReadBytes: Int { Int(clamping: ProcessInfo.processInfo.physicalMemory) }

    /// Before allocating `elements` values of `T` for dataset `d`: the byte count must be
    /// addressable and fit in memory, and the dataset must plausibly store what its dims
    /// declare (gzip cannot shrink data more than ~1000×, so a dataset declaring 10^12
    /// elements over a few kilobytes of chunks is a corrupt or hostile file).
    private func checkReadable<T: HDF5Scalar>(_ d: hid_t, _ inf: HDF5DatasetInfo, name: String, elements: Int, as: T.Type) throws {
        let (bytes, o) = elements.multipliedReportingOverflow(by: MemoryLayout<T>.size)
        guard !o, bytes <= HDF5File.maxReadBytes else {
            throw QATError(
                "\(path): dataset '\(name)' \(inf) is too large to read (\(elements) elements of "
                    + "\(T.h5Name), more than this machine's memory)")
        }
        let declared = inf.count.multipliedReportingOverflow(by: max(1, inf.elementSize))
        let stored = Int(clamping: H5Dget_storage_size(d))
        let (plausible, o2) = stored.multipliedReportingOverflow(by: 1100)
        if declared.overflow || (!o2 && declared.partialValue > plausible + (1 << 20)) {
            throw QATError("\(path): dataset '\(name)' declares \(inf) but stores only \(stored) bytes: the file is corrupt or truncated")
        }
    }

    private func readSelection<T: HDF5Scalar>(_ d: hid_t, name: String, count: Int, memSpace: hid_t, fileSpace: hid_t) throws -> [T] {
        let dxpl = H5Pcreate(qat_h5p_dataset_xfer())
        defer { H5Pclose(dxpl) }
        qat_h5p_set_abort_on_range(dxpl)
        var status: herr_t = 0
        let values = [T](unsafeUninitializedCapacity: count) { buf, initialized in
            status = count == 0 ? 0 : H5Dread(d, T.h5Native, memSpace, fileSpace, dxpl, buf.baseAddress)
            // The buffer is plain numbers; on failure it is zero-filled so it is never read
            // uninitialised (the caller throws anyway).
            if status < 0, count > 0 { UnsafeMutableRawBufferPointer(buf).initializeMemory(as: UInt8.self, repeating: 0) }
            initialized = count
        }
        guard status >= 0 else {
            throw QATError(
                "\(path): reading dataset '\(name)' as \(T.h5Name) failed (a value out of \(T.h5Name)'s range, or a corrupt file)")
        }
        return values
    }
}
