import Foundation
import QATCore
import Yams

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
        do { node = try Yams.compose(yaml: text) } catch {
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
        guard case .scalar = v, let i = v.int else { throw fail(key, "expected an integer, found \(YAMLMap.describe(v))") }
        if let lo, i < lo { throw fail(key, "must be ≥ \(lo) (got \(i))") }
        if let hi, i > hi { throw fail(key, "must be ≤ \(hi) (got \(i))") }
        return i
    }

    public func double(_ key: String, min lo: Double? = nil, max hi: Double? = nil) throws -> Double? {
        guard let v = take(key) else { return nil }
        guard case .scalar = v, let d = v.float ?? v.int.map(Double.init) else {
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
            guard case .scalar(let s) = item else { throw YAMLMap.error(source, full(key), item, "expected a string list item, found \(YAMLMap.describe(item))") }
            return s.string
        }
    }

    public func doubles(_ key: String) throws -> [Double]? {
        guard let v = take(key) else { return nil }
        guard case .sequence(let seq) = v else { throw fail(key, "expected a list of numbers, found \(YAMLMap.describe(v))") }
        return try seq.map { item in
            guard let d = item.float ?? item.int.map(Double.init) else {
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
                throw YAMLMap.error(source, full(name), k, "unknown key \"\(name)\"\(hint); known keys here: \(known.joined(separator: ", "))")
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
