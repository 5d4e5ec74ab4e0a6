import Foundation
import QATCore
import QATDistributed

// ZeRO-1 in the optimizer and the trainer: the partition itself (`ZeROPartition`) is in QATDistributed.

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
    public func forEachGatheredMoment(_ body: (_ name: String, _ shape: [Int], _ values: UnsafeBufferPointer<Float>) throws -> Void) throws
    {
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
        try TrainingCheckpoint.write(
            directory: options.checkpointDir, state: state, parameters: model.parameters,
            optimizer: optimizer.forEachGatheredMoment, extra: extraState(), keep: spec.keepCheckpoints)
    }
}
