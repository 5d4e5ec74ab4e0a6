import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant

#if canImport(Glibc)
import Glibc
#endif

/// The version string written as `producer.version`.
public let qatExportVersion = "0.1.0"

/// Options of one export.
public struct ExportOptions {
    /// dtype of every tensor that is not quantized (embeddings, norms, biases, lm_head,
    /// excluded Linears). nil keeps each tensor's dtype from the source checkpoint and leaves
    /// config.json's dtype untouched.
    public var saveDtype: DType?
    /// Shard above this many tensor bytes (transformers' layout, with an index).
    public var maxShardBytes: Int = 5_000_000_000
    /// `producer` of hf_quant_config.json. Neither vLLM (`ModelOptQuantConfigBase.from_config`)
    /// nor TensorRT-LLM reads it, so we name ourselves rather than claim to be ModelOpt.
    public var producerName = "qat"
    public var producerVersion = qatExportVersion
    /// Refuse to start when the target filesystem lacks the space (statvfs).
    public var checkFreeSpace = true
    /// Checkpoint layout: ModelOpt's (default) or compressed-tensors' nvfp4-pack-quantized
    /// (NVFP4 exports only; see `CompressedTensors`).
    public var format: ExportFormat = .modelopt
    /// Called with the temporary directory once every file is written, just before it is
    /// renamed into place; a throw aborts the export and leaves no directory behind. Tests
    /// use it to inject failures.
    public var beforeCommit: ((_ tmpDir: String) throws -> Void)?

    public init(saveDtype: DType? = nil, maxShardBytes: Int = 5_000_000_000, format: ExportFormat = .modelopt) {
        self.saveDtype = saveDtype
        self.maxShardBytes = maxShardBytes
        self.format = format
    }
}

/// What an export wrote.
public struct ExportSummary {
    public var directory: String
    public var plan: ExportPlan
    /// Paths inside `directory`, sorted.
    public var files: [String]
    /// Sum of tensor bytes (the index's `total_size`).
    public var tensorBytes: Int
    /// Bytes of all files written, tokenizer and configs included.
    public var totalBytes: Int
    /// Per quantized weight: how many elements of the exported (dequantized) weight differ
    /// from the model's own fake-quant weight. Non-zero only where the training fake quant
    /// (ModelOpt's Triton semantics) and the export math part ways (blocks with a dequantized
    /// scale below 1e-5 or a block scale below 2^-9, see `NVFP4`), or for FP8 weights, whose
    /// fake quant multiplies by 448/amax where the export divides by amax/448.
    public var weightMismatches: [(name: String, elements: Int)]
    public var hfQuantConfig: JSONObject
    public var quantizationConfig: JSONObject
    /// FP8 quantizers whose amax the loader will not recover exactly (call
    /// `Exporter.snapScales` after calibration to make this empty).
    public var unrecoverableScales: [String]
}

/// Writes a quantized model in NVIDIA ModelOpt's unified Hugging Face checkpoint format
/// (`modelopt.torch.export.export_hf_checkpoint`), which TensorRT-LLM, vLLM and SGLang load.
///
/// Per quantized Linear `<m>` (see `ExportPlan` for the formats):
/// - NVFP4: `<m>.weight` U8 `[out, in/2]` (E2M1 nibbles, even element low), `<m>.weight_scale`
///   F8_E4M3 `[out, in/16]`, `<m>.weight_scale_2` F32 `[]` = weight amax/(6·448), and
///   `<m>.input_scale` F32 `[]` = input amax/(6·448) for W4A4 — ModelOpt's
///   `NVFP4QTensor.quantize` / `get_weights_scaling_factor_2` / `get_activation_scaling_factor`;
/// - FP8: `<m>.weight` F8_E4M3 = e4m3(w / s) (saturating), `<m>.weight_scale` F32 `[]` =
///   amax/448, `<m>.input_scale` F32 `[]` = input amax/448;
/// - FP8 KV cache: `<layer>.self_attn.k_proj.k_scale` / `v_proj.v_scale` F32 `[]` = amax/448
///   (`postprocess_state_dict`: `k_bmm_quantizer._amax / maxbound`, no clamp).
/// No other quantizer state is written. Every other tensor goes out in the save dtype; a
/// tied lm_head is written once (as the embedding).
///
/// The quantized weight is computed from the fp32 master weight, not from the weight cast to
/// the save dtype first as ModelOpt does (`weight.to(dtype)`): the export must reproduce the
/// fake-quant model that was trained, and the two only differ for fp32-trained masters.
///
/// config.json is the source's, edited through the order-preserving JSON layer: its dtype
/// key rewritten when a save dtype is given, and `quantization_config` appended. ModelOpt
/// re-dumps config.json with `indent=4`; we keep the source's transformers layout so the diff
/// is the edit alone (readers parse JSON; no engine depends on the indentation).
/// hf_quant_config.json is written as ModelOpt writes it (`json.dump(indent=4)`, no final newline).
public enum Exporter {
    /// Tokenizer and generation files copied verbatim when present.
    public static let copiedFiles = [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
        "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
    ]

