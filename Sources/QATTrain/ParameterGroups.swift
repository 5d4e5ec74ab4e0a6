import Foundation
import Yams

// Parameter selection (trainable_params / frozen_params), per-parameter optimizer settings
// (lr_config) and the default no-weight-decay rule, turned into optimizer parameter groups.
//
// Semantics follow ModelOpt's `ModelOptHFTrainer` (modelopt/torch/opt/plugins/transformers.py,
// read for this file):
//
// - `_configure_trainable_params`: `trainable_params` and `frozen_params` are lists of
//   `fnmatch.fnmatch` patterns over `model.named_parameters()` names; both given raises
//   "mutually exclusive"; `trainable_params` sets `requires_grad = matches(name)` for every
//   parameter, `frozen_params` only switches matching parameters off.
// - `load_lr_config`: a YAML mapping pattern → optimizer kwargs, kept in file order; string
//   values are converted with `float()` where possible (PyYAML reads `1e-5` as a string).
// - `_match_lr_config_pattern`: the first pattern (in order) that fnmatches the name wins.
// - `create_optimizer`: trainable parameters are bucketed by `(pattern, is_decay)` in
//   first-encounter order; each bucket gets `weight_decay = args.weight_decay if is_decay
//   else 0.0`, and *then* `group.update(lr_config[pattern])` — so an explicit `weight_decay`
//   in an lr_config entry overrides the no-decay rule for norms and biases it matches.
//   Parameters matching no pattern use the global TrainingArguments values.
// - `is_decay` comes from HF `Trainer.get_decay_parameter_names`: everything except biases and
//   norm weights (LayerNorm modules, names containing `bias`, `layernorm`, `rmsnorm`, a
//   `norm` or `_norm` path component). On HF Llama/Qwen names that is exactly the default
//   here: `*norm.weight` (input_layernorm, post_attention_layernorm, model.norm, q_norm,
//   k_norm) and `*.bias`.
//
// Deliberate differences, because users typo globs and a silent no-op costs a whole run:
// a trainable/frozen pattern that matches no parameter is an error; an lr_config pattern
// that matches no parameter at all is an error; unknown lr_config keys are errors (ModelOpt
// would pass them to the optimizer class). Patterns that match something but end up unused
// (shadowed by an earlier pattern, or only matching frozen parameters) are reported in
// `ParamGroupPlan.unusedLRConfigPatterns` for the trainer to log.

/// AdamW settings of one parameter group. Defaults are HF `TrainingArguments`' (lr 5e-5,
/// weight_decay 0, betas (0.9, 0.999), eps 1e-8), since recipes mirror HF trainer arguments.
public struct AdamWHyperparameters: Codable, Equatable, Sendable {
    public var lr: Double
    public var weightDecay: Double
    public var beta1: Double
    public var beta2: Double
    public var eps: Double

    public init(lr: Double = 5e-5, weightDecay: Double = 0, beta1: Double = 0.9, beta2: Double = 0.999, eps: Double = 1e-8) {
        self.lr = lr
        self.weightDecay = weightDecay
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
    }

    enum CodingKeys: String, CodingKey {
        case lr, weightDecay = "weight_decay", beta1, beta2, eps
    }

    /// Rejects values PyTorch's AdamW constructor rejects (lr < 0, eps < 0, betas outside [0, 1),
    /// weight_decay < 0), naming `context` (e.g. the lr_config pattern).
    public func validate(_ context: String) throws {
        func bad(_ what: String) -> QATError { QATError("\(context): invalid \(what)") }
        guard lr.isFinite, lr >= 0 else { throw bad("learning rate \(lr) (must be >= 0)") }
        guard eps.isFinite, eps >= 0 else { throw bad("eps \(eps) (must be >= 0)") }
        guard beta1 >= 0, beta1 < 1 else { throw bad("beta1 \(beta1) (must be in [0, 1))") }
        guard beta2 >= 0, beta2 < 1 else { throw bad("beta2 \(beta2) (must be in [0, 1))") }
        guard weightDecay.isFinite, weightDecay >= 0 else { throw bad("weight_decay \(weightDecay) (must be >= 0)") }
    }
}

/// Which parameters train: at most one of `trainable` (only matching parameters train) and
/// `frozen` (all but matching parameters train); neither means everything trains.
public struct ParameterSelection: Equatable, Sendable {
    public let trainable: [String]?
    public let frozen: [String]?

