import QATCore
import QATIO
import QATModels
import QATQuant

/// How one Linear leaves the exporter, named after ModelOpt's `quant_algo` strings
/// (`modelopt/torch/export/model_config.py`, `quant_utils.get_quantization_format`).
public enum LinearExportFormat: String, Sendable, CaseIterable {
    /// Not quantized: the weight is written in the save dtype and the module is listed in
    /// `exclude_modules` (ModelOpt's `QUANTIZATION_NONE`).
    case none
    /// NVFP4 weights and NVFP4 activations (W4A4): packed E2M1 `weight`, E4M3 `weight_scale`,
    /// fp32 `weight_scale_2` and `input_scale`.
    case nvfp4 = "NVFP4"
    /// NVFP4 weights, unquantized activations (ModelOpt's `W4A16_NVFP4`): no `input_scale`.
    case nvfp4WeightOnly = "W4A16_NVFP4"
    /// Per-tensor FP8 E4M3 weights (and activations when the input quantizer is enabled):
    /// E4M3 `weight`, fp32 `weight_scale` (and `input_scale`).
    case fp8 = "FP8"

    /// The `quant_algo` string, nil for `.none`.
    public var quantAlgo: String? { self == .none ? nil : rawValue }

    public var isNVFP4: Bool { self == .nvfp4 || self == .nvfp4WeightOnly }

    /// The per-layer entry of `quantized_layers` (ModelOpt's `process_layer_quant_config`):
    /// NVFP4 kinds carry `group_size`, FP8 does not.
    var layerConfig: JSONObject {
        switch self {
        case .none: return JSONObject()
        case .nvfp4, .nvfp4WeightOnly:
            return JSONObject([(key: "quant_algo", value: .string(rawValue)), (key: "group_size", value: .int(Int64(NVFP4.blockSize)))])
        case .fp8:
            return JSONObject([(key: "quant_algo", value: .string(rawValue))])
        }
    }
}

/// Everything the exporter decides before writing a byte: each Linear's format and the amax
/// values its scales come from, the KV-cache scales, and the two quantization configs.
///
/// Built from the live quantizers (`ExportPlan.make`) so that the export is exactly the model
/// that was trained or calibrated; every inconsistency an inference engine could not load
/// (a fused group with two global scales, an uncalibrated quantizer, a format combination
/// ModelOpt has no checkpoint layout for) is an error here, before anything is written.
public struct ExportPlan: Sendable {
    public struct LinearEntry: Sendable, Equatable {
        /// HF module path (`model.layers.0.self_attn.q_proj`).
        public var name: String
        public var format: LinearExportFormat
        /// Calibrated weight amax (NVFP4 global amax, or FP8 per-tensor amax).
        public var weightAmax: Float?
        /// Calibrated input amax when the input quantizer is enabled.
        public var inputAmax: Float?
    }

    public struct KVEntry: Sendable, Equatable {
        public var layer: Int
        public var kAmax: Float?
        public var vAmax: Float?
    }

    /// Every Linear of the model in module order (lm_head last).
    public var linears: [LinearEntry]
    /// Layers with an enabled FP8 K or V quantizer.
    public var kvCache: [KVEntry]
    /// `NVFP4`, `W4A16_NVFP4`, `FP8`, `MIXED_PRECISION`, or nil when no Linear is quantized.
    public var quantAlgo: String?
    /// `FP8` or nil.
    public var kvCacheQuantAlgo: String?
    /// ModelOpt's prefix-wildcard summary of the unquantized Linears (single-format exports).
    public var excludeModules: [String]

    public var quantizedLinears: [LinearEntry] { linears.filter { $0.format != .none } }
    public func entry(_ name: String) -> LinearEntry? { linears.first { $0.name == name } }

