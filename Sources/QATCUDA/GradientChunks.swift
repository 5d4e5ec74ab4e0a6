/// The chunk table of `sumsq_chunks` (optim.cu): every gradient cut into chunks of at most
/// `chunkFloats` floats, one block each, so that one launch computes Σ g² over the whole
/// gradient arena. Each tensor's sum is its chunks' partials added in chunk order: fixed for a
/// given list, so the per-tensor sums (that name a non-finite gradient) and the norm are
/// deterministic. A pure function of the (address, count) list, built on the host.
public struct GradientChunks: Equatable {
    /// The default chunk: 64 Ki floats (256 KiB), ~9,000 blocks for 0.6B parameters.
    public static let defaultChunkFloats = 65_536

    /// (address, length) of every chunk, flattened, as the kernel reads it.
    public let table: [UInt64]
    /// Tensor i owns chunks `first[i] ..< first[i + 1]` (a tensor of no elements owns none).
    public let first: [Int]

    public init(_ tensors: [(address: UInt64, count: Int)], chunkFloats: Int = defaultChunkFloats) {
        precondition(chunkFloats > 0)
        var table: [UInt64] = [], first: [Int] = []
        for t in tensors {
            first.append(table.count / 2)
            var start = 0
            while start < t.count {
                let n = min(chunkFloats, t.count - start)
                table.append(t.address + UInt64(start * 4))
                table.append(UInt64(n))
                start += n
            }
        }
        first.append(table.count / 2)
        self.table = table
        self.first = first
    }

    /// How many chunks (blocks, partials).
    public var count: Int { table.count / 2 }

    /// Each tensor's Σ g²: its chunks' partials added in order.
    public func tensorSums(_ partials: [Double]) -> [Double] {
        (0..<(first.count - 1)).map { i in
            var s = 0.0
            for c in first[i]..<first[i + 1] { s += partials[c] }
            return s
        }
    }
}
