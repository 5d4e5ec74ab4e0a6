import Foundation
import QATCore
import QATData
import QATExport
import QATIO
import QATModels
import QATQuant
import QATTrain
import TestSupport

/// Small valid inputs built with the project's own writers, shared by the campaigns
/// (built once per process: they cost a fraction of a second).
enum FuzzSeeds {
    /// A micro Llama: every tensor a few hundred bytes, so a mutated checkpoint loads fast.
    static let microConfigText = """
        {
          "architectures": ["LlamaForCausalLM"],
          "model_type": "llama",
          "vocab_size": 48,
          "hidden_size": 16,
          "intermediate_size": 32,
          "num_hidden_layers": 1,
          "num_attention_heads": 2,
          "num_key_value_heads": 1,
          "head_dim": 8,
          "max_position_embeddings": 64,
          "rms_norm_eps": 1e-06,
          "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
          "tie_word_embeddings": false,
          "hidden_act": "silu",
          "dtype": "bfloat16"
        }
        """

    static let root: URL = Fuzz.workDir("seeds")

    /// `seeds/micro`: config.json + model.safetensors (bf16) of the micro model.
    static let microDir: String = {
        let dir = root.appendingPathComponent("micro")
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try? microConfigText.write(to: dir.appendingPathComponent("config.json"), atomically: true, encoding: .utf8)
        let model = microModel
        var w = SafeTensorsWriter()
        for p in model.parameters { try? w.add(name: p.name, tensor: p.value, as: .bf16) }
        try? w.write(to: dir.appendingPathComponent("model.safetensors").path, metadata: [("format", "pt")])
        return dir.path
    }()

    static let microModel: CausalLM = {
        let cfg = try! ModelConfig(json: JSONValue.parse(microConfigText).objectValue!)
        return try! CausalLM(config: cfg, seed: 7)
    }()

    static var microCheckpoint: [UInt8] { Fuzz.read(microDir + "/model.safetensors") }

    /// Safetensors files covering every dtype, a 0-d scalar, an empty tensor, metadata.
    static let safetensors: [[UInt8]] = {
        var out: [[UInt8]] = []
        let dir = root.appendingPathComponent("st")
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        func write(_ name: String, _ build: (inout SafeTensorsWriter) throws -> Void, metadata: [(String, String)] = []) {
            var w = SafeTensorsWriter()
            do {
                try build(&w)
                let p = dir.appendingPathComponent(name).path
                try w.write(to: p, metadata: metadata)
                out.append(Fuzz.read(p))
            } catch { fatalError("seed \(name): \(error)") }
        }
        let v: [Float] = (0..<24).map { Float($0) * 0.37 - 3 }
        write(
            "floats.safetensors",
            { w in
                try w.add(name: "a.f32", floats: v, shape: [4, 6], as: .f32)
                try w.add(name: "b.bf16", floats: v, shape: [2, 3, 4], as: .bf16)
                try w.add(name: "c.f16", floats: v, shape: [24], as: .f16)
                try w.add(name: "d.e4m3", floats: v, shape: [6, 4], as: .f8e4m3)
                try w.add(name: "e.e5m2", floats: v, shape: [3, 8], as: .f8e5m2)
                try w.add(name: "scalar", floats: [1.5], shape: [], as: .f32)
                try w.add(name: "empty", floats: [], shape: [0, 5], as: .f32)
            }, metadata: [("format", "pt")])
        write(
            "ints.safetensors",
            { w in
                try w.add(name: "i64", integers: [0, -1, 5, Int64.max], shape: [2, 2], as: .i64)
                try w.add(name: "i32", integers: [1, 2, 3], shape: [3], as: .i32)
                try w.add(name: "i8", integers: [-3, 4], shape: [2], as: .i8)
                try w.add(name: "u8", integers: [255, 0, 1], shape: [3], as: .u8)
                try w.add(name: "bool", integers: [1, 0], shape: [2], as: .bool)
            })
        out.append(microCheckpoint)
        return out
    }()

    /// A sharded copy of the micro model: index + 3 shards.
    static let shardedDir: String = {
        let dir = root.appendingPathComponent("sharded").path
        var w = SafeTensorsWriter()
        for p in microModel.parameters { try? w.add(name: p.name, tensor: p.value, as: .f32) }
        _ = try? w.writeSharded(directory: dir, maxShardBytes: 2048, metadata: [("format", "pt")])
        return dir
    }()

