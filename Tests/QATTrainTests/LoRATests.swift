import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant
import QATTrain
import TestSupport
import XCTest

final class LoRATests: XCTestCase {
    func randomTensor(_ shape: [Int], seed: UInt64, scale: Float = 1) -> Tensor {
        var g = SplitMix64(seed: seed)
        let t = Tensor(shape: shape, zeroed: false)
        for i in 0..<t.count { t[i] = g.nextGaussian() * scale }
        return t
    }

    func stream(_ n: Int, seed: UInt64 = 11) -> [Int32] {
        var rng = SplitMix64(seed: seed)
        return (0..<n).map { _ in Int32(rng.next() % 512) }
    }

    // MARK: - Adapter math

    /// loss = Σ G ⊙ linear(x); the analytic dA, dB, dx against central differences (the loss
    /// is linear in each of them, so the differences are exact up to rounding), without and
    /// with dropout (the mask is keyed, so every re-evaluation draws the same one).
    func testAdapterGradientsMatchFiniteDifferences() throws {
        for dropout in [0.0, 0.3] {
            let n = 6, inF = 40, outF = 24
            let lin = Linear(
                name: "model.layers.0.self_attn.q_proj",
                weight: Parameter(name: "w", value: randomTensor([outF, inF], seed: 1, scale: 0.2)),
                bias: Parameter(name: "b", value: randomTensor([outF], seed: 2)))
            let ctx = LoRAContext(rank: 4, alpha: 8, dropout: dropout, seed: 7)
            ctx.isTraining = { true }
            let ad = LoRAAdapter(module: lin.name, index: 1, inFeatures: inF, outFeatures: outF, context: ctx)
            ad.B.value.copy(from: randomTensor([outF, 4], seed: 3, scale: 0.3))  // B = 0 would make dA vanish
            ad.A.setRequiresGrad(true); ad.B.setRequiresGrad(true)
            lin.adapter = ad
            let x = randomTensor([n, inF], seed: 4), G = randomTensor([n, outF], seed: 5)
            let out = Tensor(shape: [n, outF])
            func loss() throws -> Double {
                try lin.forward(x.data, out: out.data, n: n)
                return (0..<out.count).reduce(0.0) { $0 + Double(out[$1]) * Double(G[$1]) }
            }
            let used = try lin.forward(x.data, out: out.data, n: n)
            let dx = Tensor(shape: [n, inF])
            lin.backward(dy: G.data, x: x.data, xUsed: used, n: n, dx: dx.data, accumulateDx: false)
            for (name, t, g) in [("A", ad.A.value, ad.A.grad!), ("B", ad.B.value, ad.B.grad!), ("x", x, dx)] {
                var worst = 0.0
                let scale = (0..<g.count).map { abs(Double(g[$0])) }.max()!
                XCTAssertGreaterThan(scale, 0, "\(name) gradient is all zero (dropout \(dropout))")
                for i in stride(from: 0, to: t.count, by: max(1, t.count / 97)) {
                    let v = t[i], h: Float = 1e-2
                    t[i] = v + h; let lp = try loss()
                    t[i] = v - h; let lm = try loss()
                    t[i] = v
                    worst = max(worst, abs((lp - lm) / Double(2 * h) - Double(g[i])))
                }
                XCTAssertLessThan(worst, 2e-3 * scale, "d\(name) vs finite differences (dropout \(dropout))")
            }
            if dropout > 0 {  // dropout really drops: outside training it is off and the output differs
                try lin.forward(x.data, out: out.data, n: n)
                let train = out.array
                ctx.isTraining = { false }
                try lin.forward(x.data, out: out.data, n: n)
                XCTAssertNotEqual(train, out.array)
            }
        }
    }

