import Foundation

/// A byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (GPT-2, Llama-3,
/// Qwen2/Qwen3 and the small models trained with the `tokenizers` library).
///
/// `encode` reproduces `tokenizers`' `encode(text, add_special_tokens=False)`:
/// 1. added tokens (`<|endoftext|>`, …) are matched literally, leftmost-longest, and become
///    their ids without further processing;
/// 2. the text between them goes through the normalizer (NFC/NFD/NFKC/NFKD/Lowercase or
///    none) and the pre-tokenizer (ByteLevel with GPT-2's regex, or Split regexes followed
///    by ByteLevel), producing pieces;
/// 3. each piece's UTF-8 bytes are mapped to byte-level characters and merged by BPE
///    (lowest merge rank first, leftmost first on ties), with results cached per piece.
///
/// Anything else in the file (a Metaspace/SentencePiece pre-tokenizer, WordPiece, an
/// unknown normalizer, BPE dropout) is rejected at load with a `QATError`, so a tokenizer
/// is either reproduced exactly or not loaded at all. Post-processors only add special
/// tokens, which `encode` never does, so they are ignored.
///
/// Thread-safe: the tables are immutable after `init` and the piece cache is behind a lock.
public final class Tokenizer: @unchecked Sendable {
    /// The file it was read from.
    public let path: String
    /// One past the largest token id (vocabulary plus added tokens), i.e. the smallest
    /// embedding table that can hold every id this tokenizer emits.
    public let vocabSize: Int
    /// `eos_token` of `tokenizer_config.json` beside tokenizer.json when present and known,
    /// else `<|endoftext|>` if the vocabulary has it.
    public let eosTokenId: Int32?

    private let tokenToId: [String: Int32]
    /// Bytes each id decodes to (empty for an id no token has).
    private let idToBytes: [[UInt8]]
    private let idToToken: [String?]
    /// Rank and result of each merge, keyed by `left << 32 | right` token ids.
    private let merges: [UInt64: (rank: Int32, id: Int32)]
    /// Id of each byte's byte-level character, -1 when the vocabulary lacks it.
    private let byteIds: [Int32]
    private let byteFallbackIds: [Int32]?
    private let unkId: Int32?
    private let fuseUnk: Bool
    private let ignoreMerges: Bool
    private let added: AddedTokenMatcher
    private let normalizer: Normalizer?
    private let steps: [PreTokenizerStep]

    private let cacheLock = NSLock()
    private var cache: [[UInt8]: [Int32]] = [:]
    /// Bounds the piece cache (a large corpus has millions of distinct words); when full it
    /// is emptied and refilled, which costs little because frequent words return at once.
    private static let cacheLimit = 500_000
    /// Pieces longer than this are not cached: they are rare and would bloat the cache.
    private static let cacheMaxPieceBytes = 256

    /// Largest tokenizer.json read (large vocabularies are ~10–30 MB).
    public static let maxFileBytes = 256 << 20
    /// One past the largest token id accepted (the largest vocabularies are ~260k).
    public static let maxVocabSize = 1 << 24