    /// A reduced, valid byte-level BPE tokenizer.json: the 256 byte tokens, a few merges,
    /// added tokens, a Split + ByteLevel pre-tokenizer and NFC normalizer.
    static let tokenizerJSON: [UInt8] = {
        var vocab: [(String, Int)] = []
        for b in 0..<256 { vocab.append((String(ByteLevel.byteToScalar[b]), b)) }
        let merges: [(String, String)] = [
            ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("o", "r"), ("e", "r"),
            ("Ġa", "n"), ("Ġan", "d"), ("i", "s"), ("Ġ", "is"), ("l", "l"), ("o", "u"),
        ]
        var next = 256
        for (a, b) in merges where !vocab.contains(where: { $0.0 == a + b }) { vocab.append((a + b, next)); next += 1 }
        func q(_ s: String) -> String {
            String(decoding: try! JSONSerialization.data(withJSONObject: [s], options: [.fragmentsAllowed]), as: UTF8.self)
                .dropFirst().dropLast().description
        }
        let vocabText = vocab.map { "\(q($0.0)): \($0.1)" }.joined(separator: ", ")
        let mergesText = merges.map { "\(q($0.0 + " " + $0.1))" }.joined(separator: ", ")
        let text = """
            {
              "version": "1.0",
              "truncation": null,
              "padding": null,
              "added_tokens": [
                {"id": \(next), "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, \
            "special": true},
                {"id": \(next + 1), "content": "<|im_start|>", "single_word": false, "lstrip": true, "rstrip": false, "normalized": false, \
            "special": true}
              ],
              "normalizer": {"type": "NFC"},
              "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": \
            {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| \
            ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
              ]},
              "post_processor": null,
              "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
              "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                        "vocab": {\(vocabText)},
                        "merges": [\(mergesText)]}
            }
            """
        return Array(text.utf8)
    }()

    /// HDF5 token files: int32 and int64 streams (train + validation).
    static let tokenFiles: [[UInt8]] = {
        let dir = root.appendingPathComponent("h5")
        try? FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        var out: [[UInt8]] = []
        let a = dir.appendingPathComponent("tokens32.h5").path
        try! TokenData.writeHDF5(path: a, splits: ["train": (0..<300).map { Int32($0 % 48) }, "validation": [1, 2, 3, 4, 5]])
        out.append(Fuzz.read(a))
        let b = dir.appendingPathComponent("tokens64.h5").path
        let f = try! HDF5File(path: b, mode: .create)
        try! f.write("train/input_ids", values: (0..<100).map { Int64($0 % 48) }, gzipLevel: nil)
        try! f.setAttribute("note", "int64 stream")
        out.append(Fuzz.read(b))
        return out
    }()

    /// A top-k teacher cache of the micro model (4 sequences of 8, k = 4).
    static let topKCache: [UInt8] = {
        let p = root.appendingPathComponent("cache.h5").path
        try! TopKCache.write(teacher: microModel, stream: (0..<40).map { Int32($0 * 7 % 48) }, seqLen: 8, topK: 4, to: p, batchSize: 2)
        return Fuzz.read(p)
    }()

    /// A training checkpoint directory of the micro model.
    static let trainingCheckpointDir: String = {
        let dir = root.appendingPathComponent("train").path
        let hyper = String(decoding: try! JSONEncoder().encode(AdamWHyperparameters(lr: 1e-3)), as: UTF8.self)
        let stateJSON = """
            {"format": "\(TrainingCheckpoint.format)", "step": 3, "epoch": 0, "cursor": 24, "seed": 42, "recipe_hash": "abc",
             "optimizer": {"format": "\(AdamWStateMetadata.currentFormat)", "step": 3, "parameters": ["model.norm.weight"],
                           "groups": [{"hyper": \(hyper), "decays": false, "parameters": ["model.norm.weight"]}]}}
            """
        let state = try! JSONDecoder().decode(TrainingCheckpoint.State.self, from: Data(stateJSON.utf8))
        let norm = microModel.parameters.first { $0.name == "model.norm.weight" }!
        try! TrainingCheckpoint.write(
            directory: dir, state: state, parameters: microModel.parameters,
            optimizer: [("model.norm.weight.exp_avg", norm.value), ("model.norm.weight.exp_avg_sq", norm.value)],
            extra: [("quantizer.amax", Tensor(shape: [1], values: [2]))], keep: 1)
        return dir + "/" + TrainingCheckpoint.name(step: 3)
    }()

    /// A ModelOpt-format NVFP4 export of the micro model (calibrated on a few sequences).
    static let exportDir: String = {
        let out = root.appendingPathComponent("export").path
        let model = try! CausalLM(directory: microDir)
        let set = QuantizerSet(model: model, config: try! QuantConfig.preset("nvfp4_default-kv_fp8"))
        let seqs = try! Calibration.sequences(from: (0..<100).map { Int32($0 % 48) }, seqLen: 8, count: 4)
        try! Calibration.run(model: model, quantizers: set, sequences: seqs, seqLen: 8, batchSize: 2)
        try! Exporter.export(model: model, quantizers: set, sourceDirectory: microDir, to: out)
        return out
    }()
}
