import CCUDA
import Foundation
import QATCore
import QATModels
import QATTrain

/// Host wrappers of the top-k kernels (`Kernels/topk.cu`).
extension CUDADevice {
    /// The largest k `topKSelect` handles (its candidates are sorted in shared memory).
    public static let topKSelectMaxK = 2048

    /// The top-k objectives' row kernel (`TopKKernels.row`): rowOut gets (CE, KD before T²) per row
    /// as doubles; `slots` is scratch of 2·rows·topK floats; `rest` / `counts` may be 0 when the
    /// objective does not read them.
    func topKDistillationRows(
        rowOut: CUdeviceptr, student: CUdeviceptr, ids: CUdeviceptr, logprobs: CUdeviceptr, rest: CUdeviceptr, counts: CUdeviceptr,
        slots: CUdeviceptr, targets: CUdeviceptr, rows: Int, vocab: Int, topK: Int, objective: Int, invT: Double, cKD: Float, cCE: Float,
        computeCE: Bool
    ) throws {
        try kernels.launch(
            "topk_kd_rows", grid: (rows, 1, 1), block: (512, 1, 1),
            [
                .ptr(rowOut), .ptr(student), .ptr(ids), .ptr(logprobs), .ptr(rest), .ptr(counts), .ptr(slots), .ptr(targets),
                .i32(rows), .i32(vocab), .i32(topK), .i32(objective), .f64(invT), .f32(cKD), .f32(cCE), .i32(computeCE ? 1 : 0),
            ])
    }

    /// Per row of `logits` [rows, V]: the top-k ids and log-probabilities by decreasing value (ties:
    /// the lower id first) and, when `rest` is not 0, the log rest mass (`TopKCache.selectTopK`).
    func topKSelect(ids: CUdeviceptr, logprobs: CUdeviceptr, rest: CUdeviceptr, logits: CUdeviceptr, rows: Int, vocab: Int, topK: Int)
        throws
    {
        guard topK >= 1, topK <= min(vocab, Self.topKSelectMaxK) else {
            throw QATError.unsupported(
                "top-k \(topK) on the GPU: k must be in 1…\(min(vocab, Self.topKSelectMaxK)) (a larger k runs on the CPU: --device cpu)")
        }
        try kernels.launch(
            "topk_select_rows", grid: (rows, 1, 1), block: (512, 1, 1),
            [.ptr(ids), .ptr(logprobs), .ptr(rest), .ptr(logits), .i32(rows), .i32(vocab), .i32(topK), .i32(rest == 0 ? 0 : 1)])
    }
}

extension CUDAModel {
    /// A micro-batch's teacher-cache rows on the device (`TopKDistillationLoss.teacherRows`),
    /// for the `.topK` loss head.
    public struct TopKTeacher {
        let ids, logprobs, rest, counts: CUdeviceptr
        let topK: Int
        /// `topk_kd_rows`'s objective code.
        let objective: Int
        let temperature: Double
        let kdRatio: Double
    }

    /// `topk_kd_rows`'s code of an objective.
    public static func topKObjectiveCode(_ o: Recipe.TopKObjective) -> Int {
        switch o {
        case .coarseKL: return 0
        case .bothNormalized: return 1
        case .teacherNormalized: return 2
        case .sampled: return 3
        }
    }

    /// Uploads one micro-batch's cache rows: ids and log-probs [n·K], rest [n] (coarse_kl),
    /// counts [n·K] (sampled); the others may be empty.
    public func uploadTopKTeacher(
        ids: [Int32], logprobs: [Float], rest: [Float], counts: [Float], topK K: Int, objective: Recipe.TopKObjective,
        constants k: DistillationConstants
    ) throws -> TopKTeacher {
        guard ids.count == logprobs.count, ids.count % max(K, 1) == 0 else {
            throw QATError.internal("top-k teacher rows: \(ids.count) ids, \(logprobs.count) log-probs for k = \(K)")
        }
        func upload<T>(_ key: String, _ a: [T]) throws -> CUdeviceptr {
            guard !a.isEmpty else { return 0 }
            let p = try scratch(key, bytes: a.count * MemoryLayout<T>.stride)
            try a.withUnsafeBytes { try device.check(device.api.cuMemcpyHtoD(p, $0.baseAddress!, $0.count), "cuMemcpyHtoD(\(key))") }
            return p
        }
        let n = ids.count / max(K, 1)
        if objective == .coarseKL, rest.count != n {
            throw QATError.internal("top-k teacher rows: \(rest.count) rest masses for \(n) rows")
        }
        if objective == .sampled, counts.count != ids.count {
            throw QATError.internal("top-k teacher rows: \(counts.count) counts for \(ids.count) slots")
        }
        return TopKTeacher(
            ids: try upload("topk-ids", ids), logprobs: try upload("topk-logprobs", logprobs),
            rest: objective == .coarseKL ? try upload("topk-rest", rest) : 0,
            counts: objective == .sampled ? try upload("topk-counts", counts) : 0, topK: K,
            objective: Self.topKObjectiveCode(objective), temperature: k.temperature, kdRatio: k.kdRatio)
    }

