import QATCore
import QATModels

/// The load-balancing auxiliary loss of mixture-of-experts models in training.
///
/// transformers adds `router_aux_loss_coef · aux` to each forward's loss, aux computed over
/// that forward's tokens (`CausalLM.routerAuxLoss`). A step here averages its micro-batches
/// (and data-parallel ranks), so each micro-batch contributes coef · aux / (grad_accum ·
/// ranks) to the step loss, and its router gradient is scaled the same way.
extension Trainer {
    static func configureRouterAuxLoss(model: CausalLM, spec: Recipe.TrainSpec, pipeline: Bool) throws {
        let coef = spec.routerAuxLossCoef ?? model.config.moe?.defaultAuxLossCoef ?? 0
        guard coef != 0 else { model.routerAuxLossCoef = 0; return }
        guard model.config.moe != nil else {
            throw QATError("train.router_aux_loss_coef = \(coef): the model has no mixture-of-experts layers (set it to 0 or leave it out)")
        }
        guard !pipeline else {
            throw QATError(
                "train.router_aux_loss_coef = \(coef) with train.pipeline_stages > 1 is not supported "
                    + "(the loss spans every stage's routers); set it to 0")
        }
        model.routerAuxLossCoef = Float(coef)
    }

}

/// A micro-batch's share of coef · aux, in the step's token-sum units (the step loss is the sum
/// divided by the global valid-token count). Also sets the router gradient's scale.
func routerAuxLossTerm(model: CausalLM, share: Double, validTokens: Int) -> Double {
    guard model.routerAuxLossCoef != 0, let aux = model.routerAuxLoss() else { return 0 }
    model.routerAuxLossScale = share
    return Double(model.routerAuxLossCoef) * aux * share * Double(max(validTokens, 1))
}
