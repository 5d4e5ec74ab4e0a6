import CBLAS
import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The persistent threads behind `Parallel`: `run(count, body)` calls `body(0) … body(count − 1)`,
/// each once, on the calling thread and up to count − 1 parked workers, and returns when all are
/// done.
///
/// Why not `DispatchQueue.concurrentPerform`: a training step enters a few hundred parallel
/// regions of 0.1–5 ms each, and libdispatch wakes its pool threads through a semaphore per
/// region, so at 16 threads the wake-ups cost as much as the work. Here each worker owns a
/// ticket it watches: it spins on it for `spinSeconds` after its last region (so back-to-back
/// regions start in well under a microsecond) and then sleeps on its own condition variable,
/// and only the workers a region needs are woken. Tasks are claimed from a shared counter, so a
/// worker that the OS has not run yet (a machine busier than its cores) holds nothing up: the
/// caller and the running workers take its tasks, and the caller withdraws its ticket. Which
/// thread runs a task never changes its result (each task is computed on its own).
///
/// One region at a time: a region started while another runs (from another thread, or nested
/// inside a task) runs its tasks serially on its own thread, giving the same results.
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool()

    /// Seconds a worker spins on its ticket after a region before it sleeps (QAT_SPIN_US, in µs;
    /// 0 sleeps at once).
    static let spinSeconds: Double = {
        if let s = getenv("QAT_SPIN_US"), let v = Double(String(cString: s)), v >= 0 { return v * 1e-6 }
        return 50e-6
    }()

    private final class Worker: @unchecked Sendable {
        let ticket = Atomic<UInt64>(0)
        /// 0 idle, 1 asked to join the current region, 2 in it.
        let state = Atomic<Int>(0)
        let sleeping = Atomic<Bool>(false)
        // Heap-allocated: a pthread object must not move, and `&property` of a class gives no stable address.
        let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        init() {
            pthread_mutex_init(mutex, nil)
            pthread_cond_init(cond, nil)
        }
    }

    private var workers: [Worker] = []
    private let busy = Atomic<Bool>(false)
    private let next = Atomic<Int>(0)
    nonisolated(unsafe) private var count = 0
    nonisolated(unsafe) private var job: ((Int) -> Void)?
    private let growLock = NSLock()
    private let callerSleeping = Atomic<Bool>(false)
    private let doneMutex: UnsafeMutablePointer<pthread_mutex_t> = {
        let m = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
        pthread_mutex_init(m, nil)
        return m
    }()
    private let doneCond: UnsafeMutablePointer<pthread_cond_t> = {
        let c = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
        pthread_cond_init(c, nil)
        return c
    }()

    /// Runs body(0..<count); serially on this thread when the pool is in use.
    func run(_ count: Int, _ body: (Int) -> Void) {
        if count <= 1 || !busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged {
            for t in 0..<count { body(t) }
            return
        }
        defer { busy.store(false, ordering: .releasing) }
        let helpers = count - 1
        if workers.count < helpers { grow(to: helpers) }
        withoutActuallyEscaping(body) { b in
            job = b
            self.count = count
            next.store(0, ordering: .relaxed)
            for i in 0..<helpers {
                let w = workers[i]
                w.state.store(1, ordering: .sequentiallyConsistent)  // publishes job, count, next (release)
                w.ticket.add(1, ordering: .sequentiallyConsistent)
                if w.sleeping.load(ordering: .sequentiallyConsistent) {
                    pthread_mutex_lock(w.mutex)
                    pthread_cond_signal(w.cond)
                    pthread_mutex_unlock(w.mutex)
                }
            }
            work()
            // Workers not started yet are withdrawn; the others finish their tasks and leave. A
            // worker still busy after a short spin was preempted (a machine busier than its
            // cores): sleep until it is done rather than take CPU time from it.
            for i in 0..<helpers {
                let w = workers[i]
                if w.state.compareExchange(expected: 1, desired: 0, ordering: .acquiringAndReleasing).exchanged { continue }
                var spins = 0
                while w.state.load(ordering: .acquiring) != 0 {
                    spins += 1
                    if spins < 1_000 { qat_cpu_relax(); continue }
                    pthread_mutex_lock(doneMutex)
                    callerSleeping.store(true, ordering: .sequentiallyConsistent)
                    while w.state.load(ordering: .sequentiallyConsistent) != 0 { pthread_cond_wait(doneCond, doneMutex) }
                    callerSleeping.store(false, ordering: .relaxed)
                    pthread_mutex_unlock(doneMutex)
                }
            }
            job = nil
        }
    }

    /// Claims and runs tasks until none is left.
    @inline(__always) private func work() {
        let n = count
        while true {
            let t = next.add(1, ordering: .relaxed).oldValue
            if t >= n { return }
            job!(t)
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
                    // Every 256 polls (a few µs) let any other runnable thread have this core.
                    if polls & 255 == 0 { sched_yield() }
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
            // Join unless the caller has withdrawn the ticket (it ran this worker's share itself).
            guard w.state.compareExchange(expected: 1, desired: 2, ordering: .acquiringAndReleasing).exchanged else { continue }
            work()
            w.state.store(0, ordering: .sequentiallyConsistent)
            if callerSleeping.load(ordering: .sequentiallyConsistent) {
                pthread_mutex_lock(doneMutex)
                pthread_cond_signal(doneCond)
                pthread_mutex_unlock(doneMutex)
            }
        }
    }

    @inline(__always) static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }
}
