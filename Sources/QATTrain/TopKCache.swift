import Foundation
import QATCore
import QATData
import QATModels

/// An offline teacher cache: per position of every packed training sequence, a sparse view
/// of the teacher's distribution (its top-k tokens, or tokens sampled from it), so that QAD
/// can run without the teacher.
///
/// Layout, version 2 (HDF5; every dataset chunked one sequence per chunk, byte-shuffled and
/// deflated; ids are uint16 when the vocabulary has at most 65,536 tokens, else int32):
/// - `input_ids`      [S, L]       the tokens of each sequence (checked against the batch)
/// - `topk_ids`       [S, L, K]    the k ids of each position in increasing id order (sorted
///   ids compress to about 0.9 byte each, ids by rank to 1.4)
/// - `topk_logprobs`  [S, L, K]    their log_softmax(teacher logits) at T = 1 over the FULL
///   vocabulary (so Σ_k exp < 1), bfloat16 by default (`logprob_dtype` attribute; float16 on
///   request: 8 more bits of mantissa, a 25% larger cache)
/// - kind `topk`: `rest_logprob` float16 [S, L]: log of the teacher's mass outside the k ids,
///   log Σ_{j∉top-k} p_j, computed in Double from the full logits (−∞ when k = V). Deriving it
///   from the rounded log-probs would lose it exactly where it is small; stored as a log, its
///   float16 rounding is a relative error of at most 0.4% of the mass for masses above e^-8.
/// - kind `sampled`: `sample_counts` uint16 [S, L, K]: K draws with replacement from the
///   teacher's T = 1 distribution; slot i holds a distinct drawn id (increasing, empty slots
///   last) and how often it was drawn (0 = an empty slot, id 0), so Σ counts = K. counts/K is
///   an unbiased estimate of p.
/// - root string attributes: `format` ("qat-topk-logprobs"), `version` ("2"), `kind`,
///   `seq_len`, `top_k` (K), `vocab_size`, `sequences`, `data`, `split`, `model`,
///   `temperature` ("1"), `logprob_dtype`, `positions`, and for `sampled` `seed`.
///
/// Version 1 (`format` = "qat-topk-logprobs-v1": int32 ids, float32 log-probs, no rest mass)
/// is still read: its rest mass is derived as log(1 − Σ_k exp ℓ_k) from the float32 values.
///
/// Sequence i is tokens [i·L, (i+1)·L) of the stream, S = ⌊(N−1)/L⌋ — exactly the
/// trainer's `DataLoader` packing — and row t of a sequence holds the teacher's distribution
/// at position t, i.e. its prediction of token t+1 (the same shift as every KD path). The
/// last row of each sequence is stored too; the trainer's targets ignore it.
public enum TopKCache {
    public static let format = "qat-topk-logprobs"
    public static let formatV1 = "qat-topk-logprobs-v1"
    public static let version = 2

    /// What a cache holds per position: the teacher's k most likely tokens, or k draws from it.
    public enum Kind: String, Sendable, Equatable { case topK = "topk", sampled }

    public struct Header: Sendable, Equatable {
        public var seqLen: Int
        public var topK: Int
        public var vocabSize: Int
        public var sequences: Int
        public var data: String
        public var split: String
        public var model: String
        public var version: Int
        public var kind: Kind
        public init(
            seqLen: Int, topK: Int, vocabSize: Int, sequences: Int, data: String = "", split: String = "", model: String = "",
            version: Int = TopKCache.version, kind: Kind = .topK
        ) {
            self.seqLen = seqLen; self.topK = topK; self.vocabSize = vocabSize; self.sequences = sequences
            self.data = data; self.split = split; self.model = model; self.version = version; self.kind = kind
        }
    }

