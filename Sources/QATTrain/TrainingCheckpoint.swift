import Foundation
import QATCore
import QATIO
import QATModels

/// A training checkpoint: `checkpoint-<step>/` holding `model.safetensors` (every parameter,
/// fp32), `optimizer.safetensors` (AdamW moments), `state.safetensors` (quantizer amax and
/// other trainer state) and `trainer_state.json` (step, data position, seed, recipe hash,
/// optimizer metadata). Written as a whole through `AtomicDirectory`: a kill at any moment
/// leaves the previous checkpoint or the new one, never half of one.
public enum TrainingCheckpoint {
    public static let format = "qat-checkpoint-v1"

    public struct State: Codable, Sendable {
        public var format = TrainingCheckpoint.format
        public var step: Int
        public var epoch: Int
        public var cursor: Int
        public var seed: UInt64
        public var recipeHash: String
        public var optimizer: AdamWStateMetadata

        enum CodingKeys: String, CodingKey {
            case format, step, epoch, cursor, seed, optimizer
            case recipeHash = "recipe_hash"
        }
    }

    public struct Loaded {
        public var state: State
        public var parameters: [String: Tensor]
        public var optimizer: [String: Tensor]
        public var extra: [String: Tensor]
    }

    public static func name(step: Int) -> String { String(format: "checkpoint-%06d", step) }

    public static func write(
        directory: String, state: State, parameters: [Parameter], optimizer: [(name: String, tensor: Tensor)],
        extra: [(name: String, tensor: Tensor)], keep: Int
    ) throws {
        try write(
            directory: directory, state: state, parameters: parameters,
            optimizer: { body in
                for t in optimizer { try body(t.name, t.tensor.shape, UnsafeBufferPointer(start: t.tensor.data, count: t.tensor.count)) }
            }, extra: extra, keep: keep)
    }

    /// The optimizer tensors come from `optimizer`, which calls its argument once per tensor
    /// (ZeRO-1: `AdamW.forEachGatheredMoment`, receiving other ranks' moments as it goes).
    public static func write(
        directory: String, state: State, parameters: [Parameter],
        optimizer: ((_ name: String, _ shape: [Int], _ values: UnsafeBufferPointer<Float>) throws -> Void) throws -> Void,
        extra: [(name: String, tensor: Tensor)], keep: Int
    ) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = "\(directory)/\(name(step: state.step))"
        try AtomicDirectory.write(path) { tmp in
            var w = SafeTensorsWriter()
            for p in parameters { try w.add(name: p.name, tensor: p.value, as: .f32) }
            try w.write(to: "\(tmp)/model.safetensors", metadata: [("format", "pt")])
            var o = SafeTensorsWriter()
            try optimizer { name, shape, values in try o.add(name: name, floats: values, shape: shape, as: .f32) }
            try o.write(to: "\(tmp)/optimizer.safetensors")
            var e = SafeTensorsWriter()
            for t in extra { try e.add(name: t.name, tensor: t.tensor, as: .f32) }
            try e.write(to: "\(tmp)/state.safetensors")
            let enc = JSONEncoder()
            enc.outputFormatting = [.prettyPrinted, .sortedKeys]
            let json = try enc.encode(state)
            try atomicWrite(path: "\(tmp)/trainer_state.json") { try $0.write(Array(json)) }
        }
        // Keep the newest `keep` checkpoints.
        let all = list(in: directory)
        if all.count > keep {
            for old in all.prefix(all.count - keep) { try? FileManager.default.removeItem(atPath: old) }
        }
    }

    /// Complete checkpoints in `directory`, oldest first.
    public static func list(in directory: String) -> [String] {
        guard let items = try? FileManager.default.contentsOfDirectory(atPath: directory) else { return [] }
        return items.filter { $0.hasPrefix("checkpoint-") && !$0.contains(".") }
            .sorted()
            .map { "\(directory)/\($0)" }
            .filter { FileManager.default.fileExists(atPath: "\($0)/trainer_state.json") }
    }

    public static func latest(in directory: String) -> String? { list(in: directory).last }

    /// `optimizerTensors`: which optimizer tensors to load (ZeRO-1: this rank's); nil: all.
    public static func read(_ path: String, optimizerTensors keepOptimizer: ((String) -> Bool)? = nil) throws -> Loaded {
        guard let data = FileManager.default.contents(atPath: "\(path)/trainer_state.json") else {
            throw QATError("\(path): not a qat checkpoint (no trainer_state.json)")
        }
        let state: State
        do { state = try JSONDecoder().decode(State.self, from: data) } catch {
            throw QATError("\(path)/trainer_state.json is not valid: \(error)")
        }
        guard state.format == format else { throw QATError("\(path): checkpoint format \(state.format), expected \(format)") }
        func load(_ file: String, _ keep: (String) -> Bool = { _ in true }) throws -> [String: Tensor] {
            let f = try SafeTensorsFile(path: "\(path)/\(file)")
            var out: [String: Tensor] = [:]
            for n in f.names where keep(n) { out[n] = try f.floats(n) }
            return out
        }
        return Loaded(
            state: state, parameters: try load("model.safetensors"),
            optimizer: try load("optimizer.safetensors", keepOptimizer ?? { _ in true }),
            extra: try load("state.safetensors"))
    }
}
