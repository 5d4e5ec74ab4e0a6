import QATCUDA
import XCTest

/// Host-side checks of the attention kernels (the numerical checks run in `qat selftest --device cuda`).
final class CUDAAttentionTests: XCTestCase {
    /// Every attention kernel the wrappers in CUDAOps+Attention.swift launch is declared by its full name.
    func testAttentionKernelsAreDeclared() {
        let source = KernelSources.files.first { $0.name == "attention" }!.source
        let names = Set(KernelSources.kernelNames(in: source))
        for k in [
            "attention_forward", "attention_forward_bf16_d64", "attention_forward_bf16_d128", "attention_backward_delta",
            "attention_backward_dkdv", "attention_backward_dq", "attention_backward_dkdv_bf16_d64",
            "attention_backward_dkdv_bf16_d128", "attention_backward_dq_bf16_d64", "attention_backward_dq_bf16_d128",
        ] {
            XCTAssertTrue(names.contains(k), "no kernel \(k) in attention.cu (declared: \(names.sorted()))")
        }
    }
}
