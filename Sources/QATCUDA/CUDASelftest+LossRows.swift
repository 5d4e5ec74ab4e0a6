import CCUDA
import Foundation
import QATCore
import QATModels
import QATTrain

/// `qat selftest --device cuda`: the loss-row kernels of loss.cu and the gradient reduction of
/// optim.cu against the CPU, kernel by kernel, on the corners the whole-model checks do not
/// reach: ignored rows, V not a multiple of 4 (the element-by-element path), a teacher row
/// stride above V, kd_ratio < 1 with T ≠ 1 (CE apart from the tempered softmax), each
/// divergence, a row whose running maximum grows at every element (the online rescaling) and
/// a full Qwen3 vocabulary row.
extension CUDASelftest {
    mutating func lossRows() throws {
        for V in [1000, 1003] { try crossEntropyRowsCheck(rows: 24, vocab: V) }
        try crossEntropyRowsCheck(rows: 3, vocab: 151_936)
        // (V, teacher stride, T, kd_ratio): vectorised with a wider teacher, element by element, T < 1 with CE.
        let shapes: [(Int, Int, Double, Double)] = [
            (1000, 1008, 2, 0.5), (1003, 1003, 1, 1), (1000, 1000, 0.7, 0.25), (1003, 1010, 1, 0.5),
        ]
        for (loss, beta) in [(Recipe.KDLoss.forwardKL, 0.5), (.reverseKL, 0.5), (.jsd, 0.3)] {
            for (V, stride, T, ratio) in shapes {
                try distillationRowsCheck(rows: 24, vocab: V, teacherStride: stride, loss: loss, beta: beta, temperature: T, kdRatio: ratio)
            }
        }
        try distillationRowsCheck(
            rows: 3, vocab: 151_936, teacherStride: 151_936, loss: .forwardKL, beta: 0.5, temperature: 2, kdRatio: 0.5)
        try distillationRowsCheck(rows: 3, vocab: 151_936, teacherStride: 151_936, loss: .jsd, beta: 0.7, temperature: 1, kdRatio: 0.5)
        try sumOfSquaresCheck()
    }

    /// Random logits (scale 3), row 1 a ramp (its maximum grows at every element), targets with
    /// every seventh row ignored.
    static func lossRowInputs(rows: Int, vocab V: Int, seed: UInt64) -> (logits: [Float], targets: [Int32]) {
        var x = random(rows * V, seed: seed, scale: 3)
        if rows > 1 { for j in 0..<V { x[V + j] = Float(j) * (8 / Float(V)) - 4 } }
        let targets: [Int32] = (0..<rows).map { $0 % 7 == 3 ? CrossEntropy.ignoreIndex : Int32(($0 * 37 + 11) % V) }
        return (x, targets)
    }

