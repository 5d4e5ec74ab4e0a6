import QATIO
import QATModels
import TestSupport
import XCTest

/// The transformers fixtures (fp32 compute on bf16-rounded weights): logits within 1e-4,
/// loss within 1e-5, every parameter gradient within 1e-3 of the tensor's largest entry.
final class ReferenceModelTests: XCTestCase {
    func testTinyLlamaMatchesTransformers() throws { try check("tiny-llama") }
    func testTinyQwen3MatchesTransformers() throws { try check("tiny-qwen3") }

    private func check(_ name: String) throws {
        let model = try CausalLM(directory: Fixtures.path(name))
        let ref = try SafeTensorsFile(path: Fixtures.path("\(name)/reference.safetensors"))
        let ids = try ref.integers("input_ids").map { Int32($0) }
        let labels = try ref.integers("labels").map { Int32($0) }
        let shape = try XCTUnwrap(ref.info("input_ids")).shape
        let (B, T) = (shape[0], shape[1]), N = B * T, V = model.config.vocabSize, C = model.config.hiddenSize

        for p in model.parameters { p.setRequiresGrad(true) }
        let hidden = try model.forward(tokens: ids, batch: B, seqLen: T, saveForBackward: true)

        // Logits (unfused lm_head).
        let logits = Tensor(shape: [N, V])
        try model.lmHead.forward(hidden, out: logits.data, n: N)
        let refLogits = try ref.floats("logits")
        var maxErr: Float = 0
        for i in 0..<(N * V) { maxErr = max(maxErr, abs(logits[i] - refLogits[i])) }
        XCTAssertLessThan(maxErr, 1e-4, "\(name): max |logit error|")

        // Loss and gradients through the chunked lm_head + CE (tiny budget: several chunks).
        let targets = CrossEntropy.shiftedTargets(labels: labels, batch: B, seqLen: T)
        let validCount = targets.filter { $0 != CrossEntropy.ignoreIndex }.count
        let dHidden = Tensor(shape: [N, C])
        let head = ChunkedCrossEntropy(vocab: V, budgetBytes: 7 * V * 4)
        let r = try head.run(
            head: model.lmHead, hidden: hidden, targets: targets, n: N, gradScale: 1 / Float(validCount), dHidden: dHidden.data)
        XCTAssertEqual(r.valid, validCount)
        let loss = r.sum / Double(r.valid)
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
        let expected = ref.names.filter { $0.hasPrefix("grad.") }.count
        XCTAssertEqual(checked, expected, "every reference gradient checked")
    }
}
