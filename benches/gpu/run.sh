#!/usr/bin/env bash
# ONE script for a lent GPU machine (H200; /work/.library/device/README.md): every CUDA check
# and the GPU benchmarks, with binaries built beforehand on the development machine (the device
# has nvcc and PyTorch but no Rust). Results go to $OUT: run.log (everything), summary.md, gpu.txt,
# bench.md (latency table, then each model's per-kernel profile), peer.md (five files: the device
# returns at most eight).
#
# On the development machine, first (the device tool carries at most 64 MiB with the tree: build
# without debug info, and copy MobileSAM in only if it still fits):
#     CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release -p minisam && strip target/release/minisam
#     bash .ci/cuda-ptx.sh                  # fills target/ptx-cache with sm_87/sm_90 CUBIN + PTX (NVRTC 12.6)
#     mkdir -p shared && cp -r ../shared/data shared/     # 25 MiB: Dice parity and GPU training steps
#     mkdir -p target/gpu-ref && ./target/release/minisam eval --model models/litemedsam-nf4.msam --data ../shared/data \
#         --backend cpu --out target/gpu-ref/eval-cpu.csv  # the CPU side of the parity, made here
#     mkdir -p shared/weights && cp ../shared/weights/mobile_sam.pt shared/weights/   # optional, 39 MiB
#                                          # (MobileSAM and the data do not both fit the 64 MiB carry)
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux2014_x86_64 -d .whl segment-anything==1.0
# then one device call:
#     run(command="bash benches/gpu/run.sh", timeout_s=540,
#         carry=["target/release/minisam", "target/ptx-cache", ".whl", "target/gpu-ref"])
# (shared/ inside the checkout travels by itself; ../shared does not, see the device README.)
#
# Budget: about 6 minutes on an H200 (kernel checks in 3 precisions, end-to-end parity on
# LiteMedSAM, MobileSAM and a random ViT-B with their CPU references on 16 cores, graph replay,
# benchmarks with a per-kernel profile of one frame per model, PyTorch peer), plus about 1 minute for the Dice parity and GPU training steps with the
# CPU reference CSV carried (3 without it). Each step has its own timeout so one hang cannot eat
# the lease.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/target/gpu-out}"
mkdir -p "$OUT"
BIN="${MINISAM_BIN:-$PWD/target/release/minisam}"
STATUS=0
summary() { echo "$*" | tee -a "$OUT/summary.md"; }
step() { # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name: $*" | tee -a "$OUT/run.log"
    timeout "$limit" "$@" 2>&1 | tee "/tmp/step-$name.log" | tee -a "$OUT/run.log"
    local rc=${PIPESTATUS[0]}
    summary "| $name | $([ "$rc" = 0 ] && echo ok || echo "FAILED (rc $rc)") |"
    [ "$rc" = 0 ] || STATUS=1
}

summary "# GPU run $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
summary ""
summary "| step | result |"
summary "|---|---|"

if [ ! -x "$BIN" ]; then
    summary "| binaries | MISSING: $BIN (carry target/release/minisam) |"
    exit 1
fi

# PTX: the carried cache (built by .ci/cuda-ptx.sh) makes NVRTC unnecessary; copied to /tmp so a
# read-only checkout still works, and NVRTC from the CUDA install is on the path for a cache miss.
export MINISAM_PTX_CACHE=/tmp/minisam-ptx
mkdir -p "$MINISAM_PTX_CACHE"
[ -d target/ptx-cache ] && cp -r target/ptx-cache/. "$MINISAM_PTX_CACHE"/
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done

MODELS=(--model models/litemedsam-nf4.msam)
MOBILE=""
for w in shared/weights/mobile_sam.pt ../shared/weights/mobile_sam.pt; do
    if [ -f "$w" ]; then MOBILE=$w; break; fi
done
if [ -n "$MOBILE" ]; then
    step pack-mobilesam 120 "$BIN" pack "$MOBILE" -o /tmp/mobilesam-nf4.msam
    [ -f /tmp/mobilesam-nf4.msam ] && MODELS+=(--model /tmp/mobilesam-nf4.msam)
else
    summary "| mobilesam | SKIPPED: no shared/weights/mobile_sam.pt in the checkout |"
fi