    /// Reads `path`: a tokenizer.json file, or a model directory holding one.
    public init(path: String) throws {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw QATError("tokenizer not found: \(path)")
        }
        let file = isDir.boolValue ? (path as NSString).appendingPathComponent("tokenizer.json") : path
        guard FileManager.default.fileExists(atPath: file) else {
            throw QATError("no tokenizer.json in \(path)")
        }
        self.path = file
        let root: [String: Any]
        do {
            let data = try Data(contentsOf: URL(fileURLWithPath: file))
            guard data.count <= Tokenizer.maxFileBytes else {
                throw QATError("\(file): \(data.count) bytes is larger than the \(Tokenizer.maxFileBytes)-byte limit for tokenizer.json")
            }
            guard let obj = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw QATError("\(file): top level is not a JSON object")
            }
            root = obj
        } catch let e as QATError { throw e } catch {
            throw QATError("\(file): not valid JSON (\(error.localizedDescription))")
        }
        let j = JSONReader(file: file)

        // Model: byte-level BPE.
        let model = try j.object(root, "model")
        let type = (model["type"] as? String) ?? "BPE"  // older files omit model.type
        guard type == "BPE" else {
            throw QATError.unsupported("\(file): model.type is \(type); only BPE tokenizers are supported")
        }
        if let d = model["dropout"], !(d is NSNull), let p = (d as? NSNumber)?.doubleValue, p > 0 {
            throw QATError.unsupported("\(file): model.dropout = \(p): BPE dropout makes encoding random and is not supported")
        }
        for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
            if let v = model[key] as? String, !v.isEmpty {
                throw QATError.unsupported("\(file): model.\(key) = \"\(v)\" is not supported (byte-level BPE has none)")
            }
        }
        ignoreMerges = (model["ignore_merges"] as? Bool) ?? false
        fuseUnk = (model["fuse_unk"] as? Bool) ?? false
        let byteFallback = (model["byte_fallback"] as? Bool) ?? false

        let vocabJSON = try j.object(model, "vocab", in: "model")
        var tokenToId: [String: Int32] = [:]
        tokenToId.reserveCapacity(vocabJSON.count)
        var maxId: Int32 = -1
        for (tok, v) in vocabJSON {
            guard let n = v as? NSNumber, let id = Int32(exactly: n.doubleValue), id >= 0 else {
                throw QATError("\(file): model.vocab[\"\(tok)\"] is not a non-negative integer id")
            }
            // Swift String equality is canonical equivalence; byte-level tokens are made of
            // the 256 stand-in characters, none combining, so they are safe as keys. Anything
            // else means a non-byte-level vocabulary (SentencePiece ▁…), rejected here.
            guard ByteLevel.decode(tok) != nil else {
                throw QATError(
                    "\(file): model.vocab entry \"\(tok)\" is not a byte-level token; only byte-level BPE (GPT-2 style) is supported")
            }
            tokenToId[tok] = id
            maxId = max(maxId, id)
        }

        // Added tokens (ids may or may not be in the vocabulary).
        var addedSpecs: [AddedTokenMatcher.Token] = []
        if let list = root["added_tokens"], !(list is NSNull) {
            guard let arr = list as? [[String: Any]] else { throw QATError("\(file): added_tokens is not a list of objects") }
            for (k, t) in arr.enumerated() {
                guard let content = t["content"] as? String, !content.isEmpty else {
                    throw QATError("\(file): added_tokens[\(k)].content is missing or empty")
                }
                guard let n = t["id"] as? NSNumber, let id = Int32(exactly: n.doubleValue), id >= 0 else {
                    throw QATError("\(file): added_tokens[\(k)].id is missing or not a non-negative integer")
                }
                tokenToId[content] = id
                maxId = max(maxId, id)
                addedSpecs.append(
                    .init(
                        content: Array(content.unicodeScalars), id: id,
                        singleWord: (t["single_word"] as? Bool) ?? false,
                        lstrip: (t["lstrip"] as? Bool) ?? false,
                        rstrip: (t["rstrip"] as? Bool) ?? false))
            }
        }
        added = AddedTokenMatcher(addedSpecs)
        // The id tables below have one slot per id: a file naming id 2^31 − 1 would have
        // them take tens of gigabytes. Real vocabularies stay far below the limit.
        guard Int(maxId) < Tokenizer.maxVocabSize else {
            throw QATError(
                "\(file): token id \(maxId) is above the \(Tokenizer.maxVocabSize - 1) limit "
                    + "(\(tokenToId.count) tokens in all): corrupt tokenizer.json")
        }
        vocabSize = Int(maxId) + 1
        self.tokenToId = tokenToId

        var idToToken = [String?](repeating: nil, count: vocabSize)
        var idToBytes = [[UInt8]](repeating: [], count: vocabSize)
        for (tok, id) in tokenToId {
            idToToken[Int(id)] = tok
            // ByteLevel decoder: a token whose characters are all in the byte map decodes to
            // those bytes; any other (an added token such as "<|im_start|>" is in the map,
            // but e.g. "▁" is not) decodes to its own UTF-8, as `tokenizers` does.
            idToBytes[Int(id)] = ByteLevel.decode(tok) ?? Array(tok.utf8)
        }
        self.idToToken = idToToken
        self.idToBytes = idToBytes

        // Merges: "a b" strings or [a, b] pairs, rank = position.
        let mergesJSON = try j.array(model, "merges", in: "model")
        var merges: [UInt64: (rank: Int32, id: Int32)] = [:]
        merges.reserveCapacity(mergesJSON.count)
        for (rank, m) in mergesJSON.enumerated() {
            let a: String, b: String
            if let s = m as? String {
                let parts = s.split(separator: " ", omittingEmptySubsequences: false)
                guard parts.count == 2 else {
                    throw QATError("\(file): model.merges[\(rank)] \"\(s)\" is not two tokens separated by one space")
                }
                a = String(parts[0]); b = String(parts[1])
            } else if let p = m as? [String], p.count == 2 {
                a = p[0]; b = p[1]
            } else {
                throw QATError("\(file): model.merges[\(rank)] is neither \"a b\" nor [a, b]")
            }
            guard let ia = tokenToId[a], let ib = tokenToId[b] else {
                throw QATError("\(file): model.merges[\(rank)] uses \"\(tokenToId[a] == nil ? a : b)\", which is not in model.vocab")
            }
            guard let out = tokenToId[a + b] else {
                throw QATError("\(file): model.merges[\(rank)] produces \"\(a + b)\", which is not in model.vocab")
            }
            let key = UInt64(UInt32(ia)) << 32 | UInt64(UInt32(ib))
            if merges[key] == nil { merges[key] = (Int32(rank), out) }
        }
        self.merges = merges

        byteIds = (0..<256).map { tokenToId[String(ByteLevel.byteToScalar[$0])] ?? -1 }
        byteFallbackIds =
            byteFallback
            ? (0..<256).map { tokenToId[String(format: "<0x%02X>", $0)] ?? -1 }
            : nil
        if let u = model["unk_token"] as? String {
            guard let id = tokenToId[u] else { throw QATError("\(file): model.unk_token \"\(u)\" is not in the vocabulary") }
            unkId = id
        } else {
            unkId = nil
        }

        normalizer = try Normalizer.parse(root["normalizer"], file: file)
        steps = try Tokenizer.parsePreTokenizer(root["pre_tokenizer"], file: file)
        guard steps.contains(where: { if case .byteLevel = $0 { return true } else { return false } }) else {
            throw QATError.unsupported("\(file): pre_tokenizer has no ByteLevel step; only byte-level BPE tokenizers are supported")
        }
        try Tokenizer.checkDecoder(root["decoder"], file: file)

        // EOS: tokenizer_config.json's eos_token if it names a known token.
        var eos: Int32? = tokenToId["<|endoftext|>"]
        let configPath = ((file as NSString).deletingLastPathComponent as NSString).appendingPathComponent("tokenizer_config.json")
        if let data = FileManager.default.contents(atPath: configPath),
            let cfg = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        {
            let name = (cfg["eos_token"] as? String) ?? ((cfg["eos_token"] as? [String: Any])?["content"] as? String)
            if let name, let id = tokenToId[name] { eos = id }
        }
        eosTokenId = eos
    }

    // MARK: - Public API

    /// The id of a token string (a vocabulary entry in byte-level form, e.g. "Ġthe", or an
    /// added token such as "<|endoftext|>").
    public func tokenId(_ token: String) -> Int32? { tokenToId[token] }

    /// The token string of an id (byte-level form), nil when no token has it.
    public func token(_ id: Int32) -> String? {
        id >= 0 && Int(id) < idToToken.count ? idToToken[Int(id)] : nil
    }

    /// Token ids of `text`; no BOS/EOS or other special tokens are added.
    public func encode(_ text: String) -> [Int32] {
        var out: [Int32] = []
        out.reserveCapacity(text.utf8.count / 3 + 4)
        let scalars = Array(text.unicodeScalars)
        added.split(scalars[...]) { segment, addedId in
            if let addedId { out.append(addedId); return }
            if let normalizer {
                let normalized = Array(normalizer.apply(segment).unicodeScalars)
                PreTokenizerStep.run(steps, from: 0, on: normalized[...]) { encodePiece($0, into: &out) }
            } else {
                PreTokenizerStep.run(steps, from: 0, on: segment) { encodePiece($0, into: &out) }
            }
        }
        return out
    }

    /// The text of `ids`: the UTF-8 bytes of their tokens, joined, with invalid UTF-8 (a
    /// multi-byte character cut between ids) replaced by U+FFFD, as `tokenizers` does.
    /// Special tokens are included; an id no token has decodes to U+FFFD so it shows.
    public func decode(_ ids: [Int32]) -> String {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(ids.count * 4)
        for id in ids {
            if id >= 0 && Int(id) < idToBytes.count && idToToken[Int(id)] != nil {
                bytes.append(contentsOf: idToBytes[Int(id)])
            } else {
                bytes.append(contentsOf: [0xEF, 0xBF, 0xBD])
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    // MARK: - BPE

    private func encodePiece(_ piece: ArraySlice<Unicode.Scalar>, into out: inout [Int32]) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(piece.count)
        for s in piece {
            if s.value < 0x80 { bytes.append(UInt8(s.value)) } else { UTF8.encode(s) { bytes.append($0) } }
        }
        let cacheable = bytes.count <= Tokenizer.cacheMaxPieceBytes
        if cacheable {
            cacheLock.lock()
            let hit = cache[bytes]
            cacheLock.unlock()
            if let hit { out.append(contentsOf: hit); return }
        }
        let ids = bpe(bytes)
        out.append(contentsOf: ids)
        if cacheable {
            cacheLock.lock()
            if cache.count >= Tokenizer.cacheLimit { cache.removeAll(keepingCapacity: true) }
            cache[bytes] = ids
            cacheLock.unlock()
        }
    }

    /// BPE over one piece's bytes: start from one symbol per byte and repeatedly merge the
    /// adjacent pair of lowest rank (leftmost on ties) until no pair has a merge.
    /// This simple quadratic loop is what short pieces (words) need; a piece of more than
    /// 64 bytes (a long run of punctuation or a URL) uses the heap version instead.
    public func bpe(_ bytes: [UInt8]) -> [Int32] {
        if ignoreMerges, let id = tokenToId[ByteLevel.encode(bytes)] { return [id] }
        var symbols: [Int32] = []
        symbols.reserveCapacity(bytes.count)
        var lastWasUnk = false
        for b in bytes {
            var id = byteIds[Int(b)]
            if id < 0, let fb = byteFallbackIds { id = fb[Int(b)] }
            if id < 0 {
                // `tokenizers` drops a character the vocabulary lacks when there is no unk
                // token; byte-level vocabularies hold all 256, so this is for odd files only.
                guard let unk = unkId else { continue }
                if fuseUnk && lastWasUnk { continue }
                symbols.append(unk)
                lastWasUnk = true
            } else {
                symbols.append(id)
                lastWasUnk = false
            }
        }
        if symbols.count < 2 { return symbols }
        if symbols.count > 64 { return bpeHeap(symbols) }
        while symbols.count > 1 {
            var bestRank = Int32.max, bestAt = -1, bestId: Int32 = 0
            for k in 0..<(symbols.count - 1) {
                let key = UInt64(UInt32(symbols[k])) << 32 | UInt64(UInt32(symbols[k + 1]))
                if let m = merges[key], m.rank < bestRank { bestRank = m.rank; bestAt = k; bestId = m.id }
            }
            if bestAt < 0 { break }
            symbols[bestAt] = bestId
            symbols.remove(at: bestAt + 1)
        }
        return symbols
    }

    /// The same merges in O(n log n): a doubly linked list of symbols and a min-heap of
    /// candidate pairs ordered by (rank, position); stale entries (a side already merged
    /// into something else) are recognised by their ids no longer matching and skipped.
    private func bpeHeap(_ initial: [Int32]) -> [Int32] {
        var ids = initial
        let n = ids.count
        var prev = (0..<n).map { $0 - 1 }
        var next = (0..<n).map { $0 + 1 }
        var alive = [Bool](repeating: true, count: n)
        struct Cand { var rank: Int32; var pos: Int; var left: Int32; var right: Int32; var out: Int32 }
        var heap: [Cand] = []
        func less(_ a: Cand, _ b: Cand) -> Bool { a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos }
        func push(_ c: Cand) {
            heap.append(c)
            var i = heap.count - 1
            while i > 0 { let p = (i - 1) / 2; if less(heap[i], heap[p]) { heap.swapAt(i, p); i = p } else { break } }
        }
        func pop() -> Cand {
            let top = heap[0]
            heap[0] = heap[heap.count - 1]
            heap.removeLast()
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count && less(heap[l], heap[m]) { m = l }
                if r < heap.count && less(heap[r], heap[m]) { m = r }
                if m == i { break }
                heap.swapAt(i, m); i = m
            }
            return top
        }
        func candidate(_ i: Int) {
            let j = next[i]
            guard j < n else { return }
            let key = UInt64(UInt32(ids[i])) << 32 | UInt64(UInt32(ids[j]))
            if let m = merges[key] { push(Cand(rank: m.rank, pos: i, left: ids[i], right: ids[j], out: m.id)) }
        }
        for i in 0..<(n - 1) { candidate(i) }
        while !heap.isEmpty {
            let c = pop()
            let i = c.pos
            guard alive[i], ids[i] == c.left, next[i] < n, ids[next[i]] == c.right else { continue }
            let j = next[i]
            ids[i] = c.out
            alive[j] = false
            next[i] = next[j]
            if next[j] < n { prev[next[j]] = i }
            if prev[i] >= 0 { candidate(prev[i]) }
            candidate(i)
        }
        var out: [Int32] = []
        var i = 0
        while i < n { out.append(ids[i]); i = next[i] }
        return out
    }

    // MARK: - Parsing helpers

    private static func parsePreTokenizer(_ value: Any?, file: String) throws -> [PreTokenizerStep] {
        guard let value, !(value is NSNull) else {
            throw QATError.unsupported(
                "\(file): pre_tokenizer is null; only byte-level BPE tokenizers (with a ByteLevel pre-tokenizer) are supported")
        }
        guard let obj = value as? [String: Any], let type = obj["type"] as? String else {
            throw QATError("\(file): pre_tokenizer has no \"type\"")
        }
        switch type {
        case "Sequence":
            guard let list = obj["pretokenizers"] as? [Any] else {
                throw QATError("\(file): pre_tokenizer Sequence has no \"pretokenizers\" list")
            }
            return try list.flatMap { try parsePreTokenizer($0, file: file) }
        case "ByteLevel":
            return [
                .byteLevel(
                    addPrefixSpace: (obj["add_prefix_space"] as? Bool) ?? false,
                    useRegex: (obj["use_regex"] as? Bool) ?? true)
            ]
        case "Split":
            if let invert = obj["invert"] as? Bool, invert {
                throw QATError.unsupported("\(file): pre_tokenizer Split with invert = true is not supported")
            }
            let behavior = (obj["behavior"] as? String) ?? "Isolated"
            guard behavior == "Isolated" || behavior == "Removed" else {
                throw QATError.unsupported("\(file): pre_tokenizer Split behavior \"\(behavior)\" is not supported (Isolated, Removed are)")
            }
            guard let pattern = obj["pattern"] as? [String: Any] else {
                throw QATError("\(file): pre_tokenizer Split has no \"pattern\" object")
            }
            let p: SplitPattern
            if let re = pattern["Regex"] as? String {
                p = try SplitPattern.regex(re)
            } else if let s = pattern["String"] as? String, !s.isEmpty {
                p = .literal(Array(s.unicodeScalars))
            } else {
                throw QATError("\(file): pre_tokenizer Split pattern has neither \"Regex\" nor a non-empty \"String\"")
            }
            return [.split(p, removeMatches: behavior == "Removed")]
        default:
            throw QATError.unsupported("\(file): pre_tokenizer type \(type) is not supported (ByteLevel, Split, Sequence are)")
        }
    }

    private static func checkDecoder(_ value: Any?, file: String) throws {
        guard let obj = value as? [String: Any] else {
            throw QATError("\(file): decoder is missing; a byte-level tokenizer needs the ByteLevel decoder")
        }
        let type = (obj["type"] as? String) ?? "?"
        if type == "ByteLevel" { return }
        if type == "Sequence", let list = obj["decoders"] as? [Any], list.count == 1 {
            return try checkDecoder(list[0], file: file)
        }
        throw QATError.unsupported("\(file): decoder type \(type) is not supported (only ByteLevel)")
    }
}

