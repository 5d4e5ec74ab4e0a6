import Foundation
import QATCore
import QATExport
import QATModels
import QATQuant

/// The validation data a verification reads: the first `sequences` sequences of `stream`
/// (of `seqLen` tokens, capped at the model's `max_position_embeddings`).
struct VerificationData {
    var stream: [Int32]
    var seqLen: Int
    var sequences: Int
}

/// The one export path of `qat apply` and `qat export`: export a fake-quant model (ModelOpt's
/// HF format, atomically), then read the export back and compare its logits with the model's.
enum ExportAndVerify {
    struct Result {
        var summary: ExportSummary
        var comparison: LogitComparison?
        /// The export as a loader sees it (nil when not verified).
        var exported: ExportedModel?
    }

    /// `logitsOf`: where the verification's logits are computed (the GPU); default the CPU.
    static func run(
        model: CausalLM, quantizers: QuantizerSet, sourceDirectory: String, to directory: String, options: ExportOptions,
        verify: VerificationData?, logitsOf: ((CausalLM, [Int32], Int, Int) throws -> Tensor)? = nil
    ) throws -> Result {
        let summary = try Exporter.export(
            model: model, quantizers: quantizers, sourceDirectory: sourceDirectory, to: directory,
            options: options)
        guard let verify else { return Result(summary: summary) }
        let (comparison, exported) = try self.verify(
            directory: directory, model: model, quantizers: quantizers, data: verify,
            logitsOf: logitsOf)
        return Result(summary: summary, comparison: comparison, exported: exported)
    }

    /// Reads the export at `directory` back and compares its logits with `model`'s (the
    /// fake-quant model it was made from, `qat verify`'s reference).
    static func verify(
        directory: String, model: CausalLM, quantizers: QuantizerSet, data: VerificationData,
        logitsOf: ((CausalLM, [Int32], Int, Int) throws -> Tensor)? = nil
    ) throws
        -> (comparison: LogitComparison, exported: ExportedModel)
    {
        let exported = try ExportedModel.load(directory: directory)
        // The reference is the fake-quant model with its unquantized tensors rounded to the
        // dtype they were saved in (what the export holds by construction).
        try Verification.alignReference(model: model, quantizers: quantizers, exportDirectory: directory)
        let seqLen = min(data.seqLen, model.config.maxPositionEmbeddings)
        let sequences = try Calibration.sequences(from: data.stream, seqLen: seqLen, count: max(1, data.sequences))
        return (try Verification.compare(reference: model, candidate: exported.model, sequences: sequences, logitsOf: logitsOf), exported)
    }
}

func verificationLine(_ v: LogitComparison) -> String {
    String(
        format: "verify: max |Δlogit| %g (mean %.3g, %d of %d logits bit-identical) on %d sequences; loss fake-quant %.6f, export %.6f",
        Double(v.maxAbsDiff), v.meanAbsDiff, v.identical, v.count, v.sequences, v.referenceLoss, v.candidateLoss)
}