    /// cross_entropy_rows (loss) and cross_entropy_backward (loss and gradient) against CrossEntropy.forward
    /// (whose fp32 sums of exp limit the agreement on long rows to ~1e-5).
    private mutating func crossEntropyRowsCheck(rows r: Int, vocab V: Int) throws {
        let (logits, targets) = Self.lossRowInputs(rows: r, vocab: V, seed: 51)
        let valid = targets.filter { $0 != CrossEntropy.ignoreIndex }.count, scale = 1 / Float(valid)
        var forward = logits, backward = logits
        let cpu = CrossEntropy.forward(logits: &forward, targets: targets, n: r, vocab: V, gradScale: nil)
        let cpuB = CrossEntropy.forward(logits: &backward, targets: targets, n: r, vocab: V, gradScale: scale)
        let ld = try gpu(logits), td = try DeviceBuffer(device, ints: targets), rl = try DeviceBuffer(device, floats: r)
        func validSum(_ rowLoss: [Float]) -> Double {
            zip(rowLoss, targets).reduce(0.0) { $0 + ($1.1 == CrossEntropy.ignoreIndex ? 0 : Double($1.0)) }
        }
        try device.crossEntropyRows(rowLoss: rl.ptr, logits: ld.ptr, targets: td.ptr, rows: r, vocab: V)
        add("cross_entropy_rows V=\(V)", abs(validSum(try rl.floats(r)) - cpu.sum) / Double(valid), 2e-5, "|Δ| mean")
        let g16 = try DeviceBuffer(device, bytes: r * V * 2)
        try device.crossEntropyBackward(
            rowLoss: rl.ptr, logits: ld.ptr, targets: td.ptr, rows: r, vocab: V, gradScale: scale, logits16: g16.ptr)
        add("cross_entropy_backward V=\(V): loss", abs(validSum(try rl.floats(r)) - cpuB.sum) / Double(valid), 2e-5, "|Δ| mean")
        let m = Double(backward.map { abs($0) }.max() ?? 0), gradient = try ld.floats(r * V)
        add(
            "cross_entropy_backward V=\(V): gradient", Self.maxAbsDiff(backward, gradient) / max(m, 1e-30), 1e-4,
            "max |Δ|/max")
        // Its bf16 copy: the fp32 gradient rounded to nearest even, bit for bit.
        add("cross_entropy_backward V=\(V): bf16 copy of the gradient", try bf16Mismatches(g16, of: gradient), 0, "values differ")
        // bf16 only (keepFP32 false, the training path without a bias or adapter): the same copy, the logits untouched.
        let ld2 = try gpu(logits), g16b = try DeviceBuffer(device, bytes: r * V * 2)
        try device.crossEntropyBackward(
            rowLoss: rl.ptr, logits: ld2.ptr, targets: td.ptr, rows: r, vocab: V, gradScale: scale, logits16: g16b.ptr, keepFP32: false)
        add("cross_entropy_backward V=\(V) bf16 only: the copy", try bf16Mismatches(g16b, of: gradient), 0, "values differ")
        add("cross_entropy_backward V=\(V) bf16 only: logits kept", Self.maxAbsDiff(logits, try ld2.floats(r * V)), 0, "max |Δ|")
        // bf16 logits (`cross_entropy_backward_bf16`, the bf16 lm_head's path): against this kernel on the same values
        // (the logits rounded to bf16, as fp32), the same losses and bf16 gradient, bit for bit.
        let want = try gpu(Self.roundedBF16(logits)), want16 = try DeviceBuffer(device, bytes: r * V * 2)
        let got16 = try gpu16(logits), rl16 = try DeviceBuffer(device, floats: r)
        try device.crossEntropyBackward(
            rowLoss: rl.ptr, logits: want.ptr, targets: td.ptr, rows: r, vocab: V, gradScale: scale, logits16: want16.ptr, keepFP32: false)
        try device.crossEntropyBackwardBF16(rowLoss: rl16.ptr, logits16: got16.ptr, targets: td.ptr, rows: r, vocab: V, gradScale: scale)
        let differ =
            zip(try bits16(want16, count: r * V), try bits16(got16, count: r * V)).filter { $0 != $1 }.count
            + zip(try rl.floats(r), try rl16.floats(r)).filter { $0.bitPattern != $1.bitPattern }.count
        add("cross_entropy_backward_bf16 V=\(V) vs the fp32 kernel on its values: losses, gradient", Double(differ), 0, "values differ")
    }

