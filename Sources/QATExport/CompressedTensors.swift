import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant

/// The two NVFP4 checkpoint layouts qat writes and reads.
public enum ExportFormat: String, Sendable, CaseIterable {
    /// NVIDIA ModelOpt's unified HF checkpoint (`quant_method: modelopt`, hf_quant_config.json):
    /// TensorRT-LLM, vLLM, SGLang.
    case modelopt
    /// compressed-tensors' `nvfp4-pack-quantized` (`quant_method: compressed-tensors`), as
    /// llm-compressor writes it: vLLM, SGLang, and transformers (which also runs it on a CPU).
    case compressedTensors = "compressed-tensors"

    public static func parse(_ s: String) throws -> ExportFormat {
        guard let f = ExportFormat(rawValue: s) else {
            throw QATError("export format \"\(s)\" is not supported (modelopt or compressed-tensors)")
        }
        return f
    }

    /// The format of an export directory: compressed-tensors when config.json's
    /// `quantization_config.quant_method` says so, ModelOpt otherwise.
    public static func of(directory: String) throws -> ExportFormat {
        let cfgPath = "\(directory)/config.json"
        guard FileManager.default.fileExists(atPath: cfgPath) else { return .modelopt }
        let cfg = try JSONValue.parseObject(file: cfgPath)
        guard let qc = try cfg.optionalObject("quantization_config") else { return .modelopt }
        return (try qc.optionalString("quant_method")) == "compressed-tensors" ? .compressedTensors : .modelopt
    }
}

/// One tensor of a checkpoint being written or converted.
public struct TensorRecord: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var bytes: [UInt8]
    public init(name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        self.name = name; self.dtype = dtype; self.shape = shape; self.bytes = bytes
    }
}

/// compressed-tensors' NVFP4 checkpoint layout (`format: nvfp4-pack-quantized`) and the
/// lossless mapping to and from ModelOpt's.
///
/// Per quantized Linear `<m>` (compressed-tensors 0.20,
/// `compressed_tensors/compressors/nvfp4/base.py` (`NVFP4PackedCompressor`: `weight_packed`,
/// `weight_scale`, `weight_global_scale`) and `entrypoints/convert/converters/modelopt_nvfp4.py`
/// (`ModelOptNvfp4Converter.process`: the renames and the two reciprocals)):
///
/// | ModelOpt | compressed-tensors |
/// |---|---|
/// | `<m>.weight` U8 `[out, in/2]` | `<m>.weight_packed` U8 `[out, in/2]` (same nibble order: even element low, `pack_fp4_to_uint8`) |
/// | `<m>.weight_scale` F8_E4M3 `[out, in/16]` | `<m>.weight_scale` F8_E4M3 `[out, in/16]` |
/// | `<m>.weight_scale_2` F32 `[]` | `<m>.weight_global_scale` F32 `[1]` = 1 / weight_scale_2 |
/// | `<m>.input_scale` F32 `[]` | `<m>.input_global_scale` F32 `[1]` = 1 / input_scale |
/// | `<l>.self_attn.k_proj.k_scale` F32 `[]` | `<l>.self_attn.k_scale` F32 `[1]` (same value) |
/// | `<l>.self_attn.v_proj.v_scale` F32 `[]` | `<l>.self_attn.v_scale` F32 `[1]` (same value) |
///
/// The shapes `[1]` are what the loaders allocate: compressed-tensors' `initialize_qparams`
/// (`quantization/lifecycle/initialize.py`: global scales and TENSOR-strategy scales are
/// `(1,)`), which transformers' `CompressedTensorsHfQuantizer` runs before loading (a `[]`
/// tensor is reported as mismatched); vLLM's `CompressedTensorsW4A4Fp4.create_weights`
/// (`model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py`)
/// registers `weight_global_scale` / `input_global_scale` as `PerTensorScaleParameter`s.
/// The KV scales live on the attention module: compressed-tensors' `initialize_hooked_kv_cache`
/// (`modeling/kvcache.py`) registers `k_scale` / `v_scale` on `self_attn`, and vLLM's
/// `CompressedTensorsKVCacheMethod` / `maybe_remap_kv_scale_name` reads `self_attn.k_scale`.
/// They stay F32 here (the converter casts them to the scheme's `scale_dtype`, bf16 by
/// default, which would lose the value; the loaders cast on load).
///
/// Every reciprocal is one fp32 division, as torch's `1 / tensor`. qat snaps its NVFP4 scales
/// to reciprocal-safe values (`StoredScale.isReciprocalSafe`), so `1/(1/s) == s` and the two
/// formats hold the same model bit for bit; a scale from elsewhere that is not safe is
/// reported (`lossyScales`).
public enum CompressedTensors {
    /// compressed-tensors' version whose config layout this writes.
    public static let version = "0.20.1"

