import Foundation
import QATCore
import QATModels
import QATTrain
import TestSupport
import XCTest

final class TrainerTests: XCTestCase {
    /// A deterministic synthetic stream over tiny-llama's vocabulary.
    func stream(_ n: Int, seed: UInt64 = 11) -> [Int32] {
        var rng = SplitMix64(seed: seed)
        return (0..<n).map { _ in Int32(rng.next() % 512) }
    }

    func makeTrainer(_ dir: URL, configure: (inout Recipe.TrainSpec) -> Void = { _ in }) throws -> Trainer {
        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = Recipe.TrainSpec()
        spec.steps = 4; spec.batchSize = 2; spec.lr = 1e-3; spec.evalEvery = 0; spec.saveEvery = 0; spec.schedule = "cosine"
        spec.warmupSteps = 1
        configure(&spec)
        var opts = Trainer.Options(outputDir: dir.path, checkpointDir: dir.appendingPathComponent("checkpoints").path)
        opts.quiet = true
        return try Trainer(
            model: model, spec: spec, seqLen: 16, trainStream: stream(16 * 40 + 1), validationStream: stream(16 * 4 + 1, seed: 5),
            validationSequences: nil, options: opts)
    }

    func weights(_ t: Trainer) -> [String: [Float]] {
        Dictionary(uniqueKeysWithValues: t.model.parameters.map { ($0.name, $0.value.array) })
    }

    /// (batch 4, accumulation 1) and (batch 1, accumulation 4) see the same sequences; the
    /// step's loss is Σ over its valid tokens / their count, so loss and update agree.
    func testLossNormalisationIndependentOfMicroBatching() throws {
        let a = try makeTrainer(Fixtures.tempDir()) {
            $0.batchSize = 4; $0.gradAccum = 1; $0.steps = 1
        }
        let b = try makeTrainer(Fixtures.tempDir()) {
            $0.batchSize = 1; $0.gradAccum = 4; $0.steps = 1
        }
        _ = try a.run(); _ = try b.run()
        XCTAssertEqual(a.history[0].loss, b.history[0].loss, accuracy: 1e-6)
        XCTAssertEqual(a.history[0].gradNorm, b.history[0].gradNorm, accuracy: 1e-5 * a.history[0].gradNorm)
        let wa = weights(a), wb = weights(b)
        for (name, va) in wa {
            let vb = wb[name]!
            let err = zip(va, vb).map { abs($0 - $1) }.max()!
            XCTAssertLessThan(err, 1e-5, name)
        }
    }

    func testFrozenParametersUnchangedAndTrainableMove() throws {
        let t = try makeTrainer(Fixtures.tempDir()) {
            $0.frozenParams = ["*embed_tokens*", "*layers.0.*"]; $0.steps = 2
        }
        let before = weights(t)
        _ = try t.run()
        let after = weights(t)
        for (name, v) in before {
            let frozen = name.contains("embed_tokens") || name.contains("layers.0.")
            if frozen {
                XCTAssertEqual(after[name]!, v, "\(name) is frozen")
                XCTAssertNil(t.model.parameterByName[name]!.grad, "\(name): frozen parameters get no gradient buffer")
            } else {
                XCTAssertNotEqual(after[name]!, v, "\(name) should train")
            }
        }
        XCTAssertFalse(t.optimizer.slots.contains { $0.name.contains("embed_tokens") })
    }

