import Foundation
import QATCore
import QATIO
import TestSupport
import XCTest

final class SafeTensorsTests: XCTestCase {
    var dir: URL!

    override func setUp() { dir = Fixtures.tempDir("qat-st") }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    // MARK: - Round trips

    func testRoundTripEveryDType() throws {
        let values: [Float] = [0, 1, -2.5, 0.1, 448, -1e-3, 3.75, 1000]
        var w = SafeTensorsWriter()
        for dt in DType.allCases where dt.isFloatingPoint {
            try w.add(name: "f.\(dt.rawValue)", floats: values, shape: [2, 4], as: dt)
            try w.add(name: "scalar.\(dt.rawValue)", floats: [1.5], shape: [], as: dt)
        }
        let ints: [DType: [Int64]] = [
            .u8: [0, 1, 255, 7], .i8: [-128, 127, 0, -1], .i32: [Int64(Int32.min), Int64(Int32.max), -5, 6],
            .i64: [Int64.min, Int64.max, -100, 42], .bool: [1, 0, 0, 1],
        ]
        for (dt, v) in ints.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            try w.add(name: "i.\(dt.rawValue)", integers: v, shape: [4, 1], as: dt)
            try w.add(name: "scalar.\(dt.rawValue)", integers: [1], shape: [], as: dt)
        }
        try w.add(name: "empty", floats: [], shape: [0, 3], as: .f32)
        let p = path("all.safetensors")
        try w.write(to: p, metadata: [("format", "pt"), ("note", "h\u{e9}llo")])

        let f = try SafeTensorsFile(path: p)
        XCTAssertEqual(f.metadata.map(\.key), ["format", "note"])
        XCTAssertEqual(f.metadataValue("note"), "h\u{e9}llo")
        XCTAssertEqual(f.names, w.names, "header order = order added")
        XCTAssertEqual(f.headerSize % 8, 0)
        XCTAssertEqual(f.tensors.first?.begin, 0)
        for (a, b) in zip(f.tensors, f.tensors.dropFirst()) { XCTAssertEqual(a.end, b.begin) }

        for dt in DType.allCases where dt.isFloatingPoint {
            let t = try f.floats("f.\(dt.rawValue)")
            XCTAssertEqual(t.shape, [2, 4])
            XCTAssertEqual(f.info("f.\(dt.rawValue)")?.dtype, dt)
            let expected: [Float]
            switch dt {
            case .f32: expected = values
            case .f16: expected = values.map { f16ToFloat(floatToF16($0)) }
            case .bf16: expected = values.map { bf16ToFloat(floatToBF16($0)) }
            case .f8e4m3: expected = values.map { e4m3ToFloat(floatToE4M3($0)) }
            default: expected = values.map { e5m2ToFloat(floatToE5M2($0)) }
            }
            XCTAssertEqual(t.array, expected, dt.rawValue)
            let s = try f.floats("scalar.\(dt.rawValue)")
            XCTAssertEqual(s.shape, [])
            XCTAssertEqual(s.array, [1.5])
            XCTAssertThrowsError(try f.integers("f.\(dt.rawValue)"))
        }
        XCTAssertEqual(try f.floats("f.F8_E4M3").array[4], 448)
        for (dt, v) in ints {
            XCTAssertEqual(try f.integers("i.\(dt.rawValue)"), v, dt.rawValue)
            XCTAssertEqual(f.info("i.\(dt.rawValue)")?.shape, [4, 1])
            XCTAssertEqual(f.info("i.\(dt.rawValue)")?.byteCount, 4 * dt.byteSize)
            XCTAssertEqual(try f.integers("scalar.\(dt.rawValue)"), [1])
            XCTAssertThrowsError(try f.floats("i.\(dt.rawValue)")) { e in
                XCTAssertTrue("\(e)".contains("not a floating-point tensor"), "\(e)")
            }
        }
        XCTAssertEqual(try f.floats("empty").shape, [0, 3])
        XCTAssertEqual(try f.bytes("empty").count, 0)
        XCTAssertThrowsError(try f.bytes("nope")) { e in XCTAssertEqual("\(e)", "\(p): no tensor named \"nope\"") }

