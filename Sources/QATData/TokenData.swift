import Foundation

/// Token streams for training and evaluation: one flat `[Int32]` per split, documents
/// separated by the EOS id, the way `tokens.h5` stores them.
public enum TokenData {
    /// Loads the token stream of `split` ("train", "validation") from `path`:
    /// - a `.h5`/`.hdf5` file → its 1-D dataset `<split>/input_ids` (int32 or int64, any
    ///   integer type converting exactly);
    /// - a `.jsonl` file → `{"text": …}` per line, tokenized with `tokenizer`, EOS after each
    ///   document (`split` is not used: the file is the split);
    /// - a directory → its `tokens.h5` if present, else its `<split>.jsonl`.
    /// When `vocabSize` is given the ids are checked with `validate(tokens:vocabSize:)`.
    public static func load(path: String, split: String, tokenizer: Tokenizer?, vocabSize: Int? = nil) throws -> [Int32] {
        let tokens = try loadUnchecked(path: path, split: split, tokenizer: tokenizer)
        if let vocabSize { try validate(tokens: tokens, vocabSize: vocabSize, source: path) }
        return tokens
    }

    /// `load` for a recipe's or a command's data: a `.jsonl` file is tokenized with the
    /// tokenizer.json of `modelDirectory`; the ids are checked against `vocabSize`.
    public static func load(path: String, split: String, modelDirectory: String, vocabSize: Int) throws -> [Int32] {
        let tokenizer = path.hasSuffix(".jsonl") ? try Tokenizer(path: modelDirectory) : nil
        return try load(path: path, split: split, tokenizer: tokenizer, vocabSize: vocabSize)
    }

    private static func loadUnchecked(path: String, split: String, tokenizer: Tokenizer?) throws -> [Int32] {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw QATError("token data not found: \(path)")
        }
        if isDir.boolValue {
            let h5 = (path as NSString).appendingPathComponent("tokens.h5")
            if FileManager.default.fileExists(atPath: h5) { return try readHDF5(path: h5, split: split) }
            let jsonl = (path as NSString).appendingPathComponent("\(split).jsonl")
            if FileManager.default.fileExists(atPath: jsonl) {
                guard let tokenizer else { throw QATError("\(jsonl) is raw text: a tokenizer is needed to tokenize it") }
                return try readJSONL(path: jsonl, tokenizer: tokenizer)
            }
            throw QATError("\(path) holds neither tokens.h5 nor \(split).jsonl")
        }
        switch (path as NSString).pathExtension.lowercased() {
        case "h5", "hdf5":
            return try readHDF5(path: path, split: split)
        case "jsonl":
            guard let tokenizer else { throw QATError("\(path) is raw text: a tokenizer is needed to tokenize it") }
            return try readJSONL(path: path, tokenizer: tokenizer)
        default:
            throw QATError("\(path): unknown token data format (expected .h5, .jsonl or a directory with tokens.h5)")
        }
    }

    /// The 1-D integer dataset `<split>/input_ids` of an HDF5 file.
    public static func readHDF5(path: String, split: String) throws -> [Int32] {
        let f = try HDF5File(path: path)
        let name = "\(split)/input_ids"
        let info = try f.info(name)
        guard info.isInteger else {
            throw QATError("\(path): '\(name)' holds \(info.typeName); token ids must be integers (int32 or int64)")
        }
        let r = try f.read(name, as: Int32.self, rank: 1)
        guard !r.values.isEmpty else { throw QATError("\(path): '\(name)' is empty") }
        return r.values
    }

    /// Tokenizes a JSON-lines file of `{"text": …}` documents: each document's ids followed
    /// by the tokenizer's EOS id. Blank lines are skipped; a line that is not a JSON object
    /// with a string "text" is an error naming its line number, as is a file with no
    /// documents. Documents are tokenized on all cores (the tokenizer is thread-safe) and
    /// concatenated in file order, so the result does not depend on the thread count.
    public static func readJSONL(path: String, tokenizer: Tokenizer) throws -> [Int32] {
        guard let eos = tokenizer.eosTokenId else {
            throw QATError(
                "\(tokenizer.path): the tokenizer has no EOS token (<|endoftext|> or tokenizer_config.json eos_token) to separate documents"
            )
        }
        let texts = try readJSONLTexts(path: path)
        var chunks = [[Int32]](repeating: [], count: texts.count)
        chunks.withUnsafeMutableBufferPointer { buf in
            let out = SendablePointer(buf.baseAddress!)
            Parallel.forRange(texts.count, costPerItem: 4096) { start, end in
                for k in start..<end {
                    var ids = tokenizer.encode(texts[k])
                    ids.append(eos)
                    out.p[k] = ids
                }
            }
        }
        var tokens: [Int32] = []
        tokens.reserveCapacity(chunks.reduce(0) { $0 + $1.count })
        for c in chunks { tokens.append(contentsOf: c) }
        return tokens
    }

    /// The "text" of each line of a JSON-lines file, in order.
    public static func readJSONLTexts(path: String) throws -> [String] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw QATError("cannot read \(path)")
        }
        var texts: [String] = []
        var lineNo = 0
        var start = data.startIndex
        while start < data.endIndex {
            let nl = data[start...].firstIndex(of: 0x0A) ?? data.endIndex
            lineNo += 1
            let line = data[start..<nl]
            start = nl < data.endIndex ? nl + 1 : nl
            if line.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
            let obj: Any
            do { obj = try JSONSerialization.jsonObject(with: Data(line)) } catch {
                throw QATError("\(path):\(lineNo): not valid JSON")
            }
            guard let dict = obj as? [String: Any] else {
                throw QATError("\(path):\(lineNo): expected a JSON object like {\"text\": \"...\"}")
            }
            guard let text = dict["text"] as? String else {
                throw QATError("\(path):\(lineNo): missing string key \"text\"")
            }
            texts.append(text)
        }
        guard !texts.isEmpty else { throw QATError("\(path): no documents (the file is empty)") }
        return texts
    }

    /// Checks every id is in `[0, vocabSize)`; the error names the first bad position.
    public static func validate(tokens: [Int32], vocabSize: Int, source: String = "token stream") throws {
        guard vocabSize > 0 else { throw QATError("vocab size must be positive, got \(vocabSize)") }
        let limit = Int32(clamping: vocabSize)
        let bad = tokens.withUnsafeBufferPointer { buf -> Int? in
            // Unsigned compare catches negatives and too-large ids in one test.
            for i in 0..<buf.count where UInt32(bitPattern: buf[i]) >= UInt32(limit) { return i }
            return nil
        }
        if let i = bad {
            throw QATError("\(source): token id \(tokens[i]) at position \(i) is outside the vocabulary [0, \(vocabSize))")
        }
    }

    /// Writes token streams as `tokens.h5` does: int32 datasets `<split>/input_ids`,
    /// chunked and gzip-compressed.
    public static func writeHDF5(path: String, splits: [String: [Int32]]) throws {
        let f = try HDF5File(path: path, mode: .create)
        for (split, tokens) in splits.sorted(by: { $0.key < $1.key }) {
            try f.write("\(split)/input_ids", values: tokens, chunkRows: 65_536)
        }
    }
}
