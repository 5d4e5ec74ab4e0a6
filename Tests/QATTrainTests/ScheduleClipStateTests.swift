import Foundation
import QATModels
import QATTrain
import XCTest

final class ScheduleTests: XCTestCase {
    // Expected values: transformers' lr lambdas evaluated in python3 (see Schedule.swift for
    // the formulas), total 10 steps, warmup 2, at steps [0, 1, 2, 3, 5, 7, 9, 10, 12].
    let steps = [0, 1, 2, 3, 5, 7, 9, 10, 12]

    func check(_ s: LRSchedule, _ expected: [Double], file: StaticString = #filePath, line: UInt = #line) {
        for (st, e) in zip(steps, expected) {
            XCTAssertEqual(s.factor(step: st), e, accuracy: 1e-15, "\(s.kind) step \(st)", file: file, line: line)
        }
    }

    func testConstantWithWarmup() throws {
        check(try LRSchedule(kind: .constant, totalSteps: 10, warmupSteps: 2), [0, 0.5, 1, 1, 1, 1, 1, 1, 1])
        XCTAssertEqual(try LRSchedule(kind: .constant, totalSteps: 10).factor(step: 0), 1)
    }

    func testLinearWithWarmup() throws {
        check(try LRSchedule(kind: .linear, totalSteps: 10, warmupSteps: 2), [0, 0.5, 1, 0.875, 0.625, 0.375, 0.125, 0, 0])
    }

    func testCosineWithWarmup() throws {
        check(
            try LRSchedule(kind: .cosine, totalSteps: 10, warmupSteps: 2),
            [0, 0.5, 1, 0.9619397662556434, 0.6913417161825449, 0.30865828381745514, 0.03806023374435663, 0, 0.14644660940672616])
        check(
            try LRSchedule(kind: .cosine, totalSteps: 10),
            [
                1, 0.9755282581475768, 0.9045084971874737, 0.7938926261462366, 0.5, 0.2061073738537635, 0.024471741852423234, 0,
                0.09549150281252622,
            ])
    }

    func testWarmupRatioIsCeiledAndStepsWin() throws {
        XCTAssertEqual(try LRSchedule(kind: .linear, totalSteps: 10, warmupRatio: 0.15).warmupSteps, 2)  // ceil(1.5)
        XCTAssertEqual(try LRSchedule(kind: .linear, totalSteps: 10, warmupRatio: 0.1).warmupSteps, 1)
        XCTAssertEqual(try LRSchedule(kind: .linear, totalSteps: 7, warmupRatio: 0.3).warmupSteps, 3)  // ceil(2.1)
        XCTAssertEqual(try LRSchedule(kind: .linear, totalSteps: 10, warmupSteps: 4, warmupRatio: 0.5).warmupSteps, 4)
        check(try LRSchedule(kind: .linear, totalSteps: 10, warmupRatio: 0.15), [0, 0.5, 1, 0.875, 0.625, 0.375, 0.125, 0, 0])
        XCTAssertThrowsError(try LRSchedule(kind: .linear, totalSteps: 10, warmupRatio: 1.5))
        XCTAssertEqual(try LRSchedule.kind(named: "Cosine"), .cosine)
        XCTAssertThrowsError(try LRSchedule.kind(named: "polynomial"))
        XCTAssertEqual(try LRSchedule(kind: .linear, totalSteps: 10, warmupSteps: 2).lr(base: 2e-5, step: 1), 1e-5)
    }
}

final class ClippingTests: XCTestCase {
    func testClipByGlobalNorm() {
        let a = Tensor(shape: [2], values: [3, 4]), b = Tensor(shape: [2], values: [0, 12])
        XCTAssertEqual(GradientClipping.globalNorm([a, b]), 13)
        // Under the limit: returned norm, gradients untouched.
        XCTAssertEqual(GradientClipping.clipByGlobalNorm([a, b], maxNorm: 100), 13)
        XCTAssertEqual(a.array + b.array, [3, 4, 0, 12])
        // Over: scaled by Float(6.5 / (13 + 1e-6)) = 0.4999999701976776 (numpy float32).
        XCTAssertEqual(GradientClipping.clipByGlobalNorm([a, b], maxNorm: 6.5), 13)
        XCTAssertEqual(a.array, [1.4999998807907104, 1.9999998807907104])
        XCTAssertEqual(b.array, [0.0, 5.999999523162842])
        XCTAssertEqual(GradientClipping.globalNorm([a, b]), 6.5, accuracy: 1e-5)
    }

    func testLargeTensorNormIsExactAndParallelSafe() {
        // 1_000_003 elements (not a multiple of the block or SIMD width), value 0.5:
        // sum of squares 250000.75 exactly in Double.
        let n = 1_000_003
        let t = Tensor(shape: [n], zeroed: false)
        for i in 0..<n { t[i] = 0.5 }
        XCTAssertEqual(GradientClipping.sumOfSquares(t), 250_000.75)
        GradientClipping.clipByGlobalNorm([t], maxNorm: 1)
        let expected = Float(0.5) * Float(1 / ((250_000.75).squareRoot() + 1e-6))
        XCTAssertEqual(t[0], expected)
        XCTAssertEqual(t[n - 1], expected)
    }

