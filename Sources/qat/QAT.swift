import ArgumentParser

@main
struct QAT: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qat",
        abstract: "Quantization-aware training and NVFP4 export of Hugging Face causal LMs, on a CPU.",
        subcommands: [])
}
