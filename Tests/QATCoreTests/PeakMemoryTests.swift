import Foundation
import QATCore
import XCTest

/// The peak-memory helper the benchmarks use: each measured stretch shows its own peak, not the
/// process's high-water mark from an earlier, larger one.
final class PeakMemoryTests: XCTestCase {
    /// Maps `bytes` of fresh anonymous memory and writes one byte per page, so every page becomes
    /// resident. (mmap, not malloc: after a large free glibc raises its mmap threshold and serves
    /// the next allocation from heap pages that may already be resident, which a reading would
    /// not count.)
    private func touched(_ bytes: Int, _ body: (UnsafeMutableRawPointer) -> Int) -> Int {
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            XCTFail("mmap of \(bytes) bytes failed")
            return 0
        }
        defer { munmap(p, bytes) }
        for i in stride(from: 0, to: bytes, by: 4096) {
            p.storeBytes(of: UInt8(truncatingIfNeeded: i >> 12 | 1), toByteOffset: i, as: UInt8.self)
        }
        return body(p)
    }

    func testResetMakesASmallerLaterPeakVisible() throws {
        try XCTSkipUnless(PeakMemory.canReset, "no /proc/self/clear_refs on this system")
        let mb = 1_000_000
        // 200 MB touched: the reading sees all of it.
        let big = PeakMemory.measure { () -> Int in
            touched(200 * mb) { Int($0.load(fromByteOffset: 4096, as: UInt8.self)) }
        }
        let first = try XCTUnwrap(big.peakBytes)
        XCTAssertGreaterThanOrEqual(first, 190 * mb)  // the kernel updates its RSS counters lazily: within 5%
        // Reset, then 20 MB touched: the reading is that run's own peak, not the 200 MB one.
        let small = PeakMemory.measure { () -> Int in
            touched(20 * mb) { Int($0.load(fromByteOffset: 4096, as: UInt8.self)) }
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
