import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain

/// LoRA and QLoRA on the GPU, with the CPU's semantics (`LoRAAdapter`, `QLoRABase`, `Linear`):
///
/// - An adapted Linear's output gets `scaling · (dropout(x)·Aᵀ)·Bᵀ` from its original (not
///   fake-quantized) input, after the base product and bias; backward adds `dA`, `dB` and the
///   adapter's input gradient after the base wrote dx (the adapter's dx bypasses the input STE).
///   A and B are ordinary device parameters (`tensors`), so the device AdamW, `synchronizeHost`
///   and `hostStateChanged` treat them as any other; the frozen base gets no gradient (it has
///   none on the host). The dropout masks are the CPU's (same key per step, micro-batch and
///   adapter, same hash per element: `lora_dropout`), so a GPU run draws the CPU's masks.
/// - QLoRA's frozen base stays packed in device memory (E2M1 codes, E4M3 block scales, one
///   arena for every Linear) and is decoded by `nvfp4_decode`, bit for bit `NVFP4.dequantize`,
///   into one scratch weight (fp32, and its bf16 copy in bf16 precision) shared by all Linears,
///   at every use: forward, and again in backward. No decoded copy stays resident per layer.
///
/// In bf16 precision the adapter products take bf16 operands (x, A, h, B, dy, dh) with fp32
/// accumulation, as the base products do; in fp32 they are fp32 without TF32.
extension CUDAModel {
    /// One adapted Linear's adapter on the device.
    final class DeviceAdapter {
        let adapter: LoRAAdapter
        /// The device parameters A [rank, in] and B [out, rank] (also in `tensors`).
        let A, B: DeviceBuffer
        /// h = dropout(x)·Aᵀ [n, rank] of the last training forward (backward reads it).
        var h: DeviceBuffer?
        /// The dropout key of the last forward; nil: no mask (no dropout, or not training).
        var maskKey: UInt64?
        init(adapter: LoRAAdapter, A: DeviceBuffer, B: DeviceBuffer) { self.adapter = adapter; self.A = A; self.B = B }
    }

    /// A QLoRA Linear's packed base in the arena.
    struct PackedWeight {
        let packed: CUdeviceptr
        let scales: CUdeviceptr
        let globalScale: Float
        let rows: Int
        let cols: Int
    }

    /// The model's adapters by Linear and QLoRA's arena of packed bases.
    final class LoRAState {
        var adapters: [ObjectIdentifier: DeviceAdapter] = [:]
        var arena: DeviceBuffer?
        /// The one decode target of every packed base: fp32 and (bf16 precision) bf16, of the largest.
        var decoded: DeviceBuffer?
        var decoded16: DeviceBuffer?
        /// Device bytes of the packed bases (codes + scales, alignment included).
        var packedBytes: Int { arena?.bytes ?? 0 }
    }

    /// Device bytes QLoRA's packed bases take (0 without QLoRA).
    public var packedBaseBytes: Int { lora?.packedBytes ?? 0 }

    /// The device tensor of a host parameter, uploaded now if no Linear or norm uploaded it.
    private func deviceTensor(_ p: Parameter) throws -> DeviceBuffer {
        if let b = tensors[ObjectIdentifier(p)] { return b }
        let b = try DeviceBuffer(device, copying: p.value.data, bytes: p.value.count * 4)
        tensors[ObjectIdentifier(p)] = b
        return b
    }

