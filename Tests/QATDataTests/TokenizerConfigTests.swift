import Foundation
import QATData
import TestSupport
import XCTest

/// Tokenizer features the fortune model does not exercise, on small hand-made
/// tokenizer.json files, and the errors for what is not supported.
final class TokenizerConfigTests: XCTestCase {
    var dir: URL!
    override func setUp() { dir = Fixtures.tempDir("qat-tok") }
    override func tearDown() { try? FileManager.default.removeItem(at: dir) }

    /// A tiny byte-level tokenizer: the printable ASCII bytes, "Ġ", and a few merges.
    func tiny(_ edit: (inout [String: Any]) -> Void = { _ in }) -> [String: Any] {
        var vocab: [String: Int] = ["<|endoftext|>": 0]
        for b in 0..<256 { vocab[String(ByteLevel.byteToScalar[b])] = vocab.count }
        for t in ["ab", "abc", "Ġa", "Ġab"] { vocab[t] = vocab.count }
        var root: [String: Any] = [
            "version": "1.0",
            "added_tokens": [["id": 0, "content": "<|endoftext|>", "special": true]],
            "normalizer": NSNull(),
            "pre_tokenizer": ["type": "ByteLevel", "add_prefix_space": false, "use_regex": true],
            "decoder": ["type": "ByteLevel"],
            "model": ["type": "BPE", "vocab": vocab, "merges": ["Ġ a", "a b", "Ġa b"], "ignore_merges": false] as [String: Any],
        ]
        edit(&root)
        return root
    }

    func save(_ root: [String: Any], config: [String: Any]? = nil) throws -> String {
        let p = dir.appendingPathComponent("tokenizer.json")
        try JSONSerialization.data(withJSONObject: root).write(to: p)
        if let config { try JSONSerialization.data(withJSONObject: config).write(to: dir.appendingPathComponent("tokenizer_config.json")) }
        return p.path
    }

    func model(_ root: inout [String: Any], _ edit: (inout [String: Any]) -> Void) {
        var m = root["model"] as! [String: Any]
        edit(&m)
        root["model"] = m
    }

    func ids(_ tok: Tokenizer, _ tokens: [String]) -> [Int32] { tokens.map { tok.tokenId($0)! } }

    func testMergesAsStringsOrPairsAndIgnoreMerges() throws {
        let t1 = try Tokenizer(path: save(tiny()))
        XCTAssertEqual(t1.encode("abc abx"), ids(t1, ["ab", "c", "Ġab", "x"]))
        let t2 = try Tokenizer(path: save(tiny { r in self.model(&r) { $0["merges"] = [["Ġ", "a"], ["a", "b"], ["Ġa", "b"]] } }))
        XCTAssertEqual(t2.encode("abc abx"), t1.encode("abc abx"))
        // ignore_merges: a piece that is a vocabulary entry is taken whole ("abc" is not
        // reachable by merges here).
        let t3 = try Tokenizer(path: save(tiny { r in self.model(&r) { $0["ignore_merges"] = true } }))
        XCTAssertEqual(t3.encode("abc abx"), ids(t3, ["abc", "Ġab", "x"]))
        XCTAssertEqual(t3.vocabSize, 261)
    }

    func testAddPrefixSpaceAndEOSFromConfig() throws {
        let p = try save(
            tiny { r in r["pre_tokenizer"] = ["type": "ByteLevel", "add_prefix_space": true, "use_regex": true] },
            config: ["eos_token": ["content": "ab"]])
        let t = try Tokenizer(path: dir.path)
        XCTAssertEqual(t.path, p)
        XCTAssertEqual(t.encode("ab"), ids(t, ["Ġab"]))
        XCTAssertEqual(t.eosTokenId, t.tokenId("ab"))
    }

    func testAddedTokenStripping() throws {
        let t = try Tokenizer(
            path: save(
                tiny { r in
                    r["added_tokens"] = [
                        ["id": 0, "content": "<|endoftext|>", "special": true],
                        ["id": 300, "content": "<L>", "lstrip": true],
                        ["id": 301, "content": "<R>", "rstrip": true],
                        ["id": 302, "content": "<W>", "single_word": true],
                        ["id": 303, "content": "<|endoftext|>x", "special": true],
                    ]
                }))
        XCTAssertEqual(t.vocabSize, 304)
        XCTAssertEqual(t.encode("a  <L>b"), ids(t, ["a"]) + [300] + ids(t, ["b"]))
        XCTAssertEqual(t.encode("a<R>  b"), ids(t, ["a"]) + [301] + ids(t, ["b"]))
        XCTAssertEqual(t.encode("a <W> b"), ids(t, ["a", "Ġ"]) + [302] + ids(t, ["Ġ", "b"]))
        XCTAssertEqual(t.encode("a<W>"), ids(t, ["a", "<", "W", ">"]))
        // Leftmost-longest: the longer added token wins.
        XCTAssertEqual(t.encode("<|endoftext|>xy"), [303] + ids(t, ["y"]))
        XCTAssertEqual(t.decode([302, 0]), "<W><|endoftext|>")
    }

