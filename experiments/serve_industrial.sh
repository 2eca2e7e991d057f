#!/usr/bin/env bash
# Serving on Amazon Industrial_and_Scientific: build the top-K cache from the trained stage-3 model
# (semconv pipeline --config configs/industrial/pipeline.yaml) into SQLite and into Redis, serve each, and query a known and an unknown user
# (cached), plus the known user's history on the live path. Prints the cache build's users/s and its profile
# (Lightning's SimpleProfiler: prompt building = the predict loop's batch fetch, generate = predict_step, store
# writes = the writer's batch hook).
#   ART   stage outputs (tiny_llama, codebook)               default artifacts/industrial
#   MODEL the stage-3 export (LLMExporter)                   default $ART/llm
#   CKPT  the stage-3 checkpoint the export was written from
#         default runs/industrial/llm/csv/version_0/checkpoints/last.ckpt
#   OUT   where the SQLite store, logs and profiles go         default runs/industrial/serving
#   STORES  sqlite,redis (default) or one of them
#   LIMIT   cache only the dataset's first LIMIT users (default: every user)
#   LIVE_ARGS  extra `semconv serve` flags; an export without a decoding record needs
#              LIVE_ARGS='--num-beams 20 --code-softmax trie' (configs/industrial/llm.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
ART=${ART:-artifacts/industrial}
CKPT=${CKPT:-runs/industrial/pipeline/llm/csv/version_0/checkpoints/last.ckpt}
OUT=${OUT:-runs/industrial/serving}
MODEL=${MODEL:-$ART/llm}
STORES=${STORES:-sqlite,redis}
INTER=../shared/data/Industrial_and_Scientific/Industrial_and_Scientific.inter.json
mkdir -p "$OUT"
selection=()
if [[ -n ${LIMIT:-} ]]; then
  python -c "import json; print('\n'.join(list(json.load(open('$INTER')))[:$LIMIT]))" > "$OUT/users.txt"
  selection=(--data.init_args.predict_users "$OUT/users.txt")
fi
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

build() {  # build <store url> <name>: lightning predict with the cache piece, timed and profiled
  local begin=$SECONDS
  lightning predict --config configs/industrial/llm.yaml --config configs/serving/cache.yaml \
    --model.init_args.model_path "$ART/tiny_llama" --data.init_args.index "$ART/codebook" \
    --data.init_args.num_workers 0 --trainer.default_root_dir "$OUT/$2" --trainer.profiler simple "${selection[@]}" \
    --trainer.callbacks.init_args.store "$1" --trainer.callbacks.init_args.model_dir "$MODEL" \
    --ckpt_path "$CKPT" > "$OUT/$2.log" 2>&1
  local users seconds=$((SECONDS - begin))
  users=$(python -c "from datamodules.recommendation_store import open_store as o
print(o('$1').current_version().num_users)")
  echo "[$2] cache build: $users users in $seconds s" \
       "($((users / (seconds > 0 ? seconds : 1))) users/s, model load included)"
  grep -E "dataloader_next|predict_step|RecommendationCacheWriter|Total" "$OUT/$2.log" | head -8 || true
}

query() {  # query <store url> <name>: serve it (with the live path) and ask for a known and an unknown user
  local port user history
  port=$(free_port)
  # shellcheck disable=SC2086  # LIVE_ARGS is a list of flags
  semconv serve --store "$1" --port "$port" --model "$MODEL" ${LIVE_ARGS:-} 2>> "$OUT/$2.serve.log" &
  pids+=($!)
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break; sleep 0.2; done
  # the first user of the dataset and their whole history (item ids are the LC-Rec item indices here)
  user=$(python -c "import json; print(next(iter(json.load(open('$INTER')))))")
  history=$(python -c "import json
print(json.dumps({'history': list(map(str, json.load(open('$INTER'))['$user'])), 'k': 5}))")
  echo "[$2] GET known user $user:";   curl -s "http://127.0.0.1:$port/v1/users/$user/recommendations?k=5"; echo
  echo "[$2] GET unknown user:";       curl -s "http://127.0.0.1:$port/v1/users/no-such-user/recommendations?k=5"; echo
  echo "[$2] POST the known user's history (live):"
  curl -s -X POST -H 'Content-Type: application/json' -d "$history" "http://127.0.0.1:$port/v1/recommendations"; echo
  kill "${pids[-1]}"
}

if [[ $STORES == *sqlite* ]]; then
  url="sqlite:///$PWD/$OUT/recommendations.sqlite"
  build "$url" sqlite
  query "$url" sqlite
fi
if [[ $STORES == *redis* ]]; then
  port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no > /dev/null &
  pids+=($!)
  sleep 1
  url="redis://127.0.0.1:$port/0"
  build "$url" redis
  query "$url" redis
fi