    /// Called by `init`: QLoRA's packed bases into one arena (their Linears get device entries
    /// that decode at use) and every LoRA adapter's A and B as device parameters. Anything else
    /// hooked into a Linear is refused with one line.
    func uploadLoRA() throws {
        let state = LoRAState()
        var packedLinears: [(Linear, QLoRABase.Packed)] = []
        for l in model.linears {
            guard let source = l.weightSource else { continue }
            guard let base = source as? QLoRABase, let p = base.tensors[l.name] else {
                throw QATError.unsupported("\(l.name): this weight source runs on the CPU only in this version: use device: cpu")
            }
            let bytes = NVFP4Layout.bytes(rows: p.rows, cols: p.cols)
            guard p.rows == l.outFeatures, p.cols == l.inFeatures, p.packed.count == bytes.packed, p.scales.count == bytes.scales else {
                throw QATError.internal("QLoRA base of \(l.name): [\(p.rows), \(p.cols)] does not fit its Linear")
            }
            packedLinears.append((l, p))
        }
        if !packedLinears.isEmpty {
            let layout = NVFP4Layout(shapes: packedLinears.map { ($0.1.rows, $0.1.cols) })
            let arena = try DeviceBuffer(device, bytes: layout.totalBytes)
            let largest = packedLinears.map { $0.1.rows * $0.1.cols }.max()!
            let decoded = try DeviceBuffer(device, floats: largest)
            let decoded16 = precision == .bf16 ? try DeviceBuffer(device, bytes: largest * 2) : nil
            for ((l, p), e) in zip(packedLinears, layout.entries) {
                try p.packed.withUnsafeBytes { try arena.upload($0.baseAddress!, bytes: e.packedBytes, offset: e.packedOffset) }
                try p.scales.withUnsafeBytes { try arena.upload($0.baseAddress!, bytes: e.scalesBytes, offset: e.scalesOffset) }
                let dl = DeviceLinear(linear: l, weight: decoded, bias: try l.bias.map { try deviceTensor($0) })
                dl.bf16 = decoded16
                dl.packed = PackedWeight(
                    packed: arena.ptr + CUdeviceptr(e.packedOffset), scales: arena.ptr + CUdeviceptr(e.scalesOffset),
                    globalScale: p.globalScale, rows: p.rows, cols: p.cols)
                linears[ObjectIdentifier(l)] = dl
            }
            state.arena = arena; state.decoded = decoded; state.decoded16 = decoded16
        }
        for l in model.linears {
            guard let a = l.adapter else { continue }
            guard let adapter = a as? LoRAAdapter else {
                throw QATError.unsupported("\(l.name): this adapter type runs on the CPU only in this version: use device: cpu")
            }
            guard adapter.inFeatures == l.inFeatures, adapter.outFeatures == l.outFeatures else {
                throw QATError.internal("LoRA adapter of \(l.name) does not fit its Linear")
            }
            state.adapters[ObjectIdentifier(l)] = DeviceAdapter(
                adapter: adapter, A: try deviceTensor(adapter.A), B: try deviceTensor(adapter.B))
        }
        lora = state.adapters.isEmpty && state.arena == nil ? nil : state
    }

    /// QLoRA: decodes a packed base into its Linear's `weight` (the shared fp32 scratch) and, in
    /// bf16 precision, `bf16` (the shared bf16 scratch). The Linear stays stale: every use decodes.
    func decode(_ p: PackedWeight, into dl: DeviceLinear) throws {
        try device.nvfp4Decode(
            packed: p.packed, scales: p.scales, globalScale: p.globalScale, rows: p.rows, cols: p.cols, out: dl.weight.ptr,
            out16: dl.bf16?.ptr ?? 0)
    }

    /// An operand of an adapter product: `p` itself in fp32; in bf16 precision its bf16 copy,
    /// written into the scratch named `key`.
    private func operand(_ p: CUdeviceptr, count: Int, _ key: String) throws -> CUdeviceptr {
        guard precision == .bf16 else { return p }
        let t = try scratch(key, bytes: count * 2)
        try device.toBF16(out: t, p, count: count)
        return t
    }

    /// What the adapter's A product multiplies: x [n, in] through the last forward's dropout
    /// mask (when it had one), as fp32 or (bf16 precision) bf16. `x16`: x's bf16 copy, if known.
    private func adapterInput(_ ad: DeviceAdapter, x: CUdeviceptr, x16: CUdeviceptr?, n: Int) throws -> CUdeviceptr {
        let c = ad.adapter.context, count = n * ad.adapter.inFeatures
        guard let key = ad.maskKey else {
            if precision == .fp32 { return x }
            if let x16 { return x16 }
            return try operand(x, count: count, "lora-x16")
        }
        if precision == .bf16 {
            let t = try scratch("lora-x16", bytes: count * 2)
            try device.loraDropout(
                x, out: 0, out16: t, count: count, key: key, threshold: c.dropoutThreshold, scale: c.dropoutScale, accumulate: false)
            return t
        }
        let t = try scratch("lora-x", bytes: count * 4)
        try device.loraDropout(x, out: t, count: count, key: key, threshold: c.dropoutThreshold, scale: c.dropoutScale, accumulate: false)
        return t
    }

