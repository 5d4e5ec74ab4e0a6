import Foundation
import QATIO
import TestSupport
import XCTest

/// Every reference fixture says what produced it (safetensors `__metadata__`: "generator",
/// a script committed in this repository, and "source", the reference implementation), so
/// that any fixture can be regenerated and audited.
final class FixtureProvenanceTests: XCTestCase {
    func testEveryFixtureNamesItsCommittedGenerator() throws {
        let files =
            [
                "fp8_e4m3_reference.safetensors", "nvfp4_reference.safetensors",
                "tiny-llama/model.safetensors", "tiny-llama/reference.safetensors",
                "tiny-qwen3/model.safetensors", "tiny-qwen3/reference.safetensors",
            ].map(Fixtures.path)
            + [Fixtures.repoRoot.appendingPathComponent("models/fortune-lm/model.safetensors").path]
        for path in files {
            let f = try SafeTensorsFile(path: path)
            let generator = try XCTUnwrap(f.metadataValue("generator"), "\(path): no generator in its metadata")
            let script = String(generator.split(separator: " ")[0])
            XCTAssertTrue(
                FileManager.default.fileExists(atPath: Fixtures.repoRoot.appendingPathComponent(script).path),
                "\(path): generator \(script) is not in the repository")
            XCTAssertFalse((f.metadataValue("source") ?? "").isEmpty, "\(path): no source in its metadata")
            // The library versions of the reference that made it.
            XCTAssertTrue(
                f.metadata.contains { ["transformers", "modelopt", "torch", "reproduced_with"].contains($0.key) },
                "\(path): no reference version in its metadata")
        }
    }
}
