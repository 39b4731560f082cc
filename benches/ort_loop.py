#!/usr/bin/env python3
"""ONNX Runtime's encode and decode of one model in a loop, for interleaving with our
`encode_loop` example on a loaded machine (benches/interleaved.sh): the ONNX files that
peer_python.py exported into --onnx-dir, the same frame geometry, box and thread settings as
its `ort_row`.

    python3 benches/ort_loop.py --model lite --encodes 4 --decodes 12 --threads 2

Prints `ort encode median X ms over N, decode median Y ms over M`.
"""
import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
FRAME_H, FRAME_W = 540, 800
BOX = [300.0, 200.0, 500.0, 400.0]
SIZES = {"lite": 256, "mobile": 1024}

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=sorted(SIZES), default="lite")
parser.add_argument("--encodes", type=int, default=4)
parser.add_argument("--decodes", type=int, default=12)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--onnx-dir", default=os.path.join(HERE, "..", "target", "onnx-bench"))
args = parser.parse_args()

size = SIZES[args.model]
folder = os.path.join(args.onnx_dir, args.model)
opts = ort.SessionOptions()
opts.intra_op_num_threads = args.threads
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
enc = ort.InferenceSession(os.path.join(folder, "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
dec = ort.InferenceSession(os.path.join(folder, "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
image = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
emb = enc.run(None, {"image": image})[0]  # warm-up
enc_ms = []
for _ in range(args.encodes):
    t = time.perf_counter()
    emb = enc.run(None, {"image": image})[0]
    enc_ms.append((time.perf_counter() - t) * 1e3)
scale = size / max(FRAME_H, FRAME_W)
x0, y0, x1, y1 = (v * scale for v in BOX)
feeds = {
    "image_embeddings": emb,
    "point_coords": np.array([[[x0, y0], [x1, y1]]], dtype=np.float32),
    "point_labels": np.array([[2.0, 3.0]], dtype=np.float32),
    "mask_input": np.zeros((1, 1, emb.shape[2] * 4, emb.shape[3] * 4), dtype=np.float32),
    "has_mask_input": np.zeros(1, dtype=np.float32),
    "orig_im_size": np.array([FRAME_H, FRAME_W], dtype=np.float32),
}
dec.run(None, feeds)  # warm-up
dec_ms = []
for _ in range(args.decodes):
    t = time.perf_counter()
    dec.run(None, feeds)
    dec_ms.append((time.perf_counter() - t) * 1e3)
print(f"ort encode median {statistics.median(enc_ms):.1f} ms over {args.encodes}, decode median {statistics.median(dec_ms):.1f} ms over {args.decodes}")