    /// out [n, out] += scaling · (dropout(x)·Aᵀ)·Bᵀ (`LoRAAdapter.forward`). A training forward
    /// (saveForBackward) counts the micro-batch at the first adapter, draws the dropout mask and
    /// keeps h for backward, as the CPU's training forward does.
    func adapterForward(_ ad: DeviceAdapter, x: CUdeviceptr, x16: CUdeviceptr?, out: CUdeviceptr, n: Int, training: Bool) throws {
        let a = ad.adapter, c = a.context, r = c.rank, bf = precision == .bf16
        ad.maskKey = nil
        let h: CUdeviceptr
        if training {
            if a.index == 0 { c.beginForward() }
            if c.dropout > 0 { ad.maskKey = c.key(adapter: a.index) }
            if (ad.h?.bytes ?? 0) < n * r * 4 { ad.h = nil; ad.h = try DeviceBuffer(device, floats: n * r) }
            h = ad.h!.ptr
        } else {
            h = try scratch("lora-h", bytes: n * r * 4)
        }
        let xin = try adapterInput(ad, x: x, x16: x16, n: n)
        let A = try operand(ad.A.ptr, count: r * a.inFeatures, "lora-a16")
        try device.gemmXWt(n: n, out: r, k: a.inFeatures, x: xin, w: A, c: h, bf16: bf)
        let h16 = try operand(h, count: n * r, "lora-h16")
        let B = try operand(ad.B.ptr, count: a.outFeatures * r, "lora-b16")
        try device.gemm(
            transB: true, m: n, n: a.outFeatures, k: r, a: h16, lda: r, b: B, ldb: r, c: out, ldc: a.outFeatures, alpha: c.scaling,
            beta: 1, bf16: bf)
    }

    /// True when `l` has a LoRA adapter on the device.
    func hasAdapter(_ l: Linear) -> Bool { lora?.adapters[ObjectIdentifier(l)] != nil }

    /// The adapter's backward for dy [n, out] (`LoRAAdapter.backward`): dB += s·dyᵀ·h,
    /// dh = s·dy·B, dA += dhᵀ·dropout(x), dx += dropout(dh·A) (after the base wrote dx; dx nil:
    /// none). `dy16`: dy's bf16 copy in bf16 precision. Does nothing for a Linear without adapter.
    func adapterBackward(_ l: Linear, dy: CUdeviceptr, dy16: CUdeviceptr?, x: CUdeviceptr, n: Int, dx: CUdeviceptr?) throws {
        guard let ad = lora?.adapters[ObjectIdentifier(l)] else { return }
        let a = ad.adapter, c = a.context, r = c.rank, s = c.scaling, inp = a.inFeatures, out = a.outFeatures, bf = precision == .bf16
        guard let h = ad.h, h.bytes >= n * r * 4 else { throw QATError.internal("LoRA backward of \(l.name) without its training forward") }
        var dyIn = dy
        if bf { dyIn = try dy16 ?? operand(dy, count: n * out, "lora-dy16") }
        let gA = try gradient(a.A), gB = try gradient(a.B)
        if let gB {
            let h16 = try operand(h.ptr, count: n * r, "lora-h16")
            try device.gemm(transA: true, m: out, n: r, k: n, a: dyIn, lda: out, b: h16, ldb: r, c: gB, ldc: r, alpha: s, beta: 1, bf16: bf)
        }
        guard gA != nil || dx != nil else { return }
        let dh = try scratch("lora-dh", bytes: n * r * 4)
        let B = try operand(ad.B.ptr, count: out * r, "lora-b16")
        try device.gemm(m: n, n: r, k: out, a: dyIn, lda: out, b: B, ldb: r, c: dh, ldc: r, alpha: s, bf16: bf)
        let dh16 = try operand(dh, count: n * r, "lora-dh16")
        if let gA {
            let xin = try adapterInput(ad, x: x, x16: nil, n: n)
            try device.gemm(transA: true, m: r, n: inp, k: n, a: dh16, lda: r, b: xin, ldb: inp, c: gA, ldc: inp, beta: 1, bf16: bf)
        }
        guard let dx else { return }
        let A = try operand(ad.A.ptr, count: r * inp, "lora-a16")
        if let key = ad.maskKey {
            let t = try scratch("lora-x", bytes: n * inp * 4)
            try device.gemm(m: n, n: inp, k: r, a: dh16, lda: r, b: A, ldb: inp, c: t, ldc: inp, bf16: bf)
            try device.loraDropout(
                t, out: dx, count: n * inp, key: key, threshold: c.dropoutThreshold, scale: c.dropoutScale, accumulate: true)
        } else {
            try device.gemm(m: n, n: inp, k: r, a: dh16, lda: r, b: A, ldb: inp, c: dx, ldc: inp, beta: 1, bf16: bf)
        }
    }
}