    /// Exports `model` with the quantizers attached to it (calibrated, or restored from a
    /// training checkpoint) into `outDirectory`, built in a temporary directory beside it and
    /// renamed into place only when complete. `sourceDirectory` is the HF model directory the
    /// model came from: its config.json, tokenizer files and tensor dtypes are used.
    @discardableResult
    public static func export(
        model: CausalLM, quantizers: QuantizerSet, sourceDirectory: String, to outDirectory: String,
        options: ExportOptions = ExportOptions()
    ) throws -> ExportSummary {
        let fm = FileManager.default
        let out = (outDirectory as NSString).standardizingPath
        let src = (sourceDirectory as NSString).standardizingPath
        if URL(fileURLWithPath: out).resolvingSymlinksInPath().path == URL(fileURLWithPath: src).resolvingSymlinksInPath().path {
            throw QATError(
                "export directory \(outDirectory) is the source model directory; choose another --out (the export replaces its target)")
        }
        let plan = try ExportPlan.make(model: model, quantizers: quantizers)

        let dtype = storedDType(saveDtype: options.saveDtype, sourceDirectory: src, config: model.config)

        // Tensors, in model order.
        var writer = SafeTensorsWriter()
        var mismatches: [(name: String, elements: Int)] = []
        let entries = Dictionary(uniqueKeysWithValues: plan.linears.map { ($0.name, $0) })
        var quantizedWeights: [String: Linear] = [:]
        for l in model.linears where (entries[l.name]?.format ?? .none) != .none { quantizedWeights[l.weight.name] = l }
        let kvByLayer = Dictionary(uniqueKeysWithValues: plan.kvCache.map { ($0.layer, $0) })
        for p in model.parameters {
            guard let l = quantizedWeights[p.name], let e = entries[l.name] else {
                try writer.add(name: p.name, tensor: p.value, as: dtype(p.name))
                continue
            }
            let n = try writeQuantized(l, e, into: &writer)
            if n > 0 { mismatches.append((l.weight.name, n)) }
            // KV scales sit on k_proj / v_proj (ModelOpt's postprocess_state_dict renaming).
            if let layer = model.layers.first(where: { $0.kProj === l || $0.vProj === l }), let kv = kvByLayer[layer.index] {
                if layer.kProj === l, let a = kv.kAmax { try addScalar(&writer, "\(l.name).k_scale", a / FP8.maxE4M3) }
                if layer.vProj === l, let a = kv.vAmax { try addScalar(&writer, "\(l.name).v_scale", a / FP8.maxE4M3) }
            }
        }
        for kv in plan.kvCache {
            // Layers whose k/v projections are not quantized still carry their KV scales.
            let layer = model.layers[kv.layer]
            if let a = kv.kAmax, !writer.names.contains("\(layer.kProj.name).k_scale") {
                try addScalar(&writer, "\(layer.kProj.name).k_scale", a / FP8.maxE4M3)
            }
            if let a = kv.vAmax, !writer.names.contains("\(layer.vProj.name).v_scale") {
                try addScalar(&writer, "\(layer.vProj.name).v_scale", a / FP8.maxE4M3)
            }
        }

        // Configs.
        let hf = plan.hfQuantConfig(producerName: options.producerName, producerVersion: options.producerVersion)
        let qc = ExportPlan.quantizationConfig(fromHFQuantConfig: hf)
        let configPath = (src as NSString).appendingPathComponent("config.json")
        var config = try JSONValue.parseObject(file: configPath)
        if let d = options.saveDtype { rewriteDType(&config, to: d) }
        config.set("quantization_config", .object(qc))
        var hfBytes: [UInt8]? = JSONValue.object(hf).serializedBytes(indent: 4)
        if options.format == .compressedTensors {
            // The same tensors under compressed-tensors' names and scale conventions.
            guard plan.quantAlgo == "NVFP4" || plan.quantAlgo == "W4A16_NVFP4" else {
                throw QATError(
                    "export.format compressed-tensors writes NVFP4 (W4A4 or weight-only) exports; this model "
                        + "is \(plan.quantAlgo ?? "not quantized") (use export.format modelopt)")
            }
            let records = writer.entries.map { TensorRecord(name: $0.name, dtype: $0.dtype, shape: $0.shape, bytes: $0.bytes) }
            let converted = try CompressedTensors.fromModelOpt(records)
            if let bad = converted.lossyScales.first {
                throw QATError(
                    "\(bad): this scale does not survive compressed-tensors' reciprocal (1/(1/s) ≠ s); snap "
                        + "the scales first (Exporter.snapScales)")
            }
            writer = SafeTensorsWriter()
            for r in converted.records { try writer.add(name: r.name, dtype: r.dtype, shape: r.shape, bytes: r.bytes) }
            let quantized = Set(plan.quantizedLinears.map(\.name))
            config.set(
                "quantization_config",
                .object(
                    CompressedTensors.quantizationConfig(
                        weightOnly: plan.quantAlgo == "W4A16_NVFP4", ignore: plan.linears.map(\.name).filter { !quantized.contains($0) },
                        kvCache: plan.kvCacheQuantAlgo != nil)))
            hfBytes = nil
        }
        let configBytes = Array(config.fileText.utf8)
        let copies = copiedFiles.map { (src as NSString).appendingPathComponent($0) }.filter { fm.fileExists(atPath: $0) }

        // Space: the new directory coexists with any previous export until the rename.
        var need = writer.totalBytes + configBytes.count + (hfBytes?.count ?? 0) + 1 << 20
        for c in copies { need += (try? fm.attributesOfItem(atPath: c)[.size] as? Int) ?? 0 }
        if options.checkFreeSpace { try ensureFreeSpace(bytes: need, near: out) }

        try AtomicDirectory.write(out) { tmp in
            try writer.writeSharded(directory: tmp, maxShardBytes: options.maxShardBytes, metadata: [("format", "pt")])
            try atomicWrite(path: "\(tmp)/config.json") { try $0.write(configBytes) }
            if let hfBytes { try atomicWrite(path: "\(tmp)/hf_quant_config.json") { try $0.write(hfBytes) } }
            for c in copies { try fm.copyItem(atPath: c, toPath: "\(tmp)/\((c as NSString).lastPathComponent)") }
            try options.beforeCommit?(tmp)
        }
        let files = ((try? fm.contentsOfDirectory(atPath: out)) ?? []).sorted()
        let total = files.reduce(0) { $0 + ((try? fm.attributesOfItem(atPath: "\(out)/\($1)")[.size] as? Int) ?? 0) }
        return ExportSummary(
            directory: out, plan: plan, files: files, tensorBytes: writer.totalBytes, totalBytes: total,
            weightMismatches: mismatches, hfQuantConfig: hf, quantizationConfig: qc,
            unrecoverableScales: unrecoverableScales(quantizers))
    }

