import QATCore
import Yams

/// What quant_cfg resolves to for one quantizer.
public struct QuantizerSpec: Equatable, Sendable, CustomStringConvertible {
    public var enabled: Bool
    public var format: QuantFormat
    public var ste: STEMode

    public init(enabled: Bool, format: QuantFormat, ste: STEMode = .passThrough) {
        self.enabled = enabled
        self.format = format
        self.ste = ste
    }

    public var description: String { enabled ? "enabled \(format) ste=\(ste.rawValue)" : "disabled" }
}

/// ModelOpt's `quant_cfg`: an ORDERED list of entries matched against quantizer names with
/// Python `fnmatch` (`Glob`), applied in order so that later entries win.
///
/// Semantics, from ModelOpt `modelopt/torch/quantization/conversion.py`
/// (`set_quantizer_by_cfg`, `_match_quantizer`) and `config.py` (`normalize_quant_cfg_list`):
/// - an entry has `quantizer_name` (required), `cfg`, `enable`, `parent_class`; it must give
///   at least one of `cfg` / `enable`;
/// - an entry **with** `cfg` fully replaces the quantizer's attributes (unspecified
///   attributes revert to ModelOpt's defaults: `num_bits 8`, `axis None`, …) and sets
///   `enable` (default `true`);
/// - an entry **without** `cfg` only toggles enablement, keeping the attributes an earlier
///   entry gave (or the defaults: INT8 per-tensor);
/// - `parent_class` (`nn.Linear`, `nn.BatchNorm2d`, …) restricts the entry to quantizers whose
///   parent module has that class; here the caller passes the class name (by default inferred
///   from the quantizer name: `*weight_quantizer` / `*input_quantizer` / `*output_quantizer`
///   sit in `nn.Linear`, everything else has no class we model);
/// - the legacy dict form `{pattern: {attrs…, enable: …}}` becomes one entry per key in key
///   order; legacy keys `nn.Linear: {pattern: attrs}` become entries with `parent_class`;
///   the legacy `"default"` key means `"*"` and is applied **first** (ModelOpt's old
///   `set_quantizer_by_cfg` popped it and applied it before the other keys; the new
///   normalizer keeps it in place, which is the same whenever it is written first).
/// A quantizer that no entry matches resolves to `nil` (ModelOpt would leave it at its
/// defaults, enabled INT8; presets always start with `"*": enable false`).
public struct QuantConfig: Sendable {
    /// Attributes set by an entry's `cfg` (a full replacement).
    public struct Attributes: Equatable, Sendable {
        public var format: QuantFormat
        public var ste: STEMode
        public init(format: QuantFormat, ste: STEMode = .passThrough) {
            self.format = format
            self.ste = ste
        }
        /// ModelOpt's `QuantizerAttributeConfig()` defaults (num_bits 8, axis None).
        public static let modelOptDefault = Attributes(format: .int8PerTensor)
        public static let nvfp4 = Attributes(format: .nvfp4(blockSize: 16))
        public static let fp8 = Attributes(format: .fp8PerTensor)
    }

    public struct Entry: Equatable, Sendable {
        public var quantizerName: String
        public var parentClass: String?
        public var enable: Bool
        /// nil: the entry only toggles `enable`.
        public var cfg: Attributes?
        /// YAML line of the entry, when parsed from YAML.
        public var line: Int?

        public init(_ quantizerName: String, enable: Bool = true, cfg: Attributes? = nil, parentClass: String? = nil, line: Int? = nil) {
            self.quantizerName = quantizerName
            self.parentClass = parentClass
            self.enable = enable
            self.cfg = cfg
            self.line = line
        }
    }

    public var entries: [Entry]
    /// Calibration algorithm; only `max` is supported.
    public var algorithm: String

    public init(entries: [Entry], algorithm: String = "max") {
        self.entries = entries
        self.algorithm = algorithm
    }

    // MARK: Resolution

    /// The parent-module class a quantizer of this name sits in, for `parent_class` entries.
    public static func defaultParentClass(forQuantizer name: String) -> String? {
        for suffix in ["weight_quantizer", "input_quantizer", "output_quantizer"] where name.hasSuffix(suffix) {
            return "nn.Linear"
        }
        return nil
    }