    /// ModelOpt name → compressed-tensors name (nil: unchanged). `quantizedModules` are the
    /// Linears that have NVFP4 tensors.
    static func ctName(_ name: String, quantizedModules: Set<String>) -> String? {
        func split(_ suffix: String) -> String? {
            name.hasSuffix(suffix) ? String(name.dropLast(suffix.count)) : nil
        }
        if let m = split(".weight"), quantizedModules.contains(m) { return m + ".weight_packed" }
        if let m = split(".weight_scale_2") { return m + ".weight_global_scale" }
        if let m = split(".input_scale") { return m + ".input_global_scale" }
        if let m = split(".self_attn.k_proj.k_scale") { return m + ".self_attn.k_scale" }
        if let m = split(".self_attn.v_proj.v_scale") { return m + ".self_attn.v_scale" }
        return nil
    }

    /// compressed-tensors name → ModelOpt name (nil: unchanged).
    static func modelOptName(_ name: String) -> String? {
        func split(_ suffix: String) -> String? {
            name.hasSuffix(suffix) ? String(name.dropLast(suffix.count)) : nil
        }
        if let m = split(".weight_packed") { return m + ".weight" }
        if let m = split(".weight_global_scale") { return m + ".weight_scale_2" }
        if let m = split(".input_global_scale") { return m + ".input_scale" }
        if let m = split(".self_attn.k_scale") { return m + ".self_attn.k_proj.k_scale" }
        if let m = split(".self_attn.v_scale") { return m + ".self_attn.v_proj.v_scale" }
        return nil
    }

    static func isReciprocal(_ ctName: String) -> Bool {
        ctName.hasSuffix(".weight_global_scale") || ctName.hasSuffix(".input_global_scale")
    }

    static func f32Bytes(_ v: Float) -> [UInt8] {
        var bits = v.bitPattern.littleEndian
        return withUnsafeBytes(of: &bits) { Array($0) }
    }

    /// One float of a scalar record (F32, BF16 or F16; shape [] or [1]).
    static func scalarValue(_ r: TensorRecord) throws -> Float {
        guard r.shape.reduce(1, *) == 1 else { throw QATError("\(r.name): a scale must be one value, found shape \(r.shape)") }
        switch r.dtype {
        case .f32 where r.bytes.count == 4:
            return Float(bitPattern: UInt32(r.bytes[0]) | UInt32(r.bytes[1]) << 8 | UInt32(r.bytes[2]) << 16 | UInt32(r.bytes[3]) << 24)
        case .bf16 where r.bytes.count == 2:
            return Float(bitPattern: (UInt32(r.bytes[0]) | UInt32(r.bytes[1]) << 8) << 16)
        case .f16 where r.bytes.count == 2:
            return Float(Float16(bitPattern: UInt16(r.bytes[0]) | UInt16(r.bytes[1]) << 8))
        default:
            throw QATError("\(r.name): a scale must be F32, BF16 or F16, found \(r.dtype.rawValue) \(r.shape)")
        }
    }

