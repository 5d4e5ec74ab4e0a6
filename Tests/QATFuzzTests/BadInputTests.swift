import Foundation
import QATCore
import QATData
import QATExport
import QATIO
import QATModels
import QATQuant
import QATTrain
import TestSupport
import XCTest

/// One test per class of hostile or broken input: each must fail with a `QATError` whose
/// message says what is wrong, and leave no half-written file behind.
final class BadInputTests: XCTestCase {
    /// The message of the `QATError` that `body` throws, asserting its kind (bad input unless
    /// said otherwise); the callers assert the message's key words.
    func message(
        kind: QATError.Kind = .userInput, _ body: () throws -> Void,
        file: StaticString = #filePath, line: UInt = #line
    ) -> String {
        assertQATError(kind: kind, file: file, line: line, body)
    }

    func write(_ bytes: [UInt8], _ name: String, in dir: URL) -> String {
        let p = dir.appendingPathComponent(name).path
        FileManager.default.createFile(atPath: p, contents: Data(bytes))
        return p
    }

    func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    /// A safetensors file with `header` as its JSON header and `dataBytes` zero bytes of data.
    func safetensors(_ header: String, dataBytes: Int, headerLength: UInt64? = nil) -> [UInt8] {
        let h = Array(header.utf8)
        return le64(headerLength ?? UInt64(h.count)) + h + [UInt8](repeating: 0, count: dataBytes)
    }

    // MARK: safetensors