        // Raw bytes come back unchanged, through the zero-copy view.
        let raw = try f.bytes("i.I32")
        XCTAssertEqual(Array(raw), try DTypeConversion.fromInt64(ints[.i32]!, as: .i32))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["all.safetensors"], "no temp file left")
    }

    func testSaturationAndRounding() throws {
        var w = SafeTensorsWriter()
        // 1 + 2^-8 is a bf16 tie -> 1.0 (even); 1000 saturates to 448 in E4M3.
        try w.add(name: "x", floats: [1 + 1.0 / 256, 1000, -1000], shape: [3], as: .bf16)
        try w.add(name: "y", floats: [1000, -1000, 0.5], shape: [3], as: .f8e4m3)
        let t = Tensor(shape: [2], values: [1, 2])
        try w.add(name: "t", tensor: t, as: .f16)
        let p = path("r.safetensors")
        try w.write(to: p)
        let f = try SafeTensorsFile(path: p)
        XCTAssertEqual(try f.floats("x").array, [1, 1000, -1000])
        XCTAssertEqual(try f.floats("y").array, [448, -448, 0.5])
        XCTAssertEqual(try f.floats("t").array, [1, 2])
        XCTAssertTrue(f.metadata.isEmpty)
    }

    func testWriterRejectsBadInput() throws {
        var w = SafeTensorsWriter()
        try w.add(name: "a", dtype: .u8, shape: [2], bytes: [1, 2])
        XCTAssertThrowsError(try w.add(name: "a", dtype: .u8, shape: [2], bytes: [1, 2])) { e in
            XCTAssertTrue("\(e)".contains("duplicate tensor name \"a\""))
        }
        XCTAssertThrowsError(try w.add(name: "b", dtype: .i32, shape: [2], bytes: [1, 2])) { e in
            XCTAssertTrue("\(e)".contains("shape [2] of I32 needs 8 bytes, got 2"), "\(e)")
        }
        XCTAssertThrowsError(try w.add(name: "c", floats: [1, 2, 3], shape: [2], as: .f32))
        XCTAssertThrowsError(try w.add(name: "d", floats: [1], shape: [1], as: .i32))
        XCTAssertThrowsError(try w.add(name: "e", integers: [300], shape: [1], as: .u8)) { e in
            XCTAssertTrue("\(e)".contains("300"), "\(e)")
        }
        XCTAssertThrowsError(try w.add(name: "__metadata__", dtype: .u8, shape: [], bytes: [0]))
        XCTAssertThrowsError(try w.add(name: "f", dtype: .u8, shape: [Int.max, 4], bytes: [])) { e in
            XCTAssertTrue("\(e)".contains("overflows"), "\(e)")
        }
        XCTAssertEqual(w.count, 1)
    }

    // MARK: - Fixtures

    func testReadTinyLlamaBF16() throws {
        let f = try SafeTensorsFile(path: Fixtures.path("tiny-llama/model.safetensors"))
        XCTAssertEqual(f.metadataValue("format"), "pt")
        XCTAssertEqual(f.tensors.count, 21)
        let info = try XCTUnwrap(f.info("model.layers.0.mlp.down_proj.weight"))
        XCTAssertEqual(info.dtype, .bf16)
        XCTAssertEqual(info.shape, [128, 352])
        XCTAssertEqual(info.elementCount, 128 * 352)
        XCTAssertEqual(info.byteCount, 128 * 352 * 2)
        for t in f.tensors { XCTAssertEqual(t.dtype, .bf16, t.name) }

        // floats() equals a manual bf16 conversion of the raw bytes, for every tensor.
        for t in f.tensors {
            let raw = try f.bytes(t.name)
            let manual = (0..<t.elementCount).map { i in
                Float(bitPattern: UInt32(raw[2 * i]) << 16 | UInt32(raw[2 * i + 1]) << 24)
            }
            let x = try f.floats(t.name)
            XCTAssertEqual(x.shape, t.shape)
            XCTAssertEqual(x.array, manual, t.name)
            var into = [Float](repeating: .nan, count: t.elementCount)
            try into.withUnsafeMutableBufferPointer { try f.floats(t.name, into: $0.baseAddress!) }
            XCTAssertEqual(into, manual, t.name)
        }
        XCTAssertEqual(Array(try f.floats("model.norm.weight").array.prefix(3)), [1, 1, 1])

        let ck = try ModelWeights(path: Fixtures.path("tiny-llama"))
        XCTAssertEqual(ck.names, f.names)
        XCTAssertFalse(ck.isSharded)
        XCTAssertEqual(try ck.floats("lm_head.weight").array, try f.floats("lm_head.weight").array)
    }

    func testReadReference() throws {
        let f = try SafeTensorsFile(path: Fixtures.path("tiny-llama/reference.safetensors"))
        XCTAssertEqual(f.info("input_ids")?.dtype, .i64)
        XCTAssertEqual(f.info("input_ids")?.shape, [2, 33])
        let ids = try f.integers("input_ids")
        XCTAssertEqual(ids.count, 66)
        XCTAssertEqual(Array(ids.prefix(5)), [37, 235, 396, 72, 255])
        XCTAssertEqual(Array(try f.integers("labels").suffix(3)), [-100, -100, -100])
        XCTAssertEqual(try f.floats("loss").array, [6.632345676422119])
        let logits = try f.floats("logits")
        XCTAssertEqual(logits.shape, [2, 33, 512])
        XCTAssertEqual(Array(logits.array.prefix(3)), [-0.27518996596336365, -0.5147799849510193, 0.18184024095535278])
        XCTAssertEqual(f.info("grad.lm_head.weight")?.shape, [512, 128])
        _ = try SafeTensorsFile(path: Fixtures.path("tiny-qwen3/model.safetensors"))
        _ = try SafeTensorsFile(path: Fixtures.fortuneLM + "/model.safetensors")
    }

    // MARK: - Sharded checkpoints

    func testShardedWriteAndRead() throws {
        var w = SafeTensorsWriter()
        var expected: [String: [Float]] = [:]
        for i in 0..<7 {
            let name = "model.layers.\(i).weight"
            let v = (0..<(100 * (i + 1))).map { Float($0) * 0.25 - Float(i) }
            expected[name] = v
            try w.add(name: name, floats: v, shape: [i + 1, 100], as: .f32)
        }
        try w.add(name: "big", floats: [Float](repeating: 1, count: 2000), shape: [2000], as: .bf16)
        expected["big"] = [Float](repeating: 1, count: 2000)
        let out = path("ckpt")
        // A stale single file must not shadow the new shards.
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        try SafeTensorsWriter().write(to: out + "/model.safetensors")
        let written = try SafeTensorsWriter.writeSharded(w, directory: out, maxShardBytes: 4000, metadata: [("format", "pt")])
        XCTAssertEqual(written.last, out + "/model.safetensors.index.json")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out + "/model.safetensors"))
        let shardNames = written.dropLast().map { ($0 as NSString).lastPathComponent }
        XCTAssertGreaterThan(shardNames.count, 2)
        XCTAssertEqual(shardNames.first, "model-00001-of-0000\(shardNames.count).safetensors")

        let index = try JSONValue.parseObject(file: out + "/model.safetensors.index.json")
        XCTAssertEqual(try index.object("metadata").int("total_size"), w.totalBytes)
        let map = try index.object("weight_map")
        XCTAssertEqual(map.keys, w.names.sorted(), "every tensor once, sorted like sort_keys=True")
        for (_, v) in map { XCTAssertTrue(shardNames.contains(v.stringValue ?? "")) }
        for shard in shardNames {
            let f = try SafeTensorsFile(path: out + "/" + shard)
            XCTAssertLessThanOrEqual(f.tensors.reduce(0) { $0 + $1.byteCount }, max(4000, 4000))
            XCTAssertEqual(f.metadataValue("format"), "pt")
        }

        let ck = try ModelWeights(path: out)
        XCTAssertTrue(ck.isSharded)
        XCTAssertEqual(ck.names, w.names.sorted())
        XCTAssertEqual(Set(ck.names).count, ck.names.count)
        XCTAssertEqual(ck.files.count, shardNames.count)
        for (name, v) in expected {
            XCTAssertEqual(try ck.floats(name).array, v, name)
            XCTAssertNotNil(ck.file(for: name))
        }
        XCTAssertEqual(ck.totalBytes, w.totalBytes)
        XCTAssertNil(ck.info("nope"))
        XCTAssertThrowsError(try ck.floats("nope")) { e in XCTAssertTrue("\(e)".contains("no tensor named \"nope\"")) }

        // Single file when it fits; the stale index is removed.
        let single = try SafeTensorsWriter.writeSharded(w, directory: out, maxShardBytes: 1 << 30)
        XCTAssertEqual(single, [out + "/model.safetensors"])
        XCTAssertFalse(FileManager.default.fileExists(atPath: out + "/model.safetensors.index.json"))
        XCTAssertEqual(try ModelWeights(path: out).names, w.names)
        XCTAssertEqual(try ModelWeights(path: out + "/model.safetensors").names, w.names)
    }

    func testShardMissingFromIndex() throws {
        var w = SafeTensorsWriter()
        try w.add(name: "a", floats: [Float](repeating: 0, count: 100), shape: [100], as: .f32)
        try w.add(name: "b", floats: [Float](repeating: 0, count: 100), shape: [100], as: .f32)
        let out = path("ck2")
        let written = try w.writeSharded(directory: out, maxShardBytes: 500)
        XCTAssertEqual(written.count, 3)
        try FileManager.default.removeItem(atPath: written[1])
        XCTAssertThrowsError(try ModelWeights(path: out)) { e in
            XCTAssertEqual(
                "\(e)",
                "\(out)/model.safetensors.index.json: shard \"model-00002-of-00002.safetensors\" (holding \"b\") is missing from \(out)")
        }
        // A tensor the index lists but the shard lacks.
        try #"{"weight_map": {"a": "model-00001-of-00002.safetensors", "zzz": "model-00001-of-00002.safetensors"}}"#
            .write(toFile: written[2], atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ModelWeights(path: out)) { e in
            XCTAssertTrue(
                "\(e)".contains("tensor \"zzz\" is listed in shard \"model-00001-of-00002.safetensors\" but that file does not contain it"),
                "\(e)")
        }
        try #"{"weight_map": {"a": "../x.safetensors"}}"#.write(toFile: written[2], atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ModelWeights(path: out)) { e in XCTAssertTrue("\(e)".contains("not a file inside"), "\(e)") }
        XCTAssertThrowsError(try ModelWeights(path: path("empty-dir-does-not-exist")))
        let empty = path("emptydir")
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
        XCTAssertThrowsError(try ModelWeights(path: empty)) { e in
            XCTAssertEqual("\(e)", "\(empty): no model.safetensors or model.safetensors.index.json in this directory")
        }
    }

    // MARK: - Corrupt files

    /// Writes `8-byte length + header + data` (the length can be overridden to lie).
    func rawFile(_ name: String, header: String, data: [UInt8] = [], length: UInt64? = nil) -> String {
        var bytes: [UInt8] = []
        let h = Array(header.utf8)
        withUnsafeBytes(of: (length ?? UInt64(h.count)).littleEndian) { bytes.append(contentsOf: $0) }
        bytes += h + data
        let p = path(name)
        _ = FileManager.default.createFile(atPath: p, contents: Data(bytes))
        return p
    }

    func assertRejected(
        _ header: String, data: [UInt8] = Array(repeating: 0, count: 16), length: UInt64? = nil,
        contains expected: String, file: StaticString = #filePath, line: UInt = #line
    ) {
        let p = rawFile("bad-\(UUID().uuidString).safetensors", header: header, data: data, length: length)
        XCTAssertThrowsError(try SafeTensorsFile(path: p), file: file, line: line) { e in
            let m = "\(e)"
            XCTAssertTrue(m.hasPrefix(p + ":"), "message should name the file: \(m)", file: file, line: line)
            XCTAssertTrue(m.contains(expected), "\(m) does not contain \(expected)", file: file, line: line)
        }
    }

    func testCorruptFilesRejectedWithSpecificMessages() throws {
        // Shorter than 8 bytes.
        let short = path("short.safetensors")
        _ = FileManager.default.createFile(atPath: short, contents: Data([1, 2, 3]))
        XCTAssertThrowsError(try SafeTensorsFile(path: short)) { e in
            XCTAssertEqual("\(e)", "\(short): not a safetensors file: shorter than 8 bytes (3 bytes), no room for the header length")
        }
        XCTAssertThrowsError(try SafeTensorsFile(path: path("missing.safetensors"))) { e in
            XCTAssertTrue("\(e)".contains("cannot open"))
        }
        // Header length beyond the file / above the cap.
        assertRejected("{}", length: 1000, contains: "header length 1000 bytes runs past the end of the file")
        assertRejected("{}", length: UInt64(200 << 20), contains: "header length 209715200 bytes is above the 104857600-byte limit")
        assertRejected("{}", length: UInt64.max, contains: "is above the")
        // Not JSON / not an object.
        assertRejected("{\"a\": ", contains: "header: invalid JSON at line 1, column 7")
        assertRejected("[1, 2]", contains: "header is not a JSON object (found an array)")
        // Unknown dtype.
        let t = #""dtype":"F32","shape":[2],"data_offsets":[0,8]"#
        assertRejected(
            #"{"w":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}}"#, contains: #"tensor "w": unknown or unsupported dtype "F64""#)
        assertRejected(#"{"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}"#, contains: #"tensor "w": dtype must be a string"#)
        // Shapes.
        assertRejected(
            #"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, contains: #"tensor "w": shape [-2] has a negative dimension -2"#)
        assertRejected(
            #"{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}"#, contains: #"tensor "w": shape [2.0] has a non-integer entry 2.0"#)
        assertRejected(#"{"w":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}"#, contains: "has a non-integer entry \"2\"")
        assertRejected(#"{"w":{"dtype":"F32","shape":2,"data_offsets":[0,8]}}"#, contains: "shape must be an array")
        assertRejected(#"{"w":{"dtype":"F32","data_offsets":[0,8]}}"#, contains: #"tensor "w": missing "shape""#)
        // Offsets.
        assertRejected(
            #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
            contains: "data_offsets must be two non-negative integers [begin, end], found [0]")
        assertRejected(
            #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}}"#, contains: "data_offsets must be two non-negative integers")
        assertRejected(
            #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}"#, contains: "data_offsets must be two non-negative integers")
        assertRejected(#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, contains: "data_offsets [8, 0] have begin > end")
        assertRejected(
            "{\"w\":{\(t)}}", data: [0, 0, 0, 0],
            contains: #"tensor "w": data_offsets [0, 8] run past the end of the data region (4 bytes): the file is truncated"#)
        // Overlap.
        assertRejected(
            #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            contains: #"tensors "a" [0, 8) and "b" [4, 12) overlap in the data region"#)
        // Byte length mismatch.
        assertRejected(
            #"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#,
            contains: #"tensor "w": shape [2, 3] of BF16 needs 12 bytes but data_offsets [0, 8] span 8"#)
        // Duplicate names (json-c would silently keep the last one).
        assertRejected("{\"w\":{\(t)},\"w\":{\(t)}}", contains: #"duplicate tensor name "w" in the header"#)
        assertRejected("{\"w\":{\(t)},\"\\u0077\":{\(t)}}", contains: #"duplicate tensor name "w""#)
        // Element-count overflow.
        assertRejected(
            #"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            contains: #"tensor "w": element count of shape [4294967296,4294967296] overflows"#)
        assertRejected(#"{"w":{"dtype":"I64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#, contains: "overflows")
        // Metadata must be strings.
        assertRejected(#"{"__metadata__":{"format":1}}"#, contains: #"__metadata__ "format" must be a string"#)
        // Not an entry object.
        assertRejected(#"{"w":[1]}"#, contains: #"tensor "w": entry must be an object"#)

        // Valid edge cases are accepted: padding spaces, zero-sized tensors sharing an offset, gaps.
        let ok = rawFile(
            "ok.safetensors",
            header: #"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"#
                + #""c":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}   "#, data: [9, 9, 1, 2])
        let f = try SafeTensorsFile(path: ok)
        XCTAssertEqual(f.names, ["a", "b", "c"])
        XCTAssertEqual(try f.integers("c"), [1, 2])
    }

    func testHeaderLayoutMatchesRustCrate() throws {
        var w = SafeTensorsWriter()
        try w.add(name: "w", dtype: .u8, shape: [3], bytes: [1, 2, 3])
        let p = path("h.safetensors")
        try w.write(to: p, metadata: [("format", "pt")])
        let d = try Data(contentsOf: URL(fileURLWithPath: p))
        let header = #"{"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#
        let padded = header + String(repeating: " ", count: (8 - header.utf8.count % 8) % 8)
        var expected: [UInt8] = []
        withUnsafeBytes(of: UInt64(padded.utf8.count).littleEndian) { expected.append(contentsOf: $0) }
        expected += Array(padded.utf8) + [1, 2, 3]
        XCTAssertEqual(Array(d), expected)
    }

    /// Headers of real checkpoints list thousands of tensors (their parse time is measured
    /// by `qat bench`, "safetensors header"): all 20,000 entries are read and addressable.
    func testManyTensorsHeader() throws {
        var w = SafeTensorsWriter()
        for i in 0..<20_000 { try w.add(name: "model.layers.\(i / 10).t\(i % 10).weight", dtype: .u8, shape: [1], bytes: [UInt8(i & 255)]) }
        let p = path("many.safetensors")
        try w.write(to: p)
        let f = try SafeTensorsFile(path: p)
        XCTAssertEqual(f.tensors.count, 20_000)
        XCTAssertEqual(try f.integers("model.layers.1999.t9.weight"), [Int64(19_999 & 255)])
        XCTAssertEqual(try f.integers("model.layers.0.t0.weight"), [0])
        XCTAssertEqual(try f.integers("model.layers.25.t6.weight"), [Int64(256 & 255)])
    }

    /// A 4M-element bf16 tensor decodes to the exact values (its speed is measured by
    /// `qat bench`, "bf16 → f32 decode").
    func testLargeBF16Conversion() throws {
        let n = 4 << 20
        var w = SafeTensorsWriter()
        // Exactly representable in bf16 (low 16 bits zero), finite (exponent bit 7 clear).
        let values = (0..<n).map { (i: Int) -> Float in
            let bits = UInt32(truncatingIfNeeded: (i &* 2_654_435_761) >> 8) << 16
            return Float(bitPattern: bits & 0xBFFF_0000)
        }
        try w.add(name: "x", floats: values, shape: [n], as: .bf16)
        let p = path("big.safetensors")
        try w.write(to: p)
        let t = try SafeTensorsFile(path: p).floats("x")
        XCTAssertEqual(t.count, n)
        XCTAssertEqual(t.array.map(\.bitPattern), values.map(\.bitPattern))
    }
}
