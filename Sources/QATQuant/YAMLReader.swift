import CYaml
import Foundation
import QATCore
import Yams

/// Composing YAML from untrusted text with bounded cost.
///
/// Yams builds its node tree recursively (a deeply nested document overflows the stack)
/// and shares aliased nodes, so a "billion laughs" document is small in memory but
/// exponential for anything that walks it (key hashing, validation, re-serialising). One
/// linear pass over libyaml's events first bounds the nesting depth and the size of the
/// document with every alias expanded; only then is it handed to Yams.
public enum SafeYAML {
    /// Deepest nesting accepted (recipes nest 4–5 levels).
    public static let maxDepth = 64
    /// Most nodes accepted, counting every alias expanded (recipes have a few hundred).
    public static let maxNodes = 200_000
    /// Largest text accepted.
    public static let maxBytes = 16 << 20

    /// Checks `text` against the limits; throws a `QATError` naming `source` when it breaks
    /// one. Syntax errors are left for Yams, which reports them with more context.
    public static func check(_ text: String, source: String) throws {
        var t = text
        try t.withUTF8 { buf in
            guard buf.count <= maxBytes else {
                throw QATError("\(source): YAML text of \(buf.count) bytes is larger than the \(maxBytes)-byte limit")
            }
            var parser = yaml_parser_t()
            guard yaml_parser_initialize(&parser) == 1 else { throw QATError("\(source): cannot initialise the YAML parser") }
            defer { yaml_parser_delete(&parser) }
            yaml_parser_set_input_string(&parser, buf.baseAddress, buf.count)
            yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING)
            var anchors: [String: Int] = [:]
            // Per open collection: node count when it started, and its anchor.
            var open: [(start: Int, anchor: String?)] = []
            var nodes = 0
            func anchorName(_ p: UnsafeMutablePointer<yaml_char_t>?) -> String? {
                p.map { String(cString: UnsafeRawPointer($0).assumingMemoryBound(to: CChar.self)) }
            }
            func add(_ n: Int, line: Int) throws {
                nodes += n
                if nodes > maxNodes {
                    throw QATError(
                        "\(source), line \(line): the YAML document expands to more than \(maxNodes) nodes "
                            + "(aliases that reference aliases?); refusing it")
                }
            }
            while true {
                var event = yaml_event_t()
                guard yaml_parser_parse(&parser, &event) == 1 else { return }  // Yams reports the syntax error
                defer { yaml_event_delete(&event) }
                let line = Int(event.start_mark.line) + 1
                switch event.type {
                case YAML_STREAM_END_EVENT:
                    return
                case YAML_SCALAR_EVENT:
                    try add(1, line: line)
                    if let a = anchorName(event.data.scalar.anchor) { anchors[a] = 1 }
                case YAML_ALIAS_EVENT:
                    guard let a = anchorName(event.data.alias.anchor), let size = anchors[a] else { continue }
                    try add(size, line: line)
                case YAML_SEQUENCE_START_EVENT, YAML_MAPPING_START_EVENT:
                    try add(1, line: line)
                    guard open.count < maxDepth else {
                        throw QATError("\(source), line \(line): YAML nesting deeper than \(maxDepth) levels; refusing it")
                    }
                    let anchor =
                        event.type == YAML_SEQUENCE_START_EVENT
                        ? anchorName(event.data.sequence_start.anchor) : anchorName(event.data.mapping_start.anchor)
                    open.append((nodes - 1, anchor))
                case YAML_SEQUENCE_END_EVENT, YAML_MAPPING_END_EVENT:
                    if let o = open.popLast(), let a = o.anchor { anchors[a] = nodes - o.start }
                default:
                    break
                }
            }
        }
    }

    /// `Yams.compose` after `check`.
    public static func compose(_ text: String, source: String) throws -> Node? {
        try check(text, source: source)
        return try Yams.compose(yaml: text)
    }
}

