import CCUDA
import QATCore
import QATModels

/// Host-side wrappers of the backward, loss and optimizer kernels (training), next to the
/// forward ones in CUDAOps.swift.
extension CUDADevice {
    /// Row-major C[m, n] = alpha · op(A) · op(B) + beta · C, op(X) = Xᵀ when trans. A is [m, k]
    /// (or [k, m] with transA), B is [k, n] (or [n, k]); lda/ldb/ldc are row strides. bf16: A and
    /// B are bf16, accumulation and C fp32 (C bf16 when `c16`: the fp32 sums rounded); otherwise fp32 without TF32.
    func gemm(
        transA: Bool = false, transB: Bool = false, m: Int, n: Int, k: Int, a: CUdeviceptr, lda: Int, b: CUdeviceptr, ldb: Int,
        c: CUdeviceptr, ldc: Int, alpha: Float = 1, beta: Float = 0, bf16: Bool, c16: Bool = false
    ) throws {
        if c16 && !bf16 { throw QATError.internal("gemm: a bf16 output needs bf16 operands") }
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and a row-major X is its
        // column-major transpose: so cuBLAS gets (B, A) with the same transpose flags.
        var al = alpha, be = beta
        let type = bf16 ? Int32(QAT_CUDA_R_16BF) : Int32(QAT_CUDA_R_32F)
        let compute = bf16 ? Int32(QAT_CUBLAS_COMPUTE_32F) : Int32(QAT_CUBLAS_COMPUTE_32F_PEDANTIC)
        var s: Int32 = 0
        // (Profile label: the row-major product C[m×n] = op(A)·op(B) over k, ᵀ marking a transposed operand, +C when accumulating.)
        let flops = 2 * Double(m) * Double(n) * Double(k)
        try timed(
            bf16
                ? "gemm bf16 bwd [\(m)x\(n)] k=\(k) A\(transA ? "ᵀ" : "")B\(transB ? "ᵀ" : "")"
                    + "\(beta != 0 ? " +C" : "")\(c16 ? " →bf16" : "")"
                : "gemm fp32 (backward)",
            flops: flops
        ) {
            s = api.cublasGemmEx(
                blas, Int32(transB ? QAT_CUBLAS_OP_T : QAT_CUBLAS_OP_N), Int32(transA ? QAT_CUBLAS_OP_T : QAT_CUBLAS_OP_N),
                Int32(n), Int32(m), Int32(k), &al, UnsafeRawPointer(bitPattern: UInt(b)), type, Int32(ldb),
                UnsafeRawPointer(bitPattern: UInt(a)), type, Int32(lda), &be,
                UnsafeMutableRawPointer(bitPattern: UInt(c)), Int32(c16 ? QAT_CUDA_R_16BF : QAT_CUDA_R_32F), Int32(ldc), compute,
                Int32(QAT_CUBLAS_GEMM_DEFAULT))
        }
        if s != 0 { throw QATError("cuBLAS: gemm [\(m)×\(k)]·[\(k)×\(n)] (transA \(transA), transB \(transB)) failed (status \(s))") }
        if kernels.syncEachLaunch { try synchronize() }
    }