    /// The dropout mask an adapter applies is the public rule the GPU kernel draws
    /// (`LoRAContext.keeps` with `key(adapter:)`, `dropoutThreshold`, `dropoutScale`): with A = B = I,
    /// scaling 1 and a zero base, the output is the masked input exactly. A second forward of the
    /// same step is the next micro-batch (another mask); `resetMicroBatches` draws the first again.
    func testDropoutMaskIsThePublicRule() throws {
        let n = 16, f = 16
        let lin = Linear(name: "model.layers.0.mlp.up_proj", weight: Parameter(name: "w", value: Tensor(shape: [f, f])), bias: nil)
        let ctx = LoRAContext(rank: f, alpha: Double(f), dropout: 0.05, seed: 3)
        ctx.isTraining = { true }
        XCTAssertEqual(ctx.dropoutThreshold, 838_861)  // 0.05 · 2²⁴ rounded
        XCTAssertEqual(ctx.dropoutScale, 1 / Float(0.95))
        let ad = LoRAAdapter(module: lin.name, index: 0, inFeatures: f, outFeatures: f, context: ctx)
        for i in 0..<f * f { ad.A.value[i] = i / f == i % f ? 1 : 0; ad.B.value[i] = i / f == i % f ? 1 : 0 }
        lin.adapter = ad
        let x = randomTensor([n, f], seed: 9), out = Tensor(shape: [n, f])
        try lin.forward(x.data, out: out.data, n: n)
        let key = ctx.key(adapter: 0)
        let expected = (0..<n * f).map { i in
            LoRAContext.keeps(key: key, element: i, threshold: ctx.dropoutThreshold) ? x[i] * ctx.dropoutScale : 0
        }
        XCTAssertEqual(out.array, expected)
        XCTAssertTrue(expected.contains(0) && expected.contains { $0 != 0 })
        try lin.forward(x.data, out: out.data, n: n)
        XCTAssertNotEqual(out.array, expected)
        ctx.resetMicroBatches()
        try lin.forward(x.data, out: out.data, n: n)
        XCTAssertEqual(out.array, expected)
    }

    /// PEFT's init: A ~ U(±1/√in) (kaiming-uniform, a = √5), B = 0; names `<module>.lora_A.weight`.
    func testAdapterInitAndNames() {
        let ctx = LoRAContext(rank: 8, alpha: 16, dropout: 0, seed: 42)
        let a = LoRAAdapter(module: "model.layers.1.mlp.up_proj", index: 3, inFeatures: 64, outFeatures: 96, context: ctx)
        XCTAssertEqual(a.A.name, "model.layers.1.mlp.up_proj.lora_A.weight")
        XCTAssertEqual(a.B.name, "model.layers.1.mlp.up_proj.lora_B.weight")
        XCTAssertEqual(a.A.shape, [8, 64]); XCTAssertEqual(a.B.shape, [96, 8])
        XCTAssertTrue(a.B.value.array.allSatisfy { $0 == 0 })
        let m = a.A.value.array.map(abs).max()!
        XCTAssertLessThanOrEqual(m, 1 / 8); XCTAssertGreaterThan(m, 0.9 / 8)
        let b = LoRAAdapter(
            module: "x", index: 3, inFeatures: 64, outFeatures: 96, context: LoRAContext(rank: 8, alpha: 16, dropout: 0, seed: 42))
        XCTAssertEqual(a.A.value.array, b.A.value.array, "seeded")
    }

    // MARK: - Models

    func calibrated(_ dir: String = Fixtures.path("tiny-llama")) throws -> (CausalLM, QuantizerSet, QuantConfig) {
        let model = try CausalLM(directory: dir)
        let config = try QuantConfig.preset("nvfp4_default-kv_fp8")
        let set = QuantizerSet(model: model, config: config)
        let s = stream(16 * 8 + 1, seed: 3)
        try Calibration.run(
            model: model, quantizers: set, sequences: try Calibration.sequences(from: s, seqLen: 16, count: 8), seqLen: 16, batchSize: 4)
        return (model, set, config)
    }

    func hidden(_ m: CausalLM, _ tokens: [Int32]) throws -> [Float] {
        let p = try m.forward(tokens: tokens, batch: 2, seqLen: 16, saveForBackward: false)
        return Array(UnsafeBufferPointer(start: p, count: 32 * m.config.hiddenSize))
    }