    /// Llama-3 / Qwen2 layout: Split(regex) then ByteLevel(use_regex false), NFC normalizer.
    func testSplitSequenceWithNormalizer() throws {
        let fortune = Fixtures.fortuneLM + "/tokenizer.json"
        var root = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: fortune))) as! [String: Any]
        root["normalizer"] = ["type": "NFC"]
        root["pre_tokenizer"] = [
            "type": "Sequence",
            "pretokenizers": [
                ["type": "Split", "pattern": ["Regex": PreTokenizerTests.llama3], "behavior": "Isolated", "invert": false],
                ["type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false],
            ],
        ]
        let t = try Tokenizer(path: save(root))
        let text = "Hello  world\n\n  12345 it's CAFE\u{301}<|endoftext|>x"
        let base = TokenizerTests.fortune
        var expected: [Int32] = []
        for piece in try PreTokenizerSplit.pieces("Hello  world\n\n  12345 it's CAF\u{C9}", pattern: PreTokenizerTests.llama3) {
            expected += base.bpe(Array(piece.utf8))
        }
        expected += [0] + base.encode("x")
        XCTAssertEqual(t.encode(text), expected)
        XCTAssertEqual(t.decode(t.encode(text)), "Hello  world\n\n  12345 it's CAF\u{C9}<|endoftext|>x")
    }

    /// The heap BPE (pieces over 64 bytes) must agree with the plain one on the same bytes.
    func testLongPiecesAgreeWithShortPath() throws {
        let tok = TokenizerTests.fortune
        var state: UInt64 = 42
        func next() -> Int { state = state &* 6364136223846793005 &+ 1442695040888963407; return Int(state >> 33) }
        let alphabet = Array("etaoinshrdlu".utf8)
        for _ in 0..<200 {
            let words = (0..<14).map { _ in (0..<(3 + next() % 10)).map { _ in alphabet[next() % alphabet.count] } }
            let long = Array(words.joined())
            XCTAssertGreaterThan(long.count, 64)
            XCTAssertEqual(tok.bpe(long), naiveBPE(tok, long))
            XCTAssertEqual(tok.bpe(words[0]), naiveBPE(tok, words[0]))
        }
        XCTAssertEqual(tok.decode(tok.encode(String(repeating: "-=", count: 500))), String(repeating: "-=", count: 500))
    }

    /// Textbook BPE over token strings, as in GPT-2's encoder.py.
    func naiveBPE(_ tok: Tokenizer, _ bytes: [UInt8]) -> [Int32] {
        var syms = bytes.map { String(ByteLevel.byteToScalar[Int($0)]) }
        let ranks = Self.fortuneRanks
        while syms.count > 1 {
            var best = Int.max, at = -1
            for k in 0..<(syms.count - 1) { if let r = ranks[syms[k] + " " + syms[k + 1]], r < best { best = r; at = k } }
            if at < 0 { break }
            syms[at] += syms[at + 1]
            syms.remove(at: at + 1)
        }
        return syms.map { tok.tokenId($0)! }
    }

    static let fortuneRanks: [String: Int] = {
        let root =
            try! JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: Fixtures.fortuneLM + "/tokenizer.json")))
            as! [String: Any]
        let merges = (root["model"] as! [String: Any])["merges"] as! [[String]]
        var d: [String: Int] = [:]
        for (i, m) in merges.enumerated() where d[m[0] + " " + m[1]] == nil { d[m[0] + " " + m[1]] = i }
        return d
    }()

    func testUnsupportedComponentsAreErrors() throws {
        func err(_ root: [String: Any]) throws -> String {
            let p = try save(root)
            do { _ = try Tokenizer(path: p); return "no error" } catch { return "\(error)" }
        }
        XCTAssertTrue(
            try err(tiny { $0["pre_tokenizer"] = ["type": "Metaspace", "replacement": "▁"] }).contains("Metaspace is not supported"))
        XCTAssertTrue(try err(tiny { $0["pre_tokenizer"] = NSNull() }).contains("pre_tokenizer is null"))
        XCTAssertTrue(try err(tiny { $0["normalizer"] = ["type": "Replace"] }).contains("normalizer type Replace"))
        XCTAssertTrue(try err(tiny { $0["decoder"] = ["type": "Metaspace"] }).contains("decoder type Metaspace"))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["type"] = "WordPiece" } }).contains("only BPE"))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["dropout"] = 0.1 } }).contains("dropout"))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["vocab"] = nil } }).contains("missing key \"model.vocab\""))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["merges"] = "x" } }).contains("\"model.merges\" is not a JSON array"))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["merges"] = ["a zz"] } }).contains("model.merges[0] uses \"zz\""))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["merges"] = ["a c"] } }).contains("produces \"ac\""))
        XCTAssertTrue(try err(tiny { r in self.model(&r) { $0["vocab"] = ["▁the": 0] } }).contains("not a byte-level token"))
        XCTAssertTrue(
            try err(tiny { $0["pre_tokenizer"] = ["type": "Split", "pattern": ["Regex": "x"], "behavior": "Contiguous"] }).contains(
                "Contiguous"))
        XCTAssertTrue(
            try err(tiny { $0["pre_tokenizer"] = ["type": "Split", "pattern": ["Regex": "x"], "behavior": "Isolated"] }).contains(
                "no ByteLevel"))
        XCTAssertTrue(try err(tiny { $0["model"] = nil }).contains("missing key \"model\""))
        try Data("{not json".utf8).write(to: dir.appendingPathComponent("tokenizer.json"))
        XCTAssertThrowsError(try Tokenizer(path: dir.path)) { XCTAssertTrue("\($0)".contains("not valid JSON")) }
        XCTAssertThrowsError(try Tokenizer(path: dir.path + "/missing")) { XCTAssertTrue("\($0)".contains("not found")) }
    }
}
