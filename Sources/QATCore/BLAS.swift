import CBLAS
import Foundation

/// Row-major matrix products through OpenBLAS.
///
/// OpenBLAS itself runs single-threaded (set once, before the first product): a product
/// big enough to be worth it is split here into a grid of blocks of C (see `grid`) handed to
/// `Parallel.threads` workers, each calling sgemm on its own block. Each element of C is
/// still one full-length dot product computed by one call, and the split depends only on
/// the shape and the thread count, so results are deterministic. Because OpenBLAS never
/// spawns work of its own, `gemm(..., parallel: false)` may be called from inside
/// `Parallel` workers (per-head attention products, for instance).
public enum BLAS {
    private static let singleThreaded: Void = { openblas_set_num_threads(1) }()

    /// Products below this many multiply-adds run on the calling thread.
    public static let parallelThreshold = 1 << 20

    /// C[M,N] = alpha * op(A) * op(B) + beta * C, row-major.
    /// op(A) is [M,K] (A stored [M,K], or [K,M] when transA); op(B) is [K,N] (B stored
    /// [K,N], or [N,K] when transB — the HF `[out, in]` weight layout). Leading dimensions
    /// default to contiguous rows; pass them to address a column block (one attention head).
    /// `parallel: false` keeps the product on the calling thread.
    @inline(__always)
    public static func gemm(
        transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
        alpha: Float = 1, a: UnsafePointer<Float>, lda: Int? = nil, b: UnsafePointer<Float>, ldb: Int? = nil,
        beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int? = nil, parallel: Bool = true
    ) {
        guard m > 0, n > 0, k > 0 else { return }
        _ = singleThreaded
        let lda = lda ?? (transA ? m : k), ldb = ldb ?? (transB ? k : n), ldc = ldc ?? n
        let workers = Parallel.threads
        if !parallel || workers <= 1 || m * n * k < parallelThreshold || max(m, n) < 32 {
            raw(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
            return
        }
        // Split C into a grid of pm × pn blocks of whole 16-rows/columns: two blocks per worker
        // when each still has ≥ 128 × 128 outputs (a worker slowed by other load is picked up by
        // the others), else one. Every block's sgemm packs its own rows of op(A) and columns of
        // op(B), so the grid is the one (of pm · pn = parts) that packs the least,
        // K · (M · pn + N · pm): a 1-D split at 16 threads would pack all of B 16 times.
        // Block boundaries depend only on the shape and thread count, and each element of C is
        // still one full-length dot product by one call: results do not depend on the threads.
        let policy = splitPolicy
        let (pm, pn) = grid(m: m, n: n, k: k, workers: workers, policy: policy)
        let g = policy.rowGranule, bm = (m + g - 1) / g, bn = (n + 15) / 16, parts = pm * pn
        let ap = UncheckedBox(a), bp = UncheckedBox(b), cp = SendablePointer(c)
        Parallel.tasks(parts) { w in
            let i = w / pn, j = w - i * pn
            let rs = min(m, bm * i / pm * g), re = min(m, bm * (i + 1) / pm * g)
            let cs = min(n, bn * j / pn * 16), ce = min(n, bn * (j + 1) / pn * 16)
            guard re > rs, ce > cs else { return }
            let aOff = transA ? rs : rs * lda, bOff = transB ? cs * ldb : cs
            raw(transA, transB, re - rs, ce - cs, k, alpha, ap.value + aOff, lda, bp.value + bOff, ldb, beta, cp.p + rs * ldc + cs, ldc)
        }
    }

    /// Multiply-adds every block of a split product keeps at least. OpenBLAS (0.3.x, AVX-512
    /// kernels: SkylakeX, Cooperlake, Sapphire Rapids) computes a product of at most 100³
    /// multiply-adds with its "small matrix" kernels and an NN product with alpha 1, beta 0 of
    /// under 28 · 512² with its "direct" kernel, both rounding differently from its packed
    /// kernels; a block that fell below either bound while the whole product did not would make
    /// the result depend on the thread count. Products above this are in neither regime, and so
    /// is every block.
    public static let minBlockWork = 7_500_000

    /// Where a product may be cut without changing any bit of C. OpenBLAS computes row-major C
    /// as its column-major transpose, so our rows are its N and our columns its M. On the AVX-512
    /// kernels (SkylakeX, Cooperlake, Sapphire Rapids) any cut at 16 rows or columns gives the
    /// whole product's bits. The Haswell kernels (also Zen's) sum an element differently
    /// depending on where it sits in the whole M range, so a cut between columns changes bits at
    /// any offset, while cuts between rows are exact at multiples of 12 (measured with OpenBLAS
    /// 0.3.21, NN/NT/TN, five shapes): there, and for any other kernel family, only rows are cut,
    /// at multiples of 48.
    public struct SplitPolicy: Sendable, Equatable {
        public var rowGranule: Int
        public var splitColumns: Bool
        public static let avx512 = SplitPolicy(rowGranule: 16, splitColumns: true)
        public static let rowsOnly = SplitPolicy(rowGranule: 48, splitColumns: false)
    }

    /// The split policy of the kernel family OpenBLAS runs on this machine.
    public static let splitPolicy: SplitPolicy = {
        ["skylakex", "cooperlake", "sapphirerapids"].contains(BLASCore.coreName.lowercased()) ? .avx512 : .rowsOnly
    }()

    /// The block grid (rows × columns of C) of a parallel product: pm · pn = 2 · workers blocks
    /// when each has ≥ 128 × 128 outputs, else `workers`, fewer when the 16-blocks run out or a
    /// block would do less than `minBlockWork`; of those, the factorization that packs the least
    /// (M · pn + N · pm). (1, 1): no split.
    ///
    /// A block count strictly between `workers` and 2 · `workers` is never chosen: p equal
    /// blocks take ⌈p / workers⌉ = 2 rounds of 1/p of the work, 2/p > 1/workers, so `workers`
    /// blocks (one round of 1/workers) finish first. At 16 workers, the k/v projections' dX
    /// (2,048 × 576 × 192) would otherwise be cut into 28 blocks (32 would fall below
    /// `minBlockWork`): 12 workers idle for the second round, 2/28 of the work on the critical
    /// path instead of 1/16 (14% longer). The count never changes a bit of C (see `gemm`).
    public static func grid(m: Int, n: Int, k: Int, workers: Int, policy: SplitPolicy = splitPolicy) -> (Int, Int) {
        let g = policy.rowGranule, bm = (m + g - 1) / g, bn = (n + 15) / 16
        // The smallest of `parts` blocks of whole granules (`size` each) over `dim` (`blocks` of them).
        func smallest(_ dim: Int, _ blocks: Int, _ parts: Int, _ size: Int) -> Int {
            var least = Int.max
            for i in 0..<parts { least = min(least, min(dim, blocks * (i + 1) / parts * size) - min(dim, blocks * i / parts * size)) }
            return least
        }
        guard m * n * k >= 2 * minBlockWork else { return (1, 1) }
        var target = m * n / (2 * workers) >= 128 * 128 ? 2 * workers : workers
        while target > 1 {
            var best: (Int, Int)?
            var bestCost = Int.max
            for pm in 1...target where target % pm == 0 {
                let pn = target / pm
                guard pm <= bm, pn <= bn, pn == 1 || policy.splitColumns,
                    smallest(m, bm, pm, g) * smallest(n, bn, pn, 16) * k >= minBlockWork
                else { continue }
                let cost = m * pn + n * pm
                if cost < bestCost { bestCost = cost; best = (pm, pn) }
            }
            if let b = best { return b }
            target = target > workers ? workers : target - 1
        }
        return (1, 1)
    }

    @inline(__always)
    static func raw(
        _ transA: Bool, _ transB: Bool, _ m: Int, _ n: Int, _ k: Int, _ alpha: Float,
        _ a: UnsafePointer<Float>, _ lda: Int, _ b: UnsafePointer<Float>, _ ldb: Int, _ beta: Float,
        _ c: UnsafeMutablePointer<Float>, _ ldc: Int
    ) {
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// OpenBLAS's build configuration and the kernel family it chose for this CPU.
    public static var configuration: String {
        let cfg = openblas_get_config().map { String(cString: $0) } ?? "?"
        let core = openblas_get_corename().map { String(cString: $0) } ?? "?"
        let forced = ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"].map { " (OPENBLAS_CORETYPE=\($0))" } ?? ""
        return "\(cfg.trimmingCharacters(in: .whitespaces)), core \(core)\(forced)"
    }

    /// Sets the number of compute threads (`Parallel.threads`; 0 leaves it as configured).
    /// OpenBLAS stays single-threaded: products are split by `gemm` itself.
    public static func setThreads(_ n: Int) {
        _ = singleThreaded
        if n > 0 { Parallel.threads = n }
    }
}