    func randomizeB(_ lora: LoRA, seed: UInt64) {
        for (i, a) in lora.adapters.enumerated() { a.B.value.copy(from: randomTensor(a.B.shape, seed: seed &+ UInt64(i), scale: 0.05)) }
    }

    /// Before quantization, base + adapter forward = the merged model's forward.
    func testMergedForwardEqualsBasePlusAdapter() throws {
        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = Recipe.LoRASpec(); spec.rank = 4; spec.alpha = 8
        let lora = try LoRA.attach(to: model, quantizers: nil, spec: spec, seed: 1)
        XCTAssertEqual(lora.adapters.count, 14)
        randomizeB(lora, seed: 100)
        let tokens = stream(32, seed: 9)
        let withAdapters = try hidden(model, tokens)
        let merged = try lora.mergedModel(config: nil, ste: .passThrough, nvfp4Mode: .export)
        XCTAssertNil(merged.quantizers)
        XCTAssertFalse(merged.model.parameters.contains { $0.name.contains("lora_") })
        let m = try hidden(merged.model, tokens)
        let scale = withAdapters.map(abs).max()!
        let err = zip(withAdapters, m).map { abs($0 - $1) }.max()!
        XCTAssertLessThan(err, 1e-5 * scale)
        // The adapters changed something.
        let plain = try hidden(try CausalLM(directory: Fixtures.path("tiny-llama")), tokens)
        XCTAssertGreaterThan(zip(plain, m).map { abs($0 - $1) }.max()!, 1e-3 * scale)
    }

    /// The QLoRA base decodes to exactly the export-mode fake-quant weight, and the QLoRA model
    /// (base in NVFP4, no fp32 copy) computes bit for bit what the fake-quant model with the
    /// same adapters computes.
    func testQLoRAForwardEqualsFakeQuantForwardBitForBit() throws {
        for fixture in ["tiny-llama", "tiny-qwen3"] { try checkQLoRABitExact(Fixtures.path(fixture)) }
    }

    func checkQLoRABitExact(_ dir: String) throws {
        let (model, set, config) = try calibrated(dir)
        var spec = Recipe.LoRASpec(); spec.rank = 4; spec.alpha = 8; spec.qlora = true
        let q = try LoRA.qlora(source: model, quantizers: set, config: config, ste: .passThrough, nvfp4Mode: .export, spec: spec, seed: 5)
        let base = q.base!
        XCTAssertEqual(base.tensors.count, 14)
        for l in model.linears where base.tensors[l.name] != nil {
            let ref = Tensor(shape: l.weight.shape, zeroed: false)
            NVFP4.fakeQuant(
                l.weight.value.data, ref.data, rows: l.outFeatures, cols: l.inFeatures,
                globalAmax: (l.weightQuantizer as! TensorQuantizer).amax!, mode: .export)
            let dec = Tensor(shape: l.weight.shape, zeroed: false)
            base.decode(l.name, into: dec.data)
            XCTAssertEqual(dec.array.map(\.bitPattern), ref.array.map(\.bitPattern), l.name)
        }
        // ~4.5 bits a weight.
        XCTAssertEqual(Double(base.bytes) / Double(base.fp32Bytes / 4), 0.5625, accuracy: 0.01)
        // Base weights are no longer parameters of the QLoRA model.
        XCTAssertFalse(q.model.parameters.contains { $0.name.hasSuffix("_proj.weight") })
        // Same adapters on the fake-quant model: identical hidden states.
        let fq = try LoRA.attach(to: model, quantizers: set, spec: spec, seed: 5)
        randomizeB(fq, seed: 7); randomizeB(q, seed: 7)
        let tokens = stream(32, seed: 21)
        let a = try hidden(model, tokens), b = try hidden(q.model, tokens)
        XCTAssertEqual(a.map(\.bitPattern), b.map(\.bitPattern))
    }

