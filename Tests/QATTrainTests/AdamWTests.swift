import QATTrain
import XCTest

/// Asserts |actual - expected| <= ulps * ulp(expected) element-wise (exact for zeros).
func assertULP(_ actual: [Float], _ expected: [Float], ulps: Float = 1, _ message: String = "",
               file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(actual.count, expected.count, message, file: file, line: line)
    for (i, (a, e)) in zip(actual, expected).enumerated() {
        let tol = e == 0 ? 0 : ulps * e.ulp
        XCTAssert(abs(a - e) <= tol, "\(message) [\(i)]: got \(a), expected \(e) (diff \(abs(a - e)), tol \(tol))",
                  file: file, line: line)
    }
}

final class AdamWTests: XCTestCase {
    // Hand-computed reference: the numpy float32 emulation of torch.optim.AdamW's single-tensor
    // step, written while writing this test (python3, numpy 2.4):
    //   if wd: p = p * f32(1 - lr*wd)
    //   m = fma(f32(1-b1), g - m, m)                  # lerp_
    //   v = v*f32(b2) + (f32(1-b2)*g)*g               # mul_ + addcmul_
    //   denom = sqrt(v)/f32((1-b2**t)**0.5) + f32(eps)
    //   p = p + (f32(-lr/(1-b1**t))*m)/denom          # addcdiv_
    // with p0 = [0.5, -1, 2, 0, 0.25], g1 = [0.1, -0.2, 0.3, 0, -1e-3],
    // g2 = [-0.05, 0.4, 0.3, 1e-3, 2], lr 1e-2, betas (0.9, 0.999), eps 1e-8.
    // A float64 textbook AdamW agrees to ~1e-8 (step 1 p: 0.4900000009999999, ...).
    // Bias correction is visible at step 1: every non-zero gradient moves p by lr (0.01),
    // where uncorrected m/sqrt(v) would move it by 0.01 * 0.1/sqrt(0.001) = 0.0316.
    let p0: [Float] = [0.5, -1.0, 2.0, 0.0, 0.25]
    let g1: [Float] = [0.1, -0.2, 0.3, 0.0, -1e-3]
    let g2: [Float] = [-0.05, 0.4, 0.3, 1e-3, 2.0]

