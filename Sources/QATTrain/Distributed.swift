import Foundation
import QATCore
import QATDistributed
import QATModels
import QATQuant

/// Calibration and evaluation under the run's layout (data-parallel shards, pipeline stages);
/// the communicators and MPI are in QATDistributed.
extension Distributed {
    /// The share of the validation sequences this rank evaluates: its data-parallel group's
    /// (the world, or the pipelines side by side under pipeline parallelism); nil when alone.
    public static func evaluationShard(pipeline: PipelineEngine?, world: Communicator = worldCommunicator) -> (rank: Int, count: Int)? {
        let dp = pipeline?.dataParallel ?? world
        return dp.isDistributed ? (dp.rank, dp.size) : nil
    }

    /// `loop` under the run's layout: data-parallel ranks (of `world`, or the pipelines side
    /// by side) each run their share of the sequences and MAX-reduce the amax values (exact);
    /// a pipeline stage runs every sequence through its own layers.
    public static func calibrationLoop(
        _ loop: CalibrationLoop, model: CausalLM, pipeline: PipelineEngine?,
        world: Communicator
    ) -> CalibrationLoop {
        var distributed = loop
        let dataParallel = pipeline?.dataParallel ?? world
        if dataParallel.isDistributed {
            if loop.sequences.count >= dataParallel.size {
                distributed.sequences = loop.sequences.enumerated()
                    .filter { $0.offset % dataParallel.size == dataParallel.rank }.map(\.element)
            }
            distributed.reduceMax = { try dataParallel.allReduceMax(&$0) }
        }
        distributed.forward = pipeline?.forwardHook(model, seqLen: loop.seqLen)
        return distributed
    }

    /// `Evaluation.evaluate` under any layout, with the one-process figure on every rank:
    /// each data-parallel rank (or pipeline) takes its share of the sequences, a pipeline runs
    /// them through its stages (the last one computes the CE sums), and the sums are added
    /// over the world (stages before the last add zeros).
    public static func evaluate(
        model: CausalLM, stream: [Int32], seqLen: Int, batchSize: Int, maxSequences: Int?,
        pipeline: PipelineEngine?, world: Communicator = worldCommunicator,
        progress: ((Int, Int) -> Void)? = nil
    ) throws -> EvalResult {
        try Evaluation.evaluate(
            model: model, stream: stream, seqLen: seqLen, batchSize: batchSize, maxSequences: maxSequences,
            progress: progress, shard: evaluationShard(pipeline: pipeline, world: world),
            reduce: world.isDistributed ? { try world.allReduceSum(&$0) } : nil,
            forward: pipeline?.forwardHook(model, seqLen: seqLen))
    }
}
