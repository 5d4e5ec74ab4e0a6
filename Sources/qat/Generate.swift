import ArgumentParser
import Foundation
import QATCore
import QATData
import QATExport
import QATIO
import QATModels
import QATQuant
import QATTrain

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text with a KV cache from a model, an export (either format) or a recipe's fake-quant model.",
        discussion: """
            --model reads a Hugging Face model, a ModelOpt or a compressed-tensors export (the \
            export's NVFP4 weights decoded, its NVFP4 activations through their quantizers and its \
            FP8 KV cache stored as the deployed kernel does: e4m3(x / k_scale)); --recipe builds the \
            recipe's fake-quant model (PTQ of its model, or a training --checkpoint). Tokens stream \
            to stdout as they are decoded. Greedy by default (--temperature 0), as transformers' \
            generate(do_sample=False); --temperature, --top-k and --top-p sample, seeded by --seed.

            Examples:
              qat generate --model export/fortune-lm-nvfp4 --prompt "The meaning of life"
              qat generate --model models/fortune-lm --compare export/fortune-lm-nvfp4 --prompt "Q: Why" --max-new-tokens 40
              qat generate --model models/fortune-lm --benchmark
            """)

    @Option(help: "Model directory: HF model, ModelOpt or compressed-tensors export.")
    var model: String?

    @Option(help: "Recipe whose fake-quant model generates (PTQ of the recipe's model, or --checkpoint).")
    var recipe: String?

    @Option(name: .customLong("set"), help: "Override a recipe key (repeatable).")
    var overrides: [String] = []

    @Option(help: "Training checkpoint for --recipe.")
    var checkpoint: String?

    @Option(help: "Prompt text.")
    var prompt: String = ""

    @Flag(help: "Wrap the prompt as a user message in the chat template of tokenizer_config.json.")
    var chat = false

    @Option(name: .customLong("max-new-tokens"), help: "Tokens to generate at most.")
    var maxNewTokens: Int = 64

    @Option(help: "0: greedy; > 0: sample from softmax(logits / temperature).")
    var temperature: Float = 0

    @Option(name: .customLong("top-p"), help: "Nucleus sampling: keep the most likely tokens whose mass reaches top-p.")
    var topP: Float?

    @Option(name: .customLong("top-k"), help: "Sample among the top-k tokens only.")
    var topK: Int?

    @Option(help: "Sampling seed.")
    var seed: UInt64 = 0

    @Flag(name: .customLong("ignore-eos"), help: "Keep generating after the end-of-sequence token.")
    var ignoreEOS = false

    @Option(
        help: "Stop when the text contains this string (repeatable; --stop=-- for a string starting with -); the string is not printed.")
    var stop: [String] = []

    @Option(help: "A second model (same tokenizer) to continue the same prompt; both are printed side by side.")
    var compare: String?

    @Flag(help: "Print the prompt and generated token ids as JSON instead of text.")
    var json = false

    @Flag(
        help: ArgumentHelp(
            "Generate to the end of the context (ignoring EOS) and print tokens/s at positions 32 and "
                + "the last, with and without the KV cache."))
    var benchmark = false

    @Option(help: "Worker threads for OpenBLAS and the kernels (default: all cores).")
    var threads: Int?

    func run() throws {
        try QAT.guarded {
            if let t = threads, t > 0 { setenv("QAT_THREADS", String(t), 1); BLAS.setThreads(t) }
            guard (model == nil) != (recipe == nil) else {
                throw QATError("qat generate: give exactly one of --model DIR or --recipe FILE")
            }
            guard maxNewTokens >= 0 else { throw QATError("--max-new-tokens must be ≥ 0") }
            guard temperature >= 0, temperature.isFinite else { throw QATError("--temperature must be ≥ 0") }
            if let p = topP, !(p > 0 && p <= 1) { throw QATError("--top-p must be in (0, 1]") }
            if let k = topK, k < 1 { throw QATError("--top-k must be ≥ 1") }
            let primary = try GenerationModel.load(model: model, recipe: recipe, overrides: overrides, checkpoint: checkpoint)
            let tokenizer = try primary.tokenizer()
            var text = prompt
            if chat { text = try ChatTemplate.load(directory: primary.tokenizerDirectory).render(user: prompt) }
            let ids = tokenizer.encode(benchmark && text.isEmpty ? "The meaning of life is" : text)
            guard !ids.isEmpty else { throw QATError("the prompt is empty: give --prompt TEXT") }
            if benchmark { try runBenchmark(primary, prompt: ids); return }
            let eos = ignoreEOS ? [] : primary.eosTokenIds
            let sampler = Sampler(temperature: temperature, topK: topK, topP: topP, seed: seed)
            if let other = compare {
                let second = try GenerationModel.load(model: other, recipe: nil, overrides: [], checkpoint: nil)
                let a = try primary.generate(
                    prompt: ids, maxNewTokens: maxNewTokens, sampler: sampler, eos: eos, stop: stop,
                    tokenizer: tokenizer)
                let b = try second.generate(
                    prompt: ids, maxNewTokens: maxNewTokens, sampler: sampler,
                    eos: ignoreEOS ? [] : second.eosTokenIds, stop: stop, tokenizer: tokenizer)
                if json {
                    print(generationJSON(ids, [(primary.description, a), (second.description, b)]))
                } else {
                    print(SideBySide.render(prompt: text, left: (primary.description, a.text), right: (second.description, b.text)))
                }
                return
            }
            let streaming = !json
            if streaming { FileHandle.standardOutput.write(Data(text.utf8)) }
            let r = try primary.generate(
                prompt: ids, maxNewTokens: maxNewTokens, sampler: sampler, eos: eos, stop: stop,
                tokenizer: tokenizer
            ) { piece in
                if streaming { FileHandle.standardOutput.write(Data(piece.utf8)) }
            }
            if json { print(generationJSON(ids, [(primary.description, r)])) } else { print("") }
            if !json {
                FileHandle.standardError.write(
                    Data(
                        String(
                            format: "[%d prompt tokens, %d generated, %.1f tokens/s%@]\n", ids.count, r.tokens.count,
                            r.tokensPerSecond, r.stopReason.isEmpty ? "" : ", " + r.stopReason
                        ).utf8))
            }
        }
    }

    func generationJSON(_ prompt: [Int32], _ results: [(String, GenerationResult)]) -> String {
        var o = JSONObject()
        o.set("prompt_ids", .array(prompt.map { .int(Int64($0)) }))
        o.set(
            "models",
            .array(
                results.map { name, r in
                    .object(
                        JSONObject([
                            ("model", .string(name)), ("ids", .array(r.tokens.map { .int(Int64($0)) })), ("text", .string(r.text)),
                            ("stop_reason", .string(r.stopReason)), ("tokens_per_second", .double(r.tokensPerSecond)),
                        ]))
                }))
        return JSONValue.object(o).serialized(indent: nil)
    }

    /// Tokens/s of single-token steps around position 32 and at the end of the context, with
    /// the KV cache and, for comparison, re-running the whole sequence per token.
    func runBenchmark(_ m: GenerationModel, prompt: [Int32]) throws {
        let decoder = try KVCacheDecoder(model: m.model)
        decoder.kvScales = m.kvScales
        let cap = decoder.capacity
        guard cap > 40 else { throw QATError("--benchmark needs a context of more than 40 positions (this model has \(cap))") }
        var sampler = Sampler()
        var next = sampler.next(try decoder.step(Array(prompt.prefix(8))))
        var stepSeconds = [Double](repeating: 0, count: cap + 1)
        while decoder.length < cap {
            let t0 = DispatchTime.now().uptimeNanoseconds
            let logits = try decoder.step([next])
            stepSeconds[decoder.length] = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            next = sampler.next(logits)
        }
        func rate(around p: Int) -> Double {
            let lo = max(9, p - 7), hi = min(cap, p)
            let s = stepSeconds[lo...hi].reduce(0, +)
            return Double(hi - lo + 1) / s
        }
        // Without a cache, each token re-runs the whole sequence so far.
        func fullForwardRate(at p: Int) throws -> Double {
            let tokens = [Int32](repeating: prompt[0], count: p)
            let t0 = DispatchTime.now().uptimeNanoseconds
            let reps = 3
            for _ in 0..<reps {
                let hidden = try m.model.forward(tokens: tokens, batch: 1, seqLen: p, saveForBackward: false)
                let logits = Tensor(shape: [m.model.config.vocabSize], zeroed: false)
                try m.model.lmHead.forward(hidden + (p - 1) * m.model.config.hiddenSize, out: logits.data, n: 1)
            }
            return Double(reps) / (Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
        }
        let r32 = rate(around: 32), rEnd = rate(around: cap)
        let f32 = try fullForwardRate(at: 32), fEnd = try fullForwardRate(at: cap)
        if json {
            printJSON([
                ("model", m.description), ("context", cap), ("kv_cache_tokens_per_second_at_32", r32),
                ("kv_cache_tokens_per_second_at_\(cap)", rEnd), ("no_cache_tokens_per_second_at_32", f32),
                ("no_cache_tokens_per_second_at_\(cap)", fEnd),
            ])
        } else {
            print("\(m.description): one token at a time, batch 1, threads \(Parallel.threads)")
            print(String(format: "  position %4d: %8.1f tokens/s with the KV cache, %7.1f tokens/s re-running the sequence", 32, r32, f32))
            print(
                String(format: "  position %4d: %8.1f tokens/s with the KV cache, %7.1f tokens/s re-running the sequence", cap, rEnd, fEnd))
            print(
                String(
                    format: "  KV cache: %.2f× slower at %d than at 32 (attention grows with the position, the "
                        + "matmuls do not); without it %.2f×",
                    r32 / rEnd, cap, f32 / fEnd))
        }
    }
}

