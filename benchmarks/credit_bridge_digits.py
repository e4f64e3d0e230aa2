"""Credit-bridge variants on the embedded digits data (CPU, minutes): the ablation behind
`cont_weight` and `gate_err`.

    python benchmarks/credit_bridge_digits.py                 # all variants below, in sequence
    python benchmarks/credit_bridge_digits.py --variant cont1_warm50 --epochs 200

Each variant is one cifar10 run (digits, d 64, 4 blocks, `--epochs`) of the credit bridge,
with dfa as the reference; prints final test accuracy, train loss and the per-layer cosine
of the credit actually used against the true gradient at the last diagnostic.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cbcore.cifar import run_cifar
from cbcore.params import load_params

BASE = {"dataset": "digits", "d_hidden": 64, "num_blocks": 4, "batch_size": 128, "device": "cpu"}
VARIANTS = {
    "dfa": {"methods": ["dfa"]},
    "seed": {"methods": ["credit_bridge"]},  # the seed's estimator, warmup 20%
    "cont1": {"methods": ["credit_bridge"], "cont_weight": 1.0},
    "cont1_warm50": {"methods": ["credit_bridge"], "cont_weight": 1.0, "warmup_frac": 0.5},
    "cont1_gate1": {"methods": ["credit_bridge"], "cont_weight": 1.0, "gate_err": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variant", action="append", choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"digits, d 64, 4 blocks, batch 128, {args.epochs} epochs "
        f"({args.epochs * 11} steps), seed 42, CPU threads {args.threads}"
    )
    print(
        f"{'variant':<14}{'test acc':>9}{'train loss':>11}  cos per layer (last diagnostic)   min"
    )
    for name in args.variant or list(VARIANTS):
        over = {
            **BASE,
            **VARIANTS[name],
            "epochs": args.epochs,
            "diag_every": max(1, args.epochs // 8),
        }
        P = load_params("cifar10", None, over)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            res = run_cifar(P, d, progress=False, verbose=False)
        rows = [r for r in res.rows if "cos/layer_00" in r]
        cos = [rows[-1][f"cos/layer_{l:02d}"] for l in range(P.num_blocks)]
        fin = next(iter(res.methods.values()))["final"]
        print(
            f"{name:<14}{fin['test/acc']:>9.3f}{fin['train/loss']:>11.3f}  "
            f"{' '.join(f'{c:+.2f}' for c in cos)}   {(time.perf_counter() - t) / 60:.1f}"
        )


if __name__ == "__main__":
    main()