    /// Reads the formats and amax values off the quantizers attached to `model`.
    public static func make(model: CausalLM, quantizers: QuantizerSet) throws -> ExportPlan {
        func calibrated(_ q: TensorQuantizer) throws -> Float {
            guard let a = q.amax else {
                throw QATError(
                    "quantizer \(q.name) is enabled but was never calibrated (no amax): calibrate or restore a checkpoint before exporting")
            }
            guard a.isFinite, a > 0 else { throw QATError("quantizer \(q.name) has amax \(a); an export needs a finite positive amax") }
            return a
        }
        func enabled(_ name: String) -> TensorQuantizer? {
            guard let q = quantizers.byName[name], q.enabled else { return nil }
            return q
        }
        var linears: [LinearEntry] = []
        for l in model.linears {
            let wq = enabled(l.name + ".weight_quantizer")
            let iq = enabled(l.name + ".input_quantizer")
            guard let wq else {
                if let iq {
                    throw QATError(
                        "\(l.name): the input quantizer is enabled (\(iq.format)) but the weight quantizer is "
                            + "not; ModelOpt exports such a layer unquantized, so the export would not reproduce the "
                            + "model. Disable \(iq.name) or enable the weight quantizer in quant_cfg")
                }
                linears.append(LinearEntry(name: l.name, format: .none))
                continue
            }
            let format: LinearExportFormat
            switch (wq.format, iq?.format) {
            case (.nvfp4(let b), nil) where b == NVFP4.blockSize: format = .nvfp4WeightOnly
            case (.nvfp4(let b), .nvfp4(let c)?) where b == NVFP4.blockSize && c == NVFP4.blockSize: format = .nvfp4
            case (.fp8PerTensor, nil), (.fp8PerTensor, .fp8PerTensor?): format = .fp8
            default:
                throw QATError(
                    "\(l.name): weight \(wq.format) with input \(iq.map { "\($0.format)" } ?? "disabled") has "
                        + "no ModelOpt checkpoint layout this exporter writes (supported: NVFP4 W4A4, NVFP4 "
                        + "weight-only, FP8 W8A8/W8A16)")
            }
            linears.append(LinearEntry(name: l.name, format: format, weightAmax: try calibrated(wq), inputAmax: try iq.map(calibrated)))
        }

        // Fused GEMMs (q/k/v, gate/up) get one global weight scale and one input scale in the
        // engines (vLLM takes the max of the shards' scales): they must already be equal, or
        // the exported model would not be the model that was trained.
        for layer in model.layers {
            for group in layer.fusedGroups {
                let entries = group.compactMap { g in linears.first { $0.name == g.name } }
                let formats = Set(entries.map(\.format))
                if formats.count > 1 {
                    throw QATError(
                        "\(entries.map(\.name).joined(separator: ", ")) run as one fused GEMM in inference "
                            + "engines but are quantized differently "
                            + "(\(entries.map(\.format.rawValue).joined(separator: " / "))); give them the same "
                            + "quant_cfg")
                }
                guard let f = formats.first, f.isNVFP4 else { continue }
                for (what, values) in [("weight", entries.map(\.weightAmax)), ("input", entries.map(\.inputAmax))] {
                    let distinct = Set(values.compactMap { $0 })
                    if distinct.count > 1 {
                        throw QATError(
                            "\(entries.map(\.name).joined(separator: ", ")) form one fused GEMM but their \(what) "
                                + "amax differ (\(values.map { $0.map { "\($0)" } ?? "none" }.joined(separator: ", "))): "
                                + "NVFP4 needs one \(what == "weight" ? "weight_scale_2" : "input_scale") per fused GEMM. "
                                + "Calibrate with QuantizerSet (it shares amax over fused groups) or restore a checkpoint "
                                + "written that way")
                    }
                }
            }
        }

        var kv: [KVEntry] = []
        for layer in model.layers {
            var e = KVEntry(layer: layer.index)
            for (kind, keyPath) in [("k", \KVEntry.kAmax), ("v", \KVEntry.vAmax)] {
                guard let q = enabled("\(layer.prefix).self_attn.\(kind)_bmm_quantizer") else { continue }
                guard q.format == .fp8PerTensor else {
                    throw QATError(
                        "\(q.name): KV-cache format \(q.format) is not exportable (only FP8 E4M3 per-tensor, "
                            + "ModelOpt's kv_cache_quant_algo FP8)")
                }
                e[keyPath: keyPath] = try calibrated(q)
            }
            if e.kAmax != nil || e.vAmax != nil { kv.append(e) }
        }

        let quantized = linears.filter { $0.format != .none }
        if quantized.isEmpty && kv.isEmpty {
            throw QATError(
                "nothing is quantized (every quantizer is disabled): there is no quantized checkpoint to "
                    + "export; the original model directory already is the export")
        }
        let formats = Set(quantized.map(\.format))
        let algo: String? = formats.count > 1 ? "MIXED_PRECISION" : formats.first?.quantAlgo
        let excluded =
            formats.count > 1
            ? [] : summarizeExcludeModules(unquantized: linears.filter { $0.format == .none }.map(\.name), quantized: quantized.map(\.name))
        return ExportPlan(
            linears: linears, kvCache: kv, quantAlgo: algo, kvCacheQuantAlgo: kv.isEmpty ? nil : "FP8",
            excludeModules: excluded)
    }

