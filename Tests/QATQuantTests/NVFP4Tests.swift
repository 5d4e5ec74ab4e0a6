import QATModels
import QATQuant
import XCTest

final class NVFP4Tests: XCTestCase {
    static let cases = ["normal", "outliers", "with_zero_block", "tiny", "huge", "ties", "bf16_weight"]

    func absMax(_ x: [Float]) -> Float { x.reduce(0) { max($0, abs($1)) } }

    func testFixtureExportBytesExact() throws {
        let f = try RefFile("nvfp4_reference.safetensors")
        for name in Self.cases {
            let shape = try f.shape("\(name).input")
            let rows = shape.dropLast().reduce(1, *), cols = shape.last!
            let x = try f.floats("\(name).input")
            let (packed, scales, gs) = NVFP4.quantize(x, rows: rows, cols: cols, globalAmax: absMax(x))
            XCTAssertEqual(gs.bitPattern, try f.floats("\(name).global_scale")[0].bitPattern, "\(name) global scale")
            let refScales = try f.bytes("\(name).block_scale_e4m3")
            XCTAssertEqual(scales, refScales, "\(name) scales")
            let refPacked = try f.bytes("\(name).packed")
            XCTAssertEqual(packed.count, refPacked.count, name)
            let badP = zip(packed, refPacked).enumerated().filter { $0.element.0 != $0.element.1 }
            XCTAssertTrue(
                badP.isEmpty,
                "\(name): \(badP.count) packed bytes differ, first "
                    + "\(badP.prefix(3).map { "[\($0.offset)] \($0.element.0) vs \($0.element.1)" })")
            let deq = NVFP4.dequantize(packed: packed, scales: scales, globalScale: gs, rows: rows, cols: cols)
            let ref = try f.floats("\(name).dequantized")
            let badD = zip(deq, ref).enumerated().filter { $0.element.0.bitPattern != $0.element.1.bitPattern }
            XCTAssertTrue(
                badD.isEmpty,
                "\(name): \(badD.count) dequantized values differ, first "
                    + "\(badD.prefix(3).map { "[\($0.offset)] \($0.element.0) vs \($0.element.1)" })")
            // Decoding the reference bytes gives the reference values, too.
            let deqRef = NVFP4.dequantize(packed: refPacked, scales: refScales, globalScale: gs, rows: rows, cols: cols)
            XCTAssertEqual(deqRef.map(\.bitPattern), ref.map(\.bitPattern), "\(name) dequantize(reference bytes)")
        }
    }

    func testFakeQuantExportModeEqualsQuantizeDequantize() throws {
        let f = try RefFile("nvfp4_reference.safetensors")
        for name in Self.cases {
            let shape = try f.shape("\(name).input")
            let rows = shape.dropLast().reduce(1, *), cols = shape.last!
            let x = try f.floats("\(name).input")
            let ref = try f.floats("\(name).dequantized")
            var out = [Float](repeating: .nan, count: x.count)
            NVFP4.fakeQuant(x, &out, rows: rows, cols: cols, globalAmax: absMax(x), mode: .export)
            XCTAssertEqual(out.map(\.bitPattern), ref.map(\.bitPattern), "\(name) fakeQuant(.export)")
        }
    }

    /// ModelOpt's Triton semantics agree with the export path wherever every block scale
    /// S = e4m3(s)*gs is ≥ 1e-5 and s stays within [2^-9, 448] (up to the sign of zero).
    func testFakeQuantModelOptModeMatchesWhereSemanticsAgree() throws {
        let f = try RefFile("nvfp4_reference.safetensors")
        var checked = 0
        for name in Self.cases {
            let shape = try f.shape("\(name).input")
            let rows = shape.dropLast().reduce(1, *), cols = shape.last!
            let x = try f.floats("\(name).input")
            let ref = try f.floats("\(name).dequantized")
            let scales = try f.bytes("\(name).block_scale_e4m3")
            let gs = try f.floats("\(name).global_scale")[0]
            var out = [Float](repeating: .nan, count: x.count)
            NVFP4.fakeQuant(x, &out, rows: rows, cols: cols, globalAmax: absMax(x), mode: .modelOpt)
            let nb = (cols + 15) / 16
            for r in 0..<rows {
                for j in 0..<nb {
                    let c0 = j * 16
                    let bmax = (c0..<min(c0 + 16, cols)).reduce(Float(0)) { max($0, abs(x[r * cols + $1])) }
                    let s = bmax / (6 * gs)
                    let S = e4m3ToFloat(scales[r * nb + j]) * gs
                    let agree = S >= 1e-5 && s >= 0.001953125 && s <= 448
                    for c in c0..<min(c0 + 16, cols) {
                        let i = r * cols + c
                        if agree {
                            XCTAssertEqual(out[i], ref[i], "\(name) [\(r),\(c)]"); checked += 1
                        } else {
                            // ModelOpt's kernel quantizes such blocks with scale 1.0.
                            XCTAssertEqual(out[i], NVFP4.decodeE2M1(NVFP4.encodeE2M1(x[i])), "\(name) [\(r),\(c)] scale-1 block")
                        }
                    }
                }
            }
        }
        XCTAssertGreaterThan(checked, 1000)
    }

