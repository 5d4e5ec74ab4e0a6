import QATQuant
import XCTest
import Yams

final class GlobTests: XCTestCase {
    func testFnmatchSemantics() {
        XCTAssertTrue(Glob.matches("*", "model.layers.0.mlp.up_proj.weight_quantizer"))
        XCTAssertTrue(Glob.matches("*weight_quantizer", "model.layers.0.mlp.up_proj.weight_quantizer"))
        XCTAssertFalse(Glob.matches("*weight_quantizer", "model.layers.0.mlp.up_proj.input_quantizer"))
        XCTAssertTrue(Glob.matches("*[kv]_bmm_quantizer", "model.layers.3.self_attn.k_bmm_quantizer"))
        XCTAssertTrue(Glob.matches("*[kv]_bmm_quantizer", "model.layers.3.self_attn.v_bmm_quantizer"))
        XCTAssertFalse(Glob.matches("*[kv]_bmm_quantizer", "model.layers.3.self_attn.q_bmm_quantizer"))
        XCTAssertFalse(Glob.matches("*[!kv]_bmm_quantizer", "model.layers.3.self_attn.k_bmm_quantizer"))
        XCTAssertTrue(Glob.matches("*[!kv]_bmm_quantizer", "model.layers.3.self_attn.q_bmm_quantizer"))
        XCTAssertTrue(Glob.matches("*mlp.gate.*", "model.layers.0.mlp.gate.weight_quantizer"))
        XCTAssertFalse(Glob.matches("*mlp.gate.*", "model.layers.0.mlp.gate_proj.weight_quantizer"))
        XCTAssertTrue(Glob.matches("*lm_head*", "lm_head.weight_quantizer"))
        XCTAssertTrue(Glob.matches("output.*", "output.weight_quantizer"))
        XCTAssertFalse(Glob.matches("output.*", "model.output.weight_quantizer"))
        XCTAssertTrue(Glob.matches("layers.?.mlp*", "layers.7.mlp.down"))
        XCTAssertFalse(Glob.matches("layers.?.mlp*", "layers.17.mlp.down"))
        XCTAssertTrue(Glob.matches("layers.[0-3].*", "layers.2.x"))
        XCTAssertFalse(Glob.matches("layers.[0-3].*", "layers.5.x"))
        XCTAssertTrue(Glob.matches("a[]]b", "a]b"))  // ']' first in a set is literal
        XCTAssertTrue(Glob.matches("a[!]]b", "axb"))
        XCTAssertTrue(Glob.matches("a[b", "a[b"))  // unclosed '[' is literal
        XCTAssertTrue(Glob.matches("a.b", "a.b"))
        XCTAssertFalse(Glob.matches("a.b", "axb"))  // '.' is literal, not regex
        XCTAssertFalse(Glob.matches("*Weight*", "w.weight"))  // case-sensitive
        XCTAssertTrue(Glob.matches("**x*", "abxcd"))
        XCTAssertTrue(Glob.matches("", ""))
        XCTAssertFalse(Glob.matches("", "a"))
        XCTAssertTrue(Glob.matches("*.weight", "model.layers.0.self_attn.q_proj.weight"))
        XCTAssertFalse(Glob.matches("*.weight", "model.layers.0.self_attn.q_proj.weight_scale"))
    }
}

final class QuantConfigTests: XCTestCase {
    let q = "model.layers.0.self_attn.q_proj"
    let gate = "model.layers.0.mlp.gate_proj"

    static let listYAML = """
        quant_cfg:
          - quantizer_name: "*"
            enable: false
          - quantizer_name: "*weight_quantizer"
            cfg: {num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}, axis: null}
          - quantizer_name: "*input_quantizer"
            cfg: {num_bits: [2, 1], block_sizes: {-1: 16, type: dynamic, scale_bits: [4, 3]}}
          - quantizer_name: "*[kv]_bmm_quantizer"
            cfg: {num_bits: e4m3, axis: null}
          - quantizer_name: "*lm_head*"
            enable: false
        algorithm: max
        """

