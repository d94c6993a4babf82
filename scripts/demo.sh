#!/usr/bin/env bash
# `make demo`: the whole system on the bundled default corpus, sized for a 2-core laptop:
# data pipeline → RETRO + GPT baseline training → export → evaluation (with the knowledge update)
# → the Serve app answering a sample request, left running until Ctrl-C (DEMO_ARGS=--stop ends it).
# Finished steps are skipped on a rerun. `retro-ray demo --help` says more.
set -euo pipefail
PROJECT_DIR="${1:-runs/demo}"
shift || true
exec retro-ray demo --project-dir "${PROJECT_DIR}" "$@"
