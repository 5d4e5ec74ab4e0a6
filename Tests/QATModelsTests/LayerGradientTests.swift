import QATCore
import QATModels
import XCTest

/// Finite-difference checks of every layer's hand-written backward: the loss is Σ y∘R for a
/// fixed random R, so d loss/d y = R is what each backward receives.
final class LayerGradientTests: XCTestCase {
    var rng = SplitMix64(seed: 7)

    func random(_ n: Int, scale: Float = 1) -> [Float] { (0..<n).map { _ in rng.nextGaussian() * scale } }

    /// Central differences of `loss` w.r.t. each entry of `x`, compared with `analytic`.
    func checkGradient(
        _ name: String, _ x: inout [Float], analytic: [Float], h: Float = 1e-2, tol: Double = 2e-2,
        loss: ([Float]) -> Double, file: StaticString = #filePath, line: UInt = #line
    ) {
        var maxErr = 0.0, scale = 1e-6
        for i in 0..<x.count {
            let saved = x[i]
            x[i] = saved + h; let lp = loss(x)
            x[i] = saved - h; let lm = loss(x)
            x[i] = saved
            let numeric = (lp - lm) / Double(2 * h)
            maxErr = max(maxErr, abs(numeric - Double(analytic[i])))
            scale = max(scale, abs(numeric))
        }
        XCTAssertLessThan(maxErr / scale, tol, "\(name): max error \(maxErr) vs scale \(scale)", file: file, line: line)
    }

    func dot(_ a: [Float], _ b: [Float]) -> Double { zip(a, b).reduce(0.0) { $0 + Double($1.0) * Double($1.1) } }

    func testRMSNorm() {
        let n = 3, c = 8
        var x = random(n * c), w = random(c), r = random(n * c)
        func f(_ x: [Float], _ w: [Float]) -> [Float] {
            var out = [Float](repeating: 0, count: n * c), rstd = [Float](repeating: 0, count: n)
            RMSNorm.forward(out: &out, rstd: &rstd, inp: x, weight: w, n: n, c: c, eps: 1e-5)
            return out
        }
        var rstd = [Float](repeating: 0, count: n), out = [Float](repeating: 0, count: n * c)
        RMSNorm.forward(out: &out, rstd: &rstd, inp: x, weight: w, n: n, c: c, eps: 1e-5)
        var dx = [Float](repeating: 0, count: n * c), dw = [Float](repeating: 0, count: c)
        RMSNorm.backward(dinp: &dx, dweight: &dw, dout: r, inp: x, weight: w, rstd: rstd, n: n, c: c, accumulate: false)
        let w0 = w, x0 = x
        checkGradient("rmsnorm dx", &x, analytic: dx) { self.dot(f($0, w0), r) }
        checkGradient("rmsnorm dw", &w, analytic: dw) { self.dot(f(x0, $0), r) }
        // accumulate mode adds to what is there
        var acc = [Float](repeating: 1, count: n * c)
        RMSNorm.backward(dinp: &acc, dweight: nil, dout: r, inp: x, weight: w, rstd: rstd, n: n, c: c, accumulate: true)
        for i in 0..<(n * c) { XCTAssertEqual(acc[i], dx[i] + 1, accuracy: 1e-5) }
        _ = r.count
    }

    func testRMSNormBackwardSameBitsForAnyThreadCount() {
        // The hidden width (36 column blocks, many dx row blocks) and a head norm's (4 column
        // blocks): one region of dynamic tasks must give the bits of the serial passes, also
        // when dinp aliases dout (the passes then run one after the other).
        for (n, c) in [(2048, 576), (4096, 64), (37, 40)] {
            let x = random(n * c), w = random(c), r = random(n * c), base = random(n * c), dw0 = random(c)
            var rstd = [Float](repeating: 0, count: n), out = [Float](repeating: 0, count: n * c)
            RMSNorm.forward(out: &out, rstd: &rstd, inp: x, weight: w, n: n, c: c, eps: 1e-5)
            func run(_ threads: Int, accumulate: Bool, alias: Bool) -> [Float] {
                Parallel.threads = threads
                defer { Parallel.threads = Parallel.availableCores }
                var dx = alias ? r : base, dw = dw0
                if alias {
                    dx.withUnsafeMutableBufferPointer { d in
                        RMSNorm.backward(
                            dinp: d.baseAddress!, dweight: &dw, dout: d.baseAddress!, inp: x, weight: w, rstd: rstd, n: n, c: c,
                            accumulate: false)
                    }
                } else {
                    RMSNorm.backward(dinp: &dx, dweight: &dw, dout: r, inp: x, weight: w, rstd: rstd, n: n, c: c, accumulate: accumulate)
                }
                return dx + dw
            }
            for (accumulate, alias) in [(false, false), (true, false), (false, true)] {
                let one = run(1, accumulate: accumulate, alias: alias)
                if !alias {
                    // The serial reference: dw[j] += Σ_i in row order, dx per row.
                    var dw = dw0
                    for i in 0..<n { for j in 0..<c { dw[j] += r[i * c + j] * (x[i * c + j] * rstd[i]) } }
                    XCTAssertEqual(Array(one[(n * c)...]).map(\.bitPattern), dw.map(\.bitPattern), "\(n)×\(c) dw")
                } else {
                    XCTAssertEqual(one.map(\.bitPattern), run(1, accumulate: false, alias: false).map(\.bitPattern), "\(n)×\(c) aliased")
                }
                for t in [2, 3, 16] {
                    XCTAssertEqual(
                        run(t, accumulate: accumulate, alias: alias).map(\.bitPattern), one.map(\.bitPattern),
                        "\(n)×\(c) accumulate \(accumulate) alias \(alias): \(t) threads differ from 1")
                }
            }
        }
    }