extension Node {
    /// `int` without Yams' trap: Yams reads YAML 1.1 base-60 integers (`1:30` = 90) with
    /// unchecked multiplication, so `9223372036854775807:0` kills the process. Base-60
    /// scalars are evaluated here with overflow checks; everything else goes to Yams.
    public var safeInt: Int? {
        guard case .scalar(let s) = self else { return nil }
        let text = s.string
        guard text.contains(":") else { return int }
        var body = Substring(text)
        var negative = false
        if body.hasPrefix("-") { negative = true; body = body.dropFirst() } else if body.hasPrefix("+") { body = body.dropFirst() }
        // Yams reads a leading 0 as a radix prefix (no value with a colon); keep that.
        guard !body.isEmpty, !body.hasPrefix("0"), body.allSatisfy({ $0 == ":" || ("0"..."9").contains($0) }) else { return nil }
        var value = 0
        for part in body.split(separator: ":", omittingEmptySubsequences: false) {
            guard let d = Int(part, radix: 10), d >= 0 else { return nil }
            let (m, o1) = value.multipliedReportingOverflow(by: 60)
            let (a, o2) = m.addingReportingOverflow(d)
            if o1 || o2 { return nil }
            value = a
        }
        return negative ? -value : value
    }
}

/// Typed, strict access to a YAML mapping with errors that name the file, the key path and
/// the line. Every key read is recorded, so `finish()` can reject keys nobody read (typos).
public final class YAMLMap {
    public let node: Node
    public let path: String
    public let source: String
    private let mapping: Node.Mapping
    private var used: Set<String> = []

    public init(_ node: Node, path: String, source: String) throws {
        guard case .mapping(let m) = node else {
            throw YAMLMap.error(source, path, node, "expected a mapping (key: value lines), found \(YAMLMap.describe(node))")
        }
        self.node = node; self.path = path; self.source = source; mapping = m
    }

    /// Parses YAML text whose top level must be a mapping.
    public static func parse(_ text: String, source: String) throws -> YAMLMap {
        let node: Node?
        do { node = try SafeYAML.compose(text, source: source) } catch let e as QATError { throw e } catch {
            throw QATError("\(source): not valid YAML: \(error)")
        }
        guard let node else { throw QATError("\(source): the file is empty") }
        return try YAMLMap(node, path: "", source: source)
    }

    public var keys: [String] { mapping.compactMap { $0.key.string } }
    public func has(_ key: String) -> Bool { raw(key) != nil }
    /// Whether the key is present with a non-null value.
    public func hasValue(_ key: String) -> Bool { raw(key).map { !YAMLMap.isNull($0) } ?? false }

    public func raw(_ key: String) -> Node? {
        mapping.first { $0.key.string == key }?.value
    }

