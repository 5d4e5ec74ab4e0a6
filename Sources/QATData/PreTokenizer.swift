import Foundation

/// The character classes the GPT-2 family of split patterns test, for one unicode scalar.
///
/// `\p{L}` is general category L*, `\p{N}` is N* (Nd, Nl, No), and `\s` is the Unicode
/// White_Space property — what Oniguruma (the regex engine of Hugging Face `tokenizers`)
/// means by them on UTF-8 text. ASCII, nearly all of English text, goes through a table.
@usableFromInline
struct ScalarClass: OptionSet, Sendable {
    @usableFromInline let rawValue: UInt8
    @inlinable init(rawValue: UInt8) { self.rawValue = rawValue }
    static let letter = ScalarClass(rawValue: 1)
    static let number = ScalarClass(rawValue: 2)
    static let space = ScalarClass(rawValue: 4)
    /// `\r` or `\n` (also `space`).
    static let newline = ScalarClass(rawValue: 8)

    private static let ascii: [ScalarClass] = (0..<128).map { slowClass(Unicode.Scalar(UInt8($0))) }

    @inline(__always)
    static func of(_ s: Unicode.Scalar) -> ScalarClass {
        s.value < 128 ? ascii[Int(s.value)] : slowClass(s)
    }

    static func slowClass(_ s: Unicode.Scalar) -> ScalarClass {
        if s == "\r" || s == "\n" { return [.space, .newline] }
        let p = s.properties
        if p.isWhitespace { return .space }
        switch p.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return .letter
        case .decimalNumber, .letterNumber, .otherNumber: return .number
        default: return []
        }
    }
}

/// A split pattern of a `Split` pre-tokenizer (or ByteLevel's built-in GPT-2 regex).
///
/// The three patterns that byte-level BPE models actually ship (GPT-2; Llama-3, which
/// also covers Qwen2/Qwen3 with single digits) are recognised by their exact text and run
/// by hand-written scanners over unicode scalars: NSRegularExpression on Linux is ICU over
/// UTF-16 with bridging per call and took minutes on the 2.7 MB fortune corpus, and ICU's
/// `\s` also differs from Oniguruma's (it lacks U+000B and U+0085). Any other regex falls
/// back to NSRegularExpression — slower, but an exact regex engine rather than a guess.
enum SplitPattern {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    case gpt2
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// with `maxDigits` 3 (Llama-3) or 1 (`\p{N}`, Qwen2).
    case llama3(maxDigits: Int)
    case literal([Unicode.Scalar])
    case regex(NSRegularExpression)

    static let gpt2Source = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3Source =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Source =
        #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// The scanner for a regex source: a hand-written one when known, else ICU.
    static func regex(_ source: String) throws -> SplitPattern {
        switch source {
        case gpt2Source: return .gpt2
        case llama3Source: return .llama3(maxDigits: 3)
        case qwen2Source: return .llama3(maxDigits: 1)
        default:
            do { return .regex(try NSRegularExpression(pattern: source)) } catch {
                throw QATError("tokenizer.json: Split pattern is not a regex this platform can compile: \(source) (\(error))")
            }
        }
    }

    /// Calls `emit` with each match of the pattern in `s` (indices of `s`), left to right.
    func matches(_ s: ArraySlice<Unicode.Scalar>, _ emit: (Range<Int>) -> Void) {
        switch self {
        case .gpt2: Self.scanGPT2(s, emit)
        case .llama3(let maxDigits): Self.scanLlama3(s, maxDigits: maxDigits, emit)
        case .literal(let needle): Self.scanLiteral(s, needle, emit)
        case .regex(let re): Self.scanRegex(s, re, emit)
        }
    }

    // MARK: Scanners

