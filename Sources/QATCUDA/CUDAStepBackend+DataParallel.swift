import Foundation
import QATCore
import QATDistributed
import QATTrain

/// Data parallelism on GPUs: one process per GPU (`mpirun -np N qat apply` with device: cuda),
/// each running its rows of the global batch. The valid-token count and the loss sums go
/// over MPI (a few doubles); the gradients are summed on the device by `gradientReducer`
/// (NCCL, or staged through MPI) before the trainer reads them, so the gradient norm and
/// clipping are those of the global step's gradients, as in `DataParallelStepBackend`.
extension CUDAStepBackend {
    /// `value` summed over the data-parallel ranks (itself in one process).
    func globalSum(_ value: Int) throws -> Int {
        guard dataParallel.isDistributed else { return value }
        var total = [Double(value)]
        try dataParallel.allReduceSum(&total)
        return Int(total[0])
    }

    /// The step's gradients and loss sums over every rank (unchanged in one process).
    func reducedOverRanks(_ local: LossParts) throws -> LossParts {
        guard dataParallel.isDistributed else { return local }
        guard let reducer = gradientReducer else {
            throw QATError.internal("data parallel on the GPU over \(dataParallel.size) ranks without a gradient reducer")
        }
        try reducer.reduce(model)
        var parts = local
        var sums = [parts.total, parts.ce, parts.kd]
        try dataParallel.allReduceSum(&sums)
        parts.total = sums[0]; parts.ce = sums[1]; parts.kd = sums[2]
        return parts
    }
}
