import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant

/// A `CausalLM` on an NVIDIA GPU: the same layers, quantizers and results as the CPU model
/// (`Sources/QATModels/CausalLM.swift`), computed by the CUDA kernels and cuBLAS.
///
/// The host model stays the source of truth for weights and quantizer state: this class
/// uploads the weights once, reads each quantizer's state (enabled, calibrating, amax, format)
/// at every use, and sends calibration maxima back to the host quantizers. Per forward only the
/// token ids go to the device; the loss comes back as one float per row.
public final class CUDAModel: @unchecked Sendable {
    public let model: CausalLM
    public let device: CUDADevice
    public let precision: Precision
    let config: ModelConfig

    /// A Linear's device weights: the fp32 master copy, its fake-quant copy when the weight
    /// quantizer quantizes, and the bf16 copy the bf16 products use.
    final class DeviceLinear {
        let linear: Linear
        /// (A one-float placeholder when `frozen`: the products read `bf16`.)
        let weight: DeviceBuffer
        let bias: DeviceBuffer?
        var fakeQuant: DeviceBuffer?
        var bf16: DeviceBuffer?
        var stale = true
        /// An inference-only copy's Linear (`init(…inferenceOnly:)`): the bf16 copy is all there is.
        var frozen = false
        /// QLoRA: the packed NVFP4 base, decoded into `weight` (and `bf16`), shared scratch, at every use.
        var packed: PackedWeight?
        init(linear: Linear, weight: DeviceBuffer, bias: DeviceBuffer?) { self.linear = linear; self.weight = weight; self.bias = bias }
    }

    var linears: [ObjectIdentifier: DeviceLinear] = [:]
    var tensors: [ObjectIdentifier: DeviceBuffer] = [:]  // by Parameter
    /// The bf16 roundings (fp32) that norm weights and biases are read from, by Parameter, and those not current
    /// (`readStoredDType`, CUDAModel+StoredDType.swift); whether the embedding lookup rounds the same way.
    var rounded: [ObjectIdentifier: DeviceBuffer] = [:]
    var roundedStale = Set<ObjectIdentifier>()
    var embeddingRounded = false
    let cosTable, sinTable: DeviceBuffer
    private let maxPositions: Int

    // Calibration: one u32 slot per quantizer that may calibrate, max-reduced on the device.
    private var slotOf: [ObjectIdentifier: Int] = [:]
    private var slotQuantizers: [TensorQuantizer] = []
    private var slots: DeviceBuffer?
    private var slotsHit = Set<Int>()

    var buffers: Buffers?
    /// Training only: gradients and backward scratch (`prepareTraining`).
    var training: TrainingState?
    var scratchBuffers: [String: DeviceBuffer] = [:]
    /// LoRA adapters and QLoRA's packed bases (CUDAModel+LoRA.swift); nil without them.
    var lora: LoRAState?
    /// True while backward recomputes a layer's forward (activation checkpointing): quantizers
    /// that calibrate record nothing then (the forward already did).
    var recomputing = false

    /// `inferenceOnly` (a forward-only copy: the QAD teacher, `teacher-logprobs`' model): in bf16
    /// each Linear's weight goes to the device as its bf16 copy only, converted through one
    /// reused fp32 staging buffer, so the fp32 weights are never all on the device (a tied
    /// embedding, which the lookup reads, and a Linear with a weight quantizer are uploaded as
    /// usual). Such a copy's weights cannot change (a use after `markWeightsChanged` throws).
    public init(model: CausalLM, device: CUDADevice, precision: Precision, inferenceOnly: Bool = false) throws {
        guard model.isFirstStage && model.isLastStage else {
            throw QATError("the CUDA backend runs whole models; pipeline stages run on the CPU")
        }
        guard model.layers.allSatisfy({ $0.moe == nil }) else {
            throw QATError.unsupported("mixture-of-experts models run on the CPU only in this version: use device: cpu")
        }
        self.model = model
        self.device = device
        self.precision = precision
        config = model.config
        let rope = RoPE(invFreq: config.ropeInvFreq, headDim: config.headDim, maxPositions: max(config.maxPositionEmbeddings, 1))
        maxPositions = rope.maxPositions
        cosTable = try DeviceBuffer(device, floats: rope.cos)
        sinTable = try DeviceBuffer(device, floats: rope.sin)
        var uploaded: [ObjectIdentifier: DeviceBuffer] = [:]
        func upload(_ p: Parameter) throws -> DeviceBuffer {
            if let b = uploaded[ObjectIdentifier(p)] { return b }
            let b = try DeviceBuffer(device, copying: p.value.data, bytes: p.value.count * 4)
            uploaded[ObjectIdentifier(p)] = b
            return b
        }
        _ = try upload(model.embed)
        _ = try upload(model.finalNorm)
        for layer in model.layers {
            for p in [layer.inputNorm, layer.postNorm] + [layer.qNorm, layer.kNorm].compactMap({ $0 }) { _ = try upload(p) }
        }
        var dls: [ObjectIdentifier: DeviceLinear] = [:]
        let bf16Only = model.linears.filter {
            inferenceOnly && precision == .bf16 && $0.weightSource == nil && $0.weightQuantizer == nil && $0.weight !== model.embed
        }
        let staging = try bf16Only.map(\.weight.count).max().map { try DeviceBuffer(device, floats: $0) }
        // A layer's gate and up copies in one allocation (as `adjacentProductCopies` makes them for the others).
        var pairedCopies: [ObjectIdentifier: DeviceBuffer] = [:]
        for layer in model.layers {
            guard let gate = layer.gateProj, let up = layer.upProj, [gate, up].allSatisfy({ l in bf16Only.contains { $0 === l } })
            else { continue }
            let whole = try DeviceBuffer(device, bytes: (gate.weight.count + up.weight.count) * 2)
            pairedCopies[ObjectIdentifier(gate)] = DeviceBuffer(viewOf: whole, offset: 0, bytes: gate.weight.count * 2)
            pairedCopies[ObjectIdentifier(up)] = DeviceBuffer(viewOf: whole, offset: gate.weight.count * 2, bytes: up.weight.count * 2)
        }
        for l in model.linears where l.weightSource == nil {  // (QLoRA's packed bases: `uploadLoRA`)
            let b = try l.bias.map { try upload($0) }
            if let staging, bf16Only.contains(where: { $0 === l }) {
                let count = l.weight.count
                try staging.upload(l.weight.value.data, bytes: count * 4)  // (after the last conversion: one stream)
                let dl = DeviceLinear(linear: l, weight: try DeviceBuffer(device, floats: 1), bias: b)
                dl.bf16 = try pairedCopies[ObjectIdentifier(l)] ?? DeviceBuffer(device, bytes: count * 2)
                try device.toBF16(out: dl.bf16!.ptr, staging.ptr, count: count)
                dl.stale = false
                dl.frozen = true
                dls[ObjectIdentifier(l)] = dl
                continue
            }
            let w = try upload(l.weight)
            dls[ObjectIdentifier(l)] = DeviceLinear(linear: l, weight: w, bias: b)
        }
        try device.synchronize()  // (the staging buffer is released here)
        if precision == .bf16 {
            for layer in model.layers {
                try Self.adjacentProductCopies([layer.qProj, layer.kProj, layer.vProj], dls, device)
                if let gate = layer.gateProj, let up = layer.upProj { try Self.adjacentProductCopies([gate, up], dls, device) }
            }
        }
        tensors = uploaded
        linears = dls
        try uploadLoRA()
    }