    /// RMSNorm backward: dinp (+)= dx; `dinp16` (not 0): dinp's new values in bf16 too, row r at (r / group)·stride +
    /// (r % group)·c when `dinp16Rows` is given (else contiguous). `weightGradient`: the weight's
    /// gradient accumulated too (Σ_rows dout·(inp·rstd)) through `scratch` (`rmsnormBackwardScratch` floats): in the
    /// same pass over the rows (`rmsnorm_backward_dw`) on the float4 path with rows of up to 4·RMS_HELD·RMS_THREADS =
    /// 2048 floats, else by `columnSum` before the backward (which may write over dout). Short rows run a warp per row
    /// (`rmsnormWarpRows`) unless `warps` is false: the same dinp bits; the weight gradient's partial sums then cover
    /// `rmsnormWarpGradientRows` rows each.
    func rmsnormBackward(
        dinp: CUdeviceptr, dout: CUdeviceptr, inp: CUdeviceptr, weight: CUdeviceptr, rstd: CUdeviceptr, n: Int, c: Int,
        accumulate: Bool, dinp16: CUdeviceptr = 0, dinp16Rows: (group: Int, stride: Int)? = nil,
        weightGradient: (out: CUdeviceptr, scratch: CUdeviceptr)? = nil, warps: Bool = true
    ) throws {
        let args: [KernelArg] = [
            .ptr(dinp), .ptr(dout), .ptr(inp), .ptr(weight), .ptr(rstd), .i32(n), .i32(c), .i32(accumulate ? 1 : 0), .ptr(dinp16),
            .i32(dinp16Rows?.group ?? 1), .i64(dinp16Rows?.stride ?? c),
        ]
        let warpRows = warps && Self.rmsnormWarpRows(c: c, [dinp, dout, inp, weight], bf16: dinp16, bf16Stride: dinp16Rows?.stride)
        let block = (Self.rmsnormThreads, 1, 1)
        if let (out, scratch) = weightGradient {
            let float4Path =
                c % 4 == 0 && c <= 4 * Self.rmsnormHeld * Self.rmsnormThreads && [dinp, dout, inp, weight].allSatisfy { $0 % 16 == 0 }
            guard float4Path && dinp16 % 8 == 0 && (dinp16Rows?.stride ?? c) % 4 == 0 && n > 0 else {
                try columnSum(out: out, a: dout, b: inp, rowScale: rstd, n: n, c: c, scratch: scratch)
                return try rmsnormBackward(
                    dinp: dinp, dout: dout, inp: inp, weight: weight, rstd: rstd, n: n, c: c, accumulate: accumulate, dinp16: dinp16,
                    dinp16Rows: dinp16Rows, warps: warps)
            }
            if warpRows {
                let rows = Self.rmsnormWarpGradientRows(n), runs = (n + rows - 1) / rows
                try kernels.launch(
                    "rmsnorm_backward_dw_warps", grid: (Self.rmsnormWarpBlocks(runs), 1, 1), block: block,
                    args + [.ptr(scratch), .i32(rows)])
                return try columnSumFinish(out: out, partials: scratch, blocks: runs, c: c)
            }
            let rows = Self.rmsnormWeightGradientRows(n), blocks = (n + rows - 1) / rows
            try kernels.launch("rmsnorm_backward_dw", grid: (blocks, 1, 1), block: block, args + [.ptr(scratch), .i32(rows)])
            return try columnSumFinish(out: out, partials: scratch, blocks: blocks, c: c)
        }
        if warpRows { return try kernels.launch("rmsnorm_backward_warps", grid: (Self.rmsnormWarpBlocks(n), 1, 1), block: block, args) }
        try kernels.launch("rmsnorm_backward", grid: (max(1, n), 1, 1), block: block, args)
    }

    /// Rows per block of `rmsnorm_backward_dw`: at most 512 blocks (about four per SM), each summing its rows' weight
    /// gradient terms in registers.
    static func rmsnormWeightGradientRows(_ n: Int) -> Int { max(1, (n + 511) / 512) }
    /// Rows per warp of `rmsnorm_backward_dw_warps`: at most 2,048 runs (about 16 warps per SM; at a Qwen3 q norm's
    /// 131,072 rows, 64 rows each), whose partial sums colsum_finish adds.
    static func rmsnormWarpGradientRows(_ n: Int) -> Int { max(1, (n + 2047) / 2048) }

    /// Floats of scratch `rmsnormBackward` needs for a weight gradient of [n, c] rows.
    static func rmsnormBackwardScratch(n: Int, c: Int) -> Int {
        let blockRuns = (n + rmsnormWeightGradientRows(n) - 1) / rmsnormWeightGradientRows(n)
        let warpRuns = (n + rmsnormWarpGradientRows(n) - 1) / rmsnormWarpGradientRows(n)
        return max(columnSumScratch(n: n, c: c), max(blockRuns, warpRuns) * c)
    }

    /// Floats of scratch `columnSum` needs for an [n, c] matrix.
    static func columnSumScratch(n: Int, c: Int) -> Int { columnSumBlocks(n) * c }
    static func columnSumBlocks(_ n: Int) -> Int { min(256, max(1, (n + 63) / 64)) }

