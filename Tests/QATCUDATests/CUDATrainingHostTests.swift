import QATCUDA
import QATTrain
import XCTest

/// The host side of GPU training that runs without a GPU.
final class CUDATrainingHostTests: XCTestCase {
    /// The embedding backward's grouping: every position once, grouped by token in increasing
    /// id, positions increasing within a token (the CPU's summation order), one start per token.
    func testEmbeddingGroupsKeepThePositionOrderOfEveryToken() {
        let tokens: [Int32] = [5, 2, 5, 9, 2, 2, 0, 5]
        let g = EmbeddingGroups.plan(tokens)
        XCTAssertEqual(g.ids, [0, 2, 5, 9])
        XCTAssertEqual(g.starts, [0, 1, 4, 7, 8])
        XCTAssertEqual(g.order, [6, 1, 4, 5, 0, 2, 7, 3])
        for u in 0..<g.ids.count {
            let positions = g.order[Int(g.starts[u])..<Int(g.starts[u + 1])]
            XCTAssertEqual(Array(positions), positions.sorted())
            XCTAssertTrue(positions.allSatisfy { tokens[Int($0)] == g.ids[u] })
        }
        let empty = EmbeddingGroups.plan([])
        XCTAssertEqual(empty.ids, [])
        XCTAssertEqual(empty.starts, [0])
    }

    /// The lm_head's weight gradient is one product per group of loss chunks: about 2,048 rows,
    /// never more chunks than the batch has, at most 8, at least 1.
    func testLMHeadWeightGradientGroups() {
        XCTAssertEqual(CUDAModel.lmHeadGroup(rows: 523, n: 8192), 4)  // Llama-3.2-1B's chunks: 2,092 rows a product
        XCTAssertEqual(CUDAModel.lmHeadGroup(rows: 441, n: 8192), 5)  // Qwen3-0.6B's: 2,205
        XCTAssertEqual(CUDAModel.lmHeadGroup(rows: 523, n: 1000), 2)  // two chunks in all
        XCTAssertEqual(CUDAModel.lmHeadGroup(rows: 4096, n: 4096), 1)  // one chunk of 4,096 rows
        XCTAssertEqual(CUDAModel.lmHeadGroup(rows: 16, n: 4096), 8)  // small vocabularies: at most 8 chunks
        XCTAssertEqual(CUDAModel.lmHeadGroup(rows: 256, n: 256), 1)
    }
}

/// The host side of the GPU top-k kernels (`Kernels/topk.cu`) that runs without a GPU.
final class CUDATopKHostTests: XCTestCase {
    /// `topk_kd_rows` branches on objective codes 0…3 in this order; each objective has its own.
    func testObjectiveCodesAreTheKernelsBranches() throws {
        let codes = Recipe.TopKObjective.allCases.map { CUDAModel.topKObjectiveCode($0) }
        XCTAssertEqual(Set(codes), [0, 1, 2, 3])
        XCTAssertEqual(CUDAModel.topKObjectiveCode(.coarseKL), 0)
        XCTAssertEqual(CUDAModel.topKObjectiveCode(.bothNormalized), 1)
        XCTAssertEqual(CUDAModel.topKObjectiveCode(.teacherNormalized), 2)
        XCTAssertEqual(CUDAModel.topKObjectiveCode(.sampled), 3)
        let source = try XCTUnwrap(KernelSources.files.first { $0.name == "topk" }?.source)
        XCTAssertEqual(KernelSources.kernelNames(in: source), ["topk_kd_rows", "topk_select_rows"])
        XCTAssertTrue(source.contains("#define TK_MAX_K \(CUDADevice.topKSelectMaxK)"))
        for code in 0...2 { XCTAssertTrue(source.contains("objective == \(code)")) }
    }
}