    /// ModelOpt tensors → compressed-tensors tensors, in the same order. Returns the scales
    /// whose reciprocal does not read back exactly.
    public static func fromModelOpt(_ records: [TensorRecord]) throws -> (records: [TensorRecord], lossyScales: [String]) {
        var quantized = Set<String>()
        let byName = Set(records.map(\.name))
        for r in records where r.name.hasSuffix(".weight_scale") {
            let m = String(r.name.dropLast(".weight_scale".count))
            guard byName.contains(m + ".weight_scale_2") else {
                throw QATError(
                    "\(m): only NVFP4 Linears (weight, weight_scale, weight_scale_2) have a "
                        + "compressed-tensors nvfp4-pack-quantized layout; FP8 weights are not supported by this "
                        + "converter")
            }
            quantized.insert(m)
        }
        var out: [TensorRecord] = []
        var lossy: [String] = []
        for r in records {
            guard let n = ctName(r.name, quantizedModules: quantized) else { out.append(r); continue }
            if r.name.hasSuffix(".weight") {
                guard r.dtype == .u8 else { throw QATError("\(r.name): an NVFP4 weight must be U8, found \(r.dtype.rawValue)") }
                out.append(TensorRecord(name: n, dtype: .u8, shape: r.shape, bytes: r.bytes))
                continue
            }
            let v = try scalarValue(r)
            if isReciprocal(n) {
                let g = 1 / v
                if 1 / g != v { lossy.append(r.name) }
                out.append(TensorRecord(name: n, dtype: .f32, shape: [1], bytes: f32Bytes(g)))
            } else {
                out.append(TensorRecord(name: n, dtype: .f32, shape: [1], bytes: f32Bytes(v)))
            }
        }
        return (out, lossy)
    }

    /// compressed-tensors tensors → ModelOpt tensors, in the same order (qat's own
    /// compressed-tensors exports come back byte for byte).
    public static func toModelOpt(_ records: [TensorRecord]) throws -> [TensorRecord] {
        var out: [TensorRecord] = []
        for r in records {
            if r.name.hasSuffix(".weight_zero_point") || r.name.hasSuffix(".weight_shape") {
                throw QATError("\(r.name): only the nvfp4-pack-quantized layout is supported (no zero points or packed shapes)")
            }
            guard let n = modelOptName(r.name) else { out.append(r); continue }
            if r.name.hasSuffix(".weight_packed") {
                guard r.dtype == .u8 else { throw QATError("\(r.name): weight_packed must be U8, found \(r.dtype.rawValue)") }
                out.append(TensorRecord(name: n, dtype: .u8, shape: r.shape, bytes: r.bytes))
                continue
            }
            let v = try scalarValue(r)
            out.append(TensorRecord(name: n, dtype: .f32, shape: [], bytes: f32Bytes(isReciprocal(r.name) ? 1 / v : v)))
        }
        return out
    }

    // MARK: - Configs

    /// One `QuantizationArgs` of the NVFP4 preset (`quantization/quant_scheme.py`: 4-bit float,
    /// symmetric, `tensor_group` of 16, E4M3 scales; activations `dynamic: local` with the
    /// `static_minmax` observer) as compressed-tensors 0.20.1 dumps it into config.json
    /// (unset fields left out, keys sorted).
    static func nvfp4Args(activations: Bool) -> JSONValue {
        var o = JSONObject()
        o.set("dynamic", activations ? .string("local") : .bool(false))
        o.set("group_size", .int(16))
        o.set("num_bits", .int(4))
        if activations { o.set("observer", .string("static_minmax")) }
        o.set("scale_dtype", .string("torch.float8_e4m3fn"))
        o.set("strategy", .string("tensor_group"))
        o.set("symmetric", .bool(true))
        o.set("type", .string("float"))
        return .object(o)
    }

    /// The FP8 E4M3 per-tensor KV-cache scheme (`kv_cache_scheme`) as 0.20.1 dumps it.
    static var kvCacheScheme: JSONValue {
        .object(
            JSONObject([
                (key: "dynamic", value: .bool(false)),
                (key: "group_size", value: .null),
                (key: "num_bits", value: .int(8)),
                (key: "strategy", value: .string("tensor")),
                (key: "symmetric", value: .bool(true)),
                (key: "type", value: .string("float")),
            ]))
    }

