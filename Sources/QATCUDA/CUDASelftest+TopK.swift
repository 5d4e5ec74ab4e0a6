import CCUDA
import Foundation
import QATCore
import QATModels
import QATTrain

/// `qat selftest --device cuda`, top-k distillation: the row kernel of every top-k objective
/// and the top-k selection against the CPU's (`TopKKernels.rows`, `TopKCache.selectTopK`), the
/// whole-model QAD gradient from a teacher cache, and a cache written on the GPU against one
/// written on the CPU.
extension CUDASelftest {
    /// The kernel checks (called from `run`).
    mutating func topKKernels() throws {
        for objective in Recipe.TopKObjective.allCases {
            for (V, K, T, ratio) in [
                (1000, 1, 1.0, 1.0), (1000, 8, 2.0, 0.5), (1003, 64, 1.0, 0.7), (1000, 300, 0.5, 1.0), (4099, 64, 1.5, 0.3),
            ] {
                try topKRowCheck(objective, vocab: V, topK: K, temperature: T, kdRatio: ratio)
            }
        }
        for (V, K, n, ties) in [
            (1000, 1, 12, false), (1000, 64, 12, true), (4099, 300, 8, true), (1000, 1000, 6, true), (5000, 2048, 4, true),
            (777, 5, 9, true), (151_936, 256, 3, false), (151_936, 64, 3, true),
        ] {
            try topKSelectCheck(vocab: V, topK: K, rows: n, ties: ties)
        }
    }

    /// `topk_kd_rows` against `TopKKernels.rows` on rows that cover the kernel's branches: ignored
    /// targets, absent slots, a row without teacher support, a target inside the top-k, and (for
    /// coarse_kl) a student whose top-k holds > 99.9% of its mass (the tail summed directly).
    private mutating func topKRowCheck(_ objective: Recipe.TopKObjective, vocab V: Int, topK K: Int, temperature T: Double, kdRatio: Double)
        throws
    {
        let n = 10
        var s = Self.random(n * V, seed: UInt64(V + K), scale: 2)
        let u = Self.random(n * V, seed: UInt64(V * 3 + K), scale: 3)
        var ids = [Int32](repeating: 0, count: n * K), lps = [Float](repeating: 0, count: n * K)
        var rest = [Float](repeating: 0, count: n), counts = [Float](repeating: 0, count: n * K)
        if objective == .sampled {
            TopKCache.sampleRows(logits: u, n: n, vocab: V, draws: K, seed: 5, firstRow: 0, ids: &ids, logprobs: &lps, counts: &counts)
            for i in ids.indices where counts[i] == 0 { ids[i] = -1 }  // as TopKCacheReader reads empty slots
        } else {
            TopKCache.selectTopK(logits: u, n: n, vocab: V, topK: K, ids: &ids, logprobs: &lps, restLogprob: &rest)
        }
        if K > 2 { ids[5 * K] = -1; ids[5 * K + 2] = -1 }  // absent slots (masked ids)
        for i in 0..<K { ids[6 * K + i] = -1 }  // no teacher support
        for i in 0..<K where ids[8 * K + i] >= 0 { s[8 * V + Int(ids[8 * K + i])] += 20 }  // the student's mass on the top-k
        var g = SplitMix64(seed: UInt64(K))
        var targets = (0..<n).map { _ in Int32(g.next() % UInt64(V)) }
        targets[3] = CrossEntropy.ignoreIndex
        if ids[9 * K] >= 0 { targets[9] = ids[9 * K] }
        let valid = targets.filter { $0 != CrossEntropy.ignoreIndex }.count, gradScale = 1 / Float(valid)
        var spec = Recipe.DistillSpec()
        spec.temperature = T; spec.kdRatio = kdRatio; spec.topkObjective = objective
        let k = try DistillationConstants(spec: spec)
        var cpuGrad = s
        let cpu = cpuGrad.withUnsafeMutableBufferPointer { sb in
            rest.withUnsafeBufferPointer { rb in
                counts.withUnsafeBufferPointer { cb in
                    TopKKernels.rows(
                        objective, student: sb.baseAddress!, n: n, vocab: V, ids: ids, logprobs: lps,
                        rest: objective == .coarseKL ? rb.baseAddress! : nil, counts: objective == .sampled ? cb.baseAddress! : nil,
                        topK: K, targets: targets, k: k, gradScale: gradScale)
                }
            }
        }
        let sd = try gpu(s), idd = try DeviceBuffer(device, ints: ids), ld = try gpu(lps), rd = try gpu(rest), cd = try gpu(counts)
        let td = try DeviceBuffer(device, ints: targets), out = try DeviceBuffer(device, bytes: n * 16)
        let slots = try DeviceBuffer(device, floats: 2 * n * K)
        try device.topKDistillationRows(
            rowOut: out.ptr, student: sd.ptr, ids: idd.ptr, logprobs: ld.ptr, rest: objective == .coarseKL ? rd.ptr : 0,
            counts: objective == .sampled ? cd.ptr : 0, slots: slots.ptr, targets: td.ptr, rows: n, vocab: V, topK: K,
            objective: CUDAModel.topKObjectiveCode(objective), invT: 1 / T, cKD: Float(kdRatio * Double(gradScale) * T),
            cCE: Float((1 - kdRatio) * Double(gradScale)), computeCE: kdRatio < 1)
        var ce = 0.0, kd = 0.0
        try device.addDistillationSums(out.ptr, targets: targets[0..<n], temperature: T, ce: &ce, kd: &kd)
        let label = "top-k row \(objective.rawValue) V=\(V) k=\(K) T=\(T) kd_ratio=\(kdRatio)"
        add("\(label): loss", (abs(ce - cpu.ce) + abs(kd - cpu.kd)) / Double(valid), 5e-6, "|Δ| mean")
        let scale = max(Double(cpuGrad.map { abs($0) }.max() ?? 0), 1e-30)
        add("\(label): gradient, relative", Self.maxAbsDiff(cpuGrad, try sd.floats(n * V)) / scale, 1e-5, "max |Δ|/max")
    }

