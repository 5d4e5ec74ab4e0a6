import Foundation
import QATCore
import QATModels

/// Which decoder layers each pipeline stage holds: `stages` contiguous ranges, as even as
/// possible (the first L mod S stages take one layer more). Stage s runs on rank s of its
/// pipeline; the first stage also holds the embedding, the last the final norm, lm_head and
/// the loss.
public struct PipelineLayout: Sendable, Equatable {
    public let stages: Int
    public let stage: Int
    public let ranges: [Range<Int>]

    public init(layers: Int, stages: Int, stage: Int) throws {
        guard stages >= 1 else { throw QATError("train.pipeline_stages must be at least 1 (got \(stages))") }
        guard layers >= stages else {
            throw QATError("pipeline: \(stages) stages need at least \(stages) decoder layers; the model has \(layers)")
        }
        guard (0..<stages).contains(stage) else { throw QATError("pipeline: stage \(stage) of \(stages)") }
        var ranges: [Range<Int>] = []
        var lo = 0
        for s in 0..<stages {
            let n = layers / stages + (s < layers % stages ? 1 : 0)
            ranges.append(lo..<(lo + n))
            lo += n
        }
        self.stages = stages; self.stage = stage; self.ranges = ranges
    }

    public var range: Range<Int> { ranges[stage] }
    public var isFirst: Bool { stage == 0 }
    public var isLast: Bool { stage == stages - 1 }
}

/// Pipeline-parallel execution over MPI (NeMo AutoModel's pipeline-parallel distillation,
/// with its reviewed flaws fixed), optionally several pipelines side by side, data parallel:
///
/// - Student and teacher are split into the same stages (`PipelineLayout`); activations go
///   forward and their gradients back between neighbouring ranks (MPI point-to-point).
/// - A step's micro-batches are the single-process run's gradient-accumulation micro-batches.
///   The teacher runs first over **every** micro-batch and the last stage keeps each one's
///   final hidden states (the fused KD loss inputs): no micro-batch is distilled against
///   another's teacher output.
/// - Schedule: GPipe (all forwards, then the backwards in micro-batch order). The last stage
///   runs each micro-batch's forward, loss and backward at once; earlier stages keep only each
///   micro-batch's input and recompute its forward before its backward (activation
///   rematerialisation), so they hold one set of activations whatever the micro-batch count.
///   Backwards run in micro-batch order, so every gradient accumulates in the single-process
///   order and the run is bit-identical to one process (untied embeddings; a tied embedding
///   sums its two stages' halves once, a round-off difference).
/// - Loss sums live on the last stage and are all-reduced (the other ranks add zeros, exact);
///   the clipping norm is summed per parameter in the single-process order (exact).
public final class PipelineEngine {
    /// The ranks of this pipeline, one per stage (point-to-point traffic, loss sums, norms).
    public let comm: Communicator
    /// The ranks holding this stage in the other pipelines (data parallelism across
    /// pipelines: gradient all-reduce, batch shares); size 1 with a single pipeline.
    public let dataParallel: Communicator
    public let world: Communicator
    /// The pipeline's first and last stage (a tied embedding's two halves meet there).
    private let ends: Communicator
    public let layout: PipelineLayout
    /// Teacher final hidden states of every micro-batch of the current step (last stage).
    private var teacherStash: [Tensor] = []
    /// Each micro-batch's input received from the previous stage (kept for recomputation).
    private var inputs: [Tensor] = []
    /// Buffers of in-flight sends (activations forward, gradients back), one per micro-batch.
    private var activationSends: [Tensor] = []
    private var gradientSends: [Tensor] = []
    private var scratch: [Tensor] = []

    enum Tag {
        static let activation = 101, gradient = 102, forward = 103, gather = 104
    }