    /// Throws when both lists are given (ModelOpt: "mutually exclusive"). An empty list counts
    /// as not given, as in ModelOpt (`if not trainable and not frozen`).
    public init(trainable: [String]? = nil, frozen: [String]? = nil) throws {
        let t = (trainable?.isEmpty ?? true) ? nil : trainable
        let f = (frozen?.isEmpty ?? true) ? nil : frozen
        if t != nil && f != nil {
            throw QATError(
                "trainable_params and frozen_params are mutually exclusive: give one of them "
                    + "(trainable_params: only matching parameters train; frozen_params: all but matching "
                    + "parameters train)")
        }
        self.trainable = t
        self.frozen = f
    }

    private init(unchecked trainable: [String]?, frozen: [String]?) {
        self.trainable = trainable
        self.frozen = frozen
    }

    /// Everything trains.
    public static let all = ParameterSelection(unchecked: nil, frozen: nil)

    public func isTrainable(_ name: String) -> Bool {
        if let t = trainable { return Glob.matchesAny(t, name) }
        if let f = frozen { return !Glob.matchesAny(f, name) }
        return true
    }

    /// Throws naming every pattern that matches none of `names` (a typo freezes or trains
    /// nothing silently otherwise).
    public func validate(against names: [String]) throws {
        let (key, patterns): (String, [String]) =
            trainable.map { ("trainable_params", $0) } ?? frozen.map { ("frozen_params", $0) } ?? ("", [])
        let dead = patterns.filter { p in !names.contains { Glob.matches(p, $0) } }
        if !dead.isEmpty {
            let sample = names.prefix(3).joined(separator: ", ")
            throw QATError(
                "\(key): pattern\(dead.count > 1 ? "s" : "") "
                    + "\(dead.map { "'\($0)'" }.joined(separator: ", ")) match\(dead.count > 1 ? "" : "es") no "
                    + "parameter (globs are fnmatch over full HF names such as \(sample); patterns must match "
                    + "the whole name, so wrap fragments in '*')")
        }
    }
}

/// One `lr_config` entry: a glob and the settings it overrides (nil = keep the global value).
public struct LRConfigEntry: Equatable, Sendable {
    public var pattern: String
    public var lr: Double?
    public var weightDecay: Double?
    public var beta1: Double?
    public var beta2: Double?
    public var eps: Double?
    /// 1-based line of the pattern in its YAML source, for messages.
    public var line: Int?

    public init(
        pattern: String, lr: Double? = nil, weightDecay: Double? = nil, beta1: Double? = nil,
        beta2: Double? = nil, eps: Double? = nil, line: Int? = nil
    ) {
        self.pattern = pattern
        self.lr = lr
        self.weightDecay = weightDecay
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.line = line
    }

    /// `base` with this entry's overrides applied (ModelOpt's `group.update(lr_config[pattern])`).
    public func apply(to base: AdamWHyperparameters) -> AdamWHyperparameters {
        var h = base
        if let lr { h.lr = lr }
        if let weightDecay { h.weightDecay = weightDecay }
        if let beta1 { h.beta1 = beta1 }
        if let beta2 { h.beta2 = beta2 }
        if let eps { h.eps = eps }
        return h
    }
}

/// Ordered per-parameter optimizer settings: the first entry whose glob matches a parameter
/// name applies to it; unmatched parameters use the global settings.
///
/// YAML form (inline in a recipe, or a file), as ModelOpt's `lr_config`:
/// ```yaml
/// "*lm_head*":
///   lr: 1e-5
/// "*mlp*":
///   lr: 5e-5
///   weight_decay: 0.01
///   betas: [0.9, 0.95]
///   eps: 1e-8
/// ```
public struct LRConfig: Equatable, Sendable {
    public var entries: [LRConfigEntry]

    public init(entries: [LRConfigEntry]) { self.entries = entries }

    /// Index of the first entry whose pattern matches `name`.
    public func firstMatch(_ name: String) -> Int? {
        entries.firstIndex { Glob.matches($0.pattern, name) }
    }

    /// Parses YAML text (`source` names it in errors: a path or "recipe lr_config").
    public static func parse(yaml: String, source: String = "lr_config") throws -> LRConfig {
        let node: Node?
        do { node = try Yams.compose(yaml: yaml) } catch {
            throw QATError("\(source): not valid YAML: \(error)")
        }
        guard let node else { return LRConfig(entries: []) }
        return try LRConfig(node: node, source: source)
    }

