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
                if open.elements + counts[i] > bucketElements { buckets.append(open); open = Bucket(root: root, slots: [], elements: 0, packed: true) }
                open.slots.append(i); open.elements += counts[i]
            }
            if !open.slots.isEmpty { buckets.append(open) }
        }
        self.buckets = buckets
        staging = Tensor(shape: [buckets.filter(\.packed).map(\.elements).max() ?? 0])
    }

    public func owns(_ slot: Int) -> Bool { owners[slot] == comm.rank }

    /// Every parameter from its owner to all ranks (after the owners' step).
    func broadcastParameters(_ values: [Tensor]) throws {
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

extension AdamW {
    /// Elements of m (= of v) this rank holds: every trainable element unsharded, its share sharded.
    public var stateElementCount: Int { partition.map { $0.ownedElements[$0.rank] } ?? slots.reduce(0) { $0 + $1.value.count } }

    /// Whether this rank holds (and steps) slot `i`'s state.
    public func ownsSlot(_ i: Int) -> Bool { partition?.owns(i) ?? true }

    /// Whether a checkpoint tensor `<parameter>.exp_avg(_sq)` belongs to this rank (restore reads only those).
    public func ownsStateTensor(_ name: String) -> Bool {
        guard let p = partition else { return true }
        let base = name.hasSuffix(".exp_avg_sq") ? String(name.dropLast(11)) : name.hasSuffix(".exp_avg") ? String(name.dropLast(8)) : name
        guard let i = slotIndex[base] else { return true }
        return p.owns(i)
    }

    /// Checkpoint gather: on rank 0 calls `body` with every moment of every slot in slot order
    /// (`exp_avg`, then `exp_avg_sq`), its own from memory and the others' received from their
    /// owners one tensor at a time into one reused buffer (temporary memory: the largest
    /// trainable tensor); every other rank sends its own moments, in the same order, and never
    /// calls `body`. Unsharded, rank 0 simply visits its state. Every rank must call it.
    public func forEachGatheredMoment(_ body: (_ name: String, _ shape: [Int], _ values: UnsafeBufferPointer<Float>) throws -> Void) throws {
        guard let p = partition else {
            for (name, t) in stateTensors() { try body(name, t.shape, UnsafeBufferPointer(start: t.data, count: t.count)) }
            return
        }
        let tags = (m: 0x5A01, v: 0x5A02)
        if p.rank == 0 {
            let buffer = Tensor(shape: [slots.enumerated().filter { !p.owns($0.offset) }.map { $0.element.value.count }.max() ?? 0])
            for (i, s) in slots.enumerated() {
                for (name, local, tag) in [(AdamW.expAvgName(s.name), s.m, tags.m), (AdamW.expAvgSqName(s.name), s.v, tags.v)] {
                    if p.owns(i) {
                        try body(name, s.value.shape, UnsafeBufferPointer(start: local.data, count: local.count))
                    } else {
                        try p.comm.recv(buffer.data, count: s.value.count, from: p.owners[i], tag: tag)
                        try body(name, s.value.shape, UnsafeBufferPointer(start: buffer.data, count: s.value.count))
                    }
                }
            }
        } else {
            for (i, s) in slots.enumerated() where p.owns(i) {
                try p.comm.send(s.m.data, count: s.m.count, to: 0, tag: tags.m)
                try p.comm.send(s.v.data, count: s.v.count, to: 0, tag: tags.v)
            }
        }
    }
}

extension Trainer {
    /// `saveCheckpoint` under ZeRO-1: every rank takes part (rank 0 writes, the others send
    /// their moments while it does); the files are those of an unsharded run.
    func saveShardedCheckpoint() throws {
        let state = checkpointState(optimizer: optimizer.stateMetadata())
        guard comm.isRoot else { return try optimizer.forEachGatheredMoment { _, _, _ in } }
        try TrainingCheckpoint.write(directory: options.checkpointDir, state: state, parameters: model.parameters,
                                     optimizer: optimizer.forEachGatheredMoment, extra: extraState(), keep: spec.keepCheckpoints)
    }
}
