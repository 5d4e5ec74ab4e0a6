import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The process's own peak resident memory over one stretch of code, for benchmarks.
///
/// `getrusage`'s `ru_maxrss` is a high-water mark for the whole life of the process, so once one
/// configuration has raised it no later one can show its own peak. On Linux the kernel's mark
/// (`VmHWM` in /proc/self/status) is reset to the current resident set by writing "5" to
/// /proc/self/clear_refs. Before the reset, memory the C allocator holds freed is handed back to
/// the kernel (`malloc_trim`), so a configuration that reuses another's freed pages still shows
/// them in its own peak. A measurement is the high-water mark after the stretch minus the
/// resident set at the reset: what the stretch added on top of what was already live.
public enum PeakMemory {
    /// Resident set now, in bytes (`VmRSS`); nil where /proc/self/status is not readable.
    public static func residentBytes() -> Int? { statusField("VmRSS:") }

    /// High-water mark of the resident set since start or the last `reset`, in bytes (`VmHWM`).
    public static func highWaterBytes() -> Int? { statusField("VmHWM:") }

    /// Whether this process can reset its high-water mark (Linux with a writable clear_refs).
    public static let canReset: Bool = FileManager.default.isWritableFile(atPath: "/proc/self/clear_refs") && highWaterBytes() != nil

    /// Returns freed allocator memory to the kernel, then resets the high-water mark to the
    /// current resident set. Returns that resident set in bytes, or nil where a reset is not
    /// possible (then `highWaterBytes` keeps counting from the process's start).
    @discardableResult
    public static func reset() -> Int? {
        guard canReset else { return nil }
        trimAllocator()
        let fd = open("/proc/self/clear_refs", O_WRONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        guard write(fd, "5", 1) == 1 else { return nil }
        return residentBytes()
    }

    /// Peak bytes `body` adds over the resident set at its start (the high-water mark reset
    /// first), with `body`'s result; the peak is nil where the mark cannot be reset.
    public static func measure<T>(_ body: () throws -> T) rethrows -> (value: T, peakBytes: Int?) {
        let base = reset()
        let v = try body()
        guard let b = base, let hwm = highWaterBytes() else { return (v, nil) }
        return (v, max(0, hwm - b))
    }

    /// `malloc_trim(0)` of glibc, looked up at run time (Swift's Glibc module does not export it).
    public static func trimAllocator() {
        #if canImport(Glibc)
        typealias Trim = @convention(c) (Int) -> Int32
        if let sym = trimSymbol { _ = unsafeBitCast(sym, to: Trim.self)(0) }
        #endif
    }

    #if canImport(Glibc)
    private nonisolated(unsafe) static let trimSymbol: UnsafeMutableRawPointer? = dlsym(dlopen(nil, RTLD_NOW), "malloc_trim")
    #endif

    private static func statusField(_ key: String) -> Int? {
        guard let s = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = s.split(separator: "\n").first(where: { $0.hasPrefix(key) }),
            let kB = line.dropFirst(key.count).split(whereSeparator: { $0 == " " || $0 == "\t" }).compactMap({ Int($0) }).first
        else { return nil }
        return kB * 1024
    }
}
