import Foundation
import QATCore
import QATIO

/// A model's chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja)
/// rendered as transformers' `apply_chat_template(..., add_generation_prompt=True)` does, for
/// the Jinja subset the Llama, Mistral and Qwen templates use:
/// `{{ }}`, `{% if/elif/else/endif %}`, `{% for x in xs %}` (with `loop.first/last/index/index0`
/// and an `if` filter), `{% set %}` (also `ns.attr`), `{# #}`, `-` whitespace control,
/// literals, `messages[0]['role']`, `m.role`, slices, `+ - * / %` `~`, comparisons, `and or not`,
/// `in`, `is [not] defined/none/string/number/mapping/sequence`, filters `trim length tojson
/// string lower upper first last`, methods `strip lstrip rstrip startswith endswith split
/// lower upper get items`, `namespace()` and `raise_exception()`. Anything else is a clear
/// "unsupported template" error, never a wrong prompt.
public struct ChatTemplate {
    public let source: String
    public var bosToken = ""
    public var eosToken = ""

    public init(source: String) { self.source = source }

    /// The template of a model directory: chat_template.jinja, else tokenizer_config.json's
    /// `chat_template` (a string, or a list of named templates: "default").
    public static func load(directory: String) throws -> ChatTemplate {
        let jinja = "\(directory)/chat_template.jinja"
        let cfgPath = "\(directory)/tokenizer_config.json"
        let cfg = FileManager.default.fileExists(atPath: cfgPath) ? try JSONValue.parseObject(file: cfgPath) : JSONObject()
        var text: String? = nil
        if FileManager.default.fileExists(atPath: jinja) { text = String(decoding: try readFile(jinja), as: UTF8.self) }
        if text == nil, let v = cfg.optionalValue("chat_template") {
            if let s = v.stringValue { text = s }
            if let a = v.arrayValue {
                text = a.compactMap(\.objectValue).first { $0["name"]?.stringValue == "default" }?["template"]?.stringValue
            }
        }
        guard let text else {
            throw QATError(
                "\(directory) has no chat template (no chat_template in tokenizer_config.json, no chat_template.jinja): drop --chat")
        }
        var t = ChatTemplate(source: text)
        func token(_ key: String) -> String {
            guard let v = cfg.optionalValue(key) else { return "" }
            return v.stringValue ?? v.objectValue?["content"]?.stringValue ?? ""
        }
        t.bosToken = token("bos_token"); t.eosToken = token("eos_token")
        return t
    }

    /// The prompt for one user message, ending with the assistant's generation prompt.
    public func render(user: String) throws -> String {
        let message: JinjaValue = .dict([("role", .string("user")), ("content", .string(user))])
        return try render(messages: [message])
    }

    public func render(messages: [JinjaValue]) throws -> String {
        var parser = JinjaParser(source)
        let nodes = try parser.parse()
        var ctx = JinjaContext()
        ctx.scopes = [
            [
                "messages": .list(messages), "add_generation_prompt": .bool(true), "bos_token": .string(bosToken),
                "eos_token": .string(eosToken), "tools": .none, "documents": .none,
            ]
        ]
        var out = ""
        try ctx.run(nodes, into: &out)
        return out
    }
}

