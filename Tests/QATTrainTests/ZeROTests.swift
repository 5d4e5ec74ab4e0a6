import QATCore
import QATTrain
import XCTest

/// ZeRO-1 bookkeeping without MPI: the owner assignment, and what a rank of a (pretend)
/// two-rank group allocates, steps and loads.
final class ZeROTests: XCTestCase {
    /// A rank of a group of `size` whose collectives do nothing (the broadcast leaves the
    /// buffer as it is): enough to check the local half of sharding.
    final class LocalComm: Communicator {
        let rank: Int, size: Int
        init(rank: Int, size: Int) { self.rank = rank; self.size = size }
        func allReduceSum(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
        func allReduceSum(_ buf: UnsafeMutablePointer<Double>, count: Int) throws {}
        func allReduceMax(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
        func send(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws {}
        func recv(_ buf: UnsafeMutablePointer<Float>, count: Int, from peer: Int, tag: Int) throws {}
        private(set) var broadcasts: [(count: Int, root: Int)] = []
        func broadcast(_ buf: UnsafeMutablePointer<Float>, count: Int, root: Int) throws { broadcasts.append((count, root)) }
        func isend(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws -> SendRequest { throw QATError("no peers") }
        func wait(_ request: SendRequest) throws {}
        var traffic: CommTraffic { CommTraffic() }
        func barrier() throws {}
        func split(color: Int, key: Int) throws -> Communicator { self }
        func finalize() {}
        func abort(code: Int32) -> Never { fatalError("abort \(code)") }
    }

    /// Largest first, each to the least-loaded rank (lowest on ties), equal sizes in slot order:
    /// PyTorch ZeroRedundancyOptimizer's greedy partition.
    func testOwnerAssignmentIsGreedyBySizeAndDeterministic() {
        // sorted: #0 (10) → r0; #2 (7) → r1; #4 (7) → r1 (7 < 10); #1 (3) → r0 (10 < 14); #3 (2) → r0 (13 < 14)
        XCTAssertEqual(ZeROPartition.assignOwners(counts: [10, 3, 7, 2, 7], ranks: 2), [0, 0, 1, 0, 1])
        XCTAssertEqual(ZeROPartition.assignOwners(counts: [5, 5, 5, 5], ranks: 3), [0, 1, 2, 0])
        XCTAssertEqual(ZeROPartition.assignOwners(counts: [4, 1], ranks: 1), [0, 0])
        XCTAssertEqual(ZeROPartition.assignOwners(counts: [1, 2], ranks: 4), [1, 0])  // more ranks than tensors: some own nothing
        // A transformer-like mix: the loads differ by at most the largest tensor.
        var counts: [Int] = [4096 * 512]
        for _ in 0..<8 { counts += [512 * 512, 512 * 128, 512 * 128, 512 * 512, 512 * 1536, 512 * 1536, 1536 * 512, 512, 512] }
        counts.append(512)
        for ranks in [2, 3, 4, 8] {
            let owners = ZeROPartition.assignOwners(counts: counts, ranks: ranks)
            XCTAssertEqual(owners, Self.torchPartition(counts: counts, ranks: ranks), "\(ranks) ranks")
            var load = [Int](repeating: 0, count: ranks)
            for (i, r) in owners.enumerated() { load[r] += counts[i] }
            XCTAssertEqual(load.reduce(0, +), counts.reduce(0, +))
            XCTAssertLessThanOrEqual(load.max()! - load.min()!, counts.max()!)
        }
    }

    /// PyTorch ZeroRedundancyOptimizer._partition_parameters, written out independently:
    /// parameters by decreasing size (stable), each to the first rank of least total size.
    static func torchPartition(counts: [Int], ranks: Int) -> [Int] {
        var sizes = [Int](repeating: 0, count: ranks)
        var owners = [Int](repeating: -1, count: counts.count)
        let bySize = counts.enumerated().map { (index: $0.offset, size: $0.element) }
        var sorted: [(index: Int, size: Int)] = []
        for p in bySize {  // insertion sort: stable by construction
            let at = sorted.firstIndex { $0.size < p.size } ?? sorted.count
            sorted.insert(p, at: at)
        }
        for p in sorted {
            let rank = sizes.firstIndex(of: sizes.min()!)!
            owners[p.index] = rank
            sizes[rank] += p.size
        }
        return owners
    }

    func makeParameters() -> [(name: String, value: Tensor, grad: Tensor?)] {
        let sizes = [37, 5, 64, 9, 64, 3]
        return sizes.enumerated().map { i, n in
            let v = Tensor(shape: [n], values: (0..<n).map { Float(sin(Double($0 * 7 + i))) })
            let g = Tensor(shape: [n], values: (0..<n).map { Float(cos(Double($0 * 3 + i * 11))) * 0.1 })
            return ("model.layers.\(i).w", v, g)
        }
    }

    /// Each rank allocates and steps only its own slots; an owned slot's update is bit for bit
    /// the unsharded one; the buckets broadcast every element once; a load reads only owned
    /// tensors.
    func testShardedRankStepsOnlyItsSlotsBitIdentically() throws {
        let config = OptimizerConfig(defaults: AdamWHyperparameters(lr: 1e-2, weightDecay: 0.1))
        let full = try AdamW(parameters: makeParameters(), config: config)
        let plan = try ParamGroupPlan.build(names: makeParameters().map(\.name), config: config)
        for rank in 0..<2 {
            let comm = LocalComm(rank: rank, size: 2)
            let params = makeParameters()
            let before = params.map { $0.value.array }
            let z = try AdamW(parameters: params, plan: plan, shardOver: comm)
            let p = try XCTUnwrap(z.partition)
            // sizes [37, 5, 64, 9, 64, 3]: #2 → r0, #4 → r1, #0 → r0 (tie: lowest rank), #3, #1, #5 → r1
            XCTAssertEqual(p.owners, [0, 1, 0, 1, 1, 1])
            for (i, s) in z.slots.enumerated() {
                XCTAssertEqual(s.m.count, p.owns(i) ? s.value.count : 0)
                XCTAssertEqual(s.v.count, p.owns(i) ? s.value.count : 0)
            }
            XCTAssertEqual(z.stateElementCount, p.ownedElements[rank])
            XCTAssertEqual(p.ownedElements.reduce(0, +), z.slots.reduce(0) { $0 + $1.value.count })
            if rank == 0 { full.step(lrFactor: 0.5); full.step(lrFactor: 0.25) }
            z.step(lrFactor: 0.5); z.step(lrFactor: 0.25)
            for (i, s) in z.slots.enumerated() {
                // (A slot of the other rank would arrive by broadcast, a no-op here.)
                guard p.owns(i) else { continue }
                XCTAssertNotEqual(s.value.array, before[i])
                XCTAssertEqual(s.value.array, full.slots[i].value.array, "slot \(i)")
                XCTAssertEqual(s.m.array, full.slots[i].m.array); XCTAssertEqual(s.v.array, full.slots[i].v.array)
            }
            // Every element is broadcast once per step, from its owner.
            XCTAssertEqual(comm.broadcasts.reduce(0) { $0 + $1.count }, 2 * z.slots.reduce(0) { $0 + $1.value.count })
            // Restore: only owned tensors are asked for and needed.
            let names = full.stateTensors().map(\.name)
            let wanted = names.filter(z.ownsStateTensor)
            XCTAssertEqual(wanted.count, 2 * p.owners.filter { $0 == rank }.count)
            let saved = Dictionary(
                uniqueKeysWithValues: full.stateTensors().filter { wanted.contains($0.name) }.map { ($0.name, $0.tensor) })
            let fresh = try AdamW(parameters: makeParameters(), plan: plan, shardOver: LocalComm(rank: rank, size: 2))
            try fresh.loadState(tensors: saved, metadata: full.stateMetadata())
            XCTAssertEqual(fresh.stepCount, 2)
            for (i, s) in fresh.slots.enumerated() where p.owns(i) { XCTAssertEqual(s.v.array, full.slots[i].v.array) }
        }
    }

    func testRecipeKey() throws {
        XCTAssertFalse(try Recipe.parse("train: {}", source: "r").train.shardOptimizerState)
        let r = try Recipe.parse("train:\n  shard_optimizer_state: true\n", source: "r")
        XCTAssertTrue(r.train.shardOptimizerState)
        XCTAssertTrue(try Recipe.parse(r.yaml, source: "rendered").train.shardOptimizerState)
        XCTAssertThrowsError(try Recipe.parse("train:\n  shard_optimizer_state: 3\n", source: "r")) { e in
            XCTAssertTrue("\(e)".contains("shard_optimizer_state"), "\(e)")
        }
    }
}