    func testListFormat() throws {
        let c = try QuantConfig(yaml: Self.listYAML)
        XCTAssertEqual(c.entries.count, 5)
        XCTAssertEqual(c.algorithm, "max")
        let nv = QuantizerSpec(enabled: true, format: .nvfp4(blockSize: 16))
        XCTAssertEqual(c.resolve(quantizerName: "\(q).weight_quantizer"), nv)
        XCTAssertEqual(c.resolve(quantizerName: "\(q).input_quantizer"), nv)
        XCTAssertEqual(
            c.resolve(quantizerName: "model.layers.0.self_attn.k_bmm_quantizer"), QuantizerSpec(enabled: true, format: .fp8PerTensor))
        XCTAssertEqual(c.resolve(quantizerName: "model.layers.0.self_attn.q_bmm_quantizer")?.enabled, false)
        XCTAssertEqual(c.resolve(quantizerName: "lm_head.weight_quantizer")?.enabled, false)
        XCTAssertEqual(c.entries[1].line, 4)
    }

    func testLaterEntriesWinAndEnableOnlyKeepsCfg() throws {
        let c = try QuantConfig(
            yaml: """
                quant_cfg:
                  - quantizer_name: "*weight_quantizer"
                    cfg: {num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}, pass_through_bwd: false}
                  - quantizer_name: "*mlp*"
                    enable: false
                  - quantizer_name: "*mlp.gate_proj*"
                    enable: true
                  - quantizer_name: "*self_attn*weight_quantizer"
                    cfg: {num_bits: e4m3}
                  - quantizer_name: "*input_quantizer"
                    cfg: {num_bits: 8}
                  - quantizer_name: "*input_quantizer"
                    enable: false
                """)
        // enable-only entries toggle and keep the earlier cfg (NVFP4, clipped STE).
        XCTAssertEqual(
            c.resolve(quantizerName: "\(gate).weight_quantizer"), QuantizerSpec(enabled: true, format: .nvfp4(blockSize: 16), ste: .clipped)
        )
        XCTAssertEqual(
            c.resolve(quantizerName: "model.layers.0.mlp.up_proj.weight_quantizer"),
            QuantizerSpec(enabled: false, format: .nvfp4(blockSize: 16), ste: .clipped))
        // a later cfg fully replaces (STE back to the default pass-through).
        XCTAssertEqual(c.resolve(quantizerName: "\(q).weight_quantizer"), QuantizerSpec(enabled: true, format: .fp8PerTensor))
        XCTAssertEqual(c.resolve(quantizerName: "\(q).input_quantizer"), QuantizerSpec(enabled: false, format: .int8PerTensor))
        XCTAssertNil(c.resolve(quantizerName: "model.layers.0.self_attn.k_bmm_quantizer"))
        // enable: true alone on a never-configured quantizer gives ModelOpt's defaults (INT8).
        let d = try QuantConfig(yaml: "quant_cfg: [{quantizer_name: '*', enable: true}]")
        XCTAssertEqual(d.resolve(quantizerName: "x.weight_quantizer"), QuantizerSpec(enabled: true, format: .int8PerTensor))
    }

    func testLegacyDictFormat() throws {
        let c = try QuantConfig(
            yaml: """
                quant_cfg:
                  "*weight_quantizer": {num_bits: [2, 1], block_sizes: {-1: 16, type: dynamic, scale_bits: [4, 3]}, \
                axis: null, enable: true}
                  "*input_quantizer": {num_bits: [2, 1], block_sizes: {-1: 16, type: dynamic, scale_bits: [4, 3]}, enable: true}
                  "*lm_head*": {enable: false}
                  "nn.Linear": {"*output_quantizer": {enable: false}}
                  "default": {enable: false}
                algorithm: max
                """)
        // "default" is applied first ("*"), so it does not undo the others.
        XCTAssertEqual(c.entries.first?.quantizerName, "*")
        XCTAssertEqual(c.entries.first?.enable, false)
        XCTAssertEqual(c.resolve(quantizerName: "\(q).weight_quantizer"), QuantizerSpec(enabled: true, format: .nvfp4(blockSize: 16)))
        XCTAssertEqual(c.resolve(quantizerName: "\(q).input_quantizer")?.enabled, true)
        XCTAssertEqual(c.resolve(quantizerName: "lm_head.weight_quantizer")?.enabled, false)
        XCTAssertEqual(c.resolve(quantizerName: "model.layers.0.self_attn.k_bmm_quantizer")?.enabled, false)
        let oq = c.entries.first { $0.quantizerName == "*output_quantizer" }
        XCTAssertEqual(oq?.parentClass, "nn.Linear")
        // Legacy single-key entries inside a list work too.
        let l = try QuantConfig(yaml: "quant_cfg: [{'*': {enable: false}}, {'*weight_quantizer': {num_bits: e4m3}}]")
        XCTAssertEqual(l.resolve(quantizerName: "a.weight_quantizer"), QuantizerSpec(enabled: true, format: .fp8PerTensor))
        XCTAssertEqual(l.resolve(quantizerName: "a.input_quantizer")?.enabled, false)
    }