    func testLossDecreasesAndMetricsAreWritten() throws {
        let dir = Fixtures.tempDir()
        let t = try makeTrainer(dir) {
            $0.steps = 8; $0.lr = 3e-3; $0.evalEvery = 4
        }
        let r = try t.run()
        XCTAssertEqual(r.steps, 8)
        XCTAssertLessThan(t.history.last!.loss, t.history.first!.loss)
        let lines = try String(contentsOfFile: dir.appendingPathComponent("metrics.jsonl").path, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(lines.count, 8)
        XCTAssertTrue(lines[3].contains("\"val_loss\""))
        XCTAssertTrue(lines[0].contains("\"grad_norm\"") && lines[0].contains("\"peak_rss_mb\"") && lines[0].contains("\"tokens_per_s\""))
        XCTAssertNotNil(r.finalValidation)
    }

    /// Stopping after 2 steps (checkpoint) and resuming in a fresh trainer gives weights
    /// bit-identical to 4 uninterrupted steps.
    func testResumeIsBitIdentical() throws {
        let straight = try makeTrainer(Fixtures.tempDir())
        _ = try straight.run()

        let dir = Fixtures.tempDir()
        // Interrupt after step 2, as Ctrl-C would: the trainer writes a checkpoint and returns.
        let first = try makeTrainer(dir)
        first.options.onStep = { if $0.step == 2 { trainingStopRequested = 1 } }
        let partial = try first.run()
        trainingStopRequested = 0
        XCTAssertTrue(partial.interrupted)
        XCTAssertEqual(partial.steps, 2)
        let resumed = try makeTrainer(dir) { $0.saveEvery = 2 }
        resumed.options.resume = true
        let r = try resumed.run()
        XCTAssertEqual(r.resumedFrom, 2)
        XCTAssertEqual(weights(resumed), weights(straight))
    }
}

final class NonFiniteTests: XCTestCase {
    func trainer(_ dir: URL, onNonFinite: String) throws -> Trainer {
        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = Recipe.TrainSpec()
        spec.steps = 3; spec.batchSize = 1; spec.evalEvery = 0; spec.saveEvery = 1; spec.onNonFinite = onNonFinite
        var opts = Trainer.Options(outputDir: dir.path, checkpointDir: dir.appendingPathComponent("ckpt").path)
        opts.quiet = true
        var rng = SplitMix64(seed: 1)
        let stream = (0..<(16 * 8 + 1)).map { _ in Int32(rng.next() % 512) }
        return try Trainer(
            model: model, spec: spec, seqLen: 16, trainStream: stream, validationStream: stream,
            validationSequences: 1, options: opts)
    }

    /// A NaN appearing mid-run stops with the step named; the last good checkpoint is intact.
    func testNaNStopsAndKeepsLastCheckpoint() throws {
        let dir = Fixtures.tempDir()
        let t = try trainer(dir, onNonFinite: "stop")
        t.options.onStep = { m in if m.step == 1 { t.model.parameterByName["model.norm.weight"]!.value[0] = .nan } }
        XCTAssertThrowsError(try t.run()) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains("step 2") && m.contains("non-finite") && m.contains("checkpoint"), m)
        }
        let ckpts = TrainingCheckpoint.list(in: dir.appendingPathComponent("ckpt").path)
        XCTAssertEqual(ckpts.map { ($0 as NSString).lastPathComponent }, ["checkpoint-000001"])
        let saved = try TrainingCheckpoint.read(ckpts[0])
        XCTAssertTrue(saved.parameters["model.norm.weight"]!.array.allSatisfy(\.isFinite))
    }

    func testSkipModeSkipsTheBatch() throws {
        let dir = Fixtures.tempDir()
        let t = try trainer(dir, onNonFinite: "skip")
        t.options.finalEvaluation = false
        let embed = t.model.parameterByName["model.embed_tokens.weight"]!
        // After step 1 the embedding turns infinite, so steps 2 and 3 see a non-finite loss:
        // each must leave every weight, both moments and the step count exactly as they were.
        var weightsAfter1: [String: [Float]] = [:], momentsAfter1: [String: [Float]] = [:], stepCountAfter1 = -1
        func moments() -> [String: [Float]] {
            var d: [String: [Float]] = [:]
            for s in t.optimizer.slots { d[s.name + ".m"] = s.m.array; d[s.name + ".v"] = s.v.array }
            return d
        }
        t.options.onStep = { m in
            guard m.step == 1 else { return }
            embed.value.buffer.update(repeating: .infinity)
            weightsAfter1 = Dictionary(uniqueKeysWithValues: t.model.parameters.map { ($0.name, $0.value.array) })
            momentsAfter1 = moments()
            stepCountAfter1 = t.optimizer.stepCount
        }
        let r = try t.run()
        XCTAssertEqual(r.steps, 3)
        XCTAssertFalse(t.history[0].skipped)
        XCTAssertTrue(t.history[1].skipped && t.history[2].skipped)
        XCTAssertEqual(stepCountAfter1, 1)
        XCTAssertEqual(t.optimizer.stepCount, 1, "a skipped batch is not an optimizer step")
        XCTAssertFalse(momentsAfter1.isEmpty)
        for p in t.model.parameters {
            XCTAssertEqual(p.value.array.map(\.bitPattern), weightsAfter1[p.name]?.map(\.bitPattern), p.name)
        }
        let now = moments()
        for (name, v) in momentsAfter1 { XCTAssertEqual(now[name]?.map(\.bitPattern), v.map(\.bitPattern), name) }
    }
}

