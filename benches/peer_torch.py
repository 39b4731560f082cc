#!/usr/bin/env python3
"""PyTorch peer for benches/cpu_latency.rs: the official `segment_anything` SAM ViT-B at 1024 on the
CPU, random weights (latency does not depend on their values), same thread count, median of runs.

Needs `pip install torch segment-anything`; exits non-zero with a one-line reason otherwise, which
the Rust bench prints as "peer missing". TinyViT peers (LiteMedSAM, MobileSAM) need their authors'
model code, which is not packaged on PyPI; their reference timings are in shared/reference/SUMMARY.md.
"""
import argparse
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--runs", type=int, default=5)
parser.add_argument("--bf16", action="store_true",
                    help="also time bf16 (minutes per frame on CPUs without native bf16; meant for GPUs)")
parser.add_argument("--device", default="cpu",
                    help="cpu or cuda (benches/gpu/run.sh); on cuda each timing waits for the GPU")
args = parser.parse_args()

try:
    import torch
    from segment_anything import sam_model_registry
except ImportError as e:
    sys.exit(f"torch/segment-anything not installed: {e}")

torch.set_num_threads(args.threads)
torch.manual_seed(0)
if args.device == "cuda" and not torch.cuda.is_available():
    sys.exit("--device cuda: torch sees no GPU")
device = torch.device(args.device)
sam = sam_model_registry["vit_b"](checkpoint=None).eval().to(device)
image = torch.randn(1, 3, 1024, 1024, device=device)
box = torch.tensor([[[300.0, 200.0, 500.0, 400.0]]], device=device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return sorted(xs)[len(xs) // 2]


with torch.inference_mode():
    dtypes = [("f32", torch.float32)] + ([("bf16", torch.bfloat16)] if args.bf16 else [])
    for dtype_name, dtype in dtypes:
        model = sam.to(dtype)
        x = image.to(dtype)
        emb = model.image_encoder(x)  # warm-up
        sync()
        enc = []
        for _ in range(args.runs if device.type == "cuda" else min(args.runs, 3)):
            t = time.perf_counter()
            emb = model.image_encoder(x)
            sync()
            enc.append((time.perf_counter() - t) * 1e3)
        dec = []
        for _ in range(args.runs * 4):
            t = time.perf_counter()
            sparse, dense = model.prompt_encoder(points=None, boxes=box.to(dtype), masks=None)
            model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                               multimask_output=False)
            sync()
            dec.append((time.perf_counter() - t) * 1e3)
        peak = f" | {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
        print(f"| SAM ViT-B@1024 (random) | torch {torch.__version__} {dtype_name} {args.device} | {median(enc):.1f} | {median(dec):.1f}{peak} |")
