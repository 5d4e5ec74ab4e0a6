import Foundation
import QATIO
import TestSupport
import XCTest

/// The deploy path as a user runs it: `qat apply` straight to a compressed-tensors export
/// with `report.prompts`, `qat convert` both ways, `qat generate` and `qat eval` on it.
final class DeployEndToEndTests: XCTestCase {
    func testCompressedTensorsApplyConvertGenerate() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-deploy")
        defer { try? FileManager.default.removeItem(at: dir) }
        let recipe = try Fixtures.shortRecipe(in: dir, steps: 2, exportExtra: ["format: compressed-tensors"])
        try (String(contentsOfFile: recipe, encoding: .utf8) + "report:\n  prompts: [\"The meaning of life is\"]\n")
            .write(toFile: recipe, atomically: true, encoding: .utf8)
        let run = try Fixtures.runQAT(["apply", recipe, "--quiet"])
        XCTAssertEqual(run.status, 0, run.err)
        let export = dir.appendingPathComponent("export").path
        XCTAssertFalse(FileManager.default.fileExists(atPath: export + "/hf_quant_config.json"))
        let qc = try JSONValue.parseObject(file: export + "/config.json").object("quantization_config")
        XCTAssertEqual(try qc.string("quant_method"), "compressed-tensors")
        XCTAssertTrue(run.out.contains("│ exported"), run.out)

        // The original's sample is transformers' greedy continuation up to its EOS.
        let summary = try JSONValue.parseObject(file: export + "/qat_summary.json")
        let sample = try XCTUnwrap(summary["samples"]?.arrayValue?.first?.objectValue)
        let greedy = try JSONValue.parseObject(file: Fixtures.path("generation/fortune-lm-greedy.json"))
        let first = try XCTUnwrap(greedy["cases"]?.arrayValue?.first?.objectValue)
        let hfText = try first.string("text").components(separatedBy: "<|endoftext|>")[0]
        XCTAssertEqual(try sample.string("prompt"), "The meaning of life is")
        XCTAssertEqual(try sample.string("original"), hfText)
        XCTAssertFalse(try sample.string("exported").isEmpty)

        // qat convert both ways: back to compressed-tensors byte for byte.
        let mo = dir.appendingPathComponent("mo").path, ct = dir.appendingPathComponent("ct").path
        XCTAssertEqual(try Fixtures.runQAT(["convert", export, "--to", "modelopt", "--out", mo]).status, 0)
        XCTAssertTrue(FileManager.default.fileExists(atPath: mo + "/hf_quant_config.json"))
        XCTAssertEqual(try Fixtures.runQAT(["convert", mo, "--to", "compressed-tensors", "--out", ct]).status, 0)
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            XCTAssertEqual(try readFile("\(ct)/\(f)"), try readFile("\(export)/\(f)"), f)
        }

        // qat generate: the CLI's greedy ids are transformers' on the original model; the
        // export generates and its loss evaluates.
        let ids = try XCTUnwrap(first["new_ids"]?.arrayValue).map { $0.intValue! }
        let g = try Fixtures.runQAT([
            "generate", "--model", "models/fortune-lm", "--prompt", try first.string("prompt"),
            "--max-new-tokens", "30", "--ignore-eos", "--json",
        ])
        XCTAssertEqual(g.status, 0, g.err)
        let got = try JSONValue.parse(g.out)["models"]?.arrayValue?.first?["ids"]?.arrayValue?.map { $0.intValue! }
        XCTAssertEqual(got, ids)
        let c = try Fixtures.runQAT([
            "generate", "--model", "models/fortune-lm", "--compare", export, "--prompt", "Q:",
            "--max-new-tokens", "8", "--json",
        ])
        XCTAssertEqual(c.status, 0, c.err)
        XCTAssertEqual(try JSONValue.parse(c.out)["models"]?.arrayValue?.count, 2)
        let e = try Fixtures.runQAT(["eval", "--model", export, "--max-sequences", "2", "--seq-len", "32", "--json"])
        XCTAssertEqual(e.status, 0, e.err)

        // Bad input: one clear line, exit 1.
        for args in [
            ["convert", export, "--to", "gguf", "--out", dir.appendingPathComponent("x").path],
            ["generate", "--model", "models/fortune-lm", "--prompt", "hi", "--chat"],
            ["generate", "--model", "models/fortune-lm", "--prompt", "hi", "--top-p", "2"],
        ] {
            let r = try Fixtures.runQAT(args)
            XCTAssertEqual(r.status, 1, "\(args)")
            XCTAssertTrue(r.err.hasPrefix("error: ") && r.err.split(separator: "\n").count == 1, "\(args): \(r.err)")
        }
    }
}
