import Foundation
import QATCore
import TestSupport
import XCTest

/// Seeded mutation fuzzing of the parsers that read user files.
///
/// Every campaign starts from real seed inputs (the corpus under `Tests/Fuzz/corpus/<parser>/`
/// plus seeds built here with the project's own writers), applies deterministic mutations
/// (bit flips, byte insert/delete, truncation, splicing, interesting integers, text-aware
/// number/key/nesting edits) driven by a fixed seed, writes each input to a file and calls
/// the parser. The parser must return or throw a `QATError`; anything else is a bug.
///
/// Environment:
/// - `QAT_FUZZ_ITERATIONS`: inputs per parser (default: the per-parser figure below, sized
///   so the whole target stays well under a minute on 2 cores).
/// - `QAT_FUZZ_SEED`: campaign seed (default fixed, so CI runs are reproducible).
/// - `QAT_FUZZ_MIN_ITERATIONS`: the mutant count each campaign must reach, asserted
///   (default: the per-parser figure; lower it together with `QAT_FUZZ_ITERATIONS`).
///
/// There is no wall-clock cap: a campaign always runs every input, so the count is known
/// and `QAT_FUZZ_SEED` reproduces a run input for input. Each campaign prints one line
/// `fuzz <parser>: N inputs … seed …`; `scripts/test.sh` sums them.
/// - `QAT_FUZZ_WORKDIR`: where inputs are written (default a fresh temporary folder).
///
/// A Swift trap kills the whole test process, so the input being parsed is always written
/// to `<workdir>/<parser>/current.<ext>` first: after a crash that file is the reproducer
/// (copy it under `Tests/Fuzz/regressions/<parser>/`).
enum Fuzz {
    static let env = ProcessInfo.processInfo.environment

    static func iterations(_ defaultCount: Int) -> Int {
        if let s = env["QAT_FUZZ_ITERATIONS"], let n = Int(s), n >= 0 { return n }
        return defaultCount
    }

    static var seed: UInt64 {
        if let s = env["QAT_FUZZ_SEED"], let n = UInt64(s) { return n }
        return 0x51A7_F022
    }

    static func minimumIterations(_ defaultCount: Int) -> Int {
        if let s = env["QAT_FUZZ_MIN_ITERATIONS"], let n = Int(s), n >= 0 { return n }
        return defaultCount
    }

    static let workRoot: URL = {
        if let w = env["QAT_FUZZ_WORKDIR"] {
            let u = URL(fileURLWithPath: w)
            try? FileManager.default.createDirectory(at: u, withIntermediateDirectories: true)
            return u
        }
        return Fixtures.tempDir("qat-fuzz")
    }()

    static func workDir(_ parser: String) -> URL {
        let u = workRoot.appendingPathComponent(parser)
        try? FileManager.default.createDirectory(at: u, withIntermediateDirectories: true)
        return u
    }

    static let fuzzRoot = Fixtures.repoRoot.appendingPathComponent("Tests/Fuzz")

    /// Files of `Tests/Fuzz/<kind>/<parser>/`, sorted by name.
    static func files(_ kind: String, _ parser: String) -> [URL] {
        let dir = fuzzRoot.appendingPathComponent(kind).appendingPathComponent(parser)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        return names.filter { !$0.hasPrefix(".") && $0 != "README.md" }.sorted().map { dir.appendingPathComponent($0) }
    }

    static func corpus(_ parser: String) -> [[UInt8]] {
        files("corpus", parser).compactMap { try? Array(Data(contentsOf: $0)) }
    }

    static func read(_ path: String) -> [UInt8] { (try? Array(Data(contentsOf: URL(fileURLWithPath: path)))) ?? [] }
}

/// SplitMix64: small, seedable, the same sequence on every machine.
struct FuzzRNG {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { n <= 1 ? 0 : Int(next() % UInt64(n)) }
    mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) / Double(1 << 53) < p }
    mutating func pick<T>(_ a: [T]) -> T { a[below(a.count)] }
}

