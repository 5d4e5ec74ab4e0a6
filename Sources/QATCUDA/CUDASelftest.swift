import CCUDA
import Foundation
import QATCore
import QATModels
import QATQuant

/// `qat selftest --device cuda`: every kernel and whole models on the GPU against the CPU path,
/// on seeded random inputs. Bit-exact kernels (the fake quantizers, max calibration) must match
/// bit for bit; the rest within a tolerance. It is the test suite of the GPU path, runnable
/// with the portable bundle on a machine without a Swift toolchain.
public struct CUDASelftest {
    public struct Check {
        public let name: String
        public let error: Double
        public let tolerance: Double
        /// "max |Δ|", "mismatches", …
        public let measure: String
        public var passed: Bool { error <= tolerance && !error.isNaN }
    }

    public let device: CUDADevice
    public private(set) var checks: [Check] = []
    let log: (String) -> Void

    public init(device: CUDADevice, log: @escaping (String) -> Void) {
        self.device = device
        self.log = log
        device.kernels.syncEachLaunch = true
    }

    mutating func add(_ name: String, _ error: Double, _ tolerance: Double, _ measure: String = "max |Δ|") {
        let c = Check(name: name, error: error, tolerance: tolerance, measure: measure)
        checks.append(c)
        log(
            String(format: "%@  %-44@ %@ %-10.3g (tolerance %.3g)", c.passed ? "ok  " : "FAIL", name as NSString, measure, error, tolerance)
        )
    }

    /// Runs every check; true when all pass.
    public mutating func run() throws -> Bool {
        try kernels()
        try topKKernels()
        try models()
        try training()
        try loraChecks()
        try checkpointing()
        try parity()
        try distributed()
        return checks.allSatisfy(\.passed)
    }

    // MARK: Inputs

    static func random(_ n: Int, seed: UInt64, scale: Float = 1) -> [Float] {
        var g = SplitMix64(seed: seed)
        return (0..<n).map { _ in g.nextGaussian() * scale }
    }

    /// Values that exercise the quantizers' corners: ordinary blocks, blocks of zeros, tiny
    /// blocks (below ModelOpt's 1e-5 scale floor), huge outliers and exact E2M1 ties.
    static func quantInput(rows: Int, cols: Int, seed: UInt64) -> [Float] {
        var x = random(rows * cols, seed: seed)
        var g = SplitMix64(seed: seed ^ 0x5eed)
        for r in 0..<rows {
            let kind = r % 5
            for c in 0..<cols {
                let i = r * cols + c
                switch kind {
                case 1: if c / 16 % 2 == 0 { x[i] = 0 }
                case 2: x[i] *= 1e-6
                case 3: if g.next() % 17 == 0 { x[i] *= 300 }
                case 4: x[i] = Float(Int(g.next() % 25) - 12) * 0.25  // many ties after scaling
                default: break
                }
            }
        }
        return x
    }

    static func maxAbsDiff(_ a: [Float], _ b: [Float]) -> Double {
        var m = 0.0
        for i in 0..<min(a.count, b.count) {
            let d = Double(abs(a[i] - b[i]))
            if d.isNaN { return .nan }
            m = max(m, d)
        }
        return a.count == b.count ? m : .nan
    }

    static func bitMismatches(_ a: [Float], _ b: [Float]) -> Double {
        guard a.count == b.count else { return .nan }
        var n = 0
        for i in 0..<a.count where a[i].bitPattern != b[i].bitPattern { n += 1 }
        return Double(n)
    }

    func gpu(_ x: [Float]) throws -> DeviceBuffer { try DeviceBuffer(device, floats: x) }
    /// x's bf16 rounding (`floatToBF16`) on the device.
    func gpu16(_ x: [Float]) throws -> DeviceBuffer {
        let h = x.map(floatToBF16), b = try DeviceBuffer(device, bytes: x.count * 2)
        try h.withUnsafeBytes { try b.upload($0.baseAddress!, bytes: $0.count) }
        return b
    }
    /// x rounded to bf16, as floats.
    static func roundedBF16(_ x: [Float]) -> [Float] { x.map { bf16ToFloat(floatToBF16($0)) } }

    /// The first `count` bf16 values of a device buffer, as their bits.
    func bits16(_ b: DeviceBuffer, count: Int) throws -> [UInt16] {
        var h = [UInt16](repeating: 0, count: count)
        try h.withUnsafeMutableBytes { try b.download($0.baseAddress!, bytes: $0.count) }
        return h
    }

    /// Elements of the bf16 buffer `copy` that are not `values` rounded to nearest even (`floatToBF16`).
    func bf16Mismatches(_ copy: DeviceBuffer, of values: [Float]) throws -> Double {
        Double(zip(try bits16(copy, count: values.count), values).filter { $0.0 != floatToBF16($0.1) }.count)
    }

    // MARK: Kernels

