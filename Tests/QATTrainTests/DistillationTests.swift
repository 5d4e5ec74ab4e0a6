import Foundation
import QATCore
import QATModels
import QATTrain
import TestSupport
import XCTest

// MARK: - Shared helpers (also used by TopKDistillationTests)

/// Gaussian values, deterministic.
func gaussians(_ n: Int, std: Float, seed: UInt64) -> [Float] {
    var rng = SplitMix64(seed: seed)
    return (0..<n).map { _ in rng.nextGaussian() * std }
}

/// A tiny Llama whose lm_head is scaled up so that its distributions are far from uniform
/// (a KL between two near-uniform models is too small to test anything).
func tinyModel(vocab: Int = 64, hidden: Int = 32, seed: UInt64, headScale: Float = 25) throws -> CausalLM {
    let cfg = ModelConfig(
        family: .llama, vocabSize: vocab, hiddenSize: hidden, intermediateSize: 48, numLayers: 1, numHeads: 4, numKVHeads: 2)
    let m = try CausalLM(config: cfg, seed: seed)
    let w = m.lmHead.weight.value
    for i in 0..<w.count { w[i] *= headScale }
    return m
}

func spec(_ loss: Recipe.KDLoss, beta: Double = 0.5, temperature: Double = 1, kdRatio: Double = 1) -> Recipe.DistillSpec {
    var s = Recipe.DistillSpec()
    s.loss = loss; s.beta = beta; s.temperature = temperature; s.kdRatio = kdRatio
    return s
}

/// Max |a − b| ≤ rel · max|b| + abs.
func assertClose(
    _ a: [Float], _ b: [Double], rel: Double, abs absTol: Double = 1e-9, _ what: String, file: StaticString = #filePath, line: UInt = #line
) {
    XCTAssertEqual(a.count, b.count, what, file: file, line: line)
    let scale = b.map { Swift.abs($0) }.max() ?? 0
    var worst = 0.0, at = 0
    for i in 0..<min(a.count, b.count) {
        let e = Swift.abs(Double(a[i]) - b[i])
        if e > worst { worst = e; at = i }
    }
    XCTAssertLessThanOrEqual(worst, rel * scale + absTol, "\(what): max error \(worst) at \(at) (scale \(scale))", file: file, line: line)
}

func assertClose(_ a: Double, _ b: Double, rel: Double, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertLessThanOrEqual(Swift.abs(a - b), rel * max(Swift.abs(b), 1e-12), "\(what): \(a) vs \(b)", file: file, line: line)
}

/// The loss definitions written out directly in Double over explicit logits:
/// s [n, V] student, u [n, Vt] teacher (only the first V used), CE at T = 1.
enum DirectKD {
    static func logSoftmax(_ x: ArraySlice<Double>) -> [Double] {
        let m = x.max()!
        let lse = m + log(x.reduce(0) { $0 + exp($1 - m) })
        return x.map { $0 - lse }
    }

    static func divergence(logq: [Double], logp: [Double], loss: Recipe.KDLoss, beta: Double) -> Double {
        let p = logp.map(exp), q = logq.map(exp)
        func fwd() -> Double { zip(p, zip(logp, logq)).reduce(0) { $0 + $1.0 * ($1.1.0 - $1.1.1) } }
        func rev() -> Double { zip(q, zip(logq, logp)).reduce(0) { $0 + $1.0 * ($1.1.0 - $1.1.1) } }
        switch loss {
        case .forwardKL: return fwd()
        case .reverseKL: return rev()
        case .jsd:
            if beta == 0 { return fwd() }
            if beta == 1 { return rev() }
            var j = 0.0
            for i in p.indices {
                let m = beta * p[i] + (1 - beta) * q[i]
                j += beta * p[i] * (logp[i] - log(m)) + (1 - beta) * q[i] * (logq[i] - log(m))
            }
            return j
        }
    }

    /// (Σ total, Σ CE, Σ T²·KD) over valid rows.
    static func sums(s: [Double], u: [Double], n: Int, V: Int, Vt: Int, targets: [Int32], spec d: Recipe.DistillSpec) -> (
        total: Double, ce: Double, kd: Double
    ) {
        var total = 0.0, ce = 0.0, kd = 0.0
        let T = d.temperature
        for r in 0..<n where targets[r] != -100 {
            let sr = s[(r * V)..<((r + 1) * V)], ur = u[(r * Vt)..<(r * Vt + V)]
            let logq = logSoftmax(ArraySlice(sr.map { $0 / T })), logp = logSoftmax(ArraySlice(ur.map { $0 / T }))
            let k = T * T * divergence(logq: logq, logp: logp, loss: d.loss, beta: d.beta)
            let c = d.kdRatio < 1 ? -logSoftmax(sr)[Int(targets[r])] : 0
            total += (1 - d.kdRatio) * c + d.kdRatio * k
            ce += c; kd += k
        }
        return (total, ce, kd)
    }

