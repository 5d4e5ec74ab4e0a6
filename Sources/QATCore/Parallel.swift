import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A raw pointer that may cross into the pool's workers. Workers write disjoint
/// ranges; the caller guarantees it.
public struct SendablePointer<T>: @unchecked Sendable {
    public let p: UnsafeMutablePointer<T>
    public init(_ p: UnsafeMutablePointer<T>) { self.p = p }
}

/// The one place that decides how many threads compute.
///
/// Threading model: OpenBLAS is kept single-threaded (see `BLAS`), and every parallel loop,
/// large matrix products included, is split here into fixed contiguous chunks (a function of
/// its size and `threads`) run by the persistent `WorkerPool` (whichever of its threads claims
/// a chunk computes it the same way). So there is exactly one set of workers (no
/// OpenBLAS pthreads spinning in `sched_yield` next to ours), and the split of every loop
/// depends only on its size and `threads`, never on timing: results are run-to-run
/// deterministic.
public enum Parallel {
    /// Worker count: QAT_THREADS, else `availableCores`. `BLAS.setThreads` (the CLI's
    /// `--threads`) overrides it; set it before the work starts.
    nonisolated(unsafe) public static var threads: Int = {
        if let s = getenv("QAT_THREADS"), let n = Int(String(cString: s)), n > 0 { return n }
        return availableCores
    }()

    /// The cores this process may run on: the online cores, fewer when the CPU affinity mask
    /// (taskset, a container's cpuset) or a cgroup CPU quota (a container's `--cpus`, cgroup v2
    /// `cpu.max` or v1 `cpu.cfs_quota_us`) allows fewer. A container on a big host sees all of
    /// the host's cores as online; one worker per online core would oversubscribe its share.
    public static let availableCores: Int = {
        var n = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        #if os(Linux)
        if let bits = affinityCount(), bits > 0 { n = min(n, bits) }
        if let q = cgroupQuota() { n = min(n, max(1, Int(q.rounded(.up)))) }
        #endif
        return n
    }()

    /// Cores in this process's affinity mask (`Cpus_allowed` of /proc/self/status, hex words).
    static func affinityCount() -> Int? {
        guard let f = fopen("/proc/self/status", "r") else { return nil }
        defer { fclose(f) }
        var buf = [CChar](repeating: 0, count: 4096)
        while fgets(&buf, Int32(buf.count), f) != nil {
            let line = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard line.hasPrefix("Cpus_allowed:") else { continue }
            return line.dropFirst("Cpus_allowed:".count).reduce(0) { n, ch in n + (ch.hexDigitValue ?? 0).nonzeroBitCount }
        }
        return nil
    }

    /// CPUs allowed by the cgroup quota (quota / period), nil when unlimited or unknown.
    static func cgroupQuota() -> Double? {
        func read(_ path: String) -> [Substring]? {
            guard let f = fopen(path, "r") else { return nil }
            defer { fclose(f) }
            var buf = [CChar](repeating: 0, count: 256)
            guard fgets(&buf, Int32(buf.count), f) != nil else { return nil }
            let line = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            return line.split(whereSeparator: { $0 == " " || $0 == "\n" })
        }
        if let v2 = read("/sys/fs/cgroup/cpu.max"), v2.count == 2, let q = Double(v2[0]), let p = Double(v2[1]), p > 0 {
            return q / p  // "max 100000" (no quota) does not parse as a number
        }
        if let q = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")?.first.flatMap({ Double($0) }), q > 0,
            let p = read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")?.first.flatMap({ Double($0) }), p > 0
        {
            return q / p
        }
        return nil
    }

