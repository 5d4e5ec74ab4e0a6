import QATCore
import XCTest

final class HalfCodecTests: XCTestCase {
    func testBF16RoundHalfToEven() {
        // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties go to even (1.0).
        XCTAssertEqual(bf16ToFloat(floatToBF16(1 + 1.0 / 256)), 1.0)
        // 1 + 3·2^-8 is halfway between 1.0078125 and 1.015625: ties go to even (1.015625).
        XCTAssertEqual(bf16ToFloat(floatToBF16(1 + 3.0 / 256)), 1.015625)
        XCTAssertEqual(floatToBF16(-2.5), 0xC020)
        XCTAssertTrue(bf16ToFloat(floatToBF16(.nan)).isNaN)
        XCTAssertEqual(bf16ToFloat(floatToBF16(.infinity)), .infinity)
    }

    func testF16RoundTrip() {
        for h: UInt16 in [0x3C00, 0xC000, 0x7BFF, 0x0001, 0x8400] {
            XCTAssertEqual(floatToF16(f16ToFloat(h)), h)
        }
        XCTAssertEqual(f16ToFloat(0x3C00), 1.0)
    }

    func testGemmTransposes() {
        // A [2,3], B stored [N=2, K=3] (HF weight layout): C = A·Bᵀ.
        let a: [Float] = [1, 2, 3, 4, 5, 6]
        let b: [Float] = [1, 0, 1, 0, 1, 0]
        var c = [Float](repeating: 0, count: 4)
        BLAS.gemm(transB: true, m: 2, n: 2, k: 3, a: a, b: b, c: &c)
        XCTAssertEqual(c, [4, 2, 10, 5])
    }
}