    /// `'s|'t|'re|'ve|'m|'ll|'d` at `i`: the match length, or 0. Regex alternation is
    /// ordered, but no contraction is a prefix of another, so order does not matter here.
    @inline(__always)
    private static func contraction(_ s: ArraySlice<Unicode.Scalar>, _ i: Int, caseInsensitive: Bool) -> Int {
        guard s[i] == "'", i + 1 < s.endIndex else { return 0 }
        func lower(_ c: Unicode.Scalar) -> Unicode.Scalar {
            guard caseInsensitive else { return c }
            if c.value >= 65 && c.value <= 90 { return Unicode.Scalar(c.value + 32)! }
            if c == "\u{17F}" { return "s" }  // ſ case-folds to s under Unicode (?i)
            return c
        }
        let a = lower(s[i + 1])
        if a == "s" || a == "t" || a == "m" || a == "d" { return 2 }
        guard i + 2 < s.endIndex else { return 0 }
        let b = lower(s[i + 2])
        if (a == "r" && b == "e") || (a == "v" && b == "e") || (a == "l" && b == "l") { return 3 }
        return 0
    }

    /// End of the run of scalars from `i` whose class satisfies `pred`.
    @inline(__always)
    private static func run(_ s: ArraySlice<Unicode.Scalar>, from i: Int, _ pred: (ScalarClass) -> Bool) -> Int {
        var j = i
        while j < s.endIndex && pred(ScalarClass.of(s[j])) { j += 1 }
        return j
    }

    @inline(__always) private static func isOther(_ c: ScalarClass) -> Bool { c.isEmpty }

    /// `\s+(?!\S)|\s+` at whitespace position `i`: the greedy run backs off one scalar when
    /// a non-space follows it (so that scalar can lead the next word), unless that would
    /// leave nothing, in which case plain `\s+` takes the whole run.
    @inline(__always)
    private static func whitespace(_ s: ArraySlice<Unicode.Scalar>, _ i: Int) -> Int {
        let e = run(s, from: i) { $0.contains(.space) }
        if e == s.endIndex || e - i < 2 { return e }
        return e - 1
    }

    static func scanGPT2(_ s: ArraySlice<Unicode.Scalar>, _ emit: (Range<Int>) -> Void) {
        var i = s.startIndex
        let n = s.endIndex
        while i < n {
            var end: Int
            let c = contraction(s, i, caseInsensitive: false)
            if c > 0 {
                end = i + c
            } else {
                let j = (s[i] == " " && i + 1 < n) ? i + 1 : i
                let cj = ScalarClass.of(s[j])
                if cj.contains(.letter) {
                    end = run(s, from: j) { $0.contains(.letter) }
                } else if cj.contains(.number) {
                    end = run(s, from: j) { $0.contains(.number) }
                } else if isOther(cj) {
                    end = run(s, from: j, isOther)
                } else {
                    // s[i] is whitespace (a lone trailing " " has j == i and is space too).
                    end = whitespace(s, i)
                }
            }
            emit(i..<end)
            i = end
        }
    }

    static func scanLlama3(_ s: ArraySlice<Unicode.Scalar>, maxDigits: Int, _ emit: (Range<Int>) -> Void) {
        var i = s.startIndex
        let n = s.endIndex
        while i < n {
            var end: Int
            let ci = ScalarClass.of(s[i])
            let c = contraction(s, i, caseInsensitive: true)
            if c > 0 {
                end = i + c
            } else if ci.contains(.letter) {
                // [^\r\n\p{L}\p{N}]?\p{L}+ with the optional part empty.
                end = run(s, from: i) { $0.contains(.letter) }
            } else if !ci.contains(.newline) && !ci.contains(.number) && i + 1 < n && ScalarClass.of(s[i + 1]).contains(.letter) {
                // ... with one leading non-letter, non-digit, non-newline scalar.
                end = run(s, from: i + 1) { $0.contains(.letter) }
            } else if ci.contains(.number) {
                let e = run(s, from: i) { $0.contains(.number) }
                end = min(e, i + maxDigits)
            } else if isOther(ci) || (s[i] == " " && i + 1 < n && isOther(ScalarClass.of(s[i + 1]))) {
                // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
                let j = isOther(ci) ? i : i + 1
                let e = run(s, from: j, isOther)
                end = run(s, from: e) { $0.contains(.newline) }
            } else {
                // Whitespace. `\s*[\r\n]+`: up to and including the last newline of the run.
                let e = run(s, from: i) { $0.contains(.space) }
                var k = e - 1
                while k >= i && !ScalarClass.of(s[k]).contains(.newline) { k -= 1 }
                end = k >= i ? k + 1 : whitespace(s, i)
            }
            emit(i..<end)
            i = end
        }
    }