    /// Applies the entries in order to one quantizer name. nil when no entry matches.
    public func resolve(quantizerName name: String, parentClass: String?? = nil) -> QuantizerSpec? {
        let parent: String? = parentClass ?? Self.defaultParentClass(forQuantizer: name)
        var matched = false
        var enabled = true
        var attrs = Attributes.modelOptDefault
        for e in entries where Glob.matches(e.quantizerName, name) {
            if let pc = e.parentClass, pc != parent { continue }
            matched = true
            if let c = e.cfg { attrs = c }
            enabled = e.enable
        }
        return matched ? QuantizerSpec(enabled: enabled, format: attrs.format, ste: attrs.ste) : nil
    }

    /// Resolves and builds quantizers for `names` (unmatched names get a disabled quantizer).
    public func makeQuantizers(_ names: [String]) -> [TensorQuantizer] {
        names.map { n in
            if let s = resolve(quantizerName: n) { return TensorQuantizer(name: n, spec: s) }
            return TensorQuantizer(name: n, format: .int8PerTensor, enabled: false)
        }
    }

    /// Appends the entries of `other` (ModelOpt's way of merging a KV preset).
    public func merged(with other: QuantConfig) -> QuantConfig {
        QuantConfig(entries: entries + other.entries, algorithm: algorithm)
    }

    // MARK: Presets

    static let disableAll = [Entry("*", enable: false)]

    /// ModelOpt `configs/ptq/units/default_disabled_quantizers.yaml`
    /// (`_default_disabled_quantizer_cfg`).
    public static let defaultDisabled: [Entry] =
        [
            "*block_sparse_moe.gate*", "*linear_attn.conv1d*", "*linear_attn.in_proj_a*", "*linear_attn.in_proj_b*",
            "*lm_head*", "*mixer.conv1d*", "*self_attention.conv1d*", "*mlp.gate.*", "*mlp.shared_expert_gate.*",
            "*output_layer*", "*proj_out.*", "*router*", "mtp.*", "output.*", "*embed_vision*", "*vision_tower*",
            "*visual*", "*vision_model*", "*multi_modal_projector*",
        ].map { Entry($0, enable: false) }
        + [
            "nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d", "nn.LeakyReLU", "nn.Embedding",
        ].map { Entry("*", enable: false, parentClass: $0) }

    /// ModelOpt `FP8_KV_CFG`: `*[kv]_bmm_quantizer` → FP8 E4M3 per-tensor.
    public static let kvFP8: [Entry] = [Entry("*[kv]_bmm_quantizer", cfg: .fp8)]

    public static let presetNames = [
        "nvfp4_default", "nvfp4_default-kv_fp8", "nvfp4_weight_only", "fp8_default", "fp8_default-kv_fp8",
    ]

    /// A named preset (ModelOpt's `NVFP4_DEFAULT_CFG`, `W4A16_NVFP4_CFG`, `FP8_DEFAULT_CFG`,
    /// optionally merged with `FP8_KV_CFG`). ModelOpt's constant names are accepted too.
    public static func preset(_ name: String) throws -> QuantConfig {
        let key = name.lowercased().replacingOccurrences(of: "_cfg", with: "")
        let w = [Entry("*weight_quantizer", cfg: .nvfp4)]
        let a = [Entry("*input_quantizer", cfg: .nvfp4)]
        switch key {
        case "nvfp4_default", "nvfp4", "w4a4_nvfp4_nvfp4":
            return QuantConfig(entries: disableAll + w + a + defaultDisabled)
        case "nvfp4_default-kv_fp8", "nvfp4_default+fp8_kv", "nvfp4_kv_fp8":
            return QuantConfig(entries: disableAll + w + a + defaultDisabled + kvFP8)
        case "nvfp4_weight_only", "w4a16_nvfp4":
            return QuantConfig(entries: disableAll + w + [Entry("*input_quantizer", enable: false)] + defaultDisabled)
        case "fp8_default", "fp8":
            return QuantConfig(
                entries: disableAll + [Entry("*weight_quantizer", cfg: .fp8), Entry("*input_quantizer", cfg: .fp8)] + defaultDisabled)
        case "fp8_default-kv_fp8", "fp8_default+fp8_kv":
            return QuantConfig(
                entries: disableAll + [Entry("*weight_quantizer", cfg: .fp8), Entry("*input_quantizer", cfg: .fp8)] + defaultDisabled
                    + kvFP8)
        default:
            throw QATError("unknown quantization preset '\(name)'; known presets: \(presetNames.joined(separator: ", "))")
        }
    }