    /// x [n, C] · W [V, C]ᵀ in Double.
    static func matmulT(_ x: [Double], _ w: [Double], n: Int, C: Int, V: Int) -> [Double] {
        var out = [Double](repeating: 0, count: n * V)
        for i in 0..<n { for j in 0..<V { var acc = 0.0; for c in 0..<C { acc += x[i * C + c] * w[j * C + c] }; out[i * V + j] = acc } }
        return out
    }
}

/// Central differences of f over every entry of x.
func finiteDifferences(_ x: [Double], eps: Double = 1e-4, _ f: ([Double]) -> Double) -> [Double] {
    var x = x
    return (0..<x.count).map { i in
        let v = x[i]
        x[i] = v + eps; let fp = f(x)
        x[i] = v - eps; let fm = f(x)
        x[i] = v
        return (fp - fm) / (2 * eps)
    }
}

// MARK: - Tests

final class DistillationTests: XCTestCase {
    /// Explicit small problem: student head [V, C] (a standalone Linear), teacher CausalLM
    /// whose lm_head [Vt, Ct] is overwritten, random hidden states, targets with −100 rows.
    struct Problem {
        let n = 7, C = 8, V = 24, Ct = 12
        let Vt: Int
        let student: Linear
        let teacher: CausalLM
        let hidden: [Float], teacherHidden: [Float]
        let targets: [Int32] = [3, -100, 17, 0, 23, -100, 9]
        var valid: Int { targets.filter { $0 != -100 }.count }

        init(extraTeacherVocab: Int = 0, seed: UInt64 = 1) throws {
            Vt = V + extraTeacherVocab
            let w = Parameter(name: "lm_head.weight", value: Tensor(shape: [V, C], values: gaussians(V * C, std: 0.5, seed: seed)))
            w.setRequiresGrad(true)
            student = Linear(name: "lm_head", weight: w, bias: nil)
            teacher = try CausalLM(
                config: ModelConfig(
                    family: .llama, vocabSize: Vt, hiddenSize: Ct, intermediateSize: 8, numLayers: 1,
                    numHeads: 2, numKVHeads: 1), seed: seed + 100)
            let tw = gaussians(Vt * Ct, std: 0.6, seed: seed + 2)
            for i in 0..<tw.count { teacher.lmHead.weight.value[i] = tw[i] }
            hidden = gaussians(n * C, std: 1, seed: seed + 3)
            teacherHidden = gaussians(n * Ct, std: 1, seed: seed + 4)
        }

        var studentWeightD: [Double] { student.weight.value.array.map(Double.init) }
        var teacherLogitsD: [Double] {
            DirectKD.matmulT(teacherHidden.map(Double.init), teacher.lmHead.weight.value.array.map(Double.init), n: n, C: Ct, V: Vt)
        }

        /// Runs the fused (or unfused) path; returns parts, dHidden, dW.
        func run(_ loss: DistillationLoss, unfused: Bool = false) throws -> (LossParts, [Float], [Float]) {
            student.weight.grad!.zero()
            var dH = [Float](repeating: .nan, count: n * C)
            let gs = 1 / Float(valid)
            let parts = try hidden.withUnsafeBufferPointer { h in
                try teacherHidden.withUnsafeBufferPointer { th in
                    try dH.withUnsafeMutableBufferPointer { d in
                        unfused
                            ? try loss.reference(
                                student: student, hidden: h.baseAddress!, teacherHidden: th.baseAddress!, targets: targets, n: n,
                                gradScale: gs, dHidden: d.baseAddress!)
                            : try loss.fused(
                                student: student, hidden: h.baseAddress!, teacherHidden: th.baseAddress!, targets: targets, n: n,
                                gradScale: gs, dHidden: d.baseAddress!)
                    }
                }
            }
            return (parts, dH, student.weight.grad!.array)
        }
    }

    static let cases: [(Recipe.KDLoss, Double, Double, Double)] = [
        // (loss, beta, temperature, kd_ratio)
        (.forwardKL, 0.5, 1, 1), (.forwardKL, 0.5, 2, 0.5), (.forwardKL, 0.5, 1, 0),
        (.reverseKL, 0.5, 1, 1), (.reverseKL, 0.5, 0.7, 0.5),
        (.jsd, 0.5, 1, 1), (.jsd, 0.3, 2, 0.5), (.jsd, 0, 1.5, 0.5), (.jsd, 1, 1.5, 0.5), (.jsd, 0.5, 1, 0),
    ]