    /// The bf16 product copies of Linears that read the same input (a layer's q, k and v; gate and up) as one allocation, in
    /// order, so that the training backward can multiply them as one weight of their rows together
    /// (`fusedProjectionBackward`); every copy is still its own Linear's (`prepare` and the optimizer write it).
    private static func adjacentProductCopies(_ group: [Linear], _ dls: [ObjectIdentifier: DeviceLinear], _ device: CUDADevice) throws {
        let members = group.compactMap { dls[ObjectIdentifier($0)] }
        guard members.count == group.count, members.allSatisfy({ $0.bf16 == nil && !$0.frozen }) else { return }
        let counts = group.map { $0.outFeatures * $0.inFeatures }
        let whole = try DeviceBuffer(device, bytes: counts.reduce(0, +) * 2)
        var offset = 0
        for (dl, count) in zip(members, counts) {
            dl.bf16 = DeviceBuffer(viewOf: whole, offset: offset, bytes: count * 2)
            offset += count * 2
        }
    }

    /// Call after the host weights or any weight quantizer changed (calibration, a step).
    public func markWeightsChanged() {
        for l in linears.values { l.stale = true }
        roundedStale = Set(rounded.keys)
    }

    func tensor(_ p: Parameter) -> CUdeviceptr { tensors[ObjectIdentifier(p)]!.ptr }
    /// The positions of the last training forward grouped by token (the embedding backward's plan), uploaded at the
    /// forward's start beside its tokens: an upload in the backward (a synchronous copy) would hold the host until
    /// the device drained, and the device would then wait for the host's next launches.
    var embeddingGroups: EmbeddingGroups?

    // MARK: Buffers

    /// One decoder layer's activations: every layer keeps its own set in a training forward
    /// (backward reads them), an inference forward reuses one, and so does a training forward
    /// with activation checkpointing (backward recomputes each layer into it). The MLP's h is not
    /// kept in fp32 (`hBuffer`: backward recomputes it from gate and up unless its quantized bf16 copy
    /// is kept), nor are qRaw/kRaw without q/k norms. gate and up are bf16 in bf16 precision (`gateUp16`: the
    /// products' fp32 sums rounded, as PyTorch's bf16 products give them; half the bytes for the SwiGLU kernels to
    /// read), fp32 otherwise.
    final class LayerActivations {
        let rstd1, qRaw, qRstd, kRaw, kRope, kRstd, vRaw, attn, lse, mid, rstd2, gate, up: DeviceBuffer
        let gateUp16: Bool
        /// Attention's fp32 inputs: q after RoPE and the quantized k/v. On the tensor-core path the backward reads
        /// only their bf16 copies (`Slot.q16` …, kept per layer), so every layer shares one set (`Buffers`).
        let q, kq, vq: DeviceBuffer
        /// What attention read: the quantized k/v, or kRope/vRaw when their quantizers are off.
        var kUsed: CUdeviceptr = 0, vUsed: CUdeviceptr = 0

        /// Buffers that only some forward paths write, allocated at first use and then kept.
        enum Slot {
            /// The fp32 normalised inputs of q/k/v and of gate/up (not written when a fused kernel makes the
            /// products' input straight from the residual stream).
            case ln, ln2
            /// The product inputs the fused NVFP4 kernels make (bf16): q/k/v's (`rmsnorm_nvfp4`), gate/up's, and
            /// down_proj's (`swiglu_nvfp4`), kept so that the backward does not make them again.
            case qkvInput, gateUpInput, downInput
            /// o_proj's product input with an NVFP4 input quantizer (bf16), kept for its weight gradient.
            case oInput
            /// The tensor-core attention's bf16 inputs, kept for its backward.
            case q16, k16, v16
        }
        private let device: CUDADevice
        private let slotBytes: [Slot: Int]
        private var slots: [Slot: DeviceBuffer] = [:]
        /// The slots the current forward of this layer wrote.
        private var written: Set<Slot> = []
        private let fixedBytes: Int

        init(
            _ d: CUDADevice, n: Int, batch: Int, seqLen: Int, c: ModelConfig, gateUp16: Bool,
            shared: (q: DeviceBuffer, kq: DeviceBuffer, vq: DeviceBuffer)?
        )
            throws
        {
            let sizes = Self.floats(n: n, batch: batch, seqLen: seqLen, c: c)
            let f = try sizes.dropLast(2).map { try DeviceBuffer(d, floats: $0) }
            (rstd1, qRaw, qRstd, kRaw, kRope, kRstd, vRaw) = (f[0], f[1], f[2], f[3], f[4], f[5], f[6])
            (attn, lse, mid, rstd2) = (f[7], f[8], f[9], f[10])
            // gate and up in one allocation, up right after gate: `linearPair`'s batched product writes both.
            let e = gateUp16 ? 2 : 4
            let gateUp = try DeviceBuffer(d, bytes: (sizes[11] + sizes[12]) * e)
            gate = DeviceBuffer(viewOf: gateUp, offset: 0, bytes: sizes[11] * e)
            up = DeviceBuffer(viewOf: gateUp, offset: sizes[11] * e, bytes: sizes[12] * e)
            self.gateUp16 = gateUp16
            let own = try shared == nil ? Self.attentionInputs(d, n: n, c: c) : nil
            (q, kq, vq) = shared ?? own!
            fixedBytes = f.reduce(0) { $0 + $1.bytes } + gateUp.bytes + (own.map { $0.q.bytes + $0.kq.bytes + $0.vq.bytes } ?? 0)
            device = d
            let C = c.hiddenSize, qd = c.numHeads * c.headDim, kd = c.numKVHeads * c.headDim
            slotBytes = [
                .ln: n * C * 4, .ln2: n * C * 4, .qkvInput: n * C * 2, .gateUpInput: n * C * 2, .downInput: n * c.intermediateSize * 2,
                .oInput: n * qd * 2, .q16: n * qd * 2, .k16: n * kd * 2, .v16: n * kd * 2,
            ]
        }

