import Foundation
import QATCore

/// ZeRO stage 1 (`train.shard_optimizer_state: true`): optimizer-state sharding for data-parallel
/// runs, designed like PyTorch's `ZeroRedundancyOptimizer`.
///
/// - Whole tensors are assigned to ranks greedily by size (largest first, each to the rank
///   holding the fewest elements so far, ties to the lower rank and, among equal sizes, the
///   earlier slot first), so every rank computes the same assignment.
/// - Each rank allocates AdamW's m and v only for the slots it owns (about 1/N of the state)
///   and steps only those. AdamW is elementwise, so given the same all-reduced gradients and
///   clip coefficient the owner's update is bit-identical to the unsharded one.
/// - After the step every parameter is broadcast from its owner (small tensors packed into
///   buckets of at most `bucketElements` floats, one `MPI_Bcast` per bucket).
/// - Gradients stay fully all-reduced (that is ZeRO-1; stages 2/3 would shard those too).
/// - Checkpoints keep the unsharded format: rank 0 receives the other ranks' moments one tensor
///   at a time while it writes (`forEachGatheredMoment`), and a restore reads only this rank's
///   slots, so a sharded run resumes unsharded, or at another world size, and `qat export
///   --checkpoint` reads it as any other.
public final class ZeROPartition {
    public let comm: Communicator
    public var rank: Int { comm.rank }
    public var size: Int { comm.size }
    /// Owning rank of each optimizer slot (slot order).
    public let owners: [Int]
    /// Elements of optimizer-state tensors (one moment) each rank owns.
    public let ownedElements: [Int]

    /// One broadcast: a root and the slots it sends (several small ones packed, or one large
    /// tensor in place).
    struct Bucket { var root: Int; var slots: [Int]; var elements: Int; var packed: Bool }
    let buckets: [Bucket]
    /// Packing buffer of the largest packed bucket (allocated once, reused every step).
    let staging: Tensor

    public static let defaultBucketElements = 1 << 22

    /// Greedy by size, deterministic (PyTorch's `_partition_parameters`): slots sorted by
    /// element count, largest first (stable), each to the least-loaded rank (lowest on ties).
    public static func assignOwners(counts: [Int], ranks: Int) -> [Int] {
        precondition(ranks >= 1)
        var load = [Int](repeating: 0, count: ranks)
        var owners = [Int](repeating: 0, count: counts.count)
        let order = counts.indices.sorted { counts[$0] != counts[$1] ? counts[$0] > counts[$1] : $0 < $1 }
        for i in order {
            var best = 0
            for r in 1..<ranks where load[r] < load[best] { best = r }
            owners[i] = best
            load[best] += counts[i]
        }
        return owners
    }

    public init(comm: Communicator, counts: [Int], bucketElements: Int = ZeROPartition.defaultBucketElements) {
        self.comm = comm
        let owners = ZeROPartition.assignOwners(counts: counts, ranks: comm.size)
        self.owners = owners
        var owned = [Int](repeating: 0, count: comm.size)
        for (i, r) in owners.enumerated() { owned[r] += counts[i] }
        ownedElements = owned
        // Buckets per owner, in slot order: identical on every rank, so the broadcasts match.
        var buckets: [Bucket] = []
        for root in 0..<comm.size {
            var open = Bucket(root: root, slots: [], elements: 0, packed: true)
            for (i, r) in owners.enumerated() where r == root && counts[i] > 0 {
                if counts[i] >= bucketElements {
                    buckets.append(Bucket(root: root, slots: [i], elements: counts[i], packed: false))
                    continue
                }
                if open.elements + counts[i] > bucketElements {
                    buckets.append(open); open = Bucket(root: root, slots: [], elements: 0, packed: true)
                }
                open.slots.append(i); open.elements += counts[i]
            }
            if !open.slots.isEmpty { buckets.append(open) }
        }
        self.buckets = buckets
        staging = Tensor(shape: [buckets.filter(\.packed).map(\.elements).max() ?? 0])
    }

    public func owns(_ slot: Int) -> Bool { owners[slot] == comm.rank }

    /// Every parameter from its owner to all ranks (after the owners' step).
    public func broadcastParameters(_ values: [Tensor]) throws {
        let s = staging.data
        for b in buckets {
            if !b.packed { try comm.broadcast(values[b.slots[0]].data, count: b.elements, root: b.root); continue }
            let mine = b.root == comm.rank
            var o = 0
            if mine { for i in b.slots { (s + o).update(from: values[i].data, count: values[i].count); o += values[i].count } }
            try comm.broadcast(s, count: b.elements, root: b.root)
            if !mine { o = 0; for i in b.slots { values[i].data.update(from: s + o, count: values[i].count); o += values[i].count } }
        }
    }
}