# Kernel parity in each precision (poisoned outputs, fresh random inputs), then end to end.
step check-kernels-bf16 120 "$BIN" cuda-check --require-gpu --precision bf16
step check-kernels-f16 120 "$BIN" cuda-check --require-gpu --precision f16
step check-kernels-f32 120 "$BIN" cuda-check --require-gpu --precision f32
step check-e2e-bf16 300 "$BIN" cuda-check --require-gpu --skip-kernels --precision bf16 "${MODELS[@]}" --random-vit-b

# Protocol Dice on the data (when carried as shared/data, 25 MiB): the CUDA backend against the
# CPU reference, every set within 0.002. The CPU side is target/gpu-ref/eval-cpu.csv when made
# beforehand on the development machine (saves the device ~2 minutes), else computed here.
if [ -d shared/data ]; then
    CPU_CSV=target/gpu-ref/eval-cpu.csv
    if [ ! -s "$CPU_CSV" ]; then
        CPU_CSV=/tmp/eval-cpu.csv
        step eval-cpu 240 "$BIN" eval --model models/litemedsam-nf4.msam --data shared/data --backend cpu --out "$CPU_CSV"
    fi
    step eval-cuda 120 "$BIN" eval --model models/litemedsam-nf4.msam --data shared/data --backend cuda --out /tmp/eval-cuda.csv
    step dice-parity 10 python3 benches/gpu/dice_parity.py "$CPU_CSV" /tmp/eval-cuda.csv 0.002
    # A decoder adapter trained against the frozen encoder on the GPU (a few steps: the path works).
    step train-frozen-cuda 120 "$BIN" train --model models/litemedsam-nf4.msam --data shared/data --set us-hc18 \
        --split train --target 'mask_decoder.*' --max-steps 6 --backend cuda --name gpu-check --modality US -o /tmp/gpu.lora
else
    summary "| dice-parity | SKIPPED: no shared/data in the checkout (cp -r ../shared/data shared/) |"
fi

# Latency and peak VRAM (LiteMedSAM@256, MobileSAM@1024, random ViT-B@1024, NF4 weights), with
# each encoder's counted GFLOP and its share of the tensor peak (H100/H200 SXM: 989 TFLOP/s bf16
# dense, datasheet), and LiteMedSAM's roofline floor at the H200's peaks (4800 GB/s HBM3e). After
# the timed runs, --kernels profiles one more frame per model, kernel by kernel (eager, no graph):
# every kernel's time, counted GFLOP and MB, TFLOP/s and GB/s beside the peaks (H100 SXM: 3350 GB/s
# HBM3). It fails the step, not the latency rows, when a profile fails.
PEAK=()
grep -qE 'H100|H200' "$OUT/gpu.txt" && PEAK=(--peak-tflops 989 --peak-gbs 3350)
grep -q 'H200' "$OUT/gpu.txt" && PEAK=(--peak-tflops 989 --peak-gbs 4800)
step cost 60 "$BIN" inspect models/litemedsam-nf4.msam --cost --peak-tflops 989 --peak-gbs 4800
step bench 300 "$BIN" cuda-bench "${MODELS[@]}" --random-vit-b --runs 20 --warmup 3 --kernels "${PEAK[@]}"
# bench.md: the latency table, then each per-kernel table under its "### kernels" heading.
{
    sed '/^### kernels/,$d' /tmp/step-bench.log | grep '^|'
    sed -n '/^### kernels/,$p' /tmp/step-bench.log | grep -E '^(###|\||profile failed)' | awk '/^###/ { print ""; print; print ""; next } { print }'
} > "$OUT/bench.md" 2>/dev/null

# PyTorch bf16 peer (official segment_anything ViT-B, random weights) in the same run.
if ! python3 -c 'import segment_anything' 2>/dev/null && ls .whl/segment_anything-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/segment_anything-*.whl && export PYTHONPATH=/tmp/site
fi
step peer-torch 240 python3 benches/peer_torch.py --device cuda --bf16 --runs 20
grep '^|' /tmp/step-peer-torch.log > "$OUT/peer.md" 2>/dev/null

summary ""
summary "## ours (encode / decode / end-to-end ms, median; peak VRAM; per-kernel profile of one frame)"
cat "$OUT/bench.md" 2>/dev/null | tee -a "$OUT/summary.md"
summary ""
summary "## PyTorch peer (ViT-B@1024, encode / decode ms, median)"
cat "$OUT/peer.md" 2>/dev/null | tee -a "$OUT/summary.md"
exit $STATUS