        /// The floats of each fixed buffer but q/kq/vq, in the order of the stored properties.
        static func floats(n: Int, batch: Int, seqLen: Int, c: ModelConfig) -> [Int] {
            let qd = c.numHeads * c.headDim, kd = c.numKVHeads * c.headDim
            let raw = c.qkNorm ? n : 1  // qRaw, kRaw: one float without q/k norms
            return [
                n, raw * qd, n * c.numHeads, raw * kd, n * kd, n * c.numKVHeads, n * kd,  // rstd1 … vRaw
                n * qd, batch * c.numHeads * seqLen, n * c.hiddenSize, n, n * c.intermediateSize, n * c.intermediateSize,  // attn … up
            ]
        }

        /// Attention's fp32 q, quantized k and v buffers.
        static func attentionInputs(_ d: CUDADevice, n: Int, c: ModelConfig) throws -> (q: DeviceBuffer, kq: DeviceBuffer, vq: DeviceBuffer)
        {
            let kd = n * c.numKVHeads * c.headDim
            return (
                try DeviceBuffer(d, floats: n * c.numHeads * c.headDim), try DeviceBuffer(d, floats: kd), try DeviceBuffer(d, floats: kd)
            )
        }

        /// A forward of this layer begins: no slot holds its values yet.
        func beginForward() { written.removeAll() }

        /// Slot `s`'s buffer for this forward to write (allocated at first use).
        func write(_ s: Slot) throws -> CUdeviceptr {
            if slots[s] == nil { slots[s] = try DeviceBuffer(device, bytes: slotBytes[s]!) }
            written.insert(s)
            return slots[s]!.ptr
        }

        /// Slot `s`'s buffer when the last forward of this layer wrote it.
        func made(_ s: Slot) -> CUdeviceptr? { written.contains(s) ? slots[s]?.ptr : nil }

        /// The buffer of a slot the last forward wrote (for readers that need it).
        func buffer(_ s: Slot) throws -> DeviceBuffer {
            guard written.contains(s), let b = slots[s] else { throw QATError.internal("layer activations: \(s) was not written") }
            return b
        }

        /// Device bytes this set holds now (shared buffers not counted).
        var bytes: Int { fixedBytes + slots.values.reduce(0) { $0 + $1.bytes } }
    }

    final class Buffers {
        let batch, seqLen: Int
        let training: Bool
        /// Training with activation checkpointing: `layers` holds one reusable set.
        let checkpointed: Bool
        /// The residual stream: the input of every layer and the last layer's output (training),
        /// or one buffer updated in place.
        let residuals: [DeviceBuffer]
        let layers: [LayerActivations]
        let final, finalRstd, b16, tokens: DeviceBuffer
        /// bf16 precision: bf16 copies of the normalised inputs and of h, written by the kernels
        /// that produce them (scratch: used at once by the products that follow).
        let ln16, h16, final16: DeviceBuffer?
        /// Widest row of the layers' inputs and outputs (scratch sizes).
        let widest: Int
        init(
            _ d: CUDADevice, batch: Int, seqLen: Int, c: ModelConfig, layers L: Int, bf16: Bool, training: Bool,
            checkpointed: Bool = false
        ) throws {
            self.batch = batch; self.seqLen = seqLen; self.training = training; self.checkpointed = training && checkpointed
            let n = batch * seqLen, C = c.hiddenSize, I = c.intermediateSize
            widest = max(C, c.numHeads * c.headDim, I)
            residuals = try (0..<(training ? L + 1 : 1)).map { _ in try DeviceBuffer(d, floats: n * C) }
            // (the tensor-core attention's backward reads only the bf16 copies each layer keeps: one fp32 set for all)
            let shared =
                try CUDADevice.attentionOnTensorCores(bf16: bf16, headDim: c.headDim)
                ? LayerActivations.attentionInputs(d, n: n, c: c) : nil
            layers = try (0..<(training && !checkpointed ? L : 1)).map { _ in
                try LayerActivations(d, n: n, batch: batch, seqLen: seqLen, c: c, gateUp16: bf16, shared: shared)
            }
            final = try DeviceBuffer(d, floats: n * C); finalRstd = try DeviceBuffer(d, floats: n)
            b16 = try DeviceBuffer(d, bytes: n * widest * 2)
            tokens = try DeviceBuffer(d, bytes: n * 4)
            ln16 = bf16 ? try DeviceBuffer(d, bytes: n * C * 2) : nil
            h16 = bf16 ? try DeviceBuffer(d, bytes: n * I * 2) : nil
            final16 = bf16 ? try DeviceBuffer(d, bytes: n * C * 2) : nil
        }
    }

    func ensureBuffers(batch: Int, seqLen: Int, training: Bool) throws -> Buffers {
        let checkpointed = training && model.activationCheckpointing
        if let b = buffers, b.batch == batch, b.seqLen == seqLen, b.training == training, b.checkpointed == checkpointed { return b }
        buffers = nil  // release first: peak memory is one set
        let b = try Buffers(
            device, batch: batch, seqLen: seqLen, c: config, layers: model.layers.count, bf16: precision == .bf16,
            training: training, checkpointed: checkpointed)
        buffers = b
        return b
    }

    /// Device bytes of weights and activation buffers held now.
    public var deviceBytes: Int { device.bytesInUse }

    // MARK: Quantizers

    /// Applies quantizer `q` to x [rows, cols] into `out`. Returns false (and leaves `out`
    /// unwritten) when the quantizer does not change values; while it calibrates, records
    /// max |x| on the device.
    func quantize(_ hook: FakeQuantHook?, _ x: CUdeviceptr, into out: CUdeviceptr, rows: Int, cols: Int) throws -> Bool {
        guard let hook else { return false }
        guard let q = hook as? TensorQuantizer else { throw QATError("internal: quantizer \(hook.name) is not a TensorQuantizer") }
        guard q.enabled else { return false }
        if q.isCalibrating {
            if !recomputing { try recordCalibration(q, x, count: rows * cols) }  // (a recompute records nothing)
            return false
        }
        guard let a = q.amax else {
            throw QATError("quantizer \(q.name) is enabled but has no amax: calibrate the model first (or disable it in quant_cfg)")
        }
        guard a.isFinite, a > 0 else { throw QATError("quantizer \(q.name): stored amax \(a) is not a finite positive number") }
        switch q.format {
        case .nvfp4(let b):
            guard b == NVFP4.blockSize else { throw QATError("quantizer \(q.name): NVFP4 block size \(b) is not supported (only 16)") }
            try device.nvfp4FakeQuant(x, out: out, rows: rows, cols: cols, globalAmax: a, exportMode: q.nvfp4Mode == .export)
        case .fp8PerTensor:
            try device.fp8FakeQuant(x, out: out, count: rows * cols, amax: a)
        case .int8PerTensor:
            try device.int8FakeQuant(x, out: out, count: rows * cols, amax: a)
        }
        return true
    }

