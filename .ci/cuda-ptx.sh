#!/usr/bin/env bash
# CUDA kernels without a GPU: installs NVRTC 12.6 from PyPI and compiles EVERY kernels/*.cu to PTX
# for sm_87 (Jetson Orin) and sm_90 (H100/H200), bf16 and fp16 GEMM variants, through the same
# Rust code the CUDA backend runs at start-up (`minisam cuda-compile`, models/src/cuda/compile.rs).
# Any NVRTC error fails the script. The register/spill table comes from NVRTC's embedded ptxas
# (-Xptxas -v on a real-architecture compile); no standalone ptxas is used or needed.
# Leaves the kernel cache (CUBIN for sm_87/sm_90 and PTX, named by NVRTC version) in
# target/ptx-cache: benches/gpu/run.sh reuses it on the GPU machine, a device image can ship it.
set -euo pipefail
cd "$(dirname "$0")/.."

NV="${MINISAM_NVRTC_DIR:-$PWD/target/cuda-nvrtc-12.6.85}"
if [ ! -f "$NV/.installed" ]; then
    echo "== installing NVRTC 12.6.85 + CUDA 12.6 runtime headers into $NV"
    python3 -m pip install --quiet --disable-pip-version-check --target "$NV" \
        'nvidia-cuda-nvrtc-cu12==12.6.85' 'nvidia-cuda-runtime-cu12==12.6.*'
    touch "$NV/.installed"
fi
export LD_LIBRARY_PATH="$NV/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MINISAM_CUDA_INCLUDE="$NV/nvidia/cuda_runtime/include"
export MINISAM_PTX_CACHE="${MINISAM_PTX_CACHE:-$PWD/target/ptx-cache}"

echo "== minisam cuda-compile (bf16 tensor cores, with the ptxas resource report; no new local memory)"
# Every kernel must be free of stack frames and spills, except today's known ones: the d96/d128
# f32 attention kernels spill (the tensor-core attention_tc_d16..d80 must stay clean: they are
# not listed). The GEMMs left the list with issue 12 (their 320 B stack frame came from a
# non-inlined epilogue taking the parameter record's address). The check fails when a listed
# kernel becomes clean, so the list shrinks.
KNOWN=()
for k in attention_d96 attention_d128; do
    KNOWN+=(--known-local-memory "$k")
done
cargo run --quiet -p minisam -- cuda-compile --arch sm_87 --arch sm_90 --deny-local-memory "${KNOWN[@]}"
echo "== minisam cuda-compile (fp16 tensor cores)"
cargo run --quiet -p minisam -- cuda-compile --arch sm_87 --arch sm_90 --precision f16 --no-report
echo "== CUDA unit tests with NVRTC present (the GPU-only ones skip loudly)"
cargo test --quiet -p minisam-models cuda 2>&1