    func testCrossEntropyChunksAreBalancedAndCoverEveryRow() {
        // SmolLM2's vocabulary with the default budget: 682-row chunks, so 2,048 rows are 4 × 512
        // (not 682 × 3 + 2); a budget of 7 rows over 20 rows: 3 chunks of 6, 7, 7.
        let smol = ChunkedCrossEntropy(vocab: 49_152)
        XCTAssertEqual(smol.chunkRows, 682)
        XCTAssertEqual(smol.chunks(2048), [0..<512, 512..<1024, 1024..<1536, 1536..<2048])
        XCTAssertEqual(smol.chunks(100), [0..<100])
        XCTAssertEqual(smol.chunks(0), [])
        XCTAssertEqual(ChunkedCrossEntropy(vocab: 32, budgetBytes: 7 * 32 * 4).chunks(20), [0..<6, 6..<13, 13..<20])
        for rows in [1, 3, 7, 8, 64] {
            let head = ChunkedCrossEntropy(vocab: 32, budgetBytes: rows * 32 * 4)
            for n in [1, 5, 7, 8, 9, 100, 1001] {
                let parts = head.chunks(n)
                XCTAssertEqual(parts.count, (n + rows - 1) / rows, "\(n) rows in chunks of ≤ \(rows)")
                XCTAssertEqual(parts.first?.lowerBound, 0)
                XCTAssertEqual(parts.last?.upperBound, n)
                for (a, b) in zip(parts, parts.dropFirst()) { XCTAssertEqual(a.upperBound, b.lowerBound) }
                XCTAssertLessThanOrEqual(parts.map(\.count).max()! - parts.map(\.count).min()!, 1)
                XCTAssertLessThanOrEqual(parts.map(\.count).max()!, rows)
            }
        }
    }

    func testSwiGLU() {
        let n = 16
        var g = random(n), u = random(n), r = random(n)
        func f(_ g: [Float], _ u: [Float]) -> [Float] {
            var o = [Float](repeating: 0, count: n); SwiGLU.forward(out: &o, gate: g, up: u, n: n); return o
        }
        var dg = [Float](repeating: 0, count: n), du = dg
        SwiGLU.backward(dgate: &dg, dup: &du, dout: r, gate: g, up: u, n: n)
        let g0 = g, u0 = u
        checkGradient("swiglu dgate", &g, analytic: dg) { self.dot(f($0, u0), r) }
        checkGradient("swiglu dup", &u, analytic: du) { self.dot(f(g0, $0), r) }
        r[0] += 0
    }

    func testRoPE() {
        let (b, t, heads, d) = (2, 5, 3, 8)
        let rope = RoPE(invFreq: (0..<(d / 2)).map { 1 / powf(10000, Float(2 * $0) / Float(d)) }, headDim: d, maxPositions: 16)
        var x = random(b * t * heads * d), r = random(b * t * heads * d)
        func f(_ x: [Float]) -> [Float] { var y = x; rope.forward(&y, batch: b, seqLen: t, heads: heads); return y }
        var dx = r
        rope.backward(&dx, batch: b, seqLen: t, heads: heads)
        checkGradient("rope dx", &x, analytic: dx) { self.dot(f($0), r) }
        r[0] += 0
    }