/// Reads required keys from JSONSerialization output, with errors naming the key.
private struct JSONReader {
    let file: String
    func object(_ o: [String: Any], _ key: String, in parent: String? = nil) throws -> [String: Any] {
        let name = parent.map { "\($0).\(key)" } ?? key
        guard let v = o[key] else { throw QATError("\(file): missing key \"\(name)\"") }
        guard let obj = v as? [String: Any] else { throw QATError("\(file): \"\(name)\" is not a JSON object") }
        return obj
    }
    func array(_ o: [String: Any], _ key: String, in parent: String? = nil) throws -> [Any] {
        let name = parent.map { "\($0).\(key)" } ?? key
        guard let v = o[key] else { throw QATError("\(file): missing key \"\(name)\"") }
        guard let arr = v as? [Any] else { throw QATError("\(file): \"\(name)\" is not a JSON array") }
        return arr
    }
}

/// Unicode normalizers of tokenizer.json (`NFC`, `NFD`, `NFKC`, `NFKD`, `Lowercase`, and a
/// `Sequence` of them), applied to the text between added tokens.
enum Normalizer {
    case nfc, nfd, nfkc, nfkd, lowercase
    indirect case sequence([Normalizer])

    static func parse(_ value: Any?, file: String) throws -> Normalizer? {
        guard let value, !(value is NSNull) else { return nil }
        guard let obj = value as? [String: Any], let type = obj["type"] as? String else {
            throw QATError("\(file): normalizer has no \"type\"")
        }
        switch type {
        case "NFC": return .nfc
        case "NFD": return .nfd
        case "NFKC": return .nfkc
        case "NFKD": return .nfkd
        case "Lowercase": return .lowercase
        case "Sequence":
            guard let list = obj["normalizers"] as? [Any] else {
                throw QATError("\(file): normalizer Sequence has no \"normalizers\" list")
            }
            let parts = try list.compactMap { try parse($0, file: file) }
            return parts.isEmpty ? nil : .sequence(parts)
        default:
            throw QATError.unsupported("\(file): normalizer type \(type) is not supported (NFC, NFD, NFKC, NFKD, Lowercase, Sequence are)")
        }
    }