/// What one generation produced.
struct GenerationResult {
    var tokens: [Int32]
    var text: String
    var stopReason: String
    var tokensPerSecond: Double
}

/// A model ready to generate: weights, quantizers, the deployed KV scales, tokenizer files.
struct GenerationModel {
    var model: CausalLM
    var kvScales: [Int: (k: Float?, v: Float?)]
    var description: String
    var tokenizerDirectory: String
    var eosTokenIds: Set<Int32>

    static func load(model: String?, recipe: String?, overrides: [String], checkpoint: String?) throws -> GenerationModel {
        if let dir = model {
            if try ExportedModel.isQuantizedExport(directory: dir) {
                let e = try ExportedModel.load(directory: dir)
                var scales: [Int: (k: Float?, v: Float?)] = [:]
                for layer in e.model.layers {
                    let k = e.quantizers.byName["\(layer.prefix).self_attn.k_bmm_quantizer"].flatMap { $0.enabled ? $0.amax : nil }
                    let v = e.quantizers.byName["\(layer.prefix).self_attn.v_bmm_quantizer"].flatMap { $0.enabled ? $0.amax : nil }
                    if k != nil || v != nil { scales[layer.index] = (k.map { $0 / FP8.maxE4M3 }, v.map { $0 / FP8.maxE4M3 }) }
                }
                let format = try ExportFormat.of(directory: dir)
                return GenerationModel(
                    model: e.model, kvScales: scales, description: "\(dir) (\(format.rawValue) \(e.quantAlgo ?? "?"))",
                    tokenizerDirectory: dir, eosTokenIds: try eosIds(dir))
            }
            return GenerationModel(
                model: try CausalLM(directory: dir), kvScales: [:], description: dir, tokenizerDirectory: dir,
                eosTokenIds: try eosIds(dir))
        }
        let r = try Recipe.load(path: recipe!, overrides: overrides)
        let source = try QuantizedSource.build(modelDirectory: r.model, recipe: r, checkpoint: checkpoint, quiet: true)
        return GenerationModel(
            model: source.model, kvScales: [:], description: "fake-quant \(source.description)",
            tokenizerDirectory: r.model, eosTokenIds: try eosIds(r.model))
    }