    /// The warp-per-row RMSNorm kernels of short rows (a Qwen3 head's q/k norm; `rmsnormWarpRows`) against the block
    /// kernels on the same rows, bit for bit (forward output, rstd and bf16 copy; backward dinp, accumulating, and its
    /// bf16 copy into grouped rows), and with the weight gradient against RMSNorm.backward's: 1,029 rows (runs of 1
    /// row per warp) and 5,000 (runs of 3, the last 2), at c = 128, 64 and 4.
    mutating func rmsnormWarpsCheck() throws {
        let d = device
        for c in [128, 64, 4] {
            for rows in [1029, 5000] {
                let n = rows * c, tag = "[\(rows)×\(c)]"
                guard CUDADevice.rmsnormWarpRows(c: c, []) else { add("rmsnorm warps \(tag): not taken", .nan, 0); continue }
                let x = Self.random(n, seed: 61, scale: 2), g = Self.random(c, seed: 62), dy = Self.random(n, seed: 63)
                let d0 = Self.random(n, seed: 64)
                let xd = try gpu(x), gd = try gpu(g), dyd = try gpu(dy)
                let o = [try DeviceBuffer(d, floats: n), try DeviceBuffer(d, floats: n)]
                let r = [try DeviceBuffer(d, floats: rows), try DeviceBuffer(d, floats: rows)]
                let o16 = [try DeviceBuffer(d, bytes: n * 2), try DeviceBuffer(d, bytes: n * 2)]
                for (i, warps) in [false, true].enumerated() {
                    try d.rmsnorm(
                        out: o[i].ptr, rstd: r[i].ptr, inp: xd.ptr, weight: gd.ptr, n: rows, c: c, eps: 1e-6, out16: o16[i].ptr,
                        warps: warps)
                }
                let forward =
                    Self.bitMismatches(try o[0].floats(n), try o[1].floats(n))
                    + Self.bitMismatches(try r[0].floats(rows), try r[1].floats(rows))
                    + Double(zip(try bits16(o16[0], count: n), try bits16(o16[1], count: n)).filter { $0 != $1 }.count)
                add("rmsnorm_forward_warps \(tag) vs rmsnorm_forward: output, rstd, bf16 copy", forward, 0, "values differ")
                // backward, accumulating, the bf16 copy as groups of 3 rows into rows 3c + 4 apart; then with the weight gradient
                let group = 3, ld = group * c + 4, copyCount = (rows + group - 1) / group * ld
                var dinp: [[Float]] = [], copies: [[UInt16]] = [], dw: [[Float]] = []
                for warps in [false, true] {
                    for weightGradient in [false, true] {
                        let dd = try gpu(d0), c16 = try DeviceBuffer(d, bytes: copyCount * 2), gw = try DeviceBuffer(d, floats: c)
                        try c16.zero(); try gw.zero()
                        let scratch = try DeviceBuffer(d, floats: CUDADevice.rmsnormBackwardScratch(n: rows, c: c))
                        try d.rmsnormBackward(
                            dinp: dd.ptr, dout: dyd.ptr, inp: xd.ptr, weight: gd.ptr, rstd: r[0].ptr, n: rows, c: c, accumulate: true,
                            dinp16: c16.ptr, dinp16Rows: (group, ld), weightGradient: weightGradient ? (gw.ptr, scratch.ptr) : nil,
                            warps: warps)
                        dinp.append(try dd.floats(n)); copies.append(try bits16(c16, count: copyCount))
                        if weightGradient { dw.append(try gw.floats(c)) }
                    }
                }
                let backward = (1..<4).reduce(0.0) { e, i in
                    e + Self.bitMismatches(dinp[0], dinp[i]) + Double(zip(copies[0], copies[i]).filter { $0 != $1 }.count)
                }
                add("rmsnorm_backward(_dw)_warps \(tag) vs rmsnorm_backward: dinp, grouped bf16 copy", backward, 0, "values differ")
                var cpuDx = d0, cpuDw = [Float](repeating: 0, count: c), rs = [Float](repeating: 0, count: rows)
                var out = [Float](repeating: 0, count: n)
                RMSNorm.forward(out: &out, rstd: &rs, inp: x, weight: g, n: rows, c: c, eps: 1e-6)
                RMSNorm.backward(dinp: &cpuDx, dweight: &cpuDw, dout: dy, inp: x, weight: g, rstd: rs, n: rows, c: c, accumulate: true)
                let m = Double(cpuDw.map { abs($0) }.max()!)
                add(
                    "rmsnorm_backward_dw_warps \(tag): weight gradient vs RMSNorm.backward, relative",
                    Self.maxAbsDiff(cpuDw, dw[1]) / m, 1e-5, "max |Δ|/max")
            }
        }
    }