    // MARK: Parsing

    /// Parses YAML text holding a `quantize:`-style mapping (see `init(node:)`).
    public init(yaml: String) throws {
        let node: Node?
        do { node = try SafeYAML.compose(yaml, source: "quant config") } catch let e as QATError { throw e } catch {
            throw QATError("quant config: invalid YAML: \(error)")
        }
        guard let node else { throw QATError("quant config: empty YAML") }
        try self.init(node: node)
    }

    /// Parses the recipe's `quantize:` subtree: a mapping with `quant_cfg` (ordered list or
    /// legacy dict), optional `algorithm` (`max`), and optional `preset` (its entries come
    /// first, then `quant_cfg`'s). A bare scalar is a preset name; a bare sequence is a
    /// quant_cfg list.
    public init(node: Node, path: String = "quantize") throws {
        switch node {
        case .scalar:
            guard let name = node.string else { throw Self.err(path, node, "expected a preset name") }
            do { self = try Self.preset(name) } catch let e as QATError { throw Self.err(path, node, e.message) }
        case .sequence:
            self.init(entries: try Self.parseQuantCfg(node, path: path + ".quant_cfg"))
        case .mapping(let m):
            var entries: [Entry] = []
            var algorithm = "max"
            var sawCfg = false
            var presetEntries: [Entry] = []
            for (k, v) in m {
                let key = k.string ?? ""
                switch key {
                case "quant_cfg":
                    entries = try Self.parseQuantCfg(v, path: "\(path).quant_cfg")
                    sawCfg = true
                case "algorithm":
                    if v.null != nil { algorithm = "max"; continue }
                    if case .mapping(let am) = v, let meth = am["method"]?.string {
                        algorithm = meth
                    } else {
                        guard let s = v.string else { throw Self.err("\(path).algorithm", v, "expected a string such as 'max'") }
                        algorithm = s
                    }
                    guard algorithm == "max" else {
                        throw Self.err("\(path).algorithm", v, "calibration algorithm '\(algorithm)' is not supported (only 'max')")
                    }
                case "preset":
                    guard let s = v.string else { throw Self.err("\(path).preset", v, "expected a preset name") }
                    do { presetEntries = try Self.preset(s).entries } catch let e as QATError {
                        throw Self.err("\(path).preset", v, e.message)
                    }
                default:
                    throw Self.err("\(path).\(key)", k, "unknown key '\(key)' (expected quant_cfg, algorithm, preset)")
                }
            }
            if !sawCfg && presetEntries.isEmpty {
                throw Self.err(path, node, "missing 'quant_cfg' (or 'preset')")
            }
            self.init(entries: presetEntries + entries, algorithm: algorithm)
        case .alias:
            throw Self.err(path, node, "YAML aliases are not supported here")
        }
    }

    static func err(_ path: String, _ node: Node, _ msg: String) -> QATError {
        if let line = node.mark?.line { return QATError("\(path) (line \(line)): \(msg)") }
        return QATError("\(path): \(msg)")
    }

    static func lineOf(_ node: Node) -> Int? { node.mark?.line }

    /// Parses a `quant_cfg` node: the ordered list format or the legacy dict format.
    public static func parseQuantCfg(_ node: Node, path: String = "quant_cfg") throws -> [Entry] {
        switch node {
        case .sequence(let seq):
            var out: [Entry] = []
            for (i, item) in seq.enumerated() {
                out += try parseListItem(item, path: "\(path)[\(i)]")
            }
            return out
        case .mapping(let m):
            // Legacy dict: one entry per key in order; "default" first.
            var first: [Entry] = [], rest: [Entry] = []
            for (k, v) in m {
                guard let key = k.string else { throw err(path, k, "expected a string pattern as key") }
                let es = try parseLegacyPair(key: key, keyNode: k, value: v, path: "\(path).\(key)")
                if key == "default" { first += es } else { rest += es }
            }
            return first + rest
        default:
            throw err(path, node, "expected a list of entries (or the legacy {pattern: attributes} mapping)")
        }
    }