    func testModelOptModeTinyScalesBecomeOne() {
        // Block max 3e-5 under amax 1e-4: S = e4m3(s)*gs ≈ blockmax/6 < 1e-5, so ModelOpt's
        // kernel uses S = 1 and zeroes the block; the export path represents it.
        let x: [Float] = (0..<16).map { Float($0 + 1) * 1.875e-6 * ($0 % 2 == 0 ? 1 : -1) }
        var mo = [Float](repeating: 1, count: 16), ex = mo
        NVFP4.fakeQuant(x, &mo, rows: 1, cols: 16, globalAmax: 1e-4, mode: .modelOpt)
        NVFP4.fakeQuant(x, &ex, rows: 1, cols: 16, globalAmax: 1e-4, mode: .export)
        XCTAssertTrue(mo.allSatisfy { $0 == 0 })
        XCTAssertEqual(mo[1].sign, .minus)  // −0 for a negative input, as the kernel does
        XCTAssertFalse(ex.allSatisfy { $0 == 0 })
        let q = NVFP4.quantize(x, rows: 1, cols: 16, globalAmax: 1e-4)
        XCTAssertEqual(ex, NVFP4.dequantize(packed: q.packed, scales: q.scales, globalScale: q.globalScale, rows: 1, cols: 16))
    }

    func testE2M1TiesRoundHalfEven() {
        let cases: [(Float, UInt8)] = [
            (0, 0), (0.25, 0), (0.2500001, 1), (0.5, 1), (0.75, 2), (1, 2), (1.25, 2), (1.5, 3), (1.75, 4),
            (2, 4), (2.5, 4), (3, 5), (3.5, 6), (4, 6), (5, 6), (5.0001, 7), (6, 7), (7, 7), (1e9, 7),
            (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5, 14), (-6, 15), (-100, 15),
            (-0.0, 0), (-0.1, 8),
        ]
        for (v, nib) in cases { XCTAssertEqual(NVFP4.encodeE2M1(v), nib, "\(v)") }
        let values: [Float] = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
        for i in 0..<8 {
            XCTAssertEqual(NVFP4.decodeE2M1(UInt8(i)), values[i])
            XCTAssertEqual(NVFP4.decodeE2M1(UInt8(i | 8)), i == 0 ? 0 : -values[i])
        }
    }

    func testPackingEvenElementInLowNibble() {
        // One block whose max is the amax 6 → gs = 6/2688, block scale 6/(6*gs) = 448 (0x7E),
        // S = 448*gs = 1: values quantize as is.
        var x = [Float](repeating: 0, count: 16)
        x[0] = 6; x[1] = -0.5; x[2] = 1.5; x[3] = 3
        let q = NVFP4.quantize(x, rows: 1, cols: 16, globalAmax: 6)
        XCTAssertEqual(q.scales, [0x7E])
        XCTAssertEqual(q.packed[0], 0x97)  // low = 6 (0x7), high = -0.5 (0x9)
        XCTAssertEqual(q.packed[1], 0x53)  // low = 1.5 (0x3), high = 3 (0x5)
    }

