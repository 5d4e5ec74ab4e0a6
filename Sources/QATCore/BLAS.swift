import CBLAS
import Foundation

/// Row-major matrix products through OpenBLAS.
///
/// OpenBLAS itself runs single-threaded (set once, before the first product): a product
/// big enough to be worth it is split here over `Parallel.threads` workers along its larger
/// output dimension, each worker calling sgemm on its own block of C. Each element of C is
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
        // Split the larger output dimension into chunks of whole 16-blocks: two per worker
        // when each still has ≥ 128 rows/columns (so a worker slowed by other load is picked
        // up by the others), else one. Chunk boundaries depend only on the shape and thread
        // count; which worker computes a chunk does not change its values.
        let splitM = m >= n
        let dim = splitM ? m : n
        let blocks = (dim + 15) / 16
        let parts = min(blocks, dim / (2 * workers) >= 128 ? 2 * workers : workers)
        let ap = UncheckedBox(a), bp = UncheckedBox(b), cp = SendablePointer(c)
        Parallel.tasks(parts) { w in
            let s = min(dim, blocks * w / parts * 16), e = min(dim, blocks * (w + 1) / parts * 16)
            guard e > s else { return }
            if splitM {
                // Rows s..<e of op(A) and of C.
                let aOff = transA ? s : s * lda
                raw(transA, transB, e - s, n, k, alpha, ap.value + aOff, lda, bp.value, ldb, beta, cp.p + s * ldc, ldc)
            } else {
                // Columns s..<e of op(B) and of C.
                let bOff = transB ? s * ldb : s
                raw(transA, transB, m, e - s, k, alpha, ap.value, lda, bp.value + bOff, ldb, beta, cp.p + s, ldc)
            }
        }
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
        return "\(cfg.trimmingCharacters(in: .whitespaces)), core \(core)"
    }

    /// Sets the number of compute threads (`Parallel.threads`; 0 leaves it as configured).
    /// OpenBLAS stays single-threaded: products are split by `gemm` itself.
    public static func setThreads(_ n: Int) {
        _ = singleThreaded
        if n > 0 { Parallel.threads = n }
    }
}