/// A Jinja value.
public indirect enum JinjaValue: Equatable {
    case none, undefined
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case list([JinjaValue])
    case dict([(String, JinjaValue)])
    case namespace(Int)

    public static func == (a: JinjaValue, b: JinjaValue) -> Bool {
        switch (a, b) {
        case (.none, .none), (.undefined, .undefined): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.int(x), .int(y)): return x == y
        case let (.double(x), .double(y)): return x == y
        case let (.int(x), .double(y)), let (.double(y), .int(x)): return Double(x) == y
        case let (.string(x), .string(y)): return x == y
        case let (.list(x), .list(y)): return x == y
        case let (.dict(x), .dict(y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case let (.namespace(x), .namespace(y)): return x == y
        default: return false
        }
    }

    var truthy: Bool {
        switch self {
        case .none, .undefined: return false
        case .bool(let b): return b
        case .int(let i): return i != 0
        case .double(let d): return d != 0
        case .string(let s): return !s.isEmpty
        case .list(let l): return !l.isEmpty
        case .dict(let d): return !d.isEmpty
        case .namespace: return true
        }
    }

    var text: String {
        switch self {
        case .none: return "None"
        case .undefined: return ""
        case .bool(let b): return b ? "True" : "False"
        case .int(let i): return String(i)
        case .double(let d): return String(d)
        case .string(let s): return s
        case .list, .dict, .namespace: return json
        }
    }

    /// `tojson` (Python's json.dumps defaults: ", " and ": " separators, non-ASCII escaped).
    var json: String {
        switch self {
        case .none, .undefined: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .int, .double: return text
        case .string(let s): return JSONValue.string(s).serialized(indent: nil)
        case .list(let l): return "[" + l.map(\.json).joined(separator: ", ") + "]"
        case .dict(let d):
            return "{" + d.map { JSONValue.string($0.0).serialized(indent: nil) + ": " + $0.1.json }.joined(separator: ", ") + "}"
        case .namespace: return "{}"
        }
    }
}

enum JinjaNode {
    case text(String)
    case output(JinjaExpr)
    case ifChain([(JinjaExpr?, [JinjaNode])])
    case forLoop(vars: [String], iter: JinjaExpr, filter: JinjaExpr?, body: [JinjaNode], elseBody: [JinjaNode])
    case set(target: [String], value: JinjaExpr)
}

indirect enum JinjaExpr {
    case literal(JinjaValue)
    case name(String)
    case list([JinjaExpr])
    case dict([(JinjaExpr, JinjaExpr)])
    case attr(JinjaExpr, String)
    case index(JinjaExpr, JinjaExpr)
    case slice(JinjaExpr, JinjaExpr?, JinjaExpr?, JinjaExpr?)
    case call(JinjaExpr, [JinjaExpr], [(String, JinjaExpr)])
    case filter(JinjaExpr, String, [JinjaExpr])
    case test(JinjaExpr, String, negated: Bool)
    case unary(String, JinjaExpr)
    case binary(String, JinjaExpr, JinjaExpr)
    case conditional(JinjaExpr, JinjaExpr, JinjaExpr?)
}

func unsupported(_ what: String) -> QATError {
    QATError("unsupported chat template: \(what) (qat renders the common Jinja subset of the Llama/Mistral/Qwen templates)")
}

/// Tokenizer and parser of the template text.
struct JinjaParser {
    enum Tok: Equatable { case name(String), str(String), int(Int), num(Double), op(String), end }
    let source: String
    var toks: [Tok] = []
    var pos = 0

    init(_ source: String) { self.source = source }

    /// Splits the template into text and tags, applying `-` whitespace control and
    /// transformers' environment options (`trim_blocks=True, lstrip_blocks=True`: a block or
    /// comment tag eats the newline after it and the spaces before it on its line).
    func segments() throws -> [(kind: Character, body: String)] {
        var out: [(kind: Character, body: String)] = []
        let s = Array(source)
        var i = 0, text: [Character] = []
        var trimNext = false, lineStart = true
        func flushText(trimRight: Bool) {
            var t = String(text)
            if trimNext { t = String(t.drop { $0.isWhitespace }) }
            if trimRight { while let l = t.last, l.isWhitespace { t.removeLast() } }
            if !t.isEmpty { out.append((kind: "t", body: t)) }
            text = []
            trimNext = false
        }
        while i < s.count {
            if s[i] == "{", i + 1 < s.count, "{%#".contains(s[i + 1]) {
                let open = s[i + 1]
                let close: Character = open == "{" ? "}" : open == "%" ? "%" : "#"
                var j = i + 2
                let trimLeft = j < s.count && s[j] == "-"
                let keepLeft = j < s.count && s[j] == "+"
                if trimLeft || keepLeft { j += 1 }
                var k = j
                while k + 1 < s.count && !(s[k] == close && s[k + 1] == "}") { k += 1 }
                guard k + 1 < s.count else { throw unsupported("unterminated tag at character \(i)") }
                var bodyEnd = k
                let trimRight = bodyEnd > j && s[bodyEnd - 1] == "-"
                if trimRight || (bodyEnd > j && s[bodyEnd - 1] == "+") { bodyEnd -= 1 }
                if open != "{" && !trimLeft && !keepLeft {
                    // lstrip_blocks: drop spaces and tabs between the line start and the tag.
                    var m = text.count
                    while m > 0 && (text[m - 1] == " " || text[m - 1] == "\t") { m -= 1 }
                    if (m == 0 && lineStart) || (m > 0 && text[m - 1] == "\n") {
                        text.removeSubrange(m...)
                    }
                }
                flushText(trimRight: trimLeft)
                if open != "#" { out.append((kind: open, body: String(s[j..<bodyEnd]))) }
                trimNext = trimRight
                i = k + 2
                lineStart = false
                // trim_blocks: the first newline after a block or comment tag is removed.
                if open != "{" && !trimRight && i < s.count && s[i] == "\n" { i += 1; lineStart = true }
            } else {
                text.append(s[i]); i += 1
            }
        }
        flushText(trimRight: false)
        return out
    }

    static func lex(_ s: String) throws -> [Tok] {
        var out: [Tok] = []
        let c = Array(s)
        var i = 0
        while i < c.count {
            let ch = c[i]
            if ch.isWhitespace { i += 1; continue }
            if ch.isLetter || ch == "_" {
                var j = i
                while j < c.count && (c[j].isLetter || c[j].isNumber || c[j] == "_") { j += 1 }
                out.append(.name(String(c[i..<j]))); i = j; continue
            }
            if ch.isNumber {
                var j = i
                while j < c.count && (c[j].isNumber || c[j] == ".") { j += 1 }
                let t = String(c[i..<j])
                if let n = Int(t) {
                    out.append(.int(n))
                } else if let d = Double(t) {
                    out.append(.num(d))
                } else {
                    throw unsupported("number \(t)")
                }
                i = j; continue
            }
            if ch == "'" || ch == "\"" {
                var j = i + 1, v = ""
                while j < c.count && c[j] != ch {
                    if c[j] == "\\", j + 1 < c.count {
                        j += 1
                        switch c[j] {
                        case "n": v.append("\n");
                        case "t": v.append("\t");
                        case "r": v.append("\r");
                        default: v.append(c[j])
                        }
                    } else {
                        v.append(c[j])
                    }
                    j += 1
                }
                guard j < c.count else { throw unsupported("unterminated string") }
                out.append(.str(v)); i = j + 1; continue
            }
            let two = i + 1 < c.count ? String(c[i...i + 1]) : ""
            if ["==", "!=", "<=", ">=", "//", "**"].contains(two) { out.append(.op(two)); i += 2; continue }
            if "+-*/%~<>()[]{}.,:|=".contains(ch) { out.append(.op(String(ch))); i += 1; continue }
            throw unsupported("character \"\(ch)\"")
        }
        out.append(.end)
        return out
    }

    mutating func parse() throws -> [JinjaNode] {
        let segs = try segments()
        var idx = 0
        let (nodes, stop) = try block(segs, &idx, until: [])
        if let stop { throw unsupported("unexpected {% \(stop) %}") }
        return nodes
    }

    /// Parses nodes until a tag whose first word is in `until`; returns that tag's text.
    mutating func block(_ segs: [(kind: Character, body: String)], _ i: inout Int, until: Set<String>) throws -> ([JinjaNode], String?) {
        var nodes: [JinjaNode] = []
        while i < segs.count {
            let (kind, body) = segs[i]
            i += 1
            switch kind {
            case "t": nodes.append(.text(body))
            case "{": nodes.append(.output(try expression(body)))
            default:
                let trimmed = body.trimmingCharacters(in: .whitespaces)
                let word = String(trimmed.prefix { $0.isLetter || $0 == "_" })
                let rest = String(trimmed.dropFirst(word.count))
                if until.contains(word) { return (nodes, trimmed) }
                switch word {
                case "if":
                    var chain: [(JinjaExpr?, [JinjaNode])] = []
                    var cond: JinjaExpr? = try expression(rest)
                    while true {
                        let (body, stop) = try block(segs, &i, until: ["elif", "else", "endif"])
                        chain.append((cond, body))
                        guard let stop else { throw unsupported("{% if %} without {% endif %}") }
                        if stop.hasPrefix("endif") { break }
                        if stop.hasPrefix("elif") { cond = try expression(String(stop.dropFirst(4))) } else { cond = nil }
                    }
                    nodes.append(.ifChain(chain))
                case "for":
                    guard let inRange = rest.range(of: " in ") else { throw unsupported("{% for \(rest) %}") }
                    let vars = rest[..<inRange.lowerBound].split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
                    var iterText = String(rest[inRange.upperBound...])
                    var filter: JinjaExpr? = nil
                    if let r = iterText.range(of: " if ") {
                        filter = try expression(String(iterText[r.upperBound...]))
                        iterText = String(iterText[..<r.lowerBound])
                    }
                    let (body, stop) = try block(segs, &i, until: ["else", "endfor"])
                    var elseBody: [JinjaNode] = []
                    if stop?.hasPrefix("else") == true {
                        let (e, stop2) = try block(segs, &i, until: ["endfor"])
                        guard stop2 != nil else { throw unsupported("{% for %} without {% endfor %}") }
                        elseBody = e
                    } else if stop == nil {
                        throw unsupported("{% for %} without {% endfor %}")
                    }
                    nodes.append(.forLoop(vars: vars, iter: try expression(iterText), filter: filter, body: body, elseBody: elseBody))
                case "set":
                    guard let eq = rest.firstIndex(of: "=") else { throw unsupported("block {% set %} (only {% set x = value %})") }
                    let target = rest[..<eq].trimmingCharacters(in: .whitespaces).split(separator: ".").map(String.init)
                    nodes.append(.set(target: target, value: try expression(String(rest[rest.index(after: eq)...]))))
                default:
                    throw unsupported("{% \(word) %}")
                }
            }
        }
        return (nodes, nil)
    }

    func expression(_ text: String) throws -> JinjaExpr {
        var p = JinjaParser(text)
        p.toks = try Self.lex(text)
        let e = try p.conditional()
        guard p.toks[p.pos] == .end else { throw unsupported("expression \"\(text.trimmingCharacters(in: .whitespaces))\"") }
        return e
    }

    mutating func peek(_ op: String) -> Bool { toks[pos] == .op(op) || toks[pos] == .name(op) }
    mutating func eat(_ op: String) -> Bool { if peek(op) { pos += 1; return true }; return false }
    mutating func expect(_ op: String) throws { guard eat(op) else { throw unsupported("expected \"\(op)\"") } }

    mutating func conditional() throws -> JinjaExpr {
        let e = try orExpr()
        if eat("if") {
            let c = try orExpr()
            let alt = eat("else") ? try conditional() : nil
            return .conditional(c, e, alt)
        }
        return e
    }
    mutating func orExpr() throws -> JinjaExpr {
        var e = try andExpr()
        while eat("or") { e = .binary("or", e, try andExpr()) }
        return e
    }
    mutating func andExpr() throws -> JinjaExpr {
        var e = try notExpr()
        while eat("and") { e = .binary("and", e, try notExpr()) }
        return e
    }
    mutating func notExpr() throws -> JinjaExpr {
        if eat("not") { return .unary("not", try notExpr()) }
        return try comparison()
    }
    mutating func comparison() throws -> JinjaExpr {
        var e = try additive()
        while true {
            if let op = ["==", "!=", "<", ">", "<=", ">="].first(where: { peek($0) }) {
                pos += 1; e = .binary(op, e, try additive()); continue
            }
            if eat("in") { e = .binary("in", e, try additive()); continue }
            if peek("not"), toks[pos + 1] == .name("in") { pos += 2; e = .unary("not", .binary("in", e, try additive())); continue }
            if eat("is") {
                let neg = eat("not")
                guard case .name(let t) = toks[pos] else { throw unsupported("is test") }
                pos += 1
                e = .test(e, t, negated: neg); continue
            }
            return e
        }
    }
    mutating func additive() throws -> JinjaExpr {
        var e = try multiplicative()
        while let op = ["+", "-", "~"].first(where: { peek($0) }) { pos += 1; e = .binary(op, e, try multiplicative()) }
        return e
    }
    mutating func multiplicative() throws -> JinjaExpr {
        var e = try unaryMinus()
        while let op = ["*", "/", "//", "%"].first(where: { peek($0) }) { pos += 1; e = .binary(op, e, try unaryMinus()) }
        return e
    }
    mutating func unaryMinus() throws -> JinjaExpr {
        if eat("-") { return .binary("-", .literal(.int(0)), try unaryMinus()) }
        return try postfix()
    }
    mutating func postfix() throws -> JinjaExpr {
        var e = try primary()
        while true {
            if eat(".") {
                guard case .name(let n) = toks[pos] else { throw unsupported("attribute") }
                pos += 1; e = .attr(e, n)
            } else if eat("[") {
                var parts: [JinjaExpr?] = [nil]
                var isSlice = false
                while !peek("]") {
                    if eat(":") { isSlice = true; parts.append(nil); continue }
                    parts[parts.count - 1] = try conditional()
                }
                try expect("]")
                if isSlice {
                    e = .slice(e, parts[0], parts.count > 1 ? parts[1] : nil, parts.count > 2 ? parts[2] : nil)
                } else {
                    guard let k = parts[0] else { throw unsupported("empty subscript") }
                    e = .index(e, k)
                }
            } else if eat("(") {
                var args: [JinjaExpr] = [], kwargs: [(String, JinjaExpr)] = []
                while !eat(")") {
                    if case .name(let n) = toks[pos], toks[pos + 1] == .op("=") {
                        pos += 2; kwargs.append((n, try conditional()))
                    } else {
                        args.append(try conditional())
                    }
                    _ = eat(",")
                }
                e = .call(e, args, kwargs)
            } else if eat("|") {
                guard case .name(let f) = toks[pos] else { throw unsupported("filter") }
                pos += 1
                var args: [JinjaExpr] = []
                if eat("(") { while !eat(")") { args.append(try conditional()); _ = eat(",") } }
                e = .filter(e, f, args)
            } else {
                return e
            }
        }
    }
    mutating func primary() throws -> JinjaExpr {
        let t = toks[pos]
        pos += 1
        switch t {
        case .str(var s):
            while case .str(let more) = toks[pos] { s += more; pos += 1 }
            return .literal(.string(s))
        case .int(let i): return .literal(.int(i))
        case .num(let d): return .literal(.double(d))
        case .name(let n):
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default: return .name(n)
            }
        case .op("("):
            let e = try conditional()
            try expect(")")
            return e
        case .op("["):
            var items: [JinjaExpr] = []
            while !eat("]") { items.append(try conditional()); _ = eat(",") }
            return .list(items)
        case .op("{"):
            var items: [(JinjaExpr, JinjaExpr)] = []
            while !eat("}") {
                let k = try conditional()
                try expect(":")
                items.append((k, try conditional()))
                _ = eat(",")
            }
            return .dict(items)
        default: throw unsupported("token \(t)")
        }
    }
}

