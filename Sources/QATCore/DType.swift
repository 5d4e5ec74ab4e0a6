/// Element types of safetensors files, named as in the safetensors header.
public enum DType: String, CaseIterable, Sendable {
    case f32 = "F32", f16 = "F16", bf16 = "BF16"
    case f8e4m3 = "F8_E4M3", f8e5m2 = "F8_E5M2"
    case u8 = "U8", i8 = "I8", i32 = "I32", i64 = "I64", bool = "BOOL"

    public var byteSize: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16: return 2
        case .f8e4m3, .f8e5m2, .u8, .i8, .bool: return 1
        case .i64: return 8
        }
    }

    /// Whether values convert to and from Float (floating types only).
    public var isFloatingPoint: Bool {
        switch self {
        case .f32, .f16, .bf16, .f8e4m3, .f8e5m2: return true
        default: return false
        }
    }

    /// The `torch_dtype` / `dtype` spelling used in config.json (`bfloat16`, …).
    public var torchName: String? {
        switch self {
        case .f32: return "float32"
        case .f16: return "float16"
        case .bf16: return "bfloat16"
        default: return nil
        }
    }

    /// Parses `bfloat16`, `float16`, `float32` (and the short forms `bf16`, `fp16`, `fp32`).
    public init?(torchName: String) {
        switch torchName.lowercased() {
        case "float32", "fp32", "f32", "float": self = .f32
        case "float16", "fp16", "f16", "half": self = .f16
        case "bfloat16", "bf16": self = .bf16
        default: return nil
        }
    }
}