    /// Runs `teacher` forward-only over the packed sequences of `stream` (batches of
    /// `batchSize`, lm_head in chunks of `budgetBytes` of logits) and writes the cache to
    /// `path`: the top-`topK` per position, or with `sampled` `topK` draws per position
    /// (seeded by `seed`, the sequence and the position, so a cache is reproducible). The file
    /// is written under a temporary name and renamed at the end, so an interrupted run leaves
    /// no cache that looks complete. `topKOf` (a device's teacher, e.g. `CUDAModel.topKRows`)
    /// replaces the host forward and `selectTopK` for a top-k cache: given a batch's tokens and
    /// sequence count it returns what `selectTopK` writes for those rows.
    @discardableResult
    public static func write(
        teacher: CausalLM, stream: [Int32], seqLen: Int, topK: Int, to path: String, batchSize: Int = 8,
        maxSequences: Int? = nil, dataPath: String = "", split: String = "", modelPath: String = "",
        sampled: Bool = false, seed: UInt64 = 0, logprobStorage: HDF5File.Storage = .bfloat16,
        budgetBytes: Int = 32 << 20, progress: ((_ done: Int, _ total: Int) -> Void)? = nil,
        topKOf: ((_ tokens: [Int32], _ batch: Int) throws -> (ids: [Int32], logprobs: [Float], rest: [Float]))? = nil
    ) throws -> Header {
        if topKOf != nil, sampled { throw QATError.internal("TopKCache.write: a device top-k for a sampled cache") }
        let V = teacher.config.vocabSize
        guard seqLen >= 2 else { throw QATError("seq_len must be at least 2 (got \(seqLen))") }
        guard batchSize >= 1 else { throw QATError("batch size must be at least 1 (got \(batchSize))") }
        if sampled {
            guard topK >= 1, topK <= 65535 else { throw QATError("the number of draws must be in 1…65535, got \(topK)") }
        } else {
            guard topK >= 1, topK <= V else { throw QATError("top-k must be in 1…\(V) (the teacher's vocabulary), got \(topK)") }
        }
        if let m = maxSequences, m < 1 { throw QATError("max-sequences must be at least 1 (got \(m))") }
        var S = stream.count > 0 ? (stream.count - 1) / seqLen : 0
        guard S >= 1 else {
            throw QATError("the stream has \(stream.count) tokens: not one sequence of \(seqLen) (+1); use more data or a smaller seq_len")
        }
        if let m = maxSequences { S = min(S, m) }
        let kind: Kind = sampled ? .sampled : .topK
        let header = Header(
            seqLen: seqLen, topK: topK, vocabSize: V, sequences: S, data: dataPath, split: split, model: modelPath, kind: kind)

        return try atomically(path) { tmp in
            let w = try CacheWriter(path: tmp, header: header, storage: logprobStorage, seed: seed)
            let chunkRows = max(1, budgetBytes / max(1, V * 4))
            let logits = Tensor(shape: [chunkRows * V], zeroed: false)
            var done = 0
            progress?(0, S)
            while done < S {
                let b = min(batchSize, S - done)
                let tokens = Array(stream[(done * seqLen)..<((done + b) * seqLen)])
                let n = b * seqLen
                if let topKOf {
                    var d = try topKOf(tokens, b)
                    guard d.ids.count == n * topK, d.logprobs.count == n * topK, d.rest.count == n else {
                        throw QATError.internal("device top-k: \(d.ids.count) ids, \(d.rest.count) rest masses for \(n) rows of \(topK)")
                    }
                    try w.append(at: done, tokens: tokens, ids: &d.ids, logprobs: &d.logprobs, extra: &d.rest)
                    done += b
                    progress?(done, S)
                    continue
                }
                let hidden = try teacher.forward(tokens: tokens, batch: b, seqLen: seqLen, saveForBackward: false)
                var ids = [Int32](repeating: 0, count: n * topK)
                var lps = [Float](repeating: 0, count: n * topK)
                var extra = [Float](repeating: 0, count: sampled ? n * topK : n)
                let C = teacher.config.hiddenSize
                var start = 0
                while start < n {
                    let rows = min(chunkRows, n - start)
                    try teacher.lmHead.forward(hidden + start * C, out: logits.data, n: rows)
                    ids.withUnsafeMutableBufferPointer { ib in
                        lps.withUnsafeMutableBufferPointer { lb in
                            extra.withUnsafeMutableBufferPointer { eb in
                                if sampled {
                                    sampleRows(
                                        logits: logits.data, n: rows, vocab: V, draws: topK, seed: seed, firstRow: done * seqLen + start,
                                        ids: ib.baseAddress! + start * topK, logprobs: lb.baseAddress! + start * topK,
                                        counts: eb.baseAddress! + start * topK)
                                } else {
                                    selectTopK(
                                        logits: logits.data, n: rows, vocab: V, topK: topK, ids: ib.baseAddress! + start * topK,
                                        logprobs: lb.baseAddress! + start * topK, restLogprob: eb.baseAddress! + start)
                                }
                            }
                        }
                    }
                    start += rows
                }
                try w.append(at: done, tokens: tokens, ids: &ids, logprobs: &lps, extra: &extra)
                done += b
                progress?(done, S)
            }
            try w.file.flush()
            return header
        }
    }

