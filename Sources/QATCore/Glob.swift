/// Shell-style pattern matching with Python `fnmatch.fnmatchcase` semantics (what ModelOpt
/// uses for quant_cfg keys, and what the trainer uses for parameter globs):
///
/// - `*` matches any run of characters, dots and slashes included;
/// - `?` matches exactly one character;
/// - `[seq]` matches one character in seq (ranges `a-z`; a `]` right after `[` or `[!` is
///   literal; `^` is literal), `[!seq]` one character not in seq;
/// - a `[` without a closing `]` is a literal `[`;
/// - case-sensitive (Linux `normcase` is the identity); the whole name must match.
public enum Glob {
    private enum Token {
        case literal(Unicode.Scalar)
        case any
        case star
        case set(negated: Bool, ranges: [(Unicode.Scalar, Unicode.Scalar)])
    }

    private static func compile(_ pattern: String) -> [Token] {
        let p = Array(pattern.unicodeScalars)
        var tokens: [Token] = []
        var i = 0
        while i < p.count {
            let c = p[i]
            i += 1
            switch c {
            case "*":
                if case .star? = tokens.last { continue }  // collapse runs of '*'
                tokens.append(.star)
            case "?":
                tokens.append(.any)
            case "[":
                var j = i
                if j < p.count && p[j] == "!" { j += 1 }
                if j < p.count && p[j] == "]" { j += 1 }
                while j < p.count && p[j] != "]" { j += 1 }
                if j >= p.count {
                    tokens.append(.literal("["))  // no closing bracket: literal
                    continue
                }
                var k = i
                var negated = false
                if p[k] == "!" { negated = true; k += 1 }
                var ranges: [(Unicode.Scalar, Unicode.Scalar)] = []
                // Items between k and j (exclusive); the first char may be ']'.
                while k < j {
                    let lo = p[k]
                    if k + 2 < j && p[k + 1] == "-" {
                        let hi = p[k + 2]
                        if lo.value <= hi.value { ranges.append((lo, hi)) }  // reversed ranges match nothing
                        k += 3
                    } else {
                        ranges.append((lo, lo))
                        k += 1
                    }
                }
                tokens.append(.set(negated: negated, ranges: ranges))
                i = j + 1
            default:
                tokens.append(.literal(c))
            }
        }
        return tokens
    }

    @inline(__always)
    private static func matchOne(_ t: Token, _ c: Unicode.Scalar) -> Bool {
        switch t {
        case .literal(let l): return l == c
        case .any: return true
        case .star: return false
        case .set(let negated, let ranges):
            var hit = false
            for (lo, hi) in ranges where c.value >= lo.value && c.value <= hi.value { hit = true; break }
            return hit != negated
        }
    }

    /// Whether `name` matches `pattern` in full (Python `fnmatch.fnmatchcase`).
    public static func matches(_ pattern: String, _ name: String) -> Bool {
        let tokens = compile(pattern)
        let s = Array(name.unicodeScalars)
        // Iterative wildcard matching with single-star backtracking (linear-ish, no recursion).
        var ti = 0, si = 0
        var starT = -1, starS = 0
        while si < s.count {
            if ti < tokens.count {
                if case .star = tokens[ti] {
                    starT = ti; starS = si; ti += 1
                    continue
                }
                if matchOne(tokens[ti], s[si]) { ti += 1; si += 1; continue }
            }
            if starT >= 0 {
                starS += 1; si = starS; ti = starT + 1
                continue
            }
            return false
        }
        while ti < tokens.count, case .star = tokens[ti] { ti += 1 }
        return ti == tokens.count
    }

    /// Whether `name` matches any of `patterns`.
    public static func matchesAny(_ patterns: [String], _ name: String) -> Bool {
        patterns.contains { matches($0, name) }
    }
}