    func testNonFiniteGradientsAreNamedAndLeftAlone() {
        let a = Tensor(shape: [20], values: Array(repeating: 1, count: 20))
        let b = Tensor(shape: [20], values: Array(repeating: 1, count: 20))
        let c = Tensor(shape: [3], values: [1, .nan, 1])
        b[17] = .infinity  // past the SIMD body: the tail path must see it too
        XCTAssertEqual(GradientClipping.firstNonFinite([("a", a), ("b", b), ("c", c)]), "b")
        XCTAssertEqual(GradientClipping.firstNonFinite([("a", a), ("c", c)]), "c")
        XCTAssertNil(GradientClipping.firstNonFinite([("a", a)]))
        let norm = GradientClipping.clipByGlobalNorm([a, b], maxNorm: 1)
        XCTAssertFalse(norm.isFinite)
        XCTAssertEqual(a[0], 1, "a non-finite norm must leave gradients for the caller to inspect")
        let big = Tensor(shape: [40_000])
        big[39_999] = -.infinity
        XCTAssertFalse(GradientClipping.isFinite(big))
    }

    func testManyTensorsInOneRegionMatchOneByOne() {
        // Tensors of 0, 1, 576, one block ± 1 and several blocks (not multiples of the block):
        // the one-region passes over all of them give each tensor's sum of squares bit for bit,
        // the same norm, scaling and zeroing as one tensor at a time, for any thread count.
        let rng = SplitMix64(seed: 11)
        let block = 16_384  // GradientClipping's block
        let counts = [0, 1, 576, block - 1, block + 1, 110_592, 3 * block + 7]
        func make() -> [Tensor] {
            var r = rng
            return counts.map { n in Tensor(shape: [n], values: (0..<n).map { _ in r.nextGaussian() * 0.1 }) }
        }
        let reference = make()
        let oneByOne = reference.map { GradientClipping.sumOfSquares($0) }
        var expectedNorm = 0.0
        for v in oneByOne { expectedNorm += v }
        expectedNorm = expectedNorm.squareRoot()
        let coef = Float(0.5 / (expectedNorm + 1e-6))
        for threads in [1, 2, 3, 16] {
            Parallel.threads = threads
            defer { Parallel.threads = Parallel.availableCores }
            let ts = make()
            let sums = GradientClipping.sumsOfSquares(ts)
            XCTAssertEqual(sums.map(\.bitPattern), oneByOne.map(\.bitPattern), "threads \(threads)")
            XCTAssertEqual(GradientClipping.clipByGlobalNorm(ts, maxNorm: 0.5).bitPattern, expectedNorm.bitPattern)
            for (t, r) in zip(ts, reference) {
                XCTAssertTrue(t.array.elementsEqual(r.array.map { $0 * coef }) { $0.bitPattern == $1.bitPattern }, "scaled, \(threads)")
            }
            XCTAssertNil(GradientClipping.firstNonFinite(ts))
            ts[5][110_591] = .nan
            ts[6][17] = .infinity
            XCTAssertEqual(GradientClipping.firstNonFinite(ts), 5)
            ts[2][0] = -.infinity
            XCTAssertEqual(GradientClipping.firstNonFinite(ts), 2)
            GradientClipping.zero(ts)
            XCTAssertTrue(ts.allSatisfy { $0.array.allSatisfy { $0.bitPattern == 0 } })
        }
    }

    func testOptimizerHelpersCoverOnlyTrainable() throws {
        let p1 = Tensor(shape: [2]), g1 = Tensor(shape: [2], values: [3, 4])
        let p2 = Tensor(shape: [2]), g2 = Tensor(shape: [2], values: [.nan, 0])
        let opt = try AdamW(
            parameters: [("model.layers.0.mlp.up_proj.weight", p1, g1), ("model.embed_tokens.weight", p2, g2)],
            config: OptimizerConfig(selection: try ParameterSelection(frozen: ["model.embed_tokens.*"])))
        XCTAssertNil(opt.firstNonFiniteGradient(), "frozen gradients are not the optimizer's concern")
        XCTAssertEqual(opt.clipGradNorm(maxNorm: 1), 5)
        XCTAssertEqual(Double(g1[1]), 4 / (5 + 1e-6), accuracy: 1e-6)
        g1[0] = .infinity
        XCTAssertEqual(opt.firstNonFiniteGradient(), "model.layers.0.mlp.up_proj.weight")
        opt.zeroGrad()
        XCTAssertEqual(g1.array, [0, 0])
        XCTAssert(g2[0].isNaN, "zeroGrad touches trainable gradients only")
    }
}

final class OptimizerStateTests: XCTestCase {
    /// Deterministic pseudo-random fill (LCG), so the test needs no RNG state.
    func fill(_ t: Tensor, seed: UInt64) {
        var s = seed &* 6364136223846793005 &+ 1442695040888963407
        for i in 0..<t.count {
            s = s &* 6364136223846793005 &+ 1442695040888963407
            t[i] = Float(Int64(bitPattern: s >> 11) % 2_000_001 - 1_000_000) / 1_000_000
        }
    }

