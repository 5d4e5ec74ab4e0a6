import Foundation
import QATCore
import QATQuant
import Yams

/// A `qat apply` recipe: what to load, how to quantize, calibrate, train and export.
/// Decoded strictly from YAML: unknown keys, wrong types and out-of-range values are errors
/// naming the key and the line. Relative paths are relative to the working directory.
public struct Recipe: Sendable {
    public struct DataSpec: Sendable, Equatable {
        public init() {}
        /// `.h5` token file (dataset `<split>/input_ids`) or `.jsonl` text.
        public var train = "models/fortune-lm/tokens.h5"
        public var validation = "models/fortune-lm/tokens.h5"
        public var trainSplit = "train"
        public var validationSplit = "validation"
        public var seqLen = 256
        /// Validation sequences evaluated (nil: all ⌊(N−1)/seq_len⌋).
        public var validationSequences: Int? = nil
    }

    public struct CalibrationSpec: Sendable, Equatable {
        public init() {}
        public var samples = 64
        public var batchSize = 8
        public var algorithm = "max"
    }

    public enum Mode: String, Sendable, CaseIterable { case none, qat, qad }
    public enum KDLoss: String, Sendable, CaseIterable { case forwardKL = "forward_kl", reverseKL = "reverse_kl", jsd }
    /// How a teacher cache becomes a loss (`TopKKernels`): the exact KL of the k cached tokens
    /// plus a rest bin (default), the teacher renormalised over its top-k against the student's
    /// full log-softmax (qat ≤ v1), both renormalised over the top-k (axolotl), or sampled tokens.
    public enum TopKObjective: String, Sendable, CaseIterable {
        case coarseKL = "coarse_kl", teacherNormalized = "teacher_normalized", bothNormalized = "both_normalized", sampled
    }

    public struct DistillSpec: Sendable, Equatable {
        public init() {}
        /// Teacher model directory; nil: the unquantized original model.
        public var teacher: String? = nil
        /// Weight of the KD term: loss = (1 − kd_ratio)·CE + kd_ratio·KD.
        public var kdRatio = 1.0
        public var temperature = 1.0
        public var loss: KDLoss = .forwardKL
        /// Generalized JSD interpolation (0 = forward KL, 1 = reverse KL) when loss is jsd.
        public var beta = 0.5
        /// Offline top-k teacher cache (HDF5) instead of running the teacher.
        public var teacherLogprobs: String? = nil
        /// The objective used with `teacherLogprobs`.
        /// both_normalized by measurement on fortune-lm (README: 103% of the PTQ gap vs coarse_kl's 78%).
        public var topkObjective: TopKObjective = .bothNormalized
    }

    public struct TrainSpec: Sendable, Equatable {
        public init() {}
        public var mode: Mode = .qat
        public var steps = 100
        public var epochs: Double? = nil
        public var batchSize = 8
        public var gradAccum = 1
        public var lr = 1e-4
        public var schedule = "cosine"
        public var warmupSteps = 0
        public var warmupRatio: Double? = nil
        public var weightDecay = 0.0
        public var betas = [0.9, 0.999]
        public var eps = 1e-8
        public var maxGradNorm: Double? = 1.0
        public var trainableParams: [String]? = nil
        public var frozenParams: [String]? = nil
        /// Ordered glob → {lr, weight_decay, betas}: kept as YAML text for the optimizer's parser.
        public var lrConfigYAML: String? = nil
        public var lrConfigSource: String? = nil
        public var seed: UInt64 = 42
        public var evalEvery = 50
        public var saveEvery = 100
        public var logEvery = 10
        public var checkpointDir: String? = nil
        public var keepCheckpoints = 2
        /// What to do with a non-finite loss or gradient: stop (default) or skip the batch.
        public var onNonFinite = "stop"
        /// ZeRO-1 under data parallelism: each rank keeps AdamW state for its share of the
        /// parameters only (see `ZeROPartition`); a no-op with one process.
        public var shardOptimizerState = false
        /// Pipeline parallelism: the model (and a live teacher) split into this many stages,
        /// one per rank (`mpirun -np <stages>`); 1: off.
        public var pipelineStages = 1
        /// Mixture-of-experts models: weight of the load-balancing auxiliary loss (transformers'
        /// formula); nil: the config's router_aux_loss_coef when it sets output_router_logits, else 0.
        public var routerAuxLossCoef: Double? = nil
        /// Activation checkpointing: a training forward keeps only each layer's input and the
        /// backward recomputes the layer's activations (bit-identical gradients, less memory,
        /// one more forward per step).
        public var activationCheckpointing = false
        public var distill = DistillSpec()
        /// LoRA / QLoRA adapters (`train.lora`); nil: full-weight training.
        public var lora: LoRASpec? = nil
    }

