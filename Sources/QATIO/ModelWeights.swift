import QATCore

/// A model's weights, whether in one file or sharded.
///
/// Accepts a directory holding `model.safetensors.index.json` (sharded; preferred when both
/// exist, as transformers does) or `model.safetensors`, or a path to a single `.safetensors`
/// file. All files are mapped and validated up front, and for a sharded checkpoint every
/// tensor the index names must exist in its shard, so a broken download fails at load with
/// the file to fetch again rather than halfway through training.
public final class ModelWeights: @unchecked Sendable {
    public let directory: String
    /// The files, in the order they are first referenced.
    public let files: [SafeTensorsFile]
    /// The index's `metadata` object (sharded checkpoints), else nil.
    public let indexMetadata: JSONObject?
    public var isSharded: Bool { indexMetadata != nil || files.count > 1 }

    private let location: [String: (file: Int, info: SafeTensorInfo)]
    private let order: [String]

    /// All tensor names: header order for a single file, the index's order for a sharded one.
    public var names: [String] { order }

    public init(path: String) throws {
        // A single file: the path itself, or a directory's model.safetensors when it has no index.
        var single: String? = nil
        let indexPath = joinPath(path, "model.safetensors.index.json")
        if !isDirectory(path) {
            guard fileExists(path) else { throw QATError("\(path): no such file or directory") }
            directory = directoryName(path)
            single = path
        } else {
            directory = path
            if !fileExists(indexPath) {
                let singlePath = joinPath(path, "model.safetensors")
                guard fileExists(singlePath) else {
                    throw QATError("\(path): no model.safetensors or model.safetensors.index.json in this directory")
                }
                single = singlePath
            }
        }
        if let single {
            let f = try SafeTensorsFile(path: single)
            files = [f]
            indexMetadata = nil
            order = f.names
            var loc: [String: (file: Int, info: SafeTensorInfo)] = [:]
            for t in f.tensors { loc[t.name] = (0, t) }
            location = loc
            return
        }

        let index = try JSONValue.parseObject(file: indexPath)
        let weightMap = try index.object("weight_map")
        indexMetadata = try index.optionalObject("metadata") ?? JSONObject()
        var fileIndex: [String: Int] = [:]
        var opened: [SafeTensorsFile] = []
        var loc: [String: (file: Int, info: SafeTensorInfo)] = [:]
        var names: [String] = []
        names.reserveCapacity(weightMap.count)
        for (name, v) in weightMap.entries {
            guard case .string(let shard) = v else {
                throw QATError("\(indexPath): weight_map \"\(name)\" must name a file, found \(v.kindName) \(v.brief)")
            }
            // Shards live next to the index; refuse paths that would read elsewhere.
            guard !shard.isEmpty, !shard.hasPrefix("/"), !shard.split(separator: "/").contains("..") else {
                throw QATError("\(indexPath): weight_map \"\(name)\" names \"\(shard)\", which is not a file inside \(path)")
            }
            let fi: Int
            if let i = fileIndex[shard] {
                fi = i
            } else {
                let shardPath = joinPath(path, shard)
                guard fileExists(shardPath) else {
                    throw QATError("\(indexPath): shard \"\(shard)\" (holding \"\(name)\") is missing from \(path)")
                }
                opened.append(try SafeTensorsFile(path: shardPath))
                fi = opened.count - 1
                fileIndex[shard] = fi
            }
            guard let info = opened[fi].info(name) else {
                throw QATError("\(indexPath): tensor \"\(name)\" is listed in shard \"\(shard)\" but that file does not contain it")
            }
            if loc[name] == nil { names.append(name) }
            loc[name] = (fi, info)
        }
        files = opened
        location = loc
        order = names
    }

    public func info(_ name: String) -> SafeTensorInfo? { location[name]?.info }

    public func file(for name: String) -> SafeTensorsFile? { location[name].map { files[$0.file] } }

    private func require(_ name: String) throws -> SafeTensorsFile {
        guard let f = file(for: name) else { throw QATError("\(directory): checkpoint has no tensor named \"\(name)\"") }
        return f
    }

    public func bytes(_ name: String) throws -> UnsafeRawBufferPointer { try require(name).bytes(name) }
    public func floats(_ name: String) throws -> Tensor { try require(name).floats(name) }
    public func floats(_ name: String, into dst: UnsafeMutablePointer<Float>) throws { try require(name).floats(name, into: dst) }
    public func integers(_ name: String) throws -> [Int64] { try require(name).integers(name) }

    /// Sum of all tensors' byte sizes.
    public var totalBytes: Int { location.values.reduce(0) { $0 + $1.info.byteCount } }
}
