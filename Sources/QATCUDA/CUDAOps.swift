import CCUDA
import QATCore

/// Host-side wrappers of the kernels and of cuBLAS, one per layer operation, each taking
/// device pointers and shapes as the matching CPU kernel in Sources/QATModels/Layers does.
extension CUDADevice {
    /// C[n, out] = X[n, k] · W[out, k]ᵀ (+ beta · C): row-major, as `BLAS.gemm(transB: true)`.
    /// fp32: fp32 inputs, pedantic fp32 compute (no TF32). bf16: X and W are bf16 copies,
    /// accumulation fp32, C fp32, or bf16 (the fp32 sums rounded) when `c16`.
    func gemmXWt(
        n: Int, out: Int, k: Int, x: CUdeviceptr, w: CUdeviceptr, c: CUdeviceptr, bf16: Bool, beta: Float = 0, c16: Bool = false
    ) throws {
        guard bf16 || !c16 else { throw QATError.internal("gemmXWt: a bf16 output of an fp32 product") }
        var alpha: Float = 1, b = beta
        let type = bf16 ? Int32(QAT_CUDA_R_16BF) : Int32(QAT_CUDA_R_32F)
        let compute = bf16 ? Int32(QAT_CUBLAS_COMPUTE_32F) : Int32(QAT_CUBLAS_COMPUTE_32F_PEDANTIC)
        var s: Int32 = 0
        try timed(
            bf16 ? "gemm bf16 [\(n)x\(k)]x[\(out)x\(k)]\(c16 ? " →bf16" : "")" : "gemm fp32", flops: 2 * Double(n) * Double(out) * Double(k)
        ) {
            s = api.cublasGemmEx(
                blas, Int32(QAT_CUBLAS_OP_T), Int32(QAT_CUBLAS_OP_N), Int32(out), Int32(n), Int32(k),
                &alpha, UnsafeRawPointer(bitPattern: UInt(w)), type, Int32(k),
                UnsafeRawPointer(bitPattern: UInt(x)), type, Int32(k), &b,
                UnsafeMutableRawPointer(bitPattern: UInt(c)), c16 ? type : Int32(QAT_CUDA_R_32F), Int32(out), compute,
                Int32(QAT_CUBLAS_GEMM_DEFAULT))
        }
        if s != 0 { throw QATError("cuBLAS: gemm [\(n)×\(k)]·[\(out)×\(k)]ᵀ failed (status \(s))") }
        if kernels.syncEachLaunch { try synchronize() }
    }

    /// `count` bf16 products of one x [n, k] with weights w_i [out, k] at w + i·wStride (elements): c_i [n, out] at
    /// c + i·cStride (cuBLAS strided batched; x read with stride 0), fp32, or bf16 (the fp32 sums rounded) when `c16`.
    func gemmXWtBatched(
        n: Int, out: Int, k: Int, x: CUdeviceptr, w: CUdeviceptr, wStride: Int, c: CUdeviceptr, cStride: Int, count: Int, c16: Bool
    ) throws {
        var alpha: Float = 1, beta: Float = 0
        var s: Int32 = 0
        try timed(
            "gemm bf16 [\(n)x\(k)]x[\(out)x\(k)] ×\(count)\(c16 ? " →bf16" : "")",
            flops: 2 * Double(n) * Double(out) * Double(k) * Double(count)
        ) {
            s = api.cublasGemmStridedBatchedEx(
                blas, Int32(QAT_CUBLAS_OP_T), Int32(QAT_CUBLAS_OP_N), Int32(out), Int32(n), Int32(k),
                &alpha, UnsafeRawPointer(bitPattern: UInt(w)), Int32(QAT_CUDA_R_16BF), Int32(k), Int64(wStride),
                UnsafeRawPointer(bitPattern: UInt(x)), Int32(QAT_CUDA_R_16BF), Int32(k), 0, &beta,
                UnsafeMutableRawPointer(bitPattern: UInt(c)), Int32(c16 ? QAT_CUDA_R_16BF : QAT_CUDA_R_32F), Int32(out), Int64(cStride),
                Int32(count),
                Int32(QAT_CUBLAS_COMPUTE_32F), Int32(QAT_CUBLAS_GEMM_DEFAULT))
        }
        if s != 0 { throw QATError("cuBLAS: batched gemm \(count)×[\(n)×\(k)]·[\(out)×\(k)]ᵀ failed (status \(s))") }
        if kernels.syncEachLaunch { try synchronize() }
    }

    /// `roundBF16`: the rows' bf16 rounding (as fp32).
    func embedding(out: CUdeviceptr, tokens: CUdeviceptr, table: CUdeviceptr, n: Int, c: Int, roundBF16: Bool = false) throws {
        try kernels.launch(
            "embedding_forward", grid: (n, 1, 1), block: (min(256, max(32, c)), 1, 1),
            [.ptr(out), .ptr(tokens), .ptr(table), .i32(n), .i32(c), .i32(roundBF16 ? 1 : 0)])
    }

