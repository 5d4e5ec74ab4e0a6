import Foundation
import QATCore
import XCTest

/// The worker pool and the split products: every task runs exactly once, nested and concurrent
/// regions still run every task, and matrix products are bit-identical whatever the thread
/// count (up to 16, more threads than this machine has cores, so the grids of a 16-core host
/// are the ones checked).
final class ParallelTests: XCTestCase {
    override func tearDown() { Parallel.threads = Parallel.availableCores }

    func testEveryIndexOnceForAnyThreadCount() {
        for t in [1, 2, 3, 5, 8, 16] {
            Parallel.threads = t
            for n in [1, 7, 100, 40_000, 100_003] {
                var hits = [Int32](repeating: 0, count: n)
                hits.withUnsafeMutableBufferPointer { hb in
                    let h = SendablePointer(hb.baseAddress!)
                    Parallel.forRange(n, costPerItem: 1) { s, e in for i in s..<e { h.p[i] += 1 } }
                }
                XCTAssertTrue(hits.allSatisfy { $0 == 1 }, "forRange threads \(t) n \(n)")
                var dyn = [Int32](repeating: 0, count: n)
                dyn.withUnsafeMutableBufferPointer { hb in
                    let h = SendablePointer(hb.baseAddress!)
                    Parallel.forEachDynamic(n) { _, i in h.p[i] += 1 }
                }
                XCTAssertTrue(dyn.allSatisfy { $0 == 1 }, "forEachDynamic threads \(t) n \(n)")
            }
        }
    }

    func testRangeChunksPerWorker() {
        // Four chunks per worker where each keeps ≥ 16k operations (a SmolLM2 weight's 55,296
        // NVFP4 blocks at cost 64), fewer where they would be smaller, never fewer than the
        // workers nor more than the items.
        XCTAssertEqual(Parallel.rangeChunks(55_296, costPerItem: 64, workers: 16), 64)
        XCTAssertEqual(Parallel.rangeChunks(55_296, costPerItem: 64, workers: 2), 8)
        XCTAssertEqual(Parallel.rangeChunks(40_000, costPerItem: 1, workers: 16), 16)
        XCTAssertEqual(Parallel.rangeChunks(500_000, costPerItem: 1, workers: 16), 30)  // ⌊500,000 / 16,384⌋
        XCTAssertEqual(Parallel.rangeChunks(3, costPerItem: 100_000, workers: 16), 3)
        XCTAssertEqual(Parallel.rangeChunks(1 << 40, costPerItem: 1 << 30, workers: 8), 32)  // no overflow
        // The chunks cover every item once, in order (forRange with 4 chunks per worker).
        Parallel.threads = 3
        var seen = [Int](repeating: 0, count: 100_003)
        seen.withUnsafeMutableBufferPointer { sb in
            let p = SendablePointer(sb.baseAddress!)
            Parallel.forRange(100_003, costPerItem: 4) { s, e in for i in s..<e { p.p[i] += 1 } }
        }
        XCTAssertTrue(seen.allSatisfy { $0 == 1 })
    }

