import Foundation
import QATCUDA
import QATCore
import QATModels
import XCTest

/// The host side of data parallelism on GPUs: the gradient buckets, which GPU a rank takes,
/// how gradients are reduced, the staged reduction's addressing, and NVLink multicast kept off.
final class DataParallelPlanTests: XCTestCase {
    /// Every element of every tensor in exactly one bucket, buckets ascending, disjoint and no
    /// longer than the bucket size; padding gaps up to maxGap are merged, larger gaps split
    /// buckets, long tensors are cut, empty tensors and input order do not matter.
    func testBucketsCoverEveryTensorElementOnce() {
        let tensors: [(offset: Int, count: Int)] = [(200, 10), (0, 100), (128, 64), (192, 0), (300, 1000), (1364, 7)]
        let plan = GradientBuckets(tensors: tensors, bucketElements: 256, maxGap: 64)
        XCTAssertEqual(plan.ranges, [0..<210, 300..<556, 556..<812, 812..<1068, 1068..<1300, 1364..<1371])
        // Properties, on many random layouts.
        var g = SplitMix64(seed: 5)
        for _ in 0..<200 {
            var layout: [(offset: Int, count: Int)] = []
            var at = Int(g.next() % 50)
            for _ in 0..<Int(g.next() % 12) {
                let n = Int(g.next() % 300)
                layout.append((at, n))
                at += n + Int(g.next() % 100)
            }
            let size = 1 + Int(g.next() % 200), gap = Int(g.next() % 80)
            let b = GradientBuckets(tensors: layout.shuffled(using: &g), bucketElements: size, maxGap: gap)
            var covered = [Int: Int]()
            for (i, r) in b.ranges.enumerated() {
                XCTAssertLessThanOrEqual(r.count, size)
                XCTAssertFalse(r.isEmpty)
                if i > 0 { XCTAssertGreaterThanOrEqual(r.lowerBound, b.ranges[i - 1].upperBound) }
                for e in r { covered[e, default: 0] += 1 }
            }
            let elements = Set(layout.flatMap { $0.offset..<($0.offset + $0.count) })
            for e in elements { XCTAssertEqual(covered[e], 1, "element \(e)") }
            // Nothing outside the tensors except gaps of at most maxGap inside a bucket.
            let extra = covered.keys.filter { !elements.contains($0) }.count
            XCTAssertLessThanOrEqual(extra, gap * max(0, layout.count - 1))
            XCTAssertEqual(b.elements, covered.count)
        }
        XCTAssertEqual(GradientBuckets(tensors: [], bucketElements: 8).ranges, [])
        XCTAssertEqual(GradientBuckets(tensors: [(0, 16)], bucketElements: 8).largest, 8)
    }

    /// Rank r takes GPU (N + r) mod count for cuda:N; a GPU that does not exist, or none at all,
    /// is a one-line error.
    func testRankToDeviceMapping() throws {
        XCTAssertEqual(try (0..<5).map { try GPUDataParallel.ordinal(requested: 0, localRank: $0, deviceCount: 2) }, [0, 1, 0, 1, 0])
        XCTAssertEqual(try (0..<4).map { try GPUDataParallel.ordinal(requested: 1, localRank: $0, deviceCount: 4) }, [1, 2, 3, 0])
        XCTAssertEqual(try GPUDataParallel.ordinal(requested: 0, localRank: 1, deviceCount: 1), 0)  // two ranks share one GPU
        XCTAssertThrowsError(try GPUDataParallel.ordinal(requested: 2, localRank: 0, deviceCount: 2)) {
            XCTAssertTrue("\($0)".contains("cuda:2 does not exist"), "\($0)")
        }
        XCTAssertThrowsError(try GPUDataParallel.ordinal(requested: 0, localRank: 0, deviceCount: 0))
        // The launcher's local rank wins over the world rank; Open MPI's first.
        XCTAssertEqual(GPUDataParallel.localRank(environment: ["OMPI_COMM_WORLD_LOCAL_RANK": "3", "SLURM_LOCALID": "1"], worldRank: 11), 3)
        XCTAssertEqual(GPUDataParallel.localRank(environment: ["SLURM_LOCALID": "1"], worldRank: 11), 1)
        XCTAssertEqual(GPUDataParallel.localRank(environment: ["OMPI_COMM_WORLD_LOCAL_RANK": "x"], worldRank: 11), 11)
        XCTAssertEqual(GPUDataParallel.localSize(environment: ["OMPI_COMM_WORLD_LOCAL_SIZE": "4"]), 4)
        XCTAssertNil(GPUDataParallel.localSize(environment: [:]))
        XCTAssertTrue(GPUDataParallel.ranksShareGPUs(localSize: 2, deviceCount: 1))
        XCTAssertFalse(GPUDataParallel.ranksShareGPUs(localSize: 2, deviceCount: 2))
        XCTAssertFalse(GPUDataParallel.ranksShareGPUs(localSize: nil, deviceCount: 1))
    }