final class MemoryEstimateTests: XCTestCase {
    /// A run that cannot fit stops before allocating, with the estimate in the message.
    func testTooLargeRunIsRefusedBeforeStarting() throws {
        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = Recipe.TrainSpec()
        spec.batchSize = 1 << 20
        let stream = [Int32](repeating: 1, count: 4097)
        var opts = Trainer.Options(outputDir: Fixtures.tempDir().path, checkpointDir: Fixtures.tempDir().path)
        opts.quiet = true
        XCTAssertThrowsError(
            try Trainer(
                model: model, spec: spec, seqLen: 256, trainStream: stream, validationStream: stream,
                validationSequences: 1, options: opts)
        ) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains("needs about") && m.contains("activations") && m.contains("batch_size"), m)
        }
    }

    /// The paper figure for the SmolLM2-135M shape (QAT, batch 8×256): weights, gradients
    /// and AdamW are 16 bytes per parameter.
    func testPaperFigureForSmolLMShape() {
        let c = ModelConfig(
            family: .llama, vocabSize: 49152, hiddenSize: 576, intermediateSize: 1536, numLayers: 30, numHeads: 9,
            numKVHeads: 3, tieWordEmbeddings: true)
        let params = CausalLM.parameterShapes(c).reduce(0) { $0 + $1.1.reduce(1, *) }
        XCTAssertEqual(params, 134_515_008)
        let e = MemoryEstimate.training(
            config: c, batch: 8, seqLen: 256, parameterCount: params, trainableCount: params,
            quantizedWeightCount: params - 49152 * 576, liveTeacher: false, lossBufferBytes: 0)
        XCTAssertEqual(e.weights + e.gradients + e.optimizer, 16 * Double(params))
        XCTAssertGreaterThan(e.activations, 1e9)
        XCTAssertLessThan(e.total, 8e9)
    }

    /// Qwen3-30B-A3B's shape: 30.5B parameters (the model card's figure); MoE activations are
    /// the routed rows (tokens × top-k) through one expert each, not tokens × every expert,
    /// so 128 experts cost only their router probabilities over 32.
    func testMoEShapeParametersAndActivations() {
        func shape(_ experts: Int) -> ModelConfig {
            ModelConfig(
                family: .qwen3Moe, vocabSize: 151_936, hiddenSize: 2048, intermediateSize: 6144, numLayers: 48, numHeads: 32,
                numKVHeads: 4, headDim: 128, qkNorm: true,
                moe: MoEConfig(naming: .qwen, numExperts: experts, topK: 8, expertIntermediateSize: 768, normTopKProb: true))
        }
        let params = CausalLM.parameterShapes(shape(128)).reduce(0) { $0 + $1.1.reduce(1, *) }
        XCTAssertEqual(Double(params), 30.5e9, accuracy: 0.05e9)
        func act(_ e: Int) -> Double {
            MemoryEstimate.training(
                config: shape(e), batch: 1, seqLen: 256, parameterCount: 1, trainableCount: 1,
                quantizedWeightCount: 0, liveTeacher: false, lossBufferBytes: 0
            ).activations
        }
        let n: Double = 256, routerExtra: Double = 4 * n * 96 * 49  // [n, E] per layer and once in backward
        XCTAssertEqual(act(128) - act(32), routerExtra, accuracy: 1)
        // Per layer: at least the 8 routed rows' expert activations per token.
        let routed: Double = 4 * 48 * n * 8 * (2 * 2048 + 3 * 768)
        XCTAssertGreaterThan(act(128), routed)
    }
}