    func testAttentionGQAWithWindow() {
        for window in [nil, 3] as [Int?] {
            let s = Attention.Shape(batch: 2, seqLen: 6, heads: 4, kvHeads: 2, headDim: 4, window: window)
            let nq = s.batch * s.seqLen * s.heads * s.headDim, nk = s.batch * s.seqLen * s.kvHeads * s.headDim
            var q = random(nq), k = random(nk), v = random(nk)
            let r = random(nq)
            func f(_ q: [Float], _ k: [Float], _ v: [Float]) -> [Float] {
                var out = [Float](repeating: 0, count: nq), p = [Float](repeating: 0, count: s.batch * s.heads * s.seqLen * s.seqLen)
                Attention.forward(out: &out, probs: &p, q: q, k: k, v: v, shape: s)
                return out
            }
            var out = [Float](repeating: 0, count: nq), p = [Float](repeating: 0, count: s.batch * s.heads * s.seqLen * s.seqLen)
            Attention.forward(out: &out, probs: &p, q: q, k: k, v: v, shape: s)
            if let w = window {  // masked probabilities are exactly zero
                for i in 0..<s.seqLen { for j in 0..<s.seqLen where j > i || i - j >= w { XCTAssertEqual(p[i * s.seqLen + j], 0) } }
            }
            var dq = [Float](repeating: 0, count: nq), dk = [Float](repeating: 0, count: nk), dv = dk
            var scratch = [Float](repeating: 0, count: s.seqLen * s.seqLen)
            Attention.backward(dq: &dq, dk: &dk, dv: &dv, dout: r, q: q, k: k, v: v, probs: p, scratch: &scratch, shape: s)
            let q0 = q, k0 = k, v0 = v
            checkGradient("attention dq w=\(String(describing: window))", &q, analytic: dq) { self.dot(f($0, k0, v0), r) }
            checkGradient("attention dk", &k, analytic: dk) { self.dot(f(q0, $0, v0), r) }
            checkGradient("attention dv", &v, analytic: dv) { self.dot(f(q0, k0, $0), r) }
        }
    }

    func testAttentionSameBitsForAnyThreadCount() {
        // Forward tasks per (batch, head, causal block), largest first; backward's dV tasks beside
        // the dS/dQ/dK ones: every thread count gives the serial run's bits (T = 200: a partial
        // last block; groups of 3 heads; 16 threads: more workers than backward tasks).
        let s = Attention.Shape(batch: 2, seqLen: 200, heads: 6, kvHeads: 2, headDim: 16)
        let nq = s.batch * s.seqLen * s.heads * s.headDim, nk = s.batch * s.seqLen * s.kvHeads * s.headDim
        let q = random(nq), k = random(nk), v = random(nk), r = random(nq)
        func run(_ threads: Int) -> [[Float]] {
            Parallel.threads = threads
            defer { Parallel.threads = Parallel.availableCores }
            var out = [Float](repeating: 0, count: nq), p = [Float](repeating: 0, count: s.batch * s.heads * s.seqLen * s.seqLen)
            Attention.forward(out: &out, probs: &p, q: q, k: k, v: v, shape: s)
            var dq = [Float](repeating: 0, count: nq), dk = [Float](repeating: .nan, count: nk), dv = dk
            var scratch = [Float](repeating: 0, count: threads * s.seqLen * s.seqLen)
            Attention.backward(
                dq: &dq, dk: &dk, dv: &dv, dout: r, q: q, k: k, v: v, probs: p, scratch: &scratch, scratchSlots: threads, shape: s)
            return [out, p, dq, dk, dv]
        }
        let one = run(1)
        XCTAssertTrue(one.allSatisfy { $0.allSatisfy(\.isFinite) }, "dk and dv are written everywhere")
        for t in [2, 3, 16] {
            for (name, (a, b)) in zip(["out", "probs", "dq", "dk", "dv"], zip(one, run(t))) {
                XCTAssertEqual(a.map(\.bitPattern), b.map(\.bitPattern), "attention \(name): \(t) threads differ from 1")
            }
        }
    }

    func testLinearWithBias() throws {
        let n = 4, inF = 6, outF = 5
        let w = Parameter(name: "l.weight", value: Tensor(shape: [outF, inF], values: random(outF * inF)))
        let b = Parameter(name: "l.bias", value: Tensor(shape: [outF], values: random(outF)))
        w.setRequiresGrad(true); b.setRequiresGrad(true)
        let lin = Linear(name: "l", weight: w, bias: b)
        var x = random(n * inF)
        let r = random(n * outF)
        func f(_ x: [Float]) throws -> Double {
            var y = [Float](repeating: 0, count: n * outF); try lin.forward(x, out: &y, n: n); return dot(y, r)
        }
        var y = [Float](repeating: 0, count: n * outF)
        let used = try lin.forward(x, out: &y, n: n)
        var dx = [Float](repeating: 0, count: n * inF)
        lin.backward(dy: r, x: x, xUsed: used, n: n, dx: &dx, accumulateDx: false)
        checkGradient("linear dx", &x, analytic: dx) { try! f($0) }
        var wv = w.value.array
        let dw = w.grad!.array
        checkGradient("linear dw", &wv, analytic: dw) { vals in
            let saved = w.value.array; for i in 0..<vals.count { w.value[i] = vals[i] }
            defer { for i in 0..<saved.count { w.value[i] = saved[i] } }
            return try! f(x)
        }
        var bv = b.value.array
        checkGradient("linear db", &bv, analytic: b.grad!.array) { vals in
            let saved = b.value.array; for i in 0..<vals.count { b.value[i] = vals[i] }
            defer { for i in 0..<saved.count { b.value[i] = saved[i] } }
            return try! f(x)
        }
    }