    /// The dtype the export stores an unquantized tensor in, by name: the save dtype when one is given, else the
    /// tensor's dtype in the source checkpoint (fp32, fp16 or bf16), else config.json's dtype (fp32 without one).
    public static func storedDType(saveDtype: DType?, sourceDirectory: String, config: ModelConfig) -> (String) -> DType {
        if let d = saveDtype { return { _ in d } }
        let source = try? ModelWeights(path: sourceDirectory)
        let configDType = config.dtype.flatMap { DType(torchName: $0) } ?? .f32
        return { name in
            if let d = source?.info(name)?.dtype, d == .f32 || d == .f16 || d == .bf16 { return d }
            return configDType
        }
    }

    /// Gives every enabled NVFP4/FP8 quantizer the amax the export stores exactly (see
    /// `QuantizerSet.snapToStoredScales`; calibration already does this). Returns what moved.
    @discardableResult
    public static func snapScales(model: CausalLM, quantizers: QuantizerSet) -> [ScaleSnap] {
        let moved = quantizers.snapToStoredScales()
        model.markWeightsChanged()
        return moved
    }

    /// Enabled quantizers whose amax the export cannot reproduce exactly (FP8 ones only;
    /// see `snapScales`).
    public static func unrecoverableScales(_ quantizers: QuantizerSet) -> [String] {
        quantizers.all.filter { q in
            guard q.enabled, q.format == .fp8PerTensor, let a = q.amax else { return false }
            return ExportedModel.amaxForScale(a / FP8.maxE4M3, bound: FP8.maxE4M3) != a
        }.map(\.name)
    }

