import CCUDA
import QATCore
import QATModels

/// Training in bf16 for a bf16 export: the model the forward computes is the model the export writes.
///
/// A Linear's product already reads its weight's bf16 copy (or that of its NVFP4 fake quant, which the export stores
/// exactly). The other parameters — the embedding table, the RMSNorm weights, the Linears' biases — were read as
/// their fp32 masters, and the export rounds them to bf16: a trained model the training never saw. On fortune-lm's
/// QAD recipe that rounding moved the validation loss by up to 0.0012 (the norm weights alone; their steps are below
/// a bf16 ulp of weights near 1, so rounding takes most of them back), about 4% of the PTQ gap the training closes.
/// With `readStoredDType` those parameters are read as their bf16 rounding while the optimizer updates their fp32
/// masters (a straight-through rounding, as a bf16 model with fp32 master weights trains), so the validation loss
/// after training is the export's.
extension CUDAModel {
    /// The parameters `readStoredDType` can read as stored: the embedding table, every RMSNorm weight and every
    /// Linear's bias (not LoRA adapters, which the export merges or writes in their own dtype).
    public static func storedDTypeParameters(_ model: CausalLM) -> [Parameter] {
        let norms = model.layers.flatMap { [$0.inputNorm, $0.postNorm] + [$0.qNorm, $0.kNorm].compactMap { $0 } }
        return [model.embed, model.finalNorm] + norms + model.linears.compactMap(\.bias)
    }

    /// Reads those of `storedDTypeParameters` named in `bf16` as their bf16 rounding (bf16 precision only; a no-op in
    /// fp32). `bf16`: the names of the parameters the export stores in bf16 (`Exporter.storedDType`).
    public func readStoredDType(bf16 names: Set<String>) throws {
        guard precision == .bf16 else { return }
        for p in Self.storedDTypeParameters(model) where names.contains(p.name) {
            if p === model.embed {
                embeddingRounded = true
                continue
            }
            let id = ObjectIdentifier(p)
            guard rounded[id] == nil else { continue }
            rounded[id] = try DeviceBuffer(device, floats: p.count)
            roundedStale.insert(id)
        }
    }

    /// The device values the forward and backward read for a norm weight or a bias: its bf16 rounding when
    /// `readStoredDType` asked for it (made again here when the master changed since), else its fp32 device tensor.
    func read(_ p: Parameter) throws -> CUdeviceptr {
        let id = ObjectIdentifier(p)
        guard let r = rounded[id] else { return tensor(p) }
        if roundedStale.contains(id) {
            try device.roundBF16(out: r.ptr, tensor(p), count: p.count)
            roundedStale.remove(id)
        }
        return r.ptr
    }
}