/// Evaluation state: variable scopes and namespace objects.
struct JinjaContext {
    var scopes: [[String: JinjaValue]] = [[:]]
    var namespaces: [[String: JinjaValue]] = []

    func lookup(_ n: String) -> JinjaValue {
        for s in scopes.reversed() { if let v = s[n] { return v } }
        return .undefined
    }

    mutating func run(_ nodes: [JinjaNode], into out: inout String) throws {
        for node in nodes {
            switch node {
            case .text(let t): out += t
            case .output(let e): out += try eval(e).text
            case .ifChain(let chain):
                for (cond, body) in chain where try cond.map({ try eval($0).truthy }) ?? true {
                    try run(body, into: &out)
                    break
                }
            case let .forLoop(vars, iterExpr, filter, body, elseBody):
                var items: [JinjaValue]
                switch try eval(iterExpr) {
                case .list(let l): items = l
                case .dict(let d): items = d.map { .string($0.0) }
                case .string(let s): items = s.map { .string(String($0)) }
                case .none, .undefined: items = []
                default: throw unsupported("for over a non-sequence")
                }
                if let filter {
                    items = try items.filter { item in
                        scopes.append(bind(vars, item))
                        defer { scopes.removeLast() }
                        return try eval(filter).truthy
                    }
                }
                if items.isEmpty { try run(elseBody, into: &out) }
                for (i, item) in items.enumerated() {
                    var scope = bind(vars, item)
                    scope["loop"] = .dict([
                        ("index0", .int(i)), ("index", .int(i + 1)), ("first", .bool(i == 0)),
                        ("last", .bool(i == items.count - 1)), ("length", .int(items.count)),
                        ("previtem", i > 0 ? items[i - 1] : .undefined),
                        ("nextitem", i + 1 < items.count ? items[i + 1] : .undefined),
                    ])
                    scopes.append(scope)
                    try run(body, into: &out)
                    // `set` inside a loop body is local to the iteration (Jinja scoping).
                    scopes.removeLast()
                }
            case let .set(target, value):
                let v = try eval(value)
                if target.count == 1 {
                    scopes[scopes.count - 1][target[0]] = v
                } else if target.count == 2, case .namespace(let id) = lookup(target[0]) {
                    namespaces[id][target[1]] = v
                } else {
                    throw unsupported("{% set \(target.joined(separator: ".")) %}")
                }
            }
        }
    }