    func testNestedAndConcurrentRegions() {
        Parallel.threads = 4
        let n = 64, inner = 50_000
        var out = [Double](repeating: 0, count: n)
        out.withUnsafeMutableBufferPointer { ob in
            let o = SendablePointer(ob.baseAddress!)
            Parallel.forEachDynamic(n) { _, i in
                // A region inside a task runs serially on that thread.
                var partial = [Double](repeating: 0, count: 4)
                partial.withUnsafeMutableBufferPointer { pb in
                    let p = SendablePointer(pb.baseAddress!)
                    Parallel.forWorkers(inner, costPerItem: 8, maxWorkers: 4) { w, s, e in
                        for k in s..<e { p.p[w] += Double(k % 7) }
                    }
                }
                o.p[i] = partial.reduce(0, +) + Double(i)
            }
        }
        let expected = (0..<inner).reduce(0.0) { $0 + Double($1 % 7) }
        for i in 0..<n { XCTAssertEqual(out[i], expected + Double(i)) }
        // Two threads entering regions at once: one gets the pool, the other runs serially.
        let group = DispatchGroup()
        let sums = SendablePointer(UnsafeMutablePointer<Int>.allocate(capacity: 2))
        defer { sums.p.deallocate() }
        for c in 0..<2 {
            DispatchQueue.global().async(group: group) {
                var total = 0
                for _ in 0..<200 {
                    var hits = [Int](repeating: 0, count: 10_000)
                    hits.withUnsafeMutableBufferPointer { hb in
                        let h = SendablePointer(hb.baseAddress!)
                        Parallel.forRange(10_000, costPerItem: 16) { s, e in for i in s..<e { h.p[i] = i } }
                    }
                    total += hits.reduce(0, +)
                }
                sums.p[c] = total
            }
        }
        group.wait()
        XCTAssertEqual(sums.p[0], 200 * (10_000 * 9_999 / 2))
        XCTAssertEqual(sums.p[1], 200 * (10_000 * 9_999 / 2))
    }

    func testProductsBitIdenticalForAnyThreadCount() {
        // (m, n, k, transA, transB, alpha, beta): the model's products (forward x·Wᵀ, dX = dy·W,
        // dW = dyᵀ·x) at fortune-lm sizes, and sizes whose blocks would fall into OpenBLAS's
        // small-matrix (≤ 100³) or direct (NN, alpha 1, beta 0, < 28·512²) kernels if split finely.
        let shapes: [(Int, Int, Int, Bool, Bool, Float, Float)] = [
            (512, 704, 256, false, true, 1, 0), (512, 256, 704, false, false, 1, 0), (704, 256, 512, true, false, 1, 0),
            (256, 256, 512, true, false, 1, 1), (333, 190, 97, false, true, 0.5, 1), (100, 1000, 64, false, false, 0.5, 1),
            (100, 1000, 64, false, false, 1, 0), (2048, 128, 256, false, false, 1, 0), (48, 2048, 96, true, true, 1, 0),
        ]
        var rng = SystemRandomNumberGenerator()
        for (m, n, k, ta, tb, alpha, beta) in shapes {
            let a = (0..<(m * k)).map { _ in Float.random(in: -1...1, using: &rng) }
            let b = (0..<(k * n)).map { _ in Float.random(in: -1...1, using: &rng) }
            let c0 = (0..<(m * n)).map { _ in Float.random(in: -1...1, using: &rng) }
            func product(_ threads: Int) -> [Float] {
                Parallel.threads = threads
                var c = c0
                a.withUnsafeBufferPointer { ap in
                    b.withUnsafeBufferPointer { bp in
                        c.withUnsafeMutableBufferPointer { cp in
                            BLAS.gemm(
                                transA: ta, transB: tb, m: m, n: n, k: k, alpha: alpha, a: ap.baseAddress!, b: bp.baseAddress!,
                                beta: beta, c: cp.baseAddress!)
                        }
                    }
                }
                return c
            }
            let one = product(1)
            for t in [2, 3, 4, 6, 8, 12, 16, 32] {
                let other = product(t)
                XCTAssertTrue(
                    one.elementsEqual(other) { $0.bitPattern == $1.bitPattern },
                    "gemm \(m)×\(n)×\(k) transA \(ta) transB \(tb) alpha \(alpha) beta \(beta): \(t) threads differ from 1")
            }
        }
    }

