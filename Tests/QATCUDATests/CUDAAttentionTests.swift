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

    /// The bf16 kernels' shared memory on a 228 KiB Hopper multiprocessor (1 KiB reserved per block): the forward fits
    /// two blocks (its launch bounds), the D=128 backward kernels three and the D=64 ones four.
    func testBF16AttentionSharedMemoryFitsTheLaunchBounds() {
        XCTAssertEqual(CUDADevice.attentionForwardShared(headDim: 128), (128 + 256) * 136 * 2)
        XCTAssertEqual(CUDADevice.attentionForwardShared(headDim: 64), (128 + 256) * 72 * 2)
        func fits(_ bytes: Int, _ blocks: Int) -> Bool { blocks * (bytes + 1024) <= 228 * 1024 }
        for (d, blocks) in [(128, 3), (64, 4)] {
            XCTAssertTrue(fits(CUDADevice.attentionForwardShared(headDim: d), 2), "forward D=\(d)")
            let (dkdv, dq) = CUDADevice.attentionBackwardShared(headDim: d)
            XCTAssertTrue(fits(dkdv, blocks) && fits(dq, blocks), "backward D=\(d): \(dkdv), \(dq) bytes")
        }
        XCTAssertEqual(CUDADevice.attentionBackwardShared(headDim: 128).dkdv, (128 * 136 + 128 * 136) * 2 + 512)
        // q and dout [B,T,H,D], k and v [B,T,Hkv,D] as bf16.
        XCTAssertEqual(CUDADevice.attentionScratchBytes(nq: 1000, nk: 10), 2 * 2020)
    }
}
