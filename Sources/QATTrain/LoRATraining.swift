import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant

#if canImport(Glibc)
import Glibc
#endif

extension Recipe {
    /// `train.lora`: LoRA adapters on Linear layers, trained with the base frozen (LoRA-QAT /
    /// LoRA-QAD), optionally over a base held in NVFP4 (QLoRA).
    public struct LoRASpec: Sendable, Equatable {
        public init() {}
        public var rank = 16
        public var alpha = 32.0
        public var dropout = 0.0
        /// fnmatch globs over HF module names (lm_head excluded).
        public var targetModules = LoRASpec.defaultTargets
        /// Hold the frozen base in its NVFP4 form (packed E2M1 + E4M3 scales), decoded on demand.
        public var qlora = false
        public enum Export: String, Sendable, CaseIterable { case merged, adapters }
        /// merged: base + adapters merged, re-calibrated, NVFP4 checkpoint. adapters: PEFT adapters only.
        public var export: Export = .merged

        public static let defaultTargets = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"]

        /// Reads `train.lora` (strict: unknown keys and bad types name the key and the line).
        public static func parse(_ m: YAMLMap) throws -> LoRASpec {
            var s = LoRASpec()
            s.rank = try m.int("rank", min: 1, max: 1 << 16) ?? s.rank
            s.alpha = try m.double("alpha", min: 1e-6, max: 1e6) ?? s.alpha
            if let d = try m.double("dropout", min: 0) {
                guard d < 1 else { throw m.fail("dropout", "must be < 1 (got \(d))") }
                s.dropout = d
            }
            if let t = try m.strings("target_modules") {
                guard !t.isEmpty, t.allSatisfy({ !$0.isEmpty }) else {
                    throw m.fail("target_modules", "expected a non-empty list of module globs")
                }
                s.targetModules = t
            }
            s.qlora = try m.bool("qlora") ?? s.qlora
            if let e = try m.choice("export", Export.allCases.map(\.rawValue)) { s.export = Export(rawValue: e)! }
            try m.finish()
            return s
        }

        var yaml: String {
            let t = targetModules.map { "\"" + $0.replacingOccurrences(of: "\"", with: "\\\"") + "\"" }.joined(separator: ", ")
            return "  lora:\n    rank: \(rank)\n    alpha: \(alpha)\n    dropout: \(dropout)\n    target_modules: [\(t)]\n"
                + "    qlora: \(qlora)\n    export: \(export.rawValue)\n"
        }
    }
}

/// The frozen base of QLoRA: every NVFP4-quantized Linear weight held as ModelOpt's NVFP4
/// tensor (packed E2M1 nibbles, one E4M3 scale per 16 values, fp32 global scale) — the bytes
/// the export writes, 4.5 bits a weight — and decoded into one scratch buffer shared by all
/// Linears whenever a matmul needs it.
///
/// Why one shared per-Linear buffer rather than decoding block by block inside the product:
/// the products stay OpenBLAS sgemm (a block-wise decode would need our own GEMM kernel, far
/// slower on CPU), the decode costs O(out·in) against the product's O(tokens·out·in) (≈1/2048
/// of it at 8×256 tokens), and the buffer is the size of the largest Linear (not of the model).
/// The decoded weight equals `fakeQuant(W, amax, mode: .export)` bit for bit.
public final class QLoRABase: LinearWeightSource, @unchecked Sendable {
    public struct Packed: Sendable {
        public let packed: [UInt8]
        public let scales: [UInt8]
        public let globalScale: Float
        public let rows: Int
        public let cols: Int
        public var bytes: Int { packed.count + scales.count + 4 }
    }
    public private(set) var tensors: [String: Packed] = [:]
    private var scratch: Tensor
    private var decoded: ObjectIdentifier?

    init(maxCount: Int) { scratch = Tensor(shape: [max(maxCount, 1)], zeroed: false) }

    /// Bytes of the compressed base (packed codes + block scales + global scales).
    public var bytes: Int { tensors.values.reduce(0) { $0 + $1.bytes } }
    /// Bytes the same weights take in fp32.
    public var fp32Bytes: Int { tensors.values.reduce(0) { $0 + $1.rows * $1.cols * 4 } }
    public var scratchBytes: Int { scratch.count * 4 }

    func add(_ linear: Linear, from w: UnsafePointer<Float>, amax: Float) {
        let q = NVFP4.quantize(w, rows: linear.outFeatures, cols: linear.inFeatures, globalAmax: amax)
        tensors[linear.name] = Packed(
            packed: q.packed, scales: q.scales, globalScale: q.globalScale, rows: linear.outFeatures, cols: linear.inFeatures)
    }

