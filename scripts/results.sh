#!/usr/bin/env bash
# The issue-3 results (docs/results.md): train each method with its recipe in configs/ (same budget:
# 12 steps of batch 4, K=3) and evaluate it on the first 300 questions of the embedded test split,
# then the untrained pipeline on the same questions. Methods are given as arguments (default: all
# four); a method whose checkpoint exists is evaluated, not retrained. Output: runs/results/<method>.
set -euo pipefail
cd "$(dirname "$0")/.."
jointrag=.venv/bin/jointrag
limit=(--split test --limit "${RESULTS_LIMIT:-300}")
for m in ${@:-jsa rag-sequence vrag rag-token}; do
  [ -d "runs/results/$m/checkpoint" ] || $jointrag train --config "configs/$m.yaml" --out "runs/results/$m"
  $jointrag eval --checkpoint "runs/results/$m/checkpoint" "${limit[@]}" --out "runs/results/$m/test" --json
done
$jointrag eval "${limit[@]}" --out runs/results/zero-shot --json
