/// The one error type users see: every failure on user input becomes a `QATError` with a
/// message that says what is wrong and, where possible, what to do next.
public struct QATError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
