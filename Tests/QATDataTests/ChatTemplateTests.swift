import Foundation
import QATCore
import QATData
import QATIO
import TestSupport
import XCTest

final class ChatTemplateTests: XCTestCase {
    /// Five templates shaped like Llama 3's, Qwen2.5's, Qwen3's, Mistral's and ChatML's,
    /// rendered by transformers' Jinja environment (Tests/Fixtures/chat/make_chat_fixture.py):
    /// qat's renderer gives the same prompt character for character, or the same
    /// raise_exception message.
    func testMatchesTransformersRendering() throws {
        let doc = try JSONValue.parseObject(file: Fixtures.path("chat/templates.json"))
        var rendered = 0
        for t in try XCTUnwrap(doc["templates"]?.arrayValue) {
            let o = try XCTUnwrap(t.objectValue)
            var template = ChatTemplate(source: try o.string("template"))
            template.bosToken = "<s>"; template.eosToken = "</s>"
            for r in try XCTUnwrap(o["renders"]?.arrayValue) {
                let ro = try XCTUnwrap(r.objectValue)
                let messages: [JinjaValue] = try XCTUnwrap(ro["messages"]?.arrayValue).map { m in
                    .dict((m.objectValue?.entries ?? []).map { ($0.key, .string($0.value.stringValue ?? "")) })
                }
                let name = try o.string("name")
                if let want = ro["text"]?.stringValue {
                    XCTAssertEqual(try template.render(messages: messages), want, name)
                    rendered += 1
                } else {
                    let err = try ro.string("error")
                    XCTAssertThrowsError(try template.render(messages: messages), name) { XCTAssertTrue("\($0)".contains(err), "\($0)") }
                }
            }
        }
        XCTAssertEqual(rendered, 9)
    }

    func testUnsupportedAndMissing() throws {
        XCTAssertThrowsError(try ChatTemplate(source: "{% macro f() %}x{% endmacro %}").render(user: "hi")) {
            XCTAssertTrue("\($0)".contains("unsupported chat template"), "\($0)")
        }
        XCTAssertThrowsError(try ChatTemplate(source: "{{ messages | map(attribute='role') }}").render(user: "hi")) {
            XCTAssertTrue("\($0)".contains("unsupported chat template"), "\($0)")
        }
        XCTAssertThrowsError(try ChatTemplate(source: "{% if true %}x").render(user: "hi")) {
            XCTAssertTrue("\($0)".contains("endif"), "\($0)")
        }
        XCTAssertThrowsError(try ChatTemplate.load(directory: Fixtures.fortuneLM)) {
            XCTAssertTrue("\($0)".contains("no chat template"), "\($0)")
        }
        let tmp = Fixtures.tempDir("chat")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let cfg = JSONObject([
            ("chat_template", .string("{{ bos_token }}[{{ messages[0].content }}]")),
            ("bos_token", .object(JSONObject([("content", .string("<B>"))]))),
        ])
        try cfg.write(toFile: tmp.appendingPathComponent("tokenizer_config.json").path)
        XCTAssertEqual(try ChatTemplate.load(directory: tmp.path).render(user: "hi"), "<B>[hi]")
    }
}
