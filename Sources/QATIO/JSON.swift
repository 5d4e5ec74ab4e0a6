import QATCore

/// A JSON value that round-trips Hugging Face files byte for byte.
///
/// Two properties matter more than convenience here:
/// - objects keep their key order (`JSONObject` is an ordered list, not a dictionary), because
///   a rewritten config.json must differ from the original only where we changed it;
/// - parsed floating-point numbers keep their original text (`1e-05`, `10000.0`), because
///   re-printing a Double can legitimately choose another spelling.
public indirect enum JSONValue: Sendable, CustomStringConvertible {
    case null
    case bool(Bool)
    case int(Int64)
    /// `text` is the spelling read from the file (nil for values created in code, which are
    /// printed the way Python's `repr(float)` would print them).
    case double(Double, text: String? = nil)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    /// Pretty form (Python `json.dumps(indent=2)`), for debugging output.
    public var description: String { serialized() }

    /// A short name of the kind of value, for error messages ("a string", "an object", …).
    public var kindName: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case .int: return "an integer"
        case .double: return "a float"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }

    public var isNull: Bool { if case .null = self { return true } else { return false } }

    /// The value as an integer: JSON integers, and floats only when they are integral and in
    /// range (Python writes `2048` for ints, but hand-edited configs sometimes say `2048.0`).
    public var intValue: Int? {
        switch self {
        case .int(let i): return Int(exactly: i)
        case .double(let d, _): return d.isFinite && d.rounded() == d ? Int(exactly: d) : nil
        default: return nil
        }
    }

    /// The value as a Double: floats, and integers (`"rope_theta": 10000` is a valid float).
    public var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d, _): return d
        default: return nil
        }
    }

    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { return a } else { return nil } }
    public var objectValue: JSONObject? { if case .object(let o) = self { return o } else { return nil } }

    /// Object member access; setting `nil` removes the key, setting a new key appends it.
    /// Setting on a non-object is a programming error and is ignored.
    public subscript(key: String) -> JSONValue? {
        get { objectValue?[key] }
        set {
            guard case .object(var o) = self else { return }
            o[key] = newValue
            self = .object(o)
        }
    }

    /// A short rendering for error messages (long values are cut).
    var brief: String {
        let s = serialized(indent: nil)
        return s.count > 60 ? String(s.prefix(57)) + "..." : s
    }
}

extension JSONValue: Equatable {
    /// Numbers compare by value, not by spelling: `1e-05` read from a file equals `1e-5`
    /// created in code. An integer never equals a float (Python would print them differently).
    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case (.bool(let x), .bool(let y)): return x == y
        case (.int(let x), .int(let y)): return x == y
        case (.double(let x, _), .double(let y, _)): return x == y || (x.isNaN && y.isNaN)
        case (.string(let x), .string(let y)): return x == y
        case (.array(let x), .array(let y)): return x == y
        case (.object(let x), .object(let y)): return x == y
        default: return false
        }
    }
}

extension JSONValue: ExpressibleByNilLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByStringLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral
{
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    /// Dictionary literals keep their written order (they are lists of pairs underneath).
    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self = .object(JSONObject(elements.map { (key: $0.0, value: $0.1) }))
    }
}

extension JSONValue {
    public init(_ value: Int) { self = .int(Int64(value)) }
    public init(_ value: Double) { self = .double(value) }
    public init(_ value: String) { self = .string(value) }
    public init(_ value: Bool) { self = .bool(value) }
}

/// A JSON object whose members keep their order.
///
/// Lookup is linear: HF configs have a few dozen keys, and safetensors headers are only
/// iterated in order, so a hash index would cost more than it saves. `path` and `source`
/// only feed error messages ("config.json: rope_parameters.rope_theta: …") and take no part
/// in equality.
public struct JSONObject: Sendable, Equatable, Sequence, ExpressibleByDictionaryLiteral {
    public private(set) var entries: [(key: String, value: JSONValue)]
    /// Dotted key path of this object inside its document ("" at the root).
    public var path: String
    /// Where the document came from (a file path), or "" when unknown.
    public var source: String

    public init() { self.init([]) }

    public init(_ entries: [(key: String, value: JSONValue)], path: String = "", source: String = "") {
        self.entries = entries
        self.path = path
        self.source = source
    }

    public init(dictionaryLiteral elements: (String, JSONValue)...) {
        self.init(elements.map { (key: $0.0, value: $0.1) })
    }

    public static func == (a: JSONObject, b: JSONObject) -> Bool {
        a.entries.count == b.entries.count
            && zip(a.entries, b.entries).allSatisfy { $0.key == $1.key && $0.value == $1.value }
    }

    public var count: Int { entries.count }
    public var isEmpty: Bool { entries.isEmpty }
    public var keys: [String] { entries.map(\.key) }

    public func makeIterator() -> IndexingIterator<[(key: String, value: JSONValue)]> { entries.makeIterator() }

    public func index(of key: String) -> Int? { entries.firstIndex { $0.key == key } }
    public func contains(_ key: String) -> Bool { index(of: key) != nil }

    /// Get a member; set one in place (existing key), append it (new key) or remove it (`nil`).
    public subscript(key: String) -> JSONValue? {
        get { index(of: key).map { entries[$0].value } }
        set {
            if let v = newValue { set(key, v) } else { remove(key) }
        }
    }