    /// out = the bf16 rounding of x (fp32, count floats; out may be x).
    func roundBF16(out: CUdeviceptr, _ x: CUdeviceptr, count: Int) throws {
        try kernels.launch1D("round_bf16", count, [.ptr(out), .ptr(x), .i64(count)])
    }

    /// `out16`: also write the output's bf16 copy there (the input of bf16 products). `warps`: short rows may run a
    /// warp per row (`rmsnormWarpRows`; false: the block kernel, which gives the same bits).
    func rmsnorm(
        out: CUdeviceptr, rstd: CUdeviceptr, inp: CUdeviceptr, weight: CUdeviceptr, n: Int, c: Int, eps: Float,
        out16: CUdeviceptr = 0, warps: Bool = true
    ) throws {
        let args: [KernelArg] = [.ptr(out), .ptr(rstd), .ptr(inp), .ptr(weight), .i32(n), .i32(c), .f32(eps), .ptr(out16)]
        if warps && Self.rmsnormWarpRows(c: c, [out, inp, weight], bf16: out16) {
            return try kernels.launch(
                "rmsnorm_forward_warps", grid: (Self.rmsnormWarpBlocks(n), 1, 1), block: (Self.rmsnormThreads, 1, 1), args)
        }
        try kernels.launch("rmsnorm_forward", grid: (max(1, n), 1, 1), block: (Self.rmsnormThreads, 1, 1), args)
    }

    /// Threads of the RMSNorm kernels' block (one block per row): RMS_THREADS of common.cu; and the float4s of its
    /// row each thread holds in registers (RMS_HELD).
    static let rmsnormThreads = 128, rmsnormHeld = 4
    /// The longest row the RMSNorm kernels run a warp per row (`_warps` in rmsnorm.cu): 32 lanes of a float4.
    public static let rmsnormWarpRow = 128

    /// Whether RMSNorm rows of c floats run a warp per row (the `_warps` kernels): rows of at most `rmsnormWarpRow`
    /// floats (a Qwen3 head's q/k norm) on the float4 path: c % 4 == 0, the fp32 arrays 16-byte aligned, the bf16
    /// copy 8-byte aligned with rows `bf16Stride` elements apart (a multiple of 4).
    public static func rmsnormWarpRows(c: Int, _ arrays: [CUdeviceptr], bf16: CUdeviceptr = 0, bf16Stride: Int? = nil) -> Bool {
        c > 0 && c % 4 == 0 && c <= rmsnormWarpRow && arrays.allSatisfy { $0 % 16 == 0 } && bf16 % 8 == 0 && (bf16Stride ?? c) % 4 == 0
    }

    /// Blocks of the `_warps` kernels for n rows (or runs of rows): a warp each, RMS_THREADS / 32 per block.
    static func rmsnormWarpBlocks(_ n: Int) -> Int { max(1, (n + rmsnormThreads / 32 - 1) / (rmsnormThreads / 32)) }

    /// bf16Out = bf16(NVFP4 fake quant of RMSNorm(inp)), in one pass: `rmsnorm` then `nvfp4FakeQuant(bf16Out:)`, bit
    /// for bit (the normalised rows are not stored); `rstd` (not 0) gets the rows' rstd as `rmsnorm` writes it. c % 16 == 0.
    func rmsnormNVFP4(
        bf16Out: CUdeviceptr, rstd: CUdeviceptr, inp: CUdeviceptr, weight: CUdeviceptr, n: Int, c: Int, eps: Float, globalAmax: Float,
        exportMode: Bool
    ) throws {
        guard c % 16 == 0 else { throw QATError.internal("rmsnorm_nvfp4 needs rows of whole 16-blocks (c = \(c))") }
        try kernels.launch(
            "rmsnorm_nvfp4", grid: (max(1, n), 1, 1), block: (Self.rmsnormThreads, 1, 1),
            [
                .ptr(bf16Out), .ptr(rstd), .ptr(inp), .ptr(weight), .i32(n), .i32(c), .f32(eps), .f32(globalAmax),
                .i32(exportMode ? 1 : 0),
            ])
    }

    /// RoPE in place (sign -1: its backward); `x16` (not 0): the result's bf16 copy too.
    /// `x16Stride`: elements from one row of the bf16 copy to the next (nil: heads·headDim, contiguous).
    func rope(
        _ x: CUdeviceptr, cos: CUdeviceptr, sin: CUdeviceptr, rows: Int, seqLen: Int, heads: Int, headDim: Int, sign: Float = 1,
        x16: CUdeviceptr = 0, x16Stride: Int? = nil
    ) throws {
        try kernels.launch1D(
            "rope_apply", rows * heads * headDim / 2,
            [
                .ptr(x), .ptr(cos), .ptr(sin), .i32(rows), .i32(seqLen), .i32(heads), .i32(headDim), .f32(sign), .ptr(x16),
                .i64(x16Stride ?? heads * headDim),
            ])
    }

    func add(_ a: CUdeviceptr, _ b: CUdeviceptr, count: Int) throws {
        try kernels.launch1D("add_inplace", count, [.ptr(a), .ptr(b), .i64(count)])
    }

