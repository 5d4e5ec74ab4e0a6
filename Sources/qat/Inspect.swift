import ArgumentParser
import Foundation
import QATCore
import QATExport
import QATIO

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the tensors of a safetensors file or checkpoint directory.",
        discussion: "Shows each tensor's name, dtype, shape and bytes, then the file metadata.\n\nExample: qat inspect models/fortune-lm")

    @Argument(help: "A .safetensors file, or a model directory (single file or sharded index).")
    var path: String

    @Flag(help: "Print JSON instead of a table.")
    var json = false

    func run() throws {
        try QAT.guarded {
            let ckpt = try ModelWeights(path: path)
            var rows: [(String, SafeTensorInfo)] = []
            for n in ckpt.names { if let i = ckpt.info(n) { rows.append((n, i)) } }
            let totalBytes = rows.reduce(0) { $0 + $1.1.byteCount }
            let totalElements = rows.reduce(0) { $0 + $1.1.elementCount }
            var metadata: [(key: String, value: String)] = []
            if let first = rows.first, let f = ckpt.file(for: first.0) { metadata = f.metadata }
            if json {
                var out = JSONObject()
                out.set("path", .string(path))
                out.set(
                    "tensors",
                    .array(
                        rows.map { n, i in
                            .object(
                                JSONObject([
                                    ("name", .string(n)), ("dtype", .string(i.dtype.rawValue)),
                                    ("shape", .array(i.shape.map { .int(Int64($0)) })), ("bytes", .int(Int64(i.byteCount))),
                                ]))
                        }))
                out.set("total_bytes", .int(Int64(totalBytes)))
                out.set("total_elements", .int(Int64(totalElements)))
                out.set("metadata", .object(JSONObject(metadata.map { ($0.key, JSONValue.string($0.value)) })))
                print(JSONValue.object(out).serialized(), terminator: "")
                return
            }
            let w = max(4, rows.map(\.0.count).max() ?? 4)
            print("name".padding(toLength: w, withPad: " ", startingAt: 0) + "  dtype    shape                 bytes")
            for (n, i) in rows {
                let shape = "[" + i.shape.map(String.init).joined(separator: ", ") + "]"
                print(
                    n.padding(toLength: w, withPad: " ", startingAt: 0) + "  "
                        + i.dtype.rawValue.padding(toLength: 8, withPad: " ", startingAt: 0) + " "
                        + shape.padding(toLength: 20, withPad: " ", startingAt: 0) + " " + String(i.byteCount))
            }
            print("\(rows.count) tensors, \(totalElements) elements, \(formatBytes(totalBytes))")
            for m in metadata { print("metadata \(m.key) = \(m.value)") }
            if let d = exportDescription(path) { print(d) }
        }
    }
}

func formatBytes(_ b: Int) -> String {
    let d = Double(b)
    if d >= 1_073_741_824 { return String(format: "%.2f GiB", d / 1_073_741_824) }
    if d >= 1_048_576 { return String(format: "%.2f MiB", d / 1_048_576) }
    if d >= 1024 { return String(format: "%.1f KiB", d / 1024) }
    return "\(b) B"
}

/// "export format: compressed-tensors (NVFP4, FP8 KV cache)" for a quantized export directory.
func exportDescription(_ path: String) -> String? {
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue,
        (try? ExportedModel.isQuantizedExport(directory: path)) == true,
        let format = try? ExportFormat.of(directory: path),
        let section = try? ExportedModel.quantizationSection(directory: path)
    else { return nil }
    return "export format: \(format.rawValue) (\(section.algo ?? "no quantized Linears")\(section.kv.map { ", \($0) KV cache" } ?? ""))"
}
