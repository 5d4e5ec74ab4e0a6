import Foundation
import QATCore
import QATData
import QATModels
import QATTrain
import TestSupport
import XCTest

final class TopKDistillationTests: XCTestCase {
    let V = 64, L = 8

    func stream(_ n: Int, seed: UInt64 = 7) -> [Int32] {
        var rng = SplitMix64(seed: seed)
        return (0..<n).map { _ in Int32(rng.next() % 64) }
    }

    /// Teacher logits of one packed sequence in Double, [L, V].
    func teacherLogits(_ teacher: CausalLM, _ tokens: [Int32]) throws -> [Double] {
        let h = try teacher.forward(tokens: tokens, batch: 1, seqLen: tokens.count, saveForBackward: false)
        let out = Tensor(shape: [tokens.count, teacher.config.vocabSize])
        try teacher.lmHead.forward(h, out: out.data, n: tokens.count)
        return out.array.map(Double.init)
    }

    func writeCache(_ teacher: CausalLM, topK: Int, stream s: [Int32], maxSequences: Int? = nil, sampled: Bool = false) throws -> String {
        let path = Fixtures.tempDir("topk").appendingPathComponent("cache.h5").path
        try TopKCache.write(
            teacher: teacher, stream: s, seqLen: L, topK: topK, to: path, batchSize: 3, maxSequences: maxSequences,
            dataPath: "mem", split: "train", modelPath: "tiny", sampled: sampled, seed: 5, budgetBytes: 5 * V * 4)
        return path
    }

    /// A version-1 cache (int32 ids, float32 log-probs, no rest mass) as qat ≤ v1 wrote it.
    func writeV1Cache(_ teacher: CausalLM, topK K: Int, stream s: [Int32]) throws -> String {
        let S = (s.count - 1) / L
        let path = Fixtures.tempDir("topk-v1").appendingPathComponent("cache.h5").path
        let f = try HDF5File(path: path, mode: .create)
        try f.createDataset("input_ids", of: Int32.self, shape: [S, L], chunkRows: 1)
        try f.createDataset("topk_ids", of: Int32.self, shape: [S, L, K], chunkRows: 1)
        try f.createDataset("topk_logprobs", of: Float.self, shape: [S, L, K], chunkRows: 1)
        for (k, v) in [
            ("format", "qat-topk-logprobs-v1"), ("seq_len", String(L)), ("top_k", String(K)), ("vocab_size", String(V)),
            ("sequences", String(S)),
        ] { try f.setAttribute(k, v) }
        for i in 0..<S {
            let tokens = Array(s[(i * L)..<((i + 1) * L)])
            let z = try teacherLogits(teacher, tokens).map(Float.init)
            var ids = [Int32](repeating: 0, count: L * K), lps = [Float](repeating: 0, count: L * K)
            TopKCache.selectTopK(logits: z, n: L, vocab: V, topK: K, ids: &ids, logprobs: &lps)
            try f.writeRows("input_ids", at: i, values: tokens)
            try f.writeRows("topk_ids", at: i, values: ids)
            try f.writeRows("topk_logprobs", at: i, values: lps)
        }
        try f.flush()
        return path
    }

