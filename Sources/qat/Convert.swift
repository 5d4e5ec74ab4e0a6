import ArgumentParser
import Foundation
import QATCore
import QATExport

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Convert an NVFP4 export between the ModelOpt and compressed-tensors layouts, losslessly.",
        discussion: """
            ModelOpt (hf_quant_config.json, quant_method modelopt: TensorRT-LLM, vLLM, SGLang) and \
            compressed-tensors (nvfp4-pack-quantized, quant_method compressed-tensors: vLLM, SGLang, \
            transformers) hold the same NVFP4 weights under other names: weight ↔ weight_packed, \
            weight_scale_2 ↔ 1/weight_global_scale, input_scale ↔ 1/input_global_scale, \
            self_attn.k_proj.k_scale ↔ self_attn.k_scale. Tensor bytes, their order, config.json's \
            other keys and the tokenizer files are kept, so converting a qat export there and back \
            gives the same bytes. The output is written atomically.

            Example: qat convert export/fortune-lm-nvfp4 --to compressed-tensors --out export/fortune-lm-nvfp4-ct
            """)

    @Argument(help: "Export directory (either format).")
    var source: String

    @Option(help: "Target layout: modelopt or compressed-tensors.")
    var to: String

    @Option(help: "Output directory.")
    var out: String

    @Option(name: .customLong("max-shard-bytes"), help: "Shard the safetensors above this size.")
    var maxShardBytes: Int = 5_000_000_000

    func run() throws {
        try QAT.guarded {
            let target = try ExportFormat.parse(to)
            let s = try CompressedTensors.convert(source: source, to: target, out: out, maxShardBytes: maxShardBytes)
            print(
                "\(source) (\(s.from.rawValue)) → \(out) (\(s.to.rawValue)): \(s.tensors) tensors, files \(s.files.joined(separator: ", "))"
            )
            for n in s.lossyScales {
                FileHandle.standardError.write(
                    Data("note: \(n): 1/(1/s) ≠ s in fp32, so this scale will not convert back bit for bit\n".utf8))
            }
        }
    }
}