    /// Loss sums against the Double definitions, and both gradients (student hidden and
    /// lm_head weight) against central differences of the Double loss.
    func testLossAndGradientsAgainstDoubleReference() throws {
        for (kind, beta, T, r) in Self.cases {
            let label = "\(kind.rawValue) beta \(beta) T \(T) kd_ratio \(r)"
            let p = try Problem()
            let d = spec(kind, beta: beta, temperature: T, kdRatio: r)
            let loss = try DistillationLoss(teacher: p.teacher, studentVocab: p.V, spec: d, budgetBytes: 3 * (p.V + p.Vt) * 4)
            XCTAssertEqual(loss.chunkRows, 3)
            let (parts, dH, dW) = try p.run(loss)
            let u = p.teacherLogitsD, hD = p.hidden.map(Double.init), wD = p.studentWeightD
            let want = DirectKD.sums(
                s: DirectKD.matmulT(hD, wD, n: p.n, C: p.C, V: p.V), u: u, n: p.n, V: p.V, Vt: p.Vt, targets: p.targets, spec: d)
            assertClose(parts.total, want.total, rel: 1e-5, "\(label) total")
            assertClose(parts.kd, want.kd, rel: 1e-5, "\(label) kd")
            if r == 1 {
                XCTAssertEqual(parts.ce, 0, "\(label): kd_ratio 1 computes no CE")
            } else {
                assertClose(parts.ce, want.ce, rel: 1e-5, "\(label) ce")
            }
            XCTAssertEqual(parts.valid, p.valid)
            let gs = 1 / Double(p.valid)
            let fdH = finiteDifferences(hD) { h in
                DirectKD.sums(
                    s: DirectKD.matmulT(h, wD, n: p.n, C: p.C, V: p.V), u: u, n: p.n, V: p.V, Vt: p.Vt, targets: p.targets, spec: d
                ).total * gs
            }
            let fdW = finiteDifferences(wD) { w in
                DirectKD.sums(
                    s: DirectKD.matmulT(hD, w, n: p.n, C: p.C, V: p.V), u: u, n: p.n, V: p.V, Vt: p.Vt, targets: p.targets, spec: d
                ).total * gs
            }
            assertClose(dH, fdH, rel: 2e-4, abs: 1e-7, "\(label) d hidden")
            assertClose(dW, fdW, rel: 2e-4, abs: 1e-7, "\(label) d lm_head")
            // Ignored rows get exactly zero gradient.
            for i in p.targets.indices where p.targets[i] == -100 {
                XCTAssertEqual(dH[(i * p.C)..<((i + 1) * p.C)].map(Swift.abs).max(), 0, "\(label): ignored row \(i)")
            }
        }
    }

    /// JSD(β = 0) is forward KL(teacher‖student) and JSD(β = 1) reverse KL, numerically, and
    /// both differ from JSD(0.5) (so the endpoints really switch).
    func testJSDEndpointsAreTheKLs() throws {
        let p = try Problem(seed: 5)
        func run(_ d: Recipe.DistillSpec) throws -> (LossParts, [Float], [Float]) {
            try p.run(DistillationLoss(teacher: p.teacher, studentVocab: p.V, spec: d))
        }
        for T in [1.0, 2.0] {
            let j0 = try run(spec(.jsd, beta: 0, temperature: T)), f = try run(spec(.forwardKL, temperature: T))
            let j1 = try run(spec(.jsd, beta: 1, temperature: T)), rv = try run(spec(.reverseKL, temperature: T))
            let jm = try run(spec(.jsd, beta: 0.5, temperature: T))
            assertClose(j0.0.kd, f.0.kd, rel: 1e-12, "JSD(0) = forward KL")
            assertClose(j1.0.kd, rv.0.kd, rel: 1e-12, "JSD(1) = reverse KL")
            assertClose(j0.1, f.1.map(Double.init), rel: 1e-7, "JSD(0) d hidden")
            assertClose(j1.2, rv.2.map(Double.init), rel: 1e-7, "JSD(1) d lm_head")
            XCTAssertGreaterThan(abs(f.0.kd - rv.0.kd), 1e-3 * f.0.kd, "forward and reverse KL should differ on this problem")
            XCTAssertGreaterThan(abs(jm.0.kd - f.0.kd), 1e-3 * f.0.kd)
            // And the value is the textbook KL(p‖q) / KL(q‖p) in Double.
            let s = DirectKD.matmulT(p.hidden.map(Double.init), p.studentWeightD, n: p.n, C: p.C, V: p.V)
            var fwd = 0.0, rev = 0.0
            for r in 0..<p.n where p.targets[r] != -100 {
                let lq = DirectKD.logSoftmax(ArraySlice(s[(r * p.V)..<((r + 1) * p.V)].map { $0 / T }))
                let lp = DirectKD.logSoftmax(ArraySlice(p.teacherLogitsD[(r * p.Vt)..<((r + 1) * p.Vt)].map { $0 / T }))
                for j in 0..<p.V { fwd += exp(lp[j]) * (lp[j] - lq[j]); rev += exp(lq[j]) * (lq[j] - lp[j]) }
            }
            assertClose(j0.0.kd, T * T * fwd, rel: 1e-5, "JSD(0) vs Σ p log(p/q)")
            assertClose(j1.0.kd, T * T * rev, rel: 1e-5, "JSD(1) vs Σ q log(q/p)")
        }
    }