    /// Sets config.json's dtype: `dtype` (transformers ≥ 4.56) and/or `torch_dtype` where
    /// present, in place; `torch_dtype` is appended when neither exists.
    public static func rewriteDType(_ config: inout JSONObject, to dtype: DType) {
        guard let name = dtype.torchName else { return }
        var done = false
        for key in ["dtype", "torch_dtype"] where config.contains(key) {
            config.set(key, .string(name))
            done = true
        }
        if !done { config.set("torch_dtype", .string(name)) }
    }

    /// Writes one quantized Linear's tensors; returns how many weight elements the export's
    /// dequantized weight differs in from the model's own fake-quant weight.
    static func writeQuantized(_ l: Linear, _ e: ExportPlan.LinearEntry, into w: inout SafeTensorsWriter) throws -> Int {
        let rows = l.outFeatures, cols = l.inFeatures
        let weight = l.weight.value.data
        let reference = Tensor(shape: [rows, cols], zeroed: false)
        guard let wamax = e.weightAmax else { throw QATError("\(l.name): no weight amax") }
        let exported = Tensor(shape: [rows, cols], zeroed: false)
        switch e.format {
        case .nvfp4, .nvfp4WeightOnly:
            let q = NVFP4.quantize(weight, rows: rows, cols: cols, globalAmax: wamax)
            let nb = NVFP4.blocksPerRow(cols)
            try w.add(name: "\(l.name).weight", dtype: .u8, shape: [rows, nb * 8], bytes: q.packed)
            try w.add(name: "\(l.name).weight_scale", dtype: .f8e4m3, shape: [rows, nb], bytes: q.scales)
            try addScalar(&w, "\(l.name).weight_scale_2", q.globalScale)
            if let a = e.inputAmax { try addScalar(&w, "\(l.name).input_scale", NVFP4.globalScale(amax: a)) }
            q.packed.withUnsafeBufferPointer { p in
                q.scales.withUnsafeBufferPointer { s in
                    NVFP4.dequantize(
                        packed: p.baseAddress!, scales: s.baseAddress!, globalScale: q.globalScale, rows: rows, cols: cols,
                        out: exported.data)
                }
            }
        case .fp8:
            let scale = wamax / FP8.maxE4M3
            var codes = [UInt8](repeating: 0, count: rows * cols)
            for i in 0..<(rows * cols) {
                codes[i] = floatToE4M3(weight[i] / scale)
                exported[i] = e4m3ToFloat(codes[i]) * scale
            }
            try w.add(name: "\(l.name).weight", dtype: .f8e4m3, shape: [rows, cols], bytes: codes)
            try addScalar(&w, "\(l.name).weight_scale", scale)
            if let a = e.inputAmax { try addScalar(&w, "\(l.name).input_scale", a / FP8.maxE4M3) }
        case .none:
            return 0
        }
        // What the model computes with: its weight quantizer's fake quant.
        if let wq = l.weightQuantizer {
            try wq.forward(weight, reference.data, rows: rows, cols: cols)
        } else {
            reference.copy(from: l.weight.value)
        }
        var diff = 0
        for i in 0..<(rows * cols) where exported[i].bitPattern != reference[i].bitPattern && !(exported[i] == 0 && reference[i] == 0) {
            diff += 1
        }
        return diff
    }

    static func addScalar(_ w: inout SafeTensorsWriter, _ name: String, _ v: Float) throws {
        var bits = v.bitPattern.littleEndian
        let bytes = withUnsafeBytes(of: &bits) { Array($0) }
        try w.add(name: name, dtype: .f32, shape: [], bytes: bytes)
    }

    /// Fails with a clear message when the filesystem holding `path` has less than `bytes` free.
    public static func ensureFreeSpace(bytes: Int, near path: String) throws {
        var dir = (path as NSString).deletingLastPathComponent
        if dir.isEmpty { dir = "." }
        while !FileManager.default.fileExists(atPath: dir) && dir != "/" && !dir.isEmpty {
            dir = (dir as NSString).deletingLastPathComponent
        }
        var s = statvfs()
        guard statvfs(dir.isEmpty ? "." : dir, &s) == 0 else { return }
        let free = Int(s.f_bavail) &* Int(s.f_frsize)
        if free < bytes {
            throw QATError(
                String(
                    format: "not enough disk space for the export at %@: it needs about %.1f MiB, %.1f MiB are free on that filesystem",
                    path,
                    Double(bytes) / 1_048_576, Double(free) / 1_048_576))
        }
    }
}