    func testParentClassEntries() throws {
        let c = try QuantConfig(
            yaml: """
                quant_cfg:
                  - {quantizer_name: "*", cfg: {num_bits: e4m3}}
                  - {parent_class: nn.Linear, quantizer_name: "*", enable: false}
                """)
        XCTAssertEqual(c.resolve(quantizerName: "\(q).weight_quantizer")?.enabled, false)  // in nn.Linear
        XCTAssertEqual(c.resolve(quantizerName: "model.layers.0.self_attn.k_bmm_quantizer")?.enabled, true)
        XCTAssertEqual(c.resolve(quantizerName: "emb.weight_quantizer", parentClass: .some("nn.Embedding"))?.enabled, true)
    }

    func testPresets() throws {
        let p = try QuantConfig.preset("nvfp4_default-kv_fp8")
        let nv = QuantizerSpec(enabled: true, format: .nvfp4(blockSize: 16))
        XCTAssertEqual(p.resolve(quantizerName: "\(q).weight_quantizer"), nv)
        XCTAssertEqual(p.resolve(quantizerName: "\(gate).input_quantizer"), nv)
        XCTAssertEqual(
            p.resolve(quantizerName: "model.layers.1.self_attn.v_bmm_quantizer"), QuantizerSpec(enabled: true, format: .fp8PerTensor))
        XCTAssertEqual(p.resolve(quantizerName: "model.layers.1.self_attn.q_bmm_quantizer")?.enabled, false)
        for off in [
            "lm_head.weight_quantizer", "lm_head.input_quantizer", "model.layers.0.mlp.gate.weight_quantizer",
            "model.layers.0.mlp.router.weight_quantizer", "model.layers.0.block_sparse_moe.gate.weight_quantizer",
            "output.weight_quantizer", "model.output_layer.weight_quantizer", "model.layers.0.proj_out.weight_quantizer",
        ] {
            XCTAssertEqual(p.resolve(quantizerName: off)?.enabled, false, off)
        }
        XCTAssertEqual(p.resolve(quantizerName: "model.embed_tokens.weight_quantizer", parentClass: .some("nn.Embedding"))?.enabled, false)
        XCTAssertTrue(p.entries.contains { $0.parentClass == "nn.BatchNorm2d" && !$0.enable })

        let d = try QuantConfig.preset("nvfp4_default")
        XCTAssertEqual(d.resolve(quantizerName: "model.layers.1.self_attn.k_bmm_quantizer")?.enabled, false)
        XCTAssertEqual(d.resolve(quantizerName: "\(q).input_quantizer"), nv)

        let w = try QuantConfig.preset("nvfp4_weight_only")
        XCTAssertEqual(w.resolve(quantizerName: "\(q).weight_quantizer"), nv)
        XCTAssertEqual(w.resolve(quantizerName: "\(q).input_quantizer")?.enabled, false)
        XCTAssertEqual(w.resolve(quantizerName: "model.layers.1.self_attn.k_bmm_quantizer")?.enabled, false)

        let f = try QuantConfig.preset("fp8_default-kv_fp8")
        let f8 = QuantizerSpec(enabled: true, format: .fp8PerTensor)
        XCTAssertEqual(f.resolve(quantizerName: "\(q).weight_quantizer"), f8)
        XCTAssertEqual(f.resolve(quantizerName: "\(q).input_quantizer"), f8)
        XCTAssertEqual(f.resolve(quantizerName: "model.layers.1.self_attn.k_bmm_quantizer"), f8)
        XCTAssertEqual(f.resolve(quantizerName: "lm_head.weight_quantizer")?.enabled, false)
        XCTAssertEqual(try QuantConfig.preset("NVFP4_DEFAULT_CFG").entries, d.entries)
        XCTAssertThrowsError(try QuantConfig.preset("int4_awq")) { XCTAssertTrue("\($0)".contains("int4_awq")) }
        // A preset plus extra entries from the recipe.
        let r = try QuantConfig(yaml: "preset: nvfp4_default-kv_fp8\nquant_cfg:\n  - {quantizer_name: '*layers.0.*', enable: false}\n")
        XCTAssertEqual(r.resolve(quantizerName: "\(q).weight_quantizer")?.enabled, false)
        XCTAssertEqual(r.resolve(quantizerName: "model.layers.1.mlp.up_proj.weight_quantizer"), nv)
        // quantizers from names, and the summary.
        let qs = p.makeQuantizers(["\(q).weight_quantizer", "lm_head.weight_quantizer", "unmatched"])
        XCTAssertEqual(qs.map(\.enabled), [true, false, false])
        XCTAssertTrue(quantSummary(qs).contains("lm_head.weight_quantizer"))
    }

