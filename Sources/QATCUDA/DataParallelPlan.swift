import Foundation
import QATCore

/// The host-side decisions of data parallelism on GPUs, as pure functions (tested without a
/// GPU): which GPU a rank takes, how gradients are reduced, and the buckets of the gradient
/// arena each collective covers.
public enum GPUDataParallel {
    /// The environment variable that chooses how gradients are reduced across ranks.
    public static let reduceVariable = "QAT_GRAD_REDUCE"
    /// Bucket size in MiB of fp32 gradients per collective (default `defaultBucketMB`).
    public static let bucketVariable = "QAT_GRAD_BUCKET_MB"
    public static let defaultBucketMB = 64

    /// How the device gradients are summed over the ranks.
    public enum ReduceMode: String, Equatable, Sendable {
        /// NCCL all-reduce on the device buffers (one GPU per rank).
        case nccl
        /// Staged: device → host, MPI all-reduce, host → device (slower; ranks may share a GPU).
        case mpi
    }

    /// This rank's index among the ranks on its host: Open MPI's, PMIx's or Slurm's local rank,
    /// else the world rank (one host).
    public static func localRank(environment env: [String: String], worldRank: Int) -> Int {
        for k in ["OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"] {
            if let v = env[k].flatMap(Int.init), v >= 0 { return v }
        }
        return worldRank
    }

    /// How many ranks run on this host (nil when the launcher does not say).
    public static func localSize(environment env: [String: String]) -> Int? {
        for k in ["OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE"] {
            if let v = env[k].flatMap(Int.init), v > 0 { return v }
        }
        return nil
    }

    /// The GPU of local rank `localRank` when the recipe asks for `cuda:requested` under mpirun:
    /// (requested + localRank) mod deviceCount. `cuda` (device 0) gives rank r GPU r mod count;
    /// `cuda:N` starts the round at GPU N (to leave the GPUs before it to others). With fewer
    /// GPUs than ranks, ranks share GPUs (then only `ReduceMode.mpi` works: NCCL refuses two
    /// ranks on one GPU).
    public static func ordinal(requested: Int, localRank: Int, deviceCount: Int) throws -> Int {
        guard deviceCount > 0 else { throw QATError("no CUDA GPU found; run on a machine with an NVIDIA GPU or use device: cpu") }
        guard requested >= 0, requested < deviceCount else {
            throw QATError(
                "device cuda:\(requested) does not exist: this machine has \(deviceCount) GPU(s) (cuda:0…cuda:\(deviceCount - 1))")
        }
        return (requested + max(0, localRank)) % deviceCount
    }

    /// The reduction to use. `QAT_GRAD_REDUCE=nccl|mpi` decides when set (an explicit `nccl`
    /// that cannot be loaded is an error, reported by the caller); unset, NCCL when it loads and
    /// every rank of the host has its own GPU, else the staged MPI path.
    public static func reduceMode(environment env: [String: String], ncclLoads: Bool, ranksShareGPUs: Bool) throws -> ReduceMode {
        if let v = env[reduceVariable]?.trimmingCharacters(in: .whitespaces).lowercased(), !v.isEmpty {
            guard let mode = ReduceMode(rawValue: v) else {
                throw QATError("\(reduceVariable)=\(v) is not one of nccl, mpi")
            }
            return mode
        }
        return ncclLoads && !ranksShareGPUs ? .nccl : .mpi
    }

    /// Whether the ranks of this host share GPUs under `ordinal`'s round (more ranks than GPUs).
    public static func ranksShareGPUs(localSize: Int?, deviceCount: Int) -> Bool {
        guard let n = localSize else { return false }
        return n > deviceCount
    }

    /// The bucket size in fp32 elements (`QAT_GRAD_BUCKET_MB`, default 64 MiB).
    public static func bucketElements(environment env: [String: String]) throws -> Int {
        guard let v = env[bucketVariable], !v.isEmpty else { return defaultBucketMB << 18 }
        guard let mb = Int(v.trimmingCharacters(in: .whitespaces)), mb >= 1, mb <= 1 << 20 else {
            throw QATError("\(bucketVariable)=\(v) is not a whole number of MiB from 1 to 1048576")
        }
        return mb << 18  // MiB of 4-byte floats
    }
}

/// The buckets of one all-reduce pass over the gradient arena: element ranges of the arena,
/// ascending and disjoint, each at most `bucketElements` long, that together cover every
/// element of every tensor exactly once. Consecutive tensors share a bucket when the gap
/// between them (the arena's 256-byte alignment padding, zeros on every rank) is at most
/// `maxGap`; a tensor longer than a bucket is cut into pieces.
public struct GradientBuckets: Equatable, Sendable {
    public let ranges: [Range<Int>]

    public init(tensors: [(offset: Int, count: Int)], bucketElements: Int, maxGap: Int = 64) {
        precondition(bucketElements > 0)
        var ranges: [Range<Int>] = []
        var current: Range<Int>? = nil
        for t in tensors.filter({ $0.count > 0 }).sorted(by: { $0.offset < $1.offset }) {
            var start = t.offset
            let end = t.offset + t.count
            if let c = current {
                precondition(start >= c.upperBound, "gradient tensors overlap in the arena")
                if start - c.upperBound <= maxGap && end - c.lowerBound <= bucketElements {
                    current = c.lowerBound..<end
                    continue
                }
                ranges.append(c)
                current = nil
            }
            while end - start > bucketElements {
                ranges.append(start..<(start + bucketElements))
                start += bucketElements
            }
            current = start..<end
        }
        if let c = current { ranges.append(c) }
        self.ranges = ranges
    }

    /// Elements the collectives move (tensors plus the padding inside buckets).
    public var elements: Int { ranges.reduce(0) { $0 + $1.count } }
    /// The largest bucket (the staging buffer of the MPI path).
    public var largest: Int { ranges.map(\.count).max() ?? 0 }
}

/// The staged reduction (`ReduceMode.mpi`): each bucket downloaded into a host staging buffer,
/// summed over the ranks, and uploaded back to where it came from. The copies are closures, so
/// the same code runs on host arrays in the tests.
public enum StagedReduction {
    public static func run(
        _ buckets: GradientBuckets, staging: UnsafeMutablePointer<Float>,
        download: (_ range: Range<Int>, _ into: UnsafeMutablePointer<Float>) throws -> Void,
        reduce: (_ buffer: UnsafeMutablePointer<Float>, _ count: Int) throws -> Void,
        upload: (_ range: Range<Int>, _ from: UnsafePointer<Float>) throws -> Void
    ) throws {
        for r in buckets.ranges {
            try download(r, staging)
            try reduce(staging, r.count)
            try upload(r, UnsafePointer(staging))
        }
    }
}