    /// config.json's `quantization_config` exactly as compressed-tensors 0.20.1 writes it for
    /// an NVFP4 checkpoint (`ModelOptNvfp4Converter.create_config` +
    /// `write_checkpoint_quantization_config`, checked against the golden fixture
    /// Tests/Fixtures/ct-tiny-llama written by the library): `config_groups.config_group_0`
    /// with `format`, `input_activations` (W4A4 only, else null), `output_activations`,
    /// `targets: ["Linear"]`, `weights`; then `format`, `global_compression_ratio`, `ignore`
    /// (the unquantized Linears by full name: compressed-tensors matches exact names or `re:`
    /// patterns, not ModelOpt's `prefix*` wildcards), `kv_cache_scheme`, `moe_sparsity_config`,
    /// `quant_method`, `quantization_status: compressed`, `version` — keys sorted.
    public static func quantizationConfig(weightOnly: Bool, ignore: [String], kvCache: Bool) -> JSONObject {
        var group = JSONObject()
        group.set("format", .string("nvfp4-pack-quantized"))
        group.set("input_activations", weightOnly ? .null : nvfp4Args(activations: true))
        group.set("output_activations", .null)
        group.set("targets", .array([.string("Linear")]))
        group.set("weights", nvfp4Args(activations: false))
        return JSONObject([
            (key: "config_groups", value: .object(JSONObject([(key: "config_group_0", value: .object(group))]))),
            (key: "format", value: .string("nvfp4-pack-quantized")),
            (key: "global_compression_ratio", value: .null),
            (key: "ignore", value: .array(ignore.map { .string($0) })),
            (key: "kv_cache_scheme", value: kvCache ? kvCacheScheme : .null),
            (key: "moe_sparsity_config", value: .null),
            (key: "quant_method", value: .string("compressed-tensors")),
            (key: "quantization_status", value: .string("compressed")),
            (key: "version", value: .string(version)),
        ])
    }

    /// What a compressed-tensors `quantization_config` declares, checked against what qat
    /// reads: one group of NVFP4 weights (4-bit float, group 16), with or without NVFP4 input
    /// activations, an optional FP8 per-tensor KV cache.
    public struct Scheme: Sendable, Equatable {
        public var weightOnly: Bool
        public var kvCache: Bool
        public var ignore: [String]
        public var quantAlgo: String { weightOnly ? "W4A16_NVFP4" : "NVFP4" }
    }

    public static func scheme(of qc: JSONObject, source: String) throws -> Scheme {
        func fail(_ what: String) -> QATError {
            QATError(
                "\(source): quantization_config \(what) (qat reads compressed-tensors NVFP4: format "
                    + "nvfp4-pack-quantized, 4-bit float weights in groups of 16, optional NVFP4 input "
                    + "activations and FP8 KV cache)")
        }
        if let f = try qc.optionalString("format"), f != "nvfp4-pack-quantized" { throw fail("format \"\(f)\" is not supported") }
        let groups = try qc.object("config_groups")
        guard !groups.isEmpty else { throw fail("has no config_groups") }
        var weightOnly: Bool?
        for (name, v) in groups.entries {
            guard let g = v.objectValue else { throw fail("config_groups.\(name) is not an object") }
            if let f = g["format"]?.stringValue, f != "nvfp4-pack-quantized" {
                throw fail("config_groups.\(name).format \"\(f)\" is not supported")
            }
            func isNVFP4(_ a: JSONValue?) -> Bool {
                guard let o = a?.objectValue else { return false }
                return o["num_bits"]?.intValue == 4 && o["type"]?.stringValue == "float" && o["group_size"]?.intValue == 16
            }
            guard isNVFP4(g["weights"]) else { throw fail("config_groups.\(name).weights is not NVFP4") }
            let ia = g["input_activations"].flatMap { $0.isNull ? nil : $0 }
            if let ia, !isNVFP4(ia) { throw fail("config_groups.\(name).input_activations is not NVFP4") }
            if let w = weightOnly, w != (ia == nil) { throw fail("mixes weight-only and W4A4 groups") }
            weightOnly = ia == nil
        }
        var kv = false
        if let s = qc.optionalValue("kv_cache_scheme") {
            guard let o = s.objectValue, o["num_bits"]?.intValue == 8, o["type"]?.stringValue == "float",
                (o["strategy"]?.stringValue ?? "tensor") == "tensor"
            else {
                throw fail("kv_cache_scheme \(s.serialized(indent: nil)) is not FP8 per-tensor")
            }
            kv = true
        }
        let ignore = (qc["ignore"]?.arrayValue ?? []).compactMap(\.stringValue)
        return Scheme(weightOnly: weightOnly ?? false, kvCache: kv, ignore: ignore)
    }