    public func weight(for linear: Linear) -> UnsafePointer<Float> {
        decode(linear.name, into: scratch.data)
        return UnsafePointer(scratch.data)
    }

    /// Decodes one weight into `out` `[out, in]`.
    public func decode(_ name: String, into out: UnsafeMutablePointer<Float>) {
        guard let p = tensors[name] else { preconditionFailure("QLoRA base has no weight for \(name)") }
        p.packed.withUnsafeBufferPointer { pb in
            p.scales.withUnsafeBufferPointer { sb in
                NVFP4.dequantize(
                    packed: pb.baseAddress!, scales: sb.baseAddress!, globalScale: p.globalScale, rows: p.rows, cols: p.cols, out: out)
            }
        }
    }
}

/// Gives a tensor's physical pages back to the OS (its values read as zero afterwards). The
/// QLoRA model's base weights are shape-only placeholders released this way: `Parameter`
/// keeps its tensor, but no fp32 copy of the base stays resident.
func releasePages(_ t: Tensor) {
    let page = Int(sysconf(Int32(_SC_PAGESIZE)))
    let start = (Int(bitPattern: t.data) + page - 1) / page * page
    let end = (Int(bitPattern: t.data) + t.count * 4) / page * page
    if end > start { _ = madvise(UnsafeMutableRawPointer(bitPattern: start), end - start, Int32(MADV_DONTNEED)) }
}

/// LoRA on a model: the adapters (in model order), their shared context, and for QLoRA the
/// compressed base. Build with `LoRA.attach` (LoRA over the fp32 base) or `LoRA.qlora`
/// (a new model over the NVFP4 base); train with `trainableGlobs`; then `mergedModel` or
/// `exportAdapters`.
public final class LoRA: @unchecked Sendable {
    public let spec: Recipe.LoRASpec
    public let context: LoRAContext
    public let adapters: [LoRAAdapter]
    public let model: CausalLM
    public let quantizers: QuantizerSet?
    public let base: QLoRABase?

    /// Parameter globs that select the adapters (the default `trainable_params` under LoRA).
    public static let trainableGlobs = ["*.lora_A.weight", "*.lora_B.weight"]

    init(spec: Recipe.LoRASpec, context: LoRAContext, adapters: [LoRAAdapter], model: CausalLM, quantizers: QuantizerSet?, base: QLoRABase?)
    {
        self.spec = spec; self.context = context; self.adapters = adapters; self.model = model; self.quantizers = quantizers;
        self.base = base
    }

    /// The decoder-layer Linears `target_modules` selects (lm_head is never a target).
    public static func targets(_ model: CausalLM, spec: Recipe.LoRASpec) throws -> [Linear] {
        let all = model.layers.flatMap(\.linears)
        for g in spec.targetModules where !all.contains(where: { Glob.matches(g, $0.name) }) {
            if Glob.matches(g, model.lmHead.name) {
                throw QATError.unsupported("train.lora.target_modules: \(g) selects lm_head; LoRA on lm_head is not supported")
            }
            throw QATError(
                "train.lora.target_modules: \(g) matches no Linear (names look like "
                    + "\(all.first?.name ?? "model.layers.0.self_attn.q_proj"))")
        }
        return all.filter { l in spec.targetModules.contains { Glob.matches($0, l.name) } }
    }

    /// The one LoRA builder of a recipe's `train.lora`: QLoRA (a new model over the NVFP4 base,
    /// `qlora`) or LoRA (adapters on `model`'s fp32 base, `attach`), with the recipe's STE,
    /// NVFP4 fake-quant mode and seed.
    public static func build(on model: CausalLM, quantizers: QuantizerSet?, recipe: Recipe) throws -> LoRA {
        guard let spec = recipe.train.lora else { throw QATError.internal("LoRA.build: the recipe has no train.lora section") }
        guard spec.qlora else { return try attach(to: model, quantizers: quantizers, spec: spec, seed: recipe.train.seed) }
        guard let config = recipe.quantize, let quantizers else {
            throw QATError("train.lora.qlora needs a quantize section with NVFP4 weights")
        }
        return try qlora(
            source: model, quantizers: quantizers, config: config, ste: recipe.steMode, nvfp4Mode: recipe.nvfp4Mode,
            spec: spec, seed: recipe.train.seed)
    }

    /// `mergedModel` with the recipe's quantize section, STE and NVFP4 mode.
    public func mergedModel(recipe: Recipe) throws -> (model: CausalLM, quantizers: QuantizerSet?) {
        try mergedModel(config: recipe.quantize, ste: recipe.steMode, nvfp4Mode: recipe.nvfp4Mode)
    }

