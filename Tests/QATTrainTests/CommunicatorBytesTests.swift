import Foundation
import QATCore
import QATTrain
import XCTest

/// `Communicator.broadcast(bytes:root:)` (the NCCL unique id's way from rank 0 to the others):
/// the bytes travel as fp32 bit patterns, NaN and signalling-NaN patterns included.
final class CommunicatorBytesTests: XCTestCase {
    /// A non-root rank of two: its float broadcast receives the root's words.
    final class Receiver: Communicator {
        let rootWords: [Float]
        var calls = 0
        init(rootWords: [Float]) { self.rootWords = rootWords }
        var rank: Int { 1 }
        var size: Int { 2 }
        func allReduceSum(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
        func allReduceSum(_ buf: UnsafeMutablePointer<Double>, count: Int) throws {}
        func allReduceMax(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {}
        func send(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws {}
        func recv(_ buf: UnsafeMutablePointer<Float>, count: Int, from peer: Int, tag: Int) throws {}
        func broadcast(_ buf: UnsafeMutablePointer<Float>, count: Int, root: Int) throws {
            XCTAssertEqual(count, rootWords.count)
            XCTAssertEqual(root, 0)
            calls += 1
            rootWords.withUnsafeBytes { UnsafeMutableRawPointer(buf).copyMemory(from: $0.baseAddress!, byteCount: count * 4) }
        }
        func isend(_ buf: UnsafePointer<Float>, count: Int, to peer: Int, tag: Int) throws -> SendRequest {
            throw QATError("no isend")
        }
        func wait(_ request: SendRequest) throws {}
        var traffic: CommTraffic { CommTraffic() }
        func barrier() throws {}
        func split(color: Int, key: Int) throws -> Communicator { self }
        func finalize() {}
        func abort(code: Int32) -> Never { exit(code) }
    }

    func testBytesArriveAsSent() throws {
        // 130 bytes (not a multiple of 4) with NaN, signalling-NaN and infinity patterns.
        var sent = (0..<130).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        sent.replaceSubrange(0..<4, with: [0x01, 0x00, 0x80, 0x7F])  // signalling NaN
        sent.replaceSubrange(4..<8, with: [0xFF, 0xFF, 0xFF, 0xFF])  // NaN, all ones
        sent.replaceSubrange(8..<12, with: [0x00, 0x00, 0x80, 0xFF])  // −∞
        var padded = sent + [0, 0]
        let words = padded.withUnsafeMutableBytes { raw in Array(raw.bindMemory(to: Float.self)) }
        let comm = Receiver(rootWords: words)
        var received = [UInt8](repeating: 0, count: 130)
        try comm.broadcast(bytes: &received, root: 0)
        XCTAssertEqual(comm.calls, 1)
        XCTAssertEqual(received, sent)
        // One process: nothing moves, nothing changes.
        var mine = sent
        try SingleProcessCommunicator().broadcast(bytes: &mine, root: 0)
        XCTAssertEqual(mine, sent)
    }
}