    public func full(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    public func fail(_ key: String, _ message: String) -> QATError {
        YAMLMap.error(source, full(key), raw(key) ?? node, message)
    }

    private func take(_ key: String) -> Node? {
        used.insert(key)
        guard let v = raw(key), !YAMLMap.isNull(v) else { return nil }
        return v
    }

    public func string(_ key: String) throws -> String? {
        guard let v = take(key) else { return nil }
        guard case .scalar(let s) = v else { throw fail(key, "expected a string, found \(YAMLMap.describe(v))") }
        return s.string
    }

    public func int(_ key: String, min lo: Int? = nil, max hi: Int? = nil) throws -> Int? {
        guard let v = take(key) else { return nil }
        guard case .scalar = v, let i = v.safeInt else { throw fail(key, "expected an integer, found \(YAMLMap.describe(v))") }
        if let lo, i < lo { throw fail(key, "must be ≥ \(lo) (got \(i))") }
        if let hi, i > hi { throw fail(key, "must be ≤ \(hi) (got \(i))") }
        return i
    }

    public func double(_ key: String, min lo: Double? = nil, max hi: Double? = nil) throws -> Double? {
        guard let v = take(key) else { return nil }
        guard case .scalar = v, let d = v.float ?? v.safeInt.map(Double.init) else {
            throw fail(key, "expected a number, found \(YAMLMap.describe(v))")
        }
        if !d.isFinite { throw fail(key, "must be finite (got \(d))") }
        if let lo, d < lo { throw fail(key, "must be ≥ \(lo) (got \(d))") }
        if let hi, d > hi { throw fail(key, "must be ≤ \(hi) (got \(d))") }
        return d
    }

    public func bool(_ key: String) throws -> Bool? {
        guard let v = take(key) else { return nil }
        guard case .scalar = v, let b = v.bool else { throw fail(key, "expected true or false, found \(YAMLMap.describe(v))") }
        return b
    }

    public func choice(_ key: String, _ allowed: [String]) throws -> String? {
        guard let s = try string(key) else { return nil }
        guard allowed.contains(s) else { throw fail(key, "must be one of \(allowed.joined(separator: ", ")) (got \"\(s)\")") }
        return s
    }

    public func strings(_ key: String) throws -> [String]? {
        guard let v = take(key) else { return nil }
        if case .scalar(let s) = v { return [s.string] }
        guard case .sequence(let seq) = v else { throw fail(key, "expected a list of strings, found \(YAMLMap.describe(v))") }
        return try seq.map { item in
            guard case .scalar(let s) = item else {
                throw YAMLMap.error(source, full(key), item, "expected a string list item, found \(YAMLMap.describe(item))")
            }
            return s.string
        }
    }

    public func doubles(_ key: String) throws -> [Double]? {
        guard let v = take(key) else { return nil }
        guard case .sequence(let seq) = v else { throw fail(key, "expected a list of numbers, found \(YAMLMap.describe(v))") }
        return try seq.map { item in
            guard let d = item.float ?? item.safeInt.map(Double.init) else {
                throw YAMLMap.error(source, full(key), item, "expected a number, found \(YAMLMap.describe(item))")
            }
            return d
        }
    }

    /// A nested mapping (nil when absent or null).
    public func map(_ key: String) throws -> YAMLMap? {
        guard let v = take(key) else { return nil }
        return try YAMLMap(v, path: full(key), source: source)
    }

    /// The raw node, marked as read (for sub-parsers with their own schema).
    public func node(_ key: String) -> Node? { take(key) }

    /// Rejects keys that were never read: a typo'd key is an error, not a silent default.
    public func finish(known extra: [String] = []) throws {
        for (k, _) in mapping {
            guard let name = k.string else { throw YAMLMap.error(source, path, k, "keys must be strings") }
            if !used.contains(name) && !extra.contains(name) {
                let known = (Array(used) + extra).sorted()
                let hint = YAMLMap.closest(name, known).map { " (did you mean \"\($0)\"?)" } ?? ""
                throw YAMLMap.error(
                    source, full(name), k, "unknown key \"\(name)\"\(hint); known keys here: \(known.joined(separator: ", "))")
            }
        }
    }

    public static func isNull(_ n: Node) -> Bool {
        // A quoted 'null' is a string; a plain (or constructed) null is null.
        if case .scalar(let s) = n { return n.null != nil && s.style != .singleQuoted && s.style != .doubleQuoted }
        return false
    }

    public static func describe(_ n: Node) -> String {
        switch n {
        case .scalar(let s): return "\"\(s.string)\""
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .alias: return "an alias"
        }
    }

    public static func line(_ n: Node) -> Int? { n.mark?.line }

    public static func error(_ source: String, _ key: String, _ node: Node, _ message: String) -> QATError {
        let at = line(node).map { ", line \($0)" } ?? ""
        return QATError("\(source)\(at): \(key.isEmpty ? "" : "\(key): ")\(message)")
    }

    /// The known key at the smallest edit distance (≤ 3), for "did you mean".
    static func closest(_ word: String, _ candidates: [String]) -> String? {
        func distance(_ a: [Character], _ b: [Character]) -> Int {
            var prev = Array(0...b.count)
            for i in 1...max(a.count, 1) where !a.isEmpty {
                var cur = [i] + Array(repeating: 0, count: b.count)
                for j in 1...max(b.count, 1) where !b.isEmpty {
                    cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
                }
                prev = cur
            }
            return prev[b.count]
        }
        let w = Array(word)
        return candidates.map { ($0, distance(w, Array($0))) }.filter { $0.1 <= 3 }.min { $0.1 < $1.1 }?.0
    }
}
