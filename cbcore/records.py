"""Run records (DESIGN §8): the files that make a run directory the record of a run.

    run_dir/params.yaml       resolved parameters
    run_dir/provenance.json   git commit + dirty flag, package versions, device, wall time
    run_dir/metrics.jsonl     one JSON row per logged step, namespaced keys (`train/loss`, `cos/layer_03`)
    run_dir/summary.json      final status and metrics per method

Aggregation reads these files, never notebook outputs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from cbcore.params import save_params

PACKAGES = ("torch", "torchvision", "numpy", "scipy", "plotly", "papermill", "nbconvert", "cbcore")


def layer_key(prefix: str, layer: int) -> str:
    """Namespaced per-layer metric key with a zero-padded layer: `cos/layer_03`."""
    return f"{prefix}/layer_{layer:02d}"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def git_state(repo: Path | None = None) -> dict:
    """Commit hash and dirty flag of the repository holding cbcore (None outside git)."""
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def provenance(device: str | None = None) -> dict:
    """Where and with what a run was made."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = {
        "git": git_state(),
        "packages": versions,
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch_threads": None,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if device and str(device).startswith("cuda") and torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        pass
    return info


class RunRecord:
    """Writer for one run directory. Metrics rows are appended and flushed at once, so an
    interrupted run loses nothing it logged."""

    def __init__(self, run_dir: str | Path, params: Any, *, experiment: str, profile: str | None,
                 device: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.experiment, self.profile, self.params = experiment, profile, params
        self.t0 = time.time()
        save_params(params, self.run_dir / "params.yaml")
        prov_path = self.run_dir / "provenance.json"
        prev = json.loads(prov_path.read_text()) if prov_path.exists() else {}
        self.prov = provenance(device)
        self.prov["experiment"], self.prov["profile"] = experiment, profile
        self.prov["seed"] = getattr(params, "seed", None)
        self.prov["wall_s_before"] = float(prev.get("wall_s", 0.0))  # earlier attempts (resume)
        self._write_json("provenance.json", self.prov)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _write_json(self, name: str, obj: dict) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(_jsonable(obj), indent=2))
        tmp.replace(self.run_dir / name)  # atomic: a reader never sees half a file

    def log(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")

    def drop_rows(self, pred: Callable[[dict], bool]) -> int:
        """Remove logged rows for which pred(row) is true (used on resume); returns the count."""
        rows = read_metrics(self.run_dir)
        keep = [r for r in rows if not pred(r)]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        return len(rows) - len(keep)

    def write_summary(self, summary: dict, status: str) -> None:
        """Write summary.json (status: completed, diverged, failed) and finish provenance."""
        wall = time.time() - self.t0
        self.prov["wall_s"] = self.prov["wall_s_before"] + wall
        self.prov["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._write_json("provenance.json", self.prov)
        body = {"experiment": self.experiment, "profile": self.profile,
                "seed": getattr(self.params, "seed", None), "status": status,
                "wall_s": self.prov["wall_s"], **summary}
        self._write_json("summary.json", body)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All metric rows of a run (empty if none); a torn last line (killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def run_dir_for(root: str | Path, experiment: str, profile: str | None, seed: int) -> Path:
    """`executed/<experiment>/<profile>/seed<k>/`."""
    return Path(root) / experiment / (profile or "default") / f"seed{seed}"


def find_runs(root: str | Path) -> Iterable[Path]:
    """Every run directory under root (a directory holding params.yaml)."""
    return sorted(p.parent for p in Path(root).glob("*/*/seed*/params.yaml"))
