import Foundation
import QATCore
import QATData
import QATModels

/// An offline teacher cache: per position of every packed training sequence, the teacher's
/// top-k token ids and their log-probabilities, so that QAD can run without the teacher.
///
/// Layout (HDF5, every dataset chunked one sequence per chunk and gzip-compressed):
/// - `input_ids`      int32   [S, L]    the tokens of each sequence (checked against the batch)
/// - `topk_ids`       int32   [S, L, K] ids, by decreasing log-probability (ties: lower id first)
/// - `topk_logprobs`  float32 [S, L, K] log_softmax(teacher logits) at T = 1 over the FULL
///   vocabulary (so Σ_k exp < 1; the loss renormalises over the k entries at its temperature)
/// - root string attributes: `format`, `seq_len`, `top_k`, `vocab_size`, `sequences`,
///   `data`, `split`, `model`, `temperature` ("1"), `positions`.
///
/// Sequence i is tokens [i·L, (i+1)·L) of the stream, S = ⌊(N−1)/L⌋ — exactly the
/// trainer's `DataLoader` packing — and row t of a sequence holds the teacher's distribution
/// at position t, i.e. its prediction of token t+1 (the same shift as every KD path). The
/// last row of each sequence is stored too; the trainer's targets ignore it.
public enum TopKCache {
    public static let format = "qat-topk-logprobs-v1"

    public struct Header: Sendable, Equatable {
        public var seqLen: Int
        public var topK: Int
        public var vocabSize: Int
        public var sequences: Int
        public var data: String
        public var split: String
        public var model: String
        public init(seqLen: Int, topK: Int, vocabSize: Int, sequences: Int, data: String = "", split: String = "", model: String = "") {
            self.seqLen = seqLen; self.topK = topK; self.vocabSize = vocabSize; self.sequences = sequences
            self.data = data; self.split = split; self.model = model
        }
    }

    /// Runs `teacher` forward-only over the packed sequences of `stream` (batches of
    /// `batchSize`, lm_head in chunks of `budgetBytes` of logits) and writes the cache to
    /// `path`. The file is written under a temporary name and renamed at the end, so an
    /// interrupted run leaves no cache that looks complete.
    @discardableResult
    public static func write(
        teacher: CausalLM, stream: [Int32], seqLen: Int, topK: Int, to path: String, batchSize: Int = 8,
        maxSequences: Int? = nil, dataPath: String = "", split: String = "", modelPath: String = "",
        budgetBytes: Int = 32 << 20, progress: ((_ done: Int, _ total: Int) -> Void)? = nil
    ) throws -> Header {
        let V = teacher.config.vocabSize
        guard seqLen >= 2 else { throw QATError("seq_len must be at least 2 (got \(seqLen))") }
        guard batchSize >= 1 else { throw QATError("batch size must be at least 1 (got \(batchSize))") }
        guard topK >= 1, topK <= V else { throw QATError("top-k must be in 1…\(V) (the teacher's vocabulary), got \(topK)") }
        if let m = maxSequences, m < 1 { throw QATError("max-sequences must be at least 1 (got \(m))") }
        var S = stream.count > 0 ? (stream.count - 1) / seqLen : 0
        guard S >= 1 else {
            throw QATError("the stream has \(stream.count) tokens: not one sequence of \(seqLen) (+1); use more data or a smaller seq_len")
        }
        if let m = maxSequences { S = min(S, m) }
        let header = Header(seqLen: seqLen, topK: topK, vocabSize: V, sequences: S, data: dataPath, split: split, model: modelPath)

        let tmp = path + ".partial"
        try? FileManager.default.removeItem(atPath: tmp)
        do {
            let f = try HDF5File(path: tmp, mode: .create)
            try f.createDataset("input_ids", of: Int32.self, shape: [S, seqLen], chunkRows: 1, gzipLevel: 4)
            try f.createDataset("topk_ids", of: Int32.self, shape: [S, seqLen, topK], chunkRows: 1, gzipLevel: 4)
            try f.createDataset("topk_logprobs", of: Float.self, shape: [S, seqLen, topK], chunkRows: 1, gzipLevel: 4)
            let attrs: [(String, String)] = [
                ("format", format), ("seq_len", String(seqLen)), ("top_k", String(topK)), ("vocab_size", String(V)),
                ("sequences", String(S)), ("data", dataPath), ("split", split), ("model", modelPath), ("temperature", "1"),
                ("positions", "row t of a sequence: the teacher's distribution of token t+1 (log_softmax over the full vocabulary)"),
            ]
            for (k, v) in attrs { try f.setAttribute(k, v) }

            let chunkRows = max(1, budgetBytes / max(1, V * 4))
            let logits = Tensor(shape: [chunkRows * V], zeroed: false)
            var done = 0
            progress?(0, S)
            while done < S {
                let b = min(batchSize, S - done)
                let tokens = Array(stream[(done * seqLen)..<((done + b) * seqLen)])
                let n = b * seqLen
                let hidden = try teacher.forward(tokens: tokens, batch: b, seqLen: seqLen, saveForBackward: false)
                var ids = [Int32](repeating: 0, count: n * topK)
                var lps = [Float](repeating: 0, count: n * topK)
                let C = teacher.config.hiddenSize
                var start = 0
                while start < n {
                    let rows = min(chunkRows, n - start)
                    try teacher.lmHead.forward(hidden + start * C, out: logits.data, n: rows)
                    ids.withUnsafeMutableBufferPointer { ib in
                        lps.withUnsafeMutableBufferPointer { lb in
                            selectTopK(logits: logits.data, n: rows, vocab: V, topK: topK,
                                       ids: ib.baseAddress! + start * topK, logprobs: lb.baseAddress! + start * topK)
                        }
                    }
                    start += rows
                }
                try f.writeRows("input_ids", at: done, values: tokens)
                try f.writeRows("topk_ids", at: done, values: ids)
                try f.writeRows("topk_logprobs", at: done, values: lps)
                done += b
                progress?(done, S)
            }
            try f.flush()
        } catch {
            try? FileManager.default.removeItem(atPath: tmp)
            throw error
        }
        // The HDF5 handle is closed (scope ended) before the rename.
        try? FileManager.default.removeItem(atPath: path)
        do { try FileManager.default.moveItem(atPath: tmp, toPath: path) } catch {
            throw QATError("cannot move the finished cache \(tmp) to \(path): \(error.localizedDescription)")
        }
        return header
    }

