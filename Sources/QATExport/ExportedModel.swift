import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant

/// A ModelOpt-format export (ours or one written by ModelOpt) read back as the fake-quant
/// model it encodes.
///
/// - Quantized weights are decoded (NVFP4: `e2m1 · e4m3(weight_scale) · weight_scale_2`;
///   FP8: `e4m3 · weight_scale`) into the fp32 master weights, and **no weight quantizer is
///   attached**: the decoded weight already is the fake-quant weight.
/// - Input quantizers are attached and enabled with the amax the scale encodes (NVFP4
///   `input_scale · 6 · 448`, FP8 `input_scale · 448`); KV-cache quantizers likewise from
///   `k_scale` / `v_scale` (`· 448`).
/// - Everything else is read as stored (bf16/f16/f32 → fp32).
///
/// The amax is inverted so that the quantizer's own scale comes out bit for bit: the float
/// nearest `scale · 2688` need not divide back to `scale`, so the neighbours are tried and one
/// that does is taken (NVFP4's fake quant only uses `amax / 2688`, which is then exactly the
/// stored scale). FP8 fake quant uses `448 / amax`; the inversion reproduces `amax / 448`
/// exactly, and the original amax whenever only one float maps to that scale.
public struct ExportedModel {
    public let model: CausalLM
    /// Input and KV quantizers (weight quantizers exist but are disabled).
    public let quantizers: QuantizerSet
    public let quantAlgo: String?
    public let kvCacheQuantAlgo: String?
    /// Format of every Linear, by module name.
    public let formats: [String: LinearExportFormat]
    public let directory: String

    /// The quant_algo values this reader understands.
    public static let supportedAlgos: Set<String> = ["NVFP4", "W4A16_NVFP4", "FP8", "MIXED_PRECISION"]

    /// Whether `directory` holds a quantized export (hf_quant_config.json, or config.json
    /// with a `quantization_config`). Throws for a quantization_config of another method.
    public static func isQuantizedExport(directory: String) throws -> Bool {
        if FileManager.default.fileExists(atPath: "\(directory)/hf_quant_config.json") { return true }
        let cfgPath = "\(directory)/config.json"
        guard FileManager.default.fileExists(atPath: cfgPath) else { return false }
        let cfg = try JSONValue.parseObject(file: cfgPath)
        guard let qc = try cfg.optionalObject("quantization_config") else { return false }
        let method = (try qc.optionalString("quant_method")) ?? "?"
        guard method.lowercased() == "modelopt" || method == "compressed-tensors" else {
            throw QATError.unsupported(
                "\(cfgPath): quantization_config.quant_method \"\(method)\" is not supported (ModelOpt "
                    + "exports, quant_method \"modelopt\", or compressed-tensors NVFP4, \"compressed-tensors\")")
        }
        return true
    }

    /// The quantization section: hf_quant_config.json's `quantization`, else config.json's
    /// flat `quantization_config` mapped onto the same keys.
    public static func quantizationSection(directory: String) throws -> (algo: String?, kv: String?, layers: JSONObject?) {
        let hfPath = "\(directory)/hf_quant_config.json"
        if FileManager.default.fileExists(atPath: hfPath) {
            let hf = try JSONValue.parseObject(file: hfPath)
            let q = try hf.object("quantization")
            return (
                try q.optionalString("quant_algo"), try q.optionalString("kv_cache_quant_algo"), try q.optionalObject("quantized_layers")
            )
        }
        let cfg = try JSONValue.parseObject(file: "\(directory)/config.json")
        let qc = try cfg.object("quantization_config")
        if (try qc.optionalString("quant_method")) == "compressed-tensors" {
            let s = try CompressedTensors.scheme(of: qc, source: "\(directory)/config.json")
            return (s.quantAlgo, s.kvCache ? "FP8" : nil, nil)
        }
        var kv: String? = try qc.optionalString("kv_cache_quant_algo")
        if kv == nil, let scheme = qc.optionalValue("kv_cache_scheme") {
            if let s = scheme.stringValue {
                kv = s
            } else if let o = scheme.objectValue {
                kv =
                    (o["num_bits"]?.intValue == 8 && o["type"]?.stringValue == "float")
                    ? "FP8" : "unsupported \(scheme.serialized(indent: nil))"
            }
        }
        return (try qc.optionalString("quant_algo"), kv, try qc.optionalObject("quantized_layers"))
    }