    /// The `hf_quant_config.json` object qat would write for an export with this scheme:
    /// `exclude_modules` re-summarised (ModelOpt's prefix wildcards) from the model's Linears.
    public static func hfQuantConfig(
        scheme: Scheme, linears: [String], quantized: Set<String>,
        producerName: String = "qat", producerVersion: String = qatExportVersion
    ) -> JSONObject {
        var plan = ExportPlan(
            linears: linears.map {
                ExportPlan.LinearEntry(name: $0, format: quantized.contains($0) ? (scheme.weightOnly ? .nvfp4WeightOnly : .nvfp4) : .none)
            }, kvCache: [], quantAlgo: quantized.isEmpty ? nil : scheme.quantAlgo, kvCacheQuantAlgo: scheme.kvCache ? "FP8" : nil,
            excludeModules: [])
        plan.excludeModules = ExportPlan.summarizeExcludeModules(
            unquantized: linears.filter { !quantized.contains($0) },
            quantized: linears.filter { quantized.contains($0) })
        return plan.hfQuantConfig(producerName: producerName, producerVersion: producerVersion)
    }

    /// The Linear module names of a model with this config, in module order (lm_head last
    /// unless tied).
    public static func linearNames(_ config: ModelConfig) -> [String] {
        var names = CausalLM.parameterShapes(config).compactMap { name, shape -> String? in
            guard shape.count == 2, name.hasSuffix(".weight"), name != "model.embed_tokens.weight", name != "lm_head.weight" else {
                return nil
            }
            return String(name.dropLast(".weight".count))
        }
        names.append("lm_head")
        return names
    }

    // MARK: - Directories

    /// The modules that have a `weight_packed` tensor.
    static func packedModules(_ records: [TensorRecord]) -> Set<String> {
        let suffix = ".weight_packed"
        return Set(records.compactMap { $0.name.hasSuffix(suffix) ? String($0.name.dropLast(suffix.count)) : nil })
    }

    /// Reads every tensor of a checkpoint directory, in file order.
    static func readRecords(_ ckpt: ModelWeights) throws -> [TensorRecord] {
        try ckpt.names.map { n in
            guard let i = ckpt.info(n) else { throw QATError("\(ckpt.directory): missing tensor \(n)") }
            return TensorRecord(name: n, dtype: i.dtype, shape: i.shape, bytes: Array(try ckpt.bytes(n)))
        }
    }

    /// What a conversion did.
    public struct ConversionSummary {
        public var from: ExportFormat
        public var to: ExportFormat
        public var tensors: Int
        public var files: [String]
        /// Scales whose fp32 reciprocal does not read back exactly (empty for qat's exports).
        public var lossyScales: [String]
    }

