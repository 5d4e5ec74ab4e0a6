import QATCore
import QATIO

/// The mixture-of-experts fields of a config.json (qwen3_moe, qwen2_moe, mixtral), with
/// transformers' defaults where a key is absent.
public struct MoEConfig: Sendable, Equatable {
    /// How the experts' Linears are named in the checkpoint.
    public enum Naming: Sendable, Equatable {
        /// `mlp.gate`, `mlp.experts.N.{gate,up,down}_proj` (Qwen2/3-MoE).
        case qwen
        /// `block_sparse_moe.gate`, `block_sparse_moe.experts.N.{w1,w3,w2}` (Mixtral).
        case mixtral
    }

    public var naming: Naming
    public var numExperts: Int
    /// Experts per token (`num_experts_per_tok`).
    public var topK: Int
    /// Intermediate size of each expert.
    public var expertIntermediateSize: Int
    /// Divide the selected probabilities by their sum (Mixtral always does).
    public var normTopKProb: Bool
    /// Layer i is sparse when (i + 1) % step == 0 and i is not in `mlpOnlyLayers`.
    public var decoderSparseStep: Int
    public var mlpOnlyLayers: [Int]
    /// Qwen2-MoE's shared expert (intermediate size; 0: none), scaled by sigmoid(shared_expert_gate(x)).
    public var sharedExpertIntermediateSize: Int
    /// The config's load-balancing coefficient and whether it asks for router logits (then the
    /// auxiliary loss is on by default).
    public var routerAuxLossCoef: Double
    public var outputRouterLogits: Bool

    public init(
        naming: Naming, numExperts: Int, topK: Int, expertIntermediateSize: Int, normTopKProb: Bool,
        decoderSparseStep: Int = 1, mlpOnlyLayers: [Int] = [], sharedExpertIntermediateSize: Int = 0,
        routerAuxLossCoef: Double = 0.001, outputRouterLogits: Bool = false
    ) {
        self.naming = naming; self.numExperts = numExperts; self.topK = topK
        self.expertIntermediateSize = expertIntermediateSize; self.normTopKProb = normTopKProb
        self.decoderSparseStep = decoderSparseStep; self.mlpOnlyLayers = mlpOnlyLayers
        self.sharedExpertIntermediateSize = sharedExpertIntermediateSize
        self.routerAuxLossCoef = routerAuxLossCoef; self.outputRouterLogits = outputRouterLogits
    }

    /// The default auxiliary-loss coefficient of a run: the config's when it sets
    /// `output_router_logits`, else 0 (transformers adds the loss only then).
    public var defaultAuxLossCoef: Double { outputRouterLogits ? routerAuxLossCoef : 0 }

    public func isSparse(layer i: Int) -> Bool {
        numExperts > 0 && !mlpOnlyLayers.contains(i) && (i + 1) % decoderSparseStep == 0
    }

    /// The router's module name under a layer prefix, and expert e's three projections (gate, up, down).
    public func routerName(_ layer: String) -> String {
        naming == .qwen ? "\(layer).mlp.gate" : "\(layer).block_sparse_moe.gate"
    }
    public func expertNames(_ layer: String, _ e: Int) -> (gate: String, up: String, down: String) {
        switch naming {
        case .qwen:
            let p = "\(layer).mlp.experts.\(e)"
            return ("\(p).gate_proj", "\(p).up_proj", "\(p).down_proj")
        case .mixtral:
            let p = "\(layer).block_sparse_moe.experts.\(e)"
            return ("\(p).w1", "\(p).w3", "\(p).w2")
        }
    }

    /// nil for dense families.
    init?(json c: JSONObject, family: ModelConfig.Family, where_: String) throws {
        switch family {
        case .llama, .mistral, .qwen2, .qwen3: return nil
        case .qwen3Moe, .qwen2Moe:
            naming = .qwen
            // transformers 5 writes `num_local_experts` (its attribute map), the hub's files `num_experts`.
            numExperts = try c.optionalInt("num_experts") ?? c.optionalInt("num_local_experts") ?? (family == .qwen3Moe ? 128 : 60)
            topK = try c.optionalInt("num_experts_per_tok") ?? (family == .qwen3Moe ? 8 : 4)
            expertIntermediateSize = try c.optionalInt("moe_intermediate_size") ?? (family == .qwen3Moe ? 768 : 1408)
            normTopKProb = try c.optionalBool("norm_topk_prob") ?? false
            decoderSparseStep = try c.optionalInt("decoder_sparse_step") ?? 1
            mlpOnlyLayers = c.optionalValue("mlp_only_layers").map { $0.isNull } ?? true ? [] : try c.ints("mlp_only_layers")
            sharedExpertIntermediateSize = family == .qwen2Moe ? try c.optionalInt("shared_expert_intermediate_size") ?? 5632 : 0
        case .mixtral:
            naming = .mixtral
            numExperts = try c.optionalInt("num_local_experts") ?? c.optionalInt("num_experts") ?? 8
            topK = try c.optionalInt("num_experts_per_tok") ?? 2
            expertIntermediateSize = try c.int("intermediate_size")
            normTopKProb = true
            decoderSparseStep = 1
            mlpOnlyLayers = []
            sharedExpertIntermediateSize = 0
            if let j = try c.optionalDouble("router_jitter_noise"), j != 0 {
                throw QATError("\(where_): router_jitter_noise = \(j) is not supported (only 0: deterministic routing)")
            }
        }
        routerAuxLossCoef = try c.optionalDouble("router_aux_loss_coef") ?? 0.001
        outputRouterLogits = try c.optionalBool("output_router_logits") ?? false
    }

    func validate(_ where_: String) throws {
        func bad(_ s: String) -> QATError { QATError("\(where_): \(s)") }
        if numExperts < 1 || numExperts > 1 << 16 { throw bad("number of experts = \(numExperts) is out of range (1…65536)") }
        if topK < 1 || topK > numExperts {
            throw bad("num_experts_per_tok = \(topK) must be between 1 and the number of experts (\(numExperts))")
        }
        if expertIntermediateSize < 1 || expertIntermediateSize > 1 << 24 {
            throw bad("moe_intermediate_size = \(expertIntermediateSize) is out of range")
        }
        if decoderSparseStep < 1 { throw bad("decoder_sparse_step = \(decoderSparseStep) must be at least 1") }
        if sharedExpertIntermediateSize < 0 || sharedExpertIntermediateSize > 1 << 24 {
            throw bad("shared_expert_intermediate_size = \(sharedExpertIntermediateSize) is out of range")
        }
        if !routerAuxLossCoef.isFinite { throw bad("router_aux_loss_coef must be finite") }
    }
}