    private func recordCalibration(_ q: TensorQuantizer, _ x: CUdeviceptr, count: Int) throws {
        let id = ObjectIdentifier(q)
        let slot: Int
        if let s = slotOf[id] {
            slot = s
        } else {
            slot = slotQuantizers.count
            slotOf[id] = slot
            slotQuantizers.append(q)
            if (slots?.bytes ?? 0) < slotQuantizers.count * 4 {
                let bigger = try DeviceBuffer(device, bytes: max(256, slotQuantizers.count * 2) * 4)
                try bigger.zero()
                if let old = slots { try device.check(device.api.cuMemcpyDtoD(bigger.ptr, old.ptr, old.bytes), "cuMemcpyDtoD") }
                slots = bigger
            }
        }
        slotsHit.insert(slot)
        try device.absMax(x, count: count, slot: slots!.ptr + CUdeviceptr(slot * 4))
    }

    /// Sends the maxima of this forward to the host quantizers (one `collect` each, as a CPU
    /// forward makes) and clears the slots.
    private func flushCalibration() throws {
        guard !slotsHit.isEmpty, let slots else { return }
        var bits = [UInt32](repeating: 0, count: slotQuantizers.count)
        try bits.withUnsafeMutableBytes { try slots.download($0.baseAddress!, bytes: $0.count) }
        for s in slotsHit.sorted() { slotQuantizers[s].collect(absMax: Float(bitPattern: bits[s])) }
        slotsHit.removeAll()
        try slots.zero()
    }

    // MARK: Forward

    /// Makes a Linear's device weight current: the fake-quant copy when its weight quantizer
    /// quantizes, and the bf16 copy in bf16 precision.
    func prepare(_ dl: DeviceLinear) throws {
        if dl.frozen { throw QATError.internal("\(dl.linear.name): the weights of an inference-only device copy changed") }
        if let p = dl.packed { return try decode(p, into: dl) }  // QLoRA: stays stale, decoded again at the next use
        let l = dl.linear
        var source = dl.weight.ptr
        let count = l.outFeatures * l.inFeatures
        if precision == .bf16, let (a, export) = nvfp4Quantizing(l.weightQuantizer) {
            // Straight into the bf16 copy, in one pass: no fp32 fake-quant copy is kept.
            dl.fakeQuant = nil
            if dl.bf16 == nil { dl.bf16 = try DeviceBuffer(device, bytes: count * 2) }
            try device.nvfp4FakeQuant(
                dl.weight.ptr, out: 0, bf16Out: dl.bf16!.ptr, rows: l.outFeatures, cols: l.inFeatures, globalAmax: a, exportMode: export)
            dl.stale = false
            return
        }
        if let wq = l.weightQuantizer, wq.isQuantizing {
            if dl.fakeQuant == nil { dl.fakeQuant = try DeviceBuffer(device, floats: count) }
            _ = try quantize(wq, dl.weight.ptr, into: dl.fakeQuant!.ptr, rows: l.outFeatures, cols: l.inFeatures)
            source = dl.fakeQuant!.ptr
        } else {
            dl.fakeQuant = nil
        }
        if precision == .bf16 {
            if dl.bf16 == nil { dl.bf16 = try DeviceBuffer(device, bytes: count * 2) }
            try device.toBF16(out: dl.bf16!.ptr, source, count: count)
        }
        dl.stale = false
    }

    /// What the optimizer's kernel (`adamw_update`) writes besides the new fp32 values of a parameter, in the same
    /// pass, in bf16 precision: a Linear weight's bf16 product copy (`w16`), as `prepare` would make it at the next use
    /// (the bf16 rounding of the weights, or, with an NVFP4 weight quantizer that quantizes (`nvfp4`), of their fake
    /// quant); or the bf16 rounding (fp32) a norm weight or a bias is read from (`roundedID`, `readStoredDType`).
    public struct WeightRefresh {
        /// What the kernel writes: a Linear's bf16 product copy (of its NVFP4 fake quant when `nvfp4` is given), or
        /// the fp32 rounding of a norm weight or bias (`rounded`, by parameter).
        enum Copy {
            case product(linear: ObjectIdentifier, nvfp4: (amax: Float, export: Bool)?)
            case rounded(ObjectIdentifier)
        }
        let copy: Copy
        let w16: CUdeviceptr

        var linearID: ObjectIdentifier? { if case .product(let id, _) = copy { return id } else { return nil } }
        var roundedID: ObjectIdentifier? { if case .rounded(let id) = copy { return id } else { return nil } }
        var nvfp4: (amax: Float, export: Bool)? { if case .product(_, let q) = copy { return q } else { return nil } }

        /// `adamw_update`'s refresh code: 0 the bf16 copy, 1 the bf16 copy of the NVFP4 fake quant, 2 the fp32 rounding.
        var code: Int { roundedID != nil ? 2 : nvfp4 == nil ? 0 : 1 }

        /// Whether `adamw_update` can write it for a parameter of `count` floats with these arrays (its contract:
        /// the four arrays 16-byte aligned, the copy 8-byte aligned (16 for the fp32 rounding), whole 16-blocks for NVFP4).
        func fits(p: CUdeviceptr, g: CUdeviceptr, m: CUdeviceptr, v: CUdeviceptr, count: Int) -> Bool {
            (p | g | m | v) % 16 == 0 && w16 % (roundedID == nil ? 8 : 16) == 0 && (nvfp4 == nil || count % 16 == 0)
        }
    }

    /// The `WeightRefresh` of each parameter whose copy the optimizer step can write, by parameter: the Linear weights'
    /// product copies (bf16 precision, no other weight quantizer format, rows of whole 16-blocks for NVFP4, not an
    /// inference-only copy or QLoRA's packed base) and the roundings `readStoredDType` keeps; the other Linears' copies
    /// are made by `prepare`, and the other roundings by `read`, at their next use.
    public func weightRefreshes() throws -> [ObjectIdentifier: WeightRefresh] {
        guard precision == .bf16 else { return [:] }
        var out: [ObjectIdentifier: WeightRefresh] = [:]
        for (id, dl) in linears where !dl.frozen && dl.packed == nil {
            let l = dl.linear, count = l.outFeatures * l.inFeatures
            let nvfp4 = nvfp4Quantizing(l.weightQuantizer)
            if nvfp4 == nil && l.weightQuantizer?.isQuantizing == true { continue }
            if nvfp4 != nil && l.inFeatures % NVFP4.blockSize != 0 { continue }
            if dl.bf16 == nil { dl.bf16 = try DeviceBuffer(device, bytes: count * 2) }
            out[ObjectIdentifier(l.weight)] = WeightRefresh(
                copy: .product(linear: id, nvfp4: nvfp4.map { (amax: $0.0, export: $0.1) }), w16: dl.bf16!.ptr)
        }
        for (id, r) in rounded { out[id] = WeightRefresh(copy: .rounded(id), w16: r.ptr) }
        return out
    }

