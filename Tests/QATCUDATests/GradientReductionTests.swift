import QATCUDA
import QATCore
import QATModels
import QATTrain
import XCTest

/// The host side of the GPU optimizer's reductions: the `sumsq_chunks` table and the clip
/// coefficient that `adamw_update` multiplies the gradient by.
final class GradientReductionTests: XCTestCase {
    /// Every element of every tensor in exactly one chunk, in order, none longer than the chunk
    /// size; a tensor's sum is its own chunks' partials in order; empty tensors own no chunk.
    func testGradientChunksCoverEveryTensorInOrder() {
        let tensors: [(address: UInt64, count: Int)] = [(0x1000, 10), (0x9000, 0), (0x20000, 25), (0x90000, 8)]
        let plan = GradientChunks(tensors, chunkFloats: 8)
        XCTAssertEqual(plan.first, [0, 2, 2, 6, 7])
        XCTAssertEqual(plan.count, 7)
        XCTAssertEqual(
            plan.table,
            [0x1000, 8, 0x1020, 2, 0x20000, 8, 0x20020, 8, 0x20040, 8, 0x20060, 1, 0x90000, 8])
        let partials = (0..<plan.count).map { Double($0 + 1) }
        XCTAssertEqual(plan.tensorSums(partials), [3.0, 0, 18, 7] as [Double])  // (1 + 2, none, 3 + 4 + 5 + 6, 7)
        XCTAssertEqual(GradientChunks([], chunkFloats: 8).tensorSums([]), [])
        XCTAssertEqual(GradientChunks(tensors).count, 3)  // the default chunk holds each of these whole
        XCTAssertNotEqual(GradientChunks(tensors), GradientChunks(tensors, chunkFloats: 8))
    }

    /// The device's clip-in-AdamW gives the CPU's clipped gradient bit for bit: g·clipCoefficient
    /// equals what GradientClipping.scale leaves in the tensor, clipping or not, and a
    /// non-finite norm or no max norm changes nothing.
    func testClipCoefficientMatchesTheCPUClipping() {
        var g = SplitMix64(seed: 7)
        let values = (0..<4099).map { _ in g.nextGaussian() * 0.03 }
        for maxNorm in [0.01, 0.5, 1.0, 100.0] {
            let t = Tensor(shape: [values.count], values: values)
            let norm = GradientClipping.globalNorm([t])
            GradientClipping.scale([t], norm: norm, maxNorm: maxNorm)
            let c = CUDAStepBackend.clipCoefficient(norm: norm, maxNorm: maxNorm)
            XCTAssertEqual(c < 1, maxNorm / (norm + 1e-6) < 1)
            for i in 0..<values.count { XCTAssertEqual((values[i] * c).bitPattern, t[i].bitPattern) }
        }
        XCTAssertEqual(CUDAStepBackend.clipCoefficient(norm: .nan, maxNorm: 1), 1)
        XCTAssertEqual(CUDAStepBackend.clipCoefficient(norm: .infinity, maxNorm: 1), 1)
        XCTAssertEqual(CUDAStepBackend.clipCoefficient(norm: 5, maxNorm: nil), 1)
        XCTAssertEqual(CUDAStepBackend.clipCoefficient(norm: 4, maxNorm: 1), Float(1 / (4 + 1e-6)))
    }
}
