#!/usr/bin/env bash
# The main job on the embedded default: set up, build the index, answer test questions zero-shot,
# train JSA-RAG, answer the same questions with the trained model, and print both.
# DEMO_LIMIT test questions (default 200 of 672) keep it within 15 minutes on a 2-core CPU;
# DEMO_LIMIT=0 evaluates the whole test split. Output: runs/demo (replaced on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=runs/demo
limit=(); [ "${DEMO_LIMIT:-200}" != 0 ] && limit=(--limit "${DEMO_LIMIT:-200}")
rm -rf "$out"
jointrag=.venv/bin/jointrag
$jointrag eval --split test "${limit[@]}" --out "$out/zero-shot"
$jointrag train --config configs/demo.yaml --out "$out/jsa"
$jointrag eval --checkpoint "$out/jsa/checkpoint" --split test "${limit[@]}" --out "$out/trained"
.venv/bin/python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
before, after = (json.load(open(f"{out}/{name}/metrics.json")) for name in ("zero-shot", "trained"))
print(f"\nJSA-RAG on {before['examples']} embedded test questions (training curves: {out}/jsa/plots)")
print(f"{'metric':<16}{'zero-shot':>10}{'trained':>10}")
for key in ("em", "f1", "gold_recall@1", "gold_recall@5", "mrr@5"):
    print(f"{key:<16}{before[key]:>10.2f}{after[key]:>10.2f}")
PY