    /// After the optimizer step wrote these refreshes: their copies are current (no fp32 fake-quant copy is kept, as
    /// `prepare` keeps none in bf16); every other Linear's is stale, and so is the rounding of every other parameter
    /// the step updated (one with a gradient).
    public func weightsStepped(refreshed: [WeightRefresh]) {
        let ids = Set(refreshed.compactMap(\.linearID)), roundedIDs = Set(refreshed.compactMap(\.roundedID))
        for (id, l) in linears {
            l.stale = !ids.contains(id)
            if ids.contains(id) { l.fakeQuant = nil }
        }
        for p in model.parameters where rounded[ObjectIdentifier(p)] != nil && hasGradient(p) {
            if roundedIDs.contains(ObjectIdentifier(p)) {
                roundedStale.remove(ObjectIdentifier(p))
            } else {
                roundedStale.insert(ObjectIdentifier(p))
            }
        }
    }

    /// (amax, export mode) of an NVFP4 quantizer that quantizes with a valid amax: its fake quant
    /// can write a bf16 result directly. nil otherwise (`quantize` then handles it, or says what is wrong).
    func nvfp4Quantizing(_ hook: FakeQuantHook?) -> (Float, Bool)? {
        guard let q = hook as? TensorQuantizer, q.isQuantizing, case .nvfp4(16) = q.format, let a = q.amax, a.isFinite, a > 0 else {
            return nil
        }
        return (a, q.nvfp4Mode == .export)
    }

    /// What a Linear's products multiply for input x [n, in]: x through its input quantizer, in
    /// bf16 precision as a bf16 copy in `b16` (an NVFP4 input quantizer writes it directly, in one
    /// pass; `x16`, x's bf16 copy when its producer wrote one, is used when no quantizer changes
    /// x), in fp32 in the quantized-input scratch or x itself. The forward and the weight gradient both call this.
    func productInput(_ l: Linear, _ x: CUdeviceptr, x16: CUdeviceptr? = nil, n: Int, buffers b: Buffers) throws -> CUdeviceptr {
        guard precision == .bf16 else {
            let qin = try quantizedInputBuffer(b)
            return try quantize(l.inputQuantizer, x, into: qin, rows: n, cols: l.inFeatures) ? qin : x
        }
        if let (a, export) = nvfp4Quantizing(l.inputQuantizer) {
            try device.nvfp4FakeQuant(x, out: 0, bf16Out: b.b16.ptr, rows: n, cols: l.inFeatures, globalAmax: a, exportMode: export)
        } else if try quantize(l.inputQuantizer, x, into: try quantizedInputBuffer(b), rows: n, cols: l.inFeatures) {
            try device.toBF16(out: b.b16.ptr, try quantizedInputBuffer(b), count: n * l.inFeatures)
        } else if let x16 {
            return x16
        } else {
            try device.toBF16(out: b.b16.ptr, x, count: n * l.inFeatures)
        }
        return b.b16.ptr
    }

    /// The product input of Linears that read the same x (q/k/v, gate/up), computed once, when
    /// all their input quantizers quantize alike (calibration gives each fused group one amax);
    /// nil otherwise (each Linear then makes its own). Valid until `b.b16` / the fp32 quantized input is next written.
    func sharedProductInput(_ ls: [Linear], _ x: CUdeviceptr, x16: CUdeviceptr? = nil, n: Int, buffers b: Buffers) throws -> CUdeviceptr? {
        guard let first = ls.first?.inputQuantizer, first.isQuantizing,
            ls.dropFirst().allSatisfy({ $0.inFeatures == ls[0].inFeatures && $0.inputQuantizer?.quantizesLike(first) == true })
        else { return nil }
        return try productInput(ls[0], x, x16: x16, n: n, buffers: b)
    }

    /// The forward's RMSNorm of x [n, C] (weight `norm`) before the Linears `ls` that read it. When nothing else
    /// reads the normalised rows (bf16 products, every input quantizer NVFP4 and quantizing alike, no LoRA adapter
    /// and no clipped STE: both read them), straight into their shared product input (`rmsnorm_nvfp4`, bit for bit
    /// the norm then `sharedProductInput`) in layer slot `fused`, which the backward reads again; the fp32 rows
    /// are then not written. Otherwise the norm into slot `normalized` (and its bf16 copy into `b.ln16`), then
    /// `sharedProductInput` (nil when the Linears make their own). `rstd` is written either way. Returns the
    /// product input and the normalised rows (0 when not written).
    func normForward(
        _ norm: Parameter, _ ls: [Linear], _ x: CUdeviceptr, _ a: LayerActivations, normalized: LayerActivations.Slot,
        fused: LayerActivations.Slot, rstd: CUdeviceptr, n: Int, buffers b: Buffers
    ) throws -> (input: CUdeviceptr?, normalized: CUdeviceptr) {
        let c = config.hiddenSize
        if precision == .bf16, c % 16 == 0, let first = ls.first?.inputQuantizer, let (amax, export) = nvfp4Quantizing(first),
            ls.allSatisfy({
                $0.inFeatures == c && $0.inputQuantizer?.quantizesLike(first) == true && !hasAdapter($0)
                    && ($0.inputQuantizer as? TensorQuantizer)?.ste != .clipped
            })
        {
            let out = try a.write(fused)
            try device.rmsnormNVFP4(
                bf16Out: out, rstd: rstd, inp: x, weight: try read(norm), n: n, c: c, eps: config.rmsNormEps, globalAmax: amax,
                exportMode: export)
            return (out, 0)
        }
        // (an inference forward whose Linears read only the bf16 copy writes no fp32 rows: no input quantizer at work,
        // no adapter; training keeps them, its weight gradients read them)
        let ln16 = b.ln16?.ptr
        let bf16Only = !b.training && ln16 != nil && ls.allSatisfy { readsOnlyBF16Input($0) }
        let out = bf16Only ? 0 : try a.write(normalized)
        try device.rmsnorm(out: out, rstd: rstd, inp: x, weight: try read(norm), n: n, c: c, eps: config.rmsNormEps, out16: ln16 ?? 0)
        return (bf16Only ? nil : try sharedProductInput(ls, out, x16: ln16, n: n, buffers: b), out)
    }

