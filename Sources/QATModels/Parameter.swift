import QATCore

/// A named model parameter (HF name) with its fp32 master value and, when trainable, a
/// gradient buffer of the same shape. Frozen parameters carry no gradient.
public final class Parameter: @unchecked Sendable {
    public let name: String
    public let value: Tensor
    public private(set) var grad: Tensor?

    public init(name: String, value: Tensor) {
        self.name = name
        self.value = value
    }

    public var shape: [Int] { value.shape }
    public var count: Int { value.count }
    public var requiresGrad: Bool { grad != nil }

    /// Allocates (or drops) the gradient buffer.
    public func setRequiresGrad(_ on: Bool) {
        if on { if grad == nil { grad = Tensor(shape: value.shape) } } else { grad = nil }
    }
}