    mutating func kernels() throws {
        let d = device
        // Fake quantizers: bit for bit.
        for (rows, cols) in [(40, 64), (37, 40)] {
            let x = Self.quantInput(rows: rows, cols: cols, seed: UInt64(rows * cols))
            let amax = Reduce.absMax(x, count: x.count) * 0.7  // some values saturate
            let xd = try gpu(x), out = try DeviceBuffer(d, floats: x.count)
            for mode in NVFP4.FakeQuantMode.allCases {
                var cpu = [Float](repeating: 0, count: x.count)
                NVFP4.fakeQuant(x, &cpu, rows: rows, cols: cols, globalAmax: amax, mode: mode)
                try d.nvfp4FakeQuant(xd.ptr, out: out.ptr, rows: rows, cols: cols, globalAmax: amax, exportMode: mode == .export)
                add("nvfp4 fake quant [\(rows)×\(cols)] \(mode.rawValue)", Self.bitMismatches(cpu, try out.floats(x.count)), 0, "bits ≠")
                // The fused bf16 output equals the bf16 rounding of the fp32 result.
                let b1 = try DeviceBuffer(d, bytes: x.count * 2), b2 = try DeviceBuffer(d, bytes: x.count * 2)
                try d.nvfp4FakeQuant(xd.ptr, out: 0, bf16Out: b1.ptr, rows: rows, cols: cols, globalAmax: amax, exportMode: mode == .export)
                try d.toBF16(out: b2.ptr, out.ptr, count: x.count)
                var h1 = [UInt16](repeating: 0, count: x.count), h2 = h1
                try h1.withUnsafeMutableBytes { try b1.download($0.baseAddress!, bytes: $0.count) }
                try h2.withUnsafeMutableBytes { try b2.download($0.baseAddress!, bytes: $0.count) }
                add(
                    "nvfp4 fake quant → bf16 [\(rows)×\(cols)] \(mode.rawValue)", Double(zip(h1, h2).filter { $0 != $1 }.count), 0, "bits ≠"
                )
            }
            var cpu = [Float](repeating: 0, count: x.count)
            FP8.fakeQuant(x, &cpu, count: x.count, amax: amax)
            try d.fp8FakeQuant(xd.ptr, out: out.ptr, count: x.count, amax: amax)
            add("fp8 fake quant [\(x.count)]", Self.bitMismatches(cpu, try out.floats(x.count)), 0, "bits ≠")
            INT8.fakeQuant(x, &cpu, count: x.count, amax: amax)
            try d.int8FakeQuant(xd.ptr, out: out.ptr, count: x.count, amax: amax)
            add("int8 fake quant [\(x.count)]", Self.bitMismatches(cpu, try out.floats(x.count)), 0, "bits ≠")
            let slot = try DeviceBuffer(d, bytes: 4)
            try slot.zero()
            try d.absMax(xd.ptr, count: x.count, slot: slot.ptr)
            var bits: UInt32 = 0
            try slot.download(&bits, bytes: 4)
            add("max calibration (|x| max) [\(x.count)]", Float(bitPattern: bits) == Reduce.absMax(x, count: x.count) ? 0 : 1, 0, "bits ≠")
        }

        // Matrix product, fp32 (no TF32) and bf16.
        let (n, k, m) = (96, 160, 72)
        let a = Self.random(n * k, seed: 1), w = Self.random(m * k, seed: 2)
        var ref = [Float](repeating: 0, count: n * m)
        BLAS.gemm(transB: true, m: n, n: m, k: k, a: a, b: w, c: &ref)
        let ad = try gpu(a), wd = try gpu(w), cd = try DeviceBuffer(d, floats: n * m)
        try d.gemmXWt(n: n, out: m, k: k, x: ad.ptr, w: wd.ptr, c: cd.ptr, bf16: false)
        add("gemm fp32 [\(n)×\(k)]·[\(m)×\(k)]ᵀ", Self.maxAbsDiff(ref, try cd.floats(n * m)), 1e-4)
        let a16 = try DeviceBuffer(d, bytes: n * k * 2), w16 = try DeviceBuffer(d, bytes: m * k * 2)
        try d.toBF16(out: a16.ptr, ad.ptr, count: n * k)
        try d.toBF16(out: w16.ptr, wd.ptr, count: m * k)
        try d.gemmXWt(n: n, out: m, k: k, x: a16.ptr, w: w16.ptr, c: cd.ptr, bf16: true)
        add(
            "gemm bf16 (fp32 accumulation), relative", Self.maxAbsDiff(ref, try cd.floats(n * m)) / Double(ref.map { abs($0) }.max()!),
            2e-2, "max |Δ|/max")

        // RMSNorm.
        let (rows, c) = (33, 200)
        let x = Self.random(rows * c, seed: 3, scale: 2), g = Self.random(c, seed: 4)
        var o = [Float](repeating: 0, count: rows * c), rs = [Float](repeating: 0, count: rows)
        RMSNorm.forward(out: &o, rstd: &rs, inp: x, weight: g, n: rows, c: c, eps: 1e-6)
        let xd = try gpu(x), gd = try gpu(g), od = try DeviceBuffer(d, floats: rows * c), rd = try DeviceBuffer(d, floats: rows)
        try d.rmsnorm(out: od.ptr, rstd: rd.ptr, inp: xd.ptr, weight: gd.ptr, n: rows, c: c, eps: 1e-6)
        add("rmsnorm forward", Self.maxAbsDiff(o, try od.floats(rows * c)), 1e-5)
        add("rmsnorm rstd", Self.maxAbsDiff(rs, try rd.floats(rows)), 1e-6)
        do {  // long rows (past the 4 float4s a thread of rmsnorm_forward holds: the rest is read again) with the bf16 copy
            let (rows, c) = (9, 2100)
            let x = Self.random(rows * c, seed: 14, scale: 2), g = Self.random(c, seed: 15)
            var o = [Float](repeating: 0, count: rows * c), rs = [Float](repeating: 0, count: rows)
            RMSNorm.forward(out: &o, rstd: &rs, inp: x, weight: g, n: rows, c: c, eps: 1e-5)
            let xd = try gpu(x), gd = try gpu(g), od = try DeviceBuffer(d, floats: rows * c), rd = try DeviceBuffer(d, floats: rows)
            let o16 = try DeviceBuffer(d, bytes: rows * c * 2)
            try d.rmsnorm(out: od.ptr, rstd: rd.ptr, inp: xd.ptr, weight: gd.ptr, n: rows, c: c, eps: 1e-5, out16: o16.ptr)
            add("rmsnorm forward (rows of \(c))", Self.maxAbsDiff(o, try od.floats(rows * c)), 1e-5)
            var h16 = [UInt16](repeating: 0, count: rows * c)
            try h16.withUnsafeMutableBytes { try o16.download($0.baseAddress!, bytes: $0.count) }
            let back = h16.map { Float(bitPattern: UInt32($0) << 16) }
            add("rmsnorm bf16 copy, relative", Self.maxAbsDiff(o, back) / Double(o.map { abs($0) }.max()!), 4e-3, "max |Δ|/max")
            // Backward, added to a gradient already there, with dinp's bf16 copy (round to nearest even, bit for bit).
            let dy = Self.random(rows * c, seed: 16), d0 = Self.random(rows * c, seed: 17)
            var dx = d0
            RMSNorm.backward(dinp: &dx, dweight: nil, dout: dy, inp: x, weight: g, rstd: rs, n: rows, c: c, accumulate: true)
            let dxd = try gpu(d0), dyd = try gpu(dy), dx16 = try DeviceBuffer(d, bytes: rows * c * 2)
            try d.rmsnormBackward(
                dinp: dxd.ptr, dout: dyd.ptr, inp: xd.ptr, weight: gd.ptr, rstd: rd.ptr, n: rows, c: c, accumulate: true, dinp16: dx16.ptr)
            let gdx = try dxd.floats(rows * c)
            add(
                "rmsnorm backward (accumulate), relative", Self.maxAbsDiff(dx, gdx) / Double(dx.map { abs($0) }.max()!), 1e-5, "max |Δ|/max"
            )
            add("rmsnorm backward bf16 copy", try bf16Mismatches(dx16, of: gdx), 0, "values differ")
        }
        try rmsnormWarpsCheck()

        // SwiGLU and residual add.
        let up = Self.random(rows * c, seed: 5)
        var h = [Float](repeating: 0, count: rows * c)
        SwiGLU.forward(out: &h, gate: x, up: up, n: rows * c)
        let ud = try gpu(up)
        try d.swiglu(out: od.ptr, gate: xd.ptr, up: ud.ptr, count: rows * c, in16: false)
        let gpuH = try od.floats(rows * c)
        add("swiglu forward", Self.maxAbsDiff(h, gpuH), 1e-5)
        // bf16 gate and up (bf16 precision's): the fp32 kernel's bits on their bf16 roundings, aligned and one element off
        for off in [0, 1] {
            let n = rows * c - off
            let x16 = try gpu16(Array(x[off...])), u16 = try gpu16(Array(up[off...]))
            let xr = try gpu(Self.roundedBF16(Array(x[off...]))), ur = try gpu(Self.roundedBF16(Array(up[off...])))
            let ref = try DeviceBuffer(d, floats: n), out = try DeviceBuffer(d, floats: n + 1)
            try d.swiglu(out: ref.ptr, gate: xr.ptr, up: ur.ptr, count: n, in16: false)
            try d.swiglu(out: out.ptr + CUdeviceptr(4 * off), gate: x16.ptr, up: u16.ptr, count: n, in16: true)
            add(
                "swiglu forward, bf16 gate/up (offset \(off)) vs fp32 of their values",
                Self.bitMismatches(try ref.floats(n), Array(try out.floats(n + off)[off...])), 0, "bits ≠")
        }
        do {  // backward: fp32 against the CPU, and the bf16 copies are the bf16 rounding of the fp32 outputs
            let n = rows * c, dh = Self.random(n, seed: 17)
            var dg = [Float](repeating: 0, count: n), du = dg
            SwiGLU.backward(dgate: &dg, dup: &du, dout: dh, gate: x, up: up, n: n)
            let dhd = try gpu(dh), dgd = try DeviceBuffer(d, floats: n), dud = try DeviceBuffer(d, floats: n)
            let dg16 = try DeviceBuffer(d, bytes: n * 2), du16 = try DeviceBuffer(d, bytes: n * 2)
            try d.swigluBackward(
                dgate: dgd.ptr, dup: dud.ptr, dout: dhd.ptr, gate: xd.ptr, up: ud.ptr, count: n, cols: n, dgate16: dg16.ptr,
                dup16: du16.ptr,
                in16: false, dout16: false)
            let gpuG = try dgd.floats(n), gpuU = try dud.floats(n)
            let scale = Double(max(dg.map { abs($0) }.max()!, du.map { abs($0) }.max()!))
            add("swiglu backward, relative", max(Self.maxAbsDiff(dg, gpuG), Self.maxAbsDiff(du, gpuU)) / scale, 1e-5, "max |Δ|/max")
            let differ = try bf16Mismatches(dg16, of: gpuG) + bf16Mismatches(du16, of: gpuU)
            add("swiglu backward bf16 copies vs bf16(fp32 outputs)", differ, 0, "values differ")
            // bf16 gate/up, and bf16 dh too: the fp32 kernel's bits on the bf16 roundings
            let xr = try gpu(Self.roundedBF16(x)), ur = try gpu(Self.roundedBF16(up)), dhr = try gpu(Self.roundedBF16(dh))
            try d.swigluBackward(
                dgate: dgd.ptr, dup: dud.ptr, dout: dhr.ptr, gate: xr.ptr, up: ur.ptr, count: n, cols: n, in16: false, dout16: false)
            let refG = try dgd.floats(n), refU = try dud.floats(n)
            let x16 = try gpu16(x), u16 = try gpu16(up), dh16 = try gpu16(dh)
            for dout16 in [false, true] {
                try d.swigluBackward(
                    dgate: dgd.ptr, dup: dud.ptr, dout: dout16 ? dh16.ptr : dhr.ptr, gate: x16.ptr, up: u16.ptr, count: n, cols: n,
                    in16: true, dout16: dout16)
                add(
                    "swiglu backward, bf16 gate/up\(dout16 ? " and dh" : "") vs fp32 of their values",
                    Self.bitMismatches(refG, try dgd.floats(n)) + Self.bitMismatches(refU, try dud.floats(n)), 0, "bits ≠")
            }
        }
        // swiglu_nvfp4 (down_proj's quantized bf16 input in one pass, from bf16 gate and up) against swiglu_forward then
        // nvfp4_fake_quant(bf16Out): bit for bit, both modes, whole blocks, a partial one, cols not a multiple of 4.
        for (r, cols) in [(33, 3072), (7, 100), (5, 102)] {
            let g = Self.random(r * cols, seed: 18, scale: 3), u = Self.random(r * cols, seed: 19, scale: 2)
            let gd = try gpu16(g), upd = try gpu16(u), hd = try DeviceBuffer(d, floats: r * cols)
            let ref16 = try DeviceBuffer(d, bytes: r * cols * 2), fused16 = try DeviceBuffer(d, bytes: r * cols * 2)
            try d.swiglu(out: hd.ptr, gate: gd.ptr, up: upd.ptr, count: r * cols, in16: true)
            let amax = NVFP4.absMax(try hd.floats(r * cols), count: r * cols)
            for export in [false, true] {
                try d.nvfp4FakeQuant(hd.ptr, out: 0, bf16Out: ref16.ptr, rows: r, cols: cols, globalAmax: amax, exportMode: export)
                try d.swigluNVFP4(
                    gate: gd.ptr, up: upd.ptr, bf16Out: fused16.ptr, rows: r, cols: cols, globalAmax: amax, exportMode: export)
                var a16 = [UInt16](repeating: 0, count: r * cols), b16 = a16
                try a16.withUnsafeMutableBytes { try ref16.download($0.baseAddress!, bytes: $0.count) }
                try b16.withUnsafeMutableBytes { try fused16.download($0.baseAddress!, bytes: $0.count) }
                add(
                    "swiglu_nvfp4 vs swiglu + nvfp4 bf16 [\(r)×\(cols)] \(export ? "export" : "modelopt")",
                    Double(zip(a16, b16).filter { $0 != $1 }.count), 0, "values differ")
            }
        }
        // rmsnorm_nvfp4 (the q/k/v and gate/up product input in one pass) against rmsnorm_forward then
        // nvfp4_fake_quant(bf16Out): bit for bit, rstd too, both modes; rows held in registers whole, in part (2112).
        for (r, cols) in [(33, 2048), (5, 64), (3, 1040), (2, 2112)] {
            let x = Self.random(r * cols, seed: 20, scale: 2), w = Self.random(cols, seed: 21, scale: 1)
            let xd = try gpu(x), wd = try gpu(w), yd = try DeviceBuffer(d, floats: r * cols)
            let rs1 = try DeviceBuffer(d, floats: r), rs2 = try DeviceBuffer(d, floats: r)
            let ref16 = try DeviceBuffer(d, bytes: r * cols * 2), fused16 = try DeviceBuffer(d, bytes: r * cols * 2)
            try d.rmsnorm(out: yd.ptr, rstd: rs1.ptr, inp: xd.ptr, weight: wd.ptr, n: r, c: cols, eps: 1e-6)
            let amax = NVFP4.absMax(try yd.floats(r * cols), count: r * cols)
            for export in [false, true] {
                try d.nvfp4FakeQuant(yd.ptr, out: 0, bf16Out: ref16.ptr, rows: r, cols: cols, globalAmax: amax, exportMode: export)
                try d.rmsnormNVFP4(
                    bf16Out: fused16.ptr, rstd: rs2.ptr, inp: xd.ptr, weight: wd.ptr, n: r, c: cols, eps: 1e-6, globalAmax: amax,
                    exportMode: export)
                var a16 = [UInt16](repeating: 0, count: r * cols), b16 = a16
                try a16.withUnsafeMutableBytes { try ref16.download($0.baseAddress!, bytes: $0.count) }
                try b16.withUnsafeMutableBytes { try fused16.download($0.baseAddress!, bytes: $0.count) }
                let rstdDiffer = zip(try rs1.floats(r), try rs2.floats(r)).filter { $0.bitPattern != $1.bitPattern }.count
                add(
                    "rmsnorm_nvfp4 vs rmsnorm + nvfp4 bf16 [\(r)×\(cols)] \(export ? "export" : "modelopt")",
                    Double(zip(a16, b16).filter { $0 != $1 }.count + rstdDiffer), 0, "values differ")
            }
        }

        // RoPE (llama3-scaled frequencies) and attention (GQA, with and without a window).
        for (heads, kvHeads, headDim, window, seqLen) in [
            (4, 2, 32, nil, 70), (6, 2, 48, 20, 45), (2, 1, 128, nil, 33),
            (4, 2, 64, nil, 150), (4, 1, 128, 50, 130), (2, 2, 64, nil, 7),
            (4, 2, 96, nil, 100), (4, 1, 64, 40, 200), (4, 2, 128, nil, 300),
        ] as [(Int, Int, Int, Int?, Int)] {
            let batch = 2, N = batch * seqLen
            let inv = (0..<(headDim / 2)).map { Float(1 / pow(10000.0, Double(2 * $0) / Double(headDim))) }
            let rope = RoPE(invFreq: inv, headDim: headDim, maxPositions: seqLen)
            var q = Self.random(N * heads * headDim, seed: 6), kk = Self.random(N * kvHeads * headDim, seed: 7)
            let v = Self.random(N * kvHeads * headDim, seed: 8)
            let qd = try gpu(q), kd = try gpu(kk), vd = try gpu(v), cosd = try gpu(rope.cos), sind = try gpu(rope.sin)
            rope.forward(&q, batch: batch, seqLen: seqLen, heads: heads)
            rope.forward(&kk, batch: batch, seqLen: seqLen, heads: kvHeads)
            try d.rope(qd.ptr, cos: cosd.ptr, sin: sind.ptr, rows: N, seqLen: seqLen, heads: heads, headDim: headDim)
            try d.rope(kd.ptr, cos: cosd.ptr, sin: sind.ptr, rows: N, seqLen: seqLen, heads: kvHeads, headDim: headDim)
            add("rope forward D=\(headDim)", Self.maxAbsDiff(q, try qd.floats(q.count)), 1e-5)
            do {  // the backward (sign −1) with its bf16 copy, bit for bit
                var back = q
                rope.backward(&back, batch: batch, seqLen: seqLen, heads: heads)
                let bd = try gpu(q), b16 = try DeviceBuffer(d, bytes: q.count * 2)
                try d.rope(
                    bd.ptr, cos: cosd.ptr, sin: sind.ptr, rows: N, seqLen: seqLen, heads: heads, headDim: headDim, sign: -1, x16: b16.ptr)
                let gb = try bd.floats(q.count)
                add("rope backward D=\(headDim)", Self.maxAbsDiff(back, gb), 1e-5)
                add("rope backward D=\(headDim) bf16 copy", try bf16Mismatches(b16, of: gb), 0, "values differ")
            }
            let shape = Attention.Shape(batch: batch, seqLen: seqLen, heads: heads, kvHeads: kvHeads, headDim: headDim, window: window)
            var out = [Float](repeating: 0, count: N * heads * headDim),
                probs = [Float](repeating: 0, count: batch * heads * seqLen * seqLen)
            Attention.forward(out: &out, probs: &probs, q: q, k: kk, v: v, shape: shape)
            let outd = try DeviceBuffer(d, floats: out.count), lse = try DeviceBuffer(d, floats: batch * heads * seqLen)
            try d.attention(
                out: outd.ptr, lse: lse.ptr, q: qd.ptr, k: kd.ptr, v: vd.ptr, batch: batch, seqLen: seqLen, heads: heads,
                kvHeads: kvHeads, headDim: headDim, window: window)
            let label = "H=\(heads) Hkv=\(kvHeads) D=\(headDim) T=\(seqLen) window=\(window.map(String.init) ?? "none")"
            add("attention fp32 \(label)", Self.maxAbsDiff(out, try outd.floats(out.count)), 1e-5)
            // Backward: the CPU's dq, dk, dv for a random dout against the GPU's, from the GPU forward's out and lse.
            let dout = Self.random(out.count, seed: 16)
            var dq = [Float](repeating: 0, count: q.count), dk = [Float](repeating: 0, count: kk.count), dv = dk
            var scratch = [Float](repeating: 0, count: seqLen * seqLen)
            Attention.backward(dq: &dq, dk: &dk, dv: &dv, dout: dout, q: q, k: kk, v: v, probs: probs, scratch: &scratch, shape: shape)
            let doutd = try gpu(dout)
            try attentionBackwardCheck(
                "attention backward fp32 \(label)", cpu: (dq, dk, dv), dout: doutd, out: outd, lse: lse,
                q: qd, k: kd, v: vd, shape: shape, bf16: false, tolerance: 1e-4)
            if headDim == 64 || headDim == 128 {
                try d.attention(
                    out: outd.ptr, lse: lse.ptr, q: qd.ptr, k: kd.ptr, v: vd.ptr, batch: batch, seqLen: seqLen, heads: heads,
                    kvHeads: kvHeads, headDim: headDim, window: window, bf16: true)
                let scale = Double(out.map { abs($0) }.max()!)
                add(
                    "attention bf16 tensor cores \(label), relative", Self.maxAbsDiff(out, try outd.floats(out.count)) / scale, 2e-2,
                    "max |Δ|/max")
                try attentionBackwardCheck(
                    "attention backward bf16 \(label)", cpu: (dq, dk, dv), dout: doutd, out: outd, lse: lse,
                    q: qd, k: kd, v: vd, shape: shape, bf16: true, tolerance: 3e-2)
            }
        }
        // The real shapes (Qwen3-0.6B's and Llama-3.2-1B's heads at T=1024): the bf16 backward against the fp32 GPU path,
        // and both twice, bit for bit (resume is bit-identical on the same device).
        for (heads, kvHeads, headDim) in [(16, 8, 128), (32, 8, 64)] {
            let shape = Attention.Shape(batch: 1, seqLen: 1024, heads: heads, kvHeads: kvHeads, headDim: headDim)
            try attentionBackwardAtScale(shape)
        }

        // Cross-entropy rows (with ignored targets).
        let (r, V) = (20, 1000)
        let logits = Self.random(r * V, seed: 9, scale: 3)
        let targets: [Int32] = (0..<r).map { $0 % 7 == 3 ? CrossEntropy.ignoreIndex : Int32(($0 * 37) % V) }
        var lc = logits
        let cpu = CrossEntropy.forward(logits: &lc, targets: targets, n: r, vocab: V, gradScale: nil)
        let ld = try gpu(logits), td = try DeviceBuffer(d, ints: targets), rl = try DeviceBuffer(d, floats: r)
        try d.crossEntropyRows(rowLoss: rl.ptr, logits: ld.ptr, targets: td.ptr, rows: r, vocab: V)
        let rows_ = try rl.floats(r)
        let sum = zip(rows_, targets).reduce(0.0) { $0 + ($1.1 == CrossEntropy.ignoreIndex ? 0 : Double($1.0)) }
        add("cross-entropy sum over \(r) rows", abs(sum - cpu.sum) / Double(max(cpu.valid, 1)), 1e-6, "|Δ| mean")
    }