    func assertError(_ yaml: String, contains parts: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try QuantConfig(yaml: yaml), file: file, line: line) { e in
            let m = "\(e)"
            for p in parts { XCTAssertTrue(m.contains(p), "'\(m)' lacks '\(p)'", file: file, line: line) }
        }
    }

    func testMalformedConfigsNameKeyAndLine() {
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*"
                enable: false
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: e4m3}, bogus_key: 1}
            """, contains: ["bogus_key", "line 5"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg:
                  num_bits: e3m2
            """, contains: ["num_bits", "e3m2", "line 4"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: [5, 2]}
            """, contains: ["num_bits", "[5, 2]", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: 4, block_sizes: {-1: 128, type: static}}
            """, contains: ["num_bits 4", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: e2m1, block_sizes: {-1: 32, type: dynamic, scale_bits: e4m3}}
            """, contains: ["block size 32", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: e2m1, block_sizes: {-1: 16, type: dynamic, scale_bits: [8, 0]}}
            """, contains: ["scale_bits", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: e2m1}
            """, contains: ["block_sizes", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {num_bits: e4m3, axis: 0}
            """, contains: ["axis", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                enabled: false
            """, contains: ["enabled", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
            """, contains: ["must specify", "line 2"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                cfg: {}
            """, contains: ["non-empty", "line 3"])
        assertError(
            """
            quant_cfg:
              - quantizer_name: "*weight_quantizer"
                enable: maybe
            """, contains: ["enable", "line 3"])
        assertError(
            """
            quant_cfg: []
            algorithm: awq_lite
            """, contains: ["algorithm", "awq_lite", "line 2"])
        assertError(
            """
            quant_cfg: []
            calib_size: 512
            """, contains: ["calib_size", "line 2"])
        assertError(
            """
            quant_cfg:
              "*weight_quantizer": {num_bits: [2, 1], block_sizes: {-1: 16, type: dynamic, scale_bits: [4, 3]}, frobnicate: true}
            """, contains: ["frobnicate", "line 2"])
        assertError(
            """
            quant_cfg:
              "*input_quantizer": {}
            """, contains: ["must specify"])
    }

    func testParseFromRecipeSubtreeNode() throws {
        let recipe = try Yams.compose(
            yaml: "model: x\nquantize:\n" + Self.listYAML.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n") + "\n")!
        let sub = recipe.mapping!["quantize"]!
        let c = try QuantConfig(node: sub)
        XCTAssertEqual(c.entries.count, 5)
        XCTAssertEqual(c.entries[0].line, 4)
        XCTAssertEqual(try QuantConfig(node: Node("nvfp4_default")).entries, try QuantConfig.preset("nvfp4_default").entries)
    }
}
