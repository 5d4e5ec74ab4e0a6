import ArgumentParser
import Foundation
import QATCore
import QATIO
import QATModels
import QATQuant
import QATTrain

struct Apply: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a recipe end to end: quantize, calibrate, train (QAT/QAD), export, verify.",
        discussion: """
            load → insert quantizers → calibrate → evaluate the unquantized and PTQ model → train \
            (train.mode none | qat | qad) with periodic evaluation and checkpoints → export → \
            verify → evaluate the export. Ends with a table and writes qat_summary.json, \
            metrics.jsonl and loss_curve.svg into the export directory.

            Ctrl-C (or SIGTERM, SIGUSR1, SIGUSR2) writes a checkpoint after the current step and \
            exits 130; run the same command with --resume to continue.

            Distributed: `mpirun -np N qat apply …` trains data parallel over N ranks; with \
            train.pipeline_stages S (N a multiple of S) each rank runs one stage of the student \
            and teacher, N/S pipelines side by side.

            Under mpirun, stop with `kill -USR1 <mpirun pid>`: Open MPI forwards SIGUSR1 to every \
            rank at once and kills nothing, so every rank stops at the same step, rank 0 writes \
            the checkpoint and mpirun exits 130. Ctrl-C reaches the ranks only as SIGTERM one \
            second later, followed by SIGKILL one second after that (Open MPI 4.1; \
            `mpirun --mca odls_base_sigkill_timeout 30` stretches both delays to 30 s), so it \
            leaves a checkpoint only when the step and the save fit in that window.

            Example: qat apply recipes/fortune-lm-qat.yaml --set train.steps=50
            """)

    @Argument(help: "Recipe YAML (see recipes/ and the README's recipe reference).")
    var recipe: String = "recipes/default.yaml"

    @Option(name: .customLong("set"), help: "Override a recipe key (repeatable): --set train.lr=2e-5 --set export.save_dtype=float16")
    var overrides: [String] = []

    @Flag(help: "Continue from the latest checkpoint of this recipe's run.")
    var resume = false

    @Flag(name: .customLong("force-resume"), help: "Resume even if the checkpoint was written by a different recipe.")
    var forceResume = false

    @Flag(help: "Print only errors and the final table.")
    var quiet = false

    @Flag(help: "Print the summary as JSON on stdout (logs stay on stderr).")
    var json = false

    @Option(name: .long, help: "Override the recipe's device: cpu, cuda or cuda:N.")
    var device: String?

    @Option(name: .long, help: "Override the recipe's GPU precision: fp32 or bf16.")
    var precision: String?

    @Option(help: "Worker threads for OpenBLAS and the kernels (default: all cores).")
    var threads: Int?

    func run() throws {
        try QAT.guarded {
            if let t = threads, t > 0 { setenv("QAT_THREADS", String(t), 1); BLAS.setThreads(t) }
            var r = try Recipe.load(path: recipe, overrides: overrides)
            if let d = device { r.device = try ComputeDevice(parsing: d) }
            if let p = precision { r.precision = try Precision(parsing: p) }
            // Under mpirun (more than one rank): data-parallel over Open MPI; rank 0 alone
            // prints and writes, and a failing rank aborts the job instead of leaving the
            // others waiting in a collective.
            let comm = try Distributed.initialize()
            let run = ApplyRun(
                recipe: r, recipePath: recipe, overrides: overrides, resume: resume, forceResume: forceResume,
                quiet: quiet || json || !comm.isRoot)
            let summary: ApplySummary
            do { summary = try run.execute() } catch {
                if comm.isDistributed {
                    FileHandle.standardError.write(Data("error (rank \(comm.rank)): \((error as? QATError)?.message ?? "\(error)")\n".utf8))
                    comm.abort(code: 1)
                }
                throw error
            }
            if comm.isDistributed { try? comm.barrier(); comm.finalize() }
            guard comm.isRoot else { if summary.interrupted { throw ExitCode(130) }; return }
            if json { print(summary.json) } else { print(summary.table) }
            if summary.interrupted { throw ExitCode(130) }
        }
    }
}

/// The figures `qat apply` reports (and writes to qat_summary.json).
struct ApplySummary {
    struct Row { var name: String; var loss: Double?; var perplexity: Double? { loss.map { exp($0) } } }
    var rows: [Row] = []
    var exportDir = ""
    var exportBytes = 0
    var sourceBytes = 0
    var verifyMaxAbsDiff: Double? = nil
    var seconds = 0.0
    var mode = ""
    var quantize = ""
    var steps = 0
    var interrupted = false
    /// report.prompts: each prompt with the original's and the export's greedy continuation.
    var samples: [(prompt: String, original: String, exported: String)] = []

    var json: String {
        var o = JSONObject()
        o.set("mode", .string(mode))
        o.set("quantize", .string(quantize))
        o.set("steps", .int(Int64(steps)))
        for row in rows {
            let key = row.name.lowercased().replacingOccurrences(of: " ", with: "_")
            var e = JSONObject()
            e.set("val_loss", row.loss.map { .double($0) } ?? .null)
            e.set("perplexity", row.perplexity.map { .double($0) } ?? .null)
            o.set(key, .object(e))
        }
        o.set("export_dir", .string(exportDir))
        o.set("export_bytes", .int(Int64(exportBytes)))
        o.set("source_bytes", .int(Int64(sourceBytes)))
        o.set("verify_max_abs_logit_diff", verifyMaxAbsDiff.map { .double($0) } ?? .null)
        o.set("seconds", .double((seconds * 10).rounded() / 10))
        o.set("interrupted", .bool(interrupted))
        if !samples.isEmpty {
            o.set(
                "samples",
                .array(
                    samples.map {
                        .object(
                            JSONObject([
                                ("prompt", .string($0.prompt)), ("original", .string($0.original)), ("exported", .string($0.exported)),
                            ]))
                    }))
        }
        return JSONValue.object(o).fileText
    }

    var table: String {
        var lines = ["", "model".padding(toLength: 22, withPad: " ", startingAt: 0) + "     val loss   perplexity"]
        for row in rows {
            let l = row.loss.map { String(format: "%12.4f", $0) } ?? String(repeating: " ", count: 11) + "-"
            let p = row.perplexity.map { String(format: "%12.2f", $0) } ?? String(repeating: " ", count: 11) + "-"
            lines.append(row.name.padding(toLength: 22, withPad: " ", startingAt: 0) + " " + l + " " + p)
        }
        if exportBytes > 0 {
            let factor =
                sourceBytes > 0
                ? String(
                    format: " (%.2f× smaller than the source checkpoint, %@)", Double(sourceBytes) / Double(exportBytes),
                    formatBytes(sourceBytes)) : ""
            lines.append("export: \(exportDir), \(formatBytes(exportBytes))\(factor)")
        }
        if let v = verifyMaxAbsDiff { lines.append(String(format: "verify: export reproduces the fake-quant logits, max |Δ| = %.3g", v)) }
        lines.append(String(format: "time: %@ (%d steps, mode %@, quantize %@)", ProgressBar.clock(seconds), steps, mode, quantize))
        for s in samples {
            lines.append("")
            lines.append(SideBySide.render(prompt: s.prompt, left: ("original", s.original), right: ("exported", s.exported), width: 48))
        }
        return lines.joined(separator: "\n")
    }
}
