import Foundation
import QATCore

#if canImport(Glibc)
import Glibc
#endif

/// Opt-in phase timers for performance work: wall time and process CPU time (all threads,
/// OpenBLAS's included, so spinning shows up as CPU ≫ wall × cores in use) per named phase.
/// Disabled (one branch per phase) unless `enabled` is set; not thread-safe — phases are
/// entered from the driving thread only.
public enum StepProfiler {
    nonisolated(unsafe) public static var enabled = false
    nonisolated(unsafe) private static var wall: [String: Double] = [:]
    nonisolated(unsafe) private static var cpu: [String: Double] = [:]
    nonisolated(unsafe) private static var calls: [String: Int] = [:]
    nonisolated(unsafe) private static var order: [String] = []

    @inline(__always) static func now(_ clock: clockid_t) -> Double {
        var ts = timespec()
        clock_gettime(clock, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    /// Wall-clock seconds (monotonic).
    public static func wallNow() -> Double { now(CLOCK_MONOTONIC) }
    /// CPU seconds of the whole process (every thread).
    public static func cpuNow() -> Double { now(CLOCK_PROCESS_CPUTIME_ID) }

    /// Runs `body`, charging its time to `name` when enabled.
    @inline(__always)
    public static func measure<T>(_ name: String, _ body: () throws -> T) rethrows -> T {
        guard enabled else { return try body() }
        let w0 = wallNow(), c0 = cpuNow()
        let r = try body()
        add(name, wall: wallNow() - w0, cpu: cpuNow() - c0)
        return r
    }

    public static func add(_ name: String, wall w: Double, cpu c: Double) {
        if wall[name] == nil { order.append(name) }
        wall[name, default: 0] += w
        cpu[name, default: 0] += c
        calls[name, default: 0] += 1
    }

    public static func reset() { wall = [:]; cpu = [:]; calls = [:]; order = [] }

    /// Wall seconds charged to phases whose name starts with `prefix` since the last reset.
    public static func wallSeconds(prefix: String) -> Double {
        wall.filter { $0.key.hasPrefix(prefix) }.reduce(0) { $0 + $1.value }
    }

    /// One line per phase: total wall ms, share of the total, CPU ms and calls.
    public static func report(steps: Int = 1) -> String {
        let total = order.reduce(0) { $0 + wall[$1]! }
        var lines = [
            String(
                format: "%-22@ %10@ %6@ %10@ %7@", "phase" as NSString, "wall ms/st" as NSString, "%" as NSString,
                "cpu ms/st" as NSString, "calls" as NSString)
        ]
        for n in order {
            let w = wall[n]! / Double(steps), c = cpu[n]! / Double(steps)
            lines.append(
                String(
                    format: "%-22@ %10.2f %6.1f %10.2f %7d", n as NSString, w * 1e3, 100 * wall[n]! / max(total, 1e-12),
                    c * 1e3, calls[n]! / max(steps, 1)))
        }
        lines.append(String(format: "%-22@ %10.2f", "total" as NSString, total / Double(steps) * 1e3))
        return lines.joined(separator: "\n")
    }
}
