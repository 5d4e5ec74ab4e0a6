// swift-tools-version:6.1
import PackageDescription

/// Compute kernels are plain pointer loops: in release builds they are compiled without
/// bounds checks and for the haswell level (AVX2 + FMA, what every x86-64-v3 machine has) so that `.addingProduct`
/// becomes a hardware FMA instead of a software `fmaf` call (see DESIGN.md).
let fast: [SwiftSetting] = [
    .unsafeFlags(["-Ounchecked", "-wmo", "-target-cpu", "haswell"], .when(configuration: .release)),
    .unsafeFlags(["-target-cpu", "haswell"], .when(configuration: .debug)),
]

let package = Package(
    name: "qat",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "qat", targets: ["qat"]),
        .library(name: "QATKit", targets: ["QATCore", "QATIO", "QATData", "QATModels", "QATQuant", "QATTrain", "QATExport"]),
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

        .target(name: "QATCore", dependencies: ["CBLAS"], swiftSettings: fast),
        .target(name: "QATIO", dependencies: ["QATCore", "CJSONC"], swiftSettings: fast),
        .target(name: "QATData", dependencies: ["QATCore", "QATIO", "CHDF5"], swiftSettings: fast),
        .target(name: "QATModels", dependencies: ["QATCore", "QATIO"], swiftSettings: fast),
        .target(name: "QATQuant", dependencies: ["QATCore", "QATIO", "QATModels", "Yams"], swiftSettings: fast),
        .target(name: "QATTrain", dependencies: ["QATCore", "QATIO", "QATData", "QATModels", "QATQuant", "Yams"], swiftSettings: fast),
        .target(name: "QATExport", dependencies: ["QATCore", "QATIO", "QATModels", "QATQuant"], swiftSettings: fast),
        // CUDA backend: the driver API, cuBLAS and NVRTC are opened with dlopen at run time (CCUDA
        // declares the few entry points), so building needs no NVIDIA header or library.
        .target(name: "CCUDA", linkerSettings: [.linkedLibrary("dl")]),
        .target(
            name: "QATCUDA", dependencies: ["QATCore", "QATModels", "QATQuant", "CCUDA"],
            resources: ["common", "elementwise", "rmsnorm", "rope", "attention", "quant", "loss"].map { .embedInCode("Kernels/\($0).cu") },
            swiftSettings: fast),
        .executableTarget(
            name: "qat",
            dependencies: [
                "QATCore", "QATIO", "QATData", "QATModels", "QATQuant", "QATTrain", "QATExport", "QATCUDA",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: fast),

        .target(name: "TestSupport", dependencies: ["QATCore", "QATIO"], path: "Tests/TestSupport"),
        .testTarget(name: "QATCoreTests", dependencies: ["QATCore", "TestSupport"]),
        .testTarget(name: "QATIOTests", dependencies: ["QATIO", "TestSupport"]),
        .testTarget(name: "QATDataTests", dependencies: ["QATData", "TestSupport"]),
        .testTarget(name: "QATModelsTests", dependencies: ["QATModels", "QATData", "TestSupport"]),
        .testTarget(name: "QATQuantTests", dependencies: ["QATQuant", "TestSupport"]),
        .testTarget(name: "QATTrainTests", dependencies: ["QATTrain", "TestSupport"]),
        .testTarget(name: "QATExportTests", dependencies: ["QATExport", "QATTrain", "TestSupport"]),
        // Seeded mutation fuzzing of every parser that reads user files (bounded time).
        .testTarget(name: "QATFuzzTests", dependencies: ["QATIO", "QATData", "QATModels", "QATQuant", "QATTrain", "QATExport", "TestSupport"]),
        // Runs the built `qat` binary as a user would (apply, kill, resume, eval of the export).
        .testTarget(name: "QATEndToEndTests", dependencies: ["QATIO", "QATData", "TestSupport"]),
    ]
)
