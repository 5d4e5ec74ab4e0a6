#!/usr/bin/env bash
# Formats the Swift sources in place with the toolchain's `swift format` and the repository's
# .swift-format (4-space indentation, 140 columns; the rule choices are explained in
# ARCHITECTURE.md, "Formatting"). scripts/lint.sh checks the same paths on CI.
set -euo pipefail
cd "$(dirname "$0")/.."
swift format format --in-place --parallel --recursive Sources Tests Package.swift
