import Foundation
import QATQuant

extension Recipe {
    /// The recipe with every default filled in, as YAML that `Recipe.parse` reads back to
    /// the same recipe (the quantize section in ModelOpt's list syntax).
    public var yaml: String {
        func q(_ s: String) -> String {
            "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
        }
        func opt(_ s: String?) -> String { s.map(q) ?? "null" }
        func num(_ d: Double) -> String { d == d.rounded() && abs(d) < 1e15 ? String(format: "%.1f", d) : "\(d)" }
        func list(_ a: [String]?) -> String { a.map { "[" + $0.map(q).joined(separator: ", ") + "]" } ?? "null" }
        var y = "# \(source), every default filled in (qat recipe show)\n"
        y += "model: \(q(model))\n"
        y += "device: \(device)\nprecision: \(precision.rawValue)\n"
        y += "data:\n  train: \(q(data.train))\n  validation: \(q(data.validation))\n"
        y += "  train_split: \(q(data.trainSplit))\n  validation_split: \(q(data.validationSplit))\n"
        y += "  seq_len: \(data.seqLen)\n  validation_sequences: \(data.validationSequences.map(String.init) ?? "null")\n"
        if let qc = quantize {
            y +=
                "quantize:  # \(quantizeDescription)\n  ste: \(ste)\n  fake_quant: \(fakeQuant)\n  "
                + "algorithm: \(qc.algorithm)\n  quant_cfg:\n"
            for e in qc.entries {
                y += "    - quantizer_name: \(q(e.quantizerName))\n"
                if let pc = e.parentClass { y += "      parent_class: \(q(pc))\n" }
                if let cfg = e.cfg {
                    y += "      cfg: \(Recipe.render(cfg.format))\n"
                    if cfg.ste == .clipped { y += "      # ste: clipped\n" }
                }
                if !e.enable || e.cfg == nil { y += "      enable: \(e.enable)\n" }
            }
        } else {
            y += "quantize: null\n"
        }
        y +=
            "calibration:\n  samples: \(calibration.samples)\n  batch_size: "
            + "\(calibration.batchSize)\n  algorithm: \(calibration.algorithm)\n"
        let t = train
        y += "train:\n  mode: \(t.mode.rawValue)\n  steps: \(t.steps)\n  epochs: \(t.epochs.map(num) ?? "null")\n"
        y += "  batch_size: \(t.batchSize)\n  grad_accum: \(t.gradAccum)\n  lr: \(t.lr)\n  schedule: \(t.schedule)\n"
        y += "  warmup_steps: \(t.warmupSteps)\n  warmup_ratio: \(t.warmupRatio.map { "\($0)" } ?? "null")\n"
        y += "  weight_decay: \(num(t.weightDecay))\n  betas: [\(t.betas.map { "\($0)" }.joined(separator: ", "))]\n  eps: \(t.eps)\n"
        y += "  max_grad_norm: \(t.maxGradNorm.map(num) ?? "null")\n"
        y += "  trainable_params: \(list(t.trainableParams))\n  frozen_params: \(list(t.frozenParams))\n"
        if let lc = t.lrConfigYAML {
            y +=
                "  lr_config:\n"
                + lc.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.isEmpty }.map { "    " + $0 }.joined(
                    separator: "\n") + "\n"
        } else {
            y += "  lr_config: null\n"
        }
        y += "  seed: \(t.seed)\n  eval_every: \(t.evalEvery)\n  save_every: \(t.saveEvery)\n  log_every: \(t.logEvery)\n"
        y +=
            "  checkpoint_dir: \(opt(t.checkpointDir))\n  keep_checkpoints: \(t.keepCheckpoints)\n  "
            + "on_nonfinite: \(t.onNonFinite)\n  shard_optimizer_state: \(t.shardOptimizerState)\n  "
            + "pipeline_stages: \(t.pipelineStages)\n  router_aux_loss_coef: "
            + "\(t.routerAuxLossCoef.map { "\($0)" } ?? "null")\n  activation_checkpointing: \(t.activationCheckpointing)\n"
        let d = t.distill
        y += "  distill:\n    teacher: \(opt(d.teacher))\n    kd_ratio: \(num(d.kdRatio))\n    temperature: \(num(d.temperature))\n"
        y +=
            "    loss: \(d.loss.rawValue)\n    beta: \(num(d.beta))\n    teacher_logprobs: "
            + "\(opt(d.teacherLogprobs))\n    topk_objective: \(d.topkObjective.rawValue)\n"
        y += t.lora?.yaml ?? "  lora: null\n"
        y += "export:\n  dir: \(q(export.dir))\n  save_dtype: \(export.saveDtype?.torchName ?? "null")\n"
        y += "  max_shard_bytes: \(export.maxShardBytes)\n  verify: \(export.verify)\n  format: \(export.format)\n"
        y +=
            "report:\n  prompts: ["
            + reportPrompts.map {
                q($0).replacingOccurrences(of: "\n", with: "\\n").replacingOccurrences(of: "\t", with: "\\t")
            }.joined(separator: ", ") + "]\n"
        return y
    }

    static func render(_ f: QuantFormat) -> String {
        switch f {
        case .nvfp4(let b): return "{num_bits: e2m1, block_sizes: {-1: \(b), type: dynamic, scale_bits: e4m3}, axis: null}"
        case .fp8PerTensor: return "{num_bits: e4m3, axis: null}"
        case .int8PerTensor: return "{num_bits: 8, axis: null}"
        }
    }
}
