import ArgumentParser
import Foundation
import QATCUDA
import QATCore
import QATData
import QATModels
import QATTrain

struct TeacherLogprobs: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "teacher-logprobs",
        abstract: "Write an offline top-k teacher cache (HDF5) for QAD without a live teacher.",
        discussion: """
            The stream is cut into ⌊(N−1)/seq_len⌋ packed sequences exactly like the trainer's data \
            loader (sequence i = tokens [i·seq_len, (i+1)·seq_len)). The teacher runs forward-only; \
            for every position t it stores the top-k token ids of its prediction of token t+1, \
            their log-probabilities at temperature 1 (log_softmax over the full vocabulary, bfloat16) \
            and the log of the teacher's mass outside them (for the default coarse_kl objective). \
            With --sample N it stores N draws from the teacher instead (distinct ids, their counts \
            and log-probabilities: the sampled objective). Ids are uint16 when the vocabulary fits. \
            Point a recipe's train.distill.teacher_logprobs at the file; the run's seq_len and data \
            must match the cache's (checked). With --device cuda the teacher's forward, lm_head and \
            top-k selection run on the GPU (k ≤ 2048; the same cache as the CPU's up to fp32 round-off; \
            --sample stays on the CPU).

            Example: qat teacher-logprobs --model models/fortune-lm --data models/fortune-lm/tokens.h5 --top-k 64 --out teacher-top64.h5
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(
        help: ArgumentHelp(
            "Token data: an HDF5 file with <split>/input_ids, or a .jsonl file of {\"text\": …} lines "
                + "(tokenized with the model's tokenizer.json)."))
    var data: String = "models/fortune-lm/tokens.h5"

    @Option(help: "Split (HDF5 group) to read.")
    var split: String = "train"

    @Option(name: .customLong("seq-len"), help: "Tokens per sequence (must equal the training run's data.seq_len).")
    var seqLen: Int = 256

    @Option(name: .customLong("top-k"), help: "Teacher entries kept per position.")
    var topK: Int = 64

    @Option(help: "Instead of the top-k: this many draws per position from the teacher (for topk_objective: sampled).")
    var sample: Int?

    @Option(help: "Seed of the draws (with --sample).")
    var seed: UInt64 = 0

    @Option(
        name: .customLong("from-cache"),
        help: "Instead of running the teacher: narrow this cache to --top-k entries (or --sample draws) per position.")
    var fromCache: String?

    @Option(name: .customLong("logprob-dtype"), help: "Storage of the log-probabilities: bfloat16 or float16 (8× finer, a larger cache).")
    var logprobDtype: String = "bfloat16"

    @Option(help: "Output HDF5 file.")
    var out: String

    @Option(name: .customLong("batch-size"), help: "Sequences per teacher forward pass.")
    var batchSize: Int = 8

    @Option(name: .customLong("max-sequences"), help: "Write at most this many sequences (the trainer then checks the count).")
    var maxSequences: Int?

    @Flag(help: "Print one JSON object instead of text.")
    var json = false

    func run() throws {
        try QAT.guarded {
            guard ["bfloat16", "float16"].contains(logprobDtype) else {
                throw QATError("--logprob-dtype must be bfloat16 or float16 (got \(logprobDtype))")
            }
            modelOptions.applyThreads()
            let compute = try modelOptions.compute()
            if fromCache == nil, let refusal = Self.deviceRefusal(compute.device, sample: sample, topK: topK) {
                throw QATError.unsupported(refusal)
            }
            if let src = fromCache {  // (no teacher runs: on the host for every --device)
                let start = Date()
                let h = try TopKCache.narrow(from: src, to: out, topK: sample ?? topK)
                report(h, seconds: Date().timeIntervalSince(start))
                return
            }
            let teacher = try CausalLM(directory: modelOptions.model)
            let tokenizer = data.hasSuffix(".jsonl") ? try Tokenizer(path: modelOptions.model) : nil
            let stream = try TokenData.load(path: data, split: split, tokenizer: tokenizer, vocabSize: teacher.config.vocabSize)
            let total = min(max(1, (stream.count - 1) / max(seqLen, 1)), maxSequences ?? Int.max)
            // --device cuda: the teacher's forward, lm_head and top-k selection on the GPU (CUDAModel.topKRows).
            let gpuTeacher =
                try compute.device.isCUDA
                ? CUDAModel(model: teacher, device: try GPU.open(compute.device), precision: compute.precision, inferenceOnly: true) : nil
            let bar = ProgressBar(total: total, label: "teacher", unit: "seq", enabled: !json)
            let start = Date()
            let k = sample ?? topK, L = seqLen
            let h = try TopKCache.write(
                teacher: teacher, stream: stream, seqLen: seqLen, topK: sample ?? topK, to: out, batchSize: batchSize,
                maxSequences: maxSequences, dataPath: data, split: split, modelPath: modelOptions.model,
                sampled: sample != nil, seed: seed,
                logprobStorage: logprobDtype == "float16" ? .float16 : .bfloat16,
                progress: { done, _ in bar.update(done) },
                topKOf: gpuTeacher.map { g in { tokens, b in try g.topKRows(tokens: tokens, batch: b, seqLen: L, topK: k) } })
            bar.finish()
            report(h, seconds: Date().timeIntervalSince(start))
        }
    }

    /// Why `--device` cannot write this cache (nil: it can). The GPU writes top-k caches with
    /// k ≤ `CUDADevice.topKSelectMaxK`; sampled caches are drawn on the CPU.
    static func deviceRefusal(_ device: ComputeDevice, sample: Int?, topK: Int) -> String? {
        guard device.isCUDA else { return nil }
        if sample != nil {
            return "qat teacher-logprobs --sample runs on the CPU in this version (the GPU writes top-k caches): use --device cpu"
        }
        if topK > CUDADevice.topKSelectMaxK {
            return "qat teacher-logprobs --device \(device): --top-k \(topK) is above the GPU's limit of "
                + "\(CUDADevice.topKSelectMaxK): use --device cpu, or a smaller --top-k"
        }
        return nil
    }

    func report(_ h: TopKCache.Header, seconds: Double) {
        let bytes = (try? FileManager.default.attributesOfItem(atPath: out)[.size] as? Int) ?? 0
        let perToken = Double(bytes) / Double(max(1, h.sequences * h.seqLen))
        let what = h.kind == .sampled ? "\(h.topK) draws" : "top-\(h.topK)"
        if json {
            printJSON([
                ("out", out), ("kind", h.kind.rawValue), ("sequences", h.sequences), ("seq_len", h.seqLen), ("top_k", h.topK),
                ("vocab_size", h.vocabSize), ("bytes", bytes), ("bytes_per_token", perToken), ("seconds", seconds),
            ])
        } else {
            print(
                String(
                    format: "wrote %@: %d sequences × %d positions × %@ of %d (%.1f MiB, %.1f bytes/token, %.1f s)",
                    out, h.sequences, h.seqLen, what, h.vocabSize, Double(bytes) / 1_048_576, perToken, seconds))
        }
    }
}