    /// `topk_select_rows` against `TopKCache.selectTopK` on the same logits: ids (in order) equal,
    /// log-probabilities and rest masses within fp32 round-off. `ties`: values on a 0.25 grid (many
    /// ties, broken by id), a row of ±0 alternating and a constant row.
    private mutating func topKSelectCheck(vocab V: Int, topK K: Int, rows n: Int, ties: Bool) throws {
        var x = Self.random(n * V, seed: UInt64(V * 7 + K), scale: 3)
        if ties {
            for i in x.indices { x[i] = (x[i] * 4).rounded() / 4 }
            for j in 0..<V { x[j] = j % 2 == 0 ? -0.0 : 0.0; x[V + j] = 1.5 }
        }
        var ids = [Int32](repeating: 0, count: n * K), lps = [Float](repeating: 0, count: n * K), rest = [Float](repeating: 0, count: n)
        TopKCache.selectTopK(logits: x, n: n, vocab: V, topK: K, ids: &ids, logprobs: &lps, restLogprob: &rest)
        let xd = try gpu(x), idd = try DeviceBuffer(device, bytes: n * K * 4), ld = try DeviceBuffer(device, floats: n * K)
        let rd = try DeviceBuffer(device, floats: n)
        try device.topKSelect(ids: idd.ptr, logprobs: ld.ptr, rest: rd.ptr, logits: xd.ptr, rows: n, vocab: V, topK: K)
        var gi = [Int32](repeating: 0, count: n * K)
        try gi.withUnsafeMutableBytes { try idd.download($0.baseAddress!, bytes: $0.count) }
        let label = "top-k select V=\(V) k=\(K)\(ties ? " (ties)" : "")"
        add("\(label): ids ≠", Double(zip(ids, gi).filter { $0 != $1 }.count), 0, "slots")
        add("\(label): log-probs", Self.maxAbsDiff(lps, try ld.floats(n * K)), 1e-5)
        add("\(label): rest", Self.maxDiffInfinite(rest, try rd.floats(n)), 1e-5)
    }

    /// max |a − b| where equal infinities count as 0 (a rest mass is −∞ when k = V).
    static func maxDiffInfinite(_ a: [Float], _ b: [Float]) -> Double {
        guard a.count == b.count else { return .nan }
        var m = 0.0
        for (x, y) in zip(a, b) {
            if x == y { continue }
            let d = Double(abs(x - y))
            if d.isNaN { return .nan }
            m = max(m, d)
        }
        return m
    }