    /// The `.topK` loss head over one chunk: rows start..<start+rows of the batch in `logits`
    /// (replaced by their gradient); returns (Σ CE, Σ T²·KD) over the chunk's valid rows.
    func topKChunk(
        _ t: TopKTeacher, logits: CUdeviceptr, targets: CUdeviceptr, hostTargets: [Int32], start: Int, rows: Int, gradScale: Float,
        rowOut: CUdeviceptr
    ) throws -> (ce: Double, kd: Double) {
        let K = t.topK, T = t.temperature
        let slots = try scratch("topk-slots", bytes: rows * 2 * K * 4)
        try device.topKDistillationRows(
            rowOut: rowOut, student: logits, ids: t.ids + CUdeviceptr(start * K * 4), logprobs: t.logprobs + CUdeviceptr(start * K * 4),
            rest: t.rest == 0 ? 0 : t.rest + CUdeviceptr(start * 4), counts: t.counts == 0 ? 0 : t.counts + CUdeviceptr(start * K * 4),
            slots: slots, targets: targets, rows: rows, vocab: config.vocabSize, topK: K, objective: t.objective, invT: 1 / T,
            cKD: Float(t.kdRatio * Double(gradScale) * T), cCE: Float((1 - t.kdRatio) * Double(gradScale)), computeCE: t.kdRatio < 1)
        var ce = 0.0, kd = 0.0
        try device.addDistillationSums(rowOut, targets: hostTargets[start..<(start + rows)], temperature: T, ce: &ce, kd: &kd)
        return (ce, kd)
    }

    /// The teacher's top-k of every position of `tokens` [batch, seqLen] (`qat teacher-logprobs
    /// --device cuda`): forward, lm_head in chunks, `topk_select_rows` per chunk. Returns ids and
    /// T = 1 log-probabilities [n·K] by decreasing value (ties: lower id) and the log rest masses
    /// [n], as `TopKCache.selectTopK` writes them.
    public func topKRows(tokens: [Int32], batch: Int, seqLen: Int, topK K: Int) throws -> (
        ids: [Int32], logprobs: [Float], rest: [Float]
    ) {
        let hidden = try forward(tokens: tokens, batch: batch, seqLen: seqLen)
        return try topKRows(hidden: hidden, n: batch * seqLen, topK: K)
    }

    /// As `topKRows(tokens:…)`, over `n` rows of final hidden states already on the device.
    func topKRows(hidden: CUdeviceptr, n: Int, topK K: Int) throws -> (ids: [Int32], logprobs: [Float], rest: [Float]) {
        guard let b = buffers else { throw QATError.internal("topKRows before a forward") }
        let V = config.vocabSize, C = config.hiddenSize, rows = chunkRows(n)
        let logits = try scratch("logits", bytes: rows * V * 4)
        let idsD = try scratch("select-ids", bytes: n * K * 4), lpD = try scratch("select-logprobs", bytes: n * K * 4)
        let restD = try scratch("select-rest", bytes: n * 4)
        var start = 0
        while start < n {
            let r = min(rows, n - start)
            let h16 = hidden == b.final.ptr ? b.final16.map { $0.ptr + CUdeviceptr(start * C * 2) } : nil
            try linear(model.lmHead, hidden + CUdeviceptr(start * C * 4), x16: h16, out: logits, n: r, buffers: b)
            try device.topKSelect(
                ids: idsD + CUdeviceptr(start * K * 4), logprobs: lpD + CUdeviceptr(start * K * 4), rest: restD + CUdeviceptr(start * 4),
                logits: logits, rows: r, vocab: V, topK: K)
            start += r
        }
        var ids = [Int32](repeating: 0, count: n * K), lps = [Float](repeating: 0, count: n * K), rest = [Float](repeating: 0, count: n)
        try ids.withUnsafeMutableBytes { try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, idsD, $0.count), "cuMemcpyDtoH") }
        try lps.withUnsafeMutableBytes { try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, lpD, $0.count), "cuMemcpyDtoH") }
        try rest.withUnsafeMutableBytes { try device.check(device.api.cuMemcpyDtoH($0.baseAddress!, restD, $0.count), "cuMemcpyDtoH") }
        return (ids, lps, rest)
    }
}