    /// A smaller cache from a version-2 one, without the teacher: a top-k cache keeps its
    /// `topK` most likely entries (ties: lower id) and folds the others into the rest mass
    /// (log(e^rest + Σ e^ℓ) of the stored, rounded values); a sampled cache keeps `topK` of
    /// its draws, a uniformly random subset without replacement (seeded by the position), which
    /// are again independent draws from the teacher.
    @discardableResult
    public static func narrow(from source: String, to path: String, topK: Int) throws -> Header {
        let r = try TopKCacheReader(path: source)
        var h = r.header
        guard h.version >= 2 else { throw QATError("\(source) is a version-1 cache; rewrite it with `qat teacher-logprobs`") }
        guard topK >= 1, topK <= h.topK else { throw QATError("--top-k \(topK) must be in 1…\(h.topK) (the entries of \(source))") }
        let K0 = h.topK, L = h.seqLen
        h.topK = topK
        let seed = r.seed
        return try atomically(path) { tmp in
            let w = try CacheWriter(path: tmp, header: h, storage: r.logprobStorage, seed: seed)
            for i in 0..<h.sequences {
                let row = try r.sequence(i)
                var ids = [Int32](repeating: 0, count: L * topK), lps = [Float](repeating: 0, count: L * topK)
                var extra = [Float](repeating: 0, count: h.kind == .sampled ? L * topK : L)
                for t in 0..<L {
                    let b = t * K0, o = t * topK
                    if h.kind == .topK {
                        let order = (0..<K0).sorted { x, y in
                            row.logprobs[b + x] > row.logprobs[b + y]
                                || (row.logprobs[b + x] == row.logprobs[b + y] && row.ids[b + x] < row.ids[b + y])
                        }
                        var m = Double(row.restLogprob[t])
                        for x in order[topK...] { m = max(m, Double(row.logprobs[b + x])) }
                        var sum = 0.0
                        if m > -.infinity {
                            sum = exp(Double(row.restLogprob[t]) - m)
                            for x in order[topK...] { sum += exp(Double(row.logprobs[b + x]) - m) }
                        }
                        extra[t] = m > -.infinity ? Float(m + log(sum)) : -.infinity
                        for (j, x) in order[..<topK].enumerated() { ids[o + j] = row.ids[b + x]; lps[o + j] = row.logprobs[b + x] }
                    } else {
                        var draws = [Int]()
                        for x in 0..<K0 where row.ids[b + x] >= 0 { draws += Array(repeating: x, count: Int(row.counts[b + x])) }
                        var g = SplitMix64(seed: seed &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(i * L + t) &+ 0xA5A5)
                        draws.shuffle(using: &g)
                        var hits = [Int: Int]()
                        for x in draws.prefix(topK) { hits[x, default: 0] += 1 }
                        for (j, x) in hits.keys.sorted().enumerated() {
                            ids[o + j] = row.ids[b + x]; lps[o + j] = row.logprobs[b + x]; extra[o + j] = Float(hits[x]!)
                        }
                    }
                }
                try w.append(at: i, tokens: row.tokens, ids: &ids, logprobs: &lps, extra: &extra)
            }
            try w.file.flush()
            return h
        }
    }