    // MARK: - Configs

    /// `hf_quant_config.json` as ModelOpt's `get_quant_config` builds it
    /// (`modelopt/torch/export/quant_utils.py`): `producer`, then `quantization` with
    /// `quant_algo`, `kv_cache_quant_algo` (null when the KV cache is not quantized), then
    /// `group_size` (NVFP4 kinds) and the sorted `exclude_modules` — or, for mixed formats,
    /// `quantized_layers` (module → `{quant_algo, group_size?}`) instead of both.
    public func hfQuantConfig(producerName: String, producerVersion: String) -> JSONObject {
        var q = JSONObject()
        q.set("quant_algo", quantAlgo.map { .string($0) } ?? .null)
        q.set("kv_cache_quant_algo", kvCacheQuantAlgo.map { .string($0) } ?? .null)
        let quantized = quantizedLinears
        if quantAlgo == "MIXED_PRECISION" || quantized.isEmpty {
            q.set("quantized_layers", .object(JSONObject(quantized.map { (key: $0.name, value: .object($0.format.layerConfig)) })))
        } else {
            if quantized[0].format.isNVFP4 { q.set("group_size", .int(Int64(NVFP4.blockSize))) }
            q.set("exclude_modules", .array(excludeModules.map { .string($0) }))
        }
        return JSONObject([
            (
                key: "producer",
                value: .object(
                    JSONObject([(key: "name", value: .string(producerName)), (key: "version", value: .string(producerVersion))]))
            ),
            (key: "quantization", value: .object(q)),
        ])
    }

