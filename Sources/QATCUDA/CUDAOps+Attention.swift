import CCUDA
import QATCore

/// Host-side wrappers of the attention kernels (Kernels/attention.cu): forward and backward,
/// grid and block sizes computed here.
extension CUDADevice {
    /// Query rows and keys per tile of the fp32 forward kernel.
    static let attentionRows = 16, attentionKeys = 32
    /// Query rows and keys per tile step of the fp32 backward kernels (256 threads each).
    static let attentionBackwardRows = 16, attentionBackwardKeys = 32

    /// Causal GQA attention. `bf16`: the tensor-core kernel (bf16 inputs, fp32 accumulation) for
    /// head_dim 64 and 128; otherwise, and always in fp32, the fp32 kernel. `lse` (optional,
    /// [B, H, T]): the natural-log log-sum-exp of each row's scaled scores, for the backward.
    func attention(
        out: CUdeviceptr, lse: CUdeviceptr, q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr,
        batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int, window: Int?, bf16: Bool = false
    ) throws {
        try checkAttentionShape(heads: heads, kvHeads: kvHeads, headDim: headDim)
        let scale = 1 / Float(headDim).squareRoot()
        if bf16 && (headDim == 64 || headDim == 128) {
            try checkAligned(["out": out, "q": q, "k": k, "v": v])
            let name = "attention_forward_bf16_d\(headDim)"
            // Q [64] and K, V [BK] bf16 rows of D+8, the K, V staging [BK][D] fp32; BK as instantiated in attention.cu.
            let bk = headDim == 64 ? 64 : 32, shared = (64 + 2 * bk) * (headDim + 8) * 2 + 2 * bk * headDim * 4
            if shared > 48 * 1024 { try kernels.allowSharedMemory(name, bytes: shared) }
            try kernels.launch(
                name, grid: ((seqLen + 63) / 64, batch * heads, 1), block: (128, 1, 1), shared: shared,
                [
                    .ptr(out), .ptr(lse), .ptr(q), .ptr(k), .ptr(v), .i32(seqLen), .i32(heads), .i32(kvHeads),
                    .i32(window ?? 0), .f32(scale),
                ])
            return
        }
        let shared = (Self.attentionKeys * (headDim + 1) + Self.attentionKeys * headDim + Self.attentionRows * headDim) * 4
        if shared > 48 * 1024 { try kernels.allowSharedMemory("attention_forward", bytes: shared) }
        try kernels.launch(
            "attention_forward", grid: ((seqLen + Self.attentionRows - 1) / Self.attentionRows, batch * heads, 1),
            block: (128, 1, 1), shared: shared,
            [
                .ptr(out), .ptr(lse), .ptr(q), .ptr(k), .ptr(v), .i32(batch), .i32(seqLen), .i32(heads), .i32(kvHeads),
                .i32(headDim), .i32(window ?? 0), .f32(scale),
            ])
    }

