import QATCUDA
import QATCore
import QATModels
import QATQuant
import XCTest

/// The host side of QLoRA on the GPU, without a GPU: where each packed base lands in the device
/// arena (the kernels' data layout is `NVFP4.quantize`'s; `qat selftest --device cuda` checks the
/// decode itself against the CPU).
final class CUDALoRAHostTests: XCTestCase {
    /// Sizes are `NVFP4.quantize`'s (8 code bytes and 1 scale byte per 16-block of a row, padded
    /// rows included); every piece starts 256-byte aligned, none overlaps, the arena holds them all.
    func testPackedArenaLayoutHoldsEveryTensorAligned() {
        let shapes = [(rows: 40, cols: 64), (rows: 37, cols: 40), (rows: 3, cols: 7), (rows: 1, cols: 16), (rows: 512, cols: 1000)]
        for s in shapes {
            var g = SplitMix64(seed: UInt64(s.rows * s.cols))
            let x = (0..<(s.rows * s.cols)).map { _ in g.nextGaussian() }
            let q = NVFP4.quantize(x, rows: s.rows, cols: s.cols, globalAmax: 3)
            let b = NVFP4Layout.bytes(rows: s.rows, cols: s.cols)
            XCTAssertEqual(b.packed, q.packed.count, "\(s)")
            XCTAssertEqual(b.scales, q.scales.count, "\(s)")
        }
        XCTAssertEqual(NVFP4Layout.bytes(rows: 3, cols: 7).packed, 24)
        XCTAssertEqual(NVFP4Layout.bytes(rows: 3, cols: 17).scales, 6)
        let layout = NVFP4Layout(shapes: shapes)
        XCTAssertEqual(layout.entries.count, shapes.count)
        var pieces: [Range<Int>] = []
        for (e, s) in zip(layout.entries, shapes) {
            XCTAssertEqual(e.packedOffset % 256, 0)
            XCTAssertEqual(e.scalesOffset % 256, 0)
            XCTAssertEqual(e.packedBytes, NVFP4Layout.bytes(rows: s.rows, cols: s.cols).packed)
            XCTAssertEqual(e.scalesBytes, NVFP4Layout.bytes(rows: s.rows, cols: s.cols).scales)
            pieces += [e.packedOffset..<(e.packedOffset + e.packedBytes), e.scalesOffset..<(e.scalesOffset + e.scalesBytes)]
        }
        for (i, a) in pieces.enumerated() {
            XCTAssertLessThanOrEqual(a.upperBound, layout.totalBytes)
            for b in pieces[(i + 1)...] { XCTAssertFalse(a.overlaps(b), "\(a) overlaps \(b)") }
        }
        XCTAssertEqual(layout.totalBytes % 256, 0)
        // First tensor: 40 rows × 4 blocks → 1280 code bytes, then its 160 scale bytes at 1280.
        let first = layout.entries[0]
        XCTAssertEqual([first.packedOffset, first.packedBytes, first.scalesOffset, first.scalesBytes], [0, 1280, 1280, 160])
        XCTAssertEqual(layout.entries[1].packedOffset, 1536)
        XCTAssertEqual(NVFP4Layout(shapes: []).totalBytes, 0)
    }
}