    /// Whether a bf16 Linear's forward reads only its input's bf16 copy: no input quantizer enabled (one that
    /// calibrates or quantizes reads the fp32 values) and no LoRA adapter.
    func readsOnlyBF16Input(_ l: Linear) -> Bool {
        precision == .bf16 && (l.inputQuantizer.map { ($0 as? TensorQuantizer)?.enabled == false } ?? true) && !hasAdapter(l)
    }

    /// out [n, out] = x [n, in] · Wᵀ (+ b), through the input quantizer. `x16`: x's bf16 copy,
    /// when its producer wrote one (used when no quantizer changes x). `input`: the product
    /// input already made (`sharedProductInput`). `out16`: out is bf16 (bf16 products without bias or adapter).
    func linear(
        _ l: Linear, _ x: CUdeviceptr, x16: CUdeviceptr? = nil, input made: CUdeviceptr? = nil, out: CUdeviceptr, n: Int,
        buffers b: Buffers, accumulate: Bool = false, out16: Bool = false
    ) throws {
        guard let dl = linears[ObjectIdentifier(l)] else { throw QATError("internal: \(l.name) has no device weights") }
        if dl.stale { try prepare(dl) }
        let input = try made ?? productInput(l, x, x16: x16, n: n, buffers: b)
        let w = precision == .bf16 ? dl.bf16!.ptr : (dl.fakeQuant ?? dl.weight).ptr
        if (accumulate || out16) && (dl.bias != nil || hasAdapter(l)) {  // (both are added after the product: another order of sums)
            throw QATError.internal("\(l.name): an accumulating or bf16 product with a bias or an adapter")
        }
        try device.gemmXWt(
            n: n, out: l.outFeatures, k: l.inFeatures, x: input, w: w, c: out, bf16: precision == .bf16, beta: accumulate ? 1 : 0,
            c16: out16)
        if let bias = l.bias { try device.addBias(out, bias: try read(bias), rows: n, cols: l.outFeatures) }
        if let ad = lora?.adapters[ObjectIdentifier(l)] { try adapterForward(ad, x: x, x16: x16, out: out, n: n, training: b.training) }
    }

    /// Two Linears of one input and shape (a layer's gate and up): `linear` of each, or, when nothing but the bf16
    /// product makes their outputs (bf16, no bias, no adapter, one product input: the shared NVFP4 one or x16 with no
    /// input quantizer at work) and both their weight copies and their outputs lie one after the other, one strided
    /// batched product. Every model takes the same path for the same Linears (bf16 models keep gate and up adjacent,
    /// `adjacentProductCopies`, and `LayerActivations` their outputs), so a verify's two sides compute alike.
    /// `outs16`: the outputs are bf16 (`LayerActivations.gateUp16`): the batched product rounds its sums; the one by
    /// one path writes fp32 (a bias or an adapter adds to it) into scratch and rounds that.
    func linearPair(
        _ l0: Linear, _ l1: Linear, _ x: CUdeviceptr, x16: CUdeviceptr?, input made: CUdeviceptr?, outs: (CUdeviceptr, CUdeviceptr),
        outs16: Bool, n: Int, buffers b: Buffers
    ) throws {
        if precision == .bf16, l0.inFeatures == l1.inFeatures, l0.outFeatures == l1.outFeatures,
            [l0, l1].allSatisfy({ $0.bias == nil && !hasAdapter($0) }),
            let input = made ?? (x16.flatMap { [l0, l1].allSatisfy(readsOnlyBF16Input) ? $0 : nil }),
            let d0 = linears[ObjectIdentifier(l0)], let d1 = linears[ObjectIdentifier(l1)]
        {
            if d0.stale { try prepare(d0) }
            if d1.stale { try prepare(d1) }
            let count = l0.outFeatures * l0.inFeatures, outCount = n * l0.outFeatures
            if let w0 = d0.bf16?.ptr, d1.bf16?.ptr == w0 + CUdeviceptr(count * 2),
                outs.1 == outs.0 + CUdeviceptr(outCount * (outs16 ? 2 : 4))
            {
                return try device.gemmXWtBatched(
                    n: n, out: l0.outFeatures, k: l0.inFeatures, x: input, w: w0, wStride: count, c: outs.0, cStride: outCount, count: 2,
                    c16: outs16)
            }
        }
        for (l, out) in [(l0, outs.0), (l1, outs.1)] {
            let out32 = outs16 ? try scratch("pair-out32", bytes: n * l.outFeatures * 4) : out
            try linear(l, x, x16: x16, input: made, out: out32, n: n, buffers: b)
            if outs16 { try device.toBF16(out: out, out32, count: n * l.outFeatures) }
        }
    }

    /// tokens [B, T] → the final normalised hidden states [B·T, C] on the device (valid until
    /// the next forward). `saveForBackward`: every layer keeps its activations (training), or,
    /// with the host model's `activationCheckpointing`, only its input (backward recomputes).
    public func forward(tokens: [Int32], batch: Int, seqLen: Int, saveForBackward: Bool = false) throws -> CUdeviceptr {
        let c = config, C = c.hiddenSize, N = batch * seqLen
        guard tokens.count == N else { throw QATError("forward: \(tokens.count) tokens for batch \(batch) × seq_len \(seqLen)") }
        guard seqLen <= maxPositions else {
            throw QATError("sequence length \(seqLen) exceeds max_position_embeddings (\(maxPositions)) of this model")
        }
        for (i, t) in tokens.enumerated() where t < 0 || Int(t) >= c.vocabSize {
            throw QATError("token id \(t) at position \(i) is outside the vocabulary (size \(c.vocabSize))")
        }
        let b = try ensureBuffers(batch: batch, seqLen: seqLen, training: saveForBackward)
        try tokens.withUnsafeBytes { try b.tokens.upload($0.baseAddress!, bytes: $0.count) }
        if saveForBackward { embeddingGroups = try EmbeddingGroups(device, tokens: tokens, reusing: embeddingGroups) }
        try device.embedding(
            out: b.residuals[0].ptr, tokens: b.tokens.ptr, table: tensor(model.embed), n: N, c: C, roundBF16: embeddingRounded)
        for (l, L) in model.layers.enumerated() {
            let a = b.layers[saveForBackward && !b.checkpointed ? l : 0]
            let xin = b.residuals[saveForBackward ? l : 0].ptr, xout = b.residuals[saveForBackward ? l + 1 : 0].ptr
            try layerForward(L, a, xin: xin, xout: xout, b: b)
        }
        let last = b.residuals[saveForBackward ? model.layers.count : 0].ptr
        try device.rmsnorm(
            out: b.final.ptr, rstd: b.finalRstd.ptr, inp: last, weight: try read(model.finalNorm), n: N, c: C, eps: c.rmsNormEps,
            out16: b.final16?.ptr ?? 0)
        try flushCalibration()
        return b.final.ptr
    }

