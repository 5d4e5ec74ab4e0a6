import CCUDA
import QATCore
extension CUDADevice {
    func attentionBackward(dq: CUdeviceptr, dk: CUdeviceptr, dv: CUdeviceptr, dout: CUdeviceptr, out: CUdeviceptr, lse: CUdeviceptr,
                           q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr, delta: CUdeviceptr, batch: Int, seqLen: Int, heads: Int,
                           kvHeads: Int, headDim: Int, window: Int?, bf16: Bool) throws {
        throw QATError.internal("attention backward: not merged yet")
    }
}