    func addBias(_ out: CUdeviceptr, bias: CUdeviceptr, rows: Int, cols: Int) throws {
        try kernels.launch1D("add_bias", rows * cols, [.ptr(out), .ptr(bias), .i64(rows * cols), .i32(cols)])
    }

    /// out (fp32, when not 0) and/or out16 (its bf16 copy) = silu(gate)·up; `in16`: gate and up are bf16.
    func swiglu(out: CUdeviceptr, gate: CUdeviceptr, up: CUdeviceptr, count: Int, out16: CUdeviceptr = 0, in16: Bool) throws {
        try kernels.launch1D(
            "swiglu_forward", count, [.ptr(out), .ptr(gate), .ptr(up), .i64(count), .ptr(out16), .i32(in16 ? 1 : 0)])
    }

    func toBF16(out: CUdeviceptr, _ x: CUdeviceptr, count: Int) throws {
        try kernels.launch1D("to_bf16", count, [.ptr(out), .ptr(x), .i64(count)])
    }

    /// The bf16 copy of an fp32 [rows, cols] matrix into rows `stride` elements apart.
    func toBF16(out: CUdeviceptr, stride: Int, _ x: CUdeviceptr, rows: Int, cols: Int) throws {
        try kernels.launch1D("to_bf16_rows", rows * cols, [.ptr(out), .ptr(x), .i64(rows), .i32(cols), .i64(stride)])
    }

    /// NVFP4 fake quant into `out` (fp32), or with `bf16Out` into its bf16 rounding instead.
    func nvfp4FakeQuant(
        _ x: CUdeviceptr, out: CUdeviceptr, bf16Out: CUdeviceptr = 0, rows: Int, cols: Int, globalAmax: Float,
        exportMode: Bool
    ) throws {
        try kernels.launch1D(
            Self.nvfp4Quads(cols: cols, [x, out], bf16Out) ? "nvfp4_fake_quant_quads" : "nvfp4_fake_quant",
            Self.nvfp4Threads(rows: rows, cols: cols),
            [.ptr(x), .ptr(out), .ptr(bf16Out), .i64(rows), .i32(cols), .f32(globalAmax), .i32(exportMode ? 1 : 0)])
    }

    /// Threads of the NVFP4 kernels' grid-stride loops: four per 16-block (a float4 each, `nvfp4_quad`).
    static func nvfp4Threads(rows: Int, cols: Int) -> Int { 4 * rows * ((cols + 15) / 16) }

    /// Whether an NVFP4 kernel's `_quads` form applies (quant.cu): rows of whole 16-blocks, the fp32 arrays 16-byte
    /// aligned and the bf16 one 8-byte aligned (a null pointer counts as aligned), as the kernel itself would check.
    static func nvfp4Quads(cols: Int, _ fp32: [CUdeviceptr], _ bf16: CUdeviceptr) -> Bool {
        cols % 16 == 0 && fp32.allSatisfy { $0 % 16 == 0 } && bf16 % 8 == 0
    }

    /// bf16Out = bf16(NVFP4 fake quant of silu(gate)·up) from bf16 gate and up, in one pass: `swiglu(in16: true)` then
    /// `nvfp4FakeQuant(bf16Out:)`, bit for bit.
    func swigluNVFP4(gate: CUdeviceptr, up: CUdeviceptr, bf16Out: CUdeviceptr, rows: Int, cols: Int, globalAmax: Float, exportMode: Bool)
        throws
    {
        try kernels.launch1D(
            Self.nvfp4Quads(cols: cols, [gate, up], bf16Out) ? "swiglu_nvfp4_quads" : "swiglu_nvfp4",
            Self.nvfp4Threads(rows: rows, cols: cols),
            [.ptr(gate), .ptr(up), .ptr(bf16Out), .i64(rows), .i32(cols), .f32(globalAmax), .i32(exportMode ? 1 : 0)])
    }

    func fp8FakeQuant(_ x: CUdeviceptr, out: CUdeviceptr, count: Int, amax: Float) throws {
        try kernels.launch1D("fp8_fake_quant", count, [.ptr(x), .ptr(out), .i64(count), .f32(amax)])
    }

    func int8FakeQuant(_ x: CUdeviceptr, out: CUdeviceptr, count: Int, amax: Float) throws {
        try kernels.launch1D("int8_fake_quant", count, [.ptr(x), .ptr(out), .i64(count), .f32(amax)])
    }

    /// slot (a u32 holding a float's bits) = max(slot, max |x|).
    func absMax(_ x: CUdeviceptr, count: Int, slot: CUdeviceptr) throws {
        try kernels.launch1D("absmax_reduce", count, [.ptr(x), .i64(count), .ptr(slot)])
    }

    func crossEntropyRows(rowLoss: CUdeviceptr, logits: CUdeviceptr, targets: CUdeviceptr, rows: Int, vocab: Int) throws {
        try kernels.launch(
            "cross_entropy_rows", grid: (rows, 1, 1), block: (512, 1, 1),
            [.ptr(rowLoss), .ptr(logits), .ptr(targets), .i32(rows), .i32(vocab)])
    }
}