    /// One decoder layer: xout = mid + mlp(ln2(mid)), mid = xin + attention(ln1(xin)) (xout may be xin).
    func layerForward(_ L: DecoderLayer, _ a: LayerActivations, xin: CUdeviceptr, xout: CUdeviceptr, b: Buffers) throws {
        let c = config, C = c.hiddenSize, N = b.batch * b.seqLen, H = c.numHeads, Hkv = c.numKVHeads, D = c.headDim, eps = c.rmsNormEps
        let ln16 = b.ln16?.ptr
        a.beginForward()
        let (qkv, ln) = try normForward(
            L.inputNorm, [L.qProj, L.kProj, L.vProj], xin, a, normalized: .ln, fused: .qkvInput, rstd: a.rstd1.ptr, n: N, buffers: b)
        try linear(L.qProj, ln, x16: ln16, input: qkv, out: c.qkNorm ? a.qRaw.ptr : a.q.ptr, n: N, buffers: b)
        try linear(L.kProj, ln, x16: ln16, input: qkv, out: c.qkNorm ? a.kRaw.ptr : a.kRope.ptr, n: N, buffers: b)
        try linear(L.vProj, ln, x16: ln16, input: qkv, out: a.vRaw.ptr, n: N, buffers: b)
        if let qn = L.qNorm, let kn = L.kNorm {
            try device.rmsnorm(out: a.q.ptr, rstd: a.qRstd.ptr, inp: a.qRaw.ptr, weight: try read(qn), n: N * H, c: D, eps: eps)
            try device.rmsnorm(out: a.kRope.ptr, rstd: a.kRstd.ptr, inp: a.kRaw.ptr, weight: try read(kn), n: N * Hkv, c: D, eps: eps)
        }
        // On the tensor cores the backward reads only q, k and v's bf16 copies: RoPE writes q's, attention k's and v's.
        let tensorCores = CUDADevice.attentionOnTensorCores(bf16: precision == .bf16, headDim: D)
        try device.rope(
            a.q.ptr, cos: cosTable.ptr, sin: sinTable.ptr, rows: N, seqLen: b.seqLen, heads: H, headDim: D,
            x16: tensorCores ? try a.write(.q16) : 0)
        try device.rope(a.kRope.ptr, cos: cosTable.ptr, sin: sinTable.ptr, rows: N, seqLen: b.seqLen, heads: Hkv, headDim: D)
        a.kUsed = try quantize(L.kQuantizer, a.kRope.ptr, into: a.kq.ptr, rows: N * Hkv, cols: D) ? a.kq.ptr : a.kRope.ptr
        a.vUsed = try quantize(L.vQuantizer, a.vRaw.ptr, into: a.vq.ptr, rows: N * Hkv, cols: D) ? a.vq.ptr : a.vRaw.ptr
        try device.attention(
            out: a.attn.ptr, lse: a.lse.ptr, q: a.q.ptr, k: a.kUsed, v: a.vUsed, batch: b.batch, seqLen: b.seqLen, heads: H,
            kvHeads: Hkv, headDim: D, window: c.slidingWindow, bf16: precision == .bf16,
            kv16: tensorCores ? (try a.write(.k16), try a.write(.v16)) : nil)  // (no scratch: the copies go to the layer)
        guard let gate = L.gateProj, let up = L.upProj, let down = L.downProj else {
            throw QATError.internal("layer \(L.index) has no MLP")
        }
        // An inference forward updates its one residual buffer in place: o_proj and down_proj add their products to it
        // (cuBLAS's beta = 1: the fp32 sum `add` makes) when nothing is added to their outputs after the product.
        let inPlace = !b.training && xin == xout && [L.oProj, down].allSatisfy { $0.bias == nil && !hasAdapter($0) }
        let mid = inPlace ? xin : a.mid.ptr
        try linear(
            L.oProj, a.attn.ptr, input: try keptNVFP4Input(L.oProj, a.attn.ptr, a, .oInput, n: N), out: mid, n: N, buffers: b,
            accumulate: inPlace)
        if !inPlace { try device.add(a.mid.ptr, xin, count: N * C) }  // mid = x + attn
        let (gateUp, ln2) = try normForward(
            L.postNorm, [gate, up], mid, a, normalized: .ln2, fused: .gateUpInput, rstd: a.rstd2.ptr, n: N, buffers: b)
        try linearPair(gate, up, ln2, x16: ln16, input: gateUp, outs: (a.gate.ptr, a.up.ptr), outs16: a.gateUp16, n: N, buffers: b)
        if let downInput = try fusedDownInput(down, a, b) {  // bf16 + NVFP4: h straight into its quantized bf16 copy
            try linear(down, 0, input: downInput, out: xout, n: N, buffers: b, accumulate: inPlace)  // (h itself is not stored)
        } else {
            // fp32 h only when something reads it (an input quantizer, a LoRA adapter, the fp32 product);
            // its bf16 copy only when the product reads h unchanged.
            let quantizes = down.inputQuantizer.map { $0.isQuantizing || $0.isCalibrating } == true
            let h32 = precision == .fp32 || quantizes || hasAdapter(down), h16 = quantizes ? nil : b.h16?.ptr
            let h = h32 ? try hBuffer(b) : 0
            try device.swiglu(out: h, gate: a.gate.ptr, up: a.up.ptr, count: N * c.intermediateSize, out16: h16 ?? 0, in16: a.gateUp16)
            try linear(down, h, x16: h16, out: xout, n: N, buffers: b, accumulate: inPlace)
        }
        if !inPlace { try device.add(xout, a.mid.ptr, count: N * C) }  // out = mid + mlp
    }

    /// The fp32 products' quantized input [n, widest] (fp32 precision, and quantizers other than
    /// NVFP4 in bf16): allocated at first use, so bf16 NVFP4 runs never hold it.
    func quantizedInputBuffer(_ b: Buffers) throws -> CUdeviceptr {
        try scratch("quantized-input", bytes: b.batch * b.seqLen * b.widest * 4)
    }

    /// The MLP's h = silu(gate)·up [n, I] of the layer at hand, one for all layers (not kept per
    /// layer: backward recomputes it), allocated at first use (never when `swiglu_nvfp4` makes
    /// down_proj's input directly).
    func hBuffer(_ b: Buffers) throws -> CUdeviceptr {
        try scratch(Self.hScratch, bytes: b.batch * b.seqLen * config.intermediateSize * 4)
    }
    static let hScratch = "mlp-h"

