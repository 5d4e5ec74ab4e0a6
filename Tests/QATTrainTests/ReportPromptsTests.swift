import Foundation
import QATTrain
import XCTest

final class ReportPromptsTests: XCTestCase {
    func testReportPromptsAndExportFormat() throws {
        let text = "report:\n  prompts: [\"Q:\\tWhy\", \"two\\nlines\", \"plain\"]\nexport:\n  format: compressed-tensors\n"
        let r = try Recipe.parse(text, source: "t.yaml")
        XCTAssertEqual(r.reportPrompts, ["Q:\tWhy", "two\nlines", "plain"])
        XCTAssertEqual(r.export.format, "compressed-tensors")
        // `recipe show` round trip keeps them.
        let again = try Recipe.parse(r.yaml, source: "shown.yaml")
        XCTAssertEqual(again.reportPrompts, r.reportPrompts)
        XCTAssertEqual(again.export.format, "compressed-tensors")
        XCTAssertEqual(try Recipe.parse("model: models/fortune-lm\n", source: "plain.yaml").reportPrompts, [])
        XCTAssertEqual(try Recipe.parse("model: models/fortune-lm\n", source: "plain.yaml").export.format, "modelopt")
        // Errors name the key.
        XCTAssertThrowsError(try Recipe.parse("report:\n  prompt: [x]\n", source: "bad.yaml")) {
            XCTAssertTrue("\($0)".contains("prompt"), "\($0)")
        }
        XCTAssertThrowsError(try Recipe.parse("export:\n  format: gguf\n", source: "bad.yaml")) {
            XCTAssertTrue("\($0)".contains("format"), "\($0)")
        }
        XCTAssertThrowsError(try Recipe.parse("report:\n  prompts: {a: 1}\n", source: "bad.yaml")) {
            XCTAssertTrue("\($0)".contains("prompts"), "\($0)")
        }
    }
}