    /// LoRA-QAT and QLoRA: only adapters get gradients and optimizer state; the base is unchanged.
    func testFrozenBaseGetsNoGradientOrOptimizerState() throws {
        for qlora in [false, true] {
            let (model, set, config) = try calibrated()
            var spec = Recipe.LoRASpec(); spec.rank = 4; spec.alpha = 8; spec.dropout = 0.1; spec.qlora = qlora
            let lora =
                qlora
                ? try LoRA.qlora(source: model, quantizers: set, config: config, ste: .passThrough, nvfp4Mode: .export, spec: spec, seed: 5)
                : try LoRA.attach(to: model, quantizers: set, spec: spec, seed: 5)
            let m = lora.model
            var ts = Recipe.TrainSpec()
            ts.steps = 3; ts.batchSize = 2; ts.lr = 1e-2; ts.evalEvery = 0; ts.saveEvery = 0
            ts.trainableParams = LoRA.trainableGlobs
            let dir = Fixtures.tempDir()
            var opts = Trainer.Options(outputDir: dir.path, checkpointDir: dir.appendingPathComponent("ck").path)
            opts.quiet = true; opts.finalEvaluation = false
            let t = try QATTrainer(
                model: m, quantizers: lora.quantizers!, calibrationSequences: [], calibrationBatchSize: 1, spec: ts, seqLen: 16,
                trainStream: stream(16 * 20 + 1), validationStream: stream(16 * 2 + 1, seed: 2), validationSequences: nil, options: opts)
            lora.bind(to: t)
            let baseBefore = m.linears.map { lora.baseWeight($0).array }
            let others = m.parameters.filter { !$0.name.contains("lora_") }.map { ($0.name, $0.value.array) }
            _ = try t.run()
            XCTAssertEqual(Set(t.optimizer.slots.map(\.name)), Set(lora.adapters.flatMap { [$0.A.name, $0.B.name] }), "qlora \(qlora)")
            for l in m.linears { XCTAssertNil(l.weight.grad, l.name) }
            for p in m.parameters where !p.name.contains("lora_") { XCTAssertNil(p.grad, p.name) }
            XCTAssertEqual(m.linears.map { lora.baseWeight($0).array }, baseBefore)
            for (name, v) in others { XCTAssertEqual(m.parameterByName[name]!.value.array, v, name) }
            XCTAssertTrue(lora.adapters.contains { $0.B.value.array.contains { $0 != 0 } }, "adapters train")
        }
    }

    /// QLoRA with dropout and gradient accumulation resumes bit for bit: the checkpoint holds
    /// the adapters (not the base, which is re-derived from the source and its calibration),
    /// and the dropout masks are keyed by step, micro-batch and adapter.
    func testQLoRAResumeIsBitIdentical() throws {
        let dir = Fixtures.tempDir()
        func trainer(resume: Bool) throws -> (Trainer, LoRA) {
            let (model, set, config) = try calibrated()
            var spec = Recipe.LoRASpec(); spec.rank = 4; spec.alpha = 8; spec.dropout = 0.2; spec.qlora = true
            let lora = try LoRA.qlora(
                source: model, quantizers: set, config: config, ste: .passThrough, nvfp4Mode: .export, spec: spec, seed: 5)
            var ts = Recipe.TrainSpec()
            ts.steps = 4; ts.batchSize = 2; ts.gradAccum = 2; ts.lr = 1e-2; ts.evalEvery = 2; ts.saveEvery = 2; ts.keepCheckpoints = 5
            ts.trainableParams = LoRA.trainableGlobs
            var opts = Trainer.Options(outputDir: dir.path, checkpointDir: dir.appendingPathComponent("ck").path)
            opts.quiet = true; opts.finalEvaluation = false; opts.resume = resume
            let t = try QATTrainer(
                model: lora.model, quantizers: lora.quantizers!, calibrationSequences: [], calibrationBatchSize: 1, spec: ts, seqLen: 16,
                trainStream: stream(16 * 20 + 1), validationStream: stream(16 * 2 + 1, seed: 2), validationSequences: nil, options: opts)
            lora.bind(to: t)
            return (t, lora)
        }
        let (t1, l1) = try trainer(resume: false)
        _ = try t1.run()
        let full = l1.adapters.flatMap { $0.A.value.array + $0.B.value.array }
        let ck = TrainingCheckpoint.list(in: dir.appendingPathComponent("ck").path)
        XCTAssertEqual(ck.count, 2)
        let saved = try TrainingCheckpoint.read(ck[0])
        XCTAssertNil(saved.parameters["model.layers.0.self_attn.q_proj.weight"], "the QLoRA base is not checkpointed")
        XCTAssertNotNil(saved.parameters["model.layers.0.self_attn.q_proj.lora_A.weight"])
        try FileManager.default.removeItem(atPath: ck[1])
        let (t2, l2) = try trainer(resume: true)
        let r = try t2.run()
        XCTAssertEqual(r.resumedFrom, 2)
        let resumed = l2.adapters.flatMap { $0.A.value.array + $0.B.value.array }
        XCTAssertEqual(resumed.map(\.bitPattern), full.map(\.bitPattern))
    }