    /// Splits `world` into pipelines of `stages` consecutive ranks (rank r runs stage
    /// r mod S of pipeline ⌊r / S⌋); pipelines side by side are data parallel.
    public init(world: Communicator, stages: Int, layers: Int) throws {
        layout = try PipelineLayout(layers: layers, stages: stages, stage: world.rank % max(stages, 1))
        guard world.size % stages == 0 else {
            throw QATError(
                "train.pipeline_stages is \(stages), but the run has \(world.size) rank(s): start it with "
                    + "mpirun -np \(stages) (or a multiple of \(stages), for pipelines side by side)")
        }
        self.world = world
        comm = try world.split(color: world.rank / stages, key: world.rank % stages)
        dataParallel = try world.split(color: world.rank % stages, key: world.rank / stages)
        ends = try comm.split(color: layout.isFirst || layout.isLast ? 0 : 1, key: layout.stage)
    }

    private var prev: Int { layout.stage - 1 }
    private var next: Int { layout.stage + 1 }

    private func buffer(_ pool: inout [Tensor], _ i: Int, count: Int) -> Tensor {
        while pool.count <= i { pool.append(Tensor(shape: [0])) }
        if pool[i].count != count { pool[i] = Tensor(shape: [count], zeroed: false) }
        return pool[i]
    }

    // MARK: - Forward only (evaluation, calibration, the teacher)

    /// Runs `model` (this rank's stage) forward-only on one batch, receiving the previous
    /// stage's output and sending this one's on. Returns the final hidden states [B·T, C] on
    /// the last stage, nil elsewhere. Every rank must call it for the same batch.
    public func forward(_ model: CausalLM, tokens: [Int32], batch: Int, seqLen: Int) throws -> UnsafeMutablePointer<Float>? {
        let n = batch * seqLen * model.config.hiddenSize
        var input: UnsafePointer<Float>? = nil
        if !layout.isFirst {
            let b = buffer(&scratch, 0, count: n)
            try comm.recv(b.data, count: n, from: prev, tag: Tag.forward)
            input = UnsafePointer(b.data)
        }
        let out = try model.forward(tokens: tokens, input: input, batch: batch, seqLen: seqLen, saveForBackward: false)
        guard layout.isLast else {
            try comm.send(out, count: n, to: next, tag: Tag.forward)
            return nil
        }
        return out
    }

    /// `forward` as the hook `Evaluation.evaluate` and `Calibration.run` take (tokens, batch).
    public func forwardHook(_ model: CausalLM, seqLen: Int) -> (_ tokens: [Int32], _ batch: Int) throws -> UnsafeMutablePointer<Float>? {
        { [unowned self] tokens, b in try self.forward(model, tokens: tokens, batch: b, seqLen: seqLen) }
    }

    // MARK: - Training step

