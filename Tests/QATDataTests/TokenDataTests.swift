import Foundation
import QATData
import TestSupport
import XCTest

final class TokenDataTests: XCTestCase {
    let tok = TokenizerTests.fortune

    func write(_ text: String, _ name: String, in dir: URL) throws -> String {
        let p = dir.appendingPathComponent(name).path
        try Data(text.utf8).write(to: URL(fileURLWithPath: p))
        return p
    }

    func testJSONL() throws {
        let dir = Fixtures.tempDir("qat-data")
        defer { try? FileManager.default.removeItem(at: dir) }
        let p = try write("{\"text\": \"Hello world\"}\n\n{\"text\": \"Bye\", \"extra\": 1}\r\n", "a.jsonl", in: dir)
        XCTAssertEqual(
            try TokenData.readJSONL(path: p, tokenizer: tok),
            tok.encode("Hello world") + [0] + tok.encode("Bye") + [0])
        XCTAssertEqual(
            try TokenData.load(path: p, split: "train", tokenizer: tok).count, tok.encode("Hello world").count + tok.encode("Bye").count + 2
        )
        XCTAssertThrowsError(try TokenData.load(path: p, split: "train", tokenizer: nil)) { XCTAssertTrue("\($0)".contains("tokenizer")) }
    }

    func testJSONLErrors() throws {
        let dir = Fixtures.tempDir("qat-data")
        defer { try? FileManager.default.removeItem(at: dir) }
        func err(_ text: String) throws -> String {
            let p = try write(text, "e.jsonl", in: dir)
            do { _ = try TokenData.readJSONL(path: p, tokenizer: tok); return "no error" } catch { return "\(error)" }
        }
        XCTAssertTrue(try err("{\"text\": \"a\"}\n{\"text\": \"b\"\n").contains("e.jsonl:2: not valid JSON"))
        XCTAssertTrue(try err("{\"text\": \"a\"}\n\n{\"txt\": \"b\"}\n").contains("e.jsonl:3: missing string key \"text\""))
        XCTAssertTrue(try err("[1, 2]\n").contains(":1: expected a JSON object"))
        XCTAssertTrue(try err("").contains("no documents"))
        XCTAssertTrue(try err("\n  \n").contains("no documents"))
    }

    func testDirectoryFallsBackToJSONL() throws {
        let dir = Fixtures.tempDir("qat-data")
        defer { try? FileManager.default.removeItem(at: dir) }
        _ = try write("{\"text\": \"abc\"}\n", "validation.jsonl", in: dir)
        XCTAssertEqual(try TokenData.load(path: dir.path, split: "validation", tokenizer: tok), tok.encode("abc") + [0])
        XCTAssertThrowsError(try TokenData.load(path: dir.path, split: "train", tokenizer: tok)) {
            XCTAssertTrue("\($0)".contains("neither tokens.h5"))
        }
        XCTAssertThrowsError(try TokenData.load(path: dir.path + "/nope.bin", split: "train", tokenizer: tok)) {
            XCTAssertTrue("\($0)".contains("not found"))
        }
    }

    func testValidate() throws {
        XCTAssertNoThrow(try TokenData.validate(tokens: [0, 5, 9], vocabSize: 10))
        XCTAssertThrowsError(try TokenData.validate(tokens: [0, 5, 10, -1], vocabSize: 10)) {
            XCTAssertTrue("\($0)".contains("token id 10 at position 2"), "\($0)")
        }
        XCTAssertThrowsError(try TokenData.validate(tokens: [0, -3], vocabSize: 10)) {
            XCTAssertTrue("\($0)".contains("token id -3 at position 1"), "\($0)")
        }
        XCTAssertThrowsError(try TokenData.load(path: Fixtures.fortuneLM, split: "validation", tokenizer: nil, vocabSize: 100)) {
            XCTAssertTrue("\($0)".contains("outside the vocabulary [0, 100)"), "\($0)")
        }
    }

    func testWriteHDF5RoundTrip() throws {
        let dir = Fixtures.tempDir("qat-data")
        defer { try? FileManager.default.removeItem(at: dir) }
        let p = dir.appendingPathComponent("tokens.h5").path
        let train: [Int32] = (0..<100_000).map { Int32($0 % 2048) }
        try TokenData.writeHDF5(path: p, splits: ["train": train, "validation": [1, 2, 3]])
        XCTAssertEqual(try TokenData.load(path: dir.path, split: "train", tokenizer: nil), train)
        XCTAssertEqual(try TokenData.load(path: p, split: "validation", tokenizer: nil), [1, 2, 3])
    }
}
