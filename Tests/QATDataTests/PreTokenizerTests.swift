import Foundation
import QATData
import TestSupport
import XCTest

/// The hand-written scanners must cut text exactly as the regexes they replace. ICU
/// (NSRegularExpression) is the reference here; it differs from Oniguruma only in `\s`
/// for U+000B and U+0085, which the corpus below avoids.
final class PreTokenizerTests: XCTestCase {
    static let gpt2 = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3 =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2 = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    static let tricky: [String] = [
        "Hello world", "  leading", "trailing  ", " ", "", "a", "\n", "\n\n\n", "x\n\ny", "x \n y", "x  \n  y",
        "It's 'S 'Re 'LL 'lL 're've'm'd't", "' s'", "'", "''s", "hello'world", "don't", "DON'T",
        "123456789 1234 12 a1b2c3", "½ Ⅻ ²³", "3.14159", "$100,000.00!!!", "...?!\n\n", " !!\r\n\r\nx",
        "tabs\t\tand\tspaces \t x", "\t\tindented\n\t\t-- author", "naïve café résumé", "日本語のテキスト 한국어",
        "emoji 🎉🎉 ok", "mixed-case CamelCase snake_case", "e\u{301}t\u{301}e\u{301}", "\u{A0}nbsp\u{A0} x",
        "\u{2003}em space", "line\r\nbreaks\r\n", "   \r\n   \r\n   x", "a\u{2028}b\u{2029}c", "🎉a", " 🎉", "_x_ -y- (z)",
        "\"quoted\" «guillemets»", "ſ 's 'ſ", "Ǆ ǅ ǆ ʰ ª", "x\u{0301}\u{0302}", "12\n34", " 1 22 333 4444",
    ]

    func check(_ pattern: String, _ texts: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        for t in texts {
            let fast = try PreTokenizerSplit.pieces(t, pattern: pattern)
            let ref = try PreTokenizerSplit.piecesWithICU(t, pattern: pattern)
            XCTAssertEqual(fast, ref, "pattern \(pattern) on \(t.debugDescription)", file: file, line: line)
            XCTAssertEqual(fast.joined(), t, file: file, line: line)
        }
    }

    func testScannersMatchRegexOnTrickyText() throws {
        try check(Self.gpt2, Self.tricky)
        try check(Self.llama3, Self.tricky)
        try check(Self.qwen2, Self.tricky)
    }

    func testScannersMatchRegexOnFortuneText() throws {
        // Random-ish concatenations of real documents, including their control characters.
        let texts = try TokenData.readJSONLTexts(path: Fixtures.fortuneLM + "/validation.jsonl")
        var chunks: [String] = []
        var k = 0
        while k < texts.count { chunks.append(texts[k..<min(texts.count, k + 50)].joined(separator: "\n\n")); k += 50 }
        try check(Self.gpt2, chunks)
        try check(Self.llama3, chunks)
        try check(Self.qwen2, chunks)
    }

    func testRandomStrings() throws {
        // Deterministic pseudo-random strings over an alphabet full of edge cases.
        let alphabet: [Character] = [
            "a", "Z", "é", "日", "1", "٣", "½", " ", " ", "\t", "\n", "\r", "'", "s", "L", "l", "!", ".", "🎉", "\u{A0}", "_", "-",
        ]
        var state: UInt64 = 0x9E3779B97F4A7C15
        func next() -> Int { state = state &* 6364136223846793005 &+ 1442695040888963407; return Int(state >> 33) }
        var texts: [String] = []
        for _ in 0..<400 { texts.append(String((0..<(next() % 24)).map { _ in alphabet[next() % alphabet.count] })) }
        try check(Self.gpt2, texts)
        try check(Self.llama3, texts)
        try check(Self.qwen2, texts)
    }

    func testKnownLlama3Cuts() throws {
        XCTAssertEqual(
            try PreTokenizerSplit.pieces("Hello  world\n\n  12345 it's", pattern: Self.llama3),
            ["Hello", " ", " world", "\n\n", " ", " ", "123", "45", " it", "'s"])
        XCTAssertEqual(
            try PreTokenizerSplit.pieces("Hello  world\n\n  12345 it's", pattern: Self.gpt2),
            ["Hello", " ", " world", "\n\n ", " 12345", " it", "'s"])
    }
}