    /// Forward and backward of one optimizer step's micro-batches (see the type's comment for
    /// the schedule). Gradients accumulate into this stage's parameters; the returned loss
    /// sums are those of the whole step on every rank.
    public func forwardBackward(
        student: CausalLM, loss: TrainingLoss, batches: [MicroBatch], gradScale: Float,
        dHidden: Tensor
    ) throws -> LossParts {
        let C = student.config.hiddenSize
        let distill = loss as? DistillationLoss
        // 1. The teacher over every micro-batch; the last stage keeps each final hidden state.
        if let d = distill {
            for (i, mb) in batches.enumerated() {
                if let h = try forward(d.teacher, tokens: mb.tokens, batch: mb.batch, seqLen: mb.seqLen) {
                    let n = mb.rows * d.teacher.config.hiddenSize
                    buffer(&teacherStash, i, count: n).data.update(from: h, count: n)
                }
            }
        }
        var pending: [SendRequest] = []
        defer { for r in pending { try? comm.wait(r) } }
        var parts = LossParts()
        func receiveInput(_ i: Int, _ n: Int) throws -> UnsafePointer<Float>? {
            guard !layout.isFirst else { return nil }
            let b = buffer(&inputs, i, count: n)
            try comm.recv(b.data, count: n, from: prev, tag: Tag.activation)
            return UnsafePointer(b.data)
        }
        func sendBack(_ dIn: UnsafePointer<Float>?, _ i: Int, _ n: Int) throws {
            guard let dIn else { return }
            let b = buffer(&gradientSends, i, count: n)
            b.data.update(from: dIn, count: n)
            pending.append(try comm.isend(b.data, count: n, to: prev, tag: Tag.gradient))
        }
        if layout.isLast {
            // 2a. Last stage: forward, loss and backward of each micro-batch in turn.
            for (i, mb) in batches.enumerated() {
                let n = mb.rows * C
                let input = try receiveInput(i, n)
                let hidden = try student.forward(tokens: mb.tokens, input: input, batch: mb.batch, seqLen: mb.seqLen, saveForBackward: true)
                if let d = distill {
                    parts += try d.fused(
                        student: student.lmHead, hidden: hidden, teacherHidden: UnsafePointer(teacherStash[i].data),
                        targets: mb.targets, n: mb.rows, gradScale: gradScale, dHidden: dHidden.data)
                } else {
                    parts += try loss.run(model: student, hidden: hidden, batch: mb, gradScale: gradScale, dHidden: dHidden.data)
                }
                try sendBack(try student.backward(dHidden: dHidden.data), i, n)
            }
        } else {
            // 2b. Earlier stages: every forward (outputs sent on as they are ready), then each
            // micro-batch's backward in order, its forward recomputed first.
            var inputsUsed: [UnsafePointer<Float>?] = []
            for (i, mb) in batches.enumerated() {
                let n = mb.rows * C
                let input = try receiveInput(i, n)
                inputsUsed.append(input)
                let out = try student.forward(tokens: mb.tokens, input: input, batch: mb.batch, seqLen: mb.seqLen, saveForBackward: true)
                let b = buffer(&activationSends, i, count: n)
                b.data.update(from: out, count: n)
                pending.append(try comm.isend(b.data, count: n, to: next, tag: Tag.activation))
            }
            for (i, mb) in batches.enumerated() {
                let n = mb.rows * C
                if batches.count > 1 {
                    _ = try student.forward(
                        tokens: mb.tokens, input: inputsUsed[i], batch: mb.batch, seqLen: mb.seqLen, saveForBackward: true)
                }
                let g = buffer(&scratch, 0, count: n)
                try comm.recv(g.data, count: n, from: next, tag: Tag.gradient)
                try sendBack(try student.backward(dHidden: g.data), i, n)
            }
        }
        for r in pending { try comm.wait(r) }
        pending.removeAll()
        // Loss sums of the step, on every rank (only the last stage's are non-zero).
        var sums = [parts.total, parts.ce, parts.kd, Double(parts.valid)]
        try comm.allReduceSum(&sums)
        parts = LossParts(total: sums[0], ce: sums[1], kd: sums[2], valid: Int(sums[3]))
        try reduceTiedEmbedding(student)
        return parts
    }

    /// A tied embedding lives on the first and the last stage: its gradient is the sum of both
    /// halves, all-reduced between those two ranks alone.
    private func reduceTiedEmbedding(_ model: CausalLM) throws {
        guard model.config.tieWordEmbeddings, layout.stages > 1, layout.isFirst || layout.isLast else { return }
        guard let g = model.embed.grad else { return }  // frozen embedding: frozen on both ends
        try ends.allReduceSum(g.data, count: g.count)
    }

    // MARK: - Gradient norm and faults across stages

    /// The global gradient L2 norm over every stage's trainable parameters, summed per
    /// parameter in `order` (the single-process optimizer's slot order), so it is the
    /// one-process figure exactly. A tied embedding counts once (on the first stage).
    public func globalGradNorm(optimizer: AdamW, order: [String]) throws -> Double {
        let index = Dictionary(uniqueKeysWithValues: order.enumerated().map { ($1, $0) })
        var sums = [Double](repeating: 0, count: order.count)
        let counted = optimizer.slots.filter { !($0.name.hasPrefix("model.embed_tokens") && !layout.isFirst) }
        for (s, v) in zip(counted, GradientClipping.sumsOfSquares(counted.map(\.grad))) {
            guard let i = index[s.name] else { throw QATError("pipeline: parameter \(s.name) is not in the model's parameter order") }
            sums[i] = v
        }
        try comm.allReduceSum(&sums)
        var total = 0.0
        for v in sums { total += v }
        return total.squareRoot()
    }