    /// The cache holds ⌊(N−1)/L⌋ sequences (DataLoader packing), the right attributes, the
    /// tokens, and per position the teacher's k largest logits by decreasing value with
    /// log_softmax over the full vocabulary (bfloat16), stored by increasing id, and the log of
    /// the mass outside them — checked against a direct teacher forward. Ids are uint16 here.
    func testCacheContents() throws {
        let teacher = try tinyModel(seed: 2)
        let s = stream(L * 5 + 1 + 3)  // 5 sequences (+1 and 3 spare tokens), batches of 3: 3 + 2
        let path = try writeCache(teacher, topK: 6, stream: s)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path + ".partial"))
        let r = try TopKCacheReader(path: path)
        XCTAssertEqual(
            r.header,
            TopKCache.Header(
                seqLen: L, topK: 6, vocabSize: V, sequences: 5, data: "mem", split: "train", model: "tiny",
                version: 2, kind: .topK))
        let f = try HDF5File(path: path)
        XCTAssertEqual(try f.info("topk_ids").shape, [5, L, 6])
        XCTAssertEqual(try f.info("topk_ids").typeName, "uint16")
        XCTAssertEqual(try f.info("input_ids").typeName, "uint16")
        XCTAssertEqual(try f.info("topk_logprobs").typeName, "float16")  // 2-byte float: bfloat16, per the attribute
        XCTAssertEqual(try f.stringAttribute("logprob_dtype"), "bfloat16")
        XCTAssertEqual(try f.info("rest_logprob").shape, [5, L])
        XCTAssertEqual(try f.stringAttribute("version"), "2")
        for i in 0..<5 {
            let seq = Array(s[(i * L)..<((i + 1) * L)])
            let row = try r.sequence(i)
            XCTAssertEqual(row.tokens, seq)
            let z = try teacherLogits(teacher, seq)
            for t in 0..<L {
                let zr = Array(z[(t * V)..<((t + 1) * V)])
                let lsm = DirectKD.logSoftmax(ArraySlice(zr))
                let order = (0..<V).sorted { zr[$0] > zr[$1] || (zr[$0] == zr[$1] && $0 < $1) }
                let top = order[..<6].sorted()
                for k in 0..<6 {
                    XCTAssertEqual(Int(row.ids[t * 6 + k]), top[k], "sequence \(i) position \(t) slot \(k)")
                    // bfloat16: 8 significant bits.
                    XCTAssertEqual(Double(row.logprobs[t * 6 + k]), lsm[top[k]], accuracy: 4e-3 * max(1, abs(lsm[top[k]])))
                }
                let rest = log(order[6...].reduce(0.0) { $0 + exp(lsm[$1]) })
                XCTAssertEqual(Double(row.restLogprob[t]), rest, accuracy: 1e-3 * max(1, abs(rest)))  // float16
            }
        }
        XCTAssertThrowsError(try r.sequence(5))
        // max-sequences limits the count.
        let p2 = try writeCache(teacher, topK: 2, stream: s, maxSequences: 2)
        XCTAssertEqual(try TopKCacheReader(path: p2).header.sequences, 2)
    }

    /// Selection order: decreasing value, ties to the lower id; log-probabilities over all V.
    func testSelectTopKTiesAndOrder() {
        let z: [Float] = [3, 1, 3, 1, 3, 1, -2, 0.5]
        var ids = [Int32](repeating: 0, count: 4), lps = [Float](repeating: 0, count: 4)
        var rest: Float = 0
        TopKCache.selectTopK(logits: z, n: 1, vocab: z.count, topK: 4, ids: &ids, logprobs: &lps, restLogprob: &rest)
        XCTAssertEqual(ids, [0, 2, 4, 1])
        let lse = log(z.reduce(0.0) { $0 + exp(Double($1)) })
        for (k, id) in ids.enumerated() { XCTAssertEqual(Double(lps[k]), Double(z[Int(id)]) - lse, accuracy: 1e-6) }
        // Outside: the tied 1s at ids 3 and 5, −2 and 0.5.
        XCTAssertEqual(Double(rest), log(2 * exp(1.0) + exp(-2.0) + exp(0.5)) - lse, accuracy: 1e-6)
        // k = V: nothing outside.
        var all = [Int32](repeating: 0, count: 8), allLps = [Float](repeating: 0, count: 8)
        TopKCache.selectTopK(logits: z, n: 1, vocab: 8, topK: 8, ids: &all, logprobs: &allLps, restLogprob: &rest)
        XCTAssertEqual(rest, -.infinity)
    }

    /// Every objective against its Double formula on cached rows (`TopKObjectiveReference`),
    /// at T ∈ {1, 2, 0.8} and kd_ratio ∈ {1, 0.5, 0}; gradients against finite differences;
    /// CE mixing; ignored rows.
    func testTopKObjectivesAgainstDoubleReference() throws {
        let teacher = try tinyModel(seed: 2)
        let s = stream(L * 6 + 1)
        let K = 5
        let topPath = try writeCache(teacher, topK: K, stream: s)
        let sampledPath = try writeCache(teacher, topK: 12, stream: s, sampled: true)
        let C = 8
        let n = 2 * L
        let indices = [4, 1]
        let tokens = indices.flatMap { Array(s[($0 * L)..<(($0 + 1) * L)]) }
        var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: 2, seqLen: L)
        targets[3] = -100
        let valid = targets.filter { $0 != -100 }.count
        for objective in Recipe.TopKObjective.allCases {
            for (T, r) in [(1.0, 1.0), (2.0, 0.5), (0.8, 0.0)] {
                var d = spec(.forwardKL, temperature: T, kdRatio: r)
                d.topkObjective = objective
                let path = objective == .sampled ? sampledPath : topPath
                let loss = try TopKDistillationLoss(
                    cache: path, studentVocab: V, seqLen: L, spec: d, sequenceCount: 6, budgetBytes: 3 * V * 4)
                let mb = MicroBatch(tokens: tokens, targets: targets, batch: 2, seqLen: L, sequenceIndices: indices)
                let rows = try loss.teacherRows(for: mb)
                let Kc = loss.reader.header.topK
                // A standalone student head over random hidden states.
                let w = Parameter(name: "lm_head.weight", value: Tensor(shape: [V, C], values: gaussians(V * C, std: 0.7, seed: 11)))
                w.setRequiresGrad(true)
                let head = Linear(name: "lm_head", weight: w, bias: nil)
                let hidden = gaussians(n * C, std: 1, seed: 12)
                var dH = [Float](repeating: .nan, count: n * C)
                let parts = try hidden.withUnsafeBufferPointer { h in
                    try dH.withUnsafeMutableBufferPointer {
                        try loss.fused(
                            student: head, hidden: h.baseAddress!, ids: rows.ids, logprobs: rows.logprobs, rest: rows.rest,
                            counts: rows.counts, targets: targets, n: n, gradScale: 1 / Float(valid), dHidden: $0.baseAddress!)
                    }
                }
                func direct(_ h: [Double], _ wd: [Double]) -> (total: Double, ce: Double, kd: Double) {
                    let sl = DirectKD.matmulT(h, wd, n: n, C: C, V: V)
                    var total = 0.0, ce = 0.0, kd = 0.0
                    for i in 0..<n where targets[i] != -100 {
                        let row = sl[(i * V)..<((i + 1) * V)]
                        let slot = (i * Kc)..<((i + 1) * Kc)
                        let kl = TopKObjectiveReference.kd(
                            objective, s: Array(row), ids: rows.ids[slot].map(Int.init),
                            logprobs: rows.logprobs[slot].map(Double.init),
                            rest: objective == .coarseKL ? Double(rows.rest[i]) : -.infinity,
                            counts: objective == .sampled ? rows.counts[slot].map(Double.init) : [], T: T)
                        let c = r < 1 ? -DirectKD.logSoftmax(row)[Int(targets[i])] : 0
                        total += (1 - r) * c + r * T * T * kl; ce += c; kd += T * T * kl
                    }
                    return (total, ce, kd)
                }
                let hD = hidden.map(Double.init), wD = w.value.array.map(Double.init)
                let want = direct(hD, wD)
                let label = "\(objective.rawValue) T \(T) kd_ratio \(r)"
                XCTAssertGreaterThan(want.kd, 1e-3, label)
                assertClose(parts.total, want.total, rel: 1e-5, "\(label) total")
                assertClose(parts.kd, want.kd, rel: 1e-5, "\(label) kd")
                if r == 1 { XCTAssertEqual(parts.ce, 0) } else { assertClose(parts.ce, want.ce, rel: 1e-5, "\(label) ce") }
                XCTAssertEqual(parts.valid, valid)
                let gs = 1 / Double(valid)
                assertClose(dH, finiteDifferences(hD) { direct($0, wD).total * gs }, rel: 2e-4, abs: 1e-7, "\(label) d hidden")
                assertClose(w.grad!.array, finiteDifferences(wD) { direct(hD, $0).total * gs }, rel: 2e-4, abs: 1e-7, "\(label) d lm_head")
            }
        }
    }

    /// With k = V every top-k objective is the full forward KL (coarse_kl: the rest bin is
    /// empty): the cached path (no teacher) and the live-teacher fused path agree on loss and
    /// every student gradient to round-off. The cache is a version-1 one (float32 log-probs,
    /// so the comparison is not limited by float16; its rest mass is derived on read).
    func testFullVocabTopKEqualsForwardKL() throws {
        let student = try tinyModel(seed: 1), teacher = try tinyModel(seed: 2)
        for p in student.parameters { p.setRequiresGrad(true) }
        let s = stream(L * 4 + 1, seed: 3)
        let path = try writeV1Cache(teacher, topK: V, stream: s)
        XCTAssertEqual(try TopKCacheReader(path: path).header.version, 1)
        let indices = [2, 0, 3]
        let B = indices.count
        let tokens = indices.flatMap { Array(s[($0 * L)..<(($0 + 1) * L)]) }
        var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: B, seqLen: L)
        targets[5] = -100
        let valid = targets.filter { $0 != -100 }.count
        let mb = MicroBatch(tokens: tokens, targets: targets, batch: B, seqLen: L, sequenceIndices: indices)
        for objective in [Recipe.TopKObjective.coarseKL, .teacherNormalized, .bothNormalized] {
            for (T, r) in [(1.0, 1.0), (2.0, 0.5)] {
                var d = spec(.forwardKL, temperature: T, kdRatio: r)
                d.topkObjective = objective
                let live = try DistillationLoss(teacher: teacher, studentVocab: V, spec: d, budgetBytes: 5 * 2 * V * 4)
                let cached = try TopKDistillationLoss(
                    cache: path, studentVocab: V, seqLen: L, spec: d, sequenceCount: 4, budgetBytes: 7 * V * 4)
                func pass(_ loss: TrainingLoss) throws -> (LossParts, [String: [Float]]) {
                    for p in student.parameters { p.grad?.zero() }
                    let h = try student.forward(tokens: tokens, batch: B, seqLen: L, saveForBackward: true)
                    let dH = Tensor(shape: [B * L, student.config.hiddenSize])
                    let parts = try loss.run(model: student, hidden: h, batch: mb, gradScale: 1 / Float(valid), dHidden: dH.data)
                    try student.backward(dHidden: dH.data)
                    return (parts, Dictionary(uniqueKeysWithValues: student.parameters.map { ($0.name, $0.grad!.array) }))
                }
                let a = try pass(cached), b = try pass(live)
                let label = "k = V \(objective.rawValue) at T \(T)"
                XCTAssertGreaterThan(b.0.kd, 0.05 * Double(valid))
                assertClose(a.0.kd, b.0.kd, rel: 2e-5, "\(label) kd")
                assertClose(a.0.total, b.0.total, rel: 2e-5, "\(label) total")
                XCTAssertEqual(a.0.ce, b.0.ce, accuracy: 1e-6 * max(1, b.0.ce))
                for (name, g) in b.1 { assertClose(a.1[name]!, g.map(Double.init), rel: 1e-4, abs: 1e-9, "\(label) grad \(name)") }
            }
        }
    }

    /// A cache that does not fit the run is refused with a message saying why.
    func testCacheValidation() throws {
        let teacher = try tinyModel(seed: 2)
        let s = stream(L * 3 + 1)
        let path = try writeCache(teacher, topK: 4, stream: s)
        func message(_ body: () throws -> Void) -> String {
            do { try body(); return "" } catch { return (error as? QATError)?.message ?? "\(error)" }
        }
        var m = message { _ = try TopKDistillationLoss(cache: path, studentVocab: V, seqLen: 16, spec: spec(.forwardKL)) }
        XCTAssertTrue(m.contains("seq_len 8") && m.contains("16"), m)
        m = message { _ = try TopKDistillationLoss(cache: path, studentVocab: 60, seqLen: L, spec: spec(.forwardKL)) }
        XCTAssertTrue(m.contains("64") && m.contains("60"), m)
        m = message { _ = try TopKDistillationLoss(cache: path, studentVocab: V, seqLen: L, spec: spec(.forwardKL), sequenceCount: 9) }
        XCTAssertTrue(m.contains("3 sequences") && m.contains("9"), m)
        m = message { _ = try TopKDistillationLoss(cache: path, studentVocab: V, seqLen: L, spec: spec(.reverseKL)) }
        XCTAssertTrue(m.contains("forward_kl"), m)
        m = message {
            _ = try TopKDistillationLoss(
                cache: Fixtures.tempDir().appendingPathComponent("none.h5").path, studentVocab: V, seqLen: L, spec: spec(.forwardKL))
        }
        XCTAssertTrue(m.contains("not found"), m)
        // Tokens that are not the cached sequence's.
        let loss = try TopKDistillationLoss(cache: path, studentVocab: V, seqLen: L, spec: spec(.forwardKL), sequenceCount: 3)
        var tokens = Array(s[(1 * L)..<(2 * L)])
        tokens[3] = (tokens[3] + 1) % 64
        m = message {
            _ = try loss.teacherRows(
                for: MicroBatch(tokens: tokens, targets: [Int32](repeating: 1, count: L), batch: 1, seqLen: L, sequenceIndices: [1]))
        }
        XCTAssertTrue(m.contains("differ"), m)
        m = message {
            _ = try loss.teacherRows(for: MicroBatch(tokens: tokens, targets: [Int32](repeating: 1, count: L), batch: 1, seqLen: L))
        }
        XCTAssertTrue(m.contains("sequence indices"), m)
        // Objective and cache kind must fit each other.
        var d = spec(.forwardKL)
        d.topkObjective = .sampled
        m = message { _ = try TopKDistillationLoss(cache: path, studentVocab: V, seqLen: L, spec: d) }
        XCTAssertTrue(m.contains("--sample"), m)
        let sampled = try writeCache(teacher, topK: 4, stream: s, sampled: true)
        m = message { _ = try TopKDistillationLoss(cache: sampled, studentVocab: V, seqLen: L, spec: spec(.forwardKL)) }
        XCTAssertTrue(m.contains("topk_objective: sampled"), m)
        // A version this qat does not know.
        let newer = try writeCache(teacher, topK: 4, stream: s)
        do {
            let f = try HDF5File(path: newer, mode: .readWrite)
            try f.setAttribute("version", "3")
            try f.flush()
        }
        m = message { _ = try TopKCacheReader(path: newer) }
        XCTAssertTrue(m.contains("version 3") && m.contains("qat teacher-logprobs"), m)
    }

    /// Narrowing a cache without the teacher: top-6 → top-3 keeps the same ids and values as a
    /// top-3 cache written by the teacher, with the rest mass folded from the dropped entries
    /// (within float16/bfloat16 rounding); 40 draws → 10 keeps 10 of the draws.
    func testNarrowCache() throws {
        let teacher = try tinyModel(seed: 2)
        let s = stream(L * 3 + 1)
        let wide = try writeCache(teacher, topK: 6, stream: s), direct = try writeCache(teacher, topK: 3, stream: s)
        let narrowed = Fixtures.tempDir("topk").appendingPathComponent("narrow.h5").path
        let h = try TopKCache.narrow(from: wide, to: narrowed, topK: 3)
        XCTAssertEqual(h.topK, 3)
        let a = try TopKCacheReader(path: narrowed), b = try TopKCacheReader(path: direct)
        XCTAssertEqual(a.header, b.header)
        for i in 0..<3 {
            let x = try a.sequence(i), y = try b.sequence(i)
            XCTAssertEqual(x.tokens, y.tokens)
            XCTAssertEqual(x.ids, y.ids)
            XCTAssertEqual(x.logprobs, y.logprobs)
            for t in 0..<L { XCTAssertEqual(x.restLogprob[t], y.restLogprob[t], accuracy: 0.01 * max(1, abs(y.restLogprob[t]))) }
        }
        let sampled = try writeCache(teacher, topK: 40, stream: s, sampled: true)
        let fewer = Fixtures.tempDir("topk").appendingPathComponent("fewer.h5").path
        try TopKCache.narrow(from: sampled, to: fewer, topK: 10)
        let src = try TopKCacheReader(path: sampled).sequence(1), row = try TopKCacheReader(path: fewer).sequence(1)
        for t in 0..<L {
            XCTAssertEqual(row.counts[(t * 10)..<((t + 1) * 10)].reduce(0, +), 10)
            for k in 0..<10 where row.ids[t * 10 + k] >= 0 {
                let j = (0..<40).first { src.ids[t * 40 + $0] == row.ids[t * 10 + k] }
                XCTAssertNotNil(j, "a narrowed draw is one of the source's")
                if let j { XCTAssertLessThanOrEqual(row.counts[t * 10 + k], src.counts[t * 40 + j]) }
            }
        }
        XCTAssertThrowsError(try TopKCache.narrow(from: wide, to: narrowed, topK: 7))
    }

    /// A sampled cache: per position the distinct drawn ids (increasing, empty slots last),
    /// counts summing to the number of draws, their bfloat16 log-probabilities; the same seed
    /// gives the same cache; over many positions the draws follow the teacher (each id's
    /// share of draws against its probability, summed over a sequence, within a few σ).
    func testSampledCache() throws {
        let teacher = try tinyModel(seed: 2)
        let s = stream(L * 4 + 1)
        let draws = 40
        let path = try writeCache(teacher, topK: draws, stream: s, sampled: true)
        let r = try TopKCacheReader(path: path)
        XCTAssertEqual(r.header.kind, .sampled)
        XCTAssertEqual(try HDF5File(path: path).info("sample_counts").typeName, "uint16")
        var expected = [Double](repeating: 0, count: V), observed = [Double](repeating: 0, count: V)
        for i in 0..<4 {
            let row = try r.sequence(i)
            let z = try teacherLogits(teacher, Array(s[(i * L)..<((i + 1) * L)]))
            for t in 0..<L {
                let lsm = DirectKD.logSoftmax(ArraySlice(z[(t * V)..<((t + 1) * V)]))
                var total = 0.0, seen = Set<Int32>()
                for k in 0..<draws {
                    let id = row.ids[t * draws + k], c = row.counts[t * draws + k]
                    if id < 0 { XCTAssertEqual(c, 0); continue }
                    XCTAssertTrue(seen.insert(id).inserted, "distinct ids")
                    XCTAssertGreaterThan(c, 0)
                    total += Double(c)
                    observed[Int(id)] += Double(c)
                    XCTAssertEqual(Double(row.logprobs[t * draws + k]), lsm[Int(id)], accuracy: 4e-3 * max(1, abs(lsm[Int(id)])))
                    if k > 0 { XCTAssertLessThan(row.ids[t * draws + k - 1], id, "increasing ids, empty slots last") }
                }
                XCTAssertEqual(total, Double(draws))
                for j in 0..<V { expected[j] += Double(draws) * exp(lsm[j]) }
            }
        }
        for j in 0..<V where expected[j] > 5 {
            XCTAssertLessThan(
                abs(observed[j] - expected[j]), 5 * expected[j].squareRoot() + 1,
                "token \(j): \(observed[j]) draws, expected \(expected[j])")
        }
        let again = try writeCache(teacher, topK: draws, stream: s, sampled: true)
        XCTAssertEqual(try TopKCacheReader(path: again).sequence(2).ids, try r.sequence(2).ids)
    }
}