    /// kd_rows against DistillationKernels.fullRow: Σ CE and Σ T²·KD over the valid rows, and the gradient.
    private mutating func distillationRowsCheck(
        rows r: Int, vocab V: Int, teacherStride: Int, loss: Recipe.KDLoss, beta: Double, temperature T: Double, kdRatio: Double
    ) throws {
        var spec = Recipe.DistillSpec()
        spec.loss = loss; spec.beta = beta; spec.temperature = T; spec.kdRatio = kdRatio
        let k = try DistillationConstants(spec: spec)
        let (student, targets) = Self.lossRowInputs(rows: r, vocab: V, seed: 52)
        // The teacher: near the student (a small KL, as in training, where it is a difference of large sums), padded to its stride.
        let noise = Self.random(r * teacherStride, seed: 53, scale: 1.5)
        var teacher = [Float](repeating: 0, count: r * teacherStride)
        for i in 0..<r {
            for j in 0..<teacherStride {
                teacher[i * teacherStride + j] = noise[i * teacherStride + j] + (j < V ? student[i * V + j] * 0.8 : 0)
            }
        }
        let valid = targets.filter { $0 != CrossEntropy.ignoreIndex }.count, scale = 1 / Float(valid)
        var grad = student
        let cpu = teacher.withUnsafeBufferPointer { tb in
            targets.withUnsafeBufferPointer { gb in
                DistillationKernels.fullRowsReference(
                    student: &grad, teacher: tb.baseAddress!, teacherStride: teacherStride, n: r, vocab: V, targets: gb.baseAddress!,
                    constants: k, gradScale: scale)
            }
        }
        let (kind, b): (Int, Float)
        switch k.divergence {
        case .forwardKL: (kind, b) = (0, 0)
        case .reverseKL: (kind, b) = (1, 1)
        case .jsd(let x): (kind, b) = (2, Float(x))
        }
        let sd = try gpu(student), ud = try gpu(teacher), td = try DeviceBuffer(device, ints: targets)
        let out = try DeviceBuffer(device, bytes: r * 16), s16 = try DeviceBuffer(device, bytes: r * V * 2)
        try device.distillationRows(
            rowOut: out.ptr, student: sd.ptr, teacher: ud.ptr, teacherStride: teacherStride, targets: td.ptr, rows: r, vocab: V,
            kind: kind, beta: b, invT: Float(1 / T), cKD: Float(kdRatio * Double(scale) * T), cCE: Float((1 - kdRatio) * Double(scale)),
            computeCE: k.computeCE, student16: s16.ptr)
        var ce = 0.0, kd = 0.0
        try device.addDistillationSums(out.ptr, targets: targets[0..<r], temperature: T, ce: &ce, kd: &kd)
        let label = "kd_rows \(loss.rawValue) V=\(V) stride \(teacherStride) T=\(T) kd_ratio \(kdRatio)"
        add("\(label): loss", (abs(ce - cpu.ce) + abs(kd - cpu.kd)) / Double(valid), 1e-5, "|Δ| mean")
        let m = Double(grad.map { abs($0) }.max() ?? 0), gradient = try sd.floats(r * V)
        add("\(label): gradient", Self.maxAbsDiff(grad, gradient) / max(m, 1e-30), 1e-4, "max |Δ|/max")
        add("\(label): bf16 copy", try bf16Mismatches(s16, of: gradient), 0, "values differ")
        if kind == 0 {  // bf16 only (keepFP32 false): the same copy, the logits untouched
            let sd2 = try gpu(student), s16b = try DeviceBuffer(device, bytes: r * V * 2)
            try device.distillationRows(
                rowOut: out.ptr, student: sd2.ptr, teacher: ud.ptr, teacherStride: teacherStride, targets: td.ptr, rows: r, vocab: V,
                kind: kind, beta: b, invT: Float(1 / T), cKD: Float(kdRatio * Double(scale) * T),
                cCE: Float((1 - kdRatio) * Double(scale)), computeCE: k.computeCE, student16: s16b.ptr, keepFP32: false)
            add("\(label) bf16 only: the copy", try bf16Mismatches(s16b, of: gradient), 0, "values differ")
            add("\(label) bf16 only: logits kept", Self.maxAbsDiff(student, try sd2.floats(r * V)), 0, "max |Δ|")
        }
        // bf16 logits, student's and teacher's (`kd_rows_bf16`, the bf16 lm_heads' path): against kd_rows on the same
        // values (both rounded to bf16, as fp32), the same row results and bf16 gradient, bit for bit.
        let want = try gpu(Self.roundedBF16(student)), want16 = try DeviceBuffer(device, bytes: r * V * 2)
        let got16 = try gpu16(student), teacher16 = try gpu16(teacher), out16 = try DeviceBuffer(device, bytes: r * 16)
        let invT = Float(1 / T), cKD = Float(kdRatio * Double(scale) * T), cCE = Float((1 - kdRatio) * Double(scale))
        let teacherRounded = try gpu(Self.roundedBF16(teacher))  // (held here: a temporary buffer is freed before the launch)
        try device.distillationRows(
            rowOut: out.ptr, student: want.ptr, teacher: teacherRounded.ptr, teacherStride: teacherStride, targets: td.ptr,
            rows: r, vocab: V, kind: kind, beta: b, invT: invT, cKD: cKD, cCE: cCE, computeCE: k.computeCE, student16: want16.ptr,
            keepFP32: false)
        try device.distillationRowsBF16(
            rowOut: out16.ptr, student16: got16.ptr, teacher16: teacher16.ptr, teacherStride: teacherStride, targets: td.ptr, rows: r,
            vocab: V, kind: kind, beta: b, invT: invT, cKD: cKD, cCE: cCE, computeCE: k.computeCE)
        var rows32 = [Double](repeating: 0, count: 2 * r), rows16 = rows32
        try rows32.withUnsafeMutableBytes { try out.download($0.baseAddress!, bytes: $0.count) }
        try rows16.withUnsafeMutableBytes { try out16.download($0.baseAddress!, bytes: $0.count) }
        let differ =
            zip(try bits16(want16, count: r * V), try bits16(got16, count: r * V)).filter { $0 != $1 }.count
            + zip(rows32, rows16).filter { $0.bitPattern != $1.bitPattern }.count
        add("kd_rows_bf16 \(loss.rawValue) V=\(V) stride \(teacherStride) vs kd_rows on its values", Double(differ), 0, "values differ")
    }

