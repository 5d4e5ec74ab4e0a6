import QATCore

/// Token embedding lookup: out[i] = table[token[i]].
public enum Embedding {
    /// tokens: [N]; table: [V, C]; out: [N, C]. Token ids are validated by the caller.
    public static func forward(out: UnsafeMutablePointer<Float>, tokens: UnsafePointer<Int32>, table: UnsafePointer<Float>, n: Int, c: Int)
    {
        for i in 0..<n { (out + i * c).update(from: table + Int(tokens[i]) * c, count: c) }
    }

    /// dtable[token[i]] += dout[i], in token order (deterministic).
    public static func backward(
        dtable: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, tokens: UnsafePointer<Int32>, n: Int, c: Int
    ) {
        for i in 0..<n { Kernels.add(dtable + Int(tokens[i]) * c, dout + i * c, c) }
    }
}