    /// The `quantization_config` block of config.json: ModelOpt 0.47's
    /// `convert_hf_quant_config_format` (`modelopt/torch/export/convert_hf_config.py`) applied
    /// to an hf_quant_config object. Key order is ModelOpt's: `config_groups`,
    /// (`quantized_layers` for mixed), `ignore`, `quant_algo`, `kv_cache_scheme`, `producer`,
    /// `quant_method`.
    public static func quantizationConfig(fromHFQuantConfig hf: JSONObject) -> JSONObject {
        let details = hf["quantization"]?.objectValue ?? JSONObject()
        let algo = details["quant_algo"]?.stringValue
        var out = JSONObject()
        let groupSize: JSONValue = details["group_size"].flatMap { $0.isNull ? nil : $0 } ?? .int(16)
        func scheme(bits: Int, group: JSONValue?) -> JSONValue {
            var o = JSONObject([
                (key: "dynamic", value: .bool(false)), (key: "num_bits", value: .int(Int64(bits))), (key: "type", value: .string("float")),
            ])
            if let group { o.set("group_size", group) }
            return .object(o)
        }
        func group(forAlgo a: String, group gs: JSONValue?) -> JSONObject? {
            switch a {
            case "FP8":
                return JSONObject([
                    (key: "input_activations", value: scheme(bits: 8, group: nil)), (key: "weights", value: scheme(bits: 8, group: nil)),
                ])
            case "NVFP4":
                return JSONObject([
                    (key: "input_activations", value: scheme(bits: 4, group: gs ?? .int(16))),
                    (key: "weights", value: scheme(bits: 4, group: gs ?? .int(16))),
                ])
            case "W4A16_NVFP4": return JSONObject([(key: "weights", value: scheme(bits: 4, group: gs ?? .int(16)))])
            default: return nil
            }
        }
        switch algo {
        case "FP8"?, "NVFP4"?, "W4A16_NVFP4"?:
            var g = group(forAlgo: algo!, group: groupSize) ?? JSONObject()
            g.set("targets", .array([.string("Linear")]))
            out.set("config_groups", .object(JSONObject([(key: "group_0", value: .object(g))])))
        case "MIXED_PRECISION"?:
            let layers = details["quantized_layers"]?.objectValue ?? JSONObject()
            // One group per distinct layer config, in order of first appearance; ModelOpt keys
            // the groups by the sorted items of the layer config.
            var keys: [String] = []
            var members: [String: [String]] = [:]
            var configs: [String: JSONObject] = [:]
            for (name, v) in layers.entries {
                let cfg = v.objectValue ?? JSONObject()
                let key = cfg.entries.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value.serialized(indent: nil))" }.joined(
                    separator: ";")
                if members[key] == nil { keys.append(key); configs[key] = cfg }
                members[key, default: []].append(name)
            }
            var groups = JSONObject()
            for (i, key) in keys.enumerated() {
                let cfg = configs[key]!
                let a = cfg["quant_algo"]?.stringValue ?? ""
                var g = group(forAlgo: a, group: cfg["group_size"]) ?? JSONObject([(key: "quant_algo", value: .string(a))])
                g.set("targets", .array(members[key]!.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }.map { .string($0) }))
                groups.set("group_\(i)", .object(g))
            }
            out.set("config_groups", .object(groups))
            out.set("quantized_layers", .object(layers))
        default:
            break
        }
        out.set("ignore", details["exclude_modules"].flatMap { $0.isNull ? nil : $0 } ?? .array([]))
        if let algo { out.set("quant_algo", .string(algo)) }
        if let kv = details["kv_cache_quant_algo"]?.stringValue, !kv.isEmpty {
            out.set("kv_cache_scheme", kv == "FP8" ? scheme(bits: 8, group: nil) : .string(kv))
        }
        if let p = hf["producer"], !p.isNull { out.set("producer", p) }
        out.set("quant_method", .string("modelopt"))
        return out
    }

    /// ModelOpt's `_prefix_wildcard_summarize_exclude_modules`: each unquantized module is
    /// covered by the shortest dot-boundary prefix wildcard (`prefix*`, or the pair `prefix`
    /// + `prefix.*` reported as `prefix.*`) that matches no quantized module, else by its own
    /// name; the result is sorted. A whole excluded decoder layer thus becomes
    /// `model.layers.3*` and the head `lm_head`.
    public static func summarizeExcludeModules(unquantized: [String], quantized: [String]) -> [String] {
        var negative = Set<String>()
        for q in quantized {
            negative.insert(q)
            var prefix = ""
            negative.insert("*")
            for ch in q { prefix.append(ch); negative.insert(prefix + "*") }
        }
        var summary = Set<String>()
        for name in unquantized {
            var candidates: [[String]] = []
            let chars = Array(name)
            for i in chars.indices where chars[i] == "." {
                let p = String(chars[..<i])
                candidates.append([p + "*"])
                candidates.append([p, p + ".*"])
            }
            candidates.append([name])
            var chosen: [String] = []
            for c in candidates {
                if c.contains(where: { negative.contains($0) }) { continue }
                if c.allSatisfy({ summary.contains($0) }) { chosen = []; break }
                chosen = c
                break
            }
            if chosen.count == 2 {
                let sorted = chosen.sorted { $0.count < $1.count }
                if sorted[1] == sorted[0] + ".*" { summary.insert(sorted[1]) } else { summary.formUnion(chosen) }
            } else {
                summary.formUnion(chosen)
            }
        }
        return summary.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
    }
}
