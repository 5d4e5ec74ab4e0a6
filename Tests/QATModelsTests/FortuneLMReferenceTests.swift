import Foundation
import QATData
import QATModels
import TestSupport
import XCTest

/// The embedded fortune-lm against PyTorch: `models/fortune-lm/TRAINING.json` records the
/// validation loss transformers measured (fp32 compute on the bf16 weights, validation
/// stream cut into ⌊(46,221 − 1)/256⌋ = 180 sequences of 256, mean CE over every predicted
/// token): 3.7709, rounded to 4 decimals. Our fp32 forward must give the same figure.
final class FortuneLMReferenceTests: XCTestCase {
    func testValidationLossMatchesPyTorch() throws {
        let dir = Fixtures.repoRoot.appendingPathComponent("models/fortune-lm").path
        let trainingJSON = try Data(contentsOf: URL(fileURLWithPath: dir + "/TRAINING.json"))
        let training = try JSONSerialization.jsonObject(with: trainingJSON) as? [String: Any]
        let reference = try XCTUnwrap(training?["validation_loss_fp32_weights"] as? Double)
        XCTAssertEqual(reference, 3.7709)
        let model = try CausalLM(directory: dir)
        let stream = try TokenData.load(path: dir + "/tokens.h5", split: "validation", tokenizer: nil)
        XCTAssertEqual(stream.count, 46_221)
        let e = try Evaluation.evaluate(model: model, stream: stream, seqLen: 256, batchSize: 8)
        XCTAssertEqual(e.sequences, 180)
        // Rounded to 4 decimals by the reference: ±5e-5, plus 1e-5 of fp32 summation order.
        XCTAssertEqual(e.loss, reference, accuracy: 6e-5, "validation loss \(e.loss)")
    }
}
