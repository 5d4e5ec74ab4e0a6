import Foundation
import QATCore
import QATIO
import QATModels
import QATTrain

/// Peak memory and time of the fused chunked KD loss against the unfused one (full
/// [tokens × vocab] logits of student and teacher) at Qwen3's vocabulary.
///
/// Each configuration (token count × fused/unfused) is its own: a fresh `DistillationLoss` per
/// lap, so the fused loss's chunk buffers count in every fused figure, and the high-water mark
/// reset before each lap (`PeakMemory`), so a figure is that lap's own peak above what was live
/// at its start (weights, their gradient and the hidden states), whatever ran before it. One
/// shared warm-up pass (it allocates and touches the lm_head weight gradient) precedes all
/// configurations: one lap at 16k tokens takes minutes on two cores.
enum LossMemoryBench {
    static let vocab = 151_936, hidden = 1_024

    static func run(tokens counts: [Int], repeats: Int, say: (String) -> Void) throws -> (json: JSONValue, lines: [String]) {
        // One layer, tied heads: the lm_head weights (151,936 × 1,024, 594 MiB each) dominate.
        let c = ModelConfig(
            family: .llama, vocabSize: vocab, hiddenSize: hidden, intermediateSize: 64, numLayers: 1, numHeads: 8,
            numKVHeads: 8, tieWordEmbeddings: true)
        let student = try CausalLM(config: c, seed: 1), teacher = try CausalLM(config: c, seed: 2)
        student.lmHead.weight.setRequiresGrad(true)
        var spec = Recipe.DistillSpec()
        spec.kdRatio = 0.5
        var rows: [JSONValue] = [], lines: [String] = []
        var fusedPeaks: [Double] = [], unfusedPerToken: [(Int, Double)] = []

        let warm = try Inputs(n: min(256, counts.min() ?? 256))
        _ = try warm.pass(fused: true, loss: DistillationLoss(teacher: teacher, studentVocab: vocab, spec: spec), head: student.lmHead)

        for n in counts {
            let inputs = try Inputs(n: n)
            var row = JSONObject()
            row.set("tokens", .int(Int64(n)))
            row.set("hidden_states_MiB", .double(inputs.hiddenMiB))
            for fused in [true, false] {
                let name = fused ? "fused" : "unfused"
                // The unfused path holds student and teacher logits (and the gradient in place).
                let paperMiB = Double(2 * n * vocab * 4) / 1_048_576
                if !fused, paperMiB > 0.6 * Double(ProcessInfo.processInfo.physicalMemory) / 1_048_576 {
                    row.set("unfused_paper_MiB", .double(paperMiB))
                    lines.append(
                        String(
                            format: "[kd loss] %d tokens: unfused skipped (its logits alone need %.0f MiB on paper, "
                                + "more than this machine can hold)",
                            n, paperMiB))
                    say(lines.last!)
                    continue
                }
                let laps = try Laps.run(warmup: 0, repeats: repeats, peaks: true) {
                    _ = try inputs.pass(
                        fused: fused, loss: DistillationLoss(teacher: teacher, studentVocab: vocab, spec: spec),
                        head: student.lmHead)
                }
                row.set("\(name)_seconds", laps.time.json)
                var peakText = "peak n/a (no /proc/self/clear_refs to reset the high-water mark)"
                if let p = laps.peakMiB {
                    row.set("\(name)_peak_MiB", p.json)
                    peakText = "peak +\(p.text(0)) MiB"
                    if fused { fusedPeaks.append(p.median) } else { unfusedPerToken.append((n, p.median / Double(n))) }
                }
                lines.append(
                    "[kd loss] \(n) tokens: \(name) \(peakText) over weights and hidden states "
                        + "(\(Spread.number(inputs.hiddenMiB, 0)) MiB), "
                        + "\(laps.time.text(2)) s")
                say(lines.last!)
            }
            rows.append(.object(row))
        }
        var out = JSONObject()
        out.set("repeats", .int(Int64(repeats)))
        out.set("configurations", .array(rows))
        if fusedPeaks.count > 1, let lo = fusedPeaks.min(), let hi = fusedPeaks.max(), lo > 0 {
            out.set("fused_peak_max_over_min", .double(hi / lo))
            lines.append(String(format: "[kd loss] fused peaks across token counts: max/min = %.3f (flat in T)", hi / lo))
            say(lines.last!)
        }
        if !unfusedPerToken.isEmpty {
            let per = unfusedPerToken.map { String(format: "%.3f MiB/token at %d", $0.1, $0.0) }.joined(separator: ", ")
            let paper = String(format: "%.3f", Double(2 * vocab * 4) / 1_048_576)
            lines.append("[kd loss] unfused peak per token: \(per) (logits on paper: \(paper) MiB/token)")
            say(lines.last!)
        }
        return (.object(out), lines)
    }

    /// Random final hidden states of student and teacher, their gradient and targets for n tokens.
    final class Inputs {
        let n: Int, h: Tensor, th: Tensor, dh: Tensor, targets: [Int32]
        var hiddenMiB: Double { Double(3 * n * LossMemoryBench.hidden * 4) / 1_048_576 }

        init(n: Int) throws {
            guard n > 0 else { throw QATError("--loss-tokens: token counts must be positive (got \(n))") }
            self.n = n
            var rng = SplitMix64(seed: UInt64(n))
            h = Tensor(shape: [n, LossMemoryBench.hidden], zeroed: false); th = Tensor(shape: [n, LossMemoryBench.hidden], zeroed: false)
            dh = Tensor(shape: [n, LossMemoryBench.hidden])
            for i in 0..<h.count { h[i] = rng.nextGaussian(); th[i] = rng.nextGaussian() }
            for i in 0..<dh.count { dh[i] = 0 }
            targets = (0..<n).map { i in i % 17 == 16 ? CrossEntropy.ignoreIndex : Int32(rng.next() % UInt64(LossMemoryBench.vocab)) }
        }

        func pass(fused: Bool, loss: DistillationLoss, head: Linear) throws -> Double {
            let parts =
                fused
                ? try loss.fused(
                    student: head, hidden: h.data, teacherHidden: th.data, targets: targets, n: n, gradScale: 1 / Float(n),
                    dHidden: dh.data)
                : try loss.reference(
                    student: head, hidden: h.data, teacherHidden: th.data, targets: targets, n: n, gradScale: 1 / Float(n),
                    dHidden: dh.data)
            return parts.total
        }
    }
}