    func apply(_ s: ArraySlice<Unicode.Scalar>) -> String {
        var view = String.UnicodeScalarView()
        view.append(contentsOf: s)
        return apply(String(view))
    }

    func apply(_ s: String) -> String {
        switch self {
        case .nfc: return s.precomposedStringWithCanonicalMapping
        case .nfd: return s.decomposedStringWithCanonicalMapping
        case .nfkc: return s.precomposedStringWithCompatibilityMapping
        case .nfkd: return s.decomposedStringWithCompatibilityMapping
        case .lowercase: return s.lowercased()
        case .sequence(let list): return list.reduce(s) { $1.apply($0) }
        }
    }
}

/// Finds added tokens in text, leftmost-longest like the `tokenizers` Aho-Corasick matcher,
/// honouring `single_word` (no word character on either side), `lstrip` and `rstrip`
/// (the match swallows adjacent whitespace, which therefore is not tokenized).
struct AddedTokenMatcher {
    struct Token { let content: [Unicode.Scalar]; let id: Int32; let singleWord, lstrip, rstrip: Bool }
    /// Candidates by first scalar, longest first.
    private let byFirst: [Unicode.Scalar: [Token]]

    init(_ tokens: [Token]) {
        var d: [Unicode.Scalar: [Token]] = [:]
        for t in tokens { d[t.content[0], default: []].append(t) }
        byFirst = d.mapValues { $0.sorted { $0.content.count > $1.content.count } }
    }