    static func scanLiteral(_ s: ArraySlice<Unicode.Scalar>, _ needle: [Unicode.Scalar], _ emit: (Range<Int>) -> Void) {
        guard let first = needle.first else { return }
        var i = s.startIndex
        while i + needle.count <= s.endIndex {
            if s[i] == first && s[i..<(i + needle.count)].elementsEqual(needle) {
                emit(i..<(i + needle.count))
                i += needle.count
            } else {
                i += 1
            }
        }
    }

    static func scanRegex(_ s: ArraySlice<Unicode.Scalar>, _ re: NSRegularExpression, _ emit: (Range<Int>) -> Void) {
        var view = String.UnicodeScalarView()
        view.append(contentsOf: s)
        let str = String(view)
        // UTF-16 offset → scalar index, to map NSRange back onto `s`.
        var utf16ToScalar = [Int](repeating: 0, count: str.utf16.count + 1)
        var u = 0
        for (k, sc) in s.enumerated() {
            let w = sc.value > 0xFFFF ? 2 : 1
            for d in 0..<w { utf16ToScalar[u + d] = s.startIndex + k }
            u += w
        }
        utf16ToScalar[u] = s.endIndex
        for m in re.matches(in: str, range: NSRange(location: 0, length: u)) where m.range.length > 0 {
            emit(utf16ToScalar[m.range.location]..<utf16ToScalar[m.range.location + m.range.length])
        }
    }
}

/// One step of the pre-tokenizer pipeline, applied to each piece the previous step made.
enum PreTokenizerStep {
    /// `Split`: with `removeMatches` false (behavior Isolated) both the matches and the
    /// text between them become pieces; with true (behavior Removed) only the text between.
    case split(SplitPattern, removeMatches: Bool)
    /// `ByteLevel`: optionally a space in front of each piece that lacks one, then (with
    /// `useRegex`) the GPT-2 split. The byte-to-unicode mapping itself happens in the model.
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)

    /// Runs the steps from `index` on `piece`, calling `emit` with each final piece.
    static func run(
        _ steps: [PreTokenizerStep], from index: Int, on piece: ArraySlice<Unicode.Scalar>,
        _ emit: (ArraySlice<Unicode.Scalar>) -> Void
    ) {
        if piece.isEmpty { return }
        guard index < steps.count else { emit(piece); return }
        switch steps[index] {
        case .split(let pattern, let remove):
            var last = piece.startIndex
            pattern.matches(piece) { r in
                if r.lowerBound > last { run(steps, from: index + 1, on: piece[last..<r.lowerBound], emit) }
                if !remove { run(steps, from: index + 1, on: piece[r], emit) }
                last = r.upperBound
            }
            if last < piece.endIndex { run(steps, from: index + 1, on: piece[last...], emit) }
        case .byteLevel(let addPrefixSpace, let useRegex):
            var p = piece
            if addPrefixSpace && p.first != " " { p = ArraySlice([" "] + Array(p)) }
            if useRegex {
                SplitPattern.scanGPT2(p) { r in run(steps, from: index + 1, on: p[r], emit) }
            } else {
                run(steps, from: index + 1, on: p, emit)
            }
        }
    }
}

/// The split step on its own, public for tests and for inspecting how text is cut.
public enum PreTokenizerSplit {
    /// The pieces `pattern` cuts `text` into (matches and the text between them), using
    /// the hand-written scanner when the pattern is a known one.
    public static func pieces(_ text: String, pattern: String) throws -> [String] {
        try pieces(text, SplitPattern.regex(pattern))
    }

    /// The same with ICU's NSRegularExpression forced, the reference the scanners are
    /// tested against (ICU's `\s` lacks U+000B and U+0085; avoid them when comparing).
    public static func piecesWithICU(_ text: String, pattern: String) throws -> [String] {
        try pieces(text, .regex(NSRegularExpression(pattern: pattern)))
    }

    private static func pieces(_ text: String, _ p: SplitPattern) -> [String] {
        let scalars = Array(text.unicodeScalars)
        var out: [String] = []
        PreTokenizerStep.run([.split(p, removeMatches: false)], from: 0, on: scalars[...]) { piece in
            var v = String.UnicodeScalarView()
            v.append(contentsOf: piece)
            out.append(String(v))
        }
        return out
    }
}