/// Deterministic mutations of bytes, with text-aware ones for JSON/YAML inputs.
struct Mutator {
    var rng: FuzzRNG

    /// Integers that break size arithmetic: zero, ±1, powers of two around 2^31/2^32/2^63.
    static let interestingInts: [String] = [
        "0", "-1", "1", "2", "7", "-2147483648", "2147483647", "2147483648", "4294967295", "4294967296",
        "65536", "16777216", "16777217", "1000000000", "9223372036854775807", "-9223372036854775808",
        "9223372036854775808", "18446744073709551615", "18446744073709551616", "1e308", "-1e308", "1e400",
        "0.5", "-0.0", "1.5", "NaN", "1e-320", "3037000500", "4611686018427387904", "99999999999999999999999",
    ]
    static let interestingWords: [UInt64] = [
        0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1_0000_0000,
        0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF, 100 << 20, (100 << 20) + 1,
    ]
    /// Snippets spliced into text formats.
    static let snippets: [String] = [
        String(repeating: "[", count: 100_000), String(repeating: "{\"a\":", count: 5_000), String(repeating: "- ", count: 3_000),
        "&a [x, x, x, x, x, x, x, x, x]", "*a", "!!binary", "\"\\ud800\"", "\u{0}", "\"\\u0000\"", "null", "true", "[]", "{}",
        "\"", "'", "\n", ":", ",", "\u{FEFF}", "\u{1F600}", "0:0:0:0:0:0:0:0:0:0:0:0:0", "9223372036854775807:0",
        "99999999999:0:0:0:0:0:0:0:0:0:0:0", ".inf", ".nan", "~", "<<: *a", "? [a]\n: b",
    ]

    init(seed: UInt64) { rng = FuzzRNG(seed) }

    mutating func mutate(_ input: [UInt8], pool: [[UInt8]], text: Bool) -> [UInt8] {
        var b = input
        let n = 1 + rng.below(rng.chance(0.2) ? 8 : 3)
        for _ in 0..<n {
            if text && rng.chance(0.6) { textMutation(&b) } else { byteMutation(&b, pool: pool) }
        }
        return b
    }

    mutating func byteMutation(_ b: inout [UInt8], pool: [[UInt8]]) {
        switch rng.below(9) {
        case 0 where !b.isEmpty:  // bit flip
            let i = rng.below(b.count); b[i] ^= UInt8(1 << rng.below(8))
        case 1 where !b.isEmpty:  // random byte
            b[rng.below(b.count)] = UInt8(truncatingIfNeeded: rng.next())
        case 2:  // insert bytes
            let at = rng.below(b.count + 1)
            let k = 1 + rng.below(rng.chance(0.1) ? 512 : 8)
            b.insert(contentsOf: (0..<k).map { _ in UInt8(truncatingIfNeeded: rng.next()) }, at: at)
        case 3 where !b.isEmpty:  // delete a range
            let at = rng.below(b.count), k = 1 + rng.below(min(b.count - at, rng.chance(0.1) ? 4096 : 16))
            b.removeSubrange(at..<(at + k))
        case 4:  // truncate
            b = Array(b.prefix(rng.below(b.count + 1)))
        case 5 where !b.isEmpty:  // duplicate a range
            let at = rng.below(b.count), k = 1 + rng.below(min(b.count - at, 256))
            b.insert(contentsOf: b[at..<(at + k)], at: rng.below(b.count + 1))
        case 6 where !pool.isEmpty:  // splice with another input
            let other = rng.pick(pool)
            let cut = rng.below(b.count + 1), from = rng.below(other.count + 1)
            b = Array(b.prefix(cut)) + Array(other.suffix(from: from))
        case 7 where b.count >= 8:  // interesting little-endian word
            let w = rng.pick(Self.interestingWords)
            let size = rng.pick([1, 2, 4, 8]), at = rng.below(b.count - size + 1)
            for k in 0..<size { b[at + k] = UInt8(truncatingIfNeeded: w >> (8 * UInt64(k))) }
        default:  // overwrite with 0xFF / 0x00 run
            guard !b.isEmpty else { return }
            let at = rng.below(b.count), k = 1 + rng.below(min(b.count - at, 32))
            let v: UInt8 = rng.chance(0.5) ? 0xFF : 0
            for i in at..<(at + k) { b[i] = v }
        }
    }

