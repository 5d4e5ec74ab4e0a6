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
    /// `scratch16`: `attentionScratchBytes` of device memory for the bf16 copies of k and v the
    /// tensor-core kernel reads (0: allocated for this call); `kv16`: where to write those copies instead
    /// (the caller keeps them for the backward, `attentionBackward`'s `inputs16`).
    func attention(
        out: CUdeviceptr, lse: CUdeviceptr, q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr,
        batch: Int, seqLen: Int, heads: Int, kvHeads: Int, headDim: Int, window: Int?, bf16: Bool = false,
        scratch16: CUdeviceptr = 0, kv16: (k: CUdeviceptr, v: CUdeviceptr)? = nil
    ) throws {
        try checkAttentionShape(heads: heads, kvHeads: kvHeads, headDim: headDim)
        let scale = 1 / Float(headDim).squareRoot()
        if Self.attentionOnTensorCores(bf16: bf16, headDim: headDim) {
            guard batch > 0 && seqLen > 0 else { return }
            try checkAligned(["out": out, "q": q, "k": k, "v": v])
            let nq = batch * seqLen * heads * headDim, nk = batch * seqLen * kvHeads * headDim
            let owned = try scratch16 == 0 && kv16 == nil ? DeviceBuffer(self, bytes: Self.attentionScratchBytes(nq: nq, nk: nk)) : nil
            let base = owned?.ptr ?? scratch16
            // (q is read as fp32, once per block)
            let (k16, v16) = kv16 ?? (base + CUdeviceptr(2 * nq), base + CUdeviceptr(2 * nq + 2 * nk))
            try attentionInputsBF16([(k16, k, nk), (v16, v, nk)])
            let name = "attention_forward_bf16_d\(headDim)"
            let shared = Self.attentionForwardShared(headDim: headDim), rows = Self.attentionTiles(headDim: headDim).forwardRows
            if shared > 48 * 1024 { try kernels.allowSharedMemory(name, bytes: shared) }
            try kernels.launch(
                name, grid: (batch * heads, (seqLen + rows - 1) / rows, 1), block: (128, 1, 1),
                shared: shared,
                [
                    .ptr(out), .ptr(lse), .ptr(q), .ptr(k16), .ptr(v16), .i32(seqLen), .i32(heads), .i32(kvHeads),
                    .i32(window ?? 0), .f32(scale),
                ])
            withExtendedLifetime(owned) {}
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
    /// otherwise (and always when bf16 is false) the fp32 path. `scratch16`: `attentionScratchBytes` of device memory
    /// for the bf16 copies of q, k, v and dout the tensor-core kernels read (0: allocated for this call); `inputs16`:
    /// the bf16 copies of q, k and v already made (the forward's `attention_to_bf16` / RoPE output), so only dout's
    /// is written (into `scratch16`).
    ///
    /// Deterministic (no atomics): dK/dV by one kernel per (batch, kv head, key tile) looping over the group's
    /// query heads and query tiles in order, dQ by another per (batch, head, query tile) looping over key tiles.
    func attentionBackward(
        dq: CUdeviceptr, dk: CUdeviceptr, dv: CUdeviceptr, dout: CUdeviceptr, out: CUdeviceptr, lse: CUdeviceptr,
        q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr, delta: CUdeviceptr, batch: Int, seqLen: Int, heads: Int,
        kvHeads: Int, headDim: Int, window: Int?, bf16: Bool, scratch16: CUdeviceptr = 0,
        inputs16: (q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr)? = nil
    ) throws {
        try checkAttentionShape(heads: heads, kvHeads: kvHeads, headDim: headDim)
        guard batch > 0 && seqLen > 0 else { return }
        let scale = 1 / Float(headDim).squareRoot(), win = window ?? 0
        let rows = batch * seqLen * heads
        let tensorCores = Self.attentionOnTensorCores(bf16: bf16, headDim: headDim)
        let nq = batch * seqLen * heads * headDim, nk = batch * seqLen * kvHeads * headDim
        let owned = try tensorCores && scratch16 == 0 ? DeviceBuffer(self, bytes: Self.attentionScratchBytes(nq: nq, nk: nk)) : nil
        let base = owned?.ptr ?? scratch16, g16 = base + CUdeviceptr(2 * (nq + 2 * nk))
        let (q16, k16, v16) = inputs16 ?? (base, base + CUdeviceptr(2 * nq), base + CUdeviceptr(2 * (nq + nk)))
        // (tensor cores: dout's bf16 copy written by the same pass)
        try kernels.launch(
            "attention_backward_delta", grid: ((rows + 7) / 8, 1, 1), block: (256, 1, 1),
            [.ptr(delta), .ptr(dout), .ptr(out), .i32(batch), .i32(seqLen), .i32(heads), .i32(headDim), .ptr(tensorCores ? g16 : 0)])
        if tensorCores {
            try checkAligned(["dq": dq, "dk": dk, "dv": dv, "dout": dout, "q": q, "k": k, "v": v])
            if inputs16 == nil { try attentionInputsBF16([(q16, q, nq), (k16, k, nk), (v16, v, nk)]) }
            let dkdv = "attention_backward_dkdv_bf16_d\(headDim)", dqName = "attention_backward_dq_bf16_d\(headDim)"
            let (dkdvShared, dqShared) = Self.attentionBackwardShared(headDim: headDim)
            if dkdvShared > 48 * 1024 { try kernels.allowSharedMemory(dkdv, bytes: dkdvShared) }
            if dqShared > 48 * 1024 { try kernels.allowSharedMemory(dqName, bytes: dqShared) }
            let t = Self.attentionTiles(headDim: headDim)
            try kernels.launch(
                dkdv, grid: (batch * kvHeads, (seqLen + t.dkdvKeys - 1) / t.dkdvKeys, 1), block: (128, 1, 1), shared: dkdvShared,
                [
                    .ptr(dk), .ptr(dv), .ptr(g16), .ptr(lse), .ptr(delta), .ptr(q16), .ptr(k16), .ptr(v16), .i32(seqLen),
                    .i32(heads), .i32(kvHeads), .i32(win), .f32(scale),
                ])
            try kernels.launch(
                dqName, grid: (batch * heads, (seqLen + t.dqRows - 1) / t.dqRows, 1), block: (128, 1, 1), shared: dqShared,
                [
                    .ptr(dq), .ptr(g16), .ptr(lse), .ptr(delta), .ptr(q16), .ptr(k16), .ptr(v16), .i32(seqLen),
                    .i32(heads), .i32(kvHeads), .i32(win), .f32(scale),
                ])
            withExtendedLifetime(owned) {}
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

    /// Whether `attention` / `attentionBackward` run on the tensor cores (bf16, head_dim 64 or 128).
    public static func attentionOnTensorCores(bf16: Bool, headDim: Int) -> Bool { bf16 && (headDim == 64 || headDim == 128) }

    /// Bytes of the bf16 copies of the tensor-core attention's inputs, forward (q, k, v) and backward (q, k, v, dout):
    /// `nq` = B·T·H·D and `nk` = B·T·Hkv·D elements.
    public static func attentionScratchBytes(nq: Int, nk: Int) -> Int { 2 * (2 * nq + 2 * nk) }

    /// Tile sizes of the bf16 attention kernels of one head size, as instantiated in attention.cu (keep the two in
    /// step): the forward's query rows and key tile per block (FA_BQ, FA_BK); the dK/dV kernel's keys per block and
    /// query rows per step (BQ); the dQ kernel's query rows per block and key tile (BK). (Session 8 timed 2 key
    /// tiles per dK/dV warp, 2 row tiles per dQ warp and other forward tiles: all slower on the H200.)
    public struct AttentionTiles: Equatable, Sendable {
        public let forwardRows, forwardKeys, dkdvKeys, dkdvRows, dqRows, dqKeys: Int
    }

    public static func attentionTiles(headDim: Int) -> AttentionTiles {
        headDim == 64
            ? AttentionTiles(forwardRows: 128, forwardKeys: 64, dkdvKeys: 64, dkdvRows: 64, dqRows: 64, dqKeys: 64)
            : AttentionTiles(forwardRows: 128, forwardKeys: 64, dkdvKeys: 64, dkdvRows: 32, dqRows: 64, dqKeys: 32)
    }

    /// Dynamic shared memory of the bf16 forward: Q [BQ][D+8] and two stages of K and V tiles [BK][D+8] bf16.
    public static func attentionForwardShared(headDim: Int) -> Int {
        let t = attentionTiles(headDim: headDim)
        return (t.forwardRows + 4 * t.forwardKeys) * (headDim + 8) * 2
    }

    /// Dynamic shared memory of the bf16 backward kernels (dK/dV, dQ): the block's own K, V (dK/dV) or Q, dO (dQ)
    /// rows [·][D+8] bf16, two stages of the streamed [tile][D+8] pairs, and (dK/dV) two stages of lse, delta.
    public static func attentionBackwardShared(headDim: Int) -> (dkdv: Int, dq: Int) {
        let t = attentionTiles(headDim: headDim), rows = headDim + 8
        return (
            (2 * t.dkdvKeys * rows + 4 * t.dkdvRows * rows) * 2 + 4 * t.dkdvRows * 4, (2 * t.dqRows * rows + 4 * t.dqKeys * rows) * 2
        )
    }

    /// bf16 copies (round to nearest even) of fp32 tensors whose sizes are multiples of 4.
    private func attentionInputsBF16(_ copies: [(out: CUdeviceptr, x: CUdeviceptr, count: Int)]) throws {
        for c in copies {
            try kernels.launch1D("attention_to_bf16", c.count / 4, [.ptr(c.out), .ptr(c.x), .i64(c.count / 4)])
        }
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
