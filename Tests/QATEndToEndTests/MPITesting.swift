import Foundation
import QATIO
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// What the MPI end-to-end tests share: finding mpirun, a short fortune-lm recipe, starting
/// `qat` under `mpirun -np N` (loopback, run as root allowed) and reading its checkpoints.
protocol MPITesting {}

extension MPITesting {
    static var mpiEnv: [String: String] {
        [
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl": "self,vader,tcp", "OMPI_MCA_btl_tcp_if_include": "lo", "OMPI_MCA_oob_tcp_if_include": "lo",
        ]
    }

    var mpirun: String? {
        for d in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") + ["/usr/bin"] {
            let p = "\(d)/mpirun"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        return nil
    }

    func recipe(_ dir: URL, steps: Int, batch: Int, saveEvery: Int = 3, evalEvery: Int = 0, trainExtra: [String] = []) throws -> String {
        try Fixtures.shortRecipe(
            in: dir, steps: steps, batch: batch, evalEvery: evalEvery, saveEvery: saveEvery, trainExtra: trainExtra,
            exportExtra: ["verify: false"])
    }

    func prerequisites() throws -> (mpirun: String, qat: String) {
        guard let m = mpirun else { throw XCTSkip("mpirun not installed (apt-get install libopenmpi-dev openmpi-bin)") }
        guard let q = Fixtures.qatBinary else { throw XCTSkip("qat binary not built") }
        return (m, q)
    }

    func mpiProcess(_ mpirun: String, _ qat: String, ranks: Int, args: [String], log: URL, mpiArgs: [String] = []) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: mpirun)
        p.arguments = ["-np", "\(ranks)", "--oversubscribe", "--allow-run-as-root", "--bind-to", "none"] + mpiArgs + [qat] + args
        p.currentDirectoryURL = Fixtures.repoRoot
        p.environment = Fixtures.childEnvironment(Self.mpiEnv)
        FileManager.default.createFile(atPath: log.path, contents: nil)
        let h = try FileHandle(forWritingTo: log)
        p.standardOutput = h; p.standardError = h
        return p
    }

    func runMPI(_ mpirun: String, _ qat: String, ranks: Int, args: [String], dir: URL) throws -> (status: Int32, log: String) {
        let log = dir.appendingPathComponent("mpirun-\(UUID().uuidString).log")
        let p = try mpiProcess(mpirun, qat, ranks: ranks, args: args, log: log)
        try p.run()
        p.waitUntilExit()
        return (p.terminationStatus, (try? String(contentsOf: log, encoding: .utf8)) ?? "")
    }

    func weights(_ checkpoint: String) throws -> [String: [Float]] { try tensors(checkpoint + "/model.safetensors") }

    func tensors(_ file: String) throws -> [String: [Float]] {
        let f = try SafeTensorsFile(path: file)
        var out: [String: [Float]] = [:]
        for n in f.names { let t = try f.floats(n); out[n] = Array(UnsafeBufferPointer(start: t.data, count: t.count)) }
        return out
    }

    /// Largest |a − b| over tensors of the same names (a name in one set only fails).
    func maxAbsDiff(_ a: [String: [Float]], _ b: [String: [Float]], file: StaticString = #filePath, line: UInt = #line) -> Float {
        XCTAssertEqual(Set(a.keys), Set(b.keys), file: file, line: line)
        var m: Float = 0
        for (n, x) in a {
            guard let y = b[n], y.count == x.count else { XCTFail("\(n) missing or resized", file: file, line: line); continue }
            for i in 0..<x.count { m = max(m, abs(x[i] - y[i])) }
        }
        return m
    }

    func metricsLosses(_ path: String) throws -> [Double] { try metricsValues(path, key: "loss") }

    /// One number per line of metrics.jsonl that has `key`.
    func metricsValues(_ path: String, key: String) throws -> [Double] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONValue.parse(String($0))[key]?.doubleValue }
    }

    /// Starts `qat <args>` under mpirun with 2 ranks, waits for the first complete checkpoint
    /// in `checkpoints`, SIGKILLs the last rank (a child of mpirun) and waits for the job to
    /// end; asserts that it failed and left that checkpoint.
    func killRankAfterFirstCheckpoint(
        _ mpirun: String, _ qat: String, args: [String], checkpoints: String, log: URL,
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let p = try mpiProcess(mpirun, qat, ranks: 2, args: args, log: log)
        try p.run()
        let deadline = Date().addingTimeInterval(120)
        func hasCheckpoint() -> Bool {
            ((try? FileManager.default.contentsOfDirectory(atPath: checkpoints)) ?? []).contains {
                $0.hasPrefix("checkpoint-") && !$0.contains(".tmp")
            }
        }
        while !hasCheckpoint() && p.isRunning && Date() < deadline { usleep(20_000) }
        XCTAssertTrue(p.isRunning, "the run ended before it could be killed", file: file, line: line)
        let children = try childPIDs(of: p.processIdentifier)
        XCTAssertFalse(children.isEmpty, file: file, line: line)
        if let victim = children.last { kill(victim, SIGKILL) }
        p.waitUntilExit()
        XCTAssertNotEqual(p.terminationStatus, 0, file: file, line: line)
        XCTAssertTrue(hasCheckpoint(), file: file, line: line)
    }

    func childPIDs(of pid: Int32) throws -> [Int32] {
        let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(pid)/children", encoding: .utf8)) ?? ""
        return text.split(separator: " ").compactMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }
}
