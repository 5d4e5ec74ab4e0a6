import QATCore

/// What a quantizer fake-quantizes to.
public enum QuantFormat: Equatable, Sendable, CustomStringConvertible {
    /// NVFP4: E2M1 values, E4M3 scale per block along the last dim, fp32 global scale.
    /// Only `blockSize: 16` is supported (QuantConfig rejects others).
    case nvfp4(blockSize: Int)
    /// FP8 E4M3 with one per-tensor scale amax/448.
    case fp8PerTensor
    /// Symmetric INT8 with one per-tensor scale amax/127 (ModelOpt's default attributes).
    case int8PerTensor

    public var description: String {
        switch self {
        case .nvfp4(let b): return "nvfp4(e2m1, block \(b), e4m3 scales)"
        case .fp8PerTensor: return "fp8(e4m3, per-tensor)"
        case .int8PerTensor: return "int8(per-tensor)"
        }
    }

    /// Short name as used in hf_quant_config.json-like summaries.
    public var shortName: String {
        switch self {
        case .nvfp4: return "NVFP4"
        case .fp8PerTensor: return "FP8"
        case .int8PerTensor: return "INT8"
        }
    }
}

/// Straight-through-estimator flavour of a quantizer's backward.
public enum STEMode: String, Sendable {
    /// d in = d out (ModelOpt `pass_through_bwd: true`, its default).
    case passThrough
    /// d in = d out where |x| ≤ amax, else 0 (ModelOpt `pass_through_bwd: false`).
    case clipped
}

/// One fake quantizer (ModelOpt's `TensorQuantizer`): a name such as
/// `model.layers.0.self_attn.q_proj.weight_quantizer`, a format, an amax, and a state.
///
/// Life cycle: `startCalibration()` → `forward` calls (identity, collecting the running max
/// |x|) → `finishCalibration()` (throws on amax 0/NaN/inf) → `forward` fake-quantizes.
/// A disabled quantizer is an identity everywhere.
public final class TensorQuantizer: CustomStringConvertible {
    public let name: String
    public var enabled: Bool
    public var format: QuantFormat
    /// Calibrated range: the NVFP4 global amax, or the per-tensor amax for FP8/INT8.
    public var amax: Float?
    public var ste: STEMode
    /// NVFP4 only: ModelOpt's Triton semantics (default) or export-exact.
    public var nvfp4Mode: NVFP4.FakeQuantMode
    public private(set) var isCalibrating = false
    /// Running max |x| collected while calibrating.
    public private(set) var calibMax: Float = 0
    public private(set) var calibCalls = 0

    public init(
        name: String, format: QuantFormat, enabled: Bool = true, amax: Float? = nil,
        ste: STEMode = .passThrough, nvfp4Mode: NVFP4.FakeQuantMode = .modelOpt
    ) {
        self.name = name
        self.format = format
        self.enabled = enabled
        self.amax = amax
        self.ste = ste
        self.nvfp4Mode = nvfp4Mode
    }

    /// Same output for every input: both quantizing, same format, amax bits and NVFP4 mode
    /// (calibration gives the fused groups one amax, `shareAmax`).
    public func quantizesLike(_ other: FakeQuantHook) -> Bool {
        guard let o = other as? TensorQuantizer, isQuantizing, o.isQuantizing, let a = amax, let b = o.amax else { return false }
        return format == o.format && a.bitPattern == b.bitPattern && nvfp4Mode == o.nvfp4Mode
    }

    /// Builds a quantizer from a resolved quant_cfg spec.
    public convenience init(name: String, spec: QuantizerSpec) {
        self.init(name: name, format: spec.format, enabled: spec.enabled, ste: spec.ste)
    }

    public var description: String {
        let state = enabled ? (isCalibrating ? "calibrating" : "enabled") : "disabled"
        let a = amax.map { String($0) } ?? "none"
        return "\(name): \(state) \(format) amax=\(a) ste=\(ste.rawValue)"
    }

    // MARK: Calibration

    /// Starts max calibration: forwards become identity and record max |x|.
    public func startCalibration() {
        isCalibrating = true
        calibMax = 0
        calibCalls = 0
    }

    /// Ends calibration and sets `amax` to the running max (merged with `amax` when
    /// `keepExisting`). Throws when nothing usable was collected.
    public func finishCalibration(keepExisting: Bool = false) throws {
        guard isCalibrating else { return }
        isCalibrating = false
        guard enabled else { return }
        var m = calibMax
        if keepExisting, let a = amax { m = max(m, a) }
        try Self.validate(amax: m, name: name, context: "calibration (\(calibCalls) forward calls)")
        amax = m
    }

    /// Ends calibration of a quantizer that observed nothing (an expert no calibration token
    /// reached), leaving amax unset for `Calibration.fillUncalibratedExperts`.
    public func abandonCalibration() {
        isCalibrating = false
    }

