import QATCore
import QATModels

extension TensorQuantizer: FakeQuantHook {
    /// Quantizes (not just observes) once enabled, calibrated and out of calibration.
    public var isQuantizing: Bool { enabled && !isCalibrating && amax != nil }
}

/// The quantizers of a model, in model order, with ModelOpt's names: every Linear gets
/// `<module>.weight_quantizer` and `<module>.input_quantizer`; every attention gets
/// `<layer>.self_attn.k_bmm_quantizer` / `v_bmm_quantizer` on the key/value states after
/// RoPE (the FP8 KV cache). A glob in quant_cfg therefore means what it means in ModelOpt.
public final class QuantizerSet {
    public let all: [TensorQuantizer]
    public let byName: [String: TensorQuantizer]
    /// Quantizers that must share one amax (q/k/v and gate/up — per expert in MoE layers,
    /// ModelOpt's `sync_moe_gate_up_amax` — weights and inputs apart): inference engines fuse
    /// them into one GEMM with one scale.
    public let fusedGroups: [[TensorQuantizer]]
    /// What the last calibration saw (experts without routed tokens, fallback amax values).
    public var calibrationReport: CalibrationReport?

    public var enabled: [TensorQuantizer] { all.filter(\.enabled) }

    /// Creates the quantizers `config` resolves and attaches the enabled ones to `model`.
    ///
    /// NVFP4 fake quant defaults to the export math (`.export`: block scales clamped to
    /// [2^-9, 448], zero blocks scale 1), so the trained model is bit for bit what the
    /// exported checkpoint computes. `.modelOpt` reproduces ModelOpt's Triton training
    /// kernel instead (no lower clamp; a block whose scale·gs < 1e-5 becomes zero), which
    /// can differ from its own export in those corner blocks.
    public init(model: CausalLM, config: QuantConfig, ste: STEMode? = nil, nvfp4Mode: NVFP4.FakeQuantMode = .export) {
        let names = QuantizerSet.names(model)
        let qs = config.makeQuantizers(names)
        for q in qs { q.nvfp4Mode = nvfp4Mode }
        if let ste { for q in qs { q.ste = ste } }
        var by: [String: TensorQuantizer] = [:]
        for q in qs { by[q.name] = q }
        all = qs
        byName = by
        func hook(_ name: String) -> TensorQuantizer? { by[name].flatMap { $0.enabled ? $0 : nil } }
        for l in model.linears {
            l.weightQuantizer = hook(l.name + ".weight_quantizer")
            l.inputQuantizer = hook(l.name + ".input_quantizer")
        }
        for layer in model.layers {
            layer.kQuantizer = hook("\(layer.prefix).self_attn.k_bmm_quantizer")
            layer.vQuantizer = hook("\(layer.prefix).self_attn.v_bmm_quantizer")
        }
        var groups: [[TensorQuantizer]] = []
        for layer in model.layers {
            for modules in layer.fusedGroups {
                for kind in ["weight_quantizer", "input_quantizer"] {
                    let g = modules.compactMap { by[$0.name + "." + kind] }.filter(\.enabled)
                    if g.count > 1 { groups.append(g) }
                }
            }
        }
        fusedGroups = groups
        model.markWeightsChanged()
    }

    /// Every quantizer name the model has, in module order.
    public static func names(_ model: CausalLM) -> [String] {
        var out: [String] = []
        for layer in model.layers {
            for l in layer.linears { out += [l.name + ".weight_quantizer", l.name + ".input_quantizer"] }
            out += ["\(layer.prefix).self_attn.k_bmm_quantizer", "\(layer.prefix).self_attn.v_bmm_quantizer"]
        }
        out += [model.lmHead.name + ".weight_quantizer", model.lmHead.name + ".input_quantizer"]
        return out
    }

    /// amax of every enabled quantizer as 1-element tensors named `<quantizer>.amax`, for checkpoints.
    public func stateTensors() -> [(name: String, tensor: Tensor)] {
        enabled.compactMap { q in q.amax.map { (q.name + ".amax", Tensor(shape: [1], values: [$0])) } }
    }

