import QATCUDA
import QATCore
import QATQuant
import XCTest

/// The selftest's NVFP4 flip diagnostic (`CUDASelftest.nvfp4Flips`) without a GPU: a code
/// that differs because its value moved one ulp across a rounding boundary is a flip; one
/// whose value moved far is not, and neither is a block scale moved by more than a few ulps.
final class NVFP4FlipTests: XCTestCase {
    let rows = 4, cols = 32

    /// Blocks whose max is 6 under a global amax of 6: the block scale is 448 · 6/2688 = 1, so
    /// values are their own E2M1 units (0.75 is the boundary between codes 0.5 and 1).
    func base() -> [Float] {
        var x = [Float](repeating: 0.1, count: rows * cols)
        for r in 0..<rows { for b in 0..<(cols / 16) { x[r * cols + b * 16] = 6 } }
        return x
    }

    func testIdenticalInputsHaveNoFlips() {
        let x = base()
        let f = CUDASelftest.nvfp4Flips(cpu: x, gpu: x, rows: rows, cols: cols, globalAmax: 6)
        XCTAssertEqual(f.codes, 0); XCTAssertEqual(f.scaleFlips, 0); XCTAssertEqual(f.notNearBoundary, 0)
    }

    func testOneUlpAcrossABoundaryIsAFlip() {
        var x = base(), y = base()
        x[3] = Float(0.75).nextDown; y[3] = Float(0.75).nextUp  // 0.5 vs 1.0
        x[20] = Float(2.5).nextDown; y[20] = Float(2.5).nextUp  // 2 vs 3
        x[40] = 1e-9; y[40] = -1e-9  // the sign of a zero code
        let f = CUDASelftest.nvfp4Flips(cpu: x, gpu: y, rows: rows, cols: cols, globalAmax: 6)
        XCTAssertEqual(f.codes, 3)
        XCTAssertEqual(f.notNearBoundary, 0)
        XCTAssertEqual(f.scaleFlips, 0)
    }

    func testAFarMoveIsNotAFlip() {
        var x = base(), y = base()
        x[3] = 0.5; y[3] = 1.0  // a different code, but not by rounding
        let f = CUDASelftest.nvfp4Flips(cpu: x, gpu: y, rows: rows, cols: cols, globalAmax: 6)
        XCTAssertEqual(f.codes, 1)
        XCTAssertEqual(f.notNearBoundary, 1)
    }

    func testBlockScaleChanges() {
        var x = base(), y = base()
        y[16] = 3  // the second block's max halves: its scale changes, far from a rounding edge
        var f = CUDASelftest.nvfp4Flips(cpu: x, gpu: y, rows: rows, cols: cols, globalAmax: 6)
        XCTAssertEqual(f.scaleFlips, 1)
        XCTAssertEqual(f.notNearBoundary, 1)
        // Two block maxima one ulp apart on either side of an E4M3 rounding edge (bisection
        // between 5.5 and 5.9, whose scales are 416 and 448 times the global scale).
        func scale(_ v: Float) -> UInt8 {
            NVFP4.quantize([v] + [Float](repeating: 0.1, count: 15), rows: 1, cols: 16, globalAmax: 6).scales[0]
        }
        var lo: Float = 5.5, hi: Float = 5.9
        XCTAssertNotEqual(scale(lo), scale(hi))
        while lo.nextUp < hi {
            let mid = (lo + hi) / 2
            if scale(mid) == scale(lo) { lo = mid } else { hi = mid }
        }
        x = base(); y = base()
        x[16] = lo; y[16] = hi
        f = CUDASelftest.nvfp4Flips(cpu: x, gpu: y, rows: rows, cols: cols, globalAmax: 6)
        XCTAssertEqual(f.scaleFlips, 1)
        XCTAssertEqual(f.notNearBoundary, 0)
    }
}
