import Foundation
import QATData
import TestSupport
import XCTest

final class TokenizerTests: XCTestCase {
    static let fortune: Tokenizer = try! Tokenizer(path: Fixtures.fortuneLM)

    func testFortuneBasics() throws {
        let tok = Self.fortune
        XCTAssertEqual(tok.vocabSize, 2048)
        XCTAssertEqual(tok.eosTokenId, 0)
        XCTAssertEqual(tok.tokenId("<|endoftext|>"), 0)
        XCTAssertEqual(tok.tokenId("!"), 1)
        XCTAssertEqual(tok.encode(""), [])
        XCTAssertEqual(tok.encode("<|endoftext|>"), [0])
        // Special tokens are matched before pre-tokenization, anywhere in the text.
        let a = tok.encode("Hello world")
        XCTAssertEqual(tok.encode("Hello world<|endoftext|>Hello world"), a + [0] + a)
        XCTAssertEqual(tok.decode(a + [0]), "Hello world<|endoftext|>")
        // A file path to tokenizer.json works as well as the directory.
        let byFile = try Tokenizer(path: Fixtures.fortuneLM + "/tokenizer.json")
        XCTAssertEqual(byFile.encode("It's 12345 o'clock!\n\n  x"), tok.encode("It's 12345 o'clock!\n\n  x"))
    }

    /// The whole train and validation streams of tokens.h5 (made by Hugging Face
    /// `tokenizers`) must come out of train.jsonl / validation.jsonl id for id.
    func testReproducesFortuneTokenStreams() throws {
        let tok = Self.fortune
        let h5 = Fixtures.fortuneLM + "/tokens.h5"
        for (split, expectedCount) in [("validation", 46_221), ("train", 904_239)] {
            let expected = try TokenData.load(path: h5, split: split, tokenizer: nil)
            XCTAssertEqual(expected.count, expectedCount)
            let t0 = Date()
            let got = try TokenData.readJSONL(path: Fixtures.fortuneLM + "/\(split).jsonl", tokenizer: tok)
            let dt = Date().timeIntervalSince(t0)
            print("encoded \(split).jsonl: \(got.count) tokens in \(String(format: "%.2f", dt)) s")
            XCTAssertEqual(got.count, expected.count, split)
            if let i = (0..<min(got.count, expected.count)).first(where: { got[$0] != expected[$0] }) {
                let lo = max(0, i - 8), hi = min(got.count, i + 8)
                XCTFail(
                    "\(split): first difference at \(i): got \(Array(got[lo..<hi])) expected \(Array(expected[lo..<hi])) "
                        + "text \(tok.decode(Array(expected[lo..<hi])).debugDescription)")
            }
            // Through the directory entry point too (it picks tokens.h5).
            if split == "validation" {
                XCTAssertEqual(
                    try TokenData.load(path: Fixtures.fortuneLM, split: split, tokenizer: tok, vocabSize: tok.vocabSize), expected)
            }
        }
    }

    func testRoundTripOnDocuments() throws {
        let tok = Self.fortune
        for split in ["validation", "train"] {
            let texts = try TokenData.readJSONLTexts(path: Fixtures.fortuneLM + "/\(split).jsonl")
            var failures = 0
            for t in texts where tok.decode(tok.encode(t)) != t {
                failures += 1
                if failures < 3 { XCTFail("round trip failed for \(t.debugDescription)") }
            }
            XCTAssertEqual(failures, 0, split)
        }
        for s in ["naïve café — “quotes” 日本語 🎉 e\u{301}", "\t\u{0B}\u{85}\u{A0}x  \r\n\r\n y", "'S 'll 'LL ſ"] {
            XCTAssertEqual(tok.decode(tok.encode(s)), s)
        }
    }

    func testDecodeOfCutMultibyteCharacterAndUnknownId() {
        let tok = Self.fortune
        let ids = tok.encode("🎉")
        XCTAssertGreaterThan(ids.count, 1)
        XCTAssertEqual(tok.decode(Array(ids.prefix(1))), "\u{FFFD}")
        XCTAssertEqual(tok.decode([99_999]), "\u{FFFD}")
    }

    func testEncodingIsThreadSafe() {
        let tok = Self.fortune
        let text = "The quick brown fox jumps over the lazy dog, 1234 times!"
        let expected = tok.encode(text)
        let ok = UnsafeMutablePointer<Bool>.allocate(capacity: 8)
        defer { ok.deallocate() }
        let box = SendablePointer(ok)
        DispatchQueue.concurrentPerform(iterations: 8) { k in
            var good = true
            for r in 0..<200 where tok.encode(text + " \(r)").prefix(expected.count) != expected[...] { good = false }
            box.p[k] = good
        }
        XCTAssertTrue((0..<8).allSatisfy { ok[$0] })
    }
}
