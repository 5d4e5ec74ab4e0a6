import Foundation
import QATTrain
import TestSupport
import XCTest
import Yams

final class ParameterGroupTests: XCTestCase {
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]

    func group(of name: String, in plan: ParamGroupPlan) -> ParamGroup? {
        plan.groups.first { $0.parameterNames.contains(name) }
    }

    // MARK: trainable / frozen

    func testTrainableParamsSelectsOnlyMatching() throws {
        let sel = try ParameterSelection(trainable: ["*mlp*", "lm_head.weight"])
        let plan = try ParamGroupPlan.build(names: names, config: OptimizerConfig(selection: sel))
        let trainable = plan.groups.flatMap(\.parameterNames).sorted()
        XCTAssertEqual(trainable, ["lm_head.weight", "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"])
        XCTAssertEqual(plan.frozen.count, names.count - 3)
    }

    func testFrozenParamsFreezesOnlyMatching() throws {
        let sel = try ParameterSelection(frozen: ["model.embed_tokens.*", "*norm*"])
        let plan = try ParamGroupPlan.build(names: names, config: OptimizerConfig(selection: sel))
        XCTAssertEqual(plan.frozen, ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight"])
        XCTAssertEqual(plan.groups.flatMap(\.parameterNames).count, names.count - 3)
    }

    func testTrainableAndFrozenAreMutuallyExclusive() {
        XCTAssertThrowsError(try ParameterSelection(trainable: ["*mlp*"], frozen: ["*norm*"])) { e in
            XCTAssert("\(e)".contains("mutually exclusive"), "\(e)")
        }
        // Empty lists count as absent (ModelOpt: `if not trainable and not frozen`).
        XCTAssertNoThrow(try ParameterSelection(trainable: [], frozen: ["*norm*"]))
    }

    func testPatternMatchingNothingIsAnErrorNamingIt() throws {
        let sel = try ParameterSelection(trainable: ["*mlp*", "*mpl_typo*"])
        XCTAssertThrowsError(try ParamGroupPlan.build(names: names, config: OptimizerConfig(selection: sel))) { e in
            XCTAssert("\(e)".contains("'*mpl_typo*'"), "\(e)")
            XCTAssert("\(e)".contains("trainable_params"), "\(e)")
            XCTAssertFalse("\(e)".contains("'*mlp*'"), "the good pattern must not be blamed: \(e)")
        }
        let fro = try ParameterSelection(frozen: ["model.layer.*"])  // missing "s"
        XCTAssertThrowsError(try ParamGroupPlan.build(names: names, config: OptimizerConfig(selection: fro))) { e in
            XCTAssert("\(e)".contains("'model.layer.*'") && "\(e)".contains("frozen_params"), "\(e)")
        }
    }

    // MARK: lr_config

    func testLRConfigFirstMatchWinsAndOrderMatters() throws {
        let yamlA = """
            "*self_attn*":
              lr: 1e-4
            "*q_proj*":
              lr: 1e-3
            """
        let yamlB = """
            "*q_proj*":
              lr: 1e-3
            "*self_attn*":
              lr: 1e-4
            """
        let defaults = AdamWHyperparameters(lr: 5e-5, weightDecay: 0.01)
        let planA = try ParamGroupPlan.build(
            names: names, config: OptimizerConfig(defaults: defaults, lrConfig: try LRConfig.parse(yaml: yamlA)))
        let planB = try ParamGroupPlan.build(
            names: names, config: OptimizerConfig(defaults: defaults, lrConfig: try LRConfig.parse(yaml: yamlB)))
        let q = "model.layers.0.self_attn.q_proj.weight", k = "model.layers.0.self_attn.k_proj.weight"
        XCTAssertEqual(group(of: q, in: planA)?.hyper.lr, 1e-4, "A: *self_attn* comes first and wins for q_proj")
        XCTAssertEqual(group(of: q, in: planB)?.hyper.lr, 1e-3, "B: *q_proj* comes first and wins")
        XCTAssertEqual(group(of: k, in: planA)?.hyper.lr, 1e-4)
        XCTAssertEqual(group(of: k, in: planB)?.hyper.lr, 1e-4)
        XCTAssertEqual(group(of: "model.layers.1.self_attn.q_proj.weight", in: planB)?.pattern, "*q_proj*")
        // Unmatched parameters use the global values.
        let mlp = group(of: "model.layers.0.mlp.gate_proj.weight", in: planA)
        XCTAssertEqual(mlp?.hyper, defaults)
        XCTAssertNil(mlp?.pattern)
        // In A, *q_proj* is fully shadowed: reported, not an error.
        XCTAssertEqual(planA.unusedLRConfigPatterns, ["*q_proj*"])
        XCTAssertEqual(planB.unusedLRConfigPatterns, [])
    }

    func testLRConfigOverridesAndNoDecayInteraction() throws {
        let yaml = """
            "*mlp*":
              lr: "2e-5"
              betas: [0.8, 0.95]
              eps: 1e-6
            "*layernorm*":
              weight_decay: 0.05
            """
        let cfg = try LRConfig.parse(yaml: yaml)
        let plan = try ParamGroupPlan.build(
            names: names,
            config: OptimizerConfig(
                defaults: AdamWHyperparameters(lr: 1e-4, weightDecay: 0.1), lrConfig: cfg))
        let mlp = try XCTUnwrap(group(of: "model.layers.0.mlp.down_proj.weight", in: plan))
        XCTAssertEqual(mlp.hyper, AdamWHyperparameters(lr: 2e-5, weightDecay: 0.1, beta1: 0.8, beta2: 0.95, eps: 1e-6))
        // ModelOpt applies lr_config after the no-decay rule: an explicit weight_decay wins.
        XCTAssertEqual(group(of: "model.layers.0.input_layernorm.weight", in: plan)?.hyper.weightDecay, 0.05)
        // A norm not matched by lr_config keeps the default no-decay.
        XCTAssertEqual(group(of: "model.norm.weight", in: plan)?.hyper.weightDecay, 0)
        XCTAssertEqual(group(of: "model.norm.weight", in: plan)?.hyper.lr, 1e-4)
        XCTAssertEqual(group(of: "lm_head.weight", in: plan)?.hyper.weightDecay, 0.1)
        // Groups are (pattern, decay class) in first-encounter order, as ModelOpt builds them.
        XCTAssertEqual(plan.groups.map(\.pattern), [nil, "*layernorm*", "*mlp*", nil])
        XCTAssertEqual(plan.groups.map(\.decays), [true, false, true, false])
    }

    func testLRConfigPatternMatchingNothingIsAnError() throws {
        let cfg = try LRConfig.parse(yaml: "\"*mlp*\":\n  lr: 1e-5\n\"*lm_haed*\":\n  lr: 1e-6\n")
        XCTAssertThrowsError(try ParamGroupPlan.build(names: names, config: OptimizerConfig(lrConfig: cfg))) { e in
            XCTAssert("\(e)".contains("'*lm_haed*'") && "\(e)".contains("line 3"), "\(e)")
        }
    }

    func testLRConfigErrorsNameKeyAndLine() {
        let unknown = "\"*mlp*\":\n  lr: 1e-5\n\"*attn*\":\n  lr: 1e-5\n  weight_decy: 0.1\n"
        XCTAssertThrowsError(try LRConfig.parse(yaml: unknown, source: "lr.yaml")) { e in
            let s = "\(e)"
            XCTAssert(s.contains("lr.yaml:5") && s.contains("'weight_decy'") && s.contains("'*attn*'"), s)
        }
        let notNumber = "\"*mlp*\":\n  lr: fast\n"
        XCTAssertThrowsError(try LRConfig.parse(yaml: notNumber, source: "lr.yaml")) { e in
            let s = "\(e)"
            XCTAssert(s.contains("lr.yaml:2") && s.contains("'lr'"), s)
        }
        let badBetas = "\"*mlp*\":\n  betas: 0.9\n"
        XCTAssertThrowsError(try LRConfig.parse(yaml: badBetas)) { e in XCTAssert("\(e)".contains("betas"), "\(e)") }
        let badBeta = "\"*mlp*\":\n  betas: [0.9, 1.5]\n"
        XCTAssertThrowsError(try LRConfig.parse(yaml: badBeta)) { e in XCTAssert("\(e)".contains("beta2"), "\(e)") }
        let notMapping = "- a\n- b\n"
        XCTAssertThrowsError(try LRConfig.parse(yaml: notMapping))
        let dup = "\"*mlp*\":\n  lr: 1\n\"*mlp*\":\n  lr: 2\n"
        // Yams rejects duplicated keys itself; either way the message names the pattern.
        XCTAssertThrowsError(try LRConfig.parse(yaml: dup)) { e in XCTAssert("\(e)".contains("'*mlp*'"), "\(e)") }
    }

    func testLRConfigInlineOrFilePath() throws {
        let dir = Fixtures.tempDir("lrconfig")
        defer { try? FileManager.default.removeItem(at: dir) }
        let text = "\"*lm_head*\":\n  lr: 1e-5\n\"*mlp*\":\n  lr: 5e-5\n"
        try text.write(to: dir.appendingPathComponent("lr.yaml"), atomically: true, encoding: .utf8)

        let recipe = try XCTUnwrap(
            try Yams.compose(yaml: "lr_config: lr.yaml\ninline:\n  \"*lm_head*\":\n    lr: 1e-5\n  \"*mlp*\":\n    lr: 5e-5\n"))
        let fromFile = try LRConfig.fromRecipe(try XCTUnwrap(recipe["lr_config"]), baseDirectory: dir.path)
        let inline = try LRConfig.fromRecipe(try XCTUnwrap(recipe["inline"]))
        XCTAssertEqual(fromFile.entries.map(\.pattern), ["*lm_head*", "*mlp*"])
        XCTAssertEqual(fromFile.entries.map(\.lr), [1e-5, 5e-5])
        XCTAssertEqual(inline.entries.map(\.pattern), fromFile.entries.map(\.pattern))
        XCTAssertEqual(inline.entries.map(\.lr), fromFile.entries.map(\.lr))
        XCTAssertEqual(fromFile.entries.map(\.line), [1, 3])
        XCTAssertThrowsError(try LRConfig.load(path: dir.appendingPathComponent("missing.yaml").path)) { e in
            XCTAssert("\(e)".contains("missing.yaml"), "\(e)")
        }
    }

    func testSummaryMentionsGroups() throws {
        let plan = try ParamGroupPlan.build(
            names: names, config: OptimizerConfig(lrConfig: try LRConfig.parse(yaml: "\"*mlp*\":\n  lr: 1e-5\n")))
        XCTAssert(plan.summary.contains("lr_config '*mlp*'"), plan.summary)
    }
}