    func bind(_ vars: [String], _ item: JinjaValue) -> [String: JinjaValue] {
        if vars.count == 1 { return [vars[0]: item] }
        var s: [String: JinjaValue] = [:]
        if case .list(let parts) = item { for (v, p) in zip(vars, parts) { s[v] = p } }
        return s
    }

    func member(_ v: JinjaValue, _ key: JinjaValue) -> JinjaValue {
        switch (v, key) {
        case let (.dict(d), .string(k)): return d.first { $0.0 == k }?.1 ?? .undefined
        case let (.namespace(id), .string(k)): return namespaces[id][k] ?? .undefined
        case let (.list(l), .int(i)): let j = i < 0 ? l.count + i : i; return j >= 0 && j < l.count ? l[j] : .undefined
        case let (.string(s), .int(i)):
            let a = Array(s); let j = i < 0 ? a.count + i : i
            return j >= 0 && j < a.count ? .string(String(a[j])) : .undefined
        default: return .undefined
        }
    }

    mutating func eval(_ e: JinjaExpr) throws -> JinjaValue {
        switch e {
        case .literal(let v): return v
        case .name(let n): return lookup(n)
        case .list(let items): return .list(try items.map { try eval($0) })
        case .dict(let items): return .dict(try items.map { (try eval($0.0).text, try eval($0.1)) })
        case let .attr(base, name): return member(try eval(base), .string(name))
        case let .index(base, key): return member(try eval(base), try eval(key))
        case let .slice(base, a, b, step):
            let v = try eval(base)
            let st = try step.map { try eval($0) }
            func ints(_ n: Int) throws -> [Int] {
                var stride = 1
                if case .int(let s)? = st { stride = s }
                guard stride != 0 else { throw unsupported("slice step 0") }
                func bound(_ x: JinjaExpr?, _ def: Int) throws -> Int {
                    guard let x, case .int(let i) = try eval(x) else { return def }
                    return i < 0 ? max(0, n + i) : min(i, n)
                }
                if stride > 0 {
                    let lo = try bound(a, 0), hi = try bound(b, n)
                    return lo < hi ? Array(Swift.stride(from: lo, to: hi, by: stride)) : []
                }
                let hi =
                    try a.map { x -> Int in
                        guard case .int(let i) = try eval(x) else { return n - 1 }; return i < 0 ? n + i : min(i, n - 1)
                    } ?? (n - 1)
                let lo =
                    try b.map { x -> Int in
                        guard case .int(let i) = try eval(x) else { return -1 }; return i < 0 ? n + i : i
                    } ?? -1
                return hi > lo ? Array(Swift.stride(from: hi, to: lo, by: stride)) : []
            }
            switch v {
            case .list(let l): return .list(try ints(l.count).map { l[$0] })
            case .string(let s): let c = Array(s); return .string(String(try ints(c.count).map { c[$0] }))
            default: throw unsupported("slice of a non-sequence")
            }
        case let .conditional(cond, a, b): return try eval(cond).truthy ? try eval(a) : try b.map { try eval($0) } ?? .string("")
        case let .unary(op, x):
            guard op == "not" else { throw unsupported("operator \(op)") }
            return .bool(!(try eval(x).truthy))
        case let .binary(op, l, r):
            if op == "and" { let a = try eval(l); return a.truthy ? try eval(r) : a }
            if op == "or" { let a = try eval(l); return a.truthy ? a : try eval(r) }
            return try binary(op, try eval(l), try eval(r))
        case let .test(x, name, negated):
            let v = try eval(x)
            let r: Bool
            switch name {
            case "defined": r = v != .undefined
            case "undefined": r = v == .undefined
            case "none": r = v == .none
            case "string": if case .string = v { r = true } else { r = false }
            case "number":
                switch v {
                case .int, .double: r = true;
                default: r = false
                }
            case "mapping": if case .dict = v { r = true } else { r = false }
            case "sequence", "iterable":
                switch v {
                case .list, .string, .dict: r = true;
                default: r = false
                }
            case "true": r = v == .bool(true)
            case "false": r = v == .bool(false)
            default: throw unsupported("test \"is \(name)\"")
            }
            return .bool(negated ? !r : r)
        case let .filter(x, name, args):
            let v = try eval(x)
            switch name {
            case "trim": return .string(v.text.trimmingCharacters(in: .whitespacesAndNewlines))
            case "length", "count":
                switch v {
                case .list(let l): return .int(l.count)
                case .string(let s): return .int(s.count)
                case .dict(let d): return .int(d.count)
                default: return .int(0)
                }
            case "tojson": return .string(v.json)
            case "string": return .string(v.text)
            case "lower": return .string(v.text.lowercased())
            case "upper": return .string(v.text.uppercased())
            case "first": if case .list(let l) = v { return l.first ?? .undefined }; return member(v, .int(0))
            case "last": if case .list(let l) = v { return l.last ?? .undefined }; return member(v, .int(-1))
            case "default": return v == .undefined ? try args.first.map { try eval($0) } ?? .string("") : v
            default: throw unsupported("filter \"|\(name)\"")
            }
        case let .call(callee, argExprs, kwargExprs):
            let args = try argExprs.map { try eval($0) }
            if case .name(let fn) = callee {
                switch fn {
                case "raise_exception": throw QATError("the chat template refused the conversation: \(args.first?.text ?? "")")
                case "namespace":
                    var ns: [String: JinjaValue] = [:]
                    for (k, x) in kwargExprs { ns[k] = try eval(x) }
                    namespaces.append(ns)
                    return .namespace(namespaces.count - 1)
                case "range":
                    let ints = args.compactMap { v -> Int? in
                        if case .int(let i) = v { return i }; return nil
                    }
                    guard ints.count == args.count, !ints.isEmpty else { throw unsupported("range(...)") }
                    let (lo, hi) = ints.count == 1 ? (0, ints[0]) : (ints[0], ints[1])
                    return .list(lo < hi ? (lo..<hi).map { .int($0) } : [])
                default: throw unsupported("function \(fn)()")
                }
            }
            guard case let .attr(baseExpr, method) = callee else { throw unsupported("call") }
            let base = try eval(baseExpr)
            let s = base.text
            func chars(_ i: Int) -> CharacterSet { args.count > i ? CharacterSet(charactersIn: args[i].text) : .whitespacesAndNewlines }
            switch (base, method) {
            case (.string, "strip"): return .string(s.trimmingCharacters(in: chars(0)))
            case (.string, "lstrip"): return .string(String(s.unicodeScalars.drop { chars(0).contains($0) }))
            case (.string, "rstrip"):
                var u = Array(s.unicodeScalars)
                while let l = u.last, chars(0).contains(l) { u.removeLast() }
                return .string(String(String.UnicodeScalarView(u)))
            case (.string, "startswith"): return .bool(s.hasPrefix(args.first?.text ?? ""))
            case (.string, "endswith"): return .bool(s.hasSuffix(args.first?.text ?? ""))
            case (.string, "lower"): return .string(s.lowercased())
            case (.string, "upper"): return .string(s.uppercased())
            case (.string, "split"):
                guard let sep = args.first?.text, !sep.isEmpty else {
                    return .list(s.split(whereSeparator: { $0.isWhitespace }).map { .string(String($0)) })
                }
                return .list(s.components(separatedBy: sep).map { .string($0) })
            case (.string, "replace"):
                return .string(s.replacingOccurrences(of: args.first?.text ?? "", with: args.count > 1 ? args[1].text : ""))
            case (.dict(let d), "items"): return .list(d.map { .list([.string($0.0), $0.1]) })
            case (.dict(let d), "keys"): return .list(d.map { .string($0.0) })
            case (.dict(let d), "values"): return .list(d.map { $0.1 })
            case (.dict, "get"):
                let v = member(base, args.first ?? .undefined); return v == .undefined ? (args.count > 1 ? args[1] : .none) : v
            default: throw unsupported("method .\(method)()")
            }
        }
    }