    public struct ExportSpec: Sendable, Equatable {
        public init() {}
        public var dir = "export/fortune-lm-nvfp4"
        /// bfloat16 / float16 / float32, or nil to keep the model's dtype.
        public var saveDtype: DType? = nil
        public var maxShardBytes = 5_000_000_000
        public var verify = true
        /// Checkpoint layout: `modelopt` (hf_quant_config.json, quant_method modelopt) or
        /// `compressed-tensors` (nvfp4-pack-quantized, quant_method compressed-tensors).
        public var format = "modelopt"
    }

    public var source = "recipe"
    public var model = "models/fortune-lm"
    /// Where the run computes (`device: cpu | cuda | cuda:N`).
    public var device: ComputeDevice = .cpu
    /// The GPU's matrix-product precision (`precision: fp32 | bf16`); the CPU is always fp32.
    public var precision: Precision = .fp32
    public var data = DataSpec()
    /// The `quantize:` section (a preset name, ModelOpt's quant_cfg, or both), nil for none.
    public var quantize: QuantConfig? = try? QuantConfig.preset("nvfp4_default-kv_fp8")
    /// How the quantize section was given, for summaries: a preset name, "quant_cfg" or "none".
    public var quantizeDescription = "nvfp4_default-kv_fp8"
    /// STE flavour for every quantizer: pass_through (default) or clipped.
    public var ste = "pass_through"
    public var steMode: STEMode { ste == "clipped" ? .clipped : .passThrough }
    /// NVFP4 fake-quant math: `export` (bit-identical to the exported checkpoint, default)
    /// or `modelopt` (ModelOpt's Triton training kernel).
    public var fakeQuant = "export"
    public var nvfp4Mode: NVFP4.FakeQuantMode { fakeQuant == "modelopt" ? .modelOpt : .export }
    public var calibration = CalibrationSpec()
    public var train = TrainSpec()
    public var export = ExportSpec()
    /// `report.prompts`: after the export, `qat apply` shows (and stores in qat_summary.json)
    /// the original's and the exported model's greedy continuation of each prompt.
    public var reportPrompts: [String] = []

    public init() {}

    /// Loads a recipe file, applying `--set key=value` overrides first.
    public static func load(path: String, overrides: [String] = []) throws -> Recipe {
        guard FileManager.default.fileExists(atPath: path) else { throw QATError("recipe not found: \(path)") }
        guard let data = FileManager.default.contents(atPath: path), data.count <= 16 << 20 else {
            throw QATError("\(path): cannot read the recipe (or it is larger than 16 MiB)")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw QATError("\(path): the recipe is not UTF-8 text") }
        return try parse(text, source: path, overrides: overrides)
    }

