import Foundation
import QATIO
import TestSupport
import XCTest

/// `--device cuda` as a user meets it on a machine without a GPU (CI): one clear line and exit
/// 1, before any model is loaded; recipe keys `device` / `precision`. (On a GPU host the same
/// eval must give fortune-lm's figure.)
final class CUDAEndToEndTests: XCTestCase {
    func testEvalOnCUDAGivesTheFigureOrOneLineError() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let r = try Fixtures.runQAT(["eval", "--device", "cuda", "--json"])
        if r.status == 0 {
            let loss = try XCTUnwrap(JSONValue.parse(r.out.trimmingCharacters(in: .whitespacesAndNewlines))["loss"]?.doubleValue)
            XCTAssertEqual(loss, 3.7709, accuracy: 5e-4)
        } else {
            XCTAssertEqual(r.status, 1, r.err)
            let lines = r.err.split(separator: "\n").filter { !$0.isEmpty }
            XCTAssertEqual(lines.count, 1, r.err)
            XCTAssertTrue(lines.first?.hasPrefix("error: ") == true, r.err)
            XCTAssertTrue(r.err.contains("CUDA") || r.err.contains("GPU"), r.err)
        }
    }

    func testRecipeDeviceKeys() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-cuda-recipe")
        defer { try? FileManager.default.removeItem(at: dir) }
        let good = dir.appendingPathComponent("good.yaml").path
        try "model: models/fortune-lm\ndevice: cuda:1\nprecision: bf16\n".write(toFile: good, atomically: true, encoding: .utf8)
        let shown = try Fixtures.runQAT(["recipe", "show", good])
        XCTAssertEqual(shown.status, 0, shown.err)
        XCTAssertTrue(shown.out.contains("device: cuda:1\nprecision: bf16"), shown.out)
        let bad = dir.appendingPathComponent("bad.yaml").path
        try "model: models/fortune-lm\ndevice: tpu\n".write(toFile: bad, atomically: true, encoding: .utf8)
        let r = try Fixtures.runQAT(["recipe", "validate", bad])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.err.contains("device") && r.err.contains("line 2"), r.err)
    }

    /// QAT/QAD, LoRA-QAT, QLoRA-QAD and QAD from a top-k teacher cache run on the GPU
    /// (`CUDAStepBackend`): without a GPU, one line that says so (the top-k recipe here fails on
    /// its missing cache first); nothing of these is refused as CPU-only.
    func testTrainingOnCUDA() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        for recipe in ["recipes/default.yaml", "recipes/fortune-lm-lora-qat.yaml", "recipes/fortune-lm-qlora-qad.yaml"] {
            let dir = Fixtures.tempDir("qat-cuda-train")
            defer { try? FileManager.default.removeItem(at: dir) }
            let r = try Fixtures.runQAT([
                "apply", recipe, "--device", "cuda", "--quiet", "--set", "train.steps=2", "--set", "export.dir=" + dir.path,
            ])
            if r.status != 0 {
                XCTAssertEqual(r.status, 1, recipe + ": " + r.err)
                XCTAssertEqual(r.err.split(separator: "\n").filter { !$0.isEmpty }.count, 1, recipe + ": " + r.err)
                XCTAssertTrue(r.err.contains("CUDA") || r.err.contains("GPU"), recipe + ": " + r.err)
                XCTAssertFalse(r.err.contains("CPU only"), recipe + ": " + r.err)
            }
        }
        let topK = try Fixtures.runQAT([
            "apply", "recipes/fortune-lm-qad-topk.yaml", "--device", "cuda", "--quiet", "--set",
            "train.distill.teacher_logprobs=" + Fixtures.tempDir("qat-cuda-topk").appendingPathComponent("missing.h5").path,
        ])
        XCTAssertEqual(topK.status, 1, topK.err)
        XCTAssertFalse(topK.err.contains("CPU only"), topK.err)
        XCTAssertTrue(topK.err.contains("teacher cache not found"), topK.err)
        XCTAssertEqual(topK.err.split(separator: "\n").filter { !$0.isEmpty }.count, 1, topK.err)
    }

    /// `qat teacher-logprobs --device cuda`: a top-k cache is written on the GPU (here, without a
    /// GPU, one line that says so); a sampled cache and k above the GPU's limit are refused by name
    /// before the model is read.
    func testTeacherLogprobsOnCUDA() throws {
        if Fixtures.qatBinary == nil { throw XCTSkip("qat binary not built beside the tests") }
        let dir = Fixtures.tempDir("qat-cuda-teacher")
        defer { try? FileManager.default.removeItem(at: dir) }
        let out = dir.appendingPathComponent("top8.h5").path
        let base = ["teacher-logprobs", "--device", "cuda", "--seq-len", "32", "--max-sequences", "2", "--out", out]
        let r = try Fixtures.runQAT(base + ["--top-k", "8"])
        if r.status == 0 {
            XCTAssertTrue(FileManager.default.fileExists(atPath: out), r.out)
        } else {
            XCTAssertEqual(r.status, 1, r.err)
            XCTAssertEqual(r.err.split(separator: "\n").filter { !$0.isEmpty }.count, 1, r.err)
            XCTAssertTrue(r.err.contains("CUDA") || r.err.contains("GPU"), r.err)
            XCTAssertFalse(r.err.contains("not written yet"), r.err)
        }
        for (extra, what) in [(["--sample", "4"], "--sample runs on the CPU"), (["--top-k", "4096"], "above the GPU's limit of 2048")] {
            let refused = try Fixtures.runQAT(base + extra)
            XCTAssertEqual(refused.status, 1, refused.err)
            XCTAssertTrue(refused.err.contains(what), refused.err)
            XCTAssertEqual(refused.err.split(separator: "\n").filter { !$0.isEmpty }.count, 1, refused.err)
        }
    }
}
