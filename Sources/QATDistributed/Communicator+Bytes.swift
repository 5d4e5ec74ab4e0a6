import Foundation

extension Communicator {
    /// Broadcasts raw bytes from `root` (an NCCL unique id, say): they travel as the bit
    /// patterns of fp32 words through `broadcast(_:count:root:)`, which copies and never
    /// computes, so every byte arrives as sent (a tail of fewer than 4 bytes is padded with zeros).
    public func broadcast(bytes: inout [UInt8], root: Int) throws {
        guard isDistributed else { return }
        let words = (bytes.count + 3) / 4
        guard words > 0 else { return }
        var staging = [Float](repeating: 0, count: words)
        staging.withUnsafeMutableBytes { dst in bytes.withUnsafeBytes { dst.copyMemory(from: $0) } }
        try staging.withUnsafeMutableBufferPointer { try broadcast($0.baseAddress!, count: words, root: root) }
        let n = bytes.count
        staging.withUnsafeBytes { src in bytes.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<n])) }
        }
    }
}