    /// Fused (chunked, partial last chunk) and unfused (full logits) agree on the explicit
    /// problem for every divergence.
    func testFusedEqualsUnfusedOnExplicitProblem() throws {
        for (kind, beta, T, r) in Self.cases {
            let p = try Problem(seed: 9)
            let loss = try DistillationLoss(
                teacher: p.teacher, studentVocab: p.V, spec: spec(kind, beta: beta, temperature: T, kdRatio: r),
                budgetBytes: 2 * (p.V + p.Vt) * 4)  // 2-row chunks: 7 = 2+2+2+1
            let a = try p.run(loss), b = try p.run(loss, unfused: true)
            assertClose(a.0.total, b.0.total, rel: 1e-6, "\(kind) total")
            assertClose(a.0.kd, b.0.kd, rel: 1e-6, "\(kind) kd")
            XCTAssertEqual(a.0.ce, b.0.ce, accuracy: 1e-6 * max(1, b.0.ce))
            assertClose(a.1, b.1.map(Double.init), rel: 1e-5, "\(kind) d hidden")
            assertClose(a.2, b.2.map(Double.init), rel: 1e-5, "\(kind) d lm_head")
        }
    }

    /// Through real models: the student forward, `run` (teacher forward + fused chunks) then
    /// the student backward, against the unfused reference — loss and every parameter
    /// gradient, with −100 rows beyond the causal shift's and a partial last chunk.
    func testFusedEqualsUnfusedThroughModels() throws {
        let student = try tinyModel(seed: 1), teacher = try tinyModel(seed: 2)
        for p in student.parameters { p.setRequiresGrad(true) }
        let B = 3, L = 7, V = 64
        var rng = SplitMix64(seed: 3)
        let tokens = (0..<(B * L)).map { _ in Int32(rng.next() % UInt64(V)) }
        var targets = CrossEntropy.shiftedTargets(labels: tokens, batch: B, seqLen: L)
        targets[2] = -100; targets[9] = -100
        let mb = MicroBatch(tokens: tokens, targets: targets, batch: B, seqLen: L, sequenceIndices: [0, 1, 2])
        let valid = targets.filter { $0 != -100 }.count
        XCTAssertEqual(valid, B * (L - 1) - 2)
        for (kind, beta, T, r) in [(Recipe.KDLoss.forwardKL, 0.5, 2.0, 0.5), (.reverseKL, 0.5, 1.0, 1.0), (.jsd, 0.4, 1.5, 0.25)] {
            let loss = try DistillationLoss(
                teacher: teacher, studentVocab: V, spec: spec(kind, beta: beta, temperature: T, kdRatio: r),
                budgetBytes: 4 * (V + V) * 4)  // 4-row chunks: 21 = 5·4 + 1
            XCTAssertEqual(loss.chunkRows, 4)
            func pass(unfused: Bool) throws -> (LossParts, [String: [Float]]) {
                for p in student.parameters { p.grad?.zero() }
                let h = try student.forward(tokens: tokens, batch: B, seqLen: L, saveForBackward: true)
                let dH = Tensor(shape: [B * L, student.config.hiddenSize])
                let parts =
                    unfused
                    ? try loss.reference(model: student, hidden: h, batch: mb, gradScale: 1 / Float(valid), dHidden: dH.data)
                    : try loss.run(model: student, hidden: h, batch: mb, gradScale: 1 / Float(valid), dHidden: dH.data)
                try student.backward(dHidden: dH.data)
                return (parts, Dictionary(uniqueKeysWithValues: student.parameters.map { ($0.name, $0.grad!.array) }))
            }
            let a = try pass(unfused: false), b = try pass(unfused: true)
            XCTAssertEqual(a.0.valid, valid)
            XCTAssertGreaterThan(a.0.kd, 0.05 * Double(valid), "the teacher should differ from the student")
            assertClose(a.0.total, b.0.total, rel: 1e-6, "\(kind) total")
            assertClose(a.0.kd, b.0.kd, rel: 1e-6, "\(kind) kd")
            XCTAssertEqual(a.0.ce, b.0.ce, accuracy: 1e-6 * max(1, b.0.ce))
            if r == 1 { XCTAssertEqual(a.0.ce, 0) } else { XCTAssertGreaterThan(a.0.ce, 0) }
            for (name, g) in b.1 { assertClose(a.1[name]!, g.map(Double.init), rel: 1e-5, abs: 1e-10, "\(kind) grad \(name)") }
        }
    }

