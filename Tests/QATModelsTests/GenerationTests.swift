import Foundation
import QATCore
import QATData
import QATIO
import QATModels
import TestSupport
import XCTest

final class GenerationTests: XCTestCase {
    /// Greedy decoding with the KV cache gives transformers' greedy `generate` ids token for
    /// token: 3 prompts × 30 new tokens on fortune-lm (Tests/Fixtures/generation/
    /// make_greedy_fixture.py, transformers 5.24, fp32 on the bf16 weights, EOS not ending).
    func testGreedyMatchesTransformers() throws {
        let doc = try JSONValue.parseObject(file: Fixtures.path("generation/fortune-lm-greedy.json"))
        let model = try CausalLM(directory: Fixtures.fortuneLM)
        let tok = try Tokenizer(path: Fixtures.fortuneLM + "/tokenizer.json")
        let cases = try XCTUnwrap(doc["cases"]?.arrayValue)
        XCTAssertEqual(cases.count, 3)
        for c in cases {
            let o = try XCTUnwrap(c.objectValue)
            let prompt = try o.string("prompt")
            let promptIds = try XCTUnwrap(o["prompt_ids"]?.arrayValue).map { Int32($0.intValue!) }
            let want = try XCTUnwrap(o["new_ids"]?.arrayValue).map { Int32($0.intValue!) }
            XCTAssertEqual(tok.encode(prompt), promptIds, "tokenization of \(prompt)")
            let decoder = try KVCacheDecoder(model: model, capacity: promptIds.count + want.count)
            var got: [Int32] = []
            var logits = try decoder.step(promptIds)
            while got.count < want.count {
                got.append(Sampler.argmax(logits))
                if got.count < want.count { logits = try decoder.step([got.last!]) }
            }
            XCTAssertEqual(got, want, "greedy continuation of \(prompt)")
            XCTAssertEqual(decoder.length, promptIds.count + want.count - 1)
        }
    }

    /// The cache's logits at every position equal a full forward's (prefill of 5, then one
    /// token at a time), on Llama (fortune-lm) and Qwen3 (q/k norms, tied head, head_dim 48).
    func testKVCacheMatchesFullForward() throws {
        for dir in [Fixtures.fortuneLM, Fixtures.path("tiny-qwen3")] {
            let model = try CausalLM(directory: dir)
            let V = model.config.vocabSize, T = 24
            let tokens = (0..<T).map { Int32(($0 * 37 + 11) % V) }
            let hidden = try model.forward(tokens: tokens, batch: 1, seqLen: T, saveForBackward: false)
            let full = Tensor(shape: [T, V], zeroed: false)
            try model.lmHead.forward(hidden, out: full.data, n: T)
            let decoder = try KVCacheDecoder(model: model, capacity: T)
            var worst: Float = 0
            var logits = try decoder.step(Array(tokens[0..<5]))
            for t in 4..<T {
                if t > 4 { logits = try decoder.step([tokens[t]]) }
                for v in 0..<V { worst = max(worst, abs(logits[v] - full[t * V + v])) }
            }
            XCTAssertLessThan(worst, 1e-4, "\(dir): max |Δlogit| between the KV cache and a full forward")
            XCTAssertThrowsError(try decoder.step([0])) { XCTAssertTrue("\($0)".contains("exceed"), "\($0)") }
        }
    }

    func testSampler() throws {
        let logits: [Float] = [0.1, 2.0, 1.9, -1, 2.0]
        try logits.withUnsafeBufferPointer { l in
            XCTAssertEqual(Sampler.argmax(l), 1, "the first of equal maxima, as torch.argmax")
            var k1 = Sampler(temperature: 1, topK: 1, seed: 3)
            for _ in 0..<20 { XCTAssertEqual(k1.next(l), 1) }
            var p = Sampler(temperature: 1, topP: 0.01, seed: 3)
            XCTAssertEqual(p.next(l), 1)
            var a = Sampler(temperature: 0.8, seed: 9), b = Sampler(temperature: 0.8, seed: 9)
            let xs = (0..<50).map { _ in a.next(l) }, ys = (0..<50).map { _ in b.next(l) }
            XCTAssertEqual(xs, ys, "same seed, same samples")
            XCTAssertEqual(Set(xs).subtracting([0, 1, 2, 3, 4]), [])
            XCTAssertGreaterThan(Set(xs).count, 2, "sampling explores")
            var k2 = Sampler(temperature: 5, topK: 2, seed: 1)
            XCTAssertEqual(Set((0..<100).map { _ in k2.next(l) }), [1, 4], "top-k 2 keeps the two largest")
        }
    }

    /// Streaming decode: a character split across tokens is held back until complete; a stop
    /// string ends the text and is never emitted, even when it arrives in pieces.
    func testTextStream() {
        var s = TextStream(stops: [])
        let euro = Array("€".utf8)  // 3 bytes
        XCTAssertEqual(s.push([0x41, euro[0]]), "A")
        XCTAssertNil(s.push([euro[1]]))
        XCTAssertEqual(s.push([euro[2], 0x42]), "€B")
        XCTAssertNil(s.finish())
        XCTAssertEqual(s.text, "A€B")
        var bad = TextStream(stops: [])
        _ = bad.push([0x41, 0xE2, 0x82])
        XCTAssertEqual(bad.finish(), "\u{FFFD}")
        XCTAssertEqual(bad.text, "A\u{FFFD}")
        var st = TextStream(stops: ["\n\n"])
        var out = ""
        for piece in ["Hello", "\n", "\n", "more"] { if let x = st.push(Array(piece.utf8)) { out += x } }
        if let x = st.finish() { out += x }
        XCTAssertEqual(out, "Hello")
        XCTAssertTrue(st.stopped)
    }
}
