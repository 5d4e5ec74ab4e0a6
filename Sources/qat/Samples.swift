import Foundation
import QATCore
import QATExport
import QATModels

extension ApplyRun {
    /// `report.prompts`: the original model's and the export's greedy continuation (40 new
    /// tokens, ending early at EOS) of each prompt, with the export run as deployed (decoded
    /// NVFP4 weights, NVFP4 activations through their quantizers, FP8 KV cache).
    func appendSamples(to summary: inout ApplySummary) throws {
        let prompts = recipe.reportPrompts
        guard !prompts.isEmpty, try ExportedModel.isQuantizedExport(directory: recipe.export.dir) else { return }
        let original = try GenerationModel.load(model: recipe.model, recipe: nil, overrides: [], checkpoint: nil)
        let exported = try GenerationModel.load(model: recipe.export.dir, recipe: nil, overrides: [], checkpoint: nil)
        let tokenizer = try original.tokenizer()
        for p in prompts {
            let ids = tokenizer.encode(p)
            guard !ids.isEmpty else { continue }
            let a = try original.generate(
                prompt: ids, maxNewTokens: 40, sampler: Sampler(), eos: original.eosTokenIds, stop: [],
                tokenizer: tokenizer)
            let b = try exported.generate(
                prompt: ids, maxNewTokens: 40, sampler: Sampler(), eos: exported.eosTokenIds, stop: [],
                tokenizer: tokenizer)
            summary.samples.append((p, a.text, b.text))
        }
        log("samples: \(summary.samples.count) prompts continued by the original and the export (greedy, 40 tokens)")
    }
}
