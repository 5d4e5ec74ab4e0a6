import Foundation

/// The non-tensor half of an AdamW checkpoint: small, JSON-encodable (e.g. into a
/// safetensors `__metadata__` string or a trainer_state.json).
public struct AdamWStateMetadata: Codable, Equatable, Sendable {
    public static let currentFormat = "qat-adamw-v1"

    public struct Group: Codable, Equatable, Sendable {
        public var hyper: AdamWHyperparameters
        public var pattern: String?
        public var decays: Bool
        public var parameters: [String]
    }

    public var format: String
    /// Optimizer steps taken; bias correction of the next step depends on it.
    public var step: Int
    /// Trainable parameter names, in optimizer order.
    public var parameters: [String]
    /// Group settings at save time (informational: a resume may change lr on purpose).
    public var groups: [Group]

    public func json() throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys]
        return String(decoding: try enc.encode(self), as: UTF8.self)
    }

    public init(json: String) throws {
        do {
            self = try JSONDecoder().decode(AdamWStateMetadata.self, from: Data(json.utf8))
        } catch {
            throw QATError("optimizer state metadata is not valid: \(error)")
        }
    }

    public init(format: String = AdamWStateMetadata.currentFormat, step: Int, parameters: [String], groups: [Group]) {
        self.format = format
        self.step = step
        self.parameters = parameters
        self.groups = groups
    }
}

/// Checkpointing: the optimizer state as named fp32 tensors plus metadata, and back. Names are
/// `<parameter>.exp_avg` and `<parameter>.exp_avg_sq` (PyTorch's state keys). Restoring copies
/// the bits and the step count, so training continues bit-identically.
extension AdamW {
    public static func expAvgName(_ parameter: String) -> String { parameter + ".exp_avg" }
    public static func expAvgSqName(_ parameter: String) -> String { parameter + ".exp_avg_sq" }

    /// The moments of every trainable parameter (sharded: of the slots this rank owns; see
    /// `forEachGatheredMoment` for all of them). The tensors ARE the live state (no copy, so
    /// a checkpoint of a large model does not double optimizer memory): write them out before
    /// the next `step`.
    public func stateTensors() -> [(name: String, tensor: Tensor)] {
        var out: [(name: String, tensor: Tensor)] = []
        out.reserveCapacity(slots.count * 2)
        for (i, s) in slots.enumerated() where ownsSlot(i) {
            out.append((AdamW.expAvgName(s.name), s.m))
            out.append((AdamW.expAvgSqName(s.name), s.v))
        }
        return out
    }

    public func stateMetadata() -> AdamWStateMetadata {
        AdamWStateMetadata(
            step: stepCount, parameters: slots.map(\.name),
            groups: groups.map { .init(hyper: $0.hyper, pattern: $0.pattern, decays: $0.decays, parameters: $0.parameterNames) })
    }

    /// Loads state saved by `stateTensors` / `stateMetadata`. The trainable parameter set must
    /// be the same (checked by name, both ways); group settings come from the current config.
    /// Sharded, only this rank's slots are read (`tensors` may hold just those).
    public func loadState(tensors: [(name: String, tensor: Tensor)], metadata: AdamWStateMetadata) throws {
        var byName: [String: Tensor] = [:]
        for t in tensors { byName[t.name] = t.tensor }
        try loadState(tensors: byName, metadata: metadata)
    }

    public func loadState(tensors: [String: Tensor], metadata: AdamWStateMetadata) throws {
        guard metadata.format == AdamWStateMetadata.currentFormat else {
            throw QATError("optimizer state has format '\(metadata.format)', expected '\(AdamWStateMetadata.currentFormat)'")
        }
        guard metadata.step >= 0 else { throw QATError("optimizer state has negative step \(metadata.step)") }
        let saved = Set(metadata.parameters), current = Set(slots.map(\.name))
        if saved != current {
            let missing = current.subtracting(saved).sorted(), extra = saved.subtracting(current).sorted()
            var msg = "optimizer state does not match the trainable parameters"
            if !missing.isEmpty {
                msg +=
                    "; not in checkpoint: "
                    + "\(missing.prefix(5).joined(separator: ", "))\(missing.count > 5 ? " (+\(missing.count - 5))" : "")"
            }
            if !extra.isEmpty {
                msg += "; only in checkpoint: \(extra.prefix(5).joined(separator: ", "))\(extra.count > 5 ? " (+\(extra.count - 5))" : "")"
            }
            throw QATError(msg + " (did trainable_params/frozen_params change?)")
        }
        // Validate everything before touching any state, so a failed load leaves it intact.
        var pairs: [(dst: Tensor, src: Tensor)] = []
        for (i, s) in slots.enumerated() where ownsSlot(i) {
            for (dst, key) in [(s.m, AdamW.expAvgName(s.name)), (s.v, AdamW.expAvgSqName(s.name))] {
                guard let src = tensors[key] else { throw QATError("optimizer state: tensor '\(key)' missing") }
                guard src.count == dst.count else {
                    throw QATError("optimizer state: '\(key)' has \(src.count) elements, parameter has \(dst.count)")
                }
                pairs.append((dst, src))
            }
        }
        for (dst, src) in pairs where dst !== src { dst.copy(from: src) }
        stepCount = metadata.step
    }
}