    func testCrossEntropyRowGradientAndIgnore() {
        let v = 7
        var z = random(v, scale: 2)
        var g = z
        let loss = CrossEntropy.row(&g, vocab: v, target: 3, gradScale: 1)
        var copy = z
        XCTAssertEqual(loss, CrossEntropy.row(&copy, vocab: v, target: 3, gradScale: nil), accuracy: 1e-12)
        checkGradient("ce dz", &z, analytic: g, h: 1e-3) { zz in
            var t = zz; return CrossEntropy.row(&t, vocab: v, target: 3, gradScale: nil)
        }
        var ignored = z
        XCTAssertEqual(CrossEntropy.row(&ignored, vocab: v, target: -100, gradScale: 1), 0)
        XCTAssertEqual(ignored, [Float](repeating: 0, count: v))
        XCTAssertEqual(CrossEntropy.shiftedTargets(labels: [5, 6, 7, 8, 9, 10], batch: 2, seqLen: 3), [6, 7, -100, 9, 10, -100])
    }

    func testEmbeddingBackwardAccumulatesRepeatedTokens() {
        var table = [Float](repeating: 0, count: 4 * 2)
        Embedding.backward(dtable: &table, dout: [1, 2, 3, 4, 5, 6], tokens: [1, 3, 1], n: 3, c: 2)
        XCTAssertEqual(table, [0, 0, 6, 8, 0, 0, 3, 4])
    }

    /// Whole-model check on families the fixtures do not cover: Qwen2 (q/k/v biases) and
    /// Mistral (sliding window), tied and untied heads; a few entries of every parameter.
    func testWholeModelFiniteDifferences() throws {
        let configs = [
            ModelConfig(
                family: .qwen2, vocabSize: 32, hiddenSize: 16, intermediateSize: 24, numLayers: 2, numHeads: 4,
                numKVHeads: 2, attentionBias: true, qkNorm: false),
            ModelConfig(
                family: .mistral, vocabSize: 32, hiddenSize: 16, intermediateSize: 24, numLayers: 1, numHeads: 2,
                numKVHeads: 1, tieWordEmbeddings: true, slidingWindow: 3),
        ]
        for config in configs {
            let model = try CausalLM(config: config, seed: 3, std: 0.3)
            let tokens: [Int32] = (0..<10).map { Int32(($0 * 7 + 3) % 32) }
            let (B, T) = (2, 5)
            let targets = CrossEntropy.shiftedTargets(labels: tokens, batch: B, seqLen: T)
            let head = ChunkedCrossEntropy(vocab: config.vocabSize, budgetBytes: 3 * 32 * 4)
            func loss() throws -> Double {
                let h = try model.forward(tokens: tokens, batch: B, seqLen: T, saveForBackward: false)
                return try head.run(head: model.lmHead, hidden: h, targets: targets, n: B * T).sum
            }
            for p in model.parameters { p.setRequiresGrad(true) }
            let h = try model.forward(tokens: tokens, batch: B, seqLen: T, saveForBackward: true)
            let dh = Tensor(shape: [B * T, config.hiddenSize])
            _ = try head.run(head: model.lmHead, hidden: h, targets: targets, n: B * T, gradScale: 1, dHidden: dh.data)
            try model.backward(dHidden: dh.data)
            for p in model.parameters {
                let idx = Array(Set([0, p.count / 3, p.count / 2, p.count - 1]))
                var analytic: [Float] = [], numeric: [Float] = []
                for i in idx {
                    let saved = p.value[i]
                    p.value[i] = saved + 1e-2; let lp = try loss()
                    p.value[i] = saved - 1e-2; let lm = try loss()
                    p.value[i] = saved
                    numeric.append(Float((lp - lm) / 2e-2)); analytic.append(p.grad![i])
                }
                let scale = max(1e-3, numeric.map(abs).max()!)
                for (a, n) in zip(analytic, numeric) {
                    XCTAssertEqual(a, n, accuracy: 3e-2 * scale, "\(config.family) \(p.name)")
                }
            }
        }
    }
}