    /// generation_config.json's eos_token_id (an id or a list), else config.json's, else the
    /// tokenizer's.
    static func eosIds(_ dir: String) throws -> Set<Int32> {
        for file in ["generation_config.json", "config.json"] {
            let p = "\(dir)/\(file)"
            guard FileManager.default.fileExists(atPath: p) else { continue }
            let o = try JSONValue.parseObject(file: p)
            if let v = o.optionalValue("eos_token_id") {
                if let i = v.intValue { return [Int32(i)] }
                if let a = v.arrayValue { return Set(a.compactMap { $0.intValue.map { Int32($0) } }) }
            }
        }
        if let t = try? Tokenizer(path: "\(dir)/tokenizer.json"), let e = t.eosTokenId { return [e] }
        return []
    }

    func tokenizer() throws -> Tokenizer {
        let p = "\(tokenizerDirectory)/tokenizer.json"
        guard FileManager.default.fileExists(atPath: p) else {
            throw QATError("\(tokenizerDirectory) has no tokenizer.json: qat generate needs the model's tokenizer")
        }
        return try Tokenizer(path: p)
    }

    /// Prefill the prompt, then one token at a time until max tokens, EOS or a stop string.
    func generate(
        prompt: [Int32], maxNewTokens: Int, sampler s: Sampler, eos: Set<Int32>, stop: [String], tokenizer: Tokenizer,
        onText: (String) -> Void = { _ in }
    ) throws -> GenerationResult {
        var sampler = s
        let decoder = try KVCacheDecoder(model: model, capacity: min(model.config.maxPositionEmbeddings, prompt.count + maxNewTokens))
        decoder.kvScales = kvScales
        guard prompt.count <= decoder.capacity else {
            throw QATError("the prompt has \(prompt.count) tokens; the model's context is \(model.config.maxPositionEmbeddings)")
        }
        var out: [Int32] = []
        var stream = TextStream(stops: stop)
        var reason = ""
        let t0 = DispatchTime.now().uptimeNanoseconds
        if maxNewTokens > 0 {
            var logits = try decoder.step(prompt)
            while true {
                let next = sampler.next(logits)
                if eos.contains(next) { reason = "end of sequence"; break }
                out.append(next)
                if let piece = stream.push(tokenizer.tokenBytes(next)) { onText(piece) }
                if stream.stopped { reason = "stop string"; break }
                if out.count >= maxNewTokens { reason = "max new tokens"; break }
                if decoder.length >= decoder.capacity { reason = "context full"; break }
                logits = try decoder.step([next])
            }
        }
        if let rest = stream.finish() { onText(rest) }
        let secs = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        return GenerationResult(tokens: out, text: stream.text, stopReason: reason, tokensPerSecond: Double(out.count) / max(secs, 1e-9))
    }
}