    /// Runs `body` on `path + ".partial"`, then renames it to `path`; on error removes it.
    static func atomically(_ path: String, _ body: (String) throws -> Header) throws -> Header {
        let tmp = path + ".partial"
        try? FileManager.default.removeItem(atPath: tmp)
        let h: Header
        do { h = try body(tmp) } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw error
        }
        // The HDF5 handle is closed (body returned) before the rename.
        try? FileManager.default.removeItem(atPath: path)
        do { try FileManager.default.moveItem(atPath: tmp, toPath: path) } catch {
            throw QATError("cannot move the finished cache \(tmp) to \(path): \(error.localizedDescription)")
        }
        return h
    }

    /// Creates the datasets and attributes of a version-2 cache and appends sequences.
    final class CacheWriter {
        let file: HDF5File
        let header: Header
        let storage: HDF5File.Storage
        let narrowIDs: Bool

        init(path: String, header h: Header, storage: HDF5File.Storage, seed: UInt64) throws {
            file = try HDF5File(path: path, mode: .create)
            header = h; self.storage = storage
            narrowIDs = h.vocabSize <= 65536
            let S = h.sequences, L = h.seqLen, K = h.topK
            func create<T: HDF5Scalar>(_ name: String, _ t: T.Type, _ shape: [Int], _ storage: HDF5File.Storage? = nil) throws {
                try file.createDataset(name, of: t, shape: shape, chunkRows: 1, gzipLevel: 6, shuffle: true, storage: storage)
            }
            if narrowIDs {
                try create("input_ids", UInt16.self, [S, L]); try create("topk_ids", UInt16.self, [S, L, K])
            } else {
                try create("input_ids", Int32.self, [S, L]); try create("topk_ids", Int32.self, [S, L, K])
            }
            try create("topk_logprobs", Float.self, [S, L, K], storage)
            if h.kind == .sampled {
                try create("sample_counts", UInt16.self, [S, L, K])
            } else {
                try create("rest_logprob", Float.self, [S, L], .float16)
            }
            var attrs: [(String, String)] = [
                ("format", format), ("version", String(version)), ("kind", h.kind.rawValue),
                ("seq_len", String(L)), ("top_k", String(K)), ("vocab_size", String(h.vocabSize)),
                ("sequences", String(S)), ("data", h.data), ("split", h.split), ("model", h.model), ("temperature", "1"),
                ("logprob_dtype", storage == .bfloat16 ? "bfloat16" : "float16"),
                ("positions", "row t of a sequence: the teacher's distribution of token t+1 (log_softmax over the full vocabulary)"),
            ]
            if h.kind == .sampled { attrs.append(("seed", String(seed))) }
            for (k, v) in attrs { try file.setAttribute(k, v) }
        }

        /// Sequences from `row` on: tokens [b·L], ids and log-probs [b·L·K] (any slot order),
        /// extra: rest log-masses [b·L] or counts [b·L·K]. Slots are sorted by id here.
        func append(at row: Int, tokens: [Int32], ids: inout [Int32], logprobs: inout [Float], extra: inout [Float]) throws {
            let n = tokens.count, K = header.topK
            if header.kind == .sampled {
                sortByID(n: n, topK: K, ids: &ids, logprobs: &logprobs, counts: &extra)
            } else {
                var none = [Float]()
                sortByID(n: n, topK: K, ids: &ids, logprobs: &logprobs, counts: &none)
            }
            func writeIDs(_ name: String, _ v: [Int32]) throws {
                if narrowIDs {
                    try file.writeRows(name, at: row, values: v.map { UInt16(truncatingIfNeeded: $0) })
                } else {
                    try file.writeRows(name, at: row, values: v)
                }
            }
            let round: (Float) -> Float = storage == .bfloat16 ? { bf16ToFloat(floatToBF16($0)) } : { roundToF16($0) }
            try writeIDs("input_ids", tokens)
            try writeIDs("topk_ids", ids)
            try file.writeRows("topk_logprobs", at: row, values: logprobs.map(round))
            if header.kind == .sampled {
                try file.writeRows("sample_counts", at: row, values: extra.map { UInt16($0) })
            } else {
                try file.writeRows("rest_logprob", at: row, values: extra.map(roundToF16))
            }
        }
    }

    /// A float32 value rounded to the nearest float16 (clamped to its finite range; −∞ stays).
    static func roundToF16(_ x: Float) -> Float {
        x == -.infinity ? x : Float(Float16(min(max(x, -65504), 65504)))
    }

    /// Reorders each row's k slots by increasing id; with `counts` ([n·K], or empty), empty
    /// slots (count 0) go last and the counts move with their ids.
    static func sortByID(n: Int, topK K: Int, ids: inout [Int32], logprobs: inout [Float], counts: inout [Float]) {
        let hasCounts = !counts.isEmpty
        var order = [Int](repeating: 0, count: K)
        var ti = [Int32](repeating: 0, count: K), tl = [Float](repeating: 0, count: K), tc = [Float](repeating: 0, count: K)
        ids.withUnsafeMutableBufferPointer { ip in
            logprobs.withUnsafeMutableBufferPointer { lp in
                counts.withUnsafeMutableBufferPointer { cp in
                    for r in 0..<n {
                        let b = r * K
                        for i in 0..<K { order[i] = i }
                        order.sort { x, y in
                            let ex = hasCounts && cp[b + x] == 0, ey = hasCounts && cp[b + y] == 0
                            if ex != ey { return !ex }
                            return ip[b + x] < ip[b + y] || (ip[b + x] == ip[b + y] && x < y)
                        }
                        for i in 0..<K { ti[i] = ip[b + order[i]]; tl[i] = lp[b + order[i]]; if hasCounts { tc[i] = cp[b + order[i]] } }
                        for i in 0..<K { ip[b + i] = ti[i]; lp[b + i] = tl[i]; if hasCounts { cp[b + i] = tc[i] } }
                    }
                }
            }
        }
    }

    /// Per row of `logits` [n, V]: `draws` draws with replacement from softmax(row), by a
    /// generator seeded from (`seed`, `firstRow` + row): the distinct drawn ids by decreasing
    /// log-probability (ties: lower id first), their log_softmax and their counts (as Float),
    /// empty slots (fewer distinct ids than draws) id 0, count 0, log-prob 0.
    public static func sampleRows(
        logits: UnsafePointer<Float>, n: Int, vocab V: Int, draws K: Int, seed: UInt64, firstRow: Int,
        ids: UnsafeMutablePointer<Int32>, logprobs: UnsafeMutablePointer<Float>,
        counts: UnsafeMutablePointer<Float>
    ) {
        let zp = SendablePointer(UnsafeMutablePointer(mutating: logits)), ip = SendablePointer(ids), lp = SendablePointer(logprobs)
        let cp = SendablePointer(counts)
        Parallel.forRange(n, costPerItem: V * 4) { lo, hi in
            var cdf = [Double](repeating: 0, count: V)
            var u = [Double](repeating: 0, count: K)
            var hits = [Int32: Int]()
            for r in lo..<hi {
                let z = zp.p + r * V
                var mx = -Float.infinity
                for j in 0..<V { mx = max(mx, z[j]) }
                var sum = 0.0
                for j in 0..<V { sum += Double(expf(z[j] - mx)); cdf[j] = sum }
                let lse = Double(mx) + log(sum)
                var rng = SplitMix64(seed: seed &* 0xD1B5_4A32_D192_ED03 &+ UInt64(firstRow + r))
                for d in 0..<K { u[d] = Double(rng.next() >> 11) * 0x1p-53 * sum }
                u.sort()
                hits.removeAll(keepingCapacity: true)
                var j = 0
                for d in 0..<K {
                    while j < V - 1 && cdf[j] <= u[d] { j += 1 }
                    hits[Int32(j), default: 0] += 1
                }
                let order = hits.keys.sorted { z[Int($0)] > z[Int($1)] || (z[Int($0)] == z[Int($1)] && $0 < $1) }
                for s in 0..<K {
                    let o = r * K + s
                    if s < order.count {
                        let id = order[s]
                        ip.p[o] = id; lp.p[o] = Float(Double(z[Int(id)]) - lse); cp.p[o] = Float(hits[id]!)
                    } else {
                        ip.p[o] = 0; lp.p[o] = 0; cp.p[o] = 0
                    }
                }
            }
        }
    }

    /// Per row of `logits` [n, V]: the `topK` largest entries by decreasing value (ties: the
    /// lower id first) and their log_softmax over all V entries; with `restLogprob`, per row
    /// the log of the mass outside the k entries, log Σ_{j∉top-k} softmax_j, summed directly
    /// over those entries in Double (no cancellation; −∞ when k = V). Rows in parallel; each
    /// worker keeps one min-heap of size k (O(V log k) worst case, O(V) typical).
    public static func selectTopK(
        logits: UnsafePointer<Float>, n: Int, vocab V: Int, topK K: Int,
        ids: UnsafeMutablePointer<Int32>, logprobs: UnsafeMutablePointer<Float>,
        restLogprob: UnsafeMutablePointer<Float>? = nil
    ) {
        let zp = SendablePointer(UnsafeMutablePointer(mutating: logits)), ip = SendablePointer(ids), lp = SendablePointer(logprobs)
        let rp = restLogprob.map { SendablePointer($0) }
        Parallel.forRange(n, costPerItem: V * 4) { lo, hi in
            let hv = UnsafeMutablePointer<Float>.allocate(capacity: K), hi_ = UnsafeMutablePointer<Int32>.allocate(capacity: K)
            defer { hv.deallocate(); hi_.deallocate() }
            for r in lo..<hi {
                let z = zp.p + r * V
                // "a before b in the heap" = a is worse: smaller value, or equal value and larger id.
                @inline(__always) func worse(_ a: Int, _ b: Int) -> Bool { hv[a] < hv[b] || (hv[a] == hv[b] && hi_[a] > hi_[b]) }
                @inline(__always) func siftDown(_ i0: Int, _ count: Int) {
                    var i = i0
                    while true {
                        let l = 2 * i + 1, rr = l + 1
                        var m = i
                        if l < count, worse(l, m) { m = l }
                        if rr < count, worse(rr, m) { m = rr }
                        if m == i { return }
                        hv.swapAt(i, m); hi_.swapAt(i, m); i = m
                    }
                }
                var mx = -Float.infinity
                for j in 0..<K { hv[j] = z[j]; hi_[j] = Int32(j) }
                for i in stride(from: K / 2 - 1, through: 0, by: -1) { siftDown(i, K) }
                for j in 0..<V {
                    let v = z[j]
                    mx = max(mx, v)
                    // Later ids lose ties, so only a strictly larger value enters.
                    if j >= K, v > hv[0] { hv[0] = v; hi_[0] = Int32(j); siftDown(0, K) }
                }
                var sum = 0.0
                for j in 0..<V { sum += Double(expf(z[j] - mx)) }
                let lse = Double(mx) + log(sum)
                if let rp {
                    // The heap holds the top k: sum every other entry. A tie with the heap's
                    // worst value at a larger id is outside; `worse` orders ties by id.
                    let vMin = hv[0], iMin = hi_[0]
                    var rest = 0.0
                    for j in 0..<V {
                        let v = z[j]
                        if v < vMin || (v == vMin && Int32(j) > iMin) { rest += Double(expf(v - mx)) }
                    }
                    rp.p[r] = Float(log(rest) + Double(mx) - lse)
                }
                // Pop the worst first: fill from the back for decreasing order.
                var count = K
                while count > 0 {
                    let o = r * K + count - 1
                    ip.p[o] = hi_[0]
                    lp.p[o] = Float(Double(hv[0]) - lse)
                    count -= 1
                    hv[0] = hv[count]; hi_[0] = hi_[count]
                    siftDown(0, count)
                }
            }
        }
    }
}