    /// Adds adapters to `model` (its fp32 base stays; freeze it through `trainableGlobs`).
    public static func attach(to model: CausalLM, quantizers: QuantizerSet?, spec: Recipe.LoRASpec, seed: UInt64) throws -> LoRA {
        let ctx = LoRAContext(rank: spec.rank, alpha: spec.alpha, dropout: spec.dropout, seed: seed)
        ctx.isTraining = { [weak model] in model?.isTrainingForward ?? false }
        let targets = try targets(model, spec: spec)
        var adapters: [LoRAAdapter] = []
        for (i, l) in targets.enumerated() {
            let a = LoRAAdapter(module: l.name, index: i, inFeatures: l.inFeatures, outFeatures: l.outFeatures, context: ctx)
            l.adapter = a
            adapters.append(a)
        }
        model.addParameters(adapters.flatMap(\.parameters))
        return LoRA(spec: spec, context: ctx, adapters: adapters, model: model, quantizers: quantizers, base: nil)
    }

    /// QLoRA: a new model whose NVFP4-quantized decoder-layer Linears hold their weights as `QLoRABase`
    /// (NVFP4.quantize with the calibrated weight amax) and no fp32 copy, with `quantizers`'
    /// calibrated amax values copied onto a fresh quantizer set, and adapters attached. Every
    /// other tensor (embeddings, norms, lm_head, unquantized Linears) is shared with `source`,
    /// which the caller then drops.
    public static func qlora(
        source: CausalLM, quantizers: QuantizerSet, config: QuantConfig, ste: STEMode, nvfp4Mode: NVFP4.FakeQuantMode,
        spec: Recipe.LoRASpec, seed: UInt64
    ) throws -> LoRA {
        var compressed: [Linear] = []
        // Decoder-layer Linears only: lm_head (possibly tied to the embedding) keeps its fp32
        // weight and, when enabled, its usual fake quant.
        for l in source.layers.flatMap(\.linears) {
            guard let q = l.weightQuantizer as? TensorQuantizer, q.enabled, q.format == .nvfp4(blockSize: NVFP4.blockSize) else { continue }
            guard q.amax != nil else { throw QATError("QLoRA: weight quantizer \(q.name) is not calibrated") }
            compressed.append(l)
        }
        guard !compressed.isEmpty else { throw QATError("train.lora.qlora needs NVFP4 weight quantizers (quantize: an nvfp4 preset)") }
        let base = QLoRABase(maxCount: compressed.map(\.weight.count).max()!)
        var params: [String: Tensor] = [:]
        for p in source.parameters { params[p.name] = p.value }
        for l in compressed {
            let q = l.weightQuantizer as! TensorQuantizer
            base.add(l, from: l.weight.value.data, amax: q.amax!)
            let placeholder = Tensor(shape: l.weight.shape, zeroed: false)
            releasePages(placeholder)
            params[l.weight.name] = placeholder
        }
        let model = try CausalLM(config: source.config, parameters: params)
        let set = QuantizerSet(model: model, config: config, ste: ste, nvfp4Mode: nvfp4Mode)
        for q in set.all { q.amax = quantizers.byName[q.name]?.amax }
        let names = Set(compressed.map(\.name))
        for l in model.linears where names.contains(l.name) {
            l.weightQuantizer = nil  // the decoded base is the fake-quant weight
            l.weightSource = base
        }
        model.removeParameters(named: Set(compressed.map(\.weight.name)))
        model.markWeightsChanged()
        let lora = try attach(to: model, quantizers: set, spec: spec, seed: seed)
        return LoRA(spec: spec, context: lora.context, adapters: lora.adapters, model: model, quantizers: set, base: base)
    }

    /// Keys the dropout masks to the trainer's step (resumable).
    public func bind(to trainer: Trainer) { context.step = { [unowned trainer] in trainer.step } }

    /// The fp32 weight `[out, in]` of a Linear's frozen base: the master weight, or the QLoRA base decoded.
    public func baseWeight(_ l: Linear) -> Tensor {
        let t = Tensor(shape: l.weight.shape, zeroed: false)
        if let base, base.tensors[l.name] != nil { base.decode(l.name, into: t.data) } else { t.copy(from: l.weight.value) }
        return t
    }

