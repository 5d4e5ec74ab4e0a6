import CCUDA
import QATCore

/// Host-side wrappers of the LoRA / QLoRA kernels (`Kernels/lora.cu`).
extension CUDADevice {
    /// QLoRA's base: NVFP4 `packed` [rows, nb·8] and E4M3 `scales` [rows, nb] (nb = ⌈cols/16⌉)
    /// with global scale `gs` decoded into `out` [rows, cols] fp32 (and its bf16 rounding into
    /// `out16` when non-zero), bit for bit `NVFP4.dequantize`.
    func nvfp4Decode(
        packed: CUdeviceptr, scales: CUdeviceptr, globalScale gs: Float, rows: Int, cols: Int, out: CUdeviceptr, out16: CUdeviceptr = 0
    )
        throws
    {
        try kernels.launch1D(
            "nvfp4_decode", rows * NVFP4Layout.blocksPerRow(cols),
            [.ptr(packed), .ptr(scales), .f32(gs), .i64(rows), .i32(cols), .ptr(out), .ptr(out16)])
    }

    /// LoRA dropout of x [count] under mask `key` (`LoRAContext.applyMask`): into `out` (fp32,
    /// written, or added to with `accumulate`) and/or its bf16 rounding into `out16` (0: none).
    func loraDropout(
        _ x: CUdeviceptr, out: CUdeviceptr, out16: CUdeviceptr = 0, count: Int, key: UInt64, threshold: UInt64, scale: Float,
        accumulate: Bool
    ) throws {
        try kernels.launch1D(
            "lora_dropout", count,
            [
                .ptr(x), .ptr(out), .ptr(out16), .i64(count), .i64(Int(Int64(bitPattern: key))), .i64(Int(threshold)), .f32(scale),
                .i32(accumulate ? 1 : 0),
            ])
    }
}

/// Where QLoRA's packed bases live on the GPU: every NVFP4 tensor's codes and block scales in one
/// device arena, each piece at a 256-byte aligned offset (pure layout, tested without a GPU).
public struct NVFP4Layout: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        public let packedOffset: Int
        public let packedBytes: Int
        public let scalesOffset: Int
        public let scalesBytes: Int
    }
    public let entries: [Entry]
    public let totalBytes: Int

    /// 16-element blocks per row.
    public static func blocksPerRow(_ cols: Int) -> Int { (cols + 15) / 16 }
    /// Bytes of one `[rows, cols]` tensor's packed codes (8 per block) and its scales (1 per block).
    public static func bytes(rows: Int, cols: Int) -> (packed: Int, scales: Int) {
        let blocks = rows * blocksPerRow(cols)
        return (blocks * 8, blocks)
    }

    /// The arena of `shapes` ([rows, cols] each), in order.
    public init(shapes: [(rows: Int, cols: Int)]) {
        func aligned(_ n: Int) -> Int { (n + 255) / 256 * 256 }
        var offset = 0
        var entries: [Entry] = []
        for s in shapes {
            let b = Self.bytes(rows: s.rows, cols: s.cols)
            let e = Entry(packedOffset: offset, packedBytes: b.packed, scalesOffset: offset + aligned(b.packed), scalesBytes: b.scales)
            offset = e.scalesOffset + aligned(b.scales)
            entries.append(e)
        }
        self.entries = entries
        totalBytes = offset
    }
}