    /// Runs the GPU attention backward (dq, dk, dv first filled with NaN: every element must be written) and
    /// compares each gradient with the CPU's, relative to its largest magnitude.
    mutating func attentionBackwardCheck(
        _ name: String, cpu: ([Float], [Float], [Float]), dout: DeviceBuffer, out: DeviceBuffer,
        lse: DeviceBuffer, q: DeviceBuffer, k: DeviceBuffer, v: DeviceBuffer, shape s: Attention.Shape,
        bf16: Bool, tolerance: Double
    ) throws {
        let grads = try attentionBackwardGPU(dout: dout, out: out, lse: lse, q: q, k: k, v: v, shape: s, bf16: bf16)
        for (label, ref, got) in [("dq", cpu.0, grads.0), ("dk", cpu.1, grads.1), ("dv", cpu.2, grads.2)] {
            let scale = max(Double(ref.map { abs($0) }.max() ?? 0), 1e-30)
            add("\(name) \(label), relative", Self.maxAbsDiff(ref, got) / scale, tolerance, "max |Δ|/max")
        }
    }

    func attentionBackwardGPU(
        dout: DeviceBuffer, out: DeviceBuffer, lse: DeviceBuffer, q: DeviceBuffer, k: DeviceBuffer,
        v: DeviceBuffer, shape s: Attention.Shape, bf16: Bool
    ) throws -> ([Float], [Float], [Float]) {
        let nq = s.batch * s.seqLen * s.heads * s.headDim, nk = s.batch * s.seqLen * s.kvHeads * s.headDim
        let dq = try gpu([Float](repeating: .nan, count: nq)), dk = try gpu([Float](repeating: .nan, count: nk))
        let dv = try gpu([Float](repeating: .nan, count: nk)), delta = try DeviceBuffer(device, floats: s.batch * s.heads * s.seqLen)
        try device.attentionBackward(
            dq: dq.ptr, dk: dk.ptr, dv: dv.ptr, dout: dout.ptr, out: out.ptr, lse: lse.ptr, q: q.ptr, k: k.ptr,
            v: v.ptr, delta: delta.ptr, batch: s.batch, seqLen: s.seqLen, heads: s.heads, kvHeads: s.kvHeads,
            headDim: s.headDim, window: s.window, bf16: bf16)
        return (try dq.floats(nq), try dk.floats(nk), try dv.floats(nk))
    }

