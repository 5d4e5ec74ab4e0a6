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

/// One bounded campaign per parser that reads user files (see `FuzzSupport.swift`), plus
/// the replay of every input that once crashed (`Tests/Fuzz/regressions/<parser>/`).
final class ParserFuzzTests: XCTestCase {
    /// Copies `files` (sibling inputs the parser needs) into the campaign's folder.
    func stage(_ parser: String, _ files: [(from: String, as: String)]) {
        let dir = Fuzz.workDir(parser)
        for f in files {
            let to = dir.appendingPathComponent(f.as).path
            try? FileManager.default.removeItem(atPath: to)
            XCTAssertNoThrow(try FileManager.default.copyItem(atPath: f.from, toPath: to))
        }
    }

    // MARK: safetensors

    /// Safetensors header mutations that keep it JSON: a number of the header replaced by an
    /// interesting integer (shape, data_offsets), the dtype string replaced, a duplicated
    /// entry; the 8-byte length is recomputed, or set to a lie.
    static func mutateSafetensorsHeader(_ m: inout Mutator, _ base: [UInt8]) -> [UInt8]? {
        guard m.rng.chance(0.5), base.count >= 8 else { return nil }
        var n = 0
        for k in 0..<8 { n |= Int(base[k]) << (8 * k) }
        guard n <= base.count - 8 else { return nil }
        var header = Array(base[8..<(8 + n)])
        let data = Array(base[(8 + n)...])
        switch m.rng.below(4) {
        case 0, 1:
            let nums = Mutator.numberRanges(header)
            if !nums.isEmpty { header.replaceSubrange(m.rng.pick(nums), with: Array(m.rng.pick(Mutator.interestingInts).utf8)) }
        case 2:
            let dt = ["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "U8", "I8", "I32", "I64", "BOOL", "F64", "I16", "U64", "", "f32"]
            if let r = header.firstRange(of: Array("\"dtype\":\"".utf8)) {
                let s = r.upperBound
                if let e = header[s...].firstIndex(of: 0x22) { header.replaceSubrange(s..<e, with: Array(m.rng.pick(dt).utf8)) }
            }
        default:
            // Duplicate the first tensor entry (duplicated key).
            if header.first == 0x7B, let comma = header.firstIndex(of: 0x7D) {
                let entry = Array(header[1...comma])
                header.insert(contentsOf: entry + [0x2C], at: 1)
            }
        }
        var len = UInt64(header.count)
        if m.rng.chance(0.2) { len = m.rng.pick(Mutator.interestingWords) }
        return (0..<8).map { UInt8(truncatingIfNeeded: len >> (8 * UInt64($0))) } + header + data
    }

    /// Opens a safetensors file and reads every tensor through the typed accessors.
    static func readAll(_ f: SafeTensorsFile) throws {
        for t in f.tensors {
            _ = try f.bytes(t.name)
            if t.dtype.isFloatingPoint { _ = try f.floats(t.name) } else { _ = try f.integers(t.name) }
        }
    }

    func testFuzzSafeTensors() {
        var c = FuzzCampaign(
            parser: "safetensors", fileName: "input.safetensors", seeds: FuzzSeeds.safetensors,
            text: false, defaultIterations: 3000)
        c.run(mutate: Self.mutateSafetensorsHeader) { try Self.readAll(try SafeTensorsFile(path: $0)) }
        replayRegressions("safetensors", fileName: "input.safetensors") { try Self.readAll(try SafeTensorsFile(path: $0)) }
    }

    // MARK: JSON (json-c) and config.json

    func testFuzzJSON() {
        let seeds = [
            Fixtures.path("tiny-llama/config.json"), Fixtures.path("tiny-qwen3/config.json"),
            Fixtures.fortuneLM + "/tokenizer_config.json", FuzzSeeds.shardedDir + "/model.safetensors.index.json",
        ].map(Fuzz.read)
        var c = FuzzCampaign(parser: "json", fileName: "input.json", seeds: seeds, text: true, defaultIterations: 2000)
        c.run { _ = try JSONValue.parse(file: $0) }
        replayRegressions("json", fileName: "input.json") { _ = try JSONValue.parse(file: $0) }
    }

    static func loadConfig(_ path: String) throws { _ = try ModelConfig(json: JSONValue.parseObject(file: path)) }

    func testFuzzModelConfig() {
        let seeds =
            [
                Fixtures.path("tiny-llama/config.json"), Fixtures.path("tiny-qwen3/config.json"),
                Fixtures.fortuneLM + "/config.json",
            ].map(Fuzz.read) + [Array(FuzzSeeds.microConfigText.utf8)]
        var c = FuzzCampaign(parser: "config", fileName: "config.json", seeds: seeds, text: true, defaultIterations: 2000)
        c.run { try Self.loadConfig($0) }
        replayRegressions("config", fileName: "config.json") { try Self.loadConfig($0) }
    }

    // MARK: model directory (config.json + checkpoint)

    /// Mutated config.json beside the micro checkpoint: sizes that disagree with the
    /// tensors must fail on the shapes, before any allocation the file does not back.
    func testFuzzModelDirectoryConfig() {
        stage("model", [(FuzzSeeds.microDir + "/model.safetensors", "model.safetensors")])
        var c = FuzzCampaign(
            parser: "model", fileName: "config.json", seeds: [Array(FuzzSeeds.microConfigText.utf8)],
            text: true, defaultIterations: 1000)
        let dir = Fuzz.workDir("model").path
        c.run { _ in _ = try CausalLM(directory: dir) }
        stage("regress-model", [(FuzzSeeds.microDir + "/model.safetensors", "model.safetensors")])
        replayRegressions("model", fileName: "config.json") { _ in _ = try CausalLM(directory: Fuzz.workDir("regress-model").path) }
    }

    /// Mutated checkpoint beside a valid config.
    func testFuzzModelDirectoryWeights() {
        stage("model-weights", [(FuzzSeeds.microDir + "/config.json", "config.json")])
        var c = FuzzCampaign(
            parser: "model-weights", fileName: "model.safetensors", seeds: [FuzzSeeds.microCheckpoint],
            text: false, defaultIterations: 1000)
        let dir = Fuzz.workDir("model-weights").path
        c.run(mutate: Self.mutateSafetensorsHeader) { _ in _ = try CausalLM(directory: dir) }
    }

    /// Mutated sharded index beside its shards (paths outside the folder, missing shards,
    /// tensors in the wrong shard).
    func testFuzzShardedIndex() {
        let shards = ((try? FileManager.default.contentsOfDirectory(atPath: FuzzSeeds.shardedDir)) ?? []).filter {
            $0.hasSuffix(".safetensors")
        }
        XCTAssertGreaterThan(shards.count, 1)
        stage("sharded", shards.map { (FuzzSeeds.shardedDir + "/" + $0, $0) })
        var c = FuzzCampaign(
            parser: "sharded", fileName: "model.safetensors.index.json",
            seeds: [Fuzz.read(FuzzSeeds.shardedDir + "/model.safetensors.index.json")], text: true, defaultIterations: 1000)
        let dir = Fuzz.workDir("sharded").path
        c.run { _ in
            let ck = try ModelWeights(path: dir)
            for n in ck.names { _ = try ck.floats(n) }
        }
    }

    // MARK: tokenizer.json

    static func useTokenizer(_ path: String) throws {
        let t = try Tokenizer(path: path)
        let ids = t.encode("Hello, the world and <|endoftext|> it's 12345 isn't   \n\n naïve 😀 <|im_start|>x")
        _ = t.decode(ids + [-1, Int32.max, 0])
        _ = t.token(Int32.max)
    }

    func testFuzzTokenizer() {
        var c = FuzzCampaign(
            parser: "tokenizer", fileName: "tokenizer.json", seeds: [FuzzSeeds.tokenizerJSON],
            text: true, defaultIterations: 1500)
        c.run { try Self.useTokenizer($0) }
        replayRegressions("tokenizer", fileName: "tokenizer.json") { try Self.useTokenizer($0) }
    }

    // MARK: recipes (YAML)

    func testFuzzRecipe() {
        let dir = Fixtures.repoRoot.appendingPathComponent("recipes").path
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".yaml") }.sorted()
        var c = FuzzCampaign(
            parser: "recipe", fileName: "recipe.yaml", seeds: names.map { Fuzz.read(dir + "/" + $0) },
            text: true, defaultIterations: 1500)
        c.run { _ = try Recipe.load(path: $0) }
        replayRegressions("recipe", fileName: "recipe.yaml") { _ = try Recipe.load(path: $0) }
    }

    // MARK: HDF5 token streams and top-k caches

    func testFuzzTokenHDF5() {
        var c = FuzzCampaign(parser: "tokens-h5", fileName: "tokens.h5", seeds: FuzzSeeds.tokenFiles, text: false, defaultIterations: 750)
        c.run { _ = try TokenData.load(path: $0, split: "train", tokenizer: nil, vocabSize: 48) }
        replayRegressions("tokens-h5", fileName: "tokens.h5") {
            _ = try TokenData.load(path: $0, split: "train", tokenizer: nil, vocabSize: 48)
        }
    }

    static func readCache(_ path: String) throws {
        let r = try TopKCacheReader(path: path)
        for i in 0..<min(r.header.sequences, 3) { _ = try r.sequence(i) }
        _ = try? r.sequence(r.header.sequences)
    }

    func testFuzzTopKCache() {
        var c = FuzzCampaign(parser: "topk-cache", fileName: "cache.h5", seeds: [FuzzSeeds.topKCache], text: false, defaultIterations: 750)
        c.run { try Self.readCache($0) }
        replayRegressions("topk-cache", fileName: "cache.h5") { try Self.readCache($0) }
    }

    // MARK: training checkpoints and exports

    func testFuzzTrainingCheckpointState() {
        let src = FuzzSeeds.trainingCheckpointDir
        stage("train-state", ["model.safetensors", "optimizer.safetensors", "state.safetensors"].map { (src + "/" + $0, $0) })
        var c = FuzzCampaign(
            parser: "train-state", fileName: "trainer_state.json", seeds: [Fuzz.read(src + "/trainer_state.json")],
            text: true, defaultIterations: 500)
        let dir = Fuzz.workDir("train-state").path
        c.run { _ in _ = try TrainingCheckpoint.read(dir) }
    }

    /// An NVFP4 export with a mutated hf_quant_config.json, config.json or weights file.
    func testFuzzExportedModel() {
        let src = FuzzSeeds.exportDir
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: src)) ?? []).sorted()
        for (target, text, n) in [("config.json", true, 300), ("hf_quant_config.json", true, 300), ("model.safetensors", false, 400)] {
            let parser = "export-" + target.replacingOccurrences(of: ".", with: "-")
            stage(parser, files.filter { $0 != target }.map { (src + "/" + $0, $0) })
            var c = FuzzCampaign(parser: parser, fileName: target, seeds: [Fuzz.read(src + "/" + target)], text: text, defaultIterations: n)
            let dir = Fuzz.workDir(parser).path
            let custom: ((inout Mutator, [UInt8]) -> [UInt8]?)? = text ? nil : { m, b in Self.mutateSafetensorsHeader(&m, b) }
            c.run(mutate: custom) { _ in _ = try ExportedModel.load(directory: dir) }
            stage("regress-" + parser, files.filter { $0 != target }.map { (src + "/" + $0, $0) })
            let rdir = Fuzz.workDir("regress-" + parser).path
            replayRegressions(parser, fileName: target) { _ in _ = try ExportedModel.load(directory: rdir) }
        }
    }
}