    /// Merged weights are re-calibrated: weight amax = max |W'|, shared by q/k/v and gate/up,
    /// snapped to its stored scale; activation amax values are the trained ones.
    func testMergeRecalibratesWeightAmax() throws {
        let (model, set, config) = try calibrated()
        var spec = Recipe.LoRASpec(); spec.rank = 4; spec.alpha = 8; spec.qlora = true
        let q = try LoRA.qlora(source: model, quantizers: set, config: config, ste: .passThrough, nvfp4Mode: .export, spec: spec, seed: 5)
        randomizeB(q, seed: 3)
        let merged = try q.mergedModel(config: config, ste: .passThrough, nvfp4Mode: .export)
        let ms = merged.quantizers!
        for layer in merged.model.layers {
            for group in layer.fusedGroups {
                let raw = group.map { Reduce.absMax($0.weight.value.data, count: $0.weight.count) }.max()!
                let amaxes = group.map { ms.byName[$0.name + ".weight_quantizer"]!.amax! }
                XCTAssertEqual(Set(amaxes).count, 1)
                XCTAssertEqual(amaxes[0], StoredScale.amax(forScale: raw / 2688, bound: 2688))
            }
            XCTAssertEqual(ms.byName[layer.qProj.name + ".input_quantizer"]!.amax, set.byName[layer.qProj.name + ".input_quantizer"]!.amax)
        }
    }

    /// PEFT layout: keys, shapes, dtype and adapter_config.json.
    func testPEFTAdapterExport() throws {
        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = Recipe.LoRASpec(); spec.rank = 4; spec.alpha = 8; spec.dropout = 0.05
        spec.targetModules = ["model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj"]
        let lora = try LoRA.attach(to: model, quantizers: nil, spec: spec, seed: 1)
        randomizeB(lora, seed: 2)
        let dir = Fixtures.tempDir().appendingPathComponent("adapters").path
        try lora.exportAdapters(to: dir, baseModel: "models/tiny-llama")
        let f = try SafeTensorsFile(path: dir + "/adapter_model.safetensors")
        XCTAssertEqual(
            Set(f.names),
            Set(
                (0..<2).flatMap { i in
                    ["q_proj", "v_proj"].flatMap { p in
                        ["lora_A", "lora_B"].map { "base_model.model.model.layers.\(i).self_attn.\(p).\($0).weight" }
                    }
                }))
        let c = model.config
        XCTAssertEqual(try f.floats("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight").shape, [4, c.hiddenSize])
        XCTAssertEqual(try f.floats("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight").shape, [c.numKVHeads * c.headDim, 4])
        XCTAssertEqual(
            try f.floats("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight").array,
            lora.adapters[0].B.value.array)
        let cfg = try JSONValue.parse(String(contentsOfFile: dir + "/adapter_config.json", encoding: .utf8))
        XCTAssertEqual(cfg["peft_type"]?.stringValue, "LORA")
        XCTAssertEqual(cfg["task_type"]?.stringValue, "CAUSAL_LM")
        XCTAssertEqual(cfg["r"]?.intValue, 4)
        XCTAssertEqual(cfg["lora_alpha"]?.intValue, 8)
        XCTAssertEqual(cfg["lora_dropout"]?.doubleValue, 0.05)
        XCTAssertEqual(cfg["base_model_name_or_path"]?.stringValue, "models/tiny-llama")
        XCTAssertEqual(cfg["target_modules"]?.arrayValue?.compactMap(\.stringValue), ["q_proj", "v_proj"])
        // A subset that leaf names cannot express is written as full module names.
        let m2 = try CausalLM(directory: Fixtures.path("tiny-llama"))
        spec.targetModules = ["model.layers.0.self_attn.q_proj"]
        XCTAssertEqual(try LoRA.attach(to: m2, quantizers: nil, spec: spec, seed: 1).peftTargetModules, ["model.layers.0.self_attn.q_proj"])
    }

