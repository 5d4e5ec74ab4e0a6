import Foundation
import QATCore

#if canImport(Glibc)
import Glibc
#endif

/// The collectives data-parallel training needs. `SingleProcessCommunicator` (size 1, every
/// collective a no-op) keeps single-process runs bit for bit what they were; `MPICommunicator`
/// runs them over Open MPI, loaded with dlopen only when the process was started by mpirun
/// (so the binary has no link-time MPI dependency).
public protocol Communicator: AnyObject {
    var rank: Int { get }
    var size: Int { get }
    func allReduceSum(_ buf: UnsafeMutablePointer<Float>, count: Int) throws
    func allReduceSum(_ buf: UnsafeMutablePointer<Double>, count: Int) throws
    func allReduceMax(_ buf: UnsafeMutablePointer<Float>, count: Int) throws
    /// Point-to-point (pipeline stages, gathers to rank 0): blocking, matched by (peer, tag).
    func send(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws
    func recv(_ buf: UnsafeMutablePointer<Float>, count: Int, from peer: Int, tag: Int) throws
    func broadcast(_ buf: UnsafeMutablePointer<Float>, count: Int, root: Int) throws
    /// Non-blocking send: `buf` must stay untouched until `wait` returns for the request.
    func isend(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws -> SendRequest
    func wait(_ request: SendRequest) throws
    /// Payload bytes this rank has handed to each kind of call so far.
    var traffic: CommTraffic { get }
    func barrier() throws
    /// A sub-communicator of the ranks that pass the same `color`, ordered by `key`
    /// (MPI_Comm_split): every rank of this communicator must call it.
    func split(color: Int, key: Int) throws -> Communicator
    func finalize()
    func abort(code: Int32) -> Never
}

/// An in-flight `isend` (one MPI request per ≤ 2^28-element piece).
public final class SendRequest {
    var handles: [UnsafeMutableRawPointer?]
    init(_ handles: [UnsafeMutableRawPointer?]) { self.handles = handles }
}

/// Payload bytes per kind of call (a ring all-reduce moves about 2·(N−1)/N times its payload
/// over each rank's link; point-to-point moves exactly its payload).
public struct CommTraffic: Sendable, Equatable {
    public var allReduceBytes = 0
    public var sendBytes = 0
    public var recvBytes = 0
    public var broadcastBytes = 0
    public var calls = 0
    /// Wall time spent inside MPI calls (transfers, and waiting for the peers).
    public var seconds = 0.0
    public init() {}
    /// Bytes sent: all-reduce payloads, point-to-point sends and broadcasts.
    public var payloadBytes: Int { allReduceBytes + sendBytes + broadcastBytes }
    public static func - (a: CommTraffic, b: CommTraffic) -> CommTraffic {
        var d = CommTraffic()
        d.allReduceBytes = a.allReduceBytes - b.allReduceBytes; d.sendBytes = a.sendBytes - b.sendBytes
        d.recvBytes = a.recvBytes - b.recvBytes; d.broadcastBytes = a.broadcastBytes - b.broadcastBytes; d.calls = a.calls - b.calls
        d.seconds = a.seconds - b.seconds
        return d
    }
}

extension Communicator {
    public var isRoot: Bool { rank == 0 }
    public var isDistributed: Bool { size > 1 }

    public func allReduceSum(_ values: inout [Double]) throws {
        let n = values.count
        try values.withUnsafeMutableBufferPointer { try allReduceSum($0.baseAddress!, count: n) }
    }

    public func allReduceMax(_ values: inout [Float]) throws {
        let n = values.count
        guard n > 0 else { return }
        try values.withUnsafeMutableBufferPointer { try allReduceMax($0.baseAddress!, count: n) }
    }

    /// Sums tensors across ranks, several per MPI call: tensors are packed into a staging
    /// buffer of at most `bucketElements` floats (a tensor larger than that is reduced in place).
    public func allReduceSum(tensors: [Tensor], bucketElements: Int = 1 << 22) throws {
        guard isDistributed else { return }
        var staging = [Float](repeating: 0, count: min(bucketElements, tensors.reduce(0) { $0 + $1.count }))
        var pending: [Tensor] = []
        var filled = 0
        func flush() throws {
            guard !pending.isEmpty else { return }
            try staging.withUnsafeMutableBufferPointer { s in
                var o = 0
                for t in pending { (s.baseAddress! + o).update(from: t.data, count: t.count); o += t.count }
                try allReduceSum(s.baseAddress!, count: o)
                o = 0
                for t in pending { t.data.update(from: s.baseAddress! + o, count: t.count); o += t.count }
            }
            pending.removeAll(keepingCapacity: true); filled = 0
        }
        for t in tensors where t.count > 0 {
            if t.count >= bucketElements { try allReduceSum(t.data, count: t.count); continue }
            if filled + t.count > staging.count { try flush() }
            pending.append(t); filled += t.count
        }
        try flush()
    }
}

public final class SingleProcessCommunicator: Communicator {
    public init() {}
    public var rank: Int { 0 }
    public var size: Int { 1 }
    public func allReduceSum(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
    public func allReduceSum(_ buf: UnsafeMutablePointer<Double>, count: Int) throws {}
    public func allReduceMax(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
    public func send(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws {
        throw QATError("send to rank \(peer): a single process has no peers (start the run with mpirun -np N)")
    }
    public func recv(_ buf: UnsafeMutablePointer<Float>, count: Int, from peer: Int, tag: Int) throws {
        throw QATError("receive from rank \(peer): a single process has no peers (start the run with mpirun -np N)")
    }
    public func broadcast(_ buf: UnsafeMutablePointer<Float>, count: Int, root: Int) throws {}
    public func isend(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws -> SendRequest {
        throw QATError("send to rank \(peer): a single process has no peers (start the run with mpirun -np N)")
    }
    public func wait(_ request: SendRequest) throws {}
    public var traffic: CommTraffic { CommTraffic() }
    public func barrier() throws {}
    public func split(color: Int, key: Int) throws -> Communicator { self }
    public func finalize() {}
    public func abort(code: Int32) -> Never { exit(code) }
}

/// The process-wide communicator (single process unless `Distributed.initialize` found mpirun).
nonisolated(unsafe) public var worldCommunicator: Communicator = SingleProcessCommunicator()

/// Starting MPI. The helpers that run calibration and evaluation under a layout (they need
/// the model and the pipeline engine) are in QATTrain (`Distributed.calibrationLoop`, …).
public enum Distributed {
    /// World size mpirun announced (Open MPI's `OMPI_COMM_WORLD_SIZE`, or PMIx/Slurm's), 1 otherwise.
    public static var launcherWorldSize: Int {
        let env = ProcessInfo.processInfo.environment
        for k in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"] { if let v = env[k].flatMap(Int.init) { return v } }
        return 1
    }

    /// Starts MPI when launched by mpirun with more than one rank (or when `force`), and makes
    /// it `worldCommunicator`. Without mpirun nothing is loaded.
    @discardableResult
    public static func initialize(force: Bool = false) throws -> Communicator {
        guard force || launcherWorldSize > 1 else { return worldCommunicator }
        let c = try MPICommunicator()
        worldCommunicator = c
        // Ranks sharing a machine share its cores: each takes its part unless told otherwise
        // (QAT_THREADS or --threads), so that N ranks do not run N × cores threads.
        let env = ProcessInfo.processInfo.environment
        if env["QAT_THREADS"] == nil, let local = env["OMPI_COMM_WORLD_LOCAL_SIZE"].flatMap(Int.init), local > 1 {
            BLAS.setThreads(max(1, Parallel.threads / local))
        }
        return c
    }
}