    /// bf16 forward and backward against the fp32 GPU path at a model's real shape; each backward twice, bit for bit.
    mutating func attentionBackwardAtScale(_ s: Attention.Shape) throws {
        let nq = s.batch * s.seqLen * s.heads * s.headDim, nk = s.batch * s.seqLen * s.kvHeads * s.headDim
        let q = try gpu(Self.random(nq, seed: 17)), k = try gpu(Self.random(nk, seed: 18)), v = try gpu(Self.random(nk, seed: 19))
        let dout = try gpu(Self.random(nq, seed: 20))
        let out = try DeviceBuffer(device, floats: nq), lse = try DeviceBuffer(device, floats: s.batch * s.heads * s.seqLen)
        let label = "H=\(s.heads) Hkv=\(s.kvHeads) D=\(s.headDim) T=\(s.seqLen)"
        var results: [Bool: ([Float], [Float], [Float])] = [:]
        for bf16 in [false, true] {
            try device.attention(
                out: out.ptr, lse: lse.ptr, q: q.ptr, k: k.ptr, v: v.ptr, batch: s.batch, seqLen: s.seqLen,
                heads: s.heads, kvHeads: s.kvHeads, headDim: s.headDim, window: s.window, bf16: bf16)
            let first = try attentionBackwardGPU(dout: dout, out: out, lse: lse, q: q, k: k, v: v, shape: s, bf16: bf16)
            let again = try attentionBackwardGPU(dout: dout, out: out, lse: lse, q: q, k: k, v: v, shape: s, bf16: bf16)
            let differ = Self.bitMismatches(first.0, again.0) + Self.bitMismatches(first.1, again.1) + Self.bitMismatches(first.2, again.2)
            add("attention backward \(bf16 ? "bf16" : "fp32") \(label) deterministic", differ, 0, "bits ≠")
            results[bf16] = first
        }
        let (ref, got) = (results[false]!, results[true]!)
        for (name, r, g) in [("dq", ref.0, got.0), ("dk", ref.1, got.1), ("dv", ref.2, got.2)] {
            let scale = max(Double(r.map { abs($0) }.max() ?? 0), 1e-30)
            add("attention backward bf16 vs fp32 \(label) \(name), relative", Self.maxAbsDiff(r, g) / scale, 3e-2, "max |Δ|/max")
        }
    }

