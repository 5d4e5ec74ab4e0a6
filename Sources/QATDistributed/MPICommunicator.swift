import Foundation
import QATCore

#if canImport(Glibc)
import Glibc
#endif

/// Open MPI through dlopen/dlsym. MPI_COMM_WORLD, MPI_FLOAT, MPI_DOUBLE, MPI_SUM and MPI_MAX
/// are the addresses of Open MPI's `ompi_mpi_*` objects; MPI_IN_PLACE is `(void *) 1`.
public final class MPICommunicator: Communicator {
    typealias InitThread =
        @convention(c) (
            UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>?, Int32,
            UnsafeMutablePointer<Int32>
        ) -> Int32
    typealias Initialized = @convention(c) (UnsafeMutablePointer<Int32>) -> Int32
    typealias CommQuery = @convention(c) (UnsafeMutableRawPointer, UnsafeMutablePointer<Int32>) -> Int32
    typealias Allreduce =
        @convention(c) (
            UnsafeRawPointer?, UnsafeMutableRawPointer, Int32, UnsafeMutableRawPointer, UnsafeMutableRawPointer, UnsafeMutableRawPointer
        ) -> Int32
    typealias Barrier = @convention(c) (UnsafeMutableRawPointer) -> Int32
    typealias Send = @convention(c) (UnsafeRawPointer?, Int32, UnsafeMutableRawPointer, Int32, Int32, UnsafeMutableRawPointer) -> Int32
    typealias Recv =
        @convention(c) (
            UnsafeMutableRawPointer?, Int32, UnsafeMutableRawPointer, Int32, Int32, UnsafeMutableRawPointer, UnsafeMutableRawPointer?
        ) -> Int32
    typealias Isend =
        @convention(c) (
            UnsafeRawPointer?, Int32, UnsafeMutableRawPointer, Int32, Int32, UnsafeMutableRawPointer,
            UnsafeMutablePointer<UnsafeMutableRawPointer?>
        ) -> Int32
    typealias Waitall = @convention(c) (Int32, UnsafeMutablePointer<UnsafeMutableRawPointer?>, UnsafeMutableRawPointer?) -> Int32
    typealias Bcast = @convention(c) (UnsafeMutableRawPointer?, Int32, UnsafeMutableRawPointer, Int32, UnsafeMutableRawPointer) -> Int32
    typealias Split = @convention(c) (UnsafeMutableRawPointer, Int32, Int32, UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> Int32
    typealias Finalize = @convention(c) () -> Int32
    typealias Abort = @convention(c) (UnsafeMutableRawPointer, Int32) -> Int32

    public let rank: Int
    public let size: Int
    private let comm, world, float, double, sum, maxOp: UnsafeMutableRawPointer
    private let commRank, commSize: CommQuery
    private let splitFn: Split
    private let allreduce: Allreduce
    private let sendFn: Send
    private let recvFn: Recv
    private let bcastFn: Bcast
    private let isendFn: Isend
    private let waitallFn: Waitall
    /// Shared by a communicator and the ones split from it (the trainer reads the world's).
    private final class TrafficCounter { var value = CommTraffic() }
    private let counter: TrafficCounter
    public var traffic: CommTraffic { counter.value }
    private let barrierFn: Barrier
    private let finalizeFn: Finalize
    private let abortFn: Abort
    private var finalized = false

    public init() throws {
        var handle: UnsafeMutableRawPointer? = nil
        for name in ["libmpi.so.40", "libmpi.so"] {
            handle = dlopen(name, RTLD_NOW | RTLD_GLOBAL)
            if handle != nil { break }
        }
        guard let h = handle else {
            let why = dlerror().map { String(cString: $0) } ?? "not found"
            throw QATError(
                "launched by mpirun (\(Distributed.launcherWorldSize) ranks) but Open MPI cannot be "
                    + "loaded (\(why)); install it: apt-get install libopenmpi-dev openmpi-bin")
        }
        func sym(_ s: String) throws -> UnsafeMutableRawPointer {
            guard let p = dlsym(h, s) else {
                throw QATError("libmpi has no symbol \(s): Open MPI is needed (apt-get install libopenmpi-dev openmpi-bin)")
            }
            return p
        }
        let initThread = unsafeBitCast(try sym("MPI_Init_thread"), to: InitThread.self)
        let initialized = unsafeBitCast(try sym("MPI_Initialized"), to: Initialized.self)
        commRank = unsafeBitCast(try sym("MPI_Comm_rank"), to: CommQuery.self)
        commSize = unsafeBitCast(try sym("MPI_Comm_size"), to: CommQuery.self)
        splitFn = unsafeBitCast(try sym("MPI_Comm_split"), to: Split.self)
        counter = TrafficCounter()
        allreduce = unsafeBitCast(try sym("MPI_Allreduce"), to: Allreduce.self)
        barrierFn = unsafeBitCast(try sym("MPI_Barrier"), to: Barrier.self)
        sendFn = unsafeBitCast(try sym("MPI_Send"), to: Send.self)
        recvFn = unsafeBitCast(try sym("MPI_Recv"), to: Recv.self)
        bcastFn = unsafeBitCast(try sym("MPI_Bcast"), to: Bcast.self)
        isendFn = unsafeBitCast(try sym("MPI_Isend"), to: Isend.self)
        waitallFn = unsafeBitCast(try sym("MPI_Waitall"), to: Waitall.self)
        finalizeFn = unsafeBitCast(try sym("MPI_Finalize"), to: Finalize.self)
        abortFn = unsafeBitCast(try sym("MPI_Abort"), to: Abort.self)
        comm = try sym("ompi_mpi_comm_world"); world = comm; float = try sym("ompi_mpi_float"); double = try sym("ompi_mpi_double")
        sum = try sym("ompi_mpi_op_sum"); maxOp = try sym("ompi_mpi_op_max")
        var flag: Int32 = 0
        _ = initialized(&flag)
        if flag == 0 {
            var provided: Int32 = 0
            // MPI_THREAD_FUNNELED (1): only the main thread calls MPI; workers compute.
            let rc = initThread(nil, nil, 1, &provided)
            guard rc == 0 else { throw QATError.io("MPI_Init_thread failed (error \(rc))") }
        }
        var r: Int32 = 0, s: Int32 = 0
        _ = commRank(comm, &r); _ = commSize(comm, &s)
        rank = Int(r); size = Int(s)
    }

    /// A communicator over `comm` (from MPI_Comm_split) sharing the parent's library and counter.
    private init(parent p: MPICommunicator, comm: UnsafeMutableRawPointer) {
        self.comm = comm; world = p.world; float = p.float; double = p.double; sum = p.sum; maxOp = p.maxOp
        commRank = p.commRank; commSize = p.commSize; splitFn = p.splitFn; counter = p.counter
        allreduce = p.allreduce; sendFn = p.sendFn; recvFn = p.recvFn; bcastFn = p.bcastFn; isendFn = p.isendFn
        waitallFn = p.waitallFn; barrierFn = p.barrierFn; finalizeFn = p.finalizeFn; abortFn = p.abortFn
        var r: Int32 = 0, s: Int32 = 0
        _ = commRank(comm, &r); _ = commSize(comm, &s)
        rank = Int(r); size = Int(s)
    }

    public func split(color: Int, key: Int) throws -> Communicator {
        var c: UnsafeMutableRawPointer? = nil
        try check(splitFn(comm, Int32(color), Int32(key), &c), "MPI_Comm_split")
        guard let c else { throw QATError("MPI_Comm_split returned no communicator on rank \(rank)") }
        return MPICommunicator(parent: self, comm: c)
    }

    private var inPlace: UnsafeRawPointer? { UnsafeRawPointer(bitPattern: 1) }

    private func check(_ rc: Int32, _ what: String) throws {
        if rc != 0 { throw QATError.io("\(what) failed (MPI error \(rc)) on rank \(rank)") }
    }

    /// MPI counts are Int32: larger buffers go in pieces of at most 2^28 elements.
    private func chunked(_ count: Int, _ body: (_ offset: Int, _ n: Int32) throws -> Void) rethrows {
        let start = DispatchTime.now().uptimeNanoseconds
        defer { counter.value.seconds += Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 }
        var done = 0
        let chunk = 1 << 28
        while done < count {
            let n = min(chunk, count - done)
            try body(done, Int32(n))
            done += n
        }
        counter.value.calls += 1
    }

    private func reduce(_ buf: UnsafeMutableRawPointer, count: Int, type: UnsafeMutableRawPointer, op: UnsafeMutableRawPointer) throws {
        let elem = type == double ? 8 : 4
        try chunked(count) { o, n in try check(allreduce(inPlace, buf + o * elem, n, type, op, comm), "MPI_Allreduce") }
        counter.value.allReduceBytes += count * elem
    }

    public func send(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws {
        try chunked(count) { o, n in try check(sendFn(buf + o, n, float, Int32(peer), Int32(tag), comm), "MPI_Send to rank \(peer)") }
        counter.value.sendBytes += count * 4
    }

    public func recv(_ buf: UnsafeMutablePointer<Float>, count: Int, from peer: Int, tag: Int) throws {
        // MPI_STATUS_IGNORE is a null pointer in Open MPI.
        try chunked(count) { o, n in try check(recvFn(buf + o, n, float, Int32(peer), Int32(tag), comm, nil), "MPI_Recv from rank \(peer)")
        }
        counter.value.recvBytes += count * 4
    }

    public func isend(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws -> SendRequest {
        var handles: [UnsafeMutableRawPointer?] = []
        try chunked(count) { o, n in
            var h: UnsafeMutableRawPointer? = nil
            try check(isendFn(buf + o, n, float, Int32(peer), Int32(tag), comm, &h), "MPI_Isend to rank \(peer)")
            handles.append(h)
        }
        counter.value.sendBytes += count * 4
        return SendRequest(handles)
    }

    public func wait(_ request: SendRequest) throws {
        guard !request.handles.isEmpty else { return }
        let n = Int32(request.handles.count)
        let start = DispatchTime.now().uptimeNanoseconds
        defer { counter.value.seconds += Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 }
        // MPI_STATUSES_IGNORE is a null pointer in Open MPI.
        try request.handles.withUnsafeMutableBufferPointer { try check(waitallFn(n, $0.baseAddress!, nil), "MPI_Waitall") }
        request.handles = []
    }

    public func broadcast(_ buf: UnsafeMutablePointer<Float>, count: Int, root: Int) throws {
        try chunked(count) { o, n in try check(bcastFn(buf + o, n, float, Int32(root), comm), "MPI_Bcast from rank \(root)") }
        counter.value.broadcastBytes += count * 4
    }

    public func allReduceSum(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {
        try reduce(UnsafeMutableRawPointer(buf), count: count, type: float, op: sum)
    }
    public func allReduceSum(_ buf: UnsafeMutablePointer<Double>, count: Int) throws {
        try reduce(UnsafeMutableRawPointer(buf), count: count, type: double, op: sum)
    }
    public func allReduceMax(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {
        try reduce(UnsafeMutableRawPointer(buf), count: count, type: float, op: maxOp)
    }
    public func barrier() throws { try check(barrierFn(comm), "MPI_Barrier") }
    public func finalize() { if !finalized { finalized = true; _ = finalizeFn() } }
    public func abort(code: Int32) -> Never { _ = abortFn(world, code); exit(code) }
}