    func makeOptimizer(weightDecay: Double) throws -> (AdamW, Tensor, Tensor) {
        let p = Tensor(shape: [5], values: p0)
        let g = Tensor(shape: [5])
        let opt = try AdamW(parameters: [("model.layers.0.mlp.up_proj.weight", p, g)],
                            config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 1e-2, weightDecay: weightDecay)))
        return (opt, p, g)
    }

    func testTwoStepsNoWeightDecay() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0)
        g.copy(from: Tensor(shape: [5], values: g1))
        opt.step()
        XCTAssertEqual(opt.stepCount, 1)
        assertULP(p.array, [0.49000000953674316, -0.9900000095367432, 1.9900000095367432, 0.0, 0.2599999010562897], "p1")
        assertULP(opt.slots[0].m.array, [0.010000000707805157, -0.020000001415610313, 0.030000001192092896, 0.0, -0.00010000000474974513], "m1")
        assertULP(opt.slots[0].v.array, [1.0000000656873453e-05, 4.0000002627493814e-05, 9.000000864034519e-05, 0.0, 1.0000001937626735e-09], "v1")
        g.copy(from: Tensor(shape: [5], values: g2))
        opt.step()
        assertULP(p.array, [0.4873366355895996, -0.9936610460281372, 1.9800000190734863, -0.0074412627145648, 0.25256189703941345], "p2")
        assertULP(opt.slots[0].m.array, [0.004000000189989805, 0.02200000174343586, 0.05700000375509262, 0.00010000000474974513, 0.1999099999666214], "m2")
        assertULP(opt.slots[0].v.array, [1.2490000699472148e-05, 0.0001999600208364427, 0.00017991001368500292, 1.0000001937626735e-09, 0.00400000112131238], "v2")
    }

    func testTwoStepsWithDecoupledWeightDecay() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0.1)
        g.copy(from: Tensor(shape: [5], values: g1))
        opt.step()
        // p *= (1 - 1e-2*0.1) first, then the same Adam update (element 3: g = 0, p = 0 stays 0).
        assertULP(p.array, [0.4895000159740448, -0.9890000224113464, 1.9880000352859497, 0.0, 0.2597498893737793], "p1")
        g.copy(from: Tensor(shape: [5], values: g2))
        opt.step()
        assertULP(p.array, [0.48634713888168335, -0.9916720986366272, 1.976012110710144, -0.0074412627145648, 0.2520521283149719], "p2")
        // Moments do not see the decay (decoupled).
        assertULP(opt.slots[0].m.array, [0.004000000189989805, 0.02200000174343586, 0.05700000375509262, 0.00010000000474974513, 0.1999099999666214], "m2")
    }

    func testLRFactorScalesTheStep() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0)
        g.copy(from: Tensor(shape: [5], values: g1))
        opt.step(lrFactor: 0)   // first warmup step: lr 0 moves nothing but advances the step
        XCTAssertEqual(p.array, p0)
        XCTAssertEqual(opt.stepCount, 1)
        opt.step(lrFactor: 0.5)
        // Step 2 with the same gradient: m = 0.19 g, v = 0.001999 g^2, mhat/sqrt(vhat) = sign(g)
        // exactly in reals, so p moves by lr*0.5 = 0.005.
        XCTAssertEqual(p[0], 0.495, accuracy: 1e-6)
        XCTAssertEqual(p[1], -0.995, accuracy: 1e-6)
    }

    /// beta1 >= 0.5 takes the other lerp branch; compare with a float64 textbook AdamW.
    func testLargeLerpWeightBranch() throws {
        let p = Tensor(shape: [3], values: [1, -2, 0.5])
        let g = Tensor(shape: [3], values: [0.3, 0.7, -0.2])
        let opt = try AdamW(parameters: [("w", p, g)],
                            config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 0.1, beta1: 0.3, beta2: 0.9)))
        opt.step()
        g.copy(from: Tensor(shape: [3], values: [-0.1, 0.2, 0.4]))
        opt.step()
        // python3: float64 AdamW, lr 0.1, betas (0.3, 0.9), two steps
        let expected: [Double] = [0.9035149013783529, -2.1626822746738927, 0.5185700172713753]
        for i in 0..<3 { XCTAssertEqual(Double(p[i]), expected[i], accuracy: 2e-6) }
    }

    func testStepCountAndStateOnlyForTrainable() throws {
        let a = Tensor(shape: [4], values: [1, 2, 3, 4]), ga = Tensor(shape: [4], values: [1, 1, 1, 1])
        let b = Tensor(shape: [2, 2], values: [1, 2, 3, 4]), gb = Tensor(shape: [2, 2], values: [1, 1, 1, 1])
        let c = Tensor(shape: [3], values: [5, 6, 7])
        let opt = try AdamW(
            parameters: [("model.embed_tokens.weight", a, ga), ("model.layers.0.mlp.up_proj.weight", b, gb),
                         ("lm_head.weight", c, nil)],
            config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 0.1, weightDecay: 0.5),
                                    selection: try ParameterSelection(trainable: ["*mlp*"])))
        XCTAssertEqual(opt.slots.map(\.name), ["model.layers.0.mlp.up_proj.weight"])
        XCTAssertEqual(opt.frozen, ["model.embed_tokens.weight", "lm_head.weight"])
        XCTAssertEqual(opt.stateTensors().map(\.name),
                       ["model.layers.0.mlp.up_proj.weight.exp_avg", "model.layers.0.mlp.up_proj.weight.exp_avg_sq"])
        opt.step()
        XCTAssertEqual(a.array, [1, 2, 3, 4], "frozen parameter must not move even with a gradient")
        XCTAssertEqual(c.array, [5, 6, 7])
        XCTAssertNotEqual(b.array, [1, 2, 3, 4])
    }

    func testTrainableWithoutGradientIsAnError() {
        XCTAssertThrowsError(try AdamW(parameters: [("w", Tensor(shape: [2]), nil)], config: OptimizerConfig())) { e in
            XCTAssert("\(e)".contains("'w'"), "\(e)")
        }
    }

    func testInvalidHyperparametersRejected() {
        let p = Tensor(shape: [1]), g = Tensor(shape: [1])
        XCTAssertThrowsError(try AdamW(parameters: [("w", p, g)],
                                       config: OptimizerConfig(defaults: AdamWHyperparameters(beta2: 1.0))))
        XCTAssertThrowsError(try AdamW(parameters: [("w", p, g)],
                                       config: OptimizerConfig(defaults: AdamWHyperparameters(lr: -1))))
    }

    func testNormsAndBiasesNotDecayedByDefault() throws {
        let names = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                     "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
                     "model.layers.0.self_attn.q_norm.weight", "model.norm.weight", "lm_head.weight"]
        var params: [(name: String, value: Tensor, grad: Tensor?)] = []
        for n in names { params.append((n, Tensor(shape: [2], values: [1, 1]), Tensor(shape: [2]))) }
        let opt = try AdamW(parameters: params, config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 0.1, weightDecay: 0.5)))
        opt.step()   // zero gradients: only weight decay moves anything
        for (n, v, _) in params {
            let decays = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"].contains(n)
            XCTAssertEqual(v.array, decays ? [0.95, 0.95] : [1, 1], n)
        }
        // Overridable: decay everything.
        let plan = try ParamGroupPlan.build(names: names, config: OptimizerConfig(defaults: AdamWHyperparameters(weightDecay: 0.5), noDecay: []))
        XCTAssertEqual(plan.groups.count, 1)
        XCTAssertEqual(plan.groups[0].hyper.weightDecay, 0.5)
    }
}
