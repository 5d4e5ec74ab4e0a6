import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant

/// Activation checkpointing on the GPU (`train.activation_checkpointing`): a training forward
/// keeps only the residual stream (every layer's input, `Buffers.residuals`) and one reusable
/// `LayerActivations`; `backward` recomputes layer l's forward from `residuals[l]` into that
/// set right before layer l's backward. The recompute runs the same kernels on the same
/// inputs, and the kernels are deterministic, so the gradients are bit-identical to a run
/// without checkpointing (`qat selftest --device cuda` asserts it) for one more forward's work.
extension CUDAModel {
    /// Layer l's forward again, from its saved input, into the one activation set. Its output
    /// goes to `residuals[l + 1]`, which holds the same values already and which no later step
    /// of the backward reads (layer l + 1's backward, its one reader, has run). Quantizers are
    /// static in training; should one calibrate, the recompute records nothing (`recomputing`).
    func recomputeLayer(_ l: Int, _ b: Buffers) throws {
        guard b.checkpointed, l < model.layers.count else { throw QATError.internal("recomputeLayer without activation checkpointing") }
        recomputing = true
        defer { recomputing = false }
        try layerForward(model.layers[l], b.layers[0], xin: b.residuals[l].ptr, xout: b.residuals[l + 1].ptr, b: b)
    }

    /// Device bytes of one decoder layer's activations after the last forward (the buffers every layer has of its
    /// own; the paths that forward took decide some): what checkpointing saves per layer (all but one set), for
    /// logs and the selftest.
    public var layerActivationBytes: Int { buffers?.layers.first?.bytes ?? 0 }
}
