import Foundation

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
