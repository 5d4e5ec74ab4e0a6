import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A one-line progress bar with rate and ETA on a terminal (stderr); on a pipe or file it
/// prints nothing per tick, so logs stay readable. Disabled entirely with `enabled: false`.
public final class ProgressBar {
    public let total: Int
    public let label: String
    public let unit: String
    private let start = Date()
    private var lastDraw = Date.distantPast
    private let live: Bool

    public static var stderrIsTerminal: Bool { isatty(2) != 0 }

    public init(total: Int, label: String, unit: String = "it", enabled: Bool = true) {
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        live = enabled && ProgressBar.stderrIsTerminal
    }

    /// `done` items finished; `units` (e.g. tokens) processed so far for the rate.
    public func update(_ done: Int, units: Int? = nil, extra: String = "") {
        guard live else { return }
        let now = Date()
        if done < total, now.timeIntervalSince(lastDraw) < 0.1 { return }
        lastDraw = now
        let elapsed = now.timeIntervalSince(start)
        let frac = Double(min(done, total)) / Double(total)
        let width = 28, filled = Int(frac * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
        let rate = elapsed > 0 ? Double(units ?? done) / elapsed : 0
        let eta = done > 0 ? elapsed * Double(total - done) / Double(done) : 0
        let line = String(format: "\r%@ %@ %d/%d %.0f %@/s ETA %@ %@", label, bar, done, total, rate, unit, ProgressBar.clock(eta), extra)
        FileHandle.standardError.write(Data((line + "\u{1B}[K").utf8))
    }

    /// Clears the line.
    public func finish() {
        guard live else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }

    public static func clock(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        return s >= 3600 ? String(format: "%d:%02d:%02d", s / 3600, s / 60 % 60, s % 60) : String(format: "%d:%02d", s / 60, s % 60)
    }
}
