import QATIO
import QATModels
import TestSupport
import XCTest

/// The mixture-of-experts fixtures from transformers (`Tests/Fixtures/make_moe_fixtures.py`,
/// fp32 compute on bf16-rounded weights): logits within 1e-4, loss within 1e-5, every
/// parameter gradient (per expert, router included) within 1e-3 of the tensor's largest entry.
/// Set a: each family's plain shape; set b: other expert counts and top-k, dense layers via
/// mlp_only_layers / decoder_sparse_step, top-1, sliding window, and the load-balancing loss.
final class MoEReferenceTests: XCTestCase {
    func testTinyQwen3MoEMatchesTransformers() throws { try check("tiny-qwen3-moe") }
    func testTinyQwen2MoEMatchesTransformers() throws { try check("tiny-qwen2-moe") }
    func testTinyMixtralMatchesTransformers() throws { try check("tiny-mixtral") }
    func testQwen3MoEDenseLayerTopK3AuxLoss() throws { try check("tiny-qwen3-moe-b", sparse: [true, false, true]) }
    func testQwen2MoESparseStepTop1AuxLoss() throws { try check("tiny-qwen2-moe-b", sparse: [false, true, false]) }
    func testMixtralFiveExpertsTop3SlidingWindowAuxLoss() throws { try check("tiny-mixtral-b") }

    /// transformers' routers on exact ties (one-hot inputs, so each token's logits are one
    /// column of a router weight whose entries repeat). Every expert scoring strictly above
    /// the k-th score is chosen by both, the chosen scores agree as a multiset (so the block
    /// output is the same function of the experts' outputs up to which tied expert runs),
    /// and among exactly tied experts qat takes the lower index. PyTorch's CPU top-k breaks
    /// exact ties by its libstdc++ selection order (`topk(ones(8), 3)` = 6, 5, 4), which is
    /// version- and device-dependent and is not reproduced.
    func testRouterTopKAndScoresMatchTransformersUpToExactTies() throws {
        let ref = try SafeTensorsFile(path: Fixtures.path("router_ties_reference.safetensors"))
        let w = try ref.floats("weight"), x = try ref.floats("x")
        let (E, C) = (w.shape[0], w.shape[1]), N = x.shape[0]
        for (tag, k, norm) in [("qwen_k3_norm", 3, true), ("qwen_k2", 2, false), ("mixtral_k4", 4, true)] {
            let block = MoEBlock.routerOnly(weight: w, topK: k, normTopKProb: norm)
            let (experts, weights) = try block.route(x.data, n: N)
            let refIdx = try ref.integers("\(tag).indices").map { Int($0) }, refScores = try ref.floats("\(tag).scores")
            XCTAssertEqual(refIdx.count, N * k)
            var ties = 0
            for t in 0..<N {
                let col = (0..<E).map { w[$0 * C + t] }
                let kth = col.sorted(by: >)[k - 1]
                let mine = Array(experts[(t * k)..<((t + 1) * k)])
                for e in 0..<E where col[e] > kth {
                    XCTAssertTrue(mine.contains(e), "\(tag) token \(t): expert \(e) is above the k-th score")
                    XCTAssertTrue(refIdx[(t * k)..<((t + 1) * k)].contains(e))
                }
                let tied = (0..<E).filter { col[$0] == kth }
                let above = (0..<E).filter { col[$0] > kth }.count
                XCTAssertEqual(mine.filter { col[$0] == kth }, Array(tied.prefix(k - above)), "\(tag) token \(t): lower index first")
                if tied.count > k - above { ties += 1 }
                let a = (0..<k).map { weights[t * k + $0] }.sorted(), b = (0..<k).map { refScores[t * k + $0] }.sorted()
                for j in 0..<k { XCTAssertEqual(a[j], b[j], accuracy: 1e-7, "\(tag) token \(t) score \(j)") }
            }
            XCTAssertGreaterThan(ties, 2, "\(tag): the fixture has ties at the top-k boundary")
        }
    }