    static func parseListItem(_ item: Node, path: String) throws -> [Entry] {
        guard case .mapping(let m) = item else {
            throw err(path, item, "expected a mapping with 'quantizer_name' and 'cfg' and/or 'enable'")
        }
        let keys = m.keys.compactMap(\.string)
        if !keys.contains("quantizer_name") {
            // Legacy single-key entries inside a list: {pattern: attrs} or {nn.Class: {pattern: attrs}}.
            guard m.count == 1, let (k, v) = m.first, let key = k.string else {
                throw err(path, item, "entry has no 'quantizer_name' (keys: \(keys.joined(separator: ", ")))")
            }
            return try parseLegacyPair(key: key, keyNode: k, value: v, path: "\(path).\(key)")
        }
        var name = "", parent: String? = nil, enable: Bool? = nil
        var cfgNode: Node? = nil
        for (k, v) in m {
            let key = k.string ?? ""
            switch key {
            case "quantizer_name":
                guard let s = v.string, v.null == nil else { throw err("\(path).quantizer_name", v, "expected a string pattern") }
                name = s
            case "parent_class":
                guard let s = v.string else { throw err("\(path).parent_class", v, "expected a class name such as nn.Linear") }
                parent = s
            case "enable":
                guard let b = v.bool else { throw err("\(path).enable", v, "expected true or false, got '\(v.string ?? "?")'") }
                enable = b
            case "cfg":
                cfgNode = v.null != nil ? nil : v
            default:
                throw err(
                    "\(path).\(key)", k, "unknown key '\(key)' in a quant_cfg entry (expected quantizer_name, cfg, enable, parent_class)")
            }
        }
        return [try makeEntry(name: name, parent: parent, enable: enable, cfgNode: cfgNode, entryNode: item, path: path)]
    }

    /// Legacy `{pattern: {attrs…, enable}}` or `{nn.Class: {pattern: {attrs…}}}`.
    static func parseLegacyPair(key rawKey: String, keyNode: Node, value: Node, path: String) throws -> [Entry] {
        let key = rawKey == "default" ? "*" : rawKey
        if key.hasPrefix("nn.") {
            guard case .mapping(let sub) = value else { throw err(path, value, "an 'nn.*' key needs a mapping {pattern: attributes}") }
            var out: [Entry] = []
            for (pk, pv) in sub {
                guard let pattern = pk.string else { throw err(path, pk, "expected a string pattern") }
                out += try legacyAttrs(pattern: pattern, parent: key, value: pv, keyNode: pk, path: "\(path).\(pattern)")
            }
            return out
        }
        return try legacyAttrs(pattern: key, parent: nil, value: value, keyNode: keyNode, path: path)
    }

    static func legacyAttrs(pattern: String, parent: String?, value: Node, keyNode: Node, path: String) throws -> [Entry] {
        guard case .mapping(let m) = value else {
            if case .sequence = value { throw err(path, value, "a list of attribute sets (SequentialQuantizer) is not supported") }
            throw err(path, value, "expected a mapping of quantizer attributes")
        }
        var enable: Bool? = nil
        var cfgPairs: [(Node, Node)] = []
        for (k, v) in m {
            if k.string == "enable" {
                guard let b = v.bool else { throw err("\(path).enable", v, "expected true or false") }
                enable = b
            } else {
                cfgPairs.append((k, v))
            }
        }
        let cfgNode: Node? = cfgPairs.isEmpty ? nil : .mapping(Node.Mapping(cfgPairs, m.tag, m.style, m.mark))
        return [try makeEntry(name: pattern, parent: parent, enable: enable, cfgNode: cfgNode, entryNode: value, path: path)]
    }

