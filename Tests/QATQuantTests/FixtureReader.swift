import Foundation
import TestSupport
import XCTest

/// A minimal safetensors reader for the quantization fixtures, so that these tests depend
/// only on the file format (not on QATIO's reader, which has its own tests).
struct FixtureMissing: Error, CustomStringConvertible { let description: String }

struct RefFile {
    let data: Data
    let header: [String: Any]
    let base: Int

    init(_ name: String) throws {
        data = try Data(contentsOf: URL(fileURLWithPath: Fixtures.path(name)))
        let n = data.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
        header = try JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + n))) as? [String: Any] ?? [:]
        base = 8 + n
    }

    func entry(_ name: String) throws -> (dtype: String, shape: [Int], range: Range<Int>) {
        guard let e = header[name] as? [String: Any], let dtype = e["dtype"] as? String,
            let shape = e["shape"] as? [Int], let off = e["data_offsets"] as? [Int]
        else { throw FixtureMissing(description: "fixture tensor \(name) missing") }  // a failure, never a skip
        return (dtype, shape, (base + off[0])..<(base + off[1]))
    }

    func shape(_ name: String) throws -> [Int] { try entry(name).shape }

    func floats(_ name: String) throws -> [Float] {
        let e = try entry(name)
        XCTAssertEqual(e.dtype, "F32", name)
        return data.subdata(in: e.range).withUnsafeBytes { raw in
            (0..<(raw.count / 4)).map { Float(bitPattern: raw.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self)) }
        }
    }

    func bytes(_ name: String) throws -> [UInt8] {
        let e = try entry(name)
        XCTAssertEqual(e.dtype, "U8", name)
        return [UInt8](data.subdata(in: e.range))
    }
}