    func testGridPacksLeastAndKeepsBlocksLarge() {
        let wide = BLAS.SplitPolicy.avx512, rows = BLAS.SplitPolicy.rowsOnly
        XCTAssertTrue(BLAS.grid(m: 256, n: 256, k: 2048, workers: 16, policy: wide) == (4, 4))
        XCTAssertTrue(BLAS.grid(m: 2048, n: 704, k: 256, workers: 2, policy: wide) == (4, 1))
        XCTAssertTrue(BLAS.grid(m: 2048, n: 128, k: 256, workers: 16, policy: wide) == (8, 1))  // 8.4 M multiply-adds per block
        XCTAssertTrue(BLAS.grid(m: 100, n: 1000, k: 64, workers: 16, policy: wide) == (1, 1))  // 6.4 M in all: not split
        XCTAssertTrue(BLAS.grid(m: 256, n: 256, k: 2048, workers: 16, policy: rows) == (6, 1))  // rows only, 48-row cuts
        // SmolLM2's k/v dX at 16 workers: 32 blocks would fall below minBlockWork, and 28 (two
        // rounds, 12 workers idle in the second) would finish after 16 (one round).
        XCTAssertTrue(BLAS.grid(m: 2048, n: 576, k: 192, workers: 16, policy: wide) == (8, 2))
        XCTAssertTrue(BLAS.grid(m: 2048, n: 576, k: 384, workers: 16, policy: wide) == (8, 4))  // 32 fit
        // The lm_head's products of a 512-row cross-entropy chunk (V = 49,152, C = 576).
        XCTAssertTrue(BLAS.grid(m: 512, n: 49152, k: 576, workers: 16, policy: wide) == (1, 32))
        XCTAssertTrue(BLAS.grid(m: 512, n: 576, k: 49152, workers: 16, policy: wide) == (4, 4))
        XCTAssertTrue(BLAS.grid(m: 49152, n: 576, k: 512, workers: 16, policy: wide) == (32, 1))
        for policy in [wide, rows] {
            for (m, n, k) in [
                (2048, 256, 256), (576, 1536, 2048), (49152, 576, 2048), (333, 190, 970), (2048, 576, 192), (2048, 192, 576),
                (192, 576, 2048), (512, 576, 49152), (85, 576, 49152),
            ] {
                for w in [2, 3, 8, 12, 16, 64] {
                    let (pm, pn) = BLAS.grid(m: m, n: n, k: k, workers: w, policy: policy)
                    XCTAssertLessThanOrEqual(pm * pn, 2 * w)
                    XCTAssertTrue(pm * pn <= w || pm * pn == 2 * w, "\(m)×\(n)×\(k) at \(w): \(pm * pn) blocks, two uneven rounds")
                    XCTAssertTrue(pn == 1 || policy.splitColumns)
                    // Every block as BLAS.gemm cuts it: whole granules, bm · i / pm of them before block i.
                    func sizes(_ dim: Int, _ parts: Int, _ g: Int) -> [Int] {
                        let blocks = (dim + g - 1) / g
                        return (0..<parts).map { min(dim, blocks * ($0 + 1) / parts * g) - min(dim, blocks * $0 / parts * g) }
                    }
                    if pm * pn > 1 {
                        XCTAssertGreaterThanOrEqual(
                            sizes(m, pm, policy.rowGranule).min()! * sizes(n, pn, 16).min()! * k, BLAS.minBlockWork,
                            "\(m)×\(n)×\(k) at \(w)")
                    }
                }
            }
        }
    }
}

/// OpenBLAS kernel families chosen from CPU flags where OpenBLAS's own detection fell back.
final class BLASCoreTests: XCTestCase {
    func testBestCoreFromFlags() {
        let avx512: Set<String> = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
        XCTAssertEqual(BLASCore.bestCore(flags: avx512.union(["avx512_bf16"])), "Cooperlake")  // Emerald Rapids, Zen 4
        XCTAssertEqual(BLASCore.bestCore(flags: avx512), "SkylakeX")
        XCTAssertEqual(BLASCore.bestCore(flags: ["avx2", "fma", "avx512f"]), "Haswell")  // AVX-512 without BW/VL/DQ
        XCTAssertNil(BLASCore.bestCore(flags: ["sse4_2", "avx"]))
        XCTAssertFalse(BLASCore.coreName.isEmpty)
    }
}
