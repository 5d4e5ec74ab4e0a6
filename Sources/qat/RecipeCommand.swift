import ArgumentParser
import Foundation
import QATCore
import QATTrain

struct RecipeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recipe",
        abstract: "Check or print a recipe without running it.",
        subcommands: [Validate.self, Show.self])

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check a recipe: YAML, keys, types, ranges, quant_cfg, and that its files exist.")
        @Argument(help: "Recipe YAML.") var file: String
        @Option(name: .customLong("set"), help: "Override a key (repeatable).") var overrides: [String] = []

        func run() throws {
            try QAT.guarded {
                let r = try Recipe.load(path: file, overrides: overrides)
                var missing: [String] = []
                for (key, path) in [("model", r.model), ("data.train", r.data.train), ("data.validation", r.data.validation)]
                where !FileManager.default.fileExists(atPath: path) { missing.append("\(key): \(path)") }
                if let t = r.train.distill.teacher, !FileManager.default.fileExists(atPath: t) {
                    missing.append("train.distill.teacher: \(t)")
                }
                if let c = r.train.distill.teacherLogprobs, !FileManager.default.fileExists(atPath: c) {
                    missing.append("train.distill.teacher_logprobs: \(c)")
                }
                if !missing.isEmpty {
                    throw QATError(
                        "\(file): files not found (relative paths are relative to the working directory):\n  "
                            + missing.joined(separator: "\n  "))
                }
                if r.train.mode == .qad, r.quantize == nil { print("note: QAD without quantize: distillation of an unquantized model") }
                print(
                    "\(file): valid (mode \(r.train.mode.rawValue), quantize "
                        + "\(r.quantizeDescription)\(r.train.mode == .none ? "" : ", \(r.train.steps) steps"))")
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Print a recipe with every default filled in (as YAML qat reads back).")
        @Argument(help: "Recipe YAML.") var file: String
        @Option(name: .customLong("set"), help: "Override a key (repeatable).") var overrides: [String] = []
        func run() throws {
            try QAT.guarded { print(try Recipe.load(path: file, overrides: overrides).yaml, terminator: "") }
        }
    }
}