    private static func isWordChar(_ s: Unicode.Scalar) -> Bool {
        s == "_" || !ScalarClass.of(s).intersection([.letter, .number]).isEmpty
    }

    /// Calls `emit` for each segment in order: plain text with nil, or an added token's id.
    func split(_ s: ArraySlice<Unicode.Scalar>, _ emit: (ArraySlice<Unicode.Scalar>, Int32?) -> Void) {
        if byFirst.isEmpty { emit(s, nil); return }
        var segStart = s.startIndex
        var i = s.startIndex
        let n = s.endIndex
        while i < n {
            guard let cands = byFirst[s[i]] else { i += 1; continue }
            var matched: Token? = nil
            for t in cands where i + t.content.count <= n && s[i..<(i + t.content.count)].elementsEqual(t.content) {
                if t.singleWord {
                    let before = i > s.startIndex && Self.isWordChar(s[i - 1])
                    let after = i + t.content.count < n && Self.isWordChar(s[i + t.content.count])
                    if before || after { continue }
                }
                matched = t
                break
            }
            guard let t = matched else { i += 1; continue }
            var start = i, end = i + t.content.count
            if t.lstrip { while start > segStart && ScalarClass.of(s[start - 1]).contains(.space) { start -= 1 } }
            if t.rstrip { while end < n && ScalarClass.of(s[end]).contains(.space) { end += 1 } }
            if start > segStart { emit(s[segStart..<start], nil) }
            emit(s[start..<end], t.id)
            segStart = end
            i = end
        }
        if segStart < n { emit(s[segStart..<n], nil) }
    }
}
