/// What a model layer needs from a fake quantizer. Declared here, implemented by
/// `QATQuant.TensorQuantizer`, so that model code does not depend on the quantization
/// module (which in turn needs the model to place its quantizers by module name).
public protocol FakeQuantHook: AnyObject {
    /// The quantizer's full name, e.g. `model.layers.0.self_attn.q_proj.input_quantizer`.
    var name: String { get }
    /// True when `forward` changes values (enabled and calibrated). While calibrating, or
    /// when disabled, `forward` copies its input and layers may skip it.
    var isQuantizing: Bool { get }
    /// True while collecting amax statistics.
    var isCalibrating: Bool { get }
    /// Fake-quantizes `x` ([rows, cols], blocks along `cols`) into `out` (may equal `x`).
    /// While calibrating it records the running max |x| and copies `x`.
    func forward(_ x: UnsafePointer<Float>, _ out: UnsafeMutablePointer<Float>, rows: Int, cols: Int) throws
    /// Straight-through estimator: `gradIn = gradOut`, or zero where |x| > amax when the
    /// quantizer's STE is clipped. `gradIn` may equal `gradOut`.
    func backward(x: UnsafePointer<Float>, gradOut: UnsafePointer<Float>, gradIn: UnsafeMutablePointer<Float>, count: Int)
    /// True when `backward` is the identity (`gradIn = gradOut`), so a layer may write the
    /// gradient where it is needed instead of copying it there.
    var isPassThrough: Bool { get }
    /// True when `forward` of this and of `other` give the same output for every input (both
    /// quantizing, same format, amax and rounding mode): layers that read one input (q/k/v,
    /// gate/up) then quantize it once.
    func quantizesLike(_ other: FakeQuantHook) -> Bool
}

extension FakeQuantHook {
    public var isPassThrough: Bool { false }
    public func quantizesLike(_ other: FakeQuantHook) -> Bool { false }
}