    /// Restores amax values written by `stateTensors`; every enabled quantizer must be present.
    public func restore(_ tensors: [String: Tensor], model: CausalLM) throws {
        for q in enabled {
            guard let t = tensors[q.name + ".amax"], t.count == 1 else {
                throw QATError("checkpoint has no amax for quantizer \(q.name): it was written with a different quantize section")
            }
            q.amax = t[0]
        }
        model.markWeightsChanged()
    }
}

/// The scale an export stores for an amax, and back. The checkpoint keeps `amax/2688`
/// (NVFP4) or `amax/448` (FP8) in fp32, and division by 448 = 7·64 is not injective: two
/// adjacent amax values can share a scale, so a loader cannot always recover the calibrated
/// amax. FP8 fake quant multiplies by `448/amax`, so a 1-ulp amax difference moves every KV
/// value by an ulp, and NVFP4 activation rounding downstream amplifies such ulps into visible
/// logit changes (0.15 max |Δlogit| on fortune-lm). Calibration therefore snaps every amax
/// (≤ 2 ulp) to the value the export's scale encodes, making the fake-quant model and its
/// export the same model bit for bit.
public enum StoredScale {
    /// amax / bound is the stored scale.
    public static func bound(_ format: QuantFormat) -> Float? {
        switch format {
        case .nvfp4: return 6 * FP8.maxE4M3
        case .fp8PerTensor: return FP8.maxE4M3
        case .int8PerTensor: return nil
        }
    }

    /// The smallest float whose `amax / bound` is exactly `scale` (deterministic, so a
    /// loader and the snapping below agree).
    public static func amax(forScale scale: Float, bound: Float) -> Float {
        var c = scale * bound
        if c / bound != scale {
            var lo = c, hi = c
            var found: Float? = nil
            for _ in 0..<4 {
                lo = lo.nextDown; hi = hi.nextUp
                if lo / bound == scale { found = lo; break }
                if hi / bound == scale { found = hi; break }
            }
            guard let f = found else { return c }
            c = f
        }
        while c.nextDown / bound == scale { c = c.nextDown }
        return c
    }

    /// Whether a scale survives being stored as its fp32 reciprocal and read back:
    /// compressed-tensors stores NVFP4's `weight_global_scale` = 1/`weight_scale_2` and
    /// `input_global_scale` = 1/`input_scale` (its `ModelOptNvfp4Converter`,
    /// compressed_tensors/entrypoints/convert/converters/modelopt_nvfp4.py), so only such scales
    /// give the same model, and byte-identical files, in both export formats. About 13.5% of
    /// floats are not (no g has fl(1/g) = s).
    public static func isReciprocalSafe(_ scale: Float) -> Bool { 1 / (1 / scale) == scale }

    /// The scale an NVFP4 quantizer's amax is snapped to: `amax / bound` when it is
    /// reciprocal-safe, else the nearest reciprocal-safe float (a few ulps away) that some amax
    /// stores exactly.
    public static func nvfp4Scale(amax: Float, bound: Float) -> Float {
        let s = amax / bound
        if isReciprocalSafe(s) { return s }
        var lo = s, hi = s
        for _ in 0..<16 {
            lo = lo.nextDown; hi = hi.nextUp
            for c in [lo, hi] where c > 0 && isReciprocalSafe(c) && Self.amax(forScale: c, bound: bound) / bound == c { return c }
        }
        return s
    }
}

/// One amax moved by `QuantizerSet.snapToStoredScales`.
public struct ScaleSnap: Sendable, Equatable {
    public var quantizer: String
    public var from: Float
    public var to: Float
}

extension QuantizerSet {
    /// Sets every enabled quantizer's amax to the value its exported scale encodes (see
    /// `StoredScale`). Returns what moved.
    @discardableResult
    public func snapToStoredScales() -> [ScaleSnap] {
        var moved: [ScaleSnap] = []
        for q in all where q.enabled {
            guard let a = q.amax, a.isFinite, a > 0, let bound = StoredScale.bound(q.format) else { continue }
            let scale = q.format == .fp8PerTensor ? a / bound : StoredScale.nvfp4Scale(amax: a, bound: bound)
            let s = StoredScale.amax(forScale: scale, bound: bound)
            if s != a {
                q.amax = s
                moved.append(ScaleSnap(quantizer: q.name, from: a, to: s))
            }
        }
        return moved
    }
}

