import Foundation
import QATExport
import XCTest

extension FuzzSeeds {
    /// The micro model's NVFP4 export in compressed-tensors' layout (`qat convert`).
    static let compressedTensorsExportDir: String = {
        let out = root.appendingPathComponent("export-ct").path
        try! CompressedTensors.convert(source: exportDir, to: .compressedTensors, out: out)
        return out
    }()
}

extension ParserFuzzTests {
    /// A compressed-tensors export with a mutated config.json (its quantization_config) or
    /// weights file: read as an export, and converted to ModelOpt.
    func testFuzzCompressedTensorsExport() {
        let src = FuzzSeeds.compressedTensorsExportDir
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: src)) ?? []).sorted()
        for (target, text, n) in [("config.json", true, 400), ("model.safetensors", false, 500)] {
            let parser = "ct-export-" + target.replacingOccurrences(of: ".", with: "-")
            stage(parser, files.filter { $0 != target }.map { (src + "/" + $0, $0) })
            var c = FuzzCampaign(parser: parser, fileName: target, seeds: [Fuzz.read(src + "/" + target)], text: text, defaultIterations: n)
            let dir = Fuzz.workDir(parser).path
            let out = Fuzz.workDir(parser + "-out").appendingPathComponent("mo").path
            let custom: ((inout Mutator, [UInt8]) -> [UInt8]?)? = text ? nil : { m, b in Self.mutateSafetensorsHeader(&m, b) }
            c.run(mutate: custom) { _ in
                _ = try ExportedModel.load(directory: dir)
                try CompressedTensors.convert(source: dir, to: .modelopt, out: out)
            }
        }
    }
}
