import CCUDA
import Foundation
import QATCore

/// `qat bench --profile`: every launch between two events on the stream, nothing synchronised, so the
/// launches overlap the host as in an unprofiled step and each one's time is the device's own (kernels run
/// one at a time on the one stream). `finish` waits for the work and adds the pairs up per name; the span,
/// the first event to the last, less the launches' sum is the time the device sat idle waiting for the host.
/// Without the driver's event calls it synchronises around every launch instead (host time, idle included).
final class DeviceProfiler {
    private struct Pending { let name: String; let flops: Double; let start: CUevent?; let end: CUevent? }
    private let api: QATCudaAPI
    private var pool: [CUevent?] = []
    private var used = 0
    private var pending: [Pending] = []
    private var totals: [String: (count: Int, seconds: Double, flops: Double)] = [:]
    /// Seconds from the first launch's start to the last one's end (events only).
    private var span = 0.0
    /// Waits of more than 20 µs between consecutive launches, by the pair of launches around them.
    private var gaps: [String: (count: Int, seconds: Double)] = [:]
    var usesEvents: Bool { api.cuEventRecord != nil && api.cuEventElapsedTime != nil && api.cuEventCreate != nil }

    init(api: QATCudaAPI) { self.api = api }

    deinit {
        if let destroy = api.cuEventDestroy { for e in pool { _ = destroy(e) } }
    }

    private func event() throws -> CUevent? {
        if used == pool.count {
            var e: CUevent? = nil
            let r = api.cuEventCreate!(&e, 0)
            if r != 0 { throw QATError("CUDA: cuEventCreate failed (\(r))") }
            pool.append(e)
        }
        used += 1
        return pool[used - 1]
    }

    /// Runs `body` (one launch) between two events, or synchronised around it (no events: `sync`).
    func time(_ name: String, flops: Double, sync: () throws -> Void, _ body: () throws -> Void) throws {
        guard usesEvents else {
            try sync()
            let t = DispatchTime.now().uptimeNanoseconds
            try body()
            try sync()
            add(name, seconds: Double(DispatchTime.now().uptimeNanoseconds - t) * 1e-9, flops: flops)
            return
        }
        let start = try event(), end = try event()
        _ = api.cuEventRecord!(start, nil)
        try body()
        _ = api.cuEventRecord!(end, nil)
        pending.append(Pending(name: name, flops: flops, start: start, end: end))
    }

    private func add(_ name: String, seconds: Double, flops: Double) {
        let e = totals[name, default: (0, 0, 0)]
        totals[name] = (e.count + 1, e.seconds + seconds, e.flops + flops)
    }

    /// Waits for the recorded launches and adds them to `totals` (the events go back to the pool).
    func finish() throws {
        guard let first = pending.first, let last = pending.last else { return }
        let r = api.cuEventSynchronize!(last.end)
        if r != 0 { throw QATError("CUDA: cuEventSynchronize failed (\(r))") }
        func ms(_ a: CUevent?, _ b: CUevent?) throws -> Double {
            var v: Float = 0
            let r = api.cuEventElapsedTime!(&v, a, b)
            if r != 0 { throw QATError("CUDA: cuEventElapsedTime failed (\(r))") }
            return Double(v) * 1e-3
        }
        var previous: Pending?
        for p in pending {
            add(p.name, seconds: try ms(p.start, p.end), flops: p.flops)
            if let q = previous {  // the device's wait between two launches: where the host held it up
                let gap = try ms(q.end, p.start), key = "\(q.name) → \(p.name)"
                if gap > 20e-6 {
                    let e = gaps[key, default: (0, 0)]
                    gaps[key] = (e.count + 1, e.seconds + gap)
                }
            }
            previous = p
        }
        span += try ms(first.start, last.end)
        pending = []
        used = 0
    }

    /// The headline (launches' sum, and with events the span and the idle time) and one line per name, most
    /// expensive first (products with their TFLOP/s).
    func report(_ what: String, limit: Int) -> [String] {
        let total = totals.values.reduce(0) { $0 + $1.seconds }
        var head = String(format: "  profile of %@: %.1f ms in launches", what as NSString, total * 1e3)
        if usesEvents {
            head += String(
                format: " (events, not synchronised), %.1f ms first to last, device idle %.1f ms", span * 1e3, (span - total) * 1e3)
        } else {
            head += " (every launch synchronised)"
        }
        let waits = gaps.sorted { $0.value.seconds > $1.value.seconds }.prefix(4).map { k, v in
            String(format: "  idle %6.2f ms in %d waits between %@", v.seconds * 1e3, v.count, k as NSString)
        }
        return [head] + waits
            + totals.sorted { $0.value.seconds > $1.value.seconds }.prefix(limit).map { k, v in
                String(
                    format: "  %-44@ %6d calls %9.2f ms %5.1f%%", k as NSString, v.count, v.seconds * 1e3,
                    100 * v.seconds / max(total, 1e-12))
                    + (v.flops > 0 ? String(format: " %6.0f TFLOP/s", v.flops / v.seconds * 1e-12) : "")
            }
    }
}