    /// Converts an export directory into the other format (or rewrites it in the same one),
    /// atomically: tensors renamed and rescaled in file order, config.json's
    /// `quantization_config` replaced where it stands (every other key, value and the order
    /// kept), hf_quant_config.json written for ModelOpt / dropped for compressed-tensors, the
    /// tokenizer and generation files copied verbatim.
    @discardableResult
    public static func convert(
        source: String, to target: ExportFormat, out: String,
        maxShardBytes: Int = 5_000_000_000
    ) throws -> ConversionSummary {
        let src = (source as NSString).standardizingPath, dst = (out as NSString).standardizingPath
        if URL(fileURLWithPath: dst).resolvingSymlinksInPath().path == URL(fileURLWithPath: src).resolvingSymlinksInPath().path {
            throw QATError("qat convert: --out \(out) is the source directory; choose another")
        }
        guard try ExportedModel.isQuantizedExport(directory: src) else {
            throw QATError("\(source): not a quantized export (no hf_quant_config.json and no quantization_config in config.json)")
        }
        let from = try ExportFormat.of(directory: src)
        let config = try ModelConfig.load(directory: src)
        var cfg = try JSONValue.parseObject(file: "\(src)/config.json")
        let ckpt = try ModelWeights(path: src)
        var records = try readRecords(ckpt)
        var lossy: [String] = []
        let linears = linearNames(config)
        var hfBytes: [UInt8]? = nil
        switch (from, target) {
        case (.modelopt, .compressedTensors):
            let section = try ExportedModel.quantizationSection(directory: src)
            let algo = section.algo?.uppercased()
            guard algo == "NVFP4" || algo == "W4A16_NVFP4" else {
                throw QATError(
                    "\(source): quant_algo \(section.algo ?? "null") has no compressed-tensors "
                        + "nvfp4-pack-quantized layout (NVFP4 or W4A16_NVFP4 only)")
            }
            let r = try fromModelOpt(records)
            records = r.records; lossy = r.lossyScales
            let quantized = packedModules(records)
            let ignore = linears.filter { !quantized.contains($0) }
            cfg.set(
                "quantization_config",
                .object(
                    quantizationConfig(
                        weightOnly: algo == "W4A16_NVFP4", ignore: ignore,
                        kvCache: section.kv != nil)))
        case (.compressedTensors, .modelopt):
            let qc = try cfg.object("quantization_config")
            let s = try scheme(of: qc, source: "\(source)/config.json")
            let quantized = packedModules(records)
            records = try toModelOpt(records)
            let hf = hfQuantConfig(scheme: s, linears: linears, quantized: quantized)
            cfg.set("quantization_config", .object(ExportPlan.quantizationConfig(fromHFQuantConfig: hf)))
            hfBytes = JSONValue.object(hf).serializedBytes(indent: 4)
        case (.modelopt, .modelopt):
            hfBytes = try? readFile("\(src)/hf_quant_config.json")
        case (.compressedTensors, .compressedTensors):
            break
        }
        var writer = SafeTensorsWriter()
        for r in records { try writer.add(name: r.name, dtype: r.dtype, shape: r.shape, bytes: r.bytes) }
        let configBytes = Array(cfg.fileText.utf8)
        let fm = FileManager.default
        let copies = Exporter.copiedFiles.map { "\(src)/\($0)" }.filter { fm.fileExists(atPath: $0) }
        let metadata = ckpt.files.first?.metadata.map { ($0.key, $0.value) } ?? [("format", "pt")]
        try AtomicDirectory.write(dst) { tmp in
            try writer.writeSharded(directory: tmp, maxShardBytes: maxShardBytes, metadata: metadata)
            try atomicWrite(path: "\(tmp)/config.json") { try $0.write(configBytes) }
            if let hfBytes { try atomicWrite(path: "\(tmp)/hf_quant_config.json") { try $0.write(hfBytes) } }
            for c in copies { try fm.copyItem(atPath: c, toPath: "\(tmp)/\((c as NSString).lastPathComponent)") }
        }
        return ConversionSummary(
            from: from, to: target, tensors: records.count,
            files: ((try? fm.contentsOfDirectory(atPath: dst)) ?? []).sorted(), lossyScales: lossy)
    }
}
