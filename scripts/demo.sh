#!/usr/bin/env bash
# `make demo`: every stage built so far, on the bundled default corpus, in one project directory.
# Stages that are already complete are skipped, so a rerun is quick.
set -euo pipefail
PROJECT_DIR="${1:-runs/demo}"
CONFIG="$(python -c 'import retro_ray.config as c; print(c.shipped_config_dir() / "demo.yaml")')"
start=$(date +%s)
echo "== retro-ray demo: project directory ${PROJECT_DIR}"
# prep → db → embed → index → query; each stage skipped when already complete
retro-ray pipeline --project-dir "${PROJECT_DIR}" --config "${CONFIG}"
retro-ray info --project-dir "${PROJECT_DIR}"
echo "== a retrieval through the index:"
retro-ray search --project-dir "${PROJECT_DIR}" -k 3 "The Battle of Hastings"
echo "== demo finished in $(( $(date +%s) - start )) s; outputs under ${PROJECT_DIR}"
