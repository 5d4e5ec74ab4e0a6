import Foundation
import QATCore

/// Paths of the reference fixtures copied into the repository (Tests/Fixtures) and of the
/// embedded default model (models/fortune-lm), so tests need nothing outside the clone.
public enum Fixtures {
    public static let repoRoot: URL = {
        // .../Tests/TestSupport/Fixtures.swift -> repo root
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }()
    public static func path(_ relative: String) -> String {
        repoRoot.appendingPathComponent("Tests/Fixtures").appendingPathComponent(relative).path
    }
    public static var fortuneLM: String { repoRoot.appendingPathComponent("models/fortune-lm").path }

    /// A fresh temporary directory, removed by the caller (or left in /tmp).
    public static func tempDir(_ name: String = "qat-test") -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("\(name)-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }
}

extension Fixtures {
    /// The `qat` executable built beside the running test bundle (same build folder).
    public static var qatBinary: String? {
        var candidates: [URL] = []
        if let exe = Bundle.main.executableURL { candidates.append(exe.deletingLastPathComponent()) }
        for b in Bundle.allBundles { candidates.append(b.bundleURL.deletingLastPathComponent()) }
        candidates.append(repoRoot.appendingPathComponent(".build/release"))
        for dir in candidates {
            let p = dir.appendingPathComponent("qat").path
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    /// Whether the kernels OpenBLAS detects for this CPU (what `childEnvironment` runs) keep a
    /// product's bits when its rows are cut differently: the AVX-512 families do; the Haswell
    /// family (AVX2 CPUs, AMD Zen included) does not (README, "Determinism on AVX2 machines"), so
    /// there a batch split over ranks equals one process to round-off, which NVFP4 amplifies.
    public static var detectedBLASKeepsRowCuts: Bool {
        ["SkylakeX", "Cooperlake"].contains(BLASCore.bestCore(flags: BLASCore.cpuFlags()) ?? "")
    }

    /// The environment of every qat process a test starts: this one's, with the BLAS kernels
    /// OpenBLAS detects for this CPU whatever OPENBLAS_CORETYPE the shell forces (empty means
    /// "detect"), then `overrides`. End-to-end tests compare runs with each other (resumed with
    /// uninterrupted, several ranks with one process), and a shell's forced Haswell family moves
    /// bits when rows move between products (README, "Determinism on AVX2 machines").
    public static func childEnvironment(_ overrides: [String: String] = [:]) -> [String: String] {
        var env = ProcessInfo.processInfo.environment
        env["OPENBLAS_CORETYPE"] = ""
        for (k, v) in overrides { env[k] = v }
        return env
    }

    /// Runs `qat` with arguments from the repository root; returns (exit code, stdout, stderr).
    @discardableResult
    public static func runQAT(_ args: [String], environment: [String: String] = [:]) throws -> (status: Int32, out: String, err: String) {
        guard let bin = qatBinary else {
            throw NSError(domain: "qat-tests", code: 1, userInfo: [NSLocalizedDescriptionKey: "qat binary not built"])
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: bin)
        p.arguments = args
        p.currentDirectoryURL = repoRoot
        p.environment = childEnvironment(environment)
        // Output goes to files, so a chatty child can never block on a full pipe.
        let tmp = tempDir("qat-run")
        let outURL = tmp.appendingPathComponent("out"), errURL = tmp.appendingPathComponent("err")
        FileManager.default.createFile(atPath: outURL.path, contents: nil)
        FileManager.default.createFile(atPath: errURL.path, contents: nil)
        p.standardOutput = try FileHandle(forWritingTo: outURL)
        p.standardError = try FileHandle(forWritingTo: errURL)
        try p.run()
        p.waitUntilExit()
        let outData = (try? Data(contentsOf: outURL)) ?? Data(), errData = (try? Data(contentsOf: errURL)) ?? Data()
        try? FileManager.default.removeItem(at: tmp)
        return (p.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self))
    }
}

extension Fixtures {
    /// Writes `<dir>/recipe.yaml`: a short QAT of the embedded fortune-lm (sequences of 32
    /// tokens, a few steps) that runs the whole pipeline in seconds. `trainExtra` and
    /// `exportExtra` are extra YAML lines (indented two spaces) for those sections.
    public static func shortRecipe(
        in dir: URL, steps: Int, batch: Int = 2, evalEvery: Int = 4, saveEvery: Int = 2,
        model: String = "models/fortune-lm", data: String? = nil, mode: String = "qat",
        trainExtra: [String] = [], exportExtra: [String] = []
    ) throws -> String {
        let tokens = data ?? "\(model)/tokens.h5"
        var text = """
            model: \(model)
            data:
              train: \(tokens)
              validation: \(tokens)
              seq_len: 32
              validation_sequences: 4
            quantize:
              preset: nvfp4_default-kv_fp8
            calibration:
              samples: 4
              batch_size: 4
            train:
              mode: \(mode)
              steps: \(steps)
              batch_size: \(batch)
              lr: 1.0e-4
              warmup_steps: 1
              eval_every: \(evalEvery)
              save_every: \(saveEvery)
              log_every: 1

            """
        for l in trainExtra { text += "  \(l)\n" }
        text += "export:\n  dir: \(dir.appendingPathComponent("export").path)\n"
        for l in exportExtra { text += "  \(l)\n" }
        let path = dir.appendingPathComponent("recipe.yaml").path
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }
}
