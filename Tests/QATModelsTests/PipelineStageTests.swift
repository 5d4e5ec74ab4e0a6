import QATCore
import QATModels
import TestSupport
import XCTest

/// A model split into pipeline stages (`layerRange`) computes, stage after stage, exactly
/// what the whole model computes: the same final hidden states and, backward, the same
/// gradient for every parameter, bit for bit. No MPI involved: the stages run in turn in
/// one process, handing the hidden states and their gradients over by pointer.
final class PipelineStageTests: XCTestCase {
    func testTinyLlamaStagesComposeToTheWholeModel() throws { try check("tiny-llama") }
    func testTinyQwen3StagesComposeToTheWholeModel() throws { try check("tiny-qwen3") }  // tied embeddings, q/k norms
    // Mixture of experts: a stage holds its layers' routers and experts.
    func testTinyQwen3MoEStagesComposeToTheWholeModel() throws { try check("tiny-qwen3-moe") }
    func testTinyQwen2MoEStagesComposeToTheWholeModel() throws { try check("tiny-qwen2-moe") }  // shared expert

    private func check(_ name: String) throws {
        let dir = Fixtures.path(name)
        let whole = try CausalLM(directory: dir)
        let first = try CausalLM(directory: dir, layerRange: 0..<1), last = try CausalLM(directory: dir, layerRange: 1..<2)
        let c = whole.config, (B, T) = (2, 16), N = B * T, C = c.hiddenSize
        XCTAssertTrue(first.isFirstStage && !first.isLastStage && last.isLastStage && !last.isFirstStage)

        // Each stage lists only its own parameters; together they are the whole model's
        // (a tied embedding on both ends).
        let names = Set(whole.parameters.map(\.name))
        let firstNames = Set(first.parameters.map(\.name)), lastNames = Set(last.parameters.map(\.name))
        XCTAssertEqual(firstNames.union(lastNames), names)
        XCTAssertEqual(firstNames.intersection(lastNames), c.tieWordEmbeddings ? ["model.embed_tokens.weight"] : [])
        XCTAssertFalse(first.linears.contains { $0.name == "lm_head" })
        XCTAssertEqual(first.linears.count + last.linears.count, whole.linears.count)
        for n in firstNames { XCTAssertTrue(CausalLM.belongs(n, to: 0..<1, config: c), n) }

        var rng = SplitMix64(seed: 7)
        let tokens = (0..<N).map { _ in Int32(rng.next() % UInt64(c.vocabSize)) }
        for m in [whole, first, last] { for p in m.parameters { p.setRequiresGrad(true) } }

        let h = try whole.forward(tokens: tokens, batch: B, seqLen: T, saveForBackward: true)
        let h0 = try first.forward(tokens: tokens, input: nil, batch: B, seqLen: T, saveForBackward: true)
        let h1 = try last.forward(tokens: tokens, input: h0, batch: B, seqLen: T, saveForBackward: true)
        for i in 0..<(N * C) where h[i] != h1[i] { XCTFail("\(name): hidden[\(i)] \(h[i]) vs \(h1[i])"); return }

        let dHidden = Tensor(shape: [N, C])
        for i in 0..<(N * C) { dHidden[i] = rng.nextGaussian() }
        XCTAssertNil(try whole.backward(dHidden: dHidden.data))
        let dInput = try XCTUnwrap(try last.backward(dHidden: dHidden.data))
        XCTAssertNil(try first.backward(dHidden: dInput))

        let grads = Dictionary(
            uniqueKeysWithValues: (first.parameters + last.parameters).map { ($0.name, $0.grad!) }
                .filter { !(c.tieWordEmbeddings && $0.0 == "model.embed_tokens.weight") })
        for p in whole.parameters {
            if c.tieWordEmbeddings && p.name == "model.embed_tokens.weight" {
                // Tied: the whole model accumulates lm_head then embedding into one buffer;
                // the stages hold one half each (the pipeline all-reduces them).
                let a = first.parameterByName[p.name]!.grad!, b = last.parameterByName[p.name]!.grad!
                for i in 0..<p.count { XCTAssertEqual(p.grad![i], b[i] + a[i], accuracy: 1e-6 * max(1, abs(p.grad![i]))) }
                continue
            }
            let g = try XCTUnwrap(grads[p.name], p.name)
            for i in 0..<p.count where p.grad![i] != g[i] { XCTFail("\(name): \(p.name)[\(i)] \(p.grad![i]) vs \(g[i])"); break }
        }
    }

    func testStageOutsideTheModelIsAnError() {
        XCTAssertThrowsError(try CausalLM(directory: Fixtures.path("tiny-llama"), layerRange: 1..<3)) { e in
            XCTAssertTrue("\(e)".contains("outside the model's 2 layers"), "\(e)")
        }
    }
}
