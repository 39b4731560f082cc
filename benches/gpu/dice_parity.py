#!/usr/bin/env python3
"""Per-set protocol Dice of two `minisam eval --out` CSVs (the CPU reference and the CUDA backend,
same model, data and prompts) side by side; exits 1 when the targets differ or any set's mean Dice
differs by more than the tolerance (the CUDA issue's 0.002).

    python3 benches/gpu/dice_parity.py CPU.csv CUDA.csv [TOLERANCE]
"""
import csv
import sys
from collections import defaultdict


def per_set(path):
    rows = list(csv.DictReader(open(path)))
    by_set = defaultdict(list)
    for r in rows:
        by_set[r["set"]].append(float(r["dice"]))
    return {(r["set"], r["image"], r["label"]) for r in rows}, {s: sum(v) / len(v) for s, v in by_set.items()}, {s: len(v) for s, v in by_set.items()}


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    tol = float(sys.argv[3]) if len(sys.argv) == 4 else 0.002
    cpu_targets, cpu, n = per_set(sys.argv[1])
    gpu_targets, gpu, _ = per_set(sys.argv[2])
    ok = cpu_targets == gpu_targets and len(cpu_targets) > 0
    if not ok:
        print(f"FAIL: the two runs scored different targets ({len(cpu_targets)} CPU, {len(gpu_targets)} CUDA)")
    print(f"| set | n | CPU Dice | CUDA Dice | difference (tol {tol}) |")
    print("|---|---|---|---|---|")
    for s in sorted(cpu):
        d = gpu.get(s, float("nan")) - cpu[s]
        good = abs(d) <= tol
        ok = ok and good
        print(f"| {s} | {n[s]} | {cpu[s]:.4f} | {gpu.get(s, float('nan')):.4f} | {d:+.4f}{'' if good else ' FAIL'} |")
    print("Dice parity: " + ("ok" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
