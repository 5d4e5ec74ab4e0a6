import QATCore
import XCTest

/// The peak-memory helper the benchmarks use: each measured stretch shows its own peak, not the
/// process's high-water mark from an earlier, larger one.
final class PeakMemoryTests: XCTestCase {
    /// Allocates `bytes` and writes one byte per page, so every page becomes resident.
    private func touched(_ bytes: Int) -> UnsafeMutableRawPointer {
        let p = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        for i in stride(from: 0, to: bytes, by: 4096) {
            p.storeBytes(of: UInt8(truncatingIfNeeded: i >> 12 | 1), toByteOffset: i, as: UInt8.self)
        }
        return p
    }

    func testResetMakesASmallerLaterPeakVisible() throws {
        try XCTSkipUnless(PeakMemory.canReset, "no /proc/self/clear_refs on this system")
        let mb = 1_000_000
        // 200 MB touched: the reading sees all of it.
        let big = PeakMemory.measure { () -> Int in
            let p = touched(200 * mb)
            defer { p.deallocate() }
            return Int(p.load(fromByteOffset: 4096, as: UInt8.self))
        }
        let first = try XCTUnwrap(big.peakBytes)
        XCTAssertGreaterThanOrEqual(first, 190 * mb)  // the kernel updates its RSS counters lazily: within 5%
        // Reset, then 20 MB touched: the reading is that run's own peak, not the 200 MB one.
        let small = PeakMemory.measure { () -> Int in
            let p = touched(20 * mb)
            defer { p.deallocate() }
            return Int(p.load(fromByteOffset: 4096, as: UInt8.self))
        }
        let second = try XCTUnwrap(small.peakBytes)
        XCTAssertLessThan(second, 100 * mb, "the 200 MB high-water mark survived the reset")
        XCTAssertGreaterThanOrEqual(second, 19 * mb)
    }

    func testStatusFieldsAreReadable() throws {
        try XCTSkipUnless(FileManager.default.fileExists(atPath: "/proc/self/status"), "no /proc on this system")
        let rss = try XCTUnwrap(PeakMemory.residentBytes()), hwm = try XCTUnwrap(PeakMemory.highWaterBytes())
        XCTAssertGreaterThan(rss, 1 << 20)
        XCTAssertGreaterThanOrEqual(hwm, rss)
    }
}
