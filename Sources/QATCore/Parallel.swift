import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// A raw pointer that may cross into `concurrentPerform` workers. Workers write disjoint
/// ranges; the caller guarantees it.
public struct SendablePointer<T>: @unchecked Sendable {
    public let p: UnsafeMutablePointer<T>
    public init(_ p: UnsafeMutablePointer<T>) { self.p = p }
}

public enum Parallel {
    /// Worker count: QAT_THREADS, else the number of online cores.
    public static let threads: Int = {
        if let s = getenv("QAT_THREADS"), let n = Int(String(cString: s)), n > 0 { return n }
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }()

    /// Runs `body(start, end)` over `n` items split into contiguous chunks, one per worker,
    /// in parallel when the work is large enough (`n * costPerItem` ≥ ~32k operations).
    /// Never call sgemm inside `body`: OpenBLAS has its own threads.
    public static func forRange(_ n: Int, costPerItem: Int = 1, _ body: (Int, Int) -> Void) {
        let workers = min(threads, n)
        if workers <= 1 || n * costPerItem < 32_768 {
            if n > 0 { body(0, n) }
            return
        }
        withoutActuallyEscaping(body) { b in
            let box = UncheckedBox(b)
            DispatchQueue.concurrentPerform(iterations: workers) { w in
                let start = n * w / workers, end = n * (w + 1) / workers
                if end > start { box.value(start, end) }
            }
        }
    }
}

public struct UncheckedBox<T>: @unchecked Sendable {
    public let value: T
    public init(_ value: T) { self.value = value }
}