    /// sumsq_chunks over tensors of awkward sizes (one not 16-byte aligned, so read element by
    /// element), with the default chunk and a small one (many chunks per tensor), against
    /// GradientClipping.sumOfSquares; then a NaN in one tensor must make that tensor's sum, and only
    /// that one, non-finite.
    private mutating func sumOfSquaresCheck() throws {
        let counts = [1, 3, 1000, 4097, 65_536, 65_537, 200_003]
        var offsets: [Int] = [], total = 0
        for (i, c) in counts.enumerated() {
            offsets.append(total + (i == 3 ? 1 : 0))
            total += (c + 1 + 63) / 64 * 64
        }
        let host = Self.random(total, seed: 54, scale: 0.3)
        let buffer = try gpu(host)
        let cpu = zip(counts, offsets).map { c, o in GradientClipping.sumOfSquares(Tensor(shape: [c], values: Array(host[o..<(o + c)]))) }
        let tensors = zip(counts, offsets).map { c, o in (address: UInt64(buffer.ptr) + UInt64(o * 4), count: c) }
        func sums(_ plan: GradientChunks) throws -> [Double] {
            let table = try DeviceBuffer(device, bytes: plan.table.count * 8)
            try plan.table.withUnsafeBytes { try table.upload($0.baseAddress!, bytes: $0.count) }
            let partials = try DeviceBuffer(device, bytes: plan.count * 8)
            try device.sumOfSquares(chunks: table.ptr, count: plan.count, partials: partials.ptr)
            var p = [Double](repeating: 0, count: plan.count)
            try p.withUnsafeMutableBytes { try partials.download($0.baseAddress!, bytes: $0.count) }
            return plan.tensorSums(p)
        }
        for chunk in [GradientChunks.defaultChunkFloats, 4096] {
            let got = try sums(GradientChunks(tensors, chunkFloats: chunk))
            let e = zip(got, cpu).map { abs($0 - $1) / max($1, 1e-300) }.max() ?? .nan
            add("sumsq_chunks, chunk \(chunk): per tensor", e, 1e-12, "max rel |Δ|")
        }
        var nan = Float.nan
        try buffer.upload(&nan, bytes: 4, offset: (offsets[5] + 40_000) * 4)
        let got = try sums(GradientChunks(tensors, chunkFloats: 4096))
        let wrong = got.enumerated().filter { $0.element.isFinite == ($0.offset == 5) }.count
        add("sumsq_chunks: NaN named in its tensor only", Double(wrong), 0, "mismatches")
    }
}