    // MARK: - Recipe

    func testRecipeKeys() throws {
        let base = "train:\n  mode: qad\n  lora:\n"
        let r = try Recipe.parse(
            base + "    rank: 8\n    alpha: 16\n    dropout: 0.1\n    qlora: true\n    export: adapters\n    "
                + "target_modules: [\"*.q_proj\"]\n", source: "t.yaml")
        let l = try XCTUnwrap(r.train.lora)
        XCTAssertEqual(l.rank, 8); XCTAssertEqual(l.alpha, 16); XCTAssertEqual(l.dropout, 0.1); XCTAssertTrue(l.qlora)
        XCTAssertEqual(l.export, .adapters); XCTAssertEqual(l.targetModules, ["*.q_proj"])
        let d = try XCTUnwrap(
            try Recipe.parse(base + "    {}\n".replacingOccurrences(of: "    {}", with: "    rank: 16"), source: "t.yaml").train.lora)
        XCTAssertEqual(d.targetModules, Recipe.LoRASpec.defaultTargets); XCTAssertFalse(d.qlora); XCTAssertEqual(d.export, .merged)
        XCTAssertNil(try Recipe.parse("train:\n  lora: null\n", source: "t.yaml").train.lora)
        // Round trip through `recipe show`.
        XCTAssertEqual(try Recipe.parse(r.yaml, source: "shown").train.lora, l)
        for (bad, key) in [
            ("    rnk: 8\n", "train.lora.rnk"), ("    rank: 0\n", "train.lora.rank"), ("    qlora: maybe\n", "train.lora.qlora"),
            ("    export: both\n", "train.lora.export"), ("    dropout: 1.0\n", "train.lora.dropout"),
            ("    target_modules: []\n", "train.lora.target_modules"),
        ] {
            XCTAssertThrowsError(try Recipe.parse(base + bad, source: "t.yaml"), bad) { e in
                let msg = "\(e)"
                XCTAssertTrue(msg.contains(key) && msg.contains("line 4"), msg)
            }
        }
    }

    func testTargetErrors() throws {
        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = Recipe.LoRASpec(); spec.targetModules = ["*.nothing"]
        XCTAssertThrowsError(try LoRA.attach(to: model, quantizers: nil, spec: spec, seed: 1))
        spec.targetModules = ["lm_head"]
        XCTAssertThrowsError(try LoRA.attach(to: model, quantizers: nil, spec: spec, seed: 1))
    }

    // MARK: - qat apply end to end

