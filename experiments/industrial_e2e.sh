#!/usr/bin/env bash
# CPU end-to-end run on real data (Amazon Industrial_and_Scientific, titles + descriptions):
#   stage 1 DCCF embeddings -> stage 2 codes (LLM alignment on) -> stage 3 SFT of a tiny Llama (all tasks,
#   negatives 1:3) with the final constrained beam-search evaluation, next to SASRec and most-popular.
# Prints one table of test metrics. About 25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

python experiments/make_tiny_llama.py --out artifacts/industrial/tiny_llama
lightning fit  --config configs/industrial/dccf.yaml --test_after_fit false
lightning fit  --config configs/industrial/codebook.yaml
lightning fit  --config configs/industrial/llm.yaml
lightning fit  --config configs/industrial/sasrec.yaml
lightning test --config configs/industrial/most_popular.yaml

python - <<'PY'
import json
from pathlib import Path

def latest(run):
    files = sorted(Path("runs/industrial", run).glob("csv/version_*/test_metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text())["metrics"] if files else None

rows = {"generative (ours, tiny Llama)": latest("llm"), "SASRec": latest("sasrec"), "most popular": latest("most_popular")}
keys = ["hr@1", "hr@5", "hr@10", "ndcg@5", "ndcg@10"]
print(f"{'model':32s}" + "".join(f"{k.upper():>9s}" for k in keys))
for name, metrics in rows.items():
    print(f"{name:32s}" + "".join(f"{metrics[k]:9.4f}" if metrics else f"{'-':>9s}" for k in keys))
PY
echo "total wall time: $(( (SECONDS - start) / 60 )) min"