    func makeModel() -> [(name: String, value: Tensor, grad: Tensor?)] {
        let specs: [(String, [Int])] = [
            ("model.embed_tokens.weight", [64, 32]),
            ("model.layers.0.input_layernorm.weight", [32]),
            ("model.layers.0.mlp.up_proj.weight", [300, 200]),  // 60k elements: parallel path
            ("lm_head.weight", [64, 32]),
        ]
        return specs.enumerated().map { i, s in
            let v = Tensor(shape: s.1)
            fill(v, seed: UInt64(i))
            return (s.0, v, Tensor(shape: s.1))
        }
    }

    func config() throws -> OptimizerConfig {
        OptimizerConfig(
            defaults: AdamWHyperparameters(lr: 1e-3, weightDecay: 0.01),
            selection: try ParameterSelection(frozen: ["model.embed_tokens.*"]),
            lrConfig: try LRConfig.parse(yaml: "\"*mlp*\":\n  lr: 3e-3\n  betas: [0.8, 0.99]\n"))
    }

    func setGrads(_ model: [(name: String, value: Tensor, grad: Tensor?)], step: Int) {
        for (i, p) in model.enumerated() { if let g = p.grad { fill(g, seed: UInt64(1000 * step + i)) } }
    }

    func testRoundTripContinuesBitIdentically() throws {
        let schedule = try LRSchedule(kind: .cosine, totalSteps: 6, warmupSteps: 1)
        let modelA = makeModel()
        let optA = try AdamW(parameters: modelA, config: try config())
        for step in 0..<3 {
            setGrads(modelA, step: step)
            optA.step(lrFactor: schedule.factor(step: optA.stepCount))
        }
        // "Checkpoint": copy parameters and state (stateTensors aliases live buffers), JSON metadata.
        let savedParams = modelA.map { ($0.name, $0.value.copy()) }
        let savedState = optA.stateTensors().map { (name: $0.name, tensor: $0.tensor.copy()) }
        let json = try optA.stateMetadata().json()
        XCTAssertEqual(savedState.count, 2 * 3, "frozen embed_tokens has no state")
        XCTAssertEqual(optA.stateMetadata().step, 3)

        for step in 3..<6 {
            setGrads(modelA, step: step)
            optA.step(lrFactor: schedule.factor(step: optA.stepCount))
        }

        // Resume into a fresh model + optimizer.
        let modelB = makeModel()
        for (i, p) in modelB.enumerated() { p.value.copy(from: savedParams[i].1) }
        let optB = try AdamW(parameters: modelB, config: try config())
        try optB.loadState(tensors: savedState, metadata: try AdamWStateMetadata(json: json))
        XCTAssertEqual(optB.stepCount, 3)
        for step in 3..<6 {
            setGrads(modelB, step: step)
            optB.step(lrFactor: schedule.factor(step: optB.stepCount))
        }
        for (a, b) in zip(modelA, modelB) {
            XCTAssertEqual(a.value.array.map(\.bitPattern), b.value.array.map(\.bitPattern), a.name)
        }
        for (a, b) in zip(optA.slots, optB.slots) {
            XCTAssertEqual(a.m.array.map(\.bitPattern), b.m.array.map(\.bitPattern), a.name)
            XCTAssertEqual(a.v.array.map(\.bitPattern), b.v.array.map(\.bitPattern), a.name)
        }

        // Without the state (fresh moments, step 0) the continuation differs: the test can fail.
        let modelC = makeModel()
        for (i, p) in modelC.enumerated() { p.value.copy(from: savedParams[i].1) }
        let optC = try AdamW(parameters: modelC, config: try config())
        for step in 3..<6 {
            setGrads(modelC, step: step)
            optC.step(lrFactor: schedule.factor(step: step))
        }
        XCTAssertNotEqual(modelA[2].value.array, modelC[2].value.array)
    }

    func testLoadStateRejectsMismatch() throws {
        let model = makeModel()
        let opt = try AdamW(parameters: model, config: try config())
        let tensors = opt.stateTensors()
        var meta = opt.stateMetadata()
        // Different trainable set (e.g. frozen_params changed between runs).
        let optAll = try AdamW(parameters: makeModel(), config: OptimizerConfig())
        XCTAssertThrowsError(try optAll.loadState(tensors: tensors, metadata: meta)) { e in
            XCTAssert("\(e)".contains("model.embed_tokens.weight"), "\(e)")
        }
        // Missing tensor.
        XCTAssertThrowsError(try opt.loadState(tensors: Array(tensors.dropLast()), metadata: meta)) { e in
            XCTAssert("\(e)".contains("lm_head.weight.exp_avg_sq"), "\(e)")
        }
        // Wrong size.
        var wrong = tensors
        wrong[0] = (wrong[0].name, Tensor(shape: [3]))
        XCTAssertThrowsError(try opt.loadState(tensors: wrong, metadata: meta))
        meta.format = "something-else"
        XCTAssertThrowsError(try opt.loadState(tensors: tensors, metadata: meta))
        XCTAssertThrowsError(try AdamWStateMetadata(json: "{\"step\": 1}"))
    }
}
