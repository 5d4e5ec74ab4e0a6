import QATCore
import QATModels
import XCTest

/// `MoEBlock` backward against central finite differences of L = Σ r ∘ block(x) (r fixed
/// random): the input, the router, every expert and the shared expert, with and without
/// top-k renormalisation. Routing is kept decisive (router logits far apart relative to the
/// step) so that the finite differences never cross a routing change.
final class MoELayerTests: XCTestCase {
    func testBackwardMatchesFiniteDifferences() throws {
        for (norm, shared, k) in [(true, false, 2), (false, true, 3), (true, true, 1)] {
            try check(norm: norm, shared: shared, topK: k)
        }
    }

    /// Grouped execution: the same block run on 1, 3 and 7 tokens gives each token the output
    /// it gets alone (any token count works; tokens do not interact).
    func testTokensAreIndependentOfTheBatch() throws {
        let block = makeBlock(norm: true, shared: true, topK: 2, seed: 5)
        let C = block.hidden
        var rng = SplitMix64(seed: 9)
        let x = Tensor(shape: [7, C], zeroed: false)
        for i in 0..<x.count { x[i] = rng.nextGaussian() }
        let all = Tensor(shape: [7, C])
        try block.forward(x.data, out: all.data, n: 7)
        for (start, count) in [(0, 1), (2, 3), (6, 1)] {
            let part = Tensor(shape: [count, C])
            try block.forward(x.data + start * C, out: part.data, n: count)
            for i in 0..<(count * C) { XCTAssertEqual(part[i], all[start * C + i], accuracy: 1e-6) }
        }
    }

    private func makeBlock(norm: Bool, shared: Bool, topK: Int, seed: UInt64) -> MoEBlock {
        let C = 8, I = 6, E = 4
        var rng = SplitMix64(seed: seed)
        func linear(_ name: String, _ o: Int, _ i: Int, std: Float) -> Linear {
            let t = Tensor(shape: [o, i], zeroed: false)
            for j in 0..<t.count { t[j] = rng.nextGaussian() * std }
            let p = Parameter(name: name + ".weight", value: t)
            p.setRequiresGrad(true)
            return Linear(name: name, weight: p, bias: nil)
        }
        let experts = (0..<E).map { e in
            Expert(
                gate: linear("e\(e).gate", I, C, std: 0.5), up: linear("e\(e).up", I, C, std: 0.5),
                down: linear("e\(e).down", C, I, std: 0.5))
        }
        let sh =
            shared
            ? Expert(
                gate: linear("s.gate", 5, C, std: 0.5), up: linear("s.up", 5, C, std: 0.5),
                down: linear("s.down", C, 5, std: 0.5)) : nil
        return MoEBlock(
            router: linear("router", E, C, std: 1.5), experts: experts, sharedExpert: sh,
            sharedExpertGate: shared ? linear("s.gate_w", 1, C, std: 0.5) : nil, topK: topK, normTopKProb: norm)
    }

    private func check(norm: Bool, shared: Bool, topK: Int) throws {
        let N = 6
        let block = makeBlock(norm: norm, shared: shared, topK: topK, seed: 11)
        let C = block.hidden
        var rng = SplitMix64(seed: 3)
        let x = Tensor(shape: [N, C], zeroed: false), r = Tensor(shape: [N, C], zeroed: false)
        for i in 0..<x.count { x[i] = rng.nextGaussian(); r[i] = rng.nextGaussian() }
        func loss() throws -> Double {
            let y = Tensor(shape: [N, C])
            try block.forward(x.data, out: y.data, n: N)
            var s = 0.0
            for i in 0..<y.count { s += Double(y[i]) * Double(r[i]) }
            return s
        }
        let baseRouting = try block.route(x.data, n: N).experts
        _ = try loss()
        let dx = Tensor(shape: [N, C])
        block.backward(dout: r.data, x: x.data, dx: dx.data)
        let eps: Float = 1e-3
        func fd(_ t: Tensor, _ i: Int) throws -> Float {
            let saved = t[i]
            t[i] = saved + eps; let lp = try loss()
            XCTAssertEqual(try block.route(x.data, n: N).experts, baseRouting, "routing changed under the step")
            t[i] = saved - eps; let lm = try loss()
            t[i] = saved
            return Float((lp - lm) / Double(2 * eps))
        }
        let tag = "norm \(norm) shared \(shared) k \(topK)"
        for i in [0, 7, 13, 29, 47] { XCTAssertEqual(dx[i], try fd(x, i), accuracy: 2e-2 * max(1, abs(dx[i])), "\(tag) dx[\(i)]") }
        for l in block.linears {
            let w = l.weight.value, g = l.weight.grad!
            for i in Set([0, w.count / 2, w.count - 1]) {
                l.markWeightChanged()
                XCTAssertEqual(g[i], try fd(w, i), accuracy: 2e-2 * max(1, abs(g[i])), "\(tag) \(l.name)[\(i)]")
            }
        }
    }
}
