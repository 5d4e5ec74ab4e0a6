import QATTrain
import XCTest

final class PipelineLayoutTests: XCTestCase {
    func testLayersSplitEvenlyFirstStagesTakeTheRemainder() throws {
        XCTAssertEqual(try PipelineLayout(layers: 4, stages: 2, stage: 1).ranges, [0..<2, 2..<4])
        XCTAssertEqual(try PipelineLayout(layers: 5, stages: 3, stage: 0).ranges, [0..<2, 2..<4, 4..<5])
        let l = try PipelineLayout(layers: 30, stages: 8, stage: 7)
        XCTAssertEqual(l.ranges.map(\.count), [4, 4, 4, 4, 4, 4, 3, 3])
        XCTAssertEqual(l.range, 27..<30)
        XCTAssertTrue(l.isLast); XCTAssertFalse(l.isFirst)
    }

    func testImpossibleLayoutsAreErrors() {
        XCTAssertThrowsError(try PipelineLayout(layers: 2, stages: 3, stage: 0)) { e in
            XCTAssertTrue("\(e)".contains("3 stages need at least 3 decoder layers"), "\(e)")
        }
        XCTAssertThrowsError(try PipelineLayout(layers: 4, stages: 0, stage: 0))
        XCTAssertThrowsError(try PipelineLayout(layers: 4, stages: 2, stage: 2))
    }
}