extension UnsafeMutablePointer {
    @inline(__always) fileprivate func swapAt(_ i: Int, _ j: Int) { let t = self[i]; self[i] = self[j]; self[j] = t }
}

/// One packed sequence of a cache: tokens [L], ids [L·K] (−1: an empty slot), T = 1
/// log-probabilities [L·K]; for a top-k cache the log rest mass per position [L], for a
/// sampled one the draw counts [L·K] (0 for an empty slot).
public struct TopKCacheRow: Sendable {
    public var tokens: [Int32]
    public var ids: [Int32]
    public var logprobs: [Float]
    public var restLogprob: [Float]
    public var counts: [Float]
}

/// Reads a `TopKCache` file (version 2, or version 1 with the rest mass derived): header from
/// its attributes (validated against the datasets' shapes), rows one sequence at a time.
public final class TopKCacheReader {
    public let path: String
    public let header: TopKCache.Header
    /// The seed of a sampled cache's draws (0 otherwise) and how the log-probs are stored.
    public let seed: UInt64
    public let logprobStorage: HDF5File.Storage
    private let file: HDF5File

    public init(path: String) throws {
        let file = try HDF5File(path: path, mode: .readOnly)
        func attr(_ a: String) throws -> String {
            do { return try file.stringAttribute(a) } catch {
                throw QATError(
                    "\(path): not a qat teacher-logprobs cache (attribute '\(a)' missing); write one with `qat teacher-logprobs`")
            }
        }
        func int(_ a: String) throws -> Int {
            let s = try attr(a)
            guard let v = Int(s), v >= 1 else { throw QATError("\(path): attribute \(a) = \"\(s)\" is not a positive integer") }
            return v
        }
        let fmt = try attr("format")
        let version: Int
        var kind = TopKCache.Kind.topK
        if fmt == TopKCache.formatV1 {
            version = 1
        } else if fmt == TopKCache.format {
            version = try int("version")
            guard version == TopKCache.version else {
                throw QATError(
                    "\(path): cache version \(version) is not one this qat reads (1 or \(TopKCache.version)); "
                        + "rewrite it with this version's `qat teacher-logprobs`")
            }
            let k = try attr("kind")
            guard let kk = TopKCache.Kind(rawValue: k) else {
                throw QATError("\(path): cache kind \"\(k)\" is not topk or sampled; rewrite it with `qat teacher-logprobs`")
            }
            kind = kk
        } else {
            throw QATError(
                "\(path): cache format \"\(fmt)\" is not \(TopKCache.format); rewrite it with this version's `qat teacher-logprobs`")
        }
        let h = TopKCache.Header(
            seqLen: try int("seq_len"), topK: try int("top_k"), vocabSize: try int("vocab_size"),
            sequences: try int("sequences"), data: (try? file.stringAttribute("data")) ?? "",
            split: (try? file.stringAttribute("split")) ?? "", model: (try? file.stringAttribute("model")) ?? "",
            version: version, kind: kind)
        var expect: [(String, [Int])] = [
            ("input_ids", [h.sequences, h.seqLen]), ("topk_ids", [h.sequences, h.seqLen, h.topK]),
            ("topk_logprobs", [h.sequences, h.seqLen, h.topK]),
        ]
        if version >= 2 {
            expect.append(
                kind == .sampled ? ("sample_counts", [h.sequences, h.seqLen, h.topK]) : ("rest_logprob", [h.sequences, h.seqLen]))
        }
        for (name, shape) in expect {
            let info = try file.info(name)
            guard info.shape == shape else {
                throw QATError(
                    "\(path): dataset '\(name)' has shape \(info.shape), but the attributes imply \(shape); "
                        + "the cache is incomplete or corrupt")
            }
        }
        self.file = file
        self.path = path
        header = h
        seed = UInt64((try? file.stringAttribute("seed")) ?? "0") ?? 0
        logprobStorage = (try? file.stringAttribute("logprob_dtype")) == "float16" ? .float16 : .bfloat16
    }

