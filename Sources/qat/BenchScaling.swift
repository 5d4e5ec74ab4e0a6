import ArgumentParser
import Foundation
import QATCore
import QATIO
import QATModels

/// `qat bench --scaling`: the forward (evaluation path) and the real QAT and QAD trainer steps of
/// each shape, at 1, 2, 4, … threads up to all cores, in one process. Each figure is tokens/s,
/// the median of --repeats laps after a warm-up lap, with [min, max]; the speed-up is the ratio
/// of medians against the first (smallest) thread count.
extension Bench {
    func scalingThreadCounts() throws -> [Int] {
        if let s = scalingThreads {
            let parts = s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            let counts = try parts.map { p -> Int in
                guard let n = Int(p), n > 0 else { throw ValidationError("--scaling-threads: '\(p)' is not a positive thread count") }
                return n
            }
            guard !counts.isEmpty else { throw ValidationError("--scaling-threads: no thread count given") }
            return counts
        }
        let cores = Parallel.availableCores
        var out: [Int] = []
        var t = 1
        while t < cores { out.append(t); t *= 2 }
        out.append(cores)
        return out
    }

    func runScaling() throws {
        let counts = try scalingThreadCounts()
        var out = JSONObject()
        var lines: [String] = []
        // Progress goes to stderr in both modes (a scaling run takes minutes; with --json, stdout has only the JSON).
        func say(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }
        out.set("cores", .int(Int64(Parallel.availableCores)))
        out.set("openblas", .string(BLAS.configuration))
        out.set("repeats", .int(Int64(repeats)))
        out.set("batch", .int(Int64(batch)))
        out.set("seq", .int(Int64(seq)))
        out.set("thread_counts", .array(counts.map { .int(Int64($0)) }))
        lines.append(
            "scaling over threads \(counts.map(String.init).joined(separator: ", ")) (\(Parallel.availableCores) cores; "
                + "\(BLAS.configuration)); batch \(batch)×\(seq); tokens/s: median [min, max] of \(repeats) laps after a warm-up")
        say(lines.last!)
        var shapesJSON: [JSONValue] = []
        for name in shapeNames {
            let (model, stream) = try loadShape(name)
            let N = batch * seq
            let evalStream = Array(stream.prefix(N * 2 + 1))
            var rows: [JSONValue] = []
            var table = [
                "| threads | forward tok/s | QAT step tok/s | QAD step tok/s | speed-up fwd / QAT / QAD |",
                "|---|---|---|---|---|",
            ]
            var base: (Double, Double, Double)?
            for t in counts {
                BLAS.setThreads(t)
                let fwd = try Laps.run(repeats: repeats) {
                    _ = try Evaluation.evaluate(model: model, stream: evalStream, seqLen: seq, batchSize: batch, maxSequences: 2 * batch)
                }.time.map { Double(2 * N) / $0 }
                let qat = try trainerLaps(name, mode: "qat", like: model, stream: stream, evalStream: evalStream, peaks: false)
                    .laps.time.map { Double(N) / $0 }
                let qad = try trainerLaps(name, mode: "qad", like: model, stream: stream, evalStream: evalStream, peaks: false)
                    .laps.time.map { Double(N) / $0 }
                let b = base ?? (fwd.median, qat.median, qad.median)
                base = b
                var r = JSONObject()
                r.set("threads", .int(Int64(t)))
                r.set("forward_tokens_per_s", fwd.json)
                r.set("qat_tokens_per_s", qat.json)
                r.set("qad_tokens_per_s", qad.json)
                r.set("speedup_forward", .double(fwd.median / b.0))
                r.set("speedup_qat", .double(qat.median / b.1))
                r.set("speedup_qad", .double(qad.median / b.2))
                rows.append(.object(r))
                table.append(
                    "| \(t) | \(fwd.text(0)) | \(qat.text(0)) | \(qad.text(0)) | "
                        + String(format: "%.2f× / %.2f× / %.2f×", fwd.median / b.0, qat.median / b.1, qad.median / b.2) + " |")
                say("[\(name)] " + table.last!)
            }
            var sj = JSONObject()
            sj.set("shape", .string(name))
            sj.set("rows", .array(rows))
            shapesJSON.append(.object(sj))
            lines.append("[\(name)] \(model.parameters.reduce(0) { $0 + $1.count }) parameters, batch \(batch)×\(seq)")
            lines += table
        }
        out.set("shapes", .array(shapesJSON))
        if json { print(JSONValue.object(out).fileText, terminator: "") } else { print(lines.joined(separator: "\n")) }
    }
}
