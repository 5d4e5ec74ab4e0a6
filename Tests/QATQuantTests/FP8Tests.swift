import QATQuant
import XCTest

final class FP8CodecTests: XCTestCase {
    func testE4M3DecodeAllCodes() throws {
        let f = try RefFile("fp8_e4m3_reference.safetensors")
        let codes = try f.bytes("codes"), decoded = try f.floats("decoded")
        XCTAssertEqual(codes.count, 256)
        for (c, d) in zip(codes, decoded) {
            let v = e4m3ToFloat(c)
            if d.isNaN {
                XCTAssertTrue(v.isNaN, "code \(c)")
            } else {
                XCTAssertEqual(v.bitPattern, d.bitPattern, "code 0x\(String(c, radix: 16)): \(v) vs \(d)")
            }
        }
        XCTAssertTrue(e4m3ToFloat(0x7F).isNaN)
        XCTAssertTrue(e4m3ToFloat(0xFF).isNaN)
        XCTAssertEqual(e4m3ToFloat(0x7E), 448)
    }

    func testE4M3RoundTripAllCodes() {
        for c in 0..<256 where c & 0x7F != 0x7F {
            let b = UInt8(c)
            XCTAssertEqual(floatToE4M3(e4m3ToFloat(b)), b == 0x80 ? 0x80 : b, "code \(c)")
        }
    }

    func testE4M3EncodeFixturePairs() throws {
        let f = try RefFile("fp8_e4m3_reference.safetensors")
        let x = try f.floats("x"), enc = try f.bytes("encoded")
        XCTAssertEqual(x.count, enc.count)
        var bad = 0
        for (v, e) in zip(x, enc) where floatToE4M3(v) != e {
            if bad < 10 {
                XCTFail(
                    "x=\(v) (0x\(String(v.bitPattern, radix: 16))): got "
                        + "0x\(String(floatToE4M3(v), radix: 16)) want 0x\(String(e, radix: 16))")
            }
            bad += 1
        }
        XCTAssertEqual(bad, 0)
    }

    func testE4M3SpecialValues() {
        XCTAssertEqual(floatToE4M3(.nan), 0x7F)
        XCTAssertEqual(floatToE4M3(1000), 0x7E)
        XCTAssertEqual(floatToE4M3(-1000), 0xFE)
        XCTAssertEqual(floatToE4M3(.infinity), 0x7E)
        XCTAssertEqual(floatToE4M3(464), 0x7E)  // tie above 448 saturates
        XCTAssertEqual(floatToE4M3(0.001953125), 0x01)  // 2^-9, min subnormal
        XCTAssertEqual(floatToE4M3(0.0009765625), 0x00)  // 2^-10: tie to even (0)
        XCTAssertEqual(floatToE4M3(0.0029296875), 0x02)  // 1.5·2^-9: tie to even (2)
        XCTAssertEqual(floatToE4M3(1.0625), 0x38)  // 1 + 1/16: tie to even → 1.0
        XCTAssertEqual(floatToE4M3(1.1875), 0x3A)  // 1 + 3/16: tie to even → 1.25
        XCTAssertEqual(floatToE4M3(-0.0), 0x80)
    }

    func testE5M2() {
        for c in 0..<256 {
            let b = UInt8(c)
            let v = e5m2ToFloat(b)
            if v.isNaN || v.isInfinite { continue }
            XCTAssertEqual(floatToE5M2(v), b, "code \(c)")
        }
        XCTAssertEqual(e5m2ToFloat(0x7B), 57344)
        XCTAssertEqual(floatToE5M2(1e6), 0x7B)
        XCTAssertEqual(floatToE5M2(-.infinity), 0xFB)
        XCTAssertEqual(floatToE5M2(.nan), 0x7F)
        XCTAssertEqual(e5m2ToFloat(0x01), 1.52587890625e-05)
        XCTAssertEqual(floatToE5M2(1.125), 0x3C)  // tie → even (1.0)
        XCTAssertEqual(floatToE5M2(1.375), 0x3E)  // tie → even (1.5)
        XCTAssertTrue(e5m2ToFloat(0x7C).isInfinite)
    }
}