    public static func parse(_ text: String, source: String, overrides: [String] = []) throws -> Recipe {
        var node: Node
        do {
            guard let n = try SafeYAML.compose(text, source: source) else { throw QATError("\(source): the recipe is empty") }
            node = n
        } catch let e as QATError { throw e } catch {
            throw QATError("\(source): not valid YAML: \(error)")
        }
        for o in overrides { node = try applyOverride(o, to: node, source: source) }
        var r = Recipe()
        r.source = source
        let top = try YAMLMap(node, path: "", source: source)
        r.model = try top.string("model") ?? r.model
        if let d = try top.string("device") {
            do { r.device = try ComputeDevice(parsing: d) } catch let e as QATError { throw top.fail("device", e.message) }
        }
        if let p = try top.choice("precision", Precision.allCases.map(\.rawValue)) { r.precision = Precision(rawValue: p)! }

        if let d = try top.map("data") {
            r.data.train = try d.string("train") ?? r.data.train
            r.data.validation = try d.string("validation") ?? r.data.validation
            r.data.trainSplit = try d.string("train_split") ?? r.data.trainSplit
            r.data.validationSplit = try d.string("validation_split") ?? r.data.validationSplit
            r.data.seqLen = try d.int("seq_len", min: 2, max: 1 << 20) ?? r.data.seqLen
            r.data.validationSequences = try d.int("validation_sequences", min: 1)
            try d.finish()
        }
        if top.has("quantize") {
            if let q = top.node("quantize") {
                // `ste` is ours; everything else is ModelOpt's schema, parsed by QuantConfig
                // from the original nodes so its errors keep their line numbers.
                var inner = q
                if case .mapping(var m) = q {
                    let qm = try YAMLMap(q, path: "quantize", source: source)
                    r.ste = try qm.choice("ste", ["pass_through", "clipped"]) ?? r.ste
                    r.fakeQuant = try qm.choice("fake_quant", ["export", "modelopt"]) ?? r.fakeQuant
                    m[Node("ste")] = nil
                    m[Node("fake_quant")] = nil
                    inner = .mapping(m)
                    if let p = try qm.string("preset") { r.quantizeDescription = p } else { r.quantizeDescription = "quant_cfg" }
                } else if let name = q.string {
                    r.quantizeDescription = name
                } else {
                    r.quantizeDescription = "quant_cfg"
                }
                do { r.quantize = try QuantConfig(node: inner) } catch let e as QATError { throw e.prefixed("\(source): ") }
            } else {
                r.quantize = nil  // quantize: null → no quantization
                r.quantizeDescription = "none"
            }
        }
        if let c = try top.map("calibration") {
            r.calibration.samples = try c.int("samples", min: 1) ?? r.calibration.samples
            r.calibration.batchSize = try c.int("batch_size", min: 1) ?? r.calibration.batchSize
            r.calibration.algorithm = try c.choice("algorithm", ["max"]) ?? r.calibration.algorithm
            try c.finish()
        }
        if let t = try top.map("train") {
            var s = r.train
            if let m = try t.choice("mode", Mode.allCases.map(\.rawValue)) { s.mode = Mode(rawValue: m)! }
            s.steps = try t.int("steps", min: 0) ?? s.steps
            s.epochs = try t.double("epochs", min: 0)
            s.batchSize = try t.int("batch_size", min: 1) ?? s.batchSize
            s.gradAccum = try t.int("grad_accum", min: 1) ?? s.gradAccum
            s.lr = try t.double("lr", min: 0, max: 10) ?? s.lr
            s.schedule = try t.choice("schedule", ["constant", "linear", "cosine"]) ?? s.schedule
            s.warmupSteps = try t.int("warmup_steps", min: 0) ?? s.warmupSteps
            s.warmupRatio = try t.double("warmup_ratio", min: 0, max: 1)
            s.weightDecay = try t.double("weight_decay", min: 0) ?? s.weightDecay
            if let b = try t.doubles("betas") {
                guard b.count == 2, b.allSatisfy({ $0 >= 0 && $0 < 1 }) else { throw t.fail("betas", "expected two numbers in [0, 1)") }
                s.betas = b
            }
            s.eps = try t.double("eps", min: 0) ?? s.eps
            if t.has("max_grad_norm") { s.maxGradNorm = try t.double("max_grad_norm", min: 0) }
            s.trainableParams = try t.strings("trainable_params")
            s.frozenParams = try t.strings("frozen_params")
            if s.trainableParams != nil && s.frozenParams != nil {
                throw t.fail("frozen_params", "trainable_params and frozen_params are mutually exclusive: give one")
            }
            if let lc = t.node("lr_config") {
                if case .scalar(let s0) = lc {
                    let p = s0.string
                    guard let d = FileManager.default.contents(atPath: p), let txt = String(data: d, encoding: .utf8) else {
                        throw YAMLMap.error(source, "train.lr_config", lc, "lr_config file not found or unreadable: \(p)")
                    }
                    try SafeYAML.check(txt, source: p)  // parsed later by ParameterGroups; bound its cost now
                    s.lrConfigYAML = txt; s.lrConfigSource = p
                } else {
                    s.lrConfigYAML = try Yams.serialize(node: lc); s.lrConfigSource = "\(source) (train.lr_config)"
                }
            }
            if let seed = try t.int("seed", min: 0) { s.seed = UInt64(seed) }
            s.evalEvery = try t.int("eval_every", min: 0) ?? s.evalEvery
            s.saveEvery = try t.int("save_every", min: 0) ?? s.saveEvery
            s.logEvery = try t.int("log_every", min: 1) ?? s.logEvery
            s.checkpointDir = try t.string("checkpoint_dir")
            s.keepCheckpoints = try t.int("keep_checkpoints", min: 1) ?? s.keepCheckpoints
            s.onNonFinite = try t.choice("on_nonfinite", ["stop", "skip"]) ?? s.onNonFinite
            s.shardOptimizerState = try t.bool("shard_optimizer_state") ?? s.shardOptimizerState
            s.pipelineStages = try t.int("pipeline_stages", min: 1) ?? s.pipelineStages
            s.routerAuxLossCoef = try t.double("router_aux_loss_coef", min: 0)
            s.activationCheckpointing = try t.bool("activation_checkpointing") ?? s.activationCheckpointing
            if let d = try t.map("distill") {
                s.distill.teacher = try d.string("teacher")
                s.distill.kdRatio = try d.double("kd_ratio", min: 0, max: 1) ?? s.distill.kdRatio
                s.distill.temperature = try d.double("temperature", min: 1e-3, max: 100) ?? s.distill.temperature
                if let l = try d.choice("loss", KDLoss.allCases.map(\.rawValue)) { s.distill.loss = KDLoss(rawValue: l)! }
                s.distill.beta = try d.double("beta", min: 0, max: 1) ?? s.distill.beta
                s.distill.teacherLogprobs = try d.string("teacher_logprobs")
                if let o = try d.choice("topk_objective", TopKObjective.allCases.map(\.rawValue)) {
                    s.distill.topkObjective = TopKObjective(rawValue: o)!
                }
                try d.finish()
            }
            if let l = try t.map("lora") { s.lora = try LoRASpec.parse(l) }
            try t.finish()
            r.train = s
        }
        if let rp = try top.map("report") {
            r.reportPrompts = try rp.strings("prompts") ?? []
            try rp.finish()
        }
        if let e = try top.map("export") {
            r.export.dir = try e.string("dir") ?? r.export.dir
            if e.has("save_dtype") {
                if let s = try e.string("save_dtype") {
                    guard let dtype = DType(torchName: s) else {
                        throw e.fail("save_dtype", "must be bfloat16, float16, float32 or null (got \"\(s)\")")
                    }
                    r.export.saveDtype = dtype
                } else {
                    r.export.saveDtype = nil
                }
            }
            r.export.maxShardBytes = try e.int("max_shard_bytes", min: 1 << 20) ?? r.export.maxShardBytes
            r.export.verify = try e.bool("verify") ?? r.export.verify
            r.export.format = try e.choice("format", ["modelopt", "compressed-tensors"]) ?? r.export.format
            try e.finish()
        }
        try top.finish()
        return r
    }