    /// Ranges of decimal numbers (with sign, fraction, exponent) in text.
    static func numberRanges(_ b: [UInt8]) -> [Range<Int>] {
        var out: [Range<Int>] = []
        var i = 0
        func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }
        while i < b.count {
            if isDigit(b[i]) || (b[i] == 0x2D && i + 1 < b.count && isDigit(b[i + 1])) {
                let s = i
                i += 1
                while i < b.count, isDigit(b[i]) || b[i] == 0x2E || b[i] == 0x65 || b[i] == 0x45 || b[i] == 0x2B || b[i] == 0x2D { i += 1 }
                out.append(s..<i)
            } else {
                i += 1
            }
        }
        return out
    }

    mutating func textMutation(_ b: inout [UInt8]) {
        switch rng.below(8) {
        case 0, 1, 2:  // replace a number with an interesting one
            let nums = Self.numberRanges(b)
            guard !nums.isEmpty else { return }
            b.replaceSubrange(rng.pick(nums), with: Array(rng.pick(Self.interestingInts).utf8))
        case 3:  // duplicate a line (duplicated keys)
            let lines = b.split(separator: 0x0A, omittingEmptySubsequences: false)
            guard lines.count > 1 else { return }
            var l = lines.map(Array.init)
            let i = rng.below(l.count)
            l.insert(l[i], at: rng.below(l.count + 1))
            b = Array(l.joined(separator: [0x0A]))
        case 4:  // insert a snippet
            b.insert(contentsOf: Array(rng.pick(Self.snippets).utf8), at: rng.below(b.count + 1))
        case 5:  // swap two lines
            var l = b.split(separator: 0x0A, omittingEmptySubsequences: false).map(Array.init)
            guard l.count > 1 else { return }
            l.swapAt(rng.below(l.count), rng.below(l.count))
            b = Array(l.joined(separator: [0x0A]))
        case 6:  // delete a line
            var l = b.split(separator: 0x0A, omittingEmptySubsequences: false).map(Array.init)
            guard !l.isEmpty else { return }
            l.remove(at: rng.below(l.count))
            b = Array(l.joined(separator: [0x0A]))
        default:  // replace a quoted string's content
            let quotes = b.indices.filter { b[$0] == 0x22 }
            guard quotes.count >= 2 else { return }
            let q = rng.below(quotes.count - 1)
            let r = (quotes[q] + 1)..<quotes[q + 1]
            let repl = rng.pick([
                "", "x", "F64", "I4", "BPE", "WordPiece", "Unigram", "NVFP4", "model.embed_tokens.weight",
                "../../etc/passwd", "/dev/zero", String(repeating: "a", count: 10_000), "linear", "llama3",
            ])
            b.replaceSubrange(r, with: Array(repl.utf8))
        }
    }
}

/// One campaign over one parser.
struct FuzzCampaign {
    let parser: String
    /// File name each input is written under inside `<workdir>/<parser>/` (the parser may
    /// look for siblings there, e.g. config.json beside model.safetensors).
    let fileName: String
    var seeds: [[UInt8]]
    let text: Bool
    let iterations: Int
    let minimumIterations: Int

    var tried = 0, accepted = 0, rejected = 0

