import QATCore
import XCTest

/// Asserts that `body` throws a `QATError` of `kind` whose message contains every one of
/// `words`; returns the message (empty when it threw nothing or something else).
@discardableResult
public func assertQATError(
    kind: QATError.Kind, _ words: [String] = [], file: StaticString = #filePath, line: UInt = #line,
    _ body: () throws -> Void
) -> String {
    do {
        try body()
        XCTFail("expected a QATError (\(kind.rawValue))", file: file, line: line)
    } catch let e as QATError {
        XCTAssertEqual(e.kind, kind, "kind of: \(e.message)", file: file, line: line)
        for w in words where !e.message.contains(w) { XCTFail("\"\(w)\" not in: \(e.message)", file: file, line: line) }
        return e.message
    } catch {
        XCTFail("expected a QATError, got \(type(of: error)): \(error)", file: file, line: line)
    }
    return ""
}
