import Foundation
import QATCore
import QATIO

/// The fields of an HF config.json that the supported causal LM families use.
///
/// Decoding is strict about what changes the math: an unknown `model_type`, an activation
/// other than SiLU, a RoPE type we do not implement, or inconsistent head sizes is an error
/// rather than a silently different model.
public struct ModelConfig: Sendable, Equatable {
    public enum Family: String, Sendable, CaseIterable {
        case llama, mistral, qwen2, qwen3
        case qwen3Moe = "qwen3_moe", qwen2Moe = "qwen2_moe", mixtral
    }

    public enum RopeScaling: Sendable, Equatable {
        case none
        case linear(factor: Double)
        case llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double, originalMaxPositions: Int)
    }

    public var family: Family
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numLayers: Int
    public var numHeads: Int
    public var numKVHeads: Int
    public var headDim: Int
    public var rmsNormEps: Float
    public var ropeTheta: Double
    public var ropeScaling: RopeScaling
    public var maxPositionEmbeddings: Int
    public var tieWordEmbeddings: Bool
    /// q/k/v projections carry a bias (Qwen2; Llama's `attention_bias`).
    public var attentionBias: Bool
    /// o_proj carries a bias too (Llama's `attention_bias` applies to all four).
    public var outputBias: Bool
    public var mlpBias: Bool
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    public var qkNorm: Bool
    /// Sliding-window attention span (Mistral), nil for full causal attention.
    public var slidingWindow: Int?
    /// The checkpoint's dtype as config.json states it (`dtype` or `torch_dtype`).
    public var dtype: String?
    /// Mixture-of-experts MLPs (qwen3_moe, qwen2_moe, mixtral), nil for dense families.
    public var moe: MoEConfig?

    /// Whether layer `i` runs a mixture-of-experts block (else the dense SwiGLU MLP).
    public func isSparse(layer i: Int) -> Bool { moe?.isSparse(layer: i) ?? false }

    public init(
        family: Family, vocabSize: Int, hiddenSize: Int, intermediateSize: Int, numLayers: Int,
        numHeads: Int, numKVHeads: Int, headDim: Int? = nil, rmsNormEps: Float = 1e-6,
        ropeTheta: Double = 10000, ropeScaling: RopeScaling = .none, maxPositionEmbeddings: Int = 2048,
        tieWordEmbeddings: Bool = false, attentionBias: Bool = false, outputBias: Bool = false,
        mlpBias: Bool = false, qkNorm: Bool = false, slidingWindow: Int? = nil, dtype: String? = nil, moe: MoEConfig? = nil
    ) {
        self.family = family; self.vocabSize = vocabSize; self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize; self.numLayers = numLayers; self.numHeads = numHeads
        self.numKVHeads = numKVHeads; self.headDim = headDim ?? hiddenSize / numHeads
        self.rmsNormEps = rmsNormEps; self.ropeTheta = ropeTheta; self.ropeScaling = ropeScaling
        self.maxPositionEmbeddings = maxPositionEmbeddings; self.tieWordEmbeddings = tieWordEmbeddings
        self.attentionBias = attentionBias; self.outputBias = outputBias; self.mlpBias = mlpBias
        self.qkNorm = qkNorm; self.slidingWindow = slidingWindow; self.dtype = dtype; self.moe = moe
    }

    /// Reads `<dir>/config.json`.
    public static func load(directory: String) throws -> ModelConfig {
        let path = (directory as NSString).appendingPathComponent("config.json")
        guard FileManager.default.fileExists(atPath: path) else {
            throw QATError("\(directory): no config.json (expected a Hugging Face model directory)")
        }
        return try ModelConfig(json: JSONValue.parseObject(file: path))
    }

    public init(json c: JSONObject) throws {
        let where_ = c.source.isEmpty ? "config.json" : c.source
        let type = try c.string("model_type")
        guard let family = Family(rawValue: type) else {
            throw QATError.unsupported(
                "\(where_): model_type \"\(type)\" is not supported (supported: \(Family.allCases.map(\.rawValue).joined(separator: ", ")))"
            )
        }
        self.family = family
        vocabSize = try c.int("vocab_size")
        hiddenSize = try c.int("hidden_size")
        intermediateSize = try c.int("intermediate_size")
        numLayers = try c.int("num_hidden_layers")
        numHeads = try c.int("num_attention_heads")
        numKVHeads = try c.optionalInt("num_key_value_heads") ?? numHeads
        headDim = try c.optionalInt("head_dim") ?? (numHeads > 0 ? hiddenSize / numHeads : 0)
        rmsNormEps = Float(try c.optionalDouble("rms_norm_eps") ?? 1e-6)
        maxPositionEmbeddings = try c.optionalInt("max_position_embeddings") ?? 2048
        tieWordEmbeddings = try c.optionalBool("tie_word_embeddings") ?? false
        mlpBias = try c.optionalBool("mlp_bias") ?? false
        dtype = try c.optionalString("dtype") ?? c.optionalString("torch_dtype")
        switch family {
        case .qwen2:
            attentionBias = true; outputBias = false; qkNorm = false
        case .qwen2Moe:
            attentionBias = try c.optionalBool("qkv_bias") ?? true; outputBias = false; qkNorm = false
        case .qwen3, .qwen3Moe:
            let b = try c.optionalBool("attention_bias") ?? false
            attentionBias = b; outputBias = b; qkNorm = true
        case .mixtral:
            attentionBias = false; outputBias = false; qkNorm = false
        case .llama, .mistral:
            let b = try c.optionalBool("attention_bias") ?? false
            attentionBias = b; outputBias = b; qkNorm = false
        }
        // Sliding window: Mistral always when set; Qwen2/3 only with use_sliding_window.
        let window = try c.optionalInt("sliding_window")
        switch family {
        case .mistral, .mixtral: slidingWindow = window
        case .qwen2, .qwen3, .qwen2Moe, .qwen3Moe: slidingWindow = (try c.optionalBool("use_sliding_window") ?? false) ? window : nil
        case .llama: slidingWindow = nil
        }
        if let act = try c.optionalString("hidden_act"), act != "silu" {
            throw QATError.unsupported("\(where_): hidden_act \"\(act)\" is not supported (only silu, i.e. SwiGLU MLPs)")
        }
        // RoPE: transformers ≥ 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
        let rope = try c.optionalObject("rope_parameters") ?? c.optionalObject("rope_scaling")
        ropeTheta = try rope?.optionalDouble("rope_theta") ?? c.optionalDouble("rope_theta") ?? 10000
        let ropeType = try rope?.optionalString("rope_type") ?? rope?.optionalString("type") ?? "default"
        switch ropeType {
        case "default": ropeScaling = .none
        case "linear": ropeScaling = .linear(factor: try rope!.double("factor"))
        case "llama3":
            ropeScaling = .llama3(
                factor: try rope!.double("factor"), lowFreqFactor: try rope!.double("low_freq_factor"),
                highFreqFactor: try rope!.double("high_freq_factor"),
                originalMaxPositions: try rope!.int("original_max_position_embeddings"))
        default:
            throw QATError.unsupported("\(where_): rope type \"\(ropeType)\" is not supported (supported: default, linear, llama3)")
        }
        moe = try MoEConfig(json: c, family: family, where_: where_)
        try validate(where_)
    }

    func validate(_ where_: String) throws {
        func bad(_ s: String) -> QATError { QATError("\(where_): \(s)") }
        for (k, v) in [
            ("vocab_size", vocabSize), ("hidden_size", hiddenSize), ("intermediate_size", intermediateSize),
            ("num_hidden_layers", numLayers), ("num_attention_heads", numHeads),
            ("num_key_value_heads", numKVHeads), ("head_dim", headDim),
        ] where v <= 0 || v > 1 << 24 {
            throw bad("\(k) = \(v) is out of range")
        }
        if numHeads % numKVHeads != 0 {
            throw bad("num_attention_heads (\(numHeads)) must be a multiple of num_key_value_heads (\(numKVHeads))")
        }
        if let m = moe { try m.validate(where_) }
        if headDim % 2 != 0 { throw bad("head_dim (\(headDim)) must be even for RoPE") }
        if !(rmsNormEps > 0) { throw bad("rms_norm_eps must be positive") }
        if !(ropeTheta > 0) || !ropeTheta.isFinite { throw bad("rope_theta must be positive and finite") }
        // The RoPE tables hold max_position_embeddings × head_dim/2 entries each: bound them
        // (1 << 28 entries is 1 GiB per table, far above any supported model's need).
        if maxPositionEmbeddings < 1 || maxPositionEmbeddings > 1 << 24 {
            throw bad("max_position_embeddings = \(maxPositionEmbeddings) is out of range (1…\(1 << 24))")
        }
        if maxPositionEmbeddings * (headDim / 2) > 1 << 28 {
            throw bad(
                "max_position_embeddings × head_dim/2 = \(maxPositionEmbeddings) × \(headDim / 2) is "
                    + "above \(1 << 28): the RoPE tables would not fit in memory")
        }
        // Attention masks keys at distance ≥ window: a window below 1 masks every key
        // (and a negative one would index before the row).
        if let w = slidingWindow, w < 1 { throw bad("sliding_window = \(w) must be at least 1 (or null for full attention)") }
        switch ropeScaling {
        case .none: break
        case .linear(let factor):
            if !(factor > 0) || !factor.isFinite { throw bad("rope scaling factor = \(factor) must be positive and finite") }
        case let .llama3(factor, low, high, original):
            if !(factor > 0) || !factor.isFinite { throw bad("rope scaling factor = \(factor) must be positive and finite") }
            if !(low > 0) || !(high > low) || !high.isFinite {
                throw bad("llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor (got \(low), \(high))")
            }
            if original < 1 { throw bad("llama3 rope scaling original_max_position_embeddings = \(original) must be at least 1") }
        }
    }

    /// Checks the layer count against the tensor names of a checkpoint before anything is
    /// built from the config: a config.json claiming 10^6 layers over a 2-layer checkpoint
    /// fails here with the counts, instead of materialising a million layers' worth of
    /// names and shapes. `names` are the checkpoint's tensor names.
    public func checkLayerCount<S: Sequence>(against names: S, source: String) throws where S.Element == String {
        var maxIndex = -1
        for n in names where n.hasPrefix("model.layers.") {
            let rest = n.dropFirst("model.layers.".count)
            if let dot = rest.firstIndex(of: "."), let i = Int(rest[..<dot]), i >= 0 { maxIndex = max(maxIndex, i) }
        }
        guard maxIndex + 1 == numLayers else {
            throw QATError(
                "\(source): config.json says num_hidden_layers = \(numLayers) but the checkpoint holds "
                    + "\(maxIndex + 1) layer(s) (model.layers.0…\(maxIndex)): shape mismatch between config and "
                    + "checkpoint")
        }
    }

    /// RoPE inverse frequencies [headDim/2] in fp32, as HF computes them (including scaling).
    public var ropeInvFreq: [Float] {
        let half = headDim / 2
        var inv = (0..<half).map { i -> Float in
            let exponent = Float(2 * i) / Float(headDim)
            return 1 / powf(Float(ropeTheta), exponent)
        }
        switch ropeScaling {
        case .none: break
        case .linear(let factor): inv = inv.map { $0 / Float(factor) }
        case let .llama3(factor, low, high, original):
            let lowWavelen = Double(original) / low, highWavelen = Double(original) / high
            inv = inv.map { f in
                let wavelen = 2 * Double.pi / Double(f)
                if wavelen < highWavelen { return f }
                if wavelen > lowWavelen { return f / Float(factor) }
                let smooth = (Double(original) / wavelen - low) / (high - low)
                return Float((1 - smooth) * Double(f) / factor + smooth * Double(f))
            }
        }
        return inv
    }
}