    /// QAT_GRAD_REDUCE decides when set; unset, NCCL when it loads and no two ranks share a GPU.
    func testReduceModeChoice() throws {
        typealias M = GPUDataParallel.ReduceMode
        XCTAssertEqual(try GPUDataParallel.reduceMode(environment: [:], ncclLoads: true, ranksShareGPUs: false), M.nccl)
        XCTAssertEqual(try GPUDataParallel.reduceMode(environment: [:], ncclLoads: false, ranksShareGPUs: false), M.mpi)
        XCTAssertEqual(try GPUDataParallel.reduceMode(environment: [:], ncclLoads: true, ranksShareGPUs: true), M.mpi)
        XCTAssertEqual(
            try GPUDataParallel.reduceMode(environment: ["QAT_GRAD_REDUCE": "mpi"], ncclLoads: true, ranksShareGPUs: false), M.mpi)
        XCTAssertEqual(
            try GPUDataParallel.reduceMode(environment: ["QAT_GRAD_REDUCE": " NCCL"], ncclLoads: false, ranksShareGPUs: true), M.nccl)
        XCTAssertThrowsError(
            try GPUDataParallel.reduceMode(environment: ["QAT_GRAD_REDUCE": "gloo"], ncclLoads: true, ranksShareGPUs: false)
        ) {
            XCTAssertEqual("\($0)", "QAT_GRAD_REDUCE=gloo is not one of nccl, mpi")
        }
        XCTAssertEqual(try GPUDataParallel.bucketElements(environment: [:]), 64 << 18)
        XCTAssertEqual(try GPUDataParallel.bucketElements(environment: ["QAT_GRAD_BUCKET_MB": "16"]), 16 << 18)
        XCTAssertThrowsError(try GPUDataParallel.bucketElements(environment: ["QAT_GRAD_BUCKET_MB": "0"]))
        XCTAssertThrowsError(try GPUDataParallel.bucketElements(environment: ["QAT_GRAD_BUCKET_MB": "lots"]))
    }

    /// The staged path reads and writes back exactly the bucketed elements: with a sum that
    /// doubles, those double and the padding between buckets keeps its values.
    func testStagedReductionWritesBackEachBucket() throws {
        var arena = (0..<1000).map { Float($0) + 0.5 }
        let buckets = GradientBuckets(tensors: [(0, 300), (310, 50), (600, 333)], bucketElements: 128, maxGap: 16)
        var staging = [Float](repeating: .nan, count: buckets.largest)
        var reduced = 0
        try staging.withUnsafeMutableBufferPointer { s in
            try StagedReduction.run(
                buckets, staging: s.baseAddress!,
                download: { r, host in for (k, i) in r.enumerated() { host[k] = arena[i] } },
                reduce: { buf, n in
                    for i in 0..<n { buf[i] *= 2 }; reduced += n
                },
                upload: { r, host in for (k, i) in r.enumerated() { arena[i] = host[k] } })
        }
        XCTAssertEqual(reduced, buckets.elements)
        let inside = Set(buckets.ranges.flatMap { $0 })
        for i in 0..<arena.count { XCTAssertEqual(arena[i], (Float(i) + 0.5) * (inside.contains(i) ? 2 : 1), "element \(i)") }
        XCTAssertTrue(inside.isSuperset(of: 300..<310))  // the 10-element gap is inside a bucket
        XCTAssertFalse(inside.contains(450))  // the 200-element gap is not
    }

    /// NVLink multicast stays off: NCCL_NVLS_ENABLE is set to 0 whatever it was, and a child
    /// process inherits it. Loading NCCL sets it too, and a missing NCCL is one line naming it.
    func testNVLinkMulticastIsSwitchedOffForChildren() throws {
        setenv("NCCL_NVLS_ENABLE", "1", 1)
        GPUDataParallel.disableNVLinkMulticast()
        XCTAssertEqual(ProcessInfo.processInfo.environment["NCCL_NVLS_ENABLE"], "0")
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        let pipe = Pipe()
        p.standardOutput = pipe
        try p.run()
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertTrue(out.split(separator: "\n").contains("NCCL_NVLS_ENABLE=0"), out)
        setenv("NCCL_NVLS_ENABLE", "1", 1)
        setenv("QAT_NCCL_LIB", "/nonexistent/libnccl.so.2", 1)
        defer { unsetenv("QAT_NCCL_LIB") }
        XCTAssertThrowsError(try NCCLLibrary.load()) { error in
            XCTAssertTrue("\(error)".contains("NCCL could not be opened from /nonexistent/libnccl.so.2"), "\(error)")
            XCTAssertFalse("\(error)".contains("\n"))
        }
        XCTAssertEqual(ProcessInfo.processInfo.environment["NCCL_NVLS_ENABLE"], "0")
        XCTAssertEqual(NCCLLibrary.versionString(22_708), "2.27.8")
        XCTAssertEqual(NCCLLibrary.versionString(2_804), "2.8.4")
    }
}