    /// A 3-step LoRA / QLoRA QAD recipe on fortune-lm (rank 4, dropout 0.1).
    func loraRecipe(_ path: String, export: String, qlora: Bool, saveEvery: Int) throws -> String {
        try """
        model: models/fortune-lm
        data: {seq_len: 64, validation_sequences: 8}
        quantize: {preset: nvfp4_default-kv_fp8}
        calibration: {samples: 8}
        train:
          mode: qad
          steps: 3
          batch_size: 2
          lr: 1.0e-3
          eval_every: 0
          save_every: \(saveEvery)
          lora: {rank: 4, alpha: 8, dropout: 0.1, qlora: \(qlora)}
        export: {dir: \(export)}
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    /// QLoRA QAD through `qat apply` on fortune-lm (a few steps): the merged export verifies
    /// with max |Δlogit| 0 against the merged fake-quant model; `export: adapters` writes PEFT.
    func testApplyQLoRAMergedExportVerifiesAndAdapterExport() throws {
        guard Fixtures.qatBinary != nil else { throw XCTSkip("qat binary not built") }
        let tmp = Fixtures.tempDir("qat-lora")
        let recipe = try loraRecipe(tmp.appendingPathComponent("r.yaml").path, export: tmp.path + "/out", qlora: true, saveEvery: 0)
        let r = try Fixtures.runQAT(["apply", recipe, "--quiet"])
        XCTAssertEqual(r.status, 0, r.err)
        let summary = try JSONValue.parse(String(contentsOfFile: tmp.path + "/out/qat_summary.json", encoding: .utf8))
        XCTAssertEqual(summary["verify_max_abs_logit_diff"]?.doubleValue, 0, "\(summary)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: tmp.path + "/out/hf_quant_config.json"))
        let r2 = try Fixtures.runQAT([
            "apply", recipe, "--quiet", "--set", "train.lora.export=adapters", "--set", "export.dir=\(tmp.path)/ad",
        ])
        XCTAssertEqual(r2.status, 0, r2.err)
        let f = try SafeTensorsFile(path: tmp.path + "/ad/adapter_model.safetensors")
        XCTAssertEqual(f.names.count, 4 * 7 * 2)
        XCTAssertTrue(FileManager.default.fileExists(atPath: tmp.path + "/ad/adapter_config.json"))
        try? FileManager.default.removeItem(at: tmp)
    }

    /// `qat export --checkpoint` of a LoRA / QLoRA training checkpoint rebuilds the run's model,
    /// merges the adapters as `qat apply` does, and writes the same export byte for byte; a
    /// recipe without train.lora is told to pass the training recipe.
    func testCheckpointExportOfLoRARunEqualsApplyExport() throws {
        guard Fixtures.qatBinary != nil else { throw XCTSkip("qat binary not built") }
        let tmp = Fixtures.tempDir("qat-lora-ckpt")
        defer { try? FileManager.default.removeItem(at: tmp) }
        for qlora in [false, true] {
            let out = tmp.path + "/out-\(qlora)"
            let recipe = try loraRecipe(tmp.appendingPathComponent("r-\(qlora).yaml").path, export: out, qlora: qlora, saveEvery: 3)
            let r = try Fixtures.runQAT(["apply", recipe, "--quiet"])
            XCTAssertEqual(r.status, 0, r.err)
            let e = try Fixtures.runQAT([
                "export", "--recipe", recipe, "--checkpoint", out + ".work/checkpoints", "--out", tmp.path + "/ck-\(qlora)",
            ])
            XCTAssertEqual(e.status, 0, e.err)
            XCTAssertTrue(e.out.contains("adapters merged"), e.out)
            XCTAssertTrue(e.out.contains("max |Δlogit| 0 "), e.out)
            let a = FileManager.default.contents(atPath: out + "/model.safetensors")
            XCTAssertNotNil(a)
            XCTAssertEqual(a, FileManager.default.contents(atPath: tmp.path + "/ck-\(qlora)/model.safetensors"), "qlora \(qlora)")
        }
        let e = try Fixtures.runQAT([
            "export", "--recipe", "recipes/fortune-lm-ptq.yaml", "--checkpoint", tmp.path + "/out-false.work/checkpoints",
            "--out", tmp.path + "/wrong",
        ])
        XCTAssertNotEqual(e.status, 0)
        XCTAssertTrue(e.err.contains("holds LoRA adapters: pass the recipe it was trained with"), e.err)
    }
}
