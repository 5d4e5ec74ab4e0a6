import Foundation
import QATCore
import QATIO

/// Repeated samples of one figure: reported as the median with [min, max].
struct Spread {
    let samples: [Double]

    init(_ samples: [Double]) { self.samples = samples }

    var median: Double {
        let s = samples.sorted(), n = s.count
        if n == 0 { return .nan }
        return n % 2 == 1 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2
    }
    var min: Double { samples.min() ?? .nan }
    var max: Double { samples.max() ?? .nan }

    /// The same samples through `f` (tokens/s from seconds, MiB from bytes).
    func map(_ f: (Double) -> Double) -> Spread { Spread(samples.map(f)) }

    /// "0.294 [0.290, 0.310]" with `digits` decimals (thousands grouped when digits is 0).
    func text(_ digits: Int) -> String {
        "\(Spread.number(median, digits)) [\(Spread.number(min, digits)), \(Spread.number(max, digits))]"
    }

    var json: JSONValue {
        var o = JSONObject()
        o.set("median", .double(median)); o.set("min", .double(min)); o.set("max", .double(max))
        o.set("samples", .array(samples.map { .double($0) }))
        return .object(o)
    }

    static func number(_ v: Double, _ digits: Int) -> String {
        guard v.isFinite else { return "n/a" }
        if digits > 0 { return String(format: "%.\(digits)f", v) }
        let r = Int(v.rounded()), s = String(abs(r))
        var out = ""
        for (i, ch) in s.enumerated() { if i > 0 && (s.count - i) % 3 == 0 { out += "," }; out.append(ch) }
        return (r < 0 ? "-" : "") + out
    }
}

/// The one timing and peak-memory routine of `qat bench`: each lap of a configuration is timed
/// and, with `peaks`, gets its own memory high-water mark (`PeakMemory`, reset when the lap
/// begins). The first `warmup` laps are dropped. Laps are driven either by `run` (a body called
/// per lap) or by a caller that calls `begin` once and `end` after each lap (a trainer's
/// per-step callback). `between` runs after each measured lap, outside its time and peak: the
/// PyTorch peer's runs interleave with ours there, so both see the same machine.
final class Laps {
    let warmup: Int, repeats: Int, peaks: Bool
    /// Resident bytes before the configuration was set up: peaks count from there (otherwise
    /// from the resident set at each lap's reset).
    var reference: Int?
    var between: (() throws -> Void)?
    private(set) var seconds: [Double] = []
    private(set) var peakBytes: [Double] = []
    private var count = 0, start = Date(), lapBase: Int?
    private var failure: Error?

    init(warmup: Int, repeats: Int, peaks: Bool) {
        self.warmup = warmup; self.repeats = Swift.max(1, repeats); self.peaks = peaks
    }

    var done: Bool { count >= warmup + repeats }
    var time: Spread { Spread(seconds) }
    /// Peak MiB of each measured lap; nil where the high-water mark cannot be reset.
    var peakMiB: Spread? { peakBytes.isEmpty ? nil : Spread(peakBytes.map { $0 / 1_048_576 }) }

    func begin() {
        if peaks { lapBase = PeakMemory.reset() }
        start = Date()
    }

    func end() {
        let t = Date().timeIntervalSince(start)
        let hwm = peaks ? PeakMemory.highWaterBytes() : nil
        count += 1
        if count > warmup {
            seconds.append(t)
            if let h = hwm, let b = lapBase { peakBytes.append(Double(Swift.max(0, h - (reference ?? b)))) }
            if failure == nil, let b = between {
                do { try b() } catch { failure = error }
            }
        }
        begin()
    }

    /// Rethrows an error of `between` (a trainer callback cannot throw).
    func check() throws { if let e = failure { throw e } }

    static func run(warmup: Int = 1, repeats: Int, peaks: Bool = false, _ body: () throws -> Void) throws -> Laps {
        let laps = Laps(warmup: warmup, repeats: repeats, peaks: peaks)
        laps.begin()
        while !laps.done { try body(); laps.end() }
        try laps.check()
        return laps
    }
}
