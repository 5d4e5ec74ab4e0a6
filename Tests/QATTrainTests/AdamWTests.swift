import QATTrain
import XCTest

/// Asserts |actual - expected| <= ulps * ulp(expected) element-wise; the default 0 demands the
/// exact bits of the float32 emulation (which the kernel reproduces, SIMD body and tail alike).
func assertULP(
    _ actual: [Float], _ expected: [Float], ulps: Float = 0, _ message: String = "",
    file: StaticString = #filePath, line: UInt = #line
) {
    XCTAssertEqual(actual.count, expected.count, message, file: file, line: line)
    for (i, (a, e)) in zip(actual, expected).enumerated() {
        let tol = e == 0 ? 0 : ulps * e.ulp
        XCTAssert(
            abs(a - e) <= tol, "\(message) [\(i)]: got \(a), expected \(e) (diff \(abs(a - e)), tol \(tol))",
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

    /// The 5-element example is repeated 4 times (20 elements): elements 0-15 go through the
    /// SIMD8 body of the kernel and 16-19 through its scalar tail; both must give the same bits.
    func rep(_ x: [Float]) -> [Float] { x + x + x + x }

    func makeOptimizer(weightDecay: Double) throws -> (AdamW, Tensor, Tensor) {
        let p = Tensor(shape: [20], values: rep(p0))
        let g = Tensor(shape: [20])
        let opt = try AdamW(
            parameters: [("model.layers.0.mlp.up_proj.weight", p, g)],
            config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 1e-2, weightDecay: weightDecay)))
        return (opt, p, g)
    }

    func testTwoStepsNoWeightDecay() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0)
        g.copy(from: Tensor(shape: [20], values: rep(g1)))
        opt.step()
        XCTAssertEqual(opt.stepCount, 1)
        assertULP(p.array, rep([0.49000000953674316, -0.9900000095367432, 1.9900000095367432, 0.0, 0.2599999010562897]), "p1")
        assertULP(
            opt.slots[0].m.array, rep([0.010000000707805157, -0.020000001415610313, 0.030000001192092896, 0.0, -0.00010000000474974513]),
            "m1")
        assertULP(
            opt.slots[0].v.array,
            rep([1.0000000656873453e-05, 4.0000002627493814e-05, 9.000000864034519e-05, 0.0, 1.0000001937626735e-09]), "v1")
        g.copy(from: Tensor(shape: [20], values: rep(g2)))
        opt.step()
        assertULP(
            p.array, rep([0.4873366355895996, -0.9936610460281372, 1.9800000190734863, -0.0074412627145648, 0.25256189703941345]), "p2")
        assertULP(
            opt.slots[0].m.array,
            rep([0.004000000189989805, 0.02200000174343586, 0.05700000375509262, 0.00010000000474974513, 0.1999099999666214]), "m2")
        assertULP(
            opt.slots[0].v.array,
            rep([1.2490000699472148e-05, 0.0001999600208364427, 0.00017991001368500292, 1.0000001937626735e-09, 0.00400000112131238]), "v2")
    }

    func testTwoStepsWithDecoupledWeightDecay() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0.1)
        g.copy(from: Tensor(shape: [20], values: rep(g1)))
        opt.step()
        // p *= (1 - 1e-2*0.1) first, then the same Adam update (element 3: g = 0, p = 0 stays 0).
        assertULP(p.array, rep([0.4895000159740448, -0.9890000224113464, 1.9880000352859497, 0.0, 0.2597498893737793]), "p1")
        g.copy(from: Tensor(shape: [20], values: rep(g2)))
        opt.step()
        assertULP(
            p.array, rep([0.48634713888168335, -0.9916720986366272, 1.976012110710144, -0.0074412627145648, 0.2520521283149719]), "p2")
        // Moments do not see the decay (decoupled).
        assertULP(
            opt.slots[0].m.array,
            rep([0.004000000189989805, 0.02200000174343586, 0.05700000375509262, 0.00010000000474974513, 0.1999099999666214]), "m2")
    }

    /// Five steps on 21 "ugly" values (numpy rng seed 7) so that rounding order matters: the
    /// float32 emulation in the comment above, run in python3, gives these bits; replacing the
    /// lerp by the textbook `m*b1 + (1-b1)*g` changes 10 of the 21 final m values.
    /// lr 3e-3, weight_decay 0.1, betas (0.9, 0.95), eps 1e-8.
    func testFiveStepsBitExactOnUglyValues() throws {
        let p0: [Float] = [
            0.001230153371579945, 0.2987455427646637, -0.27413785457611084, -0.8905918598175049, -0.454670786857605, -0.9916465282440186,
            0.0601436011493206, 1.3402152061462402, -0.49220651388168335, -0.6204748749732971, 0.4898420572280884, 0.35688701272010803,
            0.1054142490029335, -0.9304680228233337, -0.02925182320177555, 0.695303201675415, -1.3442145586013794, -0.45761576294898987,
            -1.9012227058410645, -1.289537787437439, -1.8417350053787231,
        ]
        let grads: [[Float]] = [
            [
                -0.007052734028548002, -0.03802339360117912, 0.008137931115925312, 0.004702532663941383, -0.005607928149402142,
                -0.07550279051065445, -0.016160786151885986, -0.0014550283085554838, 0.0033992696553468704, -0.04590407386422157,
                -0.014332598075270653, -0.029355572536587715, -0.024265117943286896, 0.03182695806026459, -0.02422603964805603,
                -0.0009756511426530778, 0.026531696319580078, -0.017508013173937798, -0.003351058578118682, 0.0033139241859316826,
                0.0019134532194584608,
            ],
            [
                -0.036751676350831985, 0.0022842069156467915, 0.0407647043466568, -0.046414341777563095, 0.025781480595469475,
                0.0035806207451969385, -0.019244112074375153, 0.06001249700784683, 0.02286779135465622, -0.03597866743803024,
                0.0022354868706315756, 0.017300687730312347, -0.005663463845849037, 0.020487308502197266, -0.0019955195020884275,
                0.02001742646098137, 0.04315567761659622, -0.020269867032766342, 0.006094158161431551, -0.013899227604269981,
                0.0038180523552000523,
            ],
            [
                -0.03561583533883095, -0.017379047349095345, -0.005885879043489695, 0.026962915435433388, 0.03435666114091873,
                -0.03970583528280258, -0.023839270696043968, 0.019407102838158607, -0.059772592037916183, -0.013895096257328987,
                -0.0029186077881604433, 0.03771045058965683, 0.020682116970419884, -0.009816402569413185, -0.011057277210056782,
                -0.007505862042307854, 0.0457058809697628, -0.012840747833251953, -0.009110411629080772, 0.0105776721611619,
                -0.0036231132689863443,
            ],
            [
                -0.0059185270220041275, -0.033422015607357025, -0.0003456440463196486, -0.013307436369359493, 0.03498383238911629,
                0.019592655822634697, -0.0007243083673529327, 0.02005143091082573, -0.010196086950600147, 0.03156379237771034,
                -0.00016198682715184987, 0.01750146970152855, -0.0387267991900444, 0.010400401428341866, -0.05064612254500389,
                -0.061059869825839996, -0.009134306572377682, -0.026997828856110573, 0.00492158392444253, 0.06734269857406616,
                -0.024951694533228874,
            ],
            [
                -0.018718307837843895, 0.006162118166685104, 0.014790399000048637, -0.005292181856930256, -0.006177910137921572,
                0.02107388898730278, 0.015597228892147541, -0.031010275706648827, -0.0023754395078867674, 0.0010586054995656013,
                -0.03163453936576843, 0.007795173209160566, -0.02573869377374649, 0.029162000864744186, 0.005782377440482378,
                0.0026791945565491915, -0.017730850726366043, -0.003558294614776969, -0.05993238836526871, -0.033942222595214844,
                0.010885193943977356,
            ],
        ]
        let p = Tensor(shape: [21], values: p0), g = Tensor(shape: [21])
        let opt = try AdamW(
            parameters: [("model.layers.0.mlp.down_proj.weight", p, g)],
            config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 3e-3, weightDecay: 0.1, beta1: 0.9, beta2: 0.95)))
        for gs in grads {
            g.copy(from: Tensor(shape: [21], values: gs))
            opt.step()
        }
        assertULP(
            p.array,
            [
                0.014455929398536682, 0.3096707761287689, -0.2840634882450104, -0.8883568048477173, -0.4595714807510376,
                -0.9808644652366638, 0.0727950781583786, 1.3335753679275513, -0.49368634819984436, -0.6087974309921265, 0.4987223744392395,
                0.35595840215682983, 0.11425065249204636, -0.9407128095626831, -0.017391623929142952, 0.69675213098526, -1.3546841144561768,
                -0.4424514174461365, -1.893655776977539, -1.291202425956726, -1.843143343925476,
            ], "p5")
        assertULP(
            opt.slots[0].m.array,
            [
                -0.008431307971477509, -0.006127668544650078, 0.004476852249354124, -0.0026179638225585222, 0.006825176998972893,
                -0.004038155544549227, -0.0028996507171541452, 0.004555022809654474, -0.004106683656573296, -0.0038135123904794455,
                -0.004191834945231676, 0.004744397010654211, -0.006388930603861809, 0.006638799328356981, -0.006610496435314417,
                -0.004440186079591513, 0.0059937965124845505, -0.006452108733355999, -0.006063838489353657, 0.0027275849133729935,
                -0.0010467276442795992,
            ], "m5")
        assertULP(
            opt.slots[0].v.array,
            [
                0.00013635105278808624, 0.00012769018940161914, 8.64414541865699e-05, 0.0001358702138531953, 0.00014308170648291707,
                0.0003442925517447293, 6.434573151636869e-05, 0.00023865338880568743, 0.0001893293665489182, 0.00019739926210604608,
                5.9002999478252605e-05, 0.00012968505325261503, 0.00014901898975949734, 0.00011125364108011127, 0.0001531002635601908,
                0.00019721193530131131, 0.0002224567870143801, 7.279235433088616e-05, 0.00018653989536687732, 0.00028679598472081125,
                3.686363925226033e-05,
            ], "v5")
    }

    func testLRFactorScalesTheStep() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0)
        g.copy(from: Tensor(shape: [20], values: rep(g1)))
        opt.step(lrFactor: 0)  // first warmup step: lr 0 moves nothing but advances the step
        XCTAssertEqual(p.array, rep(p0))
        XCTAssertEqual(opt.stepCount, 1)
        opt.step(lrFactor: 0.5)
        // Step 2 with the same gradient: m = 0.19 g, v = 0.001999 g^2, mhat/sqrt(vhat) = sign(g)
        // exactly in reals, so p moves by lr*0.5 = 0.005.
        XCTAssertEqual(p[0], 0.495, accuracy: 1e-6)
        XCTAssertEqual(p[1], -0.995, accuracy: 1e-6)
    }

    /// A device optimizer's step (`step(lrFactor:update:)`): the step count advances once, every
    /// slot is handed over with the coefficients `step(lrFactor:)` uses, and the host tensors are
    /// left to the caller.
    func testStepWithAnUpdateClosureHandsOverEverySlotAndItsCoefficients() throws {
        let (opt, p, g) = try makeOptimizer(weightDecay: 0.1)
        g.copy(from: Tensor(shape: [20], values: rep(g1)))
        var seen: [(Int, String, AdamW.Coefficients)] = []
        opt.step(lrFactor: 0.5) { i, slot, c in seen.append((i, slot.name, c)) }
        XCTAssertEqual(opt.stepCount, 1)
        XCTAssertEqual(p.array, rep(p0))  // the closure did not touch them
        XCTAssertEqual(seen.map(\.0), [0])
        XCTAssertEqual(seen.map(\.1), ["model.layers.0.mlp.up_proj.weight"])
        let h = opt.groups[0].hyper, expected = AdamW.coefficients(h, lr: h.lr * 0.5, step: 1)
        let c = try XCTUnwrap(seen.first?.2)
        XCTAssertEqual(
            [c.decay, c.lerpWeight, c.beta2, c.oneMinusBeta2, c.bc2Sqrt, c.eps, c.negStepSize],
            [
                expected.decay, expected.lerpWeight, expected.beta2, expected.oneMinusBeta2, expected.bc2Sqrt,
                expected.eps, expected.negStepSize,
            ])
        XCTAssertEqual(c.decay, Float(1 - 1e-2 * 0.5 * 0.1))
        XCTAssertEqual(c.negStepSize, Float(-(1e-2 * 0.5 / (1 - 0.9))))
    }

    /// beta1 >= 0.5 takes the other lerp branch; compare with a float64 textbook AdamW.
    func testLargeLerpWeightBranch() throws {
        let p = Tensor(shape: [3], values: [1, -2, 0.5])
        let g = Tensor(shape: [3], values: [0.3, 0.7, -0.2])
        let opt = try AdamW(
            parameters: [("w", p, g)],
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
            parameters: [
                ("model.embed_tokens.weight", a, ga), ("model.layers.0.mlp.up_proj.weight", b, gb),
                ("lm_head.weight", c, nil),
            ],
            config: OptimizerConfig(
                defaults: AdamWHyperparameters(lr: 0.1, weightDecay: 0.5),
                selection: try ParameterSelection(trainable: ["*mlp*"])))
        XCTAssertEqual(opt.slots.map(\.name), ["model.layers.0.mlp.up_proj.weight"])
        XCTAssertEqual(opt.frozen, ["model.embed_tokens.weight", "lm_head.weight"])
        XCTAssertEqual(
            opt.stateTensors().map(\.name),
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
        XCTAssertThrowsError(
            try AdamW(
                parameters: [("w", p, g)],
                config: OptimizerConfig(defaults: AdamWHyperparameters(beta2: 1.0))))
        XCTAssertThrowsError(
            try AdamW(
                parameters: [("w", p, g)],
                config: OptimizerConfig(defaults: AdamWHyperparameters(lr: -1))))
    }

    func testNormsAndBiasesNotDecayedByDefault() throws {
        let names = [
            "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_norm.weight", "model.norm.weight", "lm_head.weight",
        ]
        var params: [(name: String, value: Tensor, grad: Tensor?)] = []
        for n in names { params.append((n, Tensor(shape: [2], values: [1, 1]), Tensor(shape: [2]))) }
        let opt = try AdamW(parameters: params, config: OptimizerConfig(defaults: AdamWHyperparameters(lr: 0.1, weightDecay: 0.5)))
        opt.step()  // zero gradients: only weight decay moves anything
        for (n, v, _) in params {
            let decays = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"].contains(n)
            XCTAssertEqual(v.array, decays ? [0.95, 0.95] : [1, 1], n)
        }
        // Overridable: decay everything.
        let plan = try ParamGroupPlan.build(
            names: names, config: OptimizerConfig(defaults: AdamWHyperparameters(weightDecay: 0.5), noDecay: []))
        XCTAssertEqual(plan.groups.count, 1)
        XCTAssertEqual(plan.groups[0].hyper.weightDecay, 0.5)
    }
}
