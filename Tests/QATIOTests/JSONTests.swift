import Foundation
import QATCore
import QATIO
import TestSupport
import XCTest

final class JSONTests: XCTestCase {
    let configs = [
        Fixtures.path("tiny-llama/config.json"),
        Fixtures.path("tiny-qwen3/config.json"),
        Fixtures.fortuneLM + "/config.json",
    ]

    func text(_ path: String) throws -> String { try String(contentsOfFile: path, encoding: .utf8) }

    func testConfigRoundTripIsByteIdentical() throws {
        for path in configs {
            let original = try Data(contentsOf: URL(fileURLWithPath: path))
            let value = try JSONValue.parse(file: path)
            XCTAssertEqual(Data(value.fileText.utf8), original, path)
            // Also through the file writer.
            let dir = Fixtures.tempDir("qat-json")
            defer { try? FileManager.default.removeItem(at: dir) }
            let out = dir.appendingPathComponent("config.json").path
            try value.write(toFile: out)
            XCTAssertEqual(try Data(contentsOf: URL(fileURLWithPath: out)), original, path)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["config.json"], "no temp files left")
        }
    }

    func testParsedFloatsKeepTheirText() throws {
        let v = try JSONValue.parse(#"{"a": 1e-05, "b": 10000.0, "c": 1.50, "d": 1E+2, "e": -0.0, "f": 3}"#)
        XCTAssertEqual(v.serialized(indent: nil), #"{"a":1e-05,"b":10000.0,"c":1.50,"d":1E+2,"e":-0.0,"f":3}"#)
        XCTAssertEqual(v["a"], .double(1e-5))
        XCTAssertEqual(v["c"]?.doubleValue, 1.5)
        XCTAssertEqual(v["f"], .int(3))
    }

    func testSetDtypeChangesOnlyThatLine() throws {
        let path = Fixtures.path("tiny-llama/config.json")
        var v = try JSONValue.parse(file: path)
        let before = v.fileText.components(separatedBy: "\n")
        v["dtype"] = "float16"
        let after = v.fileText.components(separatedBy: "\n")
        XCTAssertEqual(before.count, after.count)
        let changed = zip(before, after).enumerated().filter { $0.element.0 != $0.element.1 }
        XCTAssertEqual(changed.count, 1)
        XCTAssertEqual(changed.first?.element.1, #"  "dtype": "float16","#)
    }

    func testAddNestedObjectAppendsAtEnd() throws {
        let path = Fixtures.path("tiny-llama/config.json")
        var cfg = try JSONValue.parseObject(file: path)
        let original = try text(path)
        cfg["quantization_config"] = [
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "group_size": 16,
            "ignore": ["lm_head"],
            "kv_cache_scheme": nil,
            "extra": [:],
            "empty": [],
            "eps": 1e-05,
        ]
        XCTAssertEqual(cfg.keys.last, "quantization_config")
        let expectedTail = """
              "vocab_size": 512,
              "quantization_config": {
                "quant_method": "modelopt",
                "quant_algo": "NVFP4",
                "group_size": 16,
                "ignore": [
                  "lm_head"
                ],
                "kv_cache_scheme": null,
                "extra": {},
                "empty": [],
                "eps": 1e-05
              }
            }

            """
        let head = original.dropLast("  \"vocab_size\": 512\n}\n".count)
        XCTAssertEqual(cfg.fileText, head + expectedTail)
        // Set in place keeps position; remove drops the line.
        cfg.set("model_type", "qwen3")
        XCTAssertEqual(cfg.keys.firstIndex(of: "model_type"), 13)
        cfg.remove("quantization_config")
        cfg["model_type"] = "llama"
        XCTAssertEqual(cfg.fileText, original)
        cfg.insert("new_key", true, after: "dtype")
        XCTAssertEqual(cfg.keys[cfg.keys.firstIndex(of: "dtype")! + 1], "new_key")
    }

    func testTypedAccessors() throws {
        let cfg = try JSONValue.parseObject(file: Fixtures.path("tiny-qwen3/config.json"))
        XCTAssertEqual(try cfg.int("num_hidden_layers"), 2)
        XCTAssertEqual(try cfg.int("head_dim"), 48)
        XCTAssertEqual(try cfg.double("rms_norm_eps"), 1e-6)
        XCTAssertEqual(try cfg.bool("tie_word_embeddings"), true)
        XCTAssertEqual(try cfg.string("model_type"), "qwen3")
        XCTAssertEqual(try cfg.strings("layer_types"), ["full_attention", "full_attention"])
        XCTAssertNil(try cfg.optionalInt("bos_token_id"))  // null
        XCTAssertNil(try cfg.optionalInt("no_such_key"))
        XCTAssertEqual(try cfg.optionalDouble("rms_norm_eps"), 1e-6)
        let rope = try cfg.object("rope_parameters")
        XCTAssertEqual(try rope.double("rope_theta"), 1_000_000)
        XCTAssertEqual(cfg.value(atPath: "rope_parameters.rope_type"), "default")

        XCTAssertThrowsError(try cfg.int("num_layers")) { e in
            XCTAssertEqual("\(e)", "\(Fixtures.path("tiny-qwen3/config.json")): \"num_layers\" is missing")
        }
        XCTAssertThrowsError(try cfg.int("model_type")) { e in
            XCTAssertTrue("\(e)".hasSuffix(#""model_type" must be an integer, found a string "qwen3""#), "\(e)")
        }
        XCTAssertThrowsError(try rope.string("rope_theta")) { e in
            XCTAssertTrue("\(e)".contains(#""rope_parameters.rope_theta" must be a string, found a float 1000000.0"#), "\(e)")
        }
        XCTAssertThrowsError(try rope.int("factor")) { e in
            XCTAssertTrue("\(e)".contains(#""rope_parameters.factor" is missing"#), "\(e)")
        }
        XCTAssertThrowsError(try cfg.int("rms_norm_eps"))  // non-integral float
        XCTAssertEqual(try JSONValue.parseObject(file: Fixtures.fortuneLM + "/config.json").ints("eos_token_id"), [0])
    }

    func testMalformedJSONErrors() throws {
        func message(_ text: String) -> String {
            do { _ = try JSONValue.parse(text, source: "cfg.json"); return "no error" } catch { return "\(error)" }
        }
        XCTAssertEqual(message("{\n  \"a\": 1,\n}"), "cfg.json: invalid JSON at line 3, column 1 (byte 12): unexpected character")
        XCTAssertEqual(message(#"{"a": [1, 2"#), "cfg.json: invalid JSON at line 1, column 12 (byte 11): unexpected end of input")
        XCTAssertTrue(message(#"{"a": 1} x"#).hasPrefix("cfg.json: invalid JSON at line 1, column 10"), message(#"{"a": 1} x"#))
        XCTAssertTrue(message("{'a': 1}").hasPrefix("cfg.json: invalid JSON at line 1, column 2"), message("{'a': 1}"))
        XCTAssertEqual(message(#"{"a": 1.}"#), "cfg.json: invalid JSON at line 1, column 8 (byte 7): a digit must follow the decimal point")
        XCTAssertEqual(
            message("{\"a\": \"x\ty\"}"), "cfg.json: invalid JSON at line 1, column 9 (byte 8): unescaped control character in a string")
        XCTAssertEqual(message("{'a': 1}"), "cfg.json: invalid JSON at line 1, column 2 (byte 1): single-quoted strings are not JSON")
        XCTAssertEqual(message(#"{"a": TRUE}"#), "cfg.json: invalid JSON at line 1, column 7 (byte 6): boolean expected")
        XCTAssertEqual(message(""), "cfg.json: invalid JSON: the input is empty")
        let deep = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        XCTAssertTrue(message(deep).contains("nesting deeper than 64 levels"), message(deep))
        XCTAssertThrowsError(try JSONValue.parse("[1]", source: "x", maxBytes: 2)) { e in
            XCTAssertTrue("\(e)".contains("larger than the 2-byte limit"))
        }
        XCTAssertThrowsError(try JSONValue.parse(file: "/nonexistent/config.json")) { e in
            XCTAssertTrue("\(e)".hasPrefix("/nonexistent/config.json: cannot open"))
        }
        XCTAssertThrowsError(try JSONValue.parseObject(file: Fixtures.path("tiny-llama/config.json") + "x"))
    }

    func testPythonFloatRepr() {
        let cases: [(Double, String)] = [
            (1e-05, "1e-05"), (0.0, "0.0"), (-0.0, "-0.0"), (10000.0, "10000.0"), (1e-6, "1e-06"),
            (0.0001, "0.0001"), (0.00012, "0.00012"), (1.5e-7, "1.5e-07"), (1e16, "1e+16"),
            (1e15, "1000000000000000.0"), (1.2345e20, "1.2345e+20"), (123.456, "123.456"), (-2.5, "-2.5"),
            (0.1, "0.1"), (Double(Float(0.1)), "0.10000000149011612"), (.leastNonzeroMagnitude, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"), (1_000_000.0, "1000000.0"), (0.02, "0.02"),
            (.nan, "NaN"), (.infinity, "Infinity"), (-.infinity, "-Infinity"), (123456789012345680, "1.2345678901234568e+17"),
        ]
        for (x, s) in cases { XCTAssertEqual(pythonFloatRepr(x), s, "\(x)") }
    }

    func testStringEscapingLikePython() throws {
        let v: JSONValue = ["k\u{e9}y": "caf\u{e9} \u{1F600} \"q\" \\ \n\t\u{1}\u{7F}/"]
        XCTAssertEqual(v.serialized(indent: nil), #"{"k\u00e9y":"caf\u00e9 \ud83d\ude00 \"q\" \\ \n\t\u0001\u007f/"}"#)
        XCTAssertEqual(
            v.serialized(indent: nil, asciiOnly: false), "{\"k\u{e9}y\":\"caf\u{e9} \u{1F600} \\\"q\\\" \\\\ \\n\\t\\u0001\u{7F}/\"}")
        // Escapes parse back to the same string.
        XCTAssertEqual(try JSONValue.parse(v.serialized()), v)
    }

    func testCompactAndEmptyContainers() throws {
        let v: JSONValue = ["a": 1, "b": [1, 2.5, true, nil], "c": [:], "d": []]
        XCTAssertEqual(v.serialized(indent: nil), #"{"a":1,"b":[1,2.5,true,null],"c":{},"d":[]}"#)
        XCTAssertEqual(
            v.serialized(), "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"c\": {},\n  \"d\": []\n}")
        XCTAssertEqual(JSONValue.array([]).serialized(), "[]")
        XCTAssertEqual(try JSONValue.parse(v.serialized()), v)
    }

    func testInvalidUTF8Rejected() {
        let bytes: [UInt8] = Array(#"{"a": ""#.utf8) + [0xFF, 0xFE] + Array(#""}"#.utf8)
        XCTAssertThrowsError(try bytes.withUnsafeBytes { try JSONValue.parse(bytes: $0, source: "b.json") }) { e in
            XCTAssertTrue("\(e)".hasPrefix("b.json: invalid JSON at line 1, column 8"), "\(e)")
        }
    }

    func testTokenizerJSONParses() throws {
        let v = try JSONValue.parseObject(file: Fixtures.fortuneLM + "/tokenizer.json")
        XCTAssertNotNil(try v.optionalObject("model"))
    }
}
