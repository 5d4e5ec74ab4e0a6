import Foundation
import QATCore
import QATModels
import QATQuant
import TestSupport
import XCTest

/// k/v reuse q's quantized input, and up reuses gate's, when their input quantizers quantize
/// alike (calibration gives each fused group one amax): the same hidden states and gradients,
/// bit for bit, as quantizing the input once per Linear, and those quantizers run no forward.
final class SharedInputQuantizationTests: XCTestCase {
    /// Wraps a quantizer; `shares` decides whether it may be matched with another.
    final class Counting: FakeQuantHook {
        let inner: TensorQuantizer, shares: Bool
        var forwards = 0
        init(_ inner: TensorQuantizer, shares: Bool) { (self.inner, self.shares) = (inner, shares) }
        var name: String { inner.name }
        var isQuantizing: Bool { inner.isQuantizing }
        var isCalibrating: Bool { inner.isCalibrating }
        var isPassThrough: Bool { inner.isPassThrough }
        func forward(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int, cols: Int) throws {
            forwards += 1
            try inner.forward(x, out, rows: rows, cols: cols)
        }
        func backward(x: UnsafePointer<Float>, gradOut: UnsafePointer<Float>, gradIn: UnsafeMutablePointer<Float>, count: Int) {
            inner.backward(x: x, gradOut: gradOut, gradIn: gradIn, count: count)
        }
        func quantizesLike(_ other: FakeQuantHook) -> Bool { shares && inner.quantizesLike(other) }
    }

    func testSharedQuantizedInputIsBitIdentical() throws {
        let model = try CausalLM(directory: Fixtures.path("tiny-qwen3"))
        let c = model.config, (B, T) = (2, 16), N = B * T
        var rng = SplitMix64(seed: 11)
        let tokens = (0..<N).map { _ in Int32(rng.next() % UInt64(c.vocabSize)) }
        let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"), ste: .clipped)
        try Calibration.run(model: model, quantizers: set, sequences: [tokens], seqLen: N, batchSize: 1)
        for p in model.parameters { p.setRequiresGrad(true) }
        var dHidden = [Float](repeating: 0, count: N * c.hiddenSize)
        for i in 0..<dHidden.count { dHidden[i] = rng.nextGaussian() * 1e-2 }
        let followers = model.layers.flatMap { [$0.kProj, $0.vProj, $0.upProj!] }
        let originals = followers.map { $0.inputQuantizer as! TensorQuantizer }
        func run(shares: Bool) throws -> (hidden: [Float], grads: [[Float]], forwards: Int) {
            let hooks = originals.map { Counting($0, shares: shares) }
            for (l, h) in zip(followers, hooks) { l.inputQuantizer = h }
            for p in model.parameters { p.grad!.zero() }
            let h = try model.forward(tokens: tokens, batch: B, seqLen: T, saveForBackward: true)
            let hidden = Array(UnsafeBufferPointer(start: h, count: N * c.hiddenSize))
            try dHidden.withUnsafeBufferPointer { _ = try model.backward(dHidden: $0.baseAddress!) }
            let grads = model.parameters.map { Array(UnsafeBufferPointer(start: $0.grad!.data, count: $0.count)) }
            return (hidden, grads, hooks.reduce(0) { $0 + $1.forwards })
        }
        let shared = try run(shares: true), separate = try run(shares: false)
        XCTAssertEqual(shared.forwards, 0, "k, v and up quantized their input again")
        XCTAssertEqual(separate.forwards, followers.count)
        XCTAssertEqual(shared.hidden.map(\.bitPattern), separate.hidden.map(\.bitPattern))
        XCTAssertTrue(shared.grads.contains { $0.contains { $0 != 0 } })
        for (p, (a, b)) in zip(model.parameters, zip(shared.grads, separate.grads)) {
            XCTAssertEqual(a.map(\.bitPattern), b.map(\.bitPattern), p.name)
        }
        // A different amax (one ulp) is not shared.
        originals[0].amax = originals[0].amax!.nextUp
        XCTAssertFalse(originals[0].quantizesLike(model.layers[0].qProj.inputQuantizer!))
    }
}