    /// Reads an export directory. `inputMode` is the NVFP4 fake-quant flavour of the
    /// re-created input quantizers (ModelOpt's by default, like training).
    public static func load(directory: String, inputMode: NVFP4.FakeQuantMode = .modelOpt) throws -> ExportedModel {
        let config = try ModelConfig.load(directory: directory)
        let section = try quantizationSection(directory: directory)
        if let a = section.algo, !supportedAlgos.contains(a.uppercased()) {
            throw QATError.unsupported(
                "\(directory): quant_algo \"\(a)\" is not supported (supported: \(supportedAlgos.sorted().joined(separator: ", ")))")
        }
        if let kv = section.kv, kv.uppercased() != "FP8" {
            throw QATError.unsupported("\(directory): kv_cache_quant_algo \"\(kv)\" is not supported (only FP8)")
        }
        var allowed = Set<LinearExportFormat>()
        switch section.algo?.uppercased() {
        case "MIXED_PRECISION"?:
            for (name, v) in section.layers?.entries ?? [] {
                let a = v.objectValue?["quant_algo"]?.stringValue ?? "?"
                guard let f = LinearExportFormat(rawValue: a.uppercased()), f != .none else {
                    throw QATError.unsupported(
                        "\(directory): quantized_layers.\(name).quant_algo \"\(a)\" is not supported (supported: NVFP4, W4A16_NVFP4, FP8)")
                }
                allowed.insert(f)
            }
        case let a?: allowed.insert(LinearExportFormat(rawValue: a.uppercased())!)
        case nil: break
        }

        let ckpt: any ExportTensorSource =
            try ExportFormat.of(directory: directory) == .compressedTensors
            ? CompressedTensorsView(try ModelWeights(path: directory)) : try ModelWeights(path: directory)
        // Before anything is built from the config's sizes: its layer count must be the
        // checkpoint's (the shapes are checked tensor by tensor below, before allocation).
        try config.checkLayerCount(against: ckpt.names, source: directory)
        var consumed = Set<String>()
        func has(_ n: String) -> Bool { ckpt.info(n) != nil }
        func scalar(_ n: String) throws -> Float {
            guard let i = ckpt.info(n) else { throw QATError("\(directory): missing tensor \(n)") }
            guard i.elementCount == 1, i.dtype.isFloatingPoint else {
                throw QATError("\(directory): \(n) must be one float (shape [] or [1]), found \(i.dtype.rawValue) \(i.shape)")
            }
            consumed.insert(n)
            let v = try ckpt.floats(n)[0]
            guard v.isFinite, v > 0 else { throw QATError("\(directory): \(n) = \(v) is not a positive finite scale") }
            return v
        }

        // Module names and shapes from the config (the same names CausalLM expects).
        var params: [String: Tensor] = [:]
        var formats: [String: LinearExportFormat] = [:]
        var inputAmax: [String: (LinearExportFormat, Float)] = [:]
        for (name, shape) in CausalLM.parameterShapes(config) {
            let module = String(name.dropLast(".weight".count))
            let w = ckpt.info(name)
            if name.hasSuffix(".weight"), shape.count == 2, let w, w.dtype == .u8 || w.dtype == .f8e4m3, has("\(module).weight_scale") {
                let rows = shape[0], cols = shape[1]
                let t: Tensor
                let format: LinearExportFormat
                if w.dtype == .u8 {
                    let nb = NVFP4.blocksPerRow(cols)
                    guard let si = ckpt.info("\(module).weight_scale"), si.dtype == .f8e4m3, si.shape == [rows, nb],
                        w.shape == [rows, nb * 8]
                    else {
                        throw QATError(
                            "\(directory): \(module): NVFP4 weight \(w.shape) / weight_scale "
                                + "\(ckpt.info("\(module).weight_scale")?.shape ?? []) do not fit [\(rows), \(cols)] "
                                + "(expected [\(rows), \(nb * 8)] U8 and [\(rows), \(nb)] F8_E4M3)")
                    }
                    let gs = try scalar("\(module).weight_scale_2")
                    t = Tensor(shape: shape, zeroed: false)  // only now: the stored shapes back it
                    let packed = try ckpt.bytes(name), scales = try ckpt.bytes("\(module).weight_scale")
                    NVFP4.dequantize(
                        packed: packed.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        scales: scales.baseAddress!.assumingMemoryBound(to: UInt8.self),
                        globalScale: gs, rows: rows, cols: cols, out: t.data)
                    format = has("\(module).input_scale") ? .nvfp4 : .nvfp4WeightOnly
                } else {
                    guard w.shape == shape else {
                        throw QATError("\(directory): \(name) has shape \(w.shape), config.json implies \(shape)")
                    }
                    let s = try scalar("\(module).weight_scale")
                    t = Tensor(shape: shape, zeroed: false)
                    let codes = try ckpt.bytes(name)
                    for i in 0..<(rows * cols) { t[i] = e4m3ToFloat(codes[i]) * s }
                    format = .fp8
                }
                guard allowed.contains(format) else {
                    throw QATError(
                        "\(directory): \(module) is stored as \(format.rawValue), which quant_algo "
                            + "\(section.algo ?? "null") does not declare")
                }
                consumed.insert(name); consumed.insert("\(module).weight_scale")
                params[name] = t
                formats[module] = format
                if has("\(module).input_scale") {
                    let s = try scalar("\(module).input_scale")
                    inputAmax[module] = (format, format == .fp8 ? invert(s, 448) : invert(s, 2688))
                }
            } else {
                guard ckpt.info(name) != nil else { throw QATError("\(directory): missing tensor \(name) (expected shape \(shape))") }
                let t = try ckpt.floats(name)
                guard t.shape == shape else { throw QATError("\(directory): \(name) has shape \(t.shape), config.json implies \(shape)") }
                consumed.insert(name)
                params[name] = t
                if name.hasSuffix(".weight"), shape.count == 2, name != "model.embed_tokens.weight" {
                    formats[module] = LinearExportFormat.none
                }
            }
        }
        var kvAmax: [String: Float] = [:]
        for i in 0..<config.numLayers {
            for (proj, key, quantizer) in [("k_proj", "k_scale", "k_bmm_quantizer"), ("v_proj", "v_scale", "v_bmm_quantizer")] {
                let n = "model.layers.\(i).self_attn.\(proj).\(key)"
                if has(n) { kvAmax["model.layers.\(i).self_attn.\(quantizer)"] = invert(try scalar(n), 448) }
            }
        }
        if config.tieWordEmbeddings { consumed.insert("lm_head.weight") }
        let extra = ckpt.names.filter { !consumed.contains($0) }
        if !extra.isEmpty {
            throw QATError(
                "\(directory): unexpected tensors for this export: "
                    + "\(extra.prefix(5).joined(separator: ", "))\(extra.count > 5 ? " … (\(extra.count) in all)" : "") "
                    + "(only NVFP4/FP8 weights with weight_scale, weight_scale_2, input_scale and FP8 k_scale/v_scale "
                    + "are understood)")
        }
        if !kvAmax.isEmpty && section.kv == nil {
            throw QATError("\(directory): k_scale/v_scale tensors present but kv_cache_quant_algo is not set")
        }

        let model = try CausalLM(config: config, parameters: params)
        var entries = [QuantConfig.Entry("*", enable: false)]
        for (module, (format, _)) in inputAmax.sorted(by: { $0.key < $1.key }) {
            entries.append(QuantConfig.Entry("\(module).input_quantizer", cfg: format == .fp8 ? .fp8 : .nvfp4))
        }
        for name in kvAmax.keys.sorted() { entries.append(QuantConfig.Entry(name, cfg: .fp8)) }
        let set = QuantizerSet(model: model, config: QuantConfig(entries: entries))
        for (module, (_, a)) in inputAmax {
            guard let q = set.byName["\(module).input_quantizer"] else { continue }
            q.amax = a
            q.nvfp4Mode = inputMode
        }
        for (name, a) in kvAmax { set.byName[name]?.amax = a }
        model.markWeightsChanged()
        return ExportedModel(
            model: model, quantizers: set, quantAlgo: section.algo, kvCacheQuantAlgo: section.kv, formats: formats,
            directory: directory)
    }