    func testPaddingCols24AndCols8() {
        for cols in [24, 8, 40] {
            let rows = 3
            let x: [Float] = (0..<(rows * cols)).map { Float(sin(Double($0) * 1.7) * 3) }
            let amax = absMax(x)
            let q = NVFP4.quantize(x, rows: rows, cols: cols, globalAmax: amax)
            let nb = (cols + 15) / 16
            XCTAssertEqual(q.packed.count, rows * nb * 8, "cols \(cols) packed [rows, ceil(cols/16)*8]")
            XCTAssertEqual(q.scales.count, rows * nb, "cols \(cols) scales [rows, ceil(cols/16)]")
            // Same as quantizing the zero-padded tensor (ModelOpt's reduce_block_padding).
            let padCols = nb * 16
            var padded = [Float](repeating: 0, count: rows * padCols)
            for r in 0..<rows { for c in 0..<cols { padded[r * padCols + c] = x[r * cols + c] } }
            let qp = NVFP4.quantize(padded, rows: rows, cols: padCols, globalAmax: amax)
            XCTAssertEqual(q.packed, qp.packed, "cols \(cols)")
            XCTAssertEqual(q.scales, qp.scales, "cols \(cols)")
            // Padded nibbles are zero codes.
            for r in 0..<rows {
                for c in cols..<padCols where c % 2 == 0 {
                    XCTAssertEqual(q.packed[r * nb * 8 + c / 2] & 0xF, 0)
                }
            }
            let deq = NVFP4.dequantize(packed: q.packed, scales: q.scales, globalScale: q.globalScale, rows: rows, cols: cols)
            XCTAssertEqual(deq.count, rows * cols)
            for mode in NVFP4.FakeQuantMode.allCases {
                var out = [Float](repeating: .nan, count: x.count)
                NVFP4.fakeQuant(x, &out, rows: rows, cols: cols, globalAmax: amax, mode: mode)
                if mode == .export {
                    XCTAssertEqual(out.map(\.bitPattern), deq.map(\.bitPattern), "cols \(cols)")
                } else {
                    XCTAssertEqual(out, deq, "cols \(cols)")
                }
            }
        }
    }

    func testFakeQuantInPlaceAndLarge() {
        let rows = 37, cols = 160
        var x: [Float] = (0..<(rows * cols)).map { i in Float(sin(Double(i) * 0.37)) * (i % 97 == 0 ? 40 : 1) }
        let amax = absMax(x)
        let q = NVFP4.quantize(x, rows: rows, cols: cols, globalAmax: amax)
        let deq = NVFP4.dequantize(packed: q.packed, scales: q.scales, globalScale: q.globalScale, rows: rows, cols: cols)
        x.withUnsafeMutableBufferPointer { p in
            NVFP4.fakeQuant(p.baseAddress!, p.baseAddress!, rows: rows, cols: cols, globalAmax: amax, mode: .export)
        }
        XCTAssertEqual(x.map(\.bitPattern), deq.map(\.bitPattern))
    }

    func testCalibratedAmaxBelowBlockMaxSaturates() {
        // A weight that grew past its calibrated amax: scales clamp to 448, values to ±6.
        let x: [Float] = (0..<16).map { Float($0) }
        let q = NVFP4.quantize(x, rows: 1, cols: 16, globalAmax: 1)
        XCTAssertEqual(q.scales, [0x7E])
        var out = [Float](repeating: 0, count: 16)
        NVFP4.fakeQuant(x, &out, rows: 1, cols: 16, globalAmax: 1, mode: .modelOpt)
        XCTAssertEqual(out.max()!, 1, accuracy: 1e-6)  // 6 * 448 * gs = amax
    }

    func testE4M3RoundMatchesCodec() throws {
        let f = try RefFile("fp8_e4m3_reference.safetensors")
        var xs = try f.floats("x")
        // 20,000 random bit patterns, seeded so that a failure reproduces.
        var g = SplitMix64(seed: 0xE4_3)
        for _ in 0..<20000 { xs.append(Float(bitPattern: UInt32(truncatingIfNeeded: g.next() >> 32))) }
        for v in xs where !v.isNaN {
            XCTAssertEqual(
                e4m3Round(v).bitPattern,
                e4m3ToFloat(floatToE4M3(v)).bitPattern == 0x8000_0000 && v.sign == .minus
                    ? 0x8000_0000 : e4m3ToFloat(floatToE4M3(v)).bitPattern, "\(v)")
        }
        XCTAssertTrue(e4m3Round(.nan).isNaN)
    }
}
