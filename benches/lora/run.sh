#!/usr/bin/env bash
# LoRA experiments on a protocol data tree (shared/data): per set and per modality, train an
# adapter on the train side of the split (`--split train`, at most 100 images per set) and score
# zero-shot and adapted models on the held-out test side, box and box-jitter prompts.
# Prints a markdown table (benches/RESULTS.md keeps it with date, machine and commit).
#
#   bash benches/lora/run.sh [DATA] [OUT]      (defaults: ../shared/data, target/lora-experiments)
#
# Environment: MODEL (packed base, default the bundled models/litemedsam-nf4.msam), EPOCHS (12),
# TARGET (LoRA targets, default 'mask_decoder.*'), RANK (8), THREADS (all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data}
OUT=${2:-target/lora-experiments}
MODEL=${MODEL:-models/litemedsam-nf4.msam}
EPOCHS=${EPOCHS:-12}
TARGET=${TARGET:-mask_decoder.*}
RANK=${RANK:-8}
THREADS=${THREADS:-$(nproc)}
CACHE="$OUT/embeddings"
BIN=target/release/minisam
if [ ! -d "$DATA" ]; then
    echo "SKIP: no data tree at $DATA (pass one: bash benches/lora/run.sh DATA)"
    exit 0
fi
cargo build --release -q -p minisam
mkdir -p "$OUT"

# name | sets (space separated) | modality
EXPERIMENTS=(
    "us-hc18|us-hc18|US"
    "us-busbra|us-busbra|US"
    "ct-kits19|ct-kits19|CT"
    "ct-pancreas|ct-pancreas|CT"
    "mr-heart|mr-heart|MR"
    "US|us-hc18 us-busbra|US"
    "CT|ct-kits19 ct-pancreas|CT"
)
if [ -n "${ONLY:-}" ]; then
    mapfile -t EXPERIMENTS < <(printf '%s\n' "${EXPERIMENTS[@]}" | grep -E "^($ONLY)\|")
fi

evaluate() { # tag adapter-or-empty prompt
    local csv="$OUT/eval-$1-$3.csv"
    [ -s "$csv" ] && return
    local adapter=()
    [ -n "$2" ] && adapter=(--adapter "$2")
    "$BIN" eval --model "$MODEL" --data "$DATA" --split test --prompt "$3" --threads "$THREADS" \
        --embedding-cache "$CACHE" "${adapter[@]}" --out "$csv" > "$OUT/eval-$1-$3.log" 2>&1
}

for p in box box-jitter; do evaluate zero-shot "" "$p"; done
for e in "${EXPERIMENTS[@]}"; do
    IFS='|' read -r name sets modality <<<"$e"
    set_args=()
    for s in $sets; do set_args+=(--set "$s"); done
    if [ ! -s "$OUT/$name.lora" ]; then
        /usr/bin/time -v "$BIN" train --model "$MODEL" --data "$DATA" "${set_args[@]}" --split train \
            --target "$TARGET" --rank "$RANK" --epochs "$EPOCHS" --threads "$THREADS" \
            --embedding-cache "$CACHE" --name "$name-r$RANK" --modality "$modality" \
            -o "$OUT/$name.lora" > "$OUT/train-$name.out" 2> "$OUT/train-$name.log"
    fi
    for p in box box-jitter; do evaluate "$name" "$OUT/$name.lora" "$p"; done
done

python3 - "$OUT" "${EXPERIMENTS[@]}" <<'PY'
import csv, re, sys
from collections import defaultdict
out, experiments = sys.argv[1], [e.split("|") for e in sys.argv[2:]]

def means(tag, prompt):
    per_set = defaultdict(list)
    for row in csv.DictReader(open(f"{out}/eval-{tag}-{prompt}.csv")):
        per_set[row["set"]].append(float(row["dice"]))
    return {s: (sum(v) / len(v), len(v)) for s, v in per_set.items()}

zs = {p: means("zero-shot", p) for p in ("box", "box-jitter")}
print("| adapter | trained on (train split) | test set | n | zero-shot box | adapter box | zero-shot box-jitter | adapter box-jitter | trainable params | train wall | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, sets, _ in experiments:
    ad = {p: means(name, p) for p in ("box", "box-jitter")}
    log = open(f"{out}/train-{name}.log").read()
    wrote = open(f"{out}/train-{name}.out").read()
    params = re.search(r"(\d+) trainable parameters", wrote).group(1)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", log).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1)) / 1024
    for s in sets.split():
        (zb, n), (ab, _) = zs["box"][s], ad["box"][s]
        zj, aj = zs["box-jitter"][s][0], ad["box-jitter"][s][0]
        print(f"| {name} | {sets} | {s} | {n} | {zb:.4f} | {ab:.4f} ({ab - zb:+.4f}) | {zj:.4f} | {aj:.4f} ({aj - zj:+.4f}) | {params} | {wall} | {rss:.0f} MiB |")
PY
