import CBLAS

/// Row-major matrix products through OpenBLAS.
public enum BLAS {
    /// C[M,N] = alpha * op(A) * op(B) + beta * C, row-major.
    /// op(A) is [M,K] (A stored [M,K], or [K,M] when transA); op(B) is [K,N] (B stored
    /// [K,N], or [N,K] when transB — the HF `[out, in]` weight layout). Leading dimensions
    /// default to contiguous rows; pass them to address a column block (one attention head).
    @inline(__always)
    public static func gemm(
        transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int,
        alpha: Float = 1, a: UnsafePointer<Float>, lda: Int? = nil, b: UnsafePointer<Float>, ldb: Int? = nil,
        beta: Float = 0, c: UnsafeMutablePointer<Float>, ldc: Int? = nil
    ) {
        guard m > 0, n > 0, k > 0 else { return }
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha,
            a, Int32(lda ?? (transA ? m : k)), b, Int32(ldb ?? (transB ? k : n)), beta, c, Int32(ldc ?? n))
    }

    /// Sets OpenBLAS's thread count (0 leaves it as configured).
    public static func setThreads(_ n: Int) {
        if n > 0 { openblas_set_num_threads(Int32(n)) }
    }
}