    /// Backward of `attention` (same layouts: q, dq [B,T,H,D]; k, v, dk, dv [B,T,Hkv,D]; out, dout [B,T,H,D];
    /// lse [B,H,T] as written by the forward). dq, dk and dv are overwritten (not accumulated); dk/dv sum over the
    /// query heads of each KV group. `delta`: scratch of B·H·T floats (rowsum(dout ∘ out)).
    /// bf16: tensor-core path for head_dim 64 and 128 (fp32 inputs/outputs, bf16 products, fp32 accumulation),
    /// otherwise (and always when bf16 is false) the fp32 path.
    ///
    /// Deterministic (no atomics): dK/dV by one kernel per (batch, kv head, key tile) looping over the group's
    /// query heads and query tiles in order, dQ by another per (batch, head, query tile) looping over key tiles.
    func attentionBackward(
        dq: CUdeviceptr, dk: CUdeviceptr, dv: CUdeviceptr, dout: CUdeviceptr, out: CUdeviceptr, lse: CUdeviceptr,
        q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr, delta: CUdeviceptr, batch: Int, seqLen: Int, heads: Int,
        kvHeads: Int, headDim: Int, window: Int?, bf16: Bool
    ) throws {
        try checkAttentionShape(heads: heads, kvHeads: kvHeads, headDim: headDim)
        guard batch > 0 && seqLen > 0 else { return }
        let scale = 1 / Float(headDim).squareRoot(), win = window ?? 0
        let rows = batch * seqLen * heads
        try kernels.launch(
            "attention_backward_delta", grid: ((rows + 7) / 8, 1, 1), block: (256, 1, 1),
            [.ptr(delta), .ptr(dout), .ptr(out), .i32(batch), .i32(seqLen), .i32(heads), .i32(headDim)])
        if bf16 && (headDim == 64 || headDim == 128) {
            try checkAligned(["dq": dq, "dk": dk, "dv": dv, "dout": dout, "q": q, "k": k, "v": v])
            // Query tile of the dK/dV kernel and key tile of the dQ kernel (as instantiated in attention.cu).
            let tile = headDim == 64 ? 64 : 32, rowBytes = (headDim + 8) * 2
            let dkdv = "attention_backward_dkdv_bf16_d\(headDim)", dqName = "attention_backward_dq_bf16_d\(headDim)"
            // bf16 tiles, then (dK/dV) lse and delta, then the fp32 staging of the next tile's rows.
            let dkdvShared = (128 + 2 * tile) * rowBytes + 2 * tile * 4 + (2 * tile * headDim + 2 * tile) * 4
            let dqShared = (128 + 2 * tile) * rowBytes + 2 * tile * headDim * 4
            if dkdvShared > 48 * 1024 { try kernels.allowSharedMemory(dkdv, bytes: dkdvShared) }
            if dqShared > 48 * 1024 { try kernels.allowSharedMemory(dqName, bytes: dqShared) }
            let tiles = (seqLen + 63) / 64
            try kernels.launch(
                dkdv, grid: (tiles, batch * kvHeads, 1), block: (128, 1, 1), shared: dkdvShared,
                [
                    .ptr(dk), .ptr(dv), .ptr(dout), .ptr(lse), .ptr(delta), .ptr(q), .ptr(k), .ptr(v), .i32(seqLen),
                    .i32(heads), .i32(kvHeads), .i32(win), .f32(scale),
                ])
            try kernels.launch(
                dqName, grid: (tiles, batch * heads, 1), block: (128, 1, 1), shared: dqShared,
                [
                    .ptr(dq), .ptr(dout), .ptr(lse), .ptr(delta), .ptr(q), .ptr(k), .ptr(v), .i32(seqLen),
                    .i32(heads), .i32(kvHeads), .i32(win), .f32(scale),
                ])
            return
        }
        let R = Self.attentionBackwardRows, K = Self.attentionBackwardKeys
        let shared = (2 * K * (headDim + 1) + 2 * R * headDim + 2 * R * (K + 1) + 2 * R) * 4
        for name in ["attention_backward_dkdv", "attention_backward_dq"] where shared > 48 * 1024 {
            try kernels.allowSharedMemory(name, bytes: shared)
        }
        try kernels.launch(
            "attention_backward_dkdv", grid: ((seqLen + K - 1) / K, batch * kvHeads, 1), block: (256, 1, 1), shared: shared,
            [
                .ptr(dk), .ptr(dv), .ptr(dout), .ptr(lse), .ptr(delta), .ptr(q), .ptr(k), .ptr(v), .i32(batch), .i32(seqLen),
                .i32(heads), .i32(kvHeads), .i32(headDim), .i32(win), .f32(scale),
            ])
        try kernels.launch(
            "attention_backward_dq", grid: ((seqLen + R - 1) / R, batch * heads, 1), block: (256, 1, 1), shared: shared,
            [
                .ptr(dq), .ptr(dout), .ptr(lse), .ptr(delta), .ptr(q), .ptr(k), .ptr(v), .i32(batch), .i32(seqLen),
                .i32(heads), .i32(kvHeads), .i32(headDim), .i32(win), .f32(scale),
            ])
    }

    /// The tensor-core kernels move rows as 16-byte vectors (float4, cp.async).
    private func checkAligned(_ pointers: KeyValuePairs<String, CUdeviceptr>) throws {
        for (name, p) in pointers where p % 16 != 0 {
            throw QATError("internal: the bf16 attention kernels need 16-byte aligned tensors (\(name) is at \(p))")
        }
    }

    private func checkAttentionShape(heads: Int, kvHeads: Int, headDim: Int) throws {
        guard headDim <= 256 else { throw QATError("the CUDA attention kernel supports head_dim up to 256 (this model has \(headDim))") }
        guard kvHeads > 0 && heads % kvHeads == 0 else {
            throw QATError("attention: \(heads) query heads do not split into groups of \(kvHeads) kv heads")
        }
    }
}