    /// Replaces the value of an existing key where it stands, or appends a new key at the end,
    /// as Python's dict assignment does.
    public mutating func set(_ key: String, _ value: JSONValue) {
        if let i = index(of: key) { entries[i].value = value } else { entries.append((key: key, value: value)) }
    }

    /// Inserts a new key right after `after` (at the end when `after` is missing); an existing
    /// key is updated in place instead.
    public mutating func insert(_ key: String, _ value: JSONValue, after: String) {
        if let i = index(of: key) { entries[i].value = value; return }
        if let j = index(of: after) {
            entries.insert((key: key, value: value), at: j + 1)
        } else {
            entries.append((key: key, value: value))
        }
    }

    @discardableResult
    public mutating func remove(_ key: String) -> JSONValue? {
        guard let i = index(of: key) else { return nil }
        return entries.remove(at: i).value
    }

    // MARK: - Typed accessors

    /// "source: a.b.key" for messages.
    func where_(_ key: String) -> String {
        let p = path.isEmpty ? key : "\(path).\(key)"
        return source.isEmpty ? "\"\(p)\"" : "\(source): \"\(p)\""
    }

    func missing(_ key: String) -> QATError { QATError("\(where_(key)) is missing") }
    func wrongType(_ key: String, _ expected: String, _ found: JSONValue) -> QATError {
        QATError("\(where_(key)) must be \(expected), found \(found.kindName) \(found.brief)")
    }

    /// The member, throwing when it is absent.
    public func value(_ key: String) throws -> JSONValue {
        guard let v = self[key] else { throw missing(key) }
        return v
    }

    /// The member when present and not `null` (HF writes `null` for "unset").
    public func optionalValue(_ key: String) -> JSONValue? {
        guard let v = self[key], !v.isNull else { return nil }
        return v
    }

    public func int(_ key: String) throws -> Int {
        let v = try value(key)
        guard let i = v.intValue else { throw wrongType(key, "an integer", v) }
        return i
    }

    public func optionalInt(_ key: String) throws -> Int? {
        guard let v = optionalValue(key) else { return nil }
        guard let i = v.intValue else { throw wrongType(key, "an integer", v) }
        return i
    }

    public func double(_ key: String) throws -> Double {
        let v = try value(key)
        guard let d = v.doubleValue else { throw wrongType(key, "a number", v) }
        return d
    }

    public func optionalDouble(_ key: String) throws -> Double? {
        guard let v = optionalValue(key) else { return nil }
        guard let d = v.doubleValue else { throw wrongType(key, "a number", v) }
        return d
    }

    public func string(_ key: String) throws -> String {
        let v = try value(key)
        guard let s = v.stringValue else { throw wrongType(key, "a string", v) }
        return s
    }

    public func optionalString(_ key: String) throws -> String? {
        guard let v = optionalValue(key) else { return nil }
        guard let s = v.stringValue else { throw wrongType(key, "a string", v) }
        return s
    }

    public func bool(_ key: String) throws -> Bool {
        let v = try value(key)
        guard let b = v.boolValue else { throw wrongType(key, "true or false", v) }
        return b
    }

    public func optionalBool(_ key: String) throws -> Bool? {
        guard let v = optionalValue(key) else { return nil }
        guard let b = v.boolValue else { throw wrongType(key, "true or false", v) }
        return b
    }

    public func array(_ key: String) throws -> [JSONValue] {
        let v = try value(key)
        guard let a = v.arrayValue else { throw wrongType(key, "an array", v) }
        return a
    }

    public func optionalArray(_ key: String) throws -> [JSONValue]? {
        guard let v = optionalValue(key) else { return nil }
        guard let a = v.arrayValue else { throw wrongType(key, "an array", v) }
        return a
    }

    /// A nested object; its `path` extends this one's so that errors inside it name the full
    /// key path (`rope_parameters.rope_theta`).
    public func object(_ key: String) throws -> JSONObject {
        let v = try value(key)
        guard var o = v.objectValue else { throw wrongType(key, "an object", v) }
        o.path = path.isEmpty ? key : "\(path).\(key)"
        o.source = source
        return o
    }

    public func optionalObject(_ key: String) throws -> JSONObject? {
        guard optionalValue(key) != nil else { return nil }
        return try object(key)
    }

    /// An array of integers (e.g. `eos_token_id: [1, 2]`); a single integer becomes a
    /// one-element array because HF allows both spellings.
    public func ints(_ key: String) throws -> [Int] {
        let v = try value(key)
        if let i = v.intValue { return [i] }
        guard let a = v.arrayValue else { throw wrongType(key, "an integer or an array of integers", v) }
        return try a.enumerated().map { (n, e) in
            guard let i = e.intValue else { throw wrongType("\(key)[\(n)]", "an integer", e) }
            return i
        }
    }

    public func strings(_ key: String) throws -> [String] {
        let a = try array(key)
        return try a.enumerated().map { (n, e) in
            guard let s = e.stringValue else { throw wrongType("\(key)[\(n)]", "a string", e) }
            return s
        }
    }

    /// Follows a dotted path (`"rope_parameters.rope_theta"`); nil when any step is missing.
    public func value(atPath dotted: String) -> JSONValue? {
        var cur: JSONValue = .object(self)
        for part in dotted.split(separator: ".", omittingEmptySubsequences: false) {
            guard let next = cur[String(part)] else { return nil }
            cur = next
        }
        return cur
    }
}
