import Foundation
import QATCUDA
import QATCore
import QATModels
import TestSupport
import XCTest

/// The CUDA backend's host side, on any machine: device and precision parsing, the kernel
/// sources, and the clear error when no GPU or driver is present. The kernels themselves are
/// compiled by `scripts/test.sh` (NVRTC from PyPI, no GPU) and compared with the CPU by
/// `qat selftest --device cuda` on a GPU host.
final class CUDABackendTests: XCTestCase {
    func testDeviceParsing() throws {
        XCTAssertEqual(try ComputeDevice(parsing: "cpu"), .cpu)
        XCTAssertEqual(try ComputeDevice(parsing: "cuda"), .cuda(0))
        XCTAssertEqual(try ComputeDevice(parsing: " CUDA:3 "), .cuda(3))
        XCTAssertEqual(ComputeDevice.cuda(2).description, "cuda:2")
        XCTAssertEqual(ComputeDevice.cuda(0).description, "cuda")
        for bad in ["tpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            XCTAssertThrowsError(try ComputeDevice(parsing: bad), bad) { error in
                XCTAssertTrue("\(error)".contains("is not one of cpu, cuda, cuda:N"), "\(error)")
            }
        }
        XCTAssertEqual(try Precision(parsing: "BF16"), .bf16)
        XCTAssertThrowsError(try Precision(parsing: "fp16"))
    }

    func testKernelSourcesDeclareEveryKernelOnce() {
        var seen = Set<String>()
        for file in KernelSources.files {
            let names = KernelSources.kernelNames(in: file.source)
            XCTAssertFalse(names.isEmpty, file.name)
            for n in names {
                XCTAssertFalse(n.isEmpty || n.hasPrefix("__"), "\(file.name): bad kernel name \(n)")
                XCTAssertTrue(seen.insert(n).inserted, "kernel \(n) defined twice")
            }
            // The program NVRTC compiles starts with the shared helpers.
            XCTAssertTrue(KernelSources.program(file).hasPrefix(KernelSources.common))
        }
        // Every kernel the host code launches exists (names from Sources/QATCUDA/CUDAOps.swift).
        for k in [
            "embedding_forward", "add_inplace", "add_bias", "swiglu_forward", "to_bf16", "rmsnorm_forward", "rmsnorm_nvfp4",
            "rmsnorm_backward", "swiglu_nvfp4", "adamw_update", "rope_apply", "attention_forward", "attention_forward_bf16_d64",
            "attention_forward_bf16_d128", "nvfp4_fake_quant", "nvfp4_fake_quant_quads", "swiglu_nvfp4_quads",
            "fp8_fake_quant", "int8_fake_quant", "absmax_reduce", "cross_entropy_rows", "cross_entropy_backward_bf16", "kd_rows_bf16",
            "rmsnorm_forward_warps", "rmsnorm_backward_warps", "rmsnorm_backward_dw_warps",
        ] {
            XCTAssertTrue(seen.contains(k), "no kernel \(k)")
        }
    }

    /// Which RMSNorm rows run a warp per row: float4 rows of at most 128 floats, aligned arrays, a bf16 copy 8-byte
    /// aligned in rows a multiple of 4 apart; anything else the block kernels.
    func testRMSNormWarpRowsCondition() {
        XCTAssertEqual(CUDADevice.rmsnormWarpRow, 128)
        for c in [4, 64, 100, 128] { XCTAssertTrue(CUDADevice.rmsnormWarpRows(c: c, [0, 256, 4096]), "c = \(c)") }
        for c in [0, 2, 126, 132, 2048] { XCTAssertFalse(CUDADevice.rmsnormWarpRows(c: c, [256]), "c = \(c)") }
        XCTAssertFalse(CUDADevice.rmsnormWarpRows(c: 128, [256, 260]))  // one array off 16 bytes
        XCTAssertTrue(CUDADevice.rmsnormWarpRows(c: 128, [256], bf16: 8, bf16Stride: 3 * 128 + 4))
        XCTAssertFalse(CUDADevice.rmsnormWarpRows(c: 128, [256], bf16: 4))
        XCTAssertFalse(CUDADevice.rmsnormWarpRows(c: 128, [256], bf16: 8, bf16Stride: 3 * 128 + 2))
    }

    func testKernelNameParserSkipsLaunchBounds() {
        let src = """
            extern "C" __global__ void a_kernel(float *x) {}
            extern "C" __global__ void __launch_bounds__(128) b_kernel(float *x) {}
            """
        XCTAssertEqual(KernelSources.kernelNames(in: src), ["a_kernel", "b_kernel"])
    }

    /// Without a GPU (CI), opening one fails with a one-line error naming what is missing; with
    /// one, it opens and reports a compute capability.
    func testOpeningTheGPUFailsClearlyOrWorks() {
        do {
            let d = try CUDADevice.open(0)
            XCTAssertGreaterThanOrEqual(d.computeCapability.major, 5)
        } catch let e as QATError {
            XCTAssertFalse(e.message.contains("\n"), e.message)
            XCTAssertTrue(e.message.contains("CUDA") || e.message.contains("GPU") || e.message.contains("cuBLAS"), e.message)
        } catch {
            XCTFail("unexpected error \(error)")
        }
    }

    func testSelftestModelShapesCoverEveryFamilyFeature() throws {
        let configs = CUDASelftest.modelConfigs.map(\.1)
        XCTAssertEqual(Set(configs.map(\.family)), [.llama, .mistral, .qwen2, .qwen3])  // the dense families
        XCTAssertTrue(configs.contains { $0.qkNorm && $0.tieWordEmbeddings && $0.headDim != $0.hiddenSize / $0.numHeads })
        XCTAssertTrue(configs.contains { $0.slidingWindow != nil })
        XCTAssertTrue(configs.contains { $0.attentionBias })
        XCTAssertTrue(configs.contains { $0.vocabSize % 4 != 0 })  // the loss rows' element path, unaligned bf16 logits
        XCTAssertTrue(
            configs.contains {
                if case .llama3 = $0.ropeScaling { return true }; return false
            })
        for c in configs { _ = try CausalLM(config: c, seed: 1) }  // each builds
    }
}
