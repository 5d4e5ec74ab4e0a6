import QATCore
import TestSupport
import XCTest

final class QATErrorTests: XCTestCase {
    /// The initializer other code calls keeps its meaning (bad input); the kinds survive
    /// context prefixes; `assertQATError` checks kind and key words.
    func testKindsAndPrefix() {
        XCTAssertEqual(QATError("bad value").kind, .userInput)
        XCTAssertEqual(QATError.io("x: write failed").kind, .io)
        XCTAssertEqual(QATError.unsupported("model_type gpt2").kind, .unsupported)
        XCTAssertEqual(QATError.internal("broken invariant").kind, .internal)
        let wrapped = QATError.io("write failed").prefixed("out/model.safetensors: ")
        XCTAssertEqual(wrapped, QATError("out/model.safetensors: write failed", kind: .io))
        XCTAssertNotEqual(QATError("same text", kind: .io), QATError("same text"))
        let m = assertQATError(kind: .unsupported, ["gpt2"]) { throw QATError.unsupported("model_type gpt2 is not supported") }
        XCTAssertEqual(m, "model_type gpt2 is not supported")
    }
}
