import Foundation
import QATCore
import QATModels
import QATQuant
import QATTrain
import TestSupport
import XCTest

/// `train.activation_checkpointing` on the CPU: the forward keeps each layer's input only and
/// the backward recomputes the layer, which must give the same hidden states and gradients,
/// bit for bit, as keeping every layer's activations.
final class ActivationCheckpointingTests: XCTestCase {
    func testTinyLlamaGradientsBitIdentical() throws { try check("tiny-llama", quantized: false) }
    // q/k norms, a tied head; NVFP4 W4A4 + FP8 KV with the clipped STE (the recompute quantizes again).
    func testTinyQwen3QuantizedGradientsBitIdentical() throws { try check("tiny-qwen3", quantized: true) }

    private func check(_ name: String, quantized: Bool) throws {
        let model = try CausalLM(directory: Fixtures.path(name))
        let c = model.config, (B, T) = (2, 16), N = B * T
        var rng = SplitMix64(seed: 5)
        let batches = (0..<2).map { _ in (0..<N).map { _ in Int32(rng.next() % UInt64(c.vocabSize)) } }
        if quantized {
            let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"), ste: .clipped)
            try Calibration.run(model: model, quantizers: set, sequences: [batches[0]], seqLen: N, batchSize: 1)
        }
        for p in model.parameters { p.setRequiresGrad(true) }
        var dHidden = [Float](repeating: 0, count: N * c.hiddenSize)
        for i in 0..<dHidden.count { dHidden[i] = rng.nextGaussian() * 1e-2 }
        func run(_ on: Bool) throws -> (hidden: [Float], grads: [[Float]]) {
            model.activationCheckpointing = on
            for p in model.parameters { p.grad!.zero() }
            var hidden: [Float] = []
            for tokens in batches {  // two micro-batches accumulate, as under grad_accum
                let h = try model.forward(tokens: tokens, batch: B, seqLen: T, saveForBackward: true)
                hidden += Array(UnsafeBufferPointer(start: h, count: N * c.hiddenSize))
                try dHidden.withUnsafeBufferPointer { _ = try model.backward(dHidden: $0.baseAddress!) }
            }
            return (hidden, model.parameters.map { Array(UnsafeBufferPointer(start: $0.grad!.data, count: $0.count)) })
        }
        let off = try run(false), on = try run(true)
        XCTAssertEqual(off.hidden.map(\.bitPattern), on.hidden.map(\.bitPattern))
        XCTAssertTrue(off.grads.contains { $0.contains { $0 != 0 } })
        for (p, (a, b)) in zip(model.parameters, zip(off.grads, on.grads)) {
            XCTAssertEqual(a.map(\.bitPattern), b.map(\.bitPattern), p.name)
        }
        // And back: off again after on reproduces the first run (the buffers follow the flag).
        XCTAssertEqual(try run(false).grads.joined().map(\.bitPattern), off.grads.joined().map(\.bitPattern))
    }

    /// A mixture-of-experts model is refused with one line naming the key (its router state
    /// would be recorded twice).
    func testMoERefused() throws {
        let model = try CausalLM(directory: Fixtures.path("tiny-qwen3-moe"))
        model.activationCheckpointing = true
        XCTAssertThrowsError(try model.forward(tokens: [1, 2, 3, 4], batch: 1, seqLen: 4, saveForBackward: true)) { e in
            XCTAssertTrue("\(e)".contains("activation_checkpointing"), "\(e)")
        }
        // Inference forwards are not affected.
        XCTAssertNoThrow(try model.forward(tokens: [1, 2, 3, 4], batch: 1, seqLen: 4, saveForBackward: false))
        // The trainer refuses before any step.
        var spec = Recipe.TrainSpec()
        spec.activationCheckpointing = true; spec.batchSize = 1
        let dir = NSTemporaryDirectory() + "qat-ckpt-moe-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let options = Trainer.Options(outputDir: dir, checkpointDir: dir + "/checkpoints")
        XCTAssertThrowsError(
            try Trainer(
                model: model, spec: spec, seqLen: 4, trainStream: (0..<64).map { Int32($0 % 8) }, validationStream: [],
                validationSequences: nil, options: options)
        ) { e in XCTAssertTrue("\(e)".contains("mixture-of-experts"), "\(e)") }
    }

    /// The recipe key parses, shows and round-trips; the trainer hands it to the model.
    func testRecipeKeyAndTrainerWiring() throws {
        XCTAssertFalse(try Recipe.parse("model: m\n", source: "r.yaml").train.activationCheckpointing)
        let r = try Recipe.parse("model: m\ntrain: {activation_checkpointing: true}\n", source: "r.yaml")
        XCTAssertTrue(r.train.activationCheckpointing)
        XCTAssertTrue(r.yaml.contains("  activation_checkpointing: true\n"))
        XCTAssertEqual(try Recipe.parse(r.yaml, source: "shown.yaml").train, r.train)
        XCTAssertThrowsError(try Recipe.parse("train: {activation_checkpointing: 3}\n", source: "r.yaml"))

        let model = try CausalLM(directory: Fixtures.path("tiny-llama"))
        var spec = r.train
        spec.steps = 1; spec.batchSize = 1; spec.evalEvery = 0; spec.saveEvery = 0
        let dir = NSTemporaryDirectory() + "qat-ckpt-test-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var options = Trainer.Options(outputDir: dir, checkpointDir: dir + "/checkpoints")
        options.quiet = true; options.finalEvaluation = false
        let stream = (0..<200).map { Int32($0 % model.config.vocabSize) }
        _ = try Trainer(
            model: model, spec: spec, seqLen: 16, trainStream: stream, validationStream: [], validationSequences: nil, options: options)
        XCTAssertTrue(model.activationCheckpointing)
    }
}