    static func makeEntry(name: String, parent: String?, enable: Bool?, cfgNode: Node?, entryNode: Node, path: String) throws -> Entry {
        if cfgNode == nil && enable == nil {
            throw err(path, entryNode, "entry for '\(name)' must specify 'cfg', 'enable', or both")
        }
        var attrs: Attributes? = nil
        if let c = cfgNode {
            if case .mapping(let cm) = c, cm.count == 0 {
                if enable ?? true { throw err("\(path).cfg", c, "cfg must be a non-empty mapping for an enabled quantizer") }
                attrs = .modelOptDefault
            } else {
                attrs = try parseAttributes(c, path: "\(path).cfg")
            }
        }
        return Entry(name, enable: enable ?? true, cfg: attrs, parentClass: parent, line: lineOf(entryNode))
    }

    enum NumBits: Equatable { case e2m1, e4m3, int8 }

    static func parseNumBits(_ v: Node, path: String) throws -> NumBits {
        switch v {
        case .scalar:
            if let i = v.safeInt {
                if i == 8 { return .int8 }
                throw err(path, v, "num_bits \(i) is not supported (supported: e2m1 / [2, 1] for NVFP4, e4m3 / [4, 3] for FP8, 8 for INT8)")
            }
            let s = (v.string ?? "").lowercased()
            switch s {
            case "e2m1": return .e2m1
            case "e4m3": return .e4m3
            default:
                throw err(path, v, "num_bits '\(v.string ?? "")' is not supported (supported: e2m1 / [2, 1], e4m3 / [4, 3], 8)")
            }
        case .sequence(let seq):
            let ints = seq.map(\.safeInt)
            if ints.count == 2, let e = ints[0], let m = ints[1] {
                if (e, m) == (2, 1) { return .e2m1 }
                if (e, m) == (4, 3) { return .e4m3 }
                throw err(path, v, "num_bits [\(e), \(m)] is not supported (supported: [2, 1] (E2M1), [4, 3] (E4M3), 8)")
            }
            throw err(path, v, "num_bits must be e.g. [2, 1] (exponent, mantissa bits)")
        default:
            throw err(path, v, "num_bits must be a string (e2m1, e4m3), a pair [E, M], or 8")
        }
    }

    static func parseScaleBits(_ v: Node, path: String) throws -> Bool {
        if case .sequence(let seq) = v, seq.count == 2, seq[0].safeInt == 4, seq[1].safeInt == 3 { return true }
        if let s = v.string?.lowercased(), s == "e4m3" { return true }
        throw err(path, v, "scale_bits '\(describe(v))' is not supported (NVFP4 needs e4m3 / [4, 3] block scales)")
    }

    static func describe(_ v: Node) -> String {
        switch v {
        case .scalar: return v.string ?? "?"
        case .sequence(let s): return "[" + s.map(describe).joined(separator: ", ") + "]"
        case .mapping(let m): return "{" + m.map { "\(describe($0.key)): \(describe($0.value))" }.joined(separator: ", ") + "}"
        case .alias: return "*alias"
        }
    }

    /// Keys of ModelOpt's `QuantizerAttributeConfig` that we accept only at their defaults.
    static let defaultOnlyKeys: [String: String] = [
        "learn_amax": "false", "bias": "null", "pre_quant_scale": "null", "rotate": "false",
        "backend": "null", "backend_extra_args": "null", "use_constant_amax": "false", "unsigned": "false",
    ]

    static func isDefault(_ v: Node, _ def: String) -> Bool {
        switch def {
        case "false": return v.bool == false || v.null != nil
        default: return v.null != nil
        }
    }