    /// The amax the loader re-creates from a stored scale (see `StoredScale`).
    public static func amaxForScale(_ scale: Float, bound: Float) -> Float { StoredScale.amax(forScale: scale, bound: bound) }

    static func invert(_ scale: Float, _ bound: Float) -> Float { amaxForScale(scale, bound: bound) }
}

/// The model `qat eval --model DIR` should evaluate: an export's fake-quant model when DIR
/// holds a ModelOpt-format export, the plain model otherwise.
public func loadModelForEval(directory: String) throws -> CausalLM {
    if try ExportedModel.isQuantizedExport(directory: directory) {
        return try ExportedModel.load(directory: directory).model
    }
    return try CausalLM(directory: directory)
}

/// The tensors `ExportedModel.load` reads: a checkpoint as stored (ModelOpt), or a
/// compressed-tensors checkpoint seen under ModelOpt's names and conventions.
protocol ExportTensorSource {
    var names: [String] { get }
    func info(_ name: String) -> SafeTensorInfo?
    func bytes(_ name: String) throws -> UnsafeRawBufferPointer
    func floats(_ name: String) throws -> Tensor
}

extension ModelWeights: ExportTensorSource {}

/// A compressed-tensors NVFP4 checkpoint under ModelOpt's names (`CompressedTensors`'s
/// table): `weight_packed` read as `weight`, `weight_global_scale` / `input_global_scale` as
/// `weight_scale_2` / `input_scale` = their fp32 reciprocals, `self_attn.k_scale` as
/// `self_attn.k_proj.k_scale`. The scales appear as F32 scalars.
final class CompressedTensorsView: ExportTensorSource {
    let checkpoint: ModelWeights
    let names: [String]
    private let stored: [String: String]

