import Foundation

/// Streams decoded text: bytes are held back while they end in an incomplete UTF-8
/// character (a character split between tokens), and text while it could still become a
/// stop string; invalid bytes become U+FFFD, as `tokenizers` decodes them.
public struct TextStream {
    public let stops: [String]
    public private(set) var text = ""
    public private(set) var stopped = false
    private var pending: [UInt8] = []
    private var emitted = 0  // characters of `text` already handed out

    public init(stops: [String]) { self.stops = stops.filter { !$0.isEmpty } }

    /// Length of the longest prefix of `b` that ends on a character boundary (an incomplete
    /// trailing sequence of at most 3 bytes is held back).
    public static func completePrefix(_ b: [UInt8]) -> Int {
        var i = b.count - 1, back = 0
        while i >= 0 && back < 4 {
            let c = b[i]
            if c & 0xC0 != 0x80 {
                let need = c < 0x80 ? 1 : c & 0xE0 == 0xC0 ? 2 : c & 0xF0 == 0xE0 ? 3 : c & 0xF8 == 0xF0 ? 4 : 1
                return b.count - i >= need ? b.count : i
            }
            i -= 1; back += 1
        }
        return b.count
    }

    public mutating func push(_ bytes: [UInt8]) -> String? {
        guard !stopped else { return nil }
        pending += bytes
        let n = Self.completePrefix(pending)
        if n > 0 {
            text += String(decoding: pending[..<n], as: UTF8.self)
            pending.removeFirst(n)
        }
        if let r = stops.compactMap({ text.range(of: $0) }).min(by: { $0.lowerBound < $1.lowerBound }) {
            text = String(text[..<r.lowerBound])
            stopped = true
            pending = []
        }
        return take(final: stopped)
    }

    public mutating func finish() -> String? {
        if !pending.isEmpty { text += String(decoding: pending, as: UTF8.self); pending = [] }
        return take(final: true)
    }

    private mutating func take(final: Bool) -> String? {
        let hold = final ? 0 : max(0, (stops.map(\.count).max() ?? 0) - 1)
        let upTo = max(emitted, text.count - hold)
        guard upTo > emitted else { return nil }
        let s = text.index(text.startIndex, offsetBy: emitted), e = text.index(text.startIndex, offsetBy: upTo)
        emitted = upTo
        return String(text[s..<e])
    }
}
