import Foundation
import QATData
import TestSupport
import XCTest

final class HDF5Tests: XCTestCase {
    func testFortuneTokensFile() throws {
        let f = try HDF5File(path: Fixtures.fortuneLM + "/tokens.h5")
        XCTAssertTrue(f.exists("train/input_ids"))
        XCTAssertFalse(f.exists("test/input_ids"))
        XCTAssertFalse(f.exists("train/nothing"))
        let info = try f.info("validation/input_ids")
        XCTAssertEqual(info.shape, [46_221])
        XCTAssertEqual(info.typeName, "int32")
        XCTAssertEqual(try f.children().sorted(), ["train", "validation"])
        let all = try f.readInt32("validation/input_ids")
        XCTAssertEqual(try f.readRows("validation/input_ids", rows: 100..<200, as: Int32.self), Array(all[100..<200]))
        XCTAssertEqual(try f.readInt64("validation/input_ids").map { Int32($0) }, all)
        XCTAssertThrowsError(try f.info("test/input_ids")) { e in
            XCTAssertTrue("\(e)".contains("no dataset 'test/input_ids'"), "\(e)")
            XCTAssertTrue("\(e)".contains("tokens.h5"), "\(e)")
        }
        XCTAssertThrowsError(try f.write("x", values: [Int32(1)])) { XCTAssertTrue("\($0)".contains("read-only")) }
    }

    func testWriteAndReadBackAllTypes() throws {
        let dir = Fixtures.tempDir("qat-h5")
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("t.h5").path
        let i32: [Int32] = (0..<1000).map { Int32($0 * 7 - 300) }
        let i64: [Int64] = (0..<24).map { Int64($0) << 20 }
        let f32: [Float] = (0..<(3 * 4 * 5)).map { Float($0) * 0.25 - 3 }
        let u8: [UInt8] = (0..<300).map { UInt8($0 % 256) }
        do {
            let f = try HDF5File(path: path, mode: .create)
            try f.write("a/b/i32", values: i32, chunkRows: 64)
            try f.write("i64", values: i64, shape: [4, 6])
            try f.write("f32", values: f32, shape: [3, 4, 5], gzipLevel: 9)
            try f.write("u8", values: u8, gzipLevel: nil)
            try f.setAttribute("note", "héllo wörld")
            try f.setAttribute("empty", "", on: "a/b/i32")
            XCTAssertThrowsError(try f.write("i64", values: i64)) { XCTAssertTrue("\($0)".contains("already exists")) }
        }
        let f = try HDF5File(path: path)
        XCTAssertEqual(try f.readInt32("a/b/i32"), i32)
        let r = try f.read("i64", as: Int64.self)
        XCTAssertEqual(r.values, i64)
        XCTAssertEqual(r.shape, [4, 6])
        XCTAssertEqual(try f.readInt32("i64"), i64.map { Int32($0) })
        XCTAssertEqual(try f.read("f32", as: Float.self).shape, [3, 4, 5])
        XCTAssertEqual(try f.readFloat32("f32"), f32)
        XCTAssertEqual(try f.readRows("f32", rows: 1..<3, as: Float.self), Array(f32[20..<60]))
        XCTAssertEqual(try f.readRows("i64", rows: 2..<4, as: Int32.self), i64[12..<24].map { Int32($0) })
        XCTAssertEqual(try f.readUInt8("u8"), u8)
        XCTAssertEqual(try f.info("f32").description, "float32[3, 4, 5]")
        XCTAssertEqual(try f.stringAttribute("note"), "héllo wörld")
        XCTAssertEqual(try f.stringAttribute("empty", on: "a/b/i32"), "")
        XCTAssertThrowsError(try f.stringAttribute("nope"))
        XCTAssertThrowsError(try f.readRows("f32", rows: 2..<4, as: Float.self)) { XCTAssertTrue("\($0)".contains("out of range")) }
        XCTAssertThrowsError(try f.read("f32", as: Float.self, rank: 1)) { XCTAssertTrue("\($0)".contains("rank 3")) }
    }

    func testStreamingWritesAndResize() throws {
        let dir = Fixtures.tempDir("qat-h5")
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("s.h5").path
        let f = try HDF5File(path: path, mode: .create)
        try f.createDataset("logp", of: Float.self, shape: [0, 3], chunkRows: 2, extendable: true)
        var all: [Float] = []
        for step in 0..<5 {
            let rows: [Float] = (0..<6).map { Float(step * 6 + $0) }
            try f.resize("logp", rows: (step + 1) * 2)
            try f.writeRows("logp", at: step * 2, values: rows)
            all += rows
        }
        XCTAssertEqual(try f.info("logp").shape, [10, 3])
        XCTAssertEqual(try f.readFloat32("logp"), all)
        XCTAssertThrowsError(try f.writeRows("logp", at: 9, values: [Float](repeating: 0, count: 6)))
        XCTAssertThrowsError(try f.writeRows("logp", at: 0, values: [Float](repeating: 0, count: 4))) {
            XCTAssertTrue("\($0)".contains("whole number of rows"))
        }
    }

    func testTokenErrors() throws {
        let dir = Fixtures.tempDir("qat-h5")
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("bad.h5").path
        do {
            let f = try HDF5File(path: path, mode: .create)
            try f.write("float/input_ids", values: [Float(1), 2])
            try f.write("big/input_ids", values: [Int64(5), Int64(Int32.max) + 1])
            try f.write("neg/input_ids", values: [Int64(5), Int64(Int32.min) - 1])
            try f.write("twod/input_ids", values: [Int32](repeating: 1, count: 6), shape: [2, 3])
            try f.write("ok/input_ids", values: [Int64(1), 2, 3])
        }
        func err(_ split: String) -> String {
            do { _ = try TokenData.load(path: path, split: split, tokenizer: nil); return "no error" } catch { return "\(error)" }
        }
        XCTAssertTrue(err("float").contains("holds float32"), err("float"))
        XCTAssertTrue(err("big").contains("out of int32"), err("big"))
        XCTAssertTrue(err("neg").contains("out of int32"), err("neg"))
        XCTAssertTrue(err("twod").contains("rank 2"), err("twod"))
        XCTAssertTrue(err("missing").contains("no dataset 'missing/input_ids'"), err("missing"))
        XCTAssertEqual(try TokenData.load(path: path, split: "ok", tokenizer: nil), [1, 2, 3])
        XCTAssertThrowsError(try HDF5File(path: dir.appendingPathComponent("none.h5").path)) {
            XCTAssertTrue("\($0)".contains("not found"))
        }
        let notH5 = dir.appendingPathComponent("x.h5").path
        try Data("hello".utf8).write(to: URL(fileURLWithPath: notH5))
        XCTAssertThrowsError(try HDF5File(path: notH5)) { XCTAssertTrue("\($0)".contains("not an HDF5 file")) }
    }
}