    /// MoE config keys: transformers 5's `num_local_experts` spelling, dense layers, and clear
    /// errors for values that would change the math or cannot work.
    func testConfigDecodingAndErrors() throws {
        func config(_ extra: String) throws -> ModelConfig {
            let text = """
                {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "moe_intermediate_size": 16\(extra)}
                """
            return try ModelConfig(json: XCTUnwrap(JSONValue.parse(text).objectValue))
        }
        let c = try config(#", "num_local_experts": 6, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [3]"#)
        XCTAssertEqual(c.moe?.numExperts, 6)
        XCTAssertEqual((0..<4).map { c.isSparse(layer: $0) }, [false, true, false, false])
        for (extra, needle) in [
            (#", "num_experts": 4, "num_experts_per_tok": 5"#, "num_experts_per_tok"),
            (#", "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 0"#, "decoder_sparse_step"),
            (#", "num_experts": 0"#, "experts"),
        ] {
            XCTAssertThrowsError(try config(extra)) { XCTAssertTrue("\($0)".contains(needle), "\($0)") }
        }
        let mixtral = """
            {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "router_jitter_noise": 0.1}
            """
        XCTAssertThrowsError(try ModelConfig(json: XCTUnwrap(JSONValue.parse(mixtral).objectValue))) {
            XCTAssertTrue("\($0)".contains("router_jitter_noise"), "\($0)")
        }
    }

    private func check(_ name: String, sparse: [Bool]? = nil) throws {
        let model = try CausalLM(directory: Fixtures.path(name))
        let ref = try SafeTensorsFile(path: Fixtures.path("\(name)/reference.safetensors"))
        if let sparse { XCTAssertEqual(model.layers.map { $0.moe != nil }, sparse, "\(name): sparse layers") }
        XCTAssertFalse(model.moeBlocks.isEmpty)
        let ids = try ref.integers("input_ids").map { Int32($0) }
        let labels = try ref.integers("labels").map { Int32($0) }
        let shape = try XCTUnwrap(ref.info("input_ids")).shape
        let (B, T) = (shape[0], shape[1]), N = B * T, V = model.config.vocabSize, C = model.config.hiddenSize
        let refAux = ref.info("aux_loss") != nil ? Double(try ref.floats("aux_loss")[0]) : nil
        let coef = refAux != nil ? Float(try XCTUnwrap(model.config.moe).routerAuxLossCoef) : 0
        model.routerAuxLossCoef = coef

        for p in model.parameters { p.setRequiresGrad(true) }
        let hidden = try model.forward(tokens: ids, batch: B, seqLen: T, saveForBackward: true)
        let logits = Tensor(shape: [N, V])
        try model.lmHead.forward(hidden, out: logits.data, n: N)
        let refLogits = try ref.floats("logits")
        var maxErr: Float = 0
        for i in 0..<(N * V) { maxErr = max(maxErr, abs(logits[i] - refLogits[i])) }
        XCTAssertLessThan(maxErr, 1e-4, "\(name): max |logit error|")

        let targets = CrossEntropy.shiftedTargets(labels: labels, batch: B, seqLen: T)
        let validCount = targets.filter { $0 != CrossEntropy.ignoreIndex }.count
        let dHidden = Tensor(shape: [N, C])
        let head = ChunkedCrossEntropy(vocab: V, budgetBytes: 7 * V * 4)
        let r = try head.run(
            head: model.lmHead, hidden: hidden, targets: targets, n: N, gradScale: 1 / Float(validCount),
            dHidden: dHidden.data)
        var loss = r.sum / Double(r.valid)
        if let refAux {
            let aux = try XCTUnwrap(model.routerAuxLoss())
            XCTAssertEqual(aux, refAux, accuracy: 1e-6, "\(name): load-balancing loss")
            loss += Double(coef) * aux
        }
        XCTAssertEqual(loss, Double(try ref.floats("loss")[0]), accuracy: 1e-5, "\(name): loss")

        try model.backward(dHidden: dHidden.data)
        var checked = 0
        for p in model.parameters {
            let g = try ref.floats("grad.\(p.name)")
            XCTAssertEqual(g.count, p.count, p.name)
            let scale = g.buffer.reduce(Float(0)) { max($0, abs($1)) }
            var err: Float = 0
            let mine = try XCTUnwrap(p.grad)
            for i in 0..<g.count { err = max(err, abs(mine[i] - g[i])) }
            XCTAssertLessThanOrEqual(err, 1e-3 * scale, "\(name): grad of \(p.name) (max err \(err), scale \(scale))")
            checked += 1
        }
        XCTAssertEqual(checked, ref.names.filter { $0.hasPrefix("grad.") }.count, "every reference gradient checked")
    }
}