    func testTruncatedSafeTensors() {
        let dir = Fixtures.tempDir("qat-bad")
        let full = FuzzSeeds.microCheckpoint
        let headerLen = Int(full[0]) | Int(full[1]) << 8 | Int(full[2]) << 16
        var m = message { _ = try SafeTensorsFile(path: self.write(Array(full.prefix(5)), "a.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("shorter than 8 bytes"), m)
        m = message { _ = try SafeTensorsFile(path: self.write(Array(full.prefix(8 + headerLen / 2)), "b.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("runs past the end of the file") && m.contains("truncated"), m)
        m = message { _ = try SafeTensorsFile(path: self.write(Array(full.prefix(full.count - 10)), "c.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("run past the end of the data region") && m.contains("truncated"), m)
        // A model directory with the truncated file: the loader says the same, naming the file.
        let model = dir.appendingPathComponent("model")
        try? FileManager.default.createDirectory(at: model, withIntermediateDirectories: true)
        try? FileManager.default.copyItem(
            atPath: FuzzSeeds.microDir + "/config.json", toPath: model.appendingPathComponent("config.json").path)
        _ = write(Array(full.prefix(full.count / 2)), "model.safetensors", in: model)
        m = message { _ = try CausalLM(directory: model.path) }
        XCTAssertTrue(m.contains("model.safetensors") && m.contains("truncated"), m)
    }

    func testLyingSafeTensorsHeader() {
        let dir = Fixtures.tempDir("qat-bad")
        let entry = #"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#
        // Header length beyond the file.
        var m = message {
            _ = try SafeTensorsFile(path: self.write(self.safetensors(entry, dataBytes: 16, headerLength: 4096), "a.safetensors", in: dir))
        }
        XCTAssertTrue(m.contains("header length 4096 bytes runs past the end of the file"), m)
        // Header length of 2^63 and 2^64 − 1: above the cap, refused before any allocation.
        for n: UInt64 in [1 << 63, .max, 100 << 20 + 1] {
            m = message {
                _ = try SafeTensorsFile(path: self.write(self.safetensors(entry, dataBytes: 16, headerLength: n), "b.safetensors", in: dir))
            }
            XCTAssertTrue(m.contains("is above the \(100 << 20)-byte limit"), m)
        }
        // Offsets beyond the data region.
        let far = #"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[1000000,1000016]}}"#
        m = message { _ = try SafeTensorsFile(path: self.write(self.safetensors(far, dataBytes: 16), "c.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("\"w\"") && m.contains("run past the end of the data region (16 bytes)"), m)
        // A shape whose element count overflows, and one that needs terabytes the file lacks.
        let huge = #"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,16]}}"#
        m = message { _ = try SafeTensorsFile(path: self.write(self.safetensors(huge, dataBytes: 16), "d.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("overflows"), m)
        let tera = #"{"w":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,16]}}"#
        m = message { _ = try SafeTensorsFile(path: self.write(self.safetensors(tera, dataBytes: 16), "e.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("needs 4398046511104 bytes but data_offsets [0, 16] span 16"), m)
        // Duplicated tensor names (json-c would silently keep the last).
        let dup = #"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        m = message { _ = try SafeTensorsFile(path: self.write(self.safetensors(dup, dataBytes: 8), "f.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("duplicate tensor name \"w\""), m)
        // Overlapping tensors.
        let overlap = #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
        m = message { _ = try SafeTensorsFile(path: self.write(self.safetensors(overlap, dataBytes: 12), "g.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("overlap"), m)
    }

    /// A failure of the system rather than of the input is an I/O error: writing a file
    /// below a path that is itself a file.
    func testUnwritablePathIsIOError() {
        let dir = Fixtures.tempDir("qat-bad-io")
        let file = write([1, 2, 3], "plain", in: dir)
        let m = message(kind: .io) { try atomicWrite(path: file + "/out.json") { try $0.write([1]) } }
        XCTAssertTrue(m.contains(file) && m.contains("Not a directory"), m)
    }

    func testWrongDTypeString() {
        let dir = Fixtures.tempDir("qat-bad")
        for dt in ["F64", "f32", "I16", ""] {
            let h = "{\"w\":{\"dtype\":\"\(dt)\",\"shape\":[2],\"data_offsets\":[0,8]}}"
            let m = message(kind: .unsupported) {
                _ = try SafeTensorsFile(path: self.write(self.safetensors(h, dataBytes: 8), "a.safetensors", in: dir))
            }
            XCTAssertTrue(m.contains("unknown or unsupported dtype \"\(dt)\"") && m.contains("supported: F32"), m)
        }
        let h = #"{"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}"#
        let m = message { _ = try SafeTensorsFile(path: self.write(self.safetensors(h, dataBytes: 8), "b.safetensors", in: dir)) }
        XCTAssertTrue(m.contains("dtype must be a string"), m)
    }

    // MARK: config.json vs checkpoint

    /// A copy of tiny-llama whose config.json is edited with `edit`.
    func tinyLlama(_ edit: (inout JSONObject) -> Void) throws -> String {
        let dir = Fixtures.tempDir("qat-bad-model")
        var cfg = try JSONValue.parseObject(file: Fixtures.path("tiny-llama/config.json"))
        edit(&cfg)
        try JSONValue.object(cfg).serialized().write(to: dir.appendingPathComponent("config.json"), atomically: true, encoding: .utf8)
        try FileManager.default.createSymbolicLink(
            atPath: dir.appendingPathComponent("model.safetensors").path,
            withDestinationPath: Fixtures.path("tiny-llama/model.safetensors"))
        return dir.path
    }

    func testShapeMismatchBetweenCheckpointAndConfig() throws {
        var m = message {
            _ = try CausalLM(
                directory: try self.tinyLlama {
                    $0["hidden_size"] = 64; $0["head_dim"] = 16
                })
        }
        XCTAssertTrue(m.contains("model.embed_tokens.weight") && m.contains("[512, 128]") && m.contains("config.json implies [512, 64]"), m)
        m = message { _ = try CausalLM(directory: try self.tinyLlama { $0["intermediate_size"] = 353 }) }
        XCTAssertTrue(m.contains("model.layers.0.mlp.gate_proj.weight") && m.contains("[352, 128]") && m.contains("[353, 128]"), m)
        // Sizes far beyond any checkpoint: refused by the config check, before any allocation.
        m = message { _ = try CausalLM(directory: try self.tinyLlama { $0["num_hidden_layers"] = .int(1_000_000_000) }) }
        XCTAssertTrue(m.contains("num_hidden_layers = 1000000000 is out of range"), m)
        m = message { _ = try CausalLM(directory: try self.tinyLlama { $0["hidden_size"] = .int(1_000_000_000) }) }
        XCTAssertTrue(m.contains("hidden_size = 1000000000 is out of range"), m)
        // In range but not what the checkpoint holds: refused from the checkpoint's layer count,
        // before the 2^24 layers' tensor list is built.
        m = message { _ = try CausalLM(directory: try self.tinyLlama { $0["num_hidden_layers"] = .int(1 << 24) }) }
        XCTAssertTrue(m.contains("num_hidden_layers = 16777216") && m.contains("holds 2 layer(s)"), m)
        m = message { _ = try CausalLM(directory: try self.tinyLlama { $0["num_hidden_layers"] = .int(3) }) }
        XCTAssertTrue(m.contains("num_hidden_layers = 3") && m.contains("holds 2 layer(s)"), m)
        m = message { _ = try CausalLM(directory: try self.tinyLlama { $0["max_position_embeddings"] = .int(1 << 40) }) }
        XCTAssertTrue(m.contains("max_position_embeddings = 1099511627776 is out of range"), m)
        m = message {
            _ = try CausalLM(
                directory: try self.tinyLlama {
                    $0["model_type"] = "mistral"; $0["sliding_window"] = -1000
                })
        }
        XCTAssertTrue(m.contains("sliding_window = -1000 must be at least 1"), m)
        m = message {
            _ = try CausalLM(
                directory: try self.tinyLlama {
                    $0["rope_parameters"] = [
                        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 4.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                    ]
                })
        }
        XCTAssertTrue(m.contains("low_freq_factor < high_freq_factor"), m)
    }

    /// An export whose config.json claims 16M layers over a 1-layer checkpoint: refused on
    /// the counts before the per-layer name and shape list is built.
    func testExportLayerCountMismatch() throws {
        let dir = Fixtures.tempDir("qat-bad-export")
        let out = dir.appendingPathComponent("export").path
        try FileManager.default.copyItem(atPath: FuzzSeeds.exportDir, toPath: out)
        var cfg = try JSONValue.parseObject(file: out + "/config.json")
        cfg["num_hidden_layers"] = .int(1 << 24)
        try JSONValue.object(cfg).serialized().write(toFile: out + "/config.json", atomically: true, encoding: .utf8)
        let m = message { _ = try ExportedModel.load(directory: out) }
        XCTAssertTrue(m.contains("num_hidden_layers = 16777216 but the checkpoint holds 1 layer(s)") && m.contains("shape mismatch"), m)
    }

    // MARK: tokenizer.json

    func tokenizerFile(_ edit: (inout [String: Any]) -> Void) throws -> String {
        var obj = try JSONSerialization.jsonObject(with: Data(FuzzSeeds.tokenizerJSON)) as! [String: Any]
        edit(&obj)
        let dir = Fixtures.tempDir("qat-bad-tok")
        let p = dir.appendingPathComponent("tokenizer.json").path
        try JSONSerialization.data(withJSONObject: obj).write(to: URL(fileURLWithPath: p))
        return p
    }

    func testUnsupportedTokenizerType() throws {
        for type in ["WordPiece", "Unigram", "WordLevel"] {
            let p = try tokenizerFile { o in
                var m = o["model"] as! [String: Any]; m["type"] = type; o["model"] = m
            }
            let m = message(kind: .unsupported) { _ = try Tokenizer(path: p) }
            XCTAssertTrue(m.contains("model.type is \(type); only BPE tokenizers are supported"), m)
        }
        let p = try tokenizerFile { o in o["pre_tokenizer"] = ["type": "Metaspace", "replacement": "▁"] }
        let m = message(kind: .unsupported) { _ = try Tokenizer(path: p) }
        XCTAssertTrue(m.contains("pre_tokenizer type Metaspace is not supported"), m)
    }

    func testTokenizerBadIdsAndMerges() throws {
        // An id near 2^31 would size the id tables at tens of gigabytes.
        var p = try tokenizerFile { o in
            var added = o["added_tokens"] as! [[String: Any]]
            added[0]["id"] = Int(Int32.max)
            o["added_tokens"] = added
        }
        var m = message { _ = try Tokenizer(path: p) }
        XCTAssertTrue(m.contains("token id 2147483647 is above the"), m)
        p = try tokenizerFile { o in
            var model = o["model"] as! [String: Any]
            model["merges"] = ["Ġ t", "q zz"]
            o["model"] = model
        }
        m = message { _ = try Tokenizer(path: p) }
        XCTAssertTrue(m.contains("model.merges[1] uses \"zz\", which is not in model.vocab"), m)
        p = try tokenizerFile { o in
            var model = o["model"] as! [String: Any]
            var vocab = model["vocab"] as! [String: Any]
            vocab["Ġt"] = -5
            model["vocab"] = vocab
            o["model"] = model
        }
        m = message { _ = try Tokenizer(path: p) }
        XCTAssertTrue(m.contains("model.vocab[\"Ġt\"] is not a non-negative integer id"), m)
    }

    // MARK: HDF5 token files and top-k caches

    func testHDF5TokensWithFloatData() throws {
        let dir = Fixtures.tempDir("qat-bad-h5")
        let p = dir.appendingPathComponent("tokens.h5").path
        let f = try HDF5File(path: p, mode: .create)
        try f.write("train/input_ids", values: [Float](repeating: 1.5, count: 10))
        try f.flush()
        let m = message { _ = try TokenData.load(path: p, split: "train", tokenizer: nil) }
        XCTAssertTrue(m.contains("'train/input_ids' holds float32; token ids must be integers"), m)
    }

    /// A dataset declaring 2^40 elements over no stored data: refused before allocating.
    func testHDF5AbsurdDims() throws {
        let dir = Fixtures.tempDir("qat-bad-h5")
        let p = dir.appendingPathComponent("tokens.h5").path
        let f = try HDF5File(path: p, mode: .create)
        try f.createDataset("train/input_ids", of: Int32.self, shape: [1 << 40], chunkRows: 1 << 16)
        try f.flush()
        let m = message { _ = try TokenData.load(path: p, split: "train", tokenizer: nil) }
        XCTAssertTrue(m.contains("input_ids") && (m.contains("too large to read") || m.contains("stores only")), m)
    }

    func testTopKCacheWithWrongSeqLenAttribute() throws {
        let dir = Fixtures.tempDir("qat-bad-cache")
        let p = dir.appendingPathComponent("cache.h5").path
        try Data(FuzzSeeds.topKCache).write(to: URL(fileURLWithPath: p))
        let f = try HDF5File(path: p, mode: .readWrite)
        try f.setAttribute("seq_len", "16")
        try f.flush()
        var m = message { _ = try TopKCacheReader(path: p) }
        XCTAssertTrue(m.contains("dataset 'input_ids' has shape [4, 8], but the attributes imply [4, 16]"), m)
        try f.setAttribute("seq_len", "-3")
        try f.flush()
        m = message { _ = try TopKCacheReader(path: p) }
        XCTAssertTrue(m.contains("attribute seq_len = \"-3\" is not a positive integer"), m)
    }

    /// A cache write that fails (stream too short) leaves neither the cache nor its
    /// `.partial` file.
    func testFailedCacheWriteLeavesNoFile() {
        let dir = Fixtures.tempDir("qat-bad-cache")
        let p = dir.appendingPathComponent("cache.h5").path
        let m = message { try TopKCache.write(teacher: FuzzSeeds.microModel, stream: [1, 2, 3], seqLen: 8, topK: 4, to: p) }
        XCTAssertTrue(m.contains("not one sequence of 8"), m)
        XCTAssertEqual((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? ["?"], [])
    }

    // MARK: recipes (YAML)

    func testYAMLBombsAreRefused() {
        // Billion laughs: 9 levels of 9 aliases, ~4·10^8 nodes once expanded.
        var text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n"
        for i in 1...9 { text += "a\(i): &a\(i) [" + Array(repeating: "*a\(i - 1)", count: 9).joined(separator: ", ") + "]\n" }
        text += "train:\n  lr_config: *a9\n"
        var m = message { _ = try Recipe.parse(text, source: "bomb.yaml") }
        XCTAssertTrue(m.contains("bomb.yaml") && m.contains("expands to more than"), m)
        m = message {
            _ = try Recipe.parse("model: " + String(repeating: "[", count: 500) + String(repeating: "]", count: 500), source: "deep.yaml")
        }
        XCTAssertTrue(m.contains("deep.yaml, line 1: YAML nesting deeper than 64 levels"), m)
        // Deeper than libyaml's own limit (1000): its error, still no crash.
        m = message { _ = try Recipe.parse("model: " + String(repeating: "[", count: 50_000), source: "deeper.yaml") }
        XCTAssertTrue(m.contains("deeper.yaml: not valid YAML"), m)
        m = message { _ = try QuantConfig(yaml: String(repeating: "- ", count: 10_000) + "x") }
        XCTAssertTrue(m.contains("nesting deeper"), m)
    }

    /// Yams reads `1:30` as base 60 with unchecked arithmetic: an overflowing one must be
    /// a type error, not a trap.
    func testBase60IntegersDoNotTrap() throws {
        var m = message { _ = try Recipe.parse("data:\n  seq_len: 9223372036854775807:0\n", source: "r.yaml") }
        XCTAssertTrue(m.contains("data.seq_len: expected an integer"), m)
        m = message { _ = try Recipe.parse("data:\n  seq_len: 1:0:0:0:0:0:0:0:0:0:0:0\n", source: "r.yaml") }
        XCTAssertTrue(m.contains("data.seq_len: expected an integer"), m)
        XCTAssertEqual(try Recipe.parse("data:\n  seq_len: 1:30\n", source: "r.yaml").data.seqLen, 90)
        m = message {
            _ = try Recipe.parse("data:\n  seq_len: 1:30\n", source: "r.yaml", overrides: ["data.seq_len=99999999999:0:0:0:0:0"])
        }
        XCTAssertTrue(m.contains("expected an integer"), m)
    }

    // MARK: qat apply end to end

    /// `train.distill.teacher` pointing nowhere: a clear error, exit status ≠ 0, and no
    /// export directory (or its temporary) left behind.
    func testApplyWithMissingTeacher() throws {
        guard Fixtures.qatBinary != nil else { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-missing-teacher")
        let export = dir.appendingPathComponent("export")
        let recipe = """
            model: models/fortune-lm
            data:
              train: models/fortune-lm/tokens.h5
              validation: models/fortune-lm/tokens.h5
              seq_len: 16
              validation_sequences: 1
            quantize:
              preset: nvfp4_default-kv_fp8
            calibration:
              samples: 1
              batch_size: 1
            train:
              mode: qad
              steps: 2
              batch_size: 1
              distill:
                teacher: \(dir.appendingPathComponent("no-such-teacher").path)
            export:
              dir: \(export.path)
            """
        let path = dir.appendingPathComponent("recipe.yaml").path
        try recipe.write(toFile: path, atomically: true, encoding: .utf8)
        let r = try Fixtures.runQAT(["apply", path, "--quiet"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.err.contains("teacher not found") && r.err.contains("no-such-teacher"), r.err)
        let left = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        XCTAssertFalse(left.contains { $0.hasPrefix("export") && $0 != "export.work" }, "left behind: \(left)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: export.path))
    }
}
