import QATQuant
import QATTrain
import TestSupport
import XCTest

final class RecipeTests: XCTestCase {
    func testDefaultsAndFullRecipe() throws {
        let r = try Recipe.parse(
            """
            model: some/model
            data:
              train: a.h5
              seq_len: 128
            quantize:
              preset: nvfp4_default-kv_fp8
              ste: clipped
            calibration: {samples: 16}
            train:
              mode: qad
              steps: 10
              lr: 2.0e-5
              betas: [0.9, 0.95]
              frozen_params: ["*embed_tokens*"]
              distill: {kd_ratio: 0.5, temperature: 2.0, loss: jsd, beta: 0.25}
            export: {dir: out, save_dtype: float16}
            """, source: "r.yaml")
        XCTAssertEqual(r.model, "some/model")
        XCTAssertEqual(r.data.seqLen, 128)
        XCTAssertEqual(r.data.validation, Recipe.DataSpec().validation)
        XCTAssertEqual(r.steMode, .clipped)
        XCTAssertEqual(r.calibration.samples, 16)
        XCTAssertEqual(r.train.mode, .qad)
        XCTAssertEqual(r.train.lr, 2e-5)
        XCTAssertEqual(r.train.betas, [0.9, 0.95])
        XCTAssertEqual(r.train.frozenParams ?? [], ["*embed_tokens*"])
        XCTAssertEqual(r.train.distill.loss, .jsd)
        XCTAssertEqual(r.train.distill.beta, 0.25)
        XCTAssertEqual(r.export.saveDtype, .f16)
        let q = try XCTUnwrap(r.quantize)
        XCTAssertEqual(q.resolve(quantizerName: "model.layers.0.mlp.up_proj.weight_quantizer")?.enabled, true)
        XCTAssertEqual(q.resolve(quantizerName: "lm_head.weight_quantizer")?.enabled, false)
    }

    func testModelOptListSyntaxAndNullQuantize() throws {
        let r = try Recipe.parse(
            """
            quantize:
              quant_cfg:
                - quantizer_name: "*"
                  enable: false
                - quantizer_name: "*weight_quantizer"
                  cfg: {num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}}
              algorithm: max
            """, source: "r.yaml")
        let q = try XCTUnwrap(r.quantize)
        XCTAssertEqual(q.resolve(quantizerName: "model.layers.0.self_attn.q_proj.weight_quantizer")?.enabled, true)
        XCTAssertEqual(q.resolve(quantizerName: "model.layers.0.self_attn.q_proj.input_quantizer")?.enabled, false)
        XCTAssertNil(try Recipe.parse("quantize: null\n", source: "r.yaml").quantize)
    }

    /// A typo'd key, a wrong type and an out-of-range value each name the key and the line.
    func testErrorsNameKeyAndLine() {
        func message(_ yaml: String) -> String {
            do { _ = try Recipe.parse(yaml, source: "r.yaml"); return "no error" } catch { return "\(error)" }
        }
        let typo = message("model: m\ntrain:\n  mode: qat\n  learning_rate: 1e-4\n")
        XCTAssertTrue(typo.contains("line 4") && typo.contains("train.learning_rate") && typo.contains("unknown key"), typo)
        let type = message("train:\n  steps: many\n")
        XCTAssertTrue(type.contains("line 2") && type.contains("train.steps") && type.contains("integer"), type)
        let range = message("data:\n  seq_len: 1\n")
        XCTAssertTrue(range.contains("line 2") && range.contains("data.seq_len"), range)
        let mode = message("train: {mode: sft}\n")
        XCTAssertTrue(mode.contains("train.mode") && mode.contains("qat"), mode)
        let dtype = message("export:\n  save_dtype: int4\n")
        XCTAssertTrue(dtype.contains("line 2") && dtype.contains("save_dtype"), dtype)
        let both = message("train:\n  trainable_params: [a]\n  frozen_params: [b]\n")
        XCTAssertTrue(both.contains("mutually exclusive"), both)
        let quant = message("quantize:\n  quant_cfg:\n    - quantizer_name: '*'\n      cfg: {num_bits: 7}\n")
        XCTAssertTrue(quant.contains("line 4") && quant.contains("num_bits"), quant)
        XCTAssertTrue(message("model: [unclosed\n").contains("not valid YAML"))
    }

    func testOverrides() throws {
        let r = try Recipe.parse(
            "train:\n  lr: 1.0e-4\n", source: "r.yaml",
            overrides: ["train.lr=2e-5", "train.steps=7", "export.save_dtype=null", "data.validation_sequences=3"])
        XCTAssertEqual(r.train.lr, 2e-5)
        XCTAssertEqual(r.train.steps, 7)
        XCTAssertNil(r.export.saveDtype)
        XCTAssertEqual(r.data.validationSequences, 3)
        XCTAssertThrowsError(try Recipe.parse("{}", source: "r.yaml", overrides: ["train.lr"]))
        XCTAssertThrowsError(try Recipe.parse("{}", source: "r.yaml", overrides: ["train.lrr=1"])) { e in
            XCTAssertTrue("\(e)".contains("did you mean \"lr\""), "\(e)")
        }
    }
}

final class RecipeRenderTests: XCTestCase {
    /// `recipe show` output reads back to the same recipe.
    func testShowRoundTrips() throws {
        let original = try Recipe.parse(
            """
            model: m
            quantize: {preset: nvfp4_default-kv_fp8, ste: clipped}
            train: {mode: qad, steps: 3, frozen_params: ["*norm*"], distill: {loss: reverse_kl, temperature: 2.0}}
            export: {save_dtype: bfloat16}
            """, source: "r.yaml")
        let again = try Recipe.parse(original.yaml, source: "shown.yaml")
        XCTAssertEqual(again.data, original.data)
        XCTAssertEqual(again.train, original.train)
        XCTAssertEqual(again.export, original.export)
        XCTAssertEqual(again.calibration, original.calibration)
        XCTAssertEqual(again.ste, original.ste)
        XCTAssertEqual(
            again.quantize?.entries.map { [$0.quantizerName, "\($0.enable)", "\(String(describing: $0.cfg))"] },
            original.quantize?.entries.map { [$0.quantizerName, "\($0.enable)", "\(String(describing: $0.cfg))"] })
    }
}

final class ShippedRecipeTests: XCTestCase {
    /// Every recipe in recipes/ parses (keys, types, quant_cfg).
    func testShippedRecipesParse() throws {
        let dir = Fixtures.repoRoot.appendingPathComponent("recipes")
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".yaml") }
        XCTAssertGreaterThanOrEqual(files.count, 5)
        for f in files {
            let r = try Recipe.load(path: dir.appendingPathComponent(f).path)
            XCTAssertNotNil(r.quantize, f)
        }
    }
}