    /// out[j] += Σ_r a[r, j] (· b[r, j] (· rowScale[r])), deterministic (two passes through `scratch`).
    func columnSum(
        out: CUdeviceptr, a: CUdeviceptr, b: CUdeviceptr = 0, rowScale: CUdeviceptr = 0, n: Int, c: Int,
        scratch: CUdeviceptr
    ) throws {
        let blocks = Self.columnSumBlocks(n), rows = (n + blocks - 1) / blocks
        try kernels.launch(
            "colsum_partial", grid: ((c + 127) / 128, blocks, 1), block: (128, 1, 1),
            [.ptr(scratch), .ptr(a), .ptr(b), .ptr(rowScale), .i32(n), .i32(c), .i32(rows)])
        try columnSumFinish(out: out, partials: scratch, blocks: blocks, c: c)
    }

    /// out[j] += Σ_b partials[b, j] over `blocks` rows of partial sums (`colsum_finish`).
    private func columnSumFinish(out: CUdeviceptr, partials: CUdeviceptr, blocks: Int, c: Int) throws {
        try kernels.launch(
            "colsum_finish", grid: ((c + 31) / 32, 1, 1), block: (256, 1, 1),  // (32 columns × COLSUM_SLICES = 8 per block)
            [.ptr(out), .ptr(partials), .i32(blocks), .i32(c)])
    }

    /// Writes the fp32 gradients (dgate, dup) and/or their bf16 copies (dgate16, dup16): each where its pointer is not 0.
    /// The tensors are [count / cols, cols]; the bf16 copies' rows are `stride16` elements apart (nil: cols). `in16`:
    /// gate and up are bf16; `dout16`: dout is bf16.
    func swigluBackward(
        dgate: CUdeviceptr, dup: CUdeviceptr, dout: CUdeviceptr, gate: CUdeviceptr, up: CUdeviceptr, count: Int, cols: Int,
        dgate16: CUdeviceptr = 0, dup16: CUdeviceptr = 0, stride16: Int? = nil, in16: Bool, dout16: Bool
    ) throws {
        try kernels.launch1D(
            "swiglu_backward", count,
            [
                .ptr(dgate), .ptr(dup), .ptr(dout), .ptr(gate), .ptr(up), .i64(count), .ptr(dgate16), .ptr(dup16), .i32(cols),
                .i64(stride16 ?? cols), .i32(in16 ? 1 : 0), .i32(dout16 ? 1 : 0),
            ])
    }

    /// dtable rows += the dout rows of their positions (`order`/`starts`/`ids` from `EmbeddingGroups`).
    func embeddingBackward(dtable: CUdeviceptr, dout: CUdeviceptr, groups: EmbeddingGroups, c: Int) throws {
        try kernels.launch(
            "embedding_backward", grid: (groups.count, 1, 1), block: (min(256, max(32, c)), 1, 1),
            [
                .ptr(dtable), .ptr(dout), .ptr(groups.order.ptr), .ptr(groups.starts.ptr), .ptr(groups.ids.ptr),
                .i32(groups.count), .i32(c),
            ])
    }

    func steClip(out: CUdeviceptr, grad: CUdeviceptr, x: CUdeviceptr, amax: Float, count: Int, accumulate: Bool) throws {
        try kernels.launch1D("ste_clip", count, [.ptr(out), .ptr(grad), .ptr(x), .f32(amax), .i64(count), .i32(accumulate ? 1 : 0)])
    }

    func scale(_ x: CUdeviceptr, by s: Float, count: Int) throws {
        try kernels.launch1D("scale_inplace", count, [.ptr(x), .f32(s), .i64(count)])
    }

    func copy(_ dst: CUdeviceptr, _ src: CUdeviceptr, bytes: Int) throws {
        try check(api.cuMemcpyDtoD(dst, src, bytes), "cuMemcpyDtoD(\(bytes))")
    }

    func zero(_ p: CUdeviceptr, bytes: Int) throws { try check(api.cuMemsetD8(p, 0, bytes), "cuMemsetD8(\(bytes))") }

    /// Cross-entropy of a chunk: per-row losses, logits replaced by d(gradScale·loss)/d logits;
    /// `logits16` (not 0): that gradient's bf16 copy too, in the same pass; the fp32 gradient is then written
    /// only when `keepFP32` (logits keeps the logits otherwise: nothing but a bias or an adapter reads it).
    func crossEntropyBackward(
        rowLoss: CUdeviceptr, logits: CUdeviceptr, targets: CUdeviceptr, rows: Int, vocab: Int, gradScale: Float,
        logits16: CUdeviceptr = 0, keepFP32: Bool = true
    ) throws {
        try kernels.launch(
            "cross_entropy_backward", grid: (rows, 1, 1), block: (512, 1, 1),
            [
                .ptr(rowLoss), .ptr(logits), .ptr(targets), .i32(rows), .i32(vocab), .f32(gradScale), .ptr(logits16),
                .i32(keepFP32 ? 1 : 0),
            ])
    }