    /// The merged model: every adapted Linear's weight W + (alpha/rank)·B·A in fp32 (W decoded
    /// from NVFP4 under QLoRA), every other tensor shared, and a quantizer set with the trained
    /// activation / KV amax values and the weight amax re-calibrated on the merged weights
    /// (`recalibrateWeights`). What `Exporter.export` writes and verification compares against.
    public func mergedModel(config: QuantConfig?, ste: STEMode, nvfp4Mode: NVFP4.FakeQuantMode) throws -> (
        model: CausalLM, quantizers: QuantizerSet?
    ) {
        var params: [String: Tensor] = [:]
        for p in model.parameters { params[p.name] = p.value }
        let byModule = Dictionary(uniqueKeysWithValues: adapters.map { ($0.module, $0) })
        for l in model.linears {
            let compressed = base?.tensors[l.name] != nil
            guard compressed || byModule[l.name] != nil else { continue }
            let w = baseWeight(l)
            byModule[l.name]?.merge(base: w.data, into: w.data)
            params[l.weight.name] = w
        }
        for a in adapters { params[a.A.name] = nil; params[a.B.name] = nil }
        let merged = try CausalLM(config: model.config, parameters: params)
        guard let config, let trained = quantizers else { return (merged, nil) }
        let set = QuantizerSet(model: merged, config: config, ste: ste, nvfp4Mode: nvfp4Mode)
        for q in set.all { q.amax = trained.byName[q.name]?.amax }
        try LoRA.recalibrateWeights(model: merged, quantizers: set)
        return (merged, set)
    }

    /// Weight calibration as `Calibration.run` does it, on the current weights only: every
    /// enabled weight quantizer observes its weight (amax = max |W|), fused groups (q/k/v,
    /// gate/up) share their largest amax, and every amax is snapped to its stored scale.
    /// Activation and KV amax values are left as they are.
    public static func recalibrateWeights(model: CausalLM, quantizers: QuantizerSet) throws {
        let weightQuantizers = model.linears.compactMap { $0.weightQuantizer as? TensorQuantizer }
        for q in weightQuantizers { q.startCalibration() }
        for l in model.linears where l.weightQuantizer?.isCalibrating == true { try l.refreshQuantizedWeight() }
        for q in weightQuantizers { try q.finishCalibration() }
        for g in quantizers.fusedGroups { TensorQuantizer.shareAmax(g) }
        quantizers.snapToStoredScales()
        model.markWeightsChanged()
    }

    /// PEFT's `target_modules` for the adapted modules: their leaf names (`q_proj`, …) when
    /// those select exactly the adapted set, else every full module name.
    public var peftTargetModules: [String] {
        let adapted = Set(adapters.map(\.module))
        var leaves: [String] = []
        for a in adapters { let leaf = String(a.module.split(separator: ".").last!); if !leaves.contains(leaf) { leaves.append(leaf) } }
        let all = model.linears.map(\.name)
        let byLeaves = Set(all.filter { n in leaves.contains { n == $0 || n.hasSuffix("." + $0) } })
        return byLeaves == adapted ? leaves : adapters.map(\.module)
    }

    /// PEFT's adapter layout: `adapter_config.json` and `adapter_model.safetensors` with
    /// `base_model.model.<module>.lora_A.weight` `[r, in]` / `lora_B.weight` `[out, r]`,
    /// written atomically into `directory`. Returns the tensor bytes written.
    @discardableResult
    public func exportAdapters(to directory: String, baseModel: String, dtype: DType = .f32) throws -> Int {
        var w = SafeTensorsWriter()
        for a in adapters {
            try w.add(name: "base_model.model." + a.A.name, tensor: a.A.value, as: dtype)
            try w.add(name: "base_model.model." + a.B.name, tensor: a.B.value, as: dtype)
        }
        var o = JSONObject()
        let alpha: JSONValue = spec.alpha == spec.alpha.rounded() && abs(spec.alpha) < 1e15 ? .int(Int64(spec.alpha)) : .double(spec.alpha)
        o.set("alpha_pattern", .object(JSONObject()))
        o.set("base_model_name_or_path", .string(baseModel))
        o.set("bias", .string("none"))
        o.set("fan_in_fan_out", .bool(false))
        o.set("inference_mode", .bool(true))
        o.set("init_lora_weights", .bool(true))
        o.set("layers_pattern", .null)
        o.set("layers_to_transform", .null)
        o.set("lora_alpha", alpha)
        o.set("lora_dropout", .double(spec.dropout))
        o.set("modules_to_save", .null)
        o.set("peft_type", .string("LORA"))
        o.set("r", .int(Int64(spec.rank)))
        o.set("rank_pattern", .object(JSONObject()))
        o.set("revision", .null)
        o.set("target_modules", .array(peftTargetModules.map { .string($0) }))
        o.set("task_type", .string("CAUSAL_LM"))
        o.set("use_dora", .bool(false))
        o.set("use_rslora", .bool(false))
        try AtomicDirectory.write(directory) { tmp in
            try w.write(to: tmp + "/adapter_model.safetensors", metadata: [("format", "pt")])
            try o.write(toFile: tmp + "/adapter_config.json")
        }
        return w.totalBytes
    }
}