    /// Packed sequence `index`. A version-1 cache's rest mass is log(1 − Σ_k exp ℓ_k) in
    /// Double (−∞ when the k entries hold all the mass to float32 precision, k·1.2e-7).
    public func sequence(_ index: Int) throws -> TopKCacheRow {
        guard index >= 0, index < header.sequences else {
            throw QATError(
                "\(path): sequence \(index) is not in the cache (it holds \(header.sequences) sequences "
                    + "of \(header.seqLen)); it was built from less data, or with --max-sequences")
        }
        let r = index..<(index + 1)
        let K = header.topK
        var row = TopKCacheRow(
            tokens: try file.readRows("input_ids", rows: r), ids: try file.readRows("topk_ids", rows: r),
            logprobs: try file.readRows("topk_logprobs", rows: r), restLogprob: [], counts: [])
        switch (header.version, header.kind) {
        case (1, _):
            row.restLogprob = (0..<header.seqLen).map { t in
                var sum = 0.0
                for i in 0..<K { sum += exp(Double(row.logprobs[t * K + i])) }
                // Below ~K float32 roundings of the k log-probs, the difference is noise.
                let rest = 1 - sum
                return rest > Double(K) * 1.2e-7 ? Float(log(rest)) : -Float.infinity
            }
        case (_, .topK):
            row.restLogprob = try file.readRows("rest_logprob", rows: r)
        case (_, .sampled):
            let c: [UInt16] = try file.readRows("sample_counts", rows: r)
            row.counts = c.map(Float.init)
            for i in row.ids.indices where c[i] == 0 { row.ids[i] = -1 }
        }
        return row
    }
}
