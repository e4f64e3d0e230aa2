"""Load the CIFAR-10 JPEG archive: decode time, cached-load time, time per augmented batch.

    python benchmarks/data_cifar_jpeg.py [path/to/cifar10-jpeg-q75.tar.gz] [--device cuda]

The first load decodes (unless a cache from an earlier run exists; --fresh removes it first),
the second must come from the cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cbcore import data as D

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / ".." / "shared" / "data" / "cifar10-jpeg-q75.tar.gz"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # time the work, not the launch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default=str(DEFAULT), help="the .tar.gz (or any data_dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=50, help="augmented batches to time")
    ap.add_argument("--fresh", action="store_true", help="delete this archive's cache first")
    args = ap.parse_args()
    path, device = Path(args.path).resolve(), torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")

    if args.fresh:
        name = f"cifar10-tar-{D._cache_key(path, 'tar')}.pt"
        for d in D._cache_dirs(path):
            (d / name).unlink(missing_ok=True)

    t0 = time.perf_counter()
    first = D.load_data("cifar10", path, device, allow_download=False)
    t1 = time.perf_counter()
    second = D.load_data("cifar10", path, device, allow_download=False)
    t2 = time.perf_counter()
    assert "from cache" in second.source, second.source
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    print(f"first load:  {t1 - t0:6.2f} s  {first.source}")
    print(f"second load: {t2 - t1:6.2f} s  {second.source}")
    print(
        f"train {tuple(first.train_x.shape)}, test {tuple(first.test_x.shape)}, "
        f"{first.num_classes} classes {first.classes}"
    )
    print(f"per-class train counts {torch.bincount(first.train_y).tolist()}")
    print(f"mean {first.mean.tolist()}, std {first.std.tolist()}")

    g = torch.Generator(device=device).manual_seed(0)
    loader = D.DeviceLoader(first, 256, train=True, augment=True, generator=g)
    batches = iter(loader)
    next(batches)  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(args.batches):
        xb, yb = next(batches)  # (256, 3072) float32, (256,)
    sync(device)
    per = (time.perf_counter() - t) / args.batches
    print(f"augment+normalize batch of 256: {per * 1e3:.2f} ms ({len(loader)} batches/epoch)")


if __name__ == "__main__":
    main()