    // MARK: Whole models

    /// Model shapes covering every family feature: the tiny-llama and tiny-qwen3 fixtures'
    /// configurations, Mistral's sliding window, Qwen2's q/k/v biases and Llama 3's RoPE scaling (with a vocabulary
    /// of 257, not a multiple of 4: the loss rows' element-by-element path, and bf16 logits rows 2-byte aligned).
    public static let modelConfigs: [(String, ModelConfig)] = [
        (
            "tiny-llama",
            ModelConfig(
                family: .llama, vocabSize: 512, hiddenSize: 128, intermediateSize: 256, numLayers: 2, numHeads: 4,
                numKVHeads: 2, rmsNormEps: 1e-6, ropeTheta: 1e4, maxPositionEmbeddings: 256)
        ),
        (
            "tiny-qwen3",
            ModelConfig(
                family: .qwen3, vocabSize: 512, hiddenSize: 128, intermediateSize: 384, numLayers: 2, numHeads: 4,
                numKVHeads: 2, headDim: 48, rmsNormEps: 1e-6, ropeTheta: 1e6, maxPositionEmbeddings: 256,
                tieWordEmbeddings: true, qkNorm: true)
        ),
        (
            "mistral, sliding window 24",
            ModelConfig(
                family: .mistral, vocabSize: 300, hiddenSize: 96, intermediateSize: 160, numLayers: 2,
                numHeads: 6, numKVHeads: 2, maxPositionEmbeddings: 128, slidingWindow: 24)
        ),
        (
            "qwen2, q/k/v biases",
            ModelConfig(
                family: .qwen2, vocabSize: 300, hiddenSize: 64, intermediateSize: 128, numLayers: 2, numHeads: 4,
                numKVHeads: 4, ropeTheta: 1e6, maxPositionEmbeddings: 128, tieWordEmbeddings: true,
                attentionBias: true)
        ),
        (
            "llama3 RoPE scaling",
            ModelConfig(
                family: .llama, vocabSize: 257, hiddenSize: 64, intermediateSize: 128, numLayers: 1,
                numHeads: 2, numKVHeads: 1, ropeTheta: 5e5,
                ropeScaling: .llama3(factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 64),
                maxPositionEmbeddings: 128)
        ),
    ]

