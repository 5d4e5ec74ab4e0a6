/// The one error type users see: every failure becomes a `QATError` with a one-line message
/// that says what is wrong and, where possible, what to do next, and a `kind` that says
/// whose move it is (tests assert the kind plus the message's key words).
public struct QATError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: String, Sendable, CaseIterable {
        /// The user's input is wrong: a recipe value, a flag, a malformed or inconsistent file.
        case userInput = "user input"
        /// The system failed us: open, read, write, rename, fsync, mmap, MPI.
        case io = "I/O"
        /// Well-formed input that qat does not handle (a model family, a tokenizer type, a
        /// combination of options).
        case unsupported
        /// A broken invariant of qat itself: a bug to report.
        case `internal`
    }

    public let kind: Kind
    public let message: String

    /// Most failures are bad input, hence the default kind.
    public init(_ message: String, kind: Kind = .userInput) { self.kind = kind; self.message = message }

    public static func io(_ message: String) -> QATError { QATError(message, kind: .io) }
    public static func unsupported(_ message: String) -> QATError { QATError(message, kind: .unsupported) }
    public static func `internal`(_ message: String) -> QATError { QATError(message, kind: .internal) }

    /// The same failure with context in front (`"path: " + message`), keeping its kind.
    public func prefixed(_ context: String) -> QATError { QATError(context + message, kind: kind) }

    public var description: String { message }
}