    func binary(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> JinjaValue {
        func num(_ v: JinjaValue) -> Double? {
            switch v {
            case .int(let i): return Double(i);
            case .double(let d): return d;
            case .bool(let b): return b ? 1 : 0;
            default: return nil
            }
        }
        switch op {
        case "==": return .bool(a == b)
        case "!=": return .bool(a != b)
        case "~": return .string(a.text + b.text)
        case "in":
            switch b {
            case .string(let s): return .bool(s.contains(a.text))
            case .list(let l): return .bool(l.contains(a))
            case .dict(let d): return .bool(d.contains { $0.0 == a.text })
            case .namespace: return .bool(member(b, a) != .undefined)
            default: return .bool(false)
            }
        case "+":
            switch (a, b) {
            case let (.string(x), .string(y)): return .string(x + y)
            case let (.list(x), .list(y)): return .list(x + y)
            case let (.int(x), .int(y)): return .int(x + y)
            default: break
            }
        case "-", "*", "%", "//":
            if case let (.int(x), .int(y)) = (a, b) {
                switch op {
                case "-": return .int(x - y)
                case "*": return .int(x * y)
                default:
                    guard y != 0 else { throw unsupported("division by zero") }
                    return .int(op == "%" ? ((x % y) + y) % y : Int((Double(x) / Double(y)).rounded(.down)))
                }
            }
            if op == "*", case let (.string(x), .int(y)) = (a, b) { return .string(String(repeating: x, count: max(0, y))) }
        default: break
        }
        if let x = num(a), let y = num(b) {
            switch op {
            case "<": return .bool(x < y)
            case ">": return .bool(x > y)
            case "<=": return .bool(x <= y)
            case ">=": return .bool(x >= y)
            case "+": return .double(x + y)
            case "-": return .double(x - y)
            case "*": return .double(x * y)
            case "/": return .double(x / y)
            default: break
            }
        }
        if case let (.string(x), .string(y)) = (a, b) {
            switch op {
            case "<": return .bool(x < y)
            case ">": return .bool(x > y)
            case "<=": return .bool(x <= y)
            case ">=": return .bool(x >= y)
            default: break
            }
        }
        throw unsupported("\(a.text) \(op) \(b.text)")
    }
}