    mutating func models() throws {
        let (batch, seqLen) = (2, 40)
        for (name, config) in Self.modelConfigs {
            let model = try Self.selftestModel(config)
            var g = SplitMix64(seed: 13)
            let tokens = (0..<(batch * seqLen)).map { _ in Int32(g.next() % UInt64(config.vocabSize)) }
            let cpu = try hostLogits(model, tokens, batch, seqLen)
            let scale = Double(cpu.map { abs($0) }.max()!)
            for precision in Precision.allCases {
                let gm = try CUDAModel(model: model, device: device, precision: precision)
                let diff = Self.maxAbsDiff(cpu, try gm.logits(tokens: tokens, batch: batch, seqLen: seqLen))
                if precision == .fp32 {
                    add("model \(name): logits fp32", diff, 1e-4)
                } else {
                    add("model \(name): logits bf16, relative", diff / scale, 3e-2, "max |Δ|/max")
                }
            }
            // The NVFP4 W4A4 + FP8 KV model: calibrated on the GPU, against the CPU's calibration.
            let set = QuantizerSet(model: model, config: try QuantConfig.preset("nvfp4_default-kv_fp8"))
            try Calibration.run(model: model, quantizers: set, sequences: [tokens], seqLen: seqLen * batch, batchSize: 1)
            let hostAmax = set.enabled.map { $0.amax ?? 0 }
            let cpuQ = try hostLogits(model, tokens, batch, seqLen)
            let gm = try CUDAModel(model: model, device: device, precision: .fp32)
            try Calibration.run(
                model: model, quantizers: set, sequences: [tokens], seqLen: seqLen * batch, batchSize: 1,
                forward: gm.calibrationForward(seqLen: seqLen * batch))
            gm.markWeightsChanged()
            let amaxDiff = zip(hostAmax, set.enabled.map { $0.amax ?? 0 }).map { Double(abs($0 - $1) / max($0, 1e-30)) }.max() ?? 0
            add("model \(name): NVFP4 calibration amax, relative", amaxDiff, 1e-5, "max |Δ|/amax")
            // The fake-quant forward itself, with the host's amax on both sides (a calibration amax
            // a few ulps apart moves NVFP4 scales, which the amax check above bounds).
            for (q, a) in zip(set.enabled, hostAmax) { q.amax = a }
            gm.markWeightsChanged()
            let gq = try gm.logits(tokens: tokens, batch: batch, seqLen: seqLen)
            add("model \(name): logits NVFP4 fake quant fp32, relative", Self.maxAbsDiff(cpuQ, gq) / scale, 2e-2, "max |Δ|/max")
        }
    }

    func hostLogits(_ model: CausalLM, _ tokens: [Int32], _ batch: Int, _ seqLen: Int) throws -> [Float] {
        let hidden = try model.forward(tokens: tokens, batch: batch, seqLen: seqLen, saveForBackward: false)
        let n = batch * seqLen, V = model.config.vocabSize
        var out = [Float](repeating: 0, count: n * V)
        try out.withUnsafeMutableBufferPointer { try model.lmHead.forward(hidden, out: $0.baseAddress!, n: n) }
        return out
    }
}
