import CBLAS
import Foundation
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The persistent threads behind `Parallel`: `run(count, body)` calls `body(0)` on the calling
/// thread and `body(1) … body(count − 1)` on parked workers, and returns when all are done.
///
/// Why not `DispatchQueue.concurrentPerform`: a training step enters a few hundred parallel
/// regions of 0.1–5 ms each, and libdispatch wakes its pool threads through a semaphore per
/// region and hands iterations to whichever thread asks first, so at 16 threads the wake-ups
/// and the stragglers cost as much as the work. Here each worker owns a ticket it watches: it
/// spins on it for `spinSeconds` after its last job (so back-to-back regions start in well
/// under a microsecond) and then sleeps on its own condition variable, and only the workers a
/// region needs are woken. Worker w always runs chunk w, so which thread computes what is
/// fixed; results never depended on it anyway (each chunk is computed independently).
///
/// One region at a time: a region started while another runs (from another thread, or nested
/// inside a chunk) runs its chunks serially on its own thread, giving the same results.
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool()

    /// Seconds a worker spins on its ticket after a job before it sleeps (QAT_SPIN_US, in µs;
    /// 0 sleeps at once).
    static let spinSeconds: Double = {
        if let s = getenv("QAT_SPIN_US"), let v = Double(String(cString: s)), v >= 0 { return v * 1e-6 }
        return 100e-6
    }()

    private final class Worker: @unchecked Sendable {
        let ticket = Atomic<UInt64>(0)
        let sleeping = Atomic<Bool>(false)
        // Heap-allocated: a pthread object must not move, and `&property` of a class gives no stable address.
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        init() {
            pthread_mutex_init(mutex, nil)
            pthread_cond_init(cond, nil)
        }
    }

    private var workers: [Worker] = []          // workers[i] runs chunk i + 1
    private let busy = Atomic<Bool>(false)
    private let pending = Atomic<Int>(0)
    nonisolated(unsafe) private var job: ((Int) -> Void)?
    private let growLock = NSLock()

    /// Runs body(0..<count), body(0) on this thread; serially when the pool is in use.
    func run(_ count: Int, _ body: (Int) -> Void) {
        if count <= 1 || !busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            for w in 0..<count { body(w) }
            return
        }
        defer { busy.store(false, ordering: .releasing) }
        if workers.count < count - 1 { grow(to: count - 1) }
        withoutActuallyEscaping(body) { b in
            job = b
            pending.store(count - 1, ordering: .relaxed)
            for i in 0..<(count - 1) {
                let w = workers[i]
                w.ticket.add(1, ordering: .sequentiallyConsistent)   // publishes `job` (release)
                if w.sleeping.load(ordering: .sequentiallyConsistent) {
                    pthread_mutex_lock(w.mutex)
                    pthread_cond_signal(w.cond)
                    pthread_mutex_unlock(w.mutex)
                }
            }
            b(0)
            var spins = 0
            while pending.load(ordering: .acquiring) > 0 {
                spins += 1
                if spins < 20_000 { qat_cpu_relax() } else { sched_yield() }
            }
            job = nil
        }
    }

    private func grow(to n: Int) {
        growLock.lock()
        defer { growLock.unlock() }
        while workers.count < n {
            let w = Worker(), index = workers.count + 1
            workers.append(w)
            let t = Thread { [unowned self] in self.loop(w, index) }
            t.stackSize = 8 << 20
            t.name = "qat-worker-\(index)"
            t.start()
        }
    }

    private func loop(_ w: Worker, _ index: Int) {
        var seen: UInt64 = 0
        let spin = WorkerPool.spinSeconds
        while true {
            if w.ticket.load(ordering: .acquiring) == seen {
                let deadline = WorkerPool.now() + spin
                var polls = 0
                while w.ticket.load(ordering: .acquiring) == seen {
                    qat_cpu_relax()
                    polls += 1
                    if polls & 63 == 0, WorkerPool.now() > deadline {
                        pthread_mutex_lock(w.mutex)
                        w.sleeping.store(true, ordering: .sequentiallyConsistent)
                        while w.ticket.load(ordering: .sequentiallyConsistent) == seen { pthread_cond_wait(w.cond, w.mutex) }
                        w.sleeping.store(false, ordering: .relaxed)
                        pthread_mutex_unlock(w.mutex)
                    }
                }
            }
            seen = w.ticket.load(ordering: .acquiring)
            job!(index)
            pending.subtract(1, ordering: .releasing)
        }
    }

    @inline(__always) static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }
}