    /// Runs `body(start, end)` over `n` items split into contiguous chunks, in parallel when
    /// the work is large enough (`n * costPerItem` ≥ ~32k operations). `body` must compute
    /// each item independently of where the chunks are cut (as every caller does: the cuts
    /// depend on the thread count). `body` may call `BLAS.gemm` with `parallel: false`
    /// (OpenBLAS is single-threaded).
    ///
    /// The chunks (`rangeChunks`: up to `chunksPerWorker` per worker, none under
    /// `minChunkCost`) are claimed by the workers as they become free. With one chunk per
    /// worker, a worker that starts late (woken from sleep, or the OS ran something else on its
    /// core first) had its whole share taken by a worker that had already done its own, so the
    /// region took up to twice as long; 16 workers make a late one likely. With four, such a
    /// worker costs at most a quarter share.
    public static func forRange(_ n: Int, costPerItem: Int = 1, _ body: (Int, Int) -> Void) {
        let workers = min(threads, n)
        if workers <= 1 || n * costPerItem < 32_768 {
            if n > 0 { body(0, n) }
            return
        }
        let chunks = rangeChunks(n, costPerItem: costPerItem, workers: workers)
        forEachDynamic(chunks, maxWorkers: workers) { _, c in body(n * c / chunks, n * (c + 1) / chunks) }
    }

    /// Chunks per worker of a `forRange` loop, when the work allows.
    public static let chunksPerWorker = 4

    /// Operations (`n * costPerItem`) below which a `forRange` chunk is not cut smaller.
    public static let minChunkCost = 16_384

    /// How many chunks `forRange` cuts `n` items into for `workers` workers: `chunksPerWorker`
    /// per worker, fewer where a chunk would fall under `minChunkCost`, never fewer than the
    /// workers nor more than the items. A function of the sizes and the worker count only.
    public static func rangeChunks(_ n: Int, costPerItem: Int, workers: Int) -> Int {
        let byCost = n.multipliedReportingOverflow(by: max(1, costPerItem))
        let affordable = byCost.overflow ? Int.max : byCost.partialValue / minChunkCost
        return max(1, min(n, chunksPerWorker * workers, max(workers, affordable)))
    }

    /// As `forRange`, also passing the chunk's worker index (0 ..< min(threads, n)), for
    /// per-worker scratch buffers. `maxWorkers` caps the split.
    public static func forWorkers(_ n: Int, costPerItem: Int = 1, maxWorkers: Int = .max, _ body: (Int, Int, Int) -> Void) {
        let workers = min(threads, n, maxWorkers)
        if workers <= 1 || n * costPerItem < 32_768 {
            if n > 0 { body(0, 0, n) }
            return
        }
        WorkerPool.shared.run(workers) { w in
            let start = n * w / workers, end = n * (w + 1) / workers
            if end > start { body(w, start, end) }
        }
    }

    /// Runs `body(worker, item)` for every item in 0..<n, items handed out one at a time to
    /// `min(threads, n, maxWorkers)` workers as they become free (load balance under other
    /// load). Which worker runs an item varies from run to run, so `body` must compute each
    /// item independently of the worker (the worker index is only for scratch buffers).
    public static func forEachDynamic(_ n: Int, maxWorkers: Int = .max, _ body: (Int, Int) -> Void) {
        let workers = min(threads, n, maxWorkers)
        if workers <= 1 {
            for i in 0..<n { body(0, i) }
            return
        }
        let counter = AtomicCounter()
        WorkerPool.shared.run(workers) { w in
            while true {
                let i = counter.next()
                if i >= n { break }
                body(w, i)
            }
        }
    }

    /// Runs `body(t)` for every task t in 0..<count, handed out one at a time to
    /// `min(threads, count)` workers (so `body` must not depend on which worker runs it).
    public static func tasks(_ count: Int, _ body: (Int) -> Void) {
        forEachDynamic(count) { _, t in body(t) }
    }
}

final class AtomicCounter: Sendable {
    private let value = Atomic<Int>(0)
    func next() -> Int { value.wrappingAdd(1, ordering: .relaxed).oldValue }
}

public struct UncheckedBox<T>: @unchecked Sendable {
    public let value: T
    public init(_ value: T) { self.value = value }
}
