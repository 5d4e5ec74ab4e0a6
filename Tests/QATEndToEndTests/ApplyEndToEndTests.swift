import Foundation
import QATIO
import TestSupport
import XCTest

/// `qat apply` as a user runs it: a short QAT of the embedded fortune-lm (short sequences,
/// a few steps) so the whole pipeline runs in seconds.
final class ApplyEndToEndTests: XCTestCase {
    func recipe(_ dir: URL, steps: Int = 8) throws -> String { try Fixtures.shortRecipe(in: dir, steps: steps) }

    func requireBinary() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
    }

    /// A run SIGKILLed at several points — mid-training, while a checkpoint is being
    /// written, while the export is being written — and resumed each time ends with weights
    /// and an export byte-identical to an uninterrupted run of the same recipe.
    func testKilledRunResumesBitIdentical() throws {
        try requireBinary()
        let straightDir = Fixtures.tempDir("qat-straight")
        let straight = try Fixtures.runQAT(["apply", try recipe(straightDir, steps: 12), "--quiet"])
        XCTAssertEqual(straight.status, 0, straight.err)
        let final = "checkpoint-000012/model.safetensors"
        let reference = try Data(contentsOf: straightDir.appendingPathComponent("export.work/checkpoints/\(final)"))

        let dir = Fixtures.tempDir("qat-killed")
        let path = try recipe(dir, steps: 12)
        let ckpts = dir.appendingPathComponent("export.work/checkpoints")
        func exists(_ d: URL, prefix: String) -> Bool {
            ((try? FileManager.default.contentsOfDirectory(atPath: d.path)) ?? []).contains { $0.hasPrefix(prefix) }
        }
        // Each trigger: the moment to kill. Temporary directories only exist while a
        // checkpoint or the export is being written.
        let triggers: [(String, () -> Bool)] = [
            ("after checkpoint 2", { exists(ckpts, prefix: "checkpoint-000002") }),
            ("while writing checkpoint 6", { exists(ckpts, prefix: ".checkpoint-000006.tmp") }),
            ("while writing the export", { exists(dir, prefix: ".export.tmp") }),
        ]
        var kills = 0
        for (label, trigger) in triggers {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Fixtures.qatBinary!)
            p.arguments = ["apply", path, "--quiet", "--resume"]
            p.currentDirectoryURL = Fixtures.repoRoot
            p.environment = Fixtures.childEnvironment()
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            let deadline = Date().addingTimeInterval(120)
            while !trigger(), p.isRunning, Date() < deadline { usleep(200) }
            if p.isRunning {
                kill(p.processIdentifier, SIGKILL)
                kills += 1
            }
            p.waitUntilExit()
            // Whatever was interrupted, a complete checkpoint (or none) is what remains.
            for c in (try? FileManager.default.contentsOfDirectory(atPath: ckpts.path)) ?? [] where c.hasPrefix("checkpoint-") {
                XCTAssertTrue(
                    FileManager.default.fileExists(atPath: ckpts.appendingPathComponent(c + "/trainer_state.json").path),
                    "\(label): \(c) incomplete")
            }
        }
        XCTAssertGreaterThanOrEqual(kills, 2, "the runs should have been killed before finishing")
        let resumed = try Fixtures.runQAT(["apply", path, "--resume"])
        XCTAssertEqual(resumed.status, 0, resumed.err)
        XCTAssertTrue(resumed.err.contains("resumed from"), resumed.err)
        let mine = try Data(contentsOf: ckpts.appendingPathComponent(final))
        XCTAssertEqual(mine, reference, "weights after kill + resume differ from the uninterrupted run")
        for file in ["model.safetensors", "config.json", "hf_quant_config.json"] {
            let a = try Data(contentsOf: straightDir.appendingPathComponent("export/" + file))
            let b = try Data(contentsOf: dir.appendingPathComponent("export/" + file))
            XCTAssertEqual(a, b, "exported \(file) differs from the uninterrupted run's")
        }
        XCTAssertFalse(exists(dir, prefix: ".export.tmp"), "a temporary export directory was left behind")
        // metrics.jsonl has each step once.
        let metrics = try String(contentsOf: dir.appendingPathComponent("export.work/metrics.jsonl"), encoding: .utf8)
        let steps = metrics.split(separator: "\n").compactMap { try? JSONValue.parse(String($0))["step"]?.intValue }
        XCTAssertEqual(steps, Array(1...12))
    }

    /// Ctrl-C (SIGINT) finishes the step, writes a checkpoint and exits 130; --resume continues.
    func testCtrlCCheckpointsAndResumeContinues() throws {
        try requireBinary()
        let dir = Fixtures.tempDir("qat-sigint")
        let path = try recipe(dir, steps: 400)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Fixtures.qatBinary!)
        p.arguments = ["apply", path, "--set", "train.save_every=0"]
        p.currentDirectoryURL = Fixtures.repoRoot
        p.environment = Fixtures.childEnvironment()
        let errURL = dir.appendingPathComponent("stderr")
        FileManager.default.createFile(atPath: errURL.path, contents: nil)
        p.standardError = try FileHandle(forWritingTo: errURL)
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        let metrics = dir.appendingPathComponent("export.work/metrics.jsonl")
        let deadline = Date().addingTimeInterval(120)
        while p.isRunning, Date() < deadline,
            ((try? String(contentsOf: metrics, encoding: .utf8)) ?? "").split(separator: "\n").count < 3
        { usleep(2_000) }
        kill(p.processIdentifier, SIGINT)
        p.waitUntilExit()
        let err = try String(contentsOf: errURL, encoding: .utf8)
        XCTAssertEqual(p.terminationStatus, 130, err)
        XCTAssertTrue(err.contains("interrupted at step") && err.contains("--resume"), err)
        let ckpts = dir.appendingPathComponent("export.work/checkpoints")
        let saved = try FileManager.default.contentsOfDirectory(atPath: ckpts.path).filter { $0.hasPrefix("checkpoint-") }
        XCTAssertEqual(saved.count, 1, "one checkpoint written on Ctrl-C: \(saved)")
        let resumed = try Fixtures.runQAT([
            "apply", path, "--set", "train.save_every=0", "--set", "train.steps=6", "--resume", "--force-resume",
        ])
        XCTAssertEqual(resumed.status, 0, resumed.err)
        XCTAssertTrue(resumed.err.contains("resumed from"), resumed.err)
    }

    /// --resume refuses a checkpoint written by a different recipe unless forced.
    func testResumeRefusesADifferentRecipe() throws {
        try requireBinary()
        let dir = Fixtures.tempDir("qat-hash")
        let path = try recipe(dir, steps: 4)
        XCTAssertEqual(try Fixtures.runQAT(["apply", path, "--quiet"]).status, 0)
        let changed = try Fixtures.runQAT(["apply", path, "--resume", "--set", "train.lr=3e-4"])
        XCTAssertEqual(changed.status, 1)
        XCTAssertTrue(changed.err.contains("different recipe") && changed.err.contains("--force-resume"), changed.err)
        let forced = try Fixtures.runQAT(["apply", path, "--resume", "--force-resume", "--set", "train.lr=3e-4", "--quiet"])
        XCTAssertEqual(forced.status, 0, forced.err)
    }

    /// A short apply writes every output file; the summary's exported figure equals
    /// `qat eval` of the export; the exported config.json carries the save dtype.
    func testApplyWritesEverythingAndSummaryMatchesEvalOfExport() throws {
        try requireBinary()
        let dir = Fixtures.tempDir("qat-e2e")
        let path = try recipe(dir, steps: 4)
        let r = try Fixtures.runQAT(["apply", path, "--set", "export.save_dtype=float16", "--json"])
        XCTAssertEqual(r.status, 0, r.err)
        let export = dir.appendingPathComponent("export")
        let files = Set(try FileManager.default.contentsOfDirectory(atPath: export.path))
        for f in [
            "model.safetensors", "config.json", "hf_quant_config.json", "generation_config.json", "tokenizer.json",
            "qat_summary.json", "metrics.jsonl", "loss_curve.svg",
        ] {
            XCTAssertTrue(files.contains(f), "missing \(f) in \(files.sorted())")
        }
        XCTAssertFalse(files.contains { $0.contains(".tmp") }, "leftover temporary files: \(files.sorted())")

        // The summary (also printed on stdout with --json).
        let summary = try JSONValue.parse(file: export.appendingPathComponent("qat_summary.json").path)
        XCTAssertEqual(try JSONValue.parse(r.out), summary)
        let exportedLoss = try XCTUnwrap(summary["exported"]?["val_loss"]?.doubleValue)
        for key in ["unquantized", "ptq", "after_qat"] { XCTAssertNotNil(summary[key]?["val_loss"]?.doubleValue, key) }
        XCTAssertEqual(summary["verify_max_abs_logit_diff"]?.doubleValue, 0)
        XCTAssertEqual(summary["steps"]?.intValue, 4)
        XCTAssertGreaterThan(summary["source_bytes"]?.intValue ?? 0, 2 * (summary["export_bytes"]?.intValue ?? .max) - 1)

        // qat eval of the export, same protocol, reproduces the summary's figure.
        let e = try Fixtures.runQAT([
            "eval", "--model", export.path, "--data", "models/fortune-lm/tokens.h5", "--split", "validation",
            "--seq-len", "32", "--batch-size", "2", "--max-sequences", "4", "--json",
        ])
        XCTAssertEqual(e.status, 0, e.err)
        let evalLoss = try XCTUnwrap(try JSONValue.parse(e.out)["loss"]?.doubleValue)
        XCTAssertEqual(evalLoss, exportedLoss, accuracy: 1e-6)

        // dtype rewrite and the quantization block in config.json.
        let config = try JSONValue.parseObject(file: export.appendingPathComponent("config.json").path)
        XCTAssertEqual(try config.string("dtype"), "float16")
        XCTAssertEqual(try config.object("quantization_config").string("quant_method"), "modelopt")
        XCTAssertEqual(config.keys.last, "quantization_config")
        let st = try SafeTensorsFile(path: export.appendingPathComponent("model.safetensors").path)
        XCTAssertEqual(st.info("model.norm.weight")?.dtype, .f16)
        XCTAssertEqual(st.info("model.layers.0.mlp.up_proj.weight")?.dtype, .u8)
        XCTAssertEqual(st.info("model.layers.0.mlp.up_proj.weight_scale_2")?.shape, [])

        // metrics.jsonl: one line per step; the SVG is an SVG.
        let metrics = try String(contentsOf: export.appendingPathComponent("metrics.jsonl"), encoding: .utf8)
        XCTAssertEqual(metrics.split(separator: "\n").count, 4)
        let svg = try String(contentsOf: export.appendingPathComponent("loss_curve.svg"), encoding: .utf8)
        XCTAssertTrue(svg.hasPrefix("<svg") && svg.contains("polyline"))
    }

    func testBadInputsGiveClearErrors() throws {
        try requireBinary()
        let missing = try Fixtures.runQAT(["apply", "/nonexistent/recipe.yaml"])
        XCTAssertEqual(missing.status, 1)
        XCTAssertTrue(missing.err.contains("recipe not found: /nonexistent/recipe.yaml"), missing.err)

        let dir = Fixtures.tempDir("qat-bad")
        let bad = dir.appendingPathComponent("bad.yaml").path
        try "model: models/fortune-lm\ntrain:\n  mode: qat\n  stepz: 3\n".write(toFile: bad, atomically: true, encoding: .utf8)
        let r = try Fixtures.runQAT(["apply", bad])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("line 4") && r.err.contains("train.stepz") && r.err.contains("did you mean \"steps\""), r.err)
        XCTAssertFalse(r.err.contains("Fatal error"), r.err)

        let noModel = try Fixtures.runQAT(["eval", "--model", dir.path])
        XCTAssertEqual(noModel.status, 1)
        XCTAssertTrue(noModel.err.contains("no config.json"), noModel.err)
    }
}