    /// Reads and parses a YAML file.
    public static func load(path: String) throws -> LRConfig {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw QATError("lr_config: cannot read '\(path)'")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw QATError("lr_config: '\(path)' is not UTF-8 text")
        }
        return try parse(yaml: text, source: path)
    }

    /// The recipe's `lr_config` value: either an inline mapping, or a scalar path to a YAML
    /// file (relative paths resolve against `baseDirectory`, the recipe's folder).
    public static func fromRecipe(_ node: Node, baseDirectory: String? = nil) throws -> LRConfig {
        if case .scalar(let s) = node {
            var path = s.string
            if !path.hasPrefix("/"), let base = baseDirectory {
                path = URL(fileURLWithPath: base).appendingPathComponent(path).path
            }
            return try load(path: path)
        }
        return try LRConfig(node: node, source: "lr_config")
    }

    /// Decodes a YAML mapping pattern → {lr, weight_decay, betas, eps}. Errors name the
    /// source, the line, the pattern and the key.
    public init(node: Node, source: String = "lr_config") throws {
        func at(_ n: Node) -> String { n.mark.map { "\(source):\($0.line)" } ?? source }
        guard case .mapping(let mapping) = node else {
            throw QATError("\(at(node)): lr_config must be a mapping of glob pattern -> {lr, weight_decay, betas, eps}")
        }
        var entries: [LRConfigEntry] = []
        var seen: [String: Int] = [:]
        for (keyNode, valueNode) in mapping {
            guard case .scalar(let keyScalar) = keyNode else {
                throw QATError("\(at(keyNode)): lr_config keys must be glob patterns (strings)")
            }
            let pattern = keyScalar.string
            let line = keyNode.mark?.line
            if let prev = seen[pattern] {
                throw QATError(
                    "\(at(keyNode)): lr_config pattern '\(pattern)' appears twice (first on line \(prev)); the first would always win")
            }
            seen[pattern] = line ?? 0
            guard case .mapping(let settings) = valueNode else {
                throw QATError("\(at(valueNode)): lr_config pattern '\(pattern)' must map to settings such as {lr: 1e-5}")
            }
            var entry = LRConfigEntry(pattern: pattern, line: line)
            for (k, v) in settings {
                guard case .scalar(let ks) = k else {
                    throw QATError("\(at(k)): lr_config pattern '\(pattern)': setting names must be strings")
                }
                let key = ks.string
                func number(_ n: Node, _ what: String) throws -> Double {
                    // Double(String) accepts `1e-5`, which YAML 1.1 (and PyYAML) read as a string;
                    // ModelOpt converts such strings with float() too.
                    guard case .scalar(let s) = n, let d = Double(s.string.trimmingCharacters(in: .whitespaces)) else {
                        throw QATError("\(at(n)): lr_config pattern '\(pattern)', key '\(what)': expected a number")
                    }
                    return d
                }
                switch key {
                case "lr", "learning_rate": entry.lr = try number(v, key)
                case "weight_decay": entry.weightDecay = try number(v, key)
                case "eps", "adam_epsilon": entry.eps = try number(v, key)
                case "betas":
                    guard case .sequence(let seq) = v, seq.count == 2 else {
                        throw QATError(
                            "\(at(v)): lr_config pattern '\(pattern)', key 'betas': expected a list of two numbers, e.g. [0.9, 0.999]")
                    }
                    entry.beta1 = try number(seq[0], "betas")
                    entry.beta2 = try number(seq[1], "betas")
                case "beta1", "adam_beta1": entry.beta1 = try number(v, key)
                case "beta2", "adam_beta2": entry.beta2 = try number(v, key)
                default:
                    throw QATError("\(at(k)): lr_config pattern '\(pattern)': unknown key '\(key)' (known: lr, weight_decay, betas, eps)")
                }
            }
            try entry.apply(to: AdamWHyperparameters()).validate("\(at(keyNode)): lr_config pattern '\(pattern)'")
            entries.append(entry)
        }
        self.entries = entries
    }
}

/// Everything that decides how parameters are grouped for AdamW.
public struct OptimizerConfig: Equatable, Sendable {
    /// Global settings (HF `learning_rate`, `weight_decay`, `adam_beta1/2`, `adam_epsilon`).
    public var defaults: AdamWHyperparameters
    public var selection: ParameterSelection
    public var lrConfig: LRConfig?
    /// Globs of parameters that get weight_decay 0 unless an lr_config entry sets it
    /// explicitly. Default: norm weights and biases (what HF's `get_decay_parameter_names`
    /// excludes on Llama/Qwen names); set `[]` to decay everything.
    public var noDecay: [String]

    public static let defaultNoDecay = ["*norm.weight", "*.bias"]