    init(parser: String, fileName: String, seeds: [[UInt8]], text: Bool, defaultIterations: Int) {
        self.parser = parser; self.fileName = fileName; self.text = text
        self.seeds = Fuzz.corpus(parser) + seeds
        self.iterations = Fuzz.iterations(defaultIterations)
        self.minimumIterations = Fuzz.minimumIterations(defaultIterations)
    }

    var dir: URL { Fuzz.workDir(parser) }
    var currentPath: String { dir.appendingPathComponent(fileName).path }

    /// Runs the seeds unchanged (they must parse or be rejected cleanly), then `iterations`
    /// mutants. `body` gets the path of the written input. `mutate` may add structure-aware
    /// mutations; it defaults to the generic mutator.
    mutating func run(
        file: StaticString = #filePath, line: UInt = #line,
        mutate custom: ((inout Mutator, [UInt8]) -> [UInt8]?)? = nil,
        _ body: (String) throws -> Void
    ) {
        XCTAssertFalse(seeds.isEmpty, "\(parser): no seeds", file: file, line: line)
        var m = Mutator(seed: Fuzz.seed ^ UInt64(truncatingIfNeeded: parser.hashValueStable))
        let start = Date()
        for s in seeds { check(s, body, file: file, line: line) }
        var mutants = 0
        for _ in 0..<iterations {
            let base = m.rng.pick(seeds)
            let input = custom.flatMap { $0(&m, base) } ?? m.mutate(base, pool: seeds, text: text)
            check(input, body, file: file, line: line)
            mutants += 1
        }
        let seconds = String(format: "%.1f", Date().timeIntervalSince(start))
        print(
            "fuzz \(parser): \(tried) inputs (\(seeds.count) seeds + \(mutants) mutants; \(accepted) accepted, "
                + "\(rejected) rejected with QATError) in \(seconds)s, QAT_FUZZ_SEED=\(Fuzz.seed)")
        XCTAssertEqual(tried, seeds.count + mutants, "\(parser): every input is parsed", file: file, line: line)
        XCTAssertGreaterThanOrEqual(mutants, minimumIterations, "\(parser): fewer mutants than the minimum", file: file, line: line)
        try? FileManager.default.removeItem(atPath: currentPath)
    }

    mutating func check(_ input: [UInt8], _ body: (String) throws -> Void, file: StaticString, line: UInt) {
        tried += 1
        let path = currentPath
        try? FileManager.default.removeItem(atPath: path)
        FileManager.default.createFile(atPath: path, contents: Data(input))
        do {
            try body(path)
            accepted += 1
        } catch is QATError {
            rejected += 1
        } catch {
            let keep = dir.appendingPathComponent("failure-\(tried)-\(fileName)")
            try? Data(input).write(to: keep)
            XCTFail(
                "\(parser): input \(tried) threw a non-QATError \(type(of: error)): \(error) (input kept at \(keep.path))",
                file: file, line: line)
        }
    }
}

extension String {
    /// FNV-1a: `hashValue` is randomly seeded per process, this is not.
    var hashValueStable: UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }
}

/// Replays `Tests/Fuzz/regressions/<parser>/*` (inputs that once crashed): each must now
/// parse or be rejected with a `QATError`. Returns the messages, by file name.
@discardableResult
func replayRegressions(
    _ parser: String, fileName: String, file: StaticString = #filePath, line: UInt = #line,
    _ body: (String) throws -> Void
) -> [String: String] {
    var messages: [String: String] = [:]
    let dir = Fuzz.workDir("regress-\(parser)")
    for url in Fuzz.files("regressions", parser) {
        let path = dir.appendingPathComponent(fileName).path
        try? FileManager.default.removeItem(atPath: path)
        try? FileManager.default.copyItem(atPath: url.path, toPath: path)
        do {
            try body(path)
            messages[url.lastPathComponent] = ""
        } catch let e as QATError {
            messages[url.lastPathComponent] = e.message
        } catch {
            XCTFail("\(parser) regression \(url.lastPathComponent): non-QATError \(error)", file: file, line: line)
        }
    }
    return messages
}