    /// Records max |x| of `count` values (also done by `forward` while calibrating).
    public func collect(_ x: UnsafePointer<Float>, count: Int) {
        collect(absMax: Reduce.absMax(x, count: count))
    }

    /// Records one observation's max |x| computed elsewhere (the CUDA path reduces on the GPU).
    public func collect(absMax m: Float) {
        if m.isNaN || calibMax.isNaN { calibMax = .nan } else { calibMax = max(calibMax, m) }
        calibCalls += 1
    }

    static func validate(amax m: Float, name: String, context: String) throws {
        if m.isNaN || m.isInfinite {
            throw QATError("quantizer \(name): \(context) produced amax \(m); the inputs contain NaN or inf")
        }
        if m <= 0 {
            throw QATError(
                "quantizer \(name): \(context) produced amax \(m) (all inputs were zero); disable this "
                    + "quantizer in quant_cfg or calibrate on real data")
        }
    }

    /// Gives every quantizer of a fused group (q/k/v, gate/up) the group's largest amax, so
    /// that training and export use one scale (inference engines fuse them into one GEMM).
    public static func shareAmax(_ group: [TensorQuantizer]) {
        let amaxes = group.filter(\.enabled).compactMap(\.amax)
        guard let m = amaxes.max() else { return }
        for q in group where q.enabled { q.amax = m }
    }

    // MARK: Forward / backward

    /// `out = fakequant(x)` over a row-major `[rows, cols]` tensor (`cols` = last dim, the
    /// NVFP4 block axis). Identity copy when disabled or calibrating (calibration also
    /// records max |x|). `out` may alias `x`.
    public func forward(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int, cols: Int) throws {
        let count = rows * cols
        if !enabled || isCalibrating {
            if enabled && isCalibrating { collect(x, count: count) }
            if UnsafePointer(out) != x { out.update(from: x, count: count) }
            return
        }
        guard let a = amax else {
            throw QATError("quantizer \(name) is enabled but has no amax: calibrate the model first (or disable it in quant_cfg)")
        }
        try Self.validate(amax: a, name: name, context: "stored amax")
        switch format {
        case .nvfp4(let b):
            guard b == NVFP4.blockSize else {
                throw QATError.unsupported("quantizer \(name): NVFP4 block size \(b) is not supported (only 16)")
            }
            NVFP4.fakeQuant(x, out, rows: rows, cols: cols, globalAmax: a, mode: nvfp4Mode)
        case .fp8PerTensor:
            FP8.fakeQuant(x, out, count: count, amax: a)
        case .int8PerTensor:
            INT8.fakeQuant(x, out, count: count, amax: a)
        }
    }

    /// STE backward: `gradIn = gradOut` (pass-through, and always when disabled), or zero
    /// where |x| > amax (`.clipped`). `x` is the forward's input. `gradIn` may alias `gradOut`.
    public var isPassThrough: Bool { !enabled || isCalibrating || ste == .passThrough || amax == nil }

    public func backward(x: UnsafePointer<Float>, gradOut: UnsafePointer<Float>, gradIn: UnsafeMutablePointer<Float>, count: Int) {
        if isPassThrough {
            if UnsafePointer(gradIn) != gradOut {  // a copy of up to tokens × hidden floats: split over the workers
                let dst = SendablePointer(gradIn), src = UncheckedBox(gradOut)
                Parallel.forRange(count, costPerItem: 1) { s, e in (dst.p + s).update(from: src.value + s, count: e - s) }
            }
            return
        }
        let a = amax!
        let gp = SendablePointer(gradIn)
        Parallel.forRange(count, costPerItem: 2) { s, e in
            for i in s..<e { gp.p[i] = abs(x[i]) <= a ? gradOut[i] : 0 }
        }
    }
}

/// A table of every quantizer and its state, like ModelOpt's `mtq.print_quant_summary`.
public func quantSummary(_ quantizers: [TensorQuantizer]) -> String {
    var lines: [String] = []
    let width = quantizers.map(\.name.count).max() ?? 4
    func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
    lines.append(pad("quantizer", width) + "  state        format                             amax          ste")
    for q in quantizers {
        let state = !q.enabled ? "disabled" : (q.isCalibrating ? "calibrating" : (q.amax == nil ? "uncalibrated" : "enabled"))
        let fmt = q.enabled ? q.format.description + (q.format == .nvfp4(blockSize: 16) ? " [\(q.nvfp4Mode.rawValue)]" : "") : "-"
        let a = q.enabled ? (q.amax.map { "\($0)" } ?? "none") : "-"
        lines.append(
            pad(q.name, width) + "  " + pad(state, 12) + " " + pad(fmt, 34) + " " + pad(a, 13) + " " + (q.enabled ? q.ste.rawValue : "-"))
    }
    let on = quantizers.filter(\.enabled).count
    lines.append("\(quantizers.count) quantizers, \(on) enabled, \(quantizers.count - on) disabled")
    return lines.joined(separator: "\n")
}
