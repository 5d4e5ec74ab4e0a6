// swift-tools-version:6.1
import PackageDescription

/// Every target is built with Swift's checks (integer overflow, array bounds, preconditions)
/// in release mode too: the parsers of user files (safetensors, JSON, YAML recipes and
/// quant_cfg, tokenizer.json, HDF5, checkpoints) must trap on a bad index or an overflow, not
/// corrupt memory, and the fuzz campaign of `scripts/test.sh` runs on this build. Measured
/// against `-Ounchecked` on the same machine, interleaved (README, "Checked builds"): no
/// difference beyond noise (CPU time of a fixed QAT run: 12.26 s checked vs 12.37 s), so no
/// target keeps `-Ounchecked`: the hot loops index through unsafe pointers, which carry no
/// bounds checks either way. `-target-cpu haswell` (AVX2 + FMA, every x86-64-v3 machine)
/// turns `.addingProduct` into a hardware FMA instead of a software `fmaf` call.
let settings: [SwiftSetting] = [
    .unsafeFlags(["-wmo", "-target-cpu", "haswell"], .when(configuration: .release)),
    .unsafeFlags(["-target-cpu", "haswell"], .when(configuration: .debug)),
]

let package = Package(
    name: "qat",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "qat", targets: ["qat"]),
        .library(
            name: "QATKit", targets: ["QATCore", "QATIO", "QATData", "QATModels", "QATQuant", "QATDistributed", "QATTrain", "QATExport"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
    ],
    targets: [
        // System libraries (Debian: libopenblas-dev, libhdf5-dev, libjson-c-dev).
        .systemLibrary(name: "CBLAS", pkgConfig: "openblas", providers: [.apt(["libopenblas-dev"])]),
        .systemLibrary(name: "CHDF5", pkgConfig: "hdf5", providers: [.apt(["libhdf5-dev"])]),
        .systemLibrary(name: "CJSONC", pkgConfig: "json-c", providers: [.apt(["libjson-c-dev"])]),

        .target(name: "QATCore", dependencies: ["CBLAS"], swiftSettings: settings),
        .target(name: "QATIO", dependencies: ["QATCore", "CJSONC"], swiftSettings: settings),
        .target(name: "QATData", dependencies: ["QATCore", "QATIO", "CHDF5"], swiftSettings: settings),
        .target(name: "QATModels", dependencies: ["QATCore", "QATIO"], swiftSettings: settings),
        .target(name: "QATQuant", dependencies: ["QATCore", "QATIO", "QATModels", "Yams"], swiftSettings: settings),
        // Communicators (single process, Open MPI through dlopen) and the ZeRO-1 partition; the
        // pipeline engine stays in QATTrain (it runs the loss and the optimizer).
        .target(name: "QATDistributed", dependencies: ["QATCore"], swiftSettings: settings),
        .target(
            name: "QATTrain", dependencies: ["QATCore", "QATIO", "QATData", "QATModels", "QATQuant", "QATDistributed", "Yams"],
            swiftSettings: settings),
        .target(name: "QATExport", dependencies: ["QATCore", "QATIO", "QATModels", "QATQuant"], swiftSettings: settings),
        // CUDA backend: the driver API, cuBLAS and NVRTC are opened with dlopen at run time (CCUDA
        // declares the few entry points), so building needs no NVIDIA header or library.
        .target(name: "CCUDA", linkerSettings: [.linkedLibrary("dl")]),
        .target(
            name: "QATCUDA", dependencies: ["QATCore", "QATModels", "QATQuant", "QATTrain", "CCUDA"],
            resources: ["common", "elementwise", "rmsnorm", "rope", "attention", "quant", "loss", "topk", "optim", "lora"].map {
                .embedInCode("Kernels/\($0).cu")
            },
            swiftSettings: settings),
        .executableTarget(
            name: "qat",
            dependencies: [
                "QATCore", "QATIO", "QATData", "QATModels", "QATQuant", "QATTrain", "QATExport", "QATCUDA",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: settings),

        .target(name: "TestSupport", dependencies: ["QATCore", "QATIO"], path: "Tests/TestSupport"),
        .testTarget(name: "QATCoreTests", dependencies: ["QATCore", "TestSupport"]),
        .testTarget(name: "QATIOTests", dependencies: ["QATIO", "TestSupport"]),
        .testTarget(name: "QATDataTests", dependencies: ["QATData", "TestSupport"]),
        .testTarget(name: "QATModelsTests", dependencies: ["QATModels", "QATData", "TestSupport"]),
        .testTarget(name: "QATQuantTests", dependencies: ["QATQuant", "TestSupport"]),
        .testTarget(name: "QATTrainTests", dependencies: ["QATTrain", "TestSupport"]),
        .testTarget(name: "QATCUDATests", dependencies: ["QATCUDA", "QATModels", "QATTrain", "TestSupport"]),
        .testTarget(name: "QATExportTests", dependencies: ["QATExport", "QATTrain", "TestSupport"]),
        // Seeded mutation fuzzing of every parser that reads user files (bounded time).
        .testTarget(
            name: "QATFuzzTests", dependencies: ["QATIO", "QATData", "QATModels", "QATQuant", "QATTrain", "QATExport", "TestSupport"]),
        // Runs the built `qat` binary as a user would (apply, kill, resume, eval of the export).
        .testTarget(name: "QATEndToEndTests", dependencies: ["QATIO", "QATData", "TestSupport"]),
    ]
)