/// The calibration data and how to run it over the model: ModelOpt's `forward_loop`.
public struct CalibrationLoop {
    public var sequences: [[Int32]]
    public var seqLen: Int
    public var batchSize: Int
    public var progress: ((_ done: Int, _ total: Int) -> Void)?
    /// Data parallel: each rank ran its share of the sequences; this MAX-reduces the amax
    /// vector over the ranks in place (exact).
    public var reduceMax: ((inout [Float]) throws -> Void)?
    /// A pipeline stage: the pipelined forward through this stage's layers (instead of
    /// `model.forward`).
    public var forward: ((_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?)?

    public init(
        sequences: [[Int32]], seqLen: Int, batchSize: Int, progress: ((Int, Int) -> Void)? = nil,
        reduceMax: ((inout [Float]) throws -> Void)? = nil,
        forward: ((_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?)? = nil
    ) {
        self.sequences = sequences; self.seqLen = seqLen; self.batchSize = batchSize
        self.progress = progress; self.reduceMax = reduceMax; self.forward = forward
    }
}

/// The one quantization entry point, in the shape of ModelOpt's
/// `mtq.quantize(model, config, forward_loop)`: every caller (`qat apply`, `qat eval
/// --recipe`, `qat export`, `qat bench`, the trainers) quantizes a model through here.
public enum Quantization {
    /// Inserts the quantizers `config` resolves into `model` and max-calibrates the enabled
    /// ones over `forwardLoop` (nothing to calibrate: no forward pass). The model then runs
    /// fake-quantized.
    public static func quantize(
        model: CausalLM, config: QuantConfig, ste: STEMode? = nil, nvfp4Mode: NVFP4.FakeQuantMode = .export,
        forwardLoop: CalibrationLoop
    ) throws -> QuantizerSet {
        let quantizers = QuantizerSet(model: model, config: config, ste: ste, nvfp4Mode: nvfp4Mode)
        if !quantizers.enabled.isEmpty {
            quantizers.calibrationReport = try Calibration.run(model: model, quantizers: quantizers, loop: forwardLoop)
        }
        return quantizers
    }
}

/// What calibration saw of a mixture-of-experts model.
public struct CalibrationReport: Sendable {
    /// Experts over all MoE layers.
    public var experts = 0
    /// Experts that no calibration token was routed to (they are still calibrated: every
    /// expert observes every token during calibration, as in ModelOpt).
    public var expertsWithoutRoutedTokens = 0
    /// Expert input quantizers that observed nothing and took ModelOpt's fallback amax.
    public var filledExpertQuantizers = 0

    /// The log line, nil for dense models.
    public var logLine: String? {
        experts == 0
            ? nil
            : "experts: \(expertsWithoutRoutedTokens) of \(experts) received no routed calibration token "
                + "(all experts observe every token during calibration, as in ModelOpt); "
                + "\(filledExpertQuantizers) expert input quantizer(s) took ModelOpt's fallback amax"
    }
}

/// Max calibration (ModelOpt `algorithm: max`): every enabled quantizer observes while the
/// model runs unquantized over the calibration batches; amax = running max |x|; fused groups
/// then share their largest amax, every amax is snapped to the value its exported scale
/// encodes (`StoredScale`), and from then on amax is frozen.
public enum Calibration {
    /// Calibrates already inserted quantizers (`Quantization.quantize` inserts and calibrates).
    @discardableResult
    public static func run(model: CausalLM, quantizers: QuantizerSet, loop: CalibrationLoop) throws -> CalibrationReport {
        guard !loop.sequences.isEmpty else { throw QATError("calibration needs at least one sequence") }
        let active = quantizers.enabled
        for q in active { q.startCalibration() }
        for b in model.layers.compactMap(\.moe) { b.routedDuringCalibration = Array(repeating: 0, count: b.numExperts) }
        model.markWeightsChanged()  // weight quantizers observe their weight on the next forward
        var done = 0
        while done < loop.sequences.count {
            let batch = min(loop.batchSize, loop.sequences.count - done)
            let tokens = Array(loop.sequences[done..<(done + batch)].joined())
            if let forward = loop.forward {  // a pipeline stage: the pipelined forward runs this stage's layers
                _ = try forward(tokens, batch)
            } else {
                _ = try model.forward(tokens: tokens, batch: batch, seqLen: loop.seqLen, saveForBackward: false)
            }
            done += batch
            loop.progress?(done, loop.sequences.count)
        }
        // A weight quantizer whose Linear never ran (none here, but a tied head without a
        // forward) still needs its weight observed.
        for l in model.linears where l.weightQuantizer?.isCalibrating == true {
            if let q = l.weightQuantizer as? TensorQuantizer, q.calibCalls == 0 { try l.refreshQuantizedWeight() }
        }
        // Data parallel: each rank observed its shard; the global amax is the max over ranks
        // (exact), taken before fused groups share and scales are snapped.
        // An expert input quantizer that observed nothing is left for ModelOpt's rule below.
        let expertInputs = Set(Calibration.expertInputGroups(model, quantizers).flatMap { $0 }.map(\.name))
        for q in active {
            if q.calibCalls == 0 && expertInputs.contains(q.name) { q.abandonCalibration() } else { try q.finishCalibration() }
        }
        if let reduceMax = loop.reduceMax {
            var m = active.map { $0.amax ?? 0 }
            try reduceMax(&m)
            for (q, v) in zip(active, m) { q.amax = v }
        }
        let filled = fillUncalibratedExperts(model: model, quantizers: quantizers)
        for g in quantizers.fusedGroups { TensorQuantizer.shareAmax(g) }
        quantizers.snapToStoredScales()
        model.markWeightsChanged()
        let blocks = model.layers.compactMap(\.moe)
        return CalibrationReport(
            experts: blocks.reduce(0) { $0 + $1.numExperts },
            expertsWithoutRoutedTokens: blocks.reduce(0) { $0 + $1.routedDuringCalibration.filter { $0 == 0 }.count },
            filledExpertQuantizers: filled)
    }

    /// Per MoE layer and projection (gate, up, down), the enabled input quantizers of the experts.
    static func expertInputGroups(_ model: CausalLM, _ quantizers: QuantizerSet) -> [[TensorQuantizer]] {
        var out: [[TensorQuantizer]] = []
        for block in model.layers.compactMap(\.moe) {
            for proj in [\Expert.gate, \Expert.up, \Expert.down] {
                let g = block.experts.compactMap { quantizers.byName[$0[keyPath: proj].name + ".input_quantizer"] }.filter(\.enabled)
                if !g.isEmpty { out.append(g) }
            }
        }
        return out
    }

    /// ModelOpt's rule for experts no calibration token reached (`set_expert_quantizer_amax`
    /// in its export): an expert input quantizer without amax (or with amax 0) takes the
    /// largest amax of the same projection's input quantizers in the same MoE layer, or 0.5
    /// when none has one. (Weight quantizers always get their amax from their own weight.)
    /// Returns how many quantizers were filled.
    @discardableResult
    public static func fillUncalibratedExperts(model: CausalLM, quantizers: QuantizerSet) -> Int {
        var filled = 0
        for group in expertInputGroups(model, quantizers) {
            let known = group.compactMap(\.amax).filter { $0 > 0 && $0.isFinite }
            let target = known.max() ?? 0.5
            for q in group where q.amax == nil || q.amax == 0 {
                q.amax = target
                filled += 1
            }
        }
        return filled
    }

    /// `run(model:quantizers:loop:)` with the loop's fields spelled out.
    @discardableResult
    public static func run(
        model: CausalLM, quantizers: QuantizerSet, sequences: [[Int32]], seqLen: Int, batchSize: Int,
        progress: ((Int, Int) -> Void)? = nil,
        reduceMax: ((inout [Float]) throws -> Void)? = nil,
        forward: ((_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>?)? = nil
    ) throws -> CalibrationReport {
        try run(
            model: model, quantizers: quantizers,
            loop: CalibrationLoop(
                sequences: sequences, seqLen: seqLen, batchSize: batchSize,
                progress: progress, reduceMax: reduceMax, forward: forward))
    }

    /// The first `count` packed sequences of a stream (the calibration set).
    public static func sequences(from stream: [Int32], seqLen: Int, count: Int) throws -> [[Int32]] {
        let available = stream.count > 0 ? (stream.count - 1) / seqLen : 0
        guard available > 0 else { throw QATError("calibration data has \(stream.count) tokens: not one sequence of \(seqLen)") }
        return (0..<min(count, available)).map { Array(stream[($0 * seqLen)..<(($0 + 1) * seqLen)]) }
    }
}
