import Foundation
import QATQuant
import XCTest

final class TensorQuantizerTests: XCTestCase {
    let wname = "model.layers.0.self_attn.q_proj.weight_quantizer"

    func testDisabledIsIdentityAndEnabledWithoutAmaxThrows() throws {
        let x: [Float] = [0.1, -0.2, 0.3, 5]
        var out = [Float](repeating: 0, count: 4)
        let q = TensorQuantizer(name: wname, format: .fp8PerTensor, enabled: false)
        try q.forward(x, &out, rows: 1, cols: 4)
        XCTAssertEqual(out, x)
        q.enabled = true
        XCTAssertThrowsError(try q.forward(x, &out, rows: 1, cols: 4)) { e in
            XCTAssertTrue("\(e)".contains(self.wname), "\(e)")
            XCTAssertTrue("\(e)".contains("amax"), "\(e)")
        }
    }

    func testCalibrationCollectsRunningMaxAndIsIdentity() throws {
        let q = TensorQuantizer(name: wname, format: .nvfp4(blockSize: 16))
        q.startCalibration()
        var out = [Float](repeating: 0, count: 32)
        let a: [Float] = (0..<32).map { Float($0) * 0.01 - 0.1 }
        let b: [Float] = (0..<32).map { Float($0) * -0.1 }
        try q.forward(a, &out, rows: 2, cols: 16)
        XCTAssertEqual(out, a)
        try q.forward(b, &out, rows: 2, cols: 16)
        try q.finishCalibration()
        XCTAssertEqual(q.amax, abs(b[31]))
        try q.forward(a, &out, rows: 2, cols: 16)
        var ref = [Float](repeating: 0, count: 32)
        NVFP4.fakeQuant(a, &ref, rows: 2, cols: 16, globalAmax: abs(b[31]))
        XCTAssertEqual(out, ref)
        XCTAssertNotEqual(out, a)
    }

    func testCalibrationZeroOrNaNThrowsNamingQuantizer() {
        let q = TensorQuantizer(name: "model.layers.1.mlp.down_proj.input_quantizer", format: .fp8PerTensor)
        q.startCalibration()
        var out = [Float](repeating: 0, count: 8)
        XCTAssertNoThrow(try q.forward([Float](repeating: 0, count: 8), &out, rows: 1, cols: 8))
        XCTAssertThrowsError(try q.finishCalibration()) { e in
            XCTAssertTrue("\(e)".contains("model.layers.1.mlp.down_proj.input_quantizer"), "\(e)")
        }
        q.startCalibration()
        var x = [Float](repeating: 1, count: 8); x[3] = .nan
        XCTAssertNoThrow(try q.forward(x, &out, rows: 1, cols: 8))
        XCTAssertThrowsError(try q.finishCalibration()) { e in XCTAssertTrue("\(e)".contains("nan"), "\(e)") }
        q.amax = 0
        XCTAssertThrowsError(try q.forward(x, &out, rows: 1, cols: 8))
    }

    func testFP8FakeQuant() throws {
        // amax 448 → scale 1: outputs are the E4M3 roundings of the inputs.
        let x: [Float] = [1.0625, 1.1875, 300, 1000, -1000, 0.001953125, 0.0009765625, -3.3, 1e-9, 0]
        var out = [Float](repeating: 0, count: x.count)
        FP8.fakeQuant(x, &out, count: x.count, amax: 448)
        XCTAssertEqual(out, [1, 1.25, 288, 448, -448, 0.001953125, 0, -3.25, 0, 0])
        // General amax: y = e4m3(x * 448/amax) / (448/amax), and quantizer forward agrees.
        let y: [Float] = (0..<1000).map { Float(sin(Double($0))) * 2.5 }
        var o1 = [Float](repeating: 0, count: y.count), o2 = o1
        FP8.fakeQuant(y, &o1, count: y.count, amax: 2.5)
        let s: Float = 448 / 2.5
        for i in 0..<y.count { XCTAssertEqual(o1[i], e4m3ToFloat(floatToE4M3(y[i] * s)) / s) }
        let q = TensorQuantizer(name: "model.layers.0.self_attn.k_bmm_quantizer", format: .fp8PerTensor, amax: 2.5)
        try q.forward(y, &o2, rows: 10, cols: 100)
        XCTAssertEqual(o1, o2)
        XCTAssertLessThan(zip(y, o1).map { abs($0 - $1) }.max()!, 2.5 / 448 * 16 + 1e-6)
    }

    func testSTEPassThroughAndClipped() {
        let x: [Float] = [-3, -1, 0, 0.5, 2, 2.5]
        let g: [Float] = [1, 2, 3, 4, 5, 6]
        var gi = [Float](repeating: -1, count: 6)
        let q = TensorQuantizer(name: wname, format: .nvfp4(blockSize: 16), amax: 2)
        q.backward(x: x, gradOut: g, gradIn: &gi, count: 6)
        XCTAssertEqual(gi, g)
        q.ste = .clipped
        q.backward(x: x, gradOut: g, gradIn: &gi, count: 6)
        XCTAssertEqual(gi, [0, 2, 3, 4, 5, 0])  // |x| ≤ amax passes (ModelOpt uses <=)
        q.enabled = false
        q.backward(x: x, gradOut: g, gradIn: &gi, count: 6)
        XCTAssertEqual(gi, g)
        // Large, parallel, in place.
        let n = 100_000
        let xs: [Float] = (0..<n).map { Float($0 % 7) - 3 }
        var gs: [Float] = (0..<n).map { Float($0) }
        q.enabled = true
        gs.withUnsafeMutableBufferPointer { p in q.backward(x: xs, gradOut: p.baseAddress!, gradIn: p.baseAddress!, count: n) }
        for i in 0..<n { XCTAssertEqual(gs[i], abs(xs[i]) <= 2 ? Float(i) : 0) }
    }

    func testShareAmaxAndSummary() throws {
        let names = ["q_proj", "k_proj", "v_proj"].map { "model.layers.0.self_attn.\($0).weight_quantizer" }
        let qs = names.enumerated().map { TensorQuantizer(name: $1, format: .nvfp4(blockSize: 16), amax: Float($0 + 1)) }
        TensorQuantizer.shareAmax(qs)
        XCTAssertEqual(qs.map(\.amax), [3, 3, 3])
        let off = TensorQuantizer(name: "lm_head.weight_quantizer", format: .nvfp4(blockSize: 16), enabled: false)
        let s = quantSummary(qs + [off])
        for n in names { XCTAssertTrue(s.contains(n)) }
        XCTAssertTrue(s.contains("lm_head.weight_quantizer"))
        XCTAssertTrue(s.contains("disabled"))
        XCTAssertTrue(s.contains("nvfp4"))
        XCTAssertTrue(s.contains("4 quantizers, 3 enabled, 1 disabled"), s)
    }
}