    static func parseAttributes(_ node: Node, path: String) throws -> Attributes {
        guard case .mapping(let m) = node else {
            if case .sequence = node { throw err(path, node, "a list of attribute sets (SequentialQuantizer) is not supported") }
            throw err(path, node, "expected a mapping of quantizer attributes")
        }
        var numBits: NumBits = .int8
        var numBitsNode: Node? = nil
        var blockNode: Node? = nil
        var axisNode: Node? = nil
        var ste: STEMode = .passThrough
        for (k, v) in m {
            let key = k.string ?? ""
            let kp = "\(path).\(key)"
            switch key {
            case "num_bits": numBits = try parseNumBits(v, path: kp); numBitsNode = v
            case "block_sizes": blockNode = v.null != nil ? nil : v
            case "axis": axisNode = v.null != nil ? nil : v
            case "pass_through_bwd":
                guard let b = v.bool else { throw err(kp, v, "expected true or false") }
                ste = b ? .passThrough : .clipped
            case "fake_quant":
                guard v.bool == true else { throw err(kp, v, "only fake quantization (fake_quant: true) is supported") }
            case "calibrator":
                guard v.string == "max" else { throw err(kp, v, "calibrator '\(describe(v))' is not supported (only max)") }
            case "type":
                guard v.string == "static" else {
                    throw err(kp, v, "type '\(describe(v))' is not supported for a per-tensor quantizer (only static, calibrated amax)")
                }
            case "narrow_range":
                guard v.bool == true else { throw err(kp, v, "narrow_range: false is not supported (INT8 uses [-127, 127])") }
            case "trt_high_precision_dtype":
                continue  // ONNX/TensorRT export setting; irrelevant here.
            case "enable":
                throw err(kp, k, "'enable' belongs at the entry level, next to 'cfg', not inside it")
            default:
                if let def = defaultOnlyKeys[key] {
                    guard isDefault(v, def) else { throw err(kp, v, "\(key): \(describe(v)) is not supported (only \(def))") }
                } else {
                    throw err(
                        kp, k,
                        "unknown quantizer attribute '\(key)' (known: num_bits, block_sizes, axis, "
                            + "pass_through_bwd, fake_quant, calibrator, type, narrow_range, trt_high_precision_dtype, "
                            + "\(defaultOnlyKeys.keys.sorted().joined(separator: ", ")))")
                }
            }
        }
        if let a = axisNode {
            throw err("\(path).axis", a, "axis \(describe(a)) (per-channel scales) is not supported; use axis: null (per-tensor)")
        }
        switch numBits {
        case .e2m1:
            guard let b = blockNode, case .mapping(let bm) = b else {
                throw err(
                    "\(path).num_bits", numBitsNode ?? node, "e2m1 needs block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3} (NVFP4)")
            }
            var size: Int? = nil, dynamic = false, scaleOK = false
            for (k, v) in bm {
                let bp = "\(path).block_sizes.\(k.string ?? "?")"
                if let d = k.safeInt {
                    guard d == -1 else { throw err(bp, k, "blocking along dim \(d) is not supported (only the last dim, -1)") }
                    guard let s = v.safeInt else { throw err(bp, v, "expected an integer block size") }
                    guard s == 16 else { throw err(bp, v, "NVFP4 block size \(s) is not supported (only 16)") }
                    size = s
                    continue
                }
                switch k.string ?? "" {
                case "type":
                    guard v.string == "dynamic" else {
                        throw err(
                            bp, v,
                            "block type '\(describe(v))' is not supported (only dynamic: per-block scales from the "
                                + "data, global amax calibrated)")
                    }
                    dynamic = true
                case "scale_bits": scaleOK = try parseScaleBits(v, path: bp)
                default:
                    throw err(bp, k, "unknown or unsupported block_sizes key '\(k.string ?? "?")' (expected -1, type, scale_bits)")
                }
            }
            guard size != nil else { throw err("\(path).block_sizes", b, "missing the block size (-1: 16)") }
            guard dynamic else { throw err("\(path).block_sizes", b, "missing 'type: dynamic'") }
            guard scaleOK else { throw err("\(path).block_sizes", b, "missing 'scale_bits: e4m3'") }
            return Attributes(format: .nvfp4(blockSize: 16), ste: ste)
        case .e4m3, .int8:
            if let b = blockNode {
                throw err(
                    "\(path).block_sizes", b,
                    "block-wise \(numBits == .e4m3 ? "FP8" : "INT8") is not supported (only per-tensor; remove block_sizes)")
            }
            return Attributes(format: numBits == .e4m3 ? .fp8PerTensor : .int8PerTensor, ste: ste)
        }
    }
}