    /// The first non-finite gradient on any stage ("… on stage k"), or nil on every rank.
    public func firstNonFiniteGradient(optimizer: AdamW) throws -> String? {
        let local = optimizer.firstNonFiniteGradient()
        var flags = [Double](repeating: 0, count: layout.stages)
        if local != nil { flags[layout.stage] = 1 }
        try comm.allReduceSum(&flags)
        guard let s = flags.firstIndex(where: { $0 != 0 }) else { return nil }
        return s == layout.stage ? local! : "a parameter of pipeline stage \(s)"
    }
}

// MARK: - Gathering stage state on rank 0 (checkpoints, export)

extension PipelineEngine {
    /// Collects named tensors from every stage on rank 0, in stage order, first occurrence
    /// of a name kept (a tied embedding is on two stages); nil on the other ranks, which send.
    public func gather(_ items: [(name: String, tensor: Tensor)]) throws -> [(name: String, tensor: Tensor)]? {
        guard layout.stages > 1 else { return items }
        guard comm.isRoot else {
            try comm.sendNamed(items, to: 0, tag: Tag.gather)
            return nil
        }
        var out = items
        var seen = Set(items.map(\.name))
        for s in 1..<layout.stages {
            for item in try comm.recvNamed(from: s, tag: Tag.gather) where seen.insert(item.name).inserted { out.append(item) }
        }
        return out
    }
}

extension Communicator {
    /// Sends (name, tensor) pairs: a header of integers (each as two exact floats, 24 bits
    /// apiece) with the names' UTF-8 bytes and the shapes, then every tensor's data.
    public func sendNamed(_ items: [(name: String, tensor: Tensor)], to peer: Int, tag: Int) throws {
        var header: [Float] = []
        func put(_ v: Int) { header.append(Float(v >> 24)); header.append(Float(v & 0xFF_FFFF)) }
        put(items.count)
        for (name, t) in items {
            let bytes = Array(name.utf8)
            put(bytes.count)
            for b in bytes { put(Int(b)) }
            put(t.shape.count)
            for d in t.shape { put(d) }
        }
        let length: [Float] = [Float(header.count >> 24), Float(header.count & 0xFF_FFFF)]
        try length.withUnsafeBufferPointer { try send($0.baseAddress!, count: 2, to: peer, tag: tag) }
        try header.withUnsafeBufferPointer { try send($0.baseAddress!, count: $0.count, to: peer, tag: tag) }
        for (_, t) in items where t.count > 0 { try send(t.data, count: t.count, to: peer, tag: tag) }
    }

    public func recvNamed(from peer: Int, tag: Int) throws -> [(name: String, tensor: Tensor)] {
        var length = [Float](repeating: 0, count: 2)
        try length.withUnsafeMutableBufferPointer { try recv($0.baseAddress!, count: 2, from: peer, tag: tag) }
        let n = Int(length[0]) << 24 | Int(length[1])
        var header = [Float](repeating: 0, count: n)
        try header.withUnsafeMutableBufferPointer { try recv($0.baseAddress!, count: n, from: peer, tag: tag) }
        var at = 0
        func get() throws -> Int {
            guard at + 2 <= header.count else { throw QATError("rank \(peer) sent a truncated tensor header") }
            defer { at += 2 }
            return Int(header[at]) << 24 | Int(header[at + 1])
        }
        var out: [(name: String, tensor: Tensor)] = []
        for _ in 0..<(try get()) {
            let len = try get()
            var bytes: [UInt8] = []
            for _ in 0..<len { bytes.append(UInt8(truncatingIfNeeded: try get())) }
            var shape: [Int] = []
            for _ in 0..<(try get()) { shape.append(try get()) }
            out.append((String(decoding: bytes, as: UTF8.self), Tensor(shape: shape, zeroed: false)))
        }
        for (_, t) in out where t.count > 0 { try recv(t.data, count: t.count, from: peer, tag: tag) }
        return out
    }
}