extension Tokenizer {
    /// The UTF-8 bytes a token stands for (byte-level BPE; an unknown id gives U+FFFD).
    func tokenBytes(_ id: Int32) -> [UInt8] {
        guard let t = token(id) else { return [0xEF, 0xBF, 0xBD] }
        return ByteLevel.decode(t) ?? Array(t.utf8)
    }
}

/// Two continuations in two columns, wrapped at 60 characters each.
enum SideBySide {
    static func render(prompt: String, left: (String, String), right: (String, String), width: Int = 60) -> String {
        func lines(_ s: String) -> [String] {
            var out: [String] = []
            for para in s.split(separator: "\n", omittingEmptySubsequences: false) {
                var line = ""
                for ch in para {
                    let c = ch == "\t" ? "    " : String(ch)
                    if line.count + c.count > width { out.append(line); line = "" }
                    line += c
                }
                out.append(line)
            }
            return out
        }
        func pad(_ s: String) -> String { s.count >= width ? s : s + String(repeating: " ", count: width - s.count) }
        let a = lines(left.1), b = lines(right.1)
        var out = "prompt: \(prompt.replacingOccurrences(of: "\n", with: "⏎"))\n"
        out += pad(String(left.0.suffix(width))) + " │ " + String(right.0.suffix(width)) + "\n"
        out += String(repeating: "─", count: width) + "─┼─" + String(repeating: "─", count: width) + "\n"
        for i in 0..<max(a.count, b.count) {
            out += pad(i < a.count ? a[i] : "") + " │ " + (i < b.count ? b[i] : "") + "\n"
        }
        return out
    }
}