/// `fake_quant: modelopt` (ModelOpt's Triton kernel semantics in training) through the whole
/// `qat apply`: calibrate, train, export, verify, evaluate the export.
final class ModelOptFakeQuantEndToEndTests: XCTestCase {
    func testApplyWithModelOptFakeQuant() throws {
        guard Fixtures.qatBinary != nil else { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-modelopt")
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = try Fixtures.shortRecipe(in: dir, steps: 4, evalEvery: 0, saveEvery: 0)
        let r = try Fixtures.runQAT(["apply", path, "--set", "quantize.fake_quant=modelopt"])
        XCTAssertEqual(r.status, 0, r.err)
        let s = try JSONValue.parseObject(file: dir.path + "/export/qat_summary.json")
        XCTAssertEqual(try s.int("steps"), 4)
        for row in ["unquantized", "ptq", "after_qat", "exported"] {
            let loss = try XCTUnwrap(s[row]?["val_loss"]?.doubleValue, "\(row) in \(s)")
            XCTAssertTrue(loss.isFinite && loss > 0 && loss < 10, "\(row): \(loss)")
        }
        // The export reproduces the trained model once its NVFP4 weights use the export math
        // (`Verification.alignReference`); fortune-lm has no block where the two differ.
        let diff = try XCTUnwrap(s["verify_max_abs_logit_diff"]?.doubleValue)
        XCTAssertEqual(diff, 0, r.err)
        let recipe = try String(contentsOfFile: path, encoding: .utf8)
        XCTAssertFalse(recipe.contains("fake_quant"), "the mode comes from --set alone")
        let shown = try Fixtures.runQAT(["recipe", "show", path, "--set", "quantize.fake_quant=modelopt"])
        XCTAssertTrue(shown.out.contains("fake_quant: modelopt"), shown.out + shown.err)
    }
}