    /// The whole-model QAD gradient from a teacher cache (each objective; CE and KD, T ≠ 1) on the
    /// tiny-qwen3 shape, and a cache written by the GPU teacher against the CPU's.
    mutating func topKTraining() throws {
        let (batch, seqLen) = (2, 40)
        let config = Self.modelConfigs[1].1
        let student = try Self.selftestModel(config), teacher = try CausalLM(config: config, seed: 31, std: 0.08)
        var g = SplitMix64(seed: 23)
        let stream = (0..<(batch * seqLen + 1)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
        let tokens = Array(stream[0..<(batch * seqLen)])
        var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: batch, seqLen: seqLen)
        targets[5] = CrossEntropy.ignoreIndex
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qat-selftest-topk-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let top = dir.appendingPathComponent("top32.h5").path, sampled = dir.appendingPathComponent("sampled16.h5").path
        try TopKCache.write(teacher: teacher, stream: stream, seqLen: seqLen, topK: 32, to: top)
        try TopKCache.write(teacher: teacher, stream: stream, seqLen: seqLen, topK: 16, to: sampled, sampled: true, seed: 3)
        for (objective, path, T, ratio) in [
            (Recipe.TopKObjective.coarseKL, top, 2.0, 0.5), (.bothNormalized, top, 1.0, 1.0), (.teacherNormalized, top, 1.5, 0.7),
            (.sampled, sampled, 1.0, 0.5),
        ] {
            var spec = Recipe.DistillSpec()
            spec.topkObjective = objective; spec.temperature = T; spec.kdRatio = ratio
            let loss = try TopKDistillationLoss(cache: path, studentVocab: config.vocabSize, seqLen: seqLen, spec: spec)
            try gradientCheck(
                "tiny-qwen3 QAD top-k \(objective.rawValue)", model: student, tokens: tokens, targets: targets, batch: batch,
                seqLen: seqLen, loss: loss)
        }
        try teacherCacheCheck(teacher, stream: stream, batch: batch, seqLen: seqLen, topK: 32, dir: dir)
    }

    /// `qat teacher-logprobs --device cuda`'s path (`CUDAModel.topKRows` through `TopKCache.write`)
    /// against the CPU's cache, read back: ids equal in every row whose k-th and (k+1)-th teacher
    /// logits are not within the forwards' difference, log-probs and rest masses within the
    /// storage's rounding (float16, relative 2⁻¹⁰).
    private mutating func teacherCacheCheck(_ teacher: CausalLM, stream: [Int32], batch: Int, seqLen: Int, topK K: Int, dir: URL) throws {
        let cpuPath = dir.appendingPathComponent("cpu.h5").path, gpuPath = dir.appendingPathComponent("gpu.h5").path
        try TopKCache.write(teacher: teacher, stream: stream, seqLen: seqLen, topK: K, to: cpuPath, logprobStorage: .float16)
        let gm = try CUDAModel(model: teacher, device: device, precision: .fp32)
        try TopKCache.write(
            teacher: teacher, stream: stream, seqLen: seqLen, topK: K, to: gpuPath, logprobStorage: .float16,
            topKOf: { tokens, b in try gm.topKRows(tokens: tokens, batch: b, seqLen: seqLen, topK: K) })
        let tokens = Array(stream[0..<(batch * seqLen)])
        let logits = try hostLogits(teacher, tokens, batch, seqLen), V = teacher.config.vocabSize
        let a = try TopKCacheReader(path: cpuPath), b = try TopKCacheReader(path: gpuPath)
        var idsDiffer = 0, ambiguous = 0, lpError = 0.0, restError = 0.0
        for q in 0..<batch {
            let x = try a.sequence(q), y = try b.sequence(q)
            for t in 0..<seqLen {
                let row = Array(logits[((q * seqLen + t) * V)..<((q * seqLen + t + 1) * V)]).sorted(by: >)
                if row[K - 1] - row[K] < 1e-4 { ambiguous += 1; continue }
                let r = (t * K)..<((t + 1) * K)
                if x.ids[r] != y.ids[r] { idsDiffer += 1; continue }
                for i in r { lpError = max(lpError, Double(abs(x.logprobs[i] - y.logprobs[i]) / max(abs(x.logprobs[i]), 1e-3))) }
                restError = max(restError, Double(abs(x.restLogprob[t] - y.restLogprob[t]) / max(abs(x.restLogprob[t]), 1e-3)))
            }
        }
        let label = "teacher cache GPU vs CPU k=\(K) (\(ambiguous) near-tie rows skipped)"
        add("\(label): rows with other ids", Double(idsDiffer), 0, "rows")
        add("\(label): log-probs, relative", lpError, 2.0 / 1024, "max |Δ|/|ℓ|")
        add("\(label): rest, relative", restError, 2.0 / 1024, "max |Δ|/|ℓ|")
    }
}
