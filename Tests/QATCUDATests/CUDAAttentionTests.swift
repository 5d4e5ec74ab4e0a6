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
            "attention_to_bf16",
        ] {
            XCTAssertTrue(names.contains(k), "no kernel \(k) in attention.cu (declared: \(names.sorted()))")
        }
    }

    /// The bf16 kernels' shared memory: the D=128 forward and backward fit three blocks (12 warps) on a 228 KiB
    /// Hopper multiprocessor, D=64 four; every size is within the 227 KiB a block may have.
    func testBF16AttentionSharedMemoryFitsThreeBlocks() {
        XCTAssertEqual(CUDADevice.attentionForwardShared(headDim: 128), 4 * 64 * 136 * 2)
        XCTAssertEqual(CUDADevice.attentionForwardShared(headDim: 64), 4 * 64 * 72 * 2)
        for (d, blocks) in [(128, 3), (64, 4)] {
            let (dkdv, dq) = CUDADevice.attentionBackwardShared(headDim: d)
            for s in [CUDADevice.attentionForwardShared(headDim: d), dkdv, dq] {
                XCTAssertLessThanOrEqual(blocks * (s + 1024), 228 * 1024, "D=\(d): \(s) bytes")
            }
        }
        XCTAssertEqual(CUDADevice.attentionBackwardShared(headDim: 128).dkdv, (128 * 136 + 128 * 136) * 2 + 512)
        // q and dout [B,T,H,D], k and v [B,T,Hkv,D] as bf16.
        XCTAssertEqual(CUDADevice.attentionScratchBytes(nq: 1000, nk: 10), 2 * 2020)
    }
}
