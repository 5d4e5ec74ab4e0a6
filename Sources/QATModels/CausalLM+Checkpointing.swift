import Foundation
import QATCore

/// Activation checkpointing on the CPU (`train.activation_checkpointing`): a training forward
/// keeps the residual stream (every layer's input) and one reusable `LayerActivations`;
/// `backward` recomputes layer l's forward from its input into that set right before layer l's
/// backward. Same code on the same inputs, so the gradients are bit-identical to a run without
/// checkpointing (`ActivationCheckpointingTests`); the cost is one more forward per step.
extension CausalLM {
    /// What a recompute cannot reproduce, refused before a training forward: LoRA dropout
    /// draws its masks by forward count, a mixture-of-experts layer keeps router state for the
    /// auxiliary loss. The trainer asks before the first step; a training forward asks again.
    public func checkCheckpointable() throws {
        if layers.contains(where: { $0.moe != nil }) {
            throw QATError.unsupported("train.activation_checkpointing does not support mixture-of-experts models in this version")
        }
        if linears.contains(where: { $0.adapter != nil }) {
            throw QATError.unsupported("train.activation_checkpointing does not support LoRA/QLoRA training in this version")
        }
    }

    /// Layer l's forward again, from its saved input `residuals[l]`, into the one activation
    /// set; its output goes to `residuals[l + 1]`, which holds the same values and which no
    /// later step of the backward reads (layer l + 1's backward, its one reader, has run).
    func recomputeLayer(_ l: Int, batch: Int, seqLen: Int) throws {
        try layerForward(layers[l], acts[0], xin: residuals[l].data, xout: residuals[l + 1].data, batch: batch, seqLen: seqLen)
    }
}
