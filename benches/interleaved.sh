#!/usr/bin/env bash
# Our engine and ONNX Runtime alternated, ROUNDS times, on one model: on a machine shared with
# other work, a peer measured minutes later (as cpu_latency's peers are) can see a different
# load; alternating short runs exposes both sides to the same one. Needs the ONNX exports of
# peer_python.py (run cpu_latency with peers once) and a release build of the example:
#   cargo build --release -p minisam-models --example encode_loop
#   benches/interleaved.sh lite models/litemedsam-nf4.msam 5
#   benches/interleaved.sh mobile /path/to/mobilesam.msam 5
# Each line: ours (packed file), then ORT, 4 encodes and 12 decodes each, 2 threads.
set -euo pipefail
model=$1 file=$2 rounds=${3:-5}
root=$(cd "$(dirname "$0")/.." && pwd)
for i in $(seq "$rounds"); do
    ours=$("$root/target/release/examples/encode_loop" "$file" 4 2 12)
    ort=$(python3 "$root/benches/ort_loop.py" --model "$model" --encodes 4 --decodes 12 --threads 2 2>/dev/null)
    echo "round $i | ours: $ours | $ort | load $(cut -d' ' -f1 /proc/loadavg)"
done
