import Foundation

/// Learning-rate schedules with linear warmup, matching transformers' `optimization.py`:
///
/// - constant (`get_constant_schedule_with_warmup`):
///   `step < W ? step / max(1, W) : 1`
/// - linear (`get_linear_schedule_with_warmup`):
///   `step < W ? step / max(1, W) : max(0, (T - step) / max(1, T - W))`
/// - cosine (`get_cosine_schedule_with_warmup`, num_cycles 0.5, decays to 0):
///   `step < W ? step / max(1, W)
///             : max(0, 0.5 * (1 + cos(pi * num_cycles * 2 * (step - W) / max(1, T - W))))`
///
/// `step` is the number of optimizer steps already taken: `LambdaLR` evaluates the lambda at
/// 0 on construction and after every `scheduler.step()`, so optimizer step k (0-based) runs
/// with `factor(step: k)` — with warmup, the very first update has lr 0, as in HF's Trainer.
/// The group lr is `base_lr * factor` (pass it to `AdamW.step(lrFactor:)`).
///
/// Warmup length as `TrainingArguments.get_warmup_steps`: `warmup_steps` if > 0, else
/// `ceil(total_steps * warmup_ratio)`.
public struct LRSchedule: Equatable, Sendable {
    public enum Kind: String, Codable, CaseIterable, Sendable {
        case constant, linear, cosine
    }

    public let kind: Kind
    public let totalSteps: Int
    public let warmupSteps: Int
    /// Cosine periods over the decay phase (transformers' `num_cycles`; 0.5 = half a cosine to 0).
    public let numCycles: Double

    /// `warmupSteps` > 0 wins over `warmupRatio` (as in transformers).
    public init(kind: Kind, totalSteps: Int, warmupSteps: Int = 0, warmupRatio: Double = 0, numCycles: Double = 0.5) throws {
        guard totalSteps >= 0 else { throw QATError("lr schedule: total steps \(totalSteps) must be >= 0") }
        guard warmupSteps >= 0 else { throw QATError("lr schedule: warmup_steps \(warmupSteps) must be >= 0") }
        guard warmupRatio >= 0, warmupRatio <= 1 else {
            throw QATError("lr schedule: warmup_ratio \(warmupRatio) must be in [0, 1]")
        }
        self.kind = kind
        self.totalSteps = totalSteps
        self.warmupSteps = warmupSteps > 0 ? warmupSteps : Int((Double(totalSteps) * warmupRatio).rounded(.up))
        self.numCycles = numCycles
    }

    /// Parses `constant`, `linear`, `cosine` (and transformers' `constant_with_warmup`).
    public static func kind(named name: String) throws -> Kind {
        let n = name.lowercased()
        if n == "constant_with_warmup" { return .constant }
        guard let k = Kind(rawValue: n) else {
            throw QATError.unsupported("lr_scheduler_type '\(name)' is not supported (use constant, linear or cosine)")
        }
        return k
    }

    /// The lr multiplier for the update that follows `step` completed optimizer steps.
    public func factor(step: Int) -> Double {
        let w = warmupSteps
        if step < w { return Double(step) / Double(max(1, w)) }
        switch kind {
        case .constant:
            return 1
        case .linear:
            return max(0, Double(totalSteps - step) / Double(max(1, totalSteps - w)))
        case .cosine:
            let progress = Double(step - w) / Double(max(1, totalSteps - w))
            return max(0, 0.5 * (1 + cos(Double.pi * numCycles * 2.0 * progress)))
        }
    }

    /// `baseLR * factor(step:)`.
    public func lr(base baseLR: Double, step: Int) -> Double { baseLR * factor(step: step) }
}