    /// `a.b.c=value`: sets (or adds) a scalar at a dotted path; the value is parsed as YAML
    /// (so `2e-5`, `true`, `null`, `[a, b]` work).
    static func applyOverride(_ assignment: String, to root: Node, source: String) throws -> Node {
        guard let eq = assignment.firstIndex(of: "=") else {
            throw QATError("--set \(assignment): expected key=value (e.g. --set train.lr=2e-5)")
        }
        let keyPath = assignment[..<eq].split(separator: ".").map(String.init)
        guard !keyPath.isEmpty, keyPath.allSatisfy({ !$0.isEmpty }) else { throw QATError("--set \(assignment): empty key") }
        let valueText = String(assignment[assignment.index(after: eq)...])
        let value: Node
        do { value = try SafeYAML.compose(valueText.isEmpty ? "null" : valueText, source: "--set \(assignment)") ?? Node("") } catch let e
            as QATError
        {
            throw e
        } catch {
            throw QATError("--set \(assignment): the value is not valid YAML: \(error)")
        }
        func set(_ node: Node?, _ path: ArraySlice<String>) throws -> Node {
            guard let key = path.first else { return value }
            var mapping: Node.Mapping
            switch node {
            case .mapping(let m)?: mapping = m
            case nil: mapping = Node.Mapping([])
            case let n? where YAMLMap.isNull(n): mapping = Node.Mapping([])
            default: throw QATError("--set \(assignment): cannot set \(key) inside a value that is not a mapping")
            }
            mapping[Node(key)] = try set(mapping[Node(key)], path.dropFirst())
            return .mapping(mapping)
        }
        return try set(root, keyPath[...])
    }
}