    /// A larger teacher vocabulary is an error naming both sizes, unless its extra ids are
    /// masked; a larger student vocabulary is always an error.
    func testVocabMismatch() throws {
        let p = try Problem(extraTeacherVocab: 5)
        XCTAssertThrowsError(try DistillationLoss(teacher: p.teacher, studentVocab: p.V, spec: spec(.forwardKL))) { e in
            let m = (e as? QATError)?.message ?? ""
            XCTAssertTrue(m.contains("29") && m.contains("24"), m)
            XCTAssertTrue(m.contains("mask_extra_vocab"), m)
        }
        let small = try CausalLM(
            config: ModelConfig(
                family: .llama, vocabSize: 20, hiddenSize: 8, intermediateSize: 8, numLayers: 1, numHeads: 2, numKVHeads: 1), seed: 1)
        XCTAssertThrowsError(try DistillationLoss(teacher: small, studentVocab: 24, spec: spec(.forwardKL), maskExtraVocab: true)) { e in
            let m = (e as? QATError)?.message ?? ""
            XCTAssertTrue(m.contains("24") && m.contains("20"), m)
        }
    }

    /// With mask_extra_vocab the teacher's ids beyond the student's vocabulary are −∞: the
    /// loss equals the Double definition over the first V teacher logits, gradients included.
    func testMaskedExtraTeacherVocab() throws {
        let p = try Problem(extraTeacherVocab: 5, seed: 3)
        let d = spec(.jsd, beta: 0.5, temperature: 1.5, kdRatio: 0.5)
        let loss = try DistillationLoss(
            teacher: p.teacher, studentVocab: p.V, spec: d, maskExtraVocab: true, budgetBytes: 3 * (p.V + p.Vt) * 4)
        let (parts, dH, _) = try p.run(loss)
        let hD = p.hidden.map(Double.init), wD = p.studentWeightD, u = p.teacherLogitsD
        let want = DirectKD.sums(
            s: DirectKD.matmulT(hD, wD, n: p.n, C: p.C, V: p.V), u: u, n: p.n, V: p.V, Vt: p.Vt, targets: p.targets, spec: d)
        assertClose(parts.total, want.total, rel: 1e-5, "masked total")
        let gs = 1 / Double(p.valid)
        let fdH = finiteDifferences(hD) { h in
            DirectKD.sums(s: DirectKD.matmulT(h, wD, n: p.n, C: p.C, V: p.V), u: u, n: p.n, V: p.V, Vt: p.Vt, targets: p.targets, spec: d)
                .total * gs
        }
        assertClose(dH, fdH, rel: 2e-4, abs: 1e-7, "masked d hidden")
    }

    func testSpecValidation() throws {
        let p = try Problem()
        for bad in [spec(.forwardKL, temperature: 0), spec(.forwardKL, kdRatio: 1.5), spec(.jsd, beta: -0.1)] {
            XCTAssertThrowsError(try DistillationLoss(teacher: p.teacher, studentVocab: p.V, spec: bad))
        }
        let m = try tinyModel(seed: 1)
        let loss = try DistillationLoss(teacher: m, studentVocab: 64, spec: spec(.forwardKL))
        let h = try m.forward(tokens: [1, 2, 3, 4], batch: 1, seqLen: 4, saveForBackward: true)
        let dH = Tensor(shape: [4, 32])
        XCTAssertThrowsError(
            try loss.run(
                model: m, hidden: h, batch: MicroBatch(tokens: [1, 2, 3, 4], targets: [2, 3, 4, -100], batch: 1, seqLen: 4),
                gradScale: 1, dHidden: dH.data)
        ) { e in
            XCTAssertTrue(((e as? QATError)?.message ?? "").contains("separate model"))
        }
    }
}