    /// `crossEntropyBackward` over bf16 logits (`cross_entropy_backward_bf16`): the gradient is written over them, in bf16.
    func crossEntropyBackwardBF16(
        rowLoss: CUdeviceptr, logits16: CUdeviceptr, targets: CUdeviceptr, rows: Int, vocab: Int, gradScale: Float
    ) throws {
        try kernels.launch(
            "cross_entropy_backward_bf16", grid: (rows, 1, 1), block: (512, 1, 1),
            [.ptr(rowLoss), .ptr(logits16), .ptr(targets), .i32(rows), .i32(vocab), .f32(gradScale)])
    }

    /// Distillation rows (`kd_rows` in loss.cu): rowOut gets (CE, KD) per row as doubles;
    /// `student16` (not 0): the gradient's bf16 copy too, and the fp32 gradient only when `keepFP32`.
    func distillationRows(
        rowOut: CUdeviceptr, student: CUdeviceptr, teacher: CUdeviceptr, teacherStride: Int, targets: CUdeviceptr,
        rows: Int, vocab: Int, kind: Int, beta: Float, invT: Float, cKD: Float, cCE: Float, computeCE: Bool, student16: CUdeviceptr = 0,
        keepFP32: Bool = true
    ) throws {
        try kernels.launch(
            "kd_rows", grid: (rows, 1, 1), block: (512, 1, 1),
            [
                .ptr(rowOut), .ptr(student), .ptr(teacher), .ptr(targets), .i32(rows), .i32(vocab), .i64(teacherStride),
                .i32(kind), .f32(beta), .f32(invT), .f32(cKD), .f32(cCE), .i32(computeCE ? 1 : 0), .ptr(student16),
                .i32(keepFP32 ? 1 : 0),
            ])
    }

    /// `distillationRows` over bf16 logits, the student's and the teacher's (`kd_rows_bf16`): the gradient is written
    /// over the student's, in bf16.
    func distillationRowsBF16(
        rowOut: CUdeviceptr, student16: CUdeviceptr, teacher16: CUdeviceptr, teacherStride: Int, targets: CUdeviceptr,
        rows: Int, vocab: Int, kind: Int, beta: Float, invT: Float, cKD: Float, cCE: Float, computeCE: Bool
    ) throws {
        try kernels.launch(
            "kd_rows_bf16", grid: (rows, 1, 1), block: (512, 1, 1),
            [
                .ptr(rowOut), .ptr(student16), .ptr(teacher16), .ptr(targets), .i32(rows), .i32(vocab), .i64(teacherStride),
                .i32(kind), .f32(beta), .f32(invT), .f32(cKD), .f32(cCE), .i32(computeCE ? 1 : 0),
            ])
    }

    /// Adds the (CE, KD) pairs a distillation row kernel (`kd_rows`, `topk_kd_rows`) wrote to
    /// rowOut (doubles, [rows, 2]) to the running sums, in row order, over the rows whose target
    /// is not ignored: ce += CE, kd += T²·KD (the loss parts the trainer reports).
    func addDistillationSums(
        _ rowOut: CUdeviceptr, targets: ArraySlice<Int32>, temperature T: Double, ce: inout Double, kd: inout Double
    ) throws {
        var out = [Double](repeating: 0, count: 2 * targets.count)
        try out.withUnsafeMutableBytes { try check(api.cuMemcpyDtoH($0.baseAddress!, rowOut, $0.count), "cuMemcpyDtoH") }
        for (i, t) in targets.enumerated() where t != CrossEntropy.ignoreIndex {
            ce += out[2 * i]; kd += T * T * out[2 * i + 1]
        }
    }