    /// down_proj's product input made by `swiglu_nvfp4` from gate and up in one pass, into layer slot
    /// `downInput` (the backward reads it again), when that is all anything reads of h: bf16 precision (bf16 gate and up), an NVFP4
    /// input quantizer that quantizes, no LoRA adapter (it reads h), no clipped STE (its backward reads h). nil otherwise.
    func fusedDownInput(_ down: Linear, _ a: LayerActivations, _ b: Buffers) throws -> CUdeviceptr? {
        guard a.gateUp16, let (amax, export) = nvfp4Quantizing(down.inputQuantizer), !hasAdapter(down),
            (down.inputQuantizer as? TensorQuantizer)?.ste != .clipped
        else { return nil }
        let out = try a.write(.downInput)
        try device.swigluNVFP4(
            gate: a.gate.ptr, up: a.up.ptr, bf16Out: out, rows: b.batch * b.seqLen, cols: config.intermediateSize,
            globalAmax: amax, exportMode: export)
        return out
    }

    /// A Linear's product input in bf16 precision with an NVFP4 input quantizer that quantizes (`nvfp4_fake_quant` of x
    /// [n, in]), written into layer slot `slot` for the backward's weight gradient to read again; nil otherwise.
    func keptNVFP4Input(_ l: Linear, _ x: CUdeviceptr, _ a: LayerActivations, _ slot: LayerActivations.Slot, n: Int) throws
        -> CUdeviceptr?
    {
        guard precision == .bf16, let (amax, export) = nvfp4Quantizing(l.inputQuantizer) else { return nil }
        let out = try a.write(slot)
        try device.nvfp4FakeQuant(x, out: 0, bf16Out: out, rows: n, cols: l.inFeatures, globalAmax: amax, exportMode: export)
        return out
    }

    /// The attention backward's scratch for the tensor-core kernels' bf16 inputs; 0 in fp32. (The model's forward writes
    /// q, k and v's copies into layer slots, which the backward reads, so of this scratch only dout's part is written.)
    func attentionScratch16(_ b: Buffers) throws -> CUdeviceptr {
        guard precision == .bf16 else { return 0 }
        let c = config, n = b.batch * b.seqLen * c.headDim
        return try scratch("attention16", bytes: CUDADevice.attentionScratchBytes(nq: n * c.numHeads, nk: n * c.numKVHeads))
    }

    // MARK: Loss head

    /// Rows per lm_head chunk instead of the 256 MiB of fp32 logits (the selftest's small models: several chunks).
    var lossChunkRows: Int?
    var logitsChunk: DeviceBuffer?
    var rowLoss: DeviceBuffer?
    var targetsBuffer: DeviceBuffer?

    /// Rows of logits per lm_head chunk: about 256 MiB of fp32 logits at most. (Rounding them down to a multiple of
    /// 128, 512 rather than 523 at Llama-3.2-1B's vocabulary, made the lm_head products slower on the H200:
    /// `bench/gpu-h200-bench-s14-call2.txt`.)
    func chunkRows(_ n: Int) -> Int { max(1, min(n, lossChunkRows ?? (256 << 20) / (4 * config.vocabSize))) }

    /// Cross-entropy sum and valid-target count over `n` rows of final hidden states, through a
    /// chunked lm_head: no [n × V] logits are held.
    public func lossSums(hidden: CUdeviceptr, targets: [Int32], n: Int) throws -> (sum: Double, valid: Int) {
        let V = config.vocabSize, C = config.hiddenSize, rows = chunkRows(n)
        guard let b = buffers else { throw QATError("internal: lossSums before forward") }
        if (logitsChunk?.bytes ?? 0) < rows * V * 4 { logitsChunk = nil; logitsChunk = try DeviceBuffer(device, floats: rows * V) }
        if (rowLoss?.bytes ?? 0) < rows * 4 { rowLoss = try DeviceBuffer(device, floats: rows) }
        if (targetsBuffer?.bytes ?? 0) < n * 4 { targetsBuffer = try DeviceBuffer(device, bytes: n * 4) }
        try targets.withUnsafeBytes { try targetsBuffer!.upload($0.baseAddress!, bytes: n * 4) }
        var sum = 0.0, valid = 0
        var start = 0
        while start < n {
            let r = min(rows, n - start)
            // The bf16 copy of the final hidden states, when `hidden` is this model's own output.
            let h16 = hidden == b.final.ptr ? b.final16.map { $0.ptr + CUdeviceptr(start * C * 2) } : nil
            try linear(model.lmHead, hidden + CUdeviceptr(start * C * 4), x16: h16, out: logitsChunk!.ptr, n: r, buffers: b)
            try device.crossEntropyRows(
                rowLoss: rowLoss!.ptr, logits: logitsChunk!.ptr, targets: targetsBuffer!.ptr + CUdeviceptr(start * 4),
                rows: r, vocab: V)
            let losses = try rowLoss!.floats(r)
            for i in 0..<r where targets[start + i] != CrossEntropy.ignoreIndex {
                sum += Double(losses[i])
                valid += 1
            }
            start += r
        }
        return (sum, valid)
    }

    /// The full logits [B·T, V] of a forward, downloaded (selftest and verification only).
    public func logits(tokens: [Int32], batch: Int, seqLen: Int) throws -> [Float] {
        let hidden = try forward(tokens: tokens, batch: batch, seqLen: seqLen)
        let n = batch * seqLen, V = config.vocabSize
        let out = try DeviceBuffer(device, floats: n * V)
        try linear(model.lmHead, hidden, x16: buffers!.final16?.ptr, out: out.ptr, n: n, buffers: buffers!)
        return try out.floats(n * V)
    }

    /// As `logits`, in a host tensor [B·T, V] (`Verification.compare`'s form).
    public func logitsTensor(tokens: [Int32], batch: Int, seqLen: Int) throws -> Tensor {
        let v = try logits(tokens: tokens, batch: batch, seqLen: seqLen)
        return Tensor(shape: [batch * seqLen, config.vocabSize], values: v)
    }

    /// Validation loss by the project's protocol (`Evaluation.evaluate`) on the GPU.
    public func evaluate(
        stream: [Int32], seqLen: Int, batchSize: Int, maxSequences: Int? = nil,
        progress: ((Int, Int) -> Void)? = nil
    ) throws -> EvalResult {
        try Evaluation.evaluate(
            stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences,
            progress: progress
        ) { tokens, targets, b in
            let hidden = try forward(tokens: tokens, batch: b, seqLen: seqLen)
            return try lossSums(hidden: hidden, targets: targets, n: b * seqLen)
        }
    }

    /// A forward hook for `Calibration.run`: the GPU forward, whose maxima land in the host
    /// quantizers. Weight quantizers are observed on the host (Calibration.run does that for
    /// Linears that no host forward reached), so their amax is exact.
    public func calibrationForward(seqLen: Int) -> (_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>? {
        { [self] tokens, b in
            markWeightsChanged()
            _ = try forward(tokens: tokens, batch: b, seqLen: seqLen)
            return nil
        }
    }
}
