"""Phase A alignment benchmark: the seed's frozen toy run (params/toy_lq.yaml) per seed, and
the value-net ablations behind that file's credit-bridge settings.

    python benchmarks/toy_lq_alignment.py                       # seeds 42 123 456, 8000 steps
    python benchmarks/toy_lq_alignment.py --seeds 42 --steps 2000
    python benchmarks/toy_lq_alignment.py --ablations           # -> benchmarks/toy_lq_ablations.json

Prints, per layer, the mean over seeds of the final cosine (and rho) against the exact costate
∂ℓ/∂h_l for credit_bridge (its credit ∇V_φ), state_bridge, dfa and the broadcast baseline
g_l = g_L, and the CPU minutes (process time, all threads) and wall minutes per seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from cbcore.params import load_params, to_dict
from cbcore.records import layer_key
from cbcore.toy_lq import ABLATIONS_PATH, run_toy

METHODS = ["dfa", "state_bridge", "credit_bridge"]
COLUMNS = [
    ("broadcast", "baseline"),
    ("dfa", "dfa"),
    ("state_bridge", "state_bridge"),
    ("credit_bridge", "credit_bridge"),
]

# Each ablation: (name, what changes, overrides on top of params/toy_lq.yaml; a `num_steps` there
# replaces --steps). The first rows go back to the seed's estimator; the rest vary one thing at a
# time from the yaml's settings.
SEED_ESTIMATOR = {"cont_weight": 0.0, "value_mlp": True}
ABLATIONS = [
    ("seed", "seed estimator: MLP+quadratic value net, no local-difference match", SEED_ESTIMATOR),
    (
        "seed_mlp",
        "seed estimator, plain MLP value net (no quadratic term)",
        {**SEED_ESTIMATOR, "value_quadratic": False},
    ),
    (
        "cont_mlp_quad",
        "seed + cont_weight 1 (MLP+quadratic value net)",
        {"cont_weight": 1.0, "value_mlp": True},
    ),
    (
        "cont_mlp",
        "seed + cont_weight 1, plain MLP value net",
        {"cont_weight": 1.0, "value_mlp": True, "value_quadratic": False},
    ),
    ("yaml", "params/toy_lq.yaml: cont_weight 1, quadratic value net (value_mlp false)", {}),
    (
        "yaml_nocont",
        "yaml without the local-difference match (cont_weight 0)",
        {"cont_weight": 0.0},
    ),
    ("yaml_anchors4", "yaml + num_anchors 4", {"num_anchors": 4}),
    (
        "yaml_batch32",
        "yaml + fb_batch_frac 0.125 (32 examples per value-net step)",
        {"fb_batch_frac": 0.125},
    ),
    (
        "yaml_batch256",
        "yaml + fb_batch_frac 1.0 (256 examples per value-net step)",
        {"fb_batch_frac": 1.0},
    ),
    ("seed_8000", "seed estimator for the full 8000 steps", {**SEED_ESTIMATOR, "num_steps": 8000}),
    ("yaml_8000", "params/toy_lq.yaml for the full 8000 steps", {"num_steps": 8000}),
]


def run_seed(seed: int, overrides: dict, progress: bool) -> tuple[dict, float, float]:
    """The frozen toy for one seed: (summary, CPU minutes, wall minutes)."""
    P = load_params("toy_lq", None, {**overrides, "seed": seed})
    wall, cpu = time.perf_counter(), time.process_time()
    res = run_toy(P, progress=progress)
    return res.summary, (time.process_time() - cpu) / 60, (time.perf_counter() - wall) / 60


def final(summary: dict, column: str, prefix: str, l: int) -> float:
    if column == "broadcast":
        return summary["baseline"][layer_key(prefix, l)]
    m = summary["methods"][column]
    if m["status"] != "completed":
        return float("nan")
    key = layer_key(f"bridge_{prefix}" if column == "credit_bridge" else prefix, l)
    return m["final"][key]


def alignment(args: argparse.Namespace) -> None:
    overrides = {"methods": METHODS, "num_steps": args.steps, "num_threads": args.threads}
    P = load_params("toy_lq", None, overrides)
    print(
        f"toy_lq frozen: d {P.d_hidden}, L {P.num_layers}, {P.num_steps} steps, batch "
        f"{P.batch_size}, sigma {P.sigma_bridge}, lam {P.lam}, K {P.K}, cont_weight "
        f"{P.cont_weight}, value_mlp {P.value_mlp}, fb_hidden {P.fb_hidden}, fb_batch_frac "
        f"{P.fb_batch_frac}; torch threads {P.num_threads or torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}"
    )
    summaries = []
    for seed in args.seeds:
        summary, cpu, wall = run_seed(seed, overrides, args.progress)
        summaries.append(summary)
        status = {k: m["status"] for k, m in summary["methods"].items()}
        print(f"seed {seed}: {cpu:.1f} CPU min, {wall:.1f} wall min; {status}", flush=True)
    n = len(summaries)
    print(
        f"\nfinal cosine (rho) against the exact costate, mean over n={n} seeds "
        f"{args.seeds} (credit_bridge: its credit ∇V_φ)"
    )
    print(f"{'layer':>5}" + "".join(f"{c:>22}" for c, _ in COLUMNS))
    for l in range(P.num_layers):
        cells = []
        for column, _ in COLUMNS:
            cos = statistics.fmean(final(s, column, "cos", l) for s in summaries)
            rho = statistics.fmean(final(s, column, "rho", l) for s in summaries)
            cells.append(f"{cos:+.3f} ({rho:.2f})")
        print(f"{l:>5}" + "".join(f"{c:>22}" for c in cells))
    means = [
        statistics.fmean(final(s, "credit_bridge", "cos", l) for s in summaries)
        for l in range(P.num_layers)
    ]
    print(
        f"credit_bridge: min over layers of the seed-mean cosine {min(means):.3f} "
        f"(target >= 0.9 at every layer)"
    )


def ablations(args: argparse.Namespace) -> None:
    """Credit bridge only, seed 42, `--steps` steps; writes the table the notebook shows."""
    rows = []
    names = args.variant or [a[0] for a in ABLATIONS]
    for name, change, over in ABLATIONS:
        if name not in names:
            continue
        steps = over.get("num_steps", args.steps)
        overrides = {
            "methods": ["credit_bridge"],
            "num_steps": steps,
            "num_threads": args.threads,
            **over,
        }
        summary, cpu, wall = run_seed(args.seeds[0], overrides, args.progress)
        m = summary["methods"]["credit_bridge"]
        f = m["final"]
        L = sum(1 for k in f if k.startswith("bridge_cos/layer_"))
        results = {"status": m["status"], "steps": steps}
        for l in sorted({0, L // 2, L - 1}):
            results[f"cos l{l}"] = f[layer_key("bridge_cos", l)]
        results |= {
            "cos min": f["bridge_cos/min"],
            "cos mean": f["bridge_cos/mean"],
            "rho l0": f[layer_key("bridge_rho", 0)],
            "CPU ms/step": 6e4 * cpu / steps,
        }
        rows.append({"variant": name, "change": change, "overrides": over, "results": results})
        print(
            f"{name:<16}"
            + " ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()
            ),
            flush=True,
        )
    path = Path(args.out)
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    for r in old:  # rows written before steps were per row ran at the file's old `steps`
        r["results"].setdefault("steps", 3000)
    keep = [r for r in old if r["variant"] not in {r["variant"] for r in rows}]
    order = [a[0] for a in ABLATIONS]
    rows = sorted(
        keep + rows, key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99
    )
    base = to_dict(load_params("toy_lq"))
    path.write_text(
        json.dumps(
            {
                "what": "credit_bridge on the frozen toy, cosine of ∇V_φ with the exact costate at the "
                "last step; each row = params/toy_lq.yaml + its overrides",
                "seed": args.seeds[0],
                "torch_threads": args.threads,
                "yaml": {
                    k: base[k]
                    for k in (
                        "cont_weight",
                        "value_mlp",
                        "fb_hidden",
                        "fb_batch_frac",
                        "num_anchors",
                        "K",
                        "sigma_bridge",
                        "lam",
                    )
                },
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 123, 456])
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the yaml's 8000; ablations: 3000)",
    )
    ap.add_argument("--ablations", action="store_true", help="run the value-net ablations")
    ap.add_argument("--variant", action="append", choices=[a[0] for a in ABLATIONS])
    ap.add_argument("--out", default=str(ABLATIONS_PATH))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (num_threads)")
    ap.add_argument("--progress", action="store_true", help="tqdm bars")
    args = ap.parse_args()
    if args.ablations:
        args.steps = args.steps or 3000
        ablations(args)
    else:
        args.steps = args.steps or load_params("toy_lq").num_steps
        alignment(args)


if __name__ == "__main__":
    main()