    /// Per row of `logits` [n, V]: the `topK` largest entries by decreasing value (ties: the
    /// lower id first) and their log_softmax over all V entries. Rows in parallel; each
    /// worker keeps one min-heap of size k (O(V log k) worst case, O(V) typical).
    public static func selectTopK(logits: UnsafePointer<Float>, n: Int, vocab V: Int, topK K: Int,
                                  ids: UnsafeMutablePointer<Int32>, logprobs: UnsafeMutablePointer<Float>) {
        let zp = SendablePointer(UnsafeMutablePointer(mutating: logits)), ip = SendablePointer(ids), lp = SendablePointer(logprobs)
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

private extension UnsafeMutablePointer {
    @inline(__always) func swapAt(_ i: Int, _ j: Int) { let t = self[i]; self[i] = self[j]; self[j] = t }
}

/// Reads a `TopKCache` file: header from its attributes (validated against the datasets'
/// shapes), rows one sequence at a time.
public final class TopKCacheReader {
    public let path: String
    public let header: TopKCache.Header
    private let file: HDF5File

    public init(path: String) throws {
        let file = try HDF5File(path: path, mode: .readOnly)
        func attr(_ a: String) throws -> String {
            do { return try file.stringAttribute(a) } catch {
                throw QATError("\(path): not a qat teacher-logprobs cache (attribute '\(a)' missing); write one with `qat teacher-logprobs`")
            }
        }
        func int(_ a: String) throws -> Int {
            let s = try attr(a)
            guard let v = Int(s), v >= 1 else { throw QATError("\(path): attribute \(a) = \"\(s)\" is not a positive integer") }
            return v
        }
        let fmt = try attr("format")
        guard fmt == TopKCache.format else {
            throw QATError("\(path): cache format \"\(fmt)\" is not \(TopKCache.format); rewrite it with this version's `qat teacher-logprobs`")
        }
        let h = TopKCache.Header(seqLen: try int("seq_len"), topK: try int("top_k"), vocabSize: try int("vocab_size"),
                                 sequences: try int("sequences"), data: (try? file.stringAttribute("data")) ?? "",
                                 split: (try? file.stringAttribute("split")) ?? "", model: (try? file.stringAttribute("model")) ?? "")
        let expect: [(String, [Int])] = [("input_ids", [h.sequences, h.seqLen]), ("topk_ids", [h.sequences, h.seqLen, h.topK]),
                                         ("topk_logprobs", [h.sequences, h.seqLen, h.topK])]
        for (name, shape) in expect {
            let info = try file.info(name)
            guard info.shape == shape else {
                throw QATError("\(path): dataset '\(name)' has shape \(info.shape), but the attributes imply \(shape); the cache is incomplete or corrupt")
            }
        }
        self.file = file
        self.path = path
        header = h
    }

    /// Tokens [L], ids [L·K] and log-probabilities [L·K] of packed sequence `index`.
    public func sequence(_ index: Int) throws -> (tokens: [Int32], ids: [Int32], logprobs: [Float]) {
        guard index >= 0, index < header.sequences else {
            throw QATError("\(path): sequence \(index) is not in the cache (it holds \(header.sequences) sequences of \(header.seqLen)); it was built from less data, or with --max-sequences")
        }
        let r = index..<(index + 1)
        return (try file.readRows("input_ids", rows: r), try file.readRows("topk_ids", rows: r), try file.readRows("topk_logprobs", rows: r))
    }
}