    init(_ checkpoint: ModelWeights) {
        self.checkpoint = checkpoint
        var names: [String] = [], stored: [String: String] = [:]
        for n in checkpoint.names {
            let m = CompressedTensors.modelOptName(n) ?? n
            names.append(m)
            stored[m] = n
        }
        self.names = names
        self.stored = stored
    }

    private func isScale(_ storedName: String) -> Bool {
        CompressedTensors.isReciprocal(storedName) || storedName.hasSuffix(".self_attn.k_scale")
            || storedName.hasSuffix(".self_attn.v_scale")
    }

    func info(_ name: String) -> SafeTensorInfo? {
        guard let n = stored[name], let i = checkpoint.info(n) else { return nil }
        if isScale(n) && i.elementCount == 1 && i.dtype.isFloatingPoint {
            return SafeTensorInfo(name: name, dtype: .f32, shape: [], begin: 0, end: 4)
        }
        return SafeTensorInfo(name: name, dtype: i.dtype, shape: i.shape, begin: i.begin, end: i.end)
    }

    func bytes(_ name: String) throws -> UnsafeRawBufferPointer {
        guard let n = stored[name] else { throw QATError("\(checkpoint.directory): missing tensor \(name)") }
        return try checkpoint.bytes(n)
    }

    func floats(_ name: String) throws -> Tensor {
        guard let n = stored[name] else { throw QATError("\(checkpoint.directory): missing tensor \(name)") }
        let t = try checkpoint.floats(n)
        guard CompressedTensors.isReciprocal(n), t.count == 1 else { return t }
        let r = Tensor(shape: [1])
        r[0] = 1 / t[0]
        return r
    }
}