    /// AdamW over one parameter (scalars as `AdamW.Coefficients`), the gradient read as g·clip
    /// (gradient clipping's fp32 coefficient, `CUDAStepBackend.clipCoefficient`; 1: unclipped).
    /// `refresh` (`CUDAModel.WeightRefresh`): the parameter's bf16 product copy rewritten from the new values in
    /// the same pass (their bf16 rounding, or that of their NVFP4 fake quant), or the fp32 rounding it is read from.
    func adamw(
        p: CUdeviceptr, g: CUdeviceptr, m: CUdeviceptr, v: CUdeviceptr, count: Int, decay: Float, lerpSmall: Bool, lerpWeight: Float,
        beta2: Float, oneMinusBeta2: Float, bc2Sqrt: Float, eps: Float, negStepSize: Float, clip: Float = 1,
        refresh: CUDAModel.WeightRefresh? = nil
    ) throws {
        if let r = refresh, !r.fits(p: p, g: g, m: m, v: v, count: count) {  // (the kernel cannot say so itself)
            throw QATError.internal("adamw_update: a weight refresh needs aligned arrays (and whole 16-blocks for NVFP4)")
        }
        // One float4 per thread (no grid-stride loop): 1.87 ms against 1.98 for launch1D's 132·16 blocks over a
        // [128256 × 2048] parameter on the H200 (4.2 vs 4.0 TB/s, bench/gpu-h200-quant-kernels-848a460.txt).
        try kernels.launch(
            "adamw_update", grid: (max(1, ((count + 3) / 4 + 255) / 256), 1, 1), block: (256, 1, 1),
            [
                .ptr(p), .ptr(g), .ptr(m), .ptr(v), .i64(count), .f32(decay), .i32(lerpSmall ? 1 : 0), .f32(lerpWeight),
                .f32(beta2), .f32(oneMinusBeta2), .f32(bc2Sqrt), .f32(eps), .f32(negStepSize), .f32(clip),
                .ptr(refresh?.w16 ?? 0), .i32(refresh?.code ?? 0), .f32(refresh?.nvfp4?.amax ?? 0),
                .i32(refresh?.nvfp4?.export == true ? 1 : 0),
            ])
    }

    /// Σ x² (double) of every chunk of a `GradientChunks` table (uploaded at `table`) into
    /// `partials` (one double per chunk), in one launch.
    func sumOfSquares(chunks table: CUdeviceptr, count: Int, partials: CUdeviceptr) throws {
        guard count > 0 else { return }
        try kernels.launch(
            "sumsq_chunks", grid: (count, 1, 1), block: (256, 1, 1), [.ptr(partials), .ptr(table), .i32(count)])
    }
}

/// A micro-batch's positions grouped by token for `embeddingBackward` (built on the host:
/// positions sorted by token, then position).
public final class EmbeddingGroups {
    let order, starts, ids: DeviceBuffer
    let count: Int
    /// The plan of `tokens` on the device, in `previous`'s buffers when they hold it (one training batch after another).
    init(_ device: CUDADevice, tokens: [Int32], reusing previous: EmbeddingGroups? = nil) throws {
        let g = EmbeddingGroups.plan(tokens)
        let n = tokens.count + 1
        if let p = previous, p.order.bytes >= n * 4 {
            (order, starts, ids) = (p.order, p.starts, p.ids)
        } else {
            (order, starts, ids) = (
                try DeviceBuffer(device, bytes: n * 4), try DeviceBuffer(device, bytes: n * 4), try DeviceBuffer(device, bytes: n * 4)
            )
        }
        for (buffer, values) in [(order, g.order), (starts, g.starts), (ids, g.ids)] where !values.isEmpty {
            try values.withUnsafeBytes { try buffer.upload($0.baseAddress!, bytes: $0.count) }
        }
        count = g.ids.count
    }

    /// The host side: positions sorted by token, then position (`order`); token `ids[u]` owns
    /// `order[starts[u] ..< starts[u + 1]]`.
    public static func plan(_ tokens: [Int32]) -> (order: [Int32], starts: [Int32], ids: [Int32]) {
        let order = tokens.indices.sorted { tokens[$0] != tokens[$1] ? tokens[$0] < tokens[$1] : $0 < $1 }
        var starts: [Int32] = [], ids: [Int32] = []
        for (i, p) in order.enumerated() where i == 0 || tokens[order[i - 1]] != tokens[p] {
            starts.append(Int32(i))
            ids.append(tokens[p])
        }
        starts.append(Int32(order.count))
        return (order.map { Int32($0) }, starts, ids)
    }
}