    public init(
        defaults: AdamWHyperparameters = AdamWHyperparameters(), selection: ParameterSelection = .all,
        lrConfig: LRConfig? = nil, noDecay: [String] = OptimizerConfig.defaultNoDecay
    ) {
        self.defaults = defaults
        self.selection = selection
        self.lrConfig = lrConfig
        self.noDecay = noDecay
    }
}

/// One AdamW parameter group.
public struct ParamGroup: Equatable, Sendable {
    public var hyper: AdamWHyperparameters
    /// The lr_config pattern that produced this group (nil: global settings).
    public var pattern: String?
    /// Whether the group is in the decay class (not matched by `noDecay`).
    public var decays: Bool
    public var parameterNames: [String]
}

/// The result of grouping: trainable parameters by group, frozen ones apart.
public struct ParamGroupPlan: Equatable, Sendable {
    public var groups: [ParamGroup]
    public var frozen: [String]
    /// lr_config patterns that match some parameter but no trainable parameter ends up using
    /// (shadowed by an earlier pattern, or only matching frozen parameters). Worth a warning.
    public var unusedLRConfigPatterns: [String]

    /// Groups `names` (in model order) as ModelOpt's `create_optimizer` does: trainable
    /// parameters bucketed by (first matching lr_config pattern, decay class) in
    /// first-encounter order; settings = global, weight_decay 0 for the no-decay class, then
    /// the pattern's explicit overrides.
    public static func build(names: [String], config: OptimizerConfig) throws -> ParamGroupPlan {
        try config.defaults.validate("optimizer defaults")
        try config.selection.validate(against: names)
        var dup = Set<String>()
        for n in names where !dup.insert(n).inserted {
            throw QATError("parameter name '\(n)' appears twice")
        }
        let entries = config.lrConfig?.entries ?? []
        let dead = entries.filter { e in !names.contains { Glob.matches(e.pattern, $0) } }
        if !dead.isEmpty {
            throw QATError(
                "lr_config: pattern\(dead.count > 1 ? "s" : "") "
                    + "\(dead.map { "'\($0.pattern)'" + ($0.line.map { " (line \($0))" } ?? "") }.joined(separator: ", ")) "
                    + "match\(dead.count > 1 ? "" : "es") no parameter (globs are fnmatch over full HF names such as "
                    + "\(names.prefix(2).joined(separator: ", ")))")
        }

        struct Key: Hashable { let entry: Int?; let decays: Bool }
        var order: [Key] = []
        var members: [Key: [String]] = [:]
        var frozen: [String] = []
        var used = Set<Int>()
        for name in names {
            guard config.selection.isTrainable(name) else { frozen.append(name); continue }
            let entry = config.lrConfig?.firstMatch(name)
            if let entry { used.insert(entry) }
            let key = Key(entry: entry, decays: !Glob.matchesAny(config.noDecay, name))
            if members[key] == nil { order.append(key) }
            members[key, default: []].append(name)
        }
        let groups = order.map { key -> ParamGroup in
            var h = config.defaults
            if !key.decays { h.weightDecay = 0 }
            var pattern: String? = nil
            if let i = key.entry {
                h = entries[i].apply(to: h)
                pattern = entries[i].pattern
            }
            return ParamGroup(hyper: h, pattern: pattern, decays: key.decays, parameterNames: members[key] ?? [])
        }
        let unused = entries.indices.filter { !used.contains($0) }.map { entries[$0].pattern }
        return ParamGroupPlan(groups: groups, frozen: frozen, unusedLRConfigPatterns: unused)
    }

    /// A human-readable summary (one line per group), like ModelOpt's `_log_lr_config_summary`.
    public var summary: String {
        var lines = ["optimizer param groups (\(groups.reduce(0) { $0 + $1.parameterNames.count }) trainable, \(frozen.count) frozen):"]
        for (i, g) in groups.enumerated() {
            lines.append(
                "  group \(i): \(g.parameterNames.count) params, lr=\(g.hyper.lr), "
                    + "weight_decay=\(g.hyper.weightDecay), betas=(\(g.hyper.beta1), \(g.hyper.beta2)), "
                    + "eps=\(g.hyper.eps)\(g.pattern.map { ", lr_config '\($0)'" } ?? "")")
        }
        if !unusedLRConfigPatterns.isEmpty {
            lines.append("  lr_config patterns used by no trainable parameter: \(unusedLRConfigPatterns.joined(separator: ", "))")
        }
        return lines.joined(separator: "\n")
    }
}
