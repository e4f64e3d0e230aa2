"""The cost of credit: one training step of each method against bp, at the CIFAR paper shape.

    python benchmarks/step_time.py                      # d 512, 12 blocks, mlp_ratio 4, K 4, batch 256
    python benchmarks/step_time.py --set fb_batch_frac=0.25 --reps 7

Warm-up first, then the methods interleaved over repetitions (rotating the order), median ms
per step, ratio to bp, and peak memory (CUDA: max allocated; CPU: peak RSS of a fresh
subprocess that runs two steps of that method alone). Also the data path: time per batch of
the device-resident loader with augmentation (synthetic CIFAR-shaped uint8 data), as a share
of a bp step.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from cbcore.cifar import setup_device
from cbcore.data import DeviceLoader, ImageData
from cbcore.methods import make_method
from cbcore.model import ResMLP
from cbcore.params import load_params, parse_override
from cbcore.train import make_optimizer, train_step

METHODS = ("bp", "dfa", "state_bridge", "credit_bridge")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoopResMLP(ResMLP):
    """The naive reference for `--naive`: continuations as a Python loop over layers, each
    block called on its own slice (what layer-batched `step_all` replaces)."""

    def step_all(self, h):
        return torch.stack([self.block(l, h[l]) for l in range(self.num_layers)])


def build(name: str, P, device: torch.device, batch: int, naive: bool = False):
    torch.manual_seed(P.seed)
    cls = LoopResMLP if naive else ResMLP
    net = cls(3 * 32 * 32, 10, P.d_hidden, P.num_blocks, P.mlp_ratio).to(device)
    method = make_method(name, net, P).to(device)
    opt, sched = make_optimizer(net, P.lr, P.weight_decay, 10_000)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3 * 32 * 32, generator=g, device=device)
    y = torch.randint(0, 10, (batch,), generator=g, device=device)
    return net, method, opt, sched, x, y


def one_step(state, step: int, total: int, P, device) -> None:
    net, method, opt, sched, x, y = state
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=P.amp_bf16):
        train_step(net, method, opt, x, y, step, total, sched)


def time_steps(
    P, device, batch: int, reps: int, warmup: int, naive: bool = False
) -> dict[str, list[float]]:
    states = {m: build(m, P, device, batch, naive and m != "bp") for m in METHODS}
    total = 10 * (warmup + reps)  # warmup_frac 0.2 ⇒ the credit bridge blends in at step 2·(w+r)
    # Time the credit bridge in its bridge phase (α = 1), its steady state after warmup.
    offset = {m: (total - warmup - reps if m == "credit_bridge" else 0) for m in METHODS}
    for m in METHODS:
        for s in range(warmup):
            one_step(states[m], offset[m] + s, total, P, device)
    sync(device)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(reps):
        order = METHODS[r % 4 :] + METHODS[: r % 4]
        for m in order:
            sync(device)
            t = time.perf_counter()
            one_step(states[m], offset[m] + warmup + r, total, P, device)
            sync(device)
            times[m].append((time.perf_counter() - t) * 1e3)
    return times


def peak_memory_mb(name: str, P, device, batch: int, sets: list[str]) -> float:
    if device.type == "cuda":
        state = build(name, P, device, batch)
        torch.cuda.reset_peak_memory_stats(device)
        for s in range(2):
            one_step(state, s, 10, P, device)
        sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    cmd = [
        sys.executable,
        __file__,
        "--peak-rss",
        name,
        "--batch",
        str(batch),
        "--threads",
        str(torch.get_num_threads()),
    ]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a
    child forked from a big parent would report the parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loader_ms(device: torch.device, batch: int, n_batches: int = 50) -> float:
    """Per-batch time of DeviceLoader with augmentation on CIFAR-shaped uint8 data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, 10, (50_000,), generator=g).to(device)
    data = ImageData(
        x,
        y,
        x[:1000],
        y[:1000],
        [str(i) for i in range(10)],
        "synthetic",
        torch.full((3,), 0.5, device=device),
        torch.full((3,), 0.25, device=device),
    )
    loader = DeviceLoader(
        data,
        batch,
        train=True,
        augment=True,
        generator=torch.Generator(device=device).manual_seed(0),
    )
    it = iter(loader)
    next(it)
    sync(device)
    t = time.perf_counter()
    for _ in range(n_batches):
        xb, yb = next(it)
    sync(device)
    return (time.perf_counter() - t) * 1e3 / n_batches


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a cifar10 parameter (paper values otherwise)",
    )
    ap.add_argument("--peak-rss", metavar="METHOD", help=argparse.SUPPRESS)
    ap.add_argument(
        "--naive",
        action="store_true",
        help="bridges' continuations as a Python loop over layers (the reference "
        "that layer batching replaces; bp unchanged)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default). On a loaded machine use 1: "
        "OpenMP threads spinning against other processes cost 10-50x",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    P = load_params("cifar10", "paper", dict(parse_override(s) for s in args.set))
    device = setup_device(P.device)
    if args.peak_rss:  # child mode: two steps of one method, print peak RSS in MiB
        state = build(args.peak_rss, P, device, args.batch)
        for s in range(2):
            one_step(state, s, 10, P, device)
        print(peak_rss_mb())
        return

    print(
        f"step time at d {P.d_hidden}, {P.num_blocks} blocks, mlp_ratio {P.mlp_ratio}, "
        f"K {P.K}, num_anchors {P.num_anchors}, fb_batch_frac {P.fb_batch_frac}, "
        f"batch {args.batch}, bf16 {P.amp_bf16}; device {device}, "
        f"torch threads {torch.get_num_threads()}; median of {args.reps} interleaved reps"
        + ("; NAIVE per-layer continuations" if args.naive else "")
    )
    times = time_steps(P, device, args.batch, args.reps, args.warmup, args.naive)
    med = {m: statistics.median(v) for m, v in times.items()}
    mem = {m: peak_memory_mb(m, P, device, args.batch, args.set) for m in METHODS}
    mem_kind = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    print(f"{'method':<15}{'ms/step':>10}{'vs bp':>8}{'min':>9}{'max':>9}{mem_kind:>17}")
    for m in METHODS:
        print(
            f"{m:<15}{med[m]:>10.1f}{med[m] / med['bp']:>7.2f}x{min(times[m]):>9.1f}"
            f"{max(times[m]):>9.1f}{mem[m]:>17.0f}"
        )
    lm = loader_ms(device, args.batch)
    print(
        f"data path: {lm:.2f} ms per augmented batch of {args.batch} = "
        f"{100 * lm / med['bp']:.1f}% of a bp step"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "median_ms": med,
                    "times_ms": times,
                    "peak_mb": mem,
                    "loader_ms": lm,
                    "params": {
                        k: getattr(P, k)
                        for k in ("d_hidden", "num_blocks", "K", "num_anchors", "fb_batch_frac")
                    },
                    "batch": args.batch,
                    "device": str(device),
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
