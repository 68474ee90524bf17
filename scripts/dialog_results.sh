#!/usr/bin/env bash
# The issue-7 results (docs/results.md): knowledge-grounded dialog on DSTC11 track 5 (validation
# logs, knowledge-seeking turns), split by dialog into train and held-out test. Zero-shot, then
# RAG-Sequence and JSA trained with their recipes (12 steps of batch 4, K=3) on the train dialogs;
# each evaluated on the first ${DIALOG_LIMIT:-200} test turns with the top-1 knowledge snippet.
# A method whose checkpoint exists is evaluated, not retrained. Output: runs/dstc11/.
set -euo pipefail
cd "$(dirname "$0")/.."
jointrag=.venv/bin/jointrag
data=runs/dstc11/data index=runs/dstc11/index
[ -f $data/corpus.jsonl ] || $jointrag dialog-data --format dstc11 --input ../shared/data/dstc11-track5-val --out $data
[ -f $index/manifest.json ] || $jointrag index --corpus $data/corpus.jsonl --out $index
test=(--data $data/test.jsonl --limit "${DIALOG_LIMIT:-200}" -k 10 --max-new-tokens 40)
$jointrag eval --index $index --template configs/templates/dialog.yaml "${test[@]}" --out runs/dstc11/zero-shot --json
for m in ${@:-rag-sequence jsa}; do
  [ -d "runs/dstc11/$m/checkpoint" ] || $jointrag train --config "configs/$m.yaml" --out "runs/dstc11/$m" --index $index \
    --data $data/train.jsonl --set data.dev=$data/test.jsonl --set model.template=configs/templates/dialog.yaml \
    --set eval.max_new_tokens=40 --set eval.k=10
  $jointrag eval --checkpoint "runs/dstc11/$m/checkpoint" "${test[@]}" --out "runs/dstc11/$m/test" --json
done
