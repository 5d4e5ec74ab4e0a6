import QATCore
import QATModels
import XCTest

/// `CausalLM(config:seed:std:)` fills its tensors in parallel chunks; every value must be the
/// one the single sequential SplitMix64 stream (two draws per value, tensors in model order)
/// gives, whatever the thread count.
final class RandomInitTests: XCTestCase {
    func testParallelInitIsTheSequentialStream() throws {
        let config = ModelConfig(
            family: .llama, vocabSize: 300, hiddenSize: 64, intermediateSize: 160, numLayers: 2, numHeads: 4, numKVHeads: 2,
            headDim: 16, rmsNormEps: 1e-5, ropeTheta: 1e4, maxPositionEmbeddings: 64, tieWordEmbeddings: false)
        var rng = SplitMix64(seed: 11)
        var expected: [String: [Float]] = [:]
        for (name, shape) in CausalLM.parameterShapes(config) {
            let n = shape.reduce(1, *)
            if name.hasSuffix("norm.weight") {
                expected[name] = [Float](repeating: 1, count: n)
            } else if name.hasSuffix(".bias") {
                expected[name] = [Float](repeating: 0, count: n)
            } else {
                expected[name] = (0..<n).map { _ in rng.nextGaussian() * 0.02 }
            }
        }
        for threads in [1, 3, 8] {
            let saved = Parallel.threads
            Parallel.threads = threads
            defer { Parallel.threads = saved }
            let model = try CausalLM(config: config, seed: 11, std: 0.02)
            for p in model.parameters {
                let got = Array(UnsafeBufferPointer(start: p.value.data, count: p.value.count))
                XCTAssertEqual(got, expected[p.name], "\(p.name) at \(threads) threads")
            }
        }
    }
}
