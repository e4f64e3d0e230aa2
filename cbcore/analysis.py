"""The data behind the diagnostics and summary notebooks (DESIGN §7, §8).

Every function here reads run records (metrics.jsonl rows, summary.json) or checkpoints and
returns arrays or tables; `cbcore.plots` turns them into figures. Nothing here trains.

Diagnostics of one run (notebooks/diagnostics.ipynb):

    diag = RunDiagnostics(run_dir, batch_size)    a run's checkpoints and a fixed batch
    probe = diag.probe(method, epoch)             trajectory, true gradients and credits there
    layer_alignment(probe)                        per-layer cos and rho of the credit
    checkpoint_grids(diag, method)                the same over the loaded epochs, (L, E)
    layer_epoch_grid(rows, method, "cos")         a per-layer diagnostic over epochs, from records
    nudge_data(probe, layer, eps_grid)            Δℓ along the credit, ∂ℓ/∂h_l and a random direction
    value_vs_loss(probe, layer)                   credit bridge: V_φ(h_l, l, y) against the loss

Every seed of an experiment (notebooks/summary.ipynb):

    runs = collect_seeds(root, experiment, profile, seeds)   one SeedRun per seed, with status
    seed_table(runs)                              seed, status and why
    final_stats(runs, keys)                       mean ± std (ddof=1) and n per method
    curve_bands(runs, key, x)                     mean ± std over seeds per epoch (or step)
    layer_bands(runs, "cos")                      final per-layer mean ± std
    known_answers_table(runs)                     toy: per-layer cosine vs the closed-form answers

Only completed seeds are aggregated; within one, a method that diverged (or is absent) is left
out of that method's numbers. Whatever is left out is named in the table's `excluded` column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from cbcore import checkpoint as ck
from cbcore import cifar, metrics
from cbcore.methods import CreditContext, CreditMethod
from cbcore.params import METHOD_NAMES, params_from_dict
from cbcore.records import read_metrics, read_summary, run_dir_for

FINISHED = ("completed", "diverged")  # run statuses whose methods can be aggregated
_LAYER = re.compile(r"(.+)/layer_(\d+)$")


def number(v: object) -> float:
    """A record value as a float (records write non-finite floats as "nan", "inf")."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def row_value(row: dict, key: str) -> float:
    """`row[key]`; for an absent `prefix/mean`, the mean over the row's `prefix/layer_xx`."""
    if key in row:
        return number(row[key])
    if key.endswith("/mean"):
        vals = layer_values(row, key[: -len("/mean")])
        if vals.size:
            return float(vals.mean())
    return math.nan


def layer_values(row: dict, prefix: str) -> np.ndarray:
    """The row's `prefix/layer_00, prefix/layer_01, ...` as an array (L,)."""
    found = {}
    for k, v in row.items():
        m = _LAYER.fullmatch(k)
        if m and m.group(1) == prefix:
            found[int(m.group(2))] = number(v)
    return np.array([found[l] for l in sorted(found)], dtype=float)


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """n values of ε log-spaced from lo to hi."""
    if not 0 < lo <= hi or n < 1:
        raise ValueError(f"ε grid: need 0 < lo <= hi and n >= 1, got lo={lo}, hi={hi}, n={n}")
    return [float(e) for e in np.geomspace(lo, hi, n)]


def pick_layers(num_layers: int, k: int = 4) -> list[int]:
    """Up to k evenly spaced layers from 0 to L-1 (all of them when L <= k)."""
    if num_layers <= k:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (k - 1)) for i in range(k)})


# ---------------------------------------------------------------- one run: checkpoints


@dataclass
class Probe:
    """One method at one checkpoint on the fixed batch: what the §7 diagnostics look at."""

    method: str
    epoch: int
    step: int
    net: torch.nn.Module
    credit_method: CreditMethod
    ctx: CreditContext  # hs (L+1, B, d), y, g_L, err, loss (B,), step, total_steps
    true: Tensor  # (L+1, B, d) ∂ℓ/∂h_l
    credits: Tensor  # (L, B, d) g_l as the method gives them at this step
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return self.credits.shape[0]


class RunDiagnostics:
    """A CIFAR run directory opened for diagnostics: its params, records and checkpoints.

    The data set is loaded once (never downloaded); checkpoints are loaded when first asked
    for and kept. The fixed batch is the run's own diagnostic batch (same examples, chosen by
    the seed) cut or grown to `batch_size` examples.
    `methods`: the methods to look at ([] = every method with checkpoints, in the run's order);
    `epochs`: the checkpoint epochs to load ([] = every available one: kept snapshots and last).
    """

    def __init__(
        self,
        run_dir: str | Path,
        batch_size: int = 256,
        methods: Sequence[str] = (),
        epochs: Sequence[int] = (),
        device: str | torch.device | None = None,
        data=None,
    ) -> None:
        self.run_dir = Path(run_dir)
        path = self.run_dir / "params.yaml"
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: not a run directory (no params.yaml); give the "
                "run_dir of a cifar10 run, e.g. executed/cifar10/quick/seed42"
            )
        values = yaml.safe_load(path.read_text()) or {}
        self.P = params_from_dict(cifar.EXPERIMENT, values, str(path))
        self.rows = read_metrics(self.run_dir)
        self.summary = read_summary(self.run_dir) or {}
        with_ckpt = [m for m in self.P.methods if ck.method_dir(self.run_dir, m).is_dir()]
        if not with_ckpt:
            raise FileNotFoundError(
                f"{self.run_dir / ck.CKPT_DIR}: no checkpoints of any of "
                f"{list(self.P.methods)}; has this run trained an epoch?"
            )
        unknown = [m for m in methods if m not in with_ckpt]
        if unknown:
            raise ValueError(
                f"methods {unknown}: no checkpoints in {self.run_dir}; "
                f"methods with checkpoints: {with_ckpt}"
            )
        self.methods = list(methods) or with_ckpt
        self.requested_epochs = [int(e) for e in epochs]
        self.batch_size = batch_size
        self.device = cifar.setup_device(str(device) if device is not None else self.P.device)
        self.data = (
            cifar.prepare_data(self.P, self.device, allow_download=False)
            if data is None
            else cifar.subset_train(data, self.P.max_train)
        )
        Pb = replace(self.P, diag_batch=batch_size)
        self.x, self.y = cifar.diagnostic_batch(Pb, self.data)
        self.total_steps = self.P.epochs * (len(self.data.train_y) // self.P.batch_size)
        self._probes: dict[tuple[str, int], Probe] = {}

    def __repr__(self) -> str:
        eps = {m: self.available_epochs(m) for m in self.methods}
        return (
            f"RunDiagnostics({str(self.run_dir)!r}: {self.P.num_blocks} blocks of width "
            f"{self.P.d_hidden}, batch of {len(self.y)}, checkpoint epochs {eps})"
        )

    @property
    def num_layers(self) -> int:
        return self.P.num_blocks

    @property
    def value_methods(self) -> list[str]:
        """The methods with a value network V_φ (the credit bridge), at their last epoch."""
        return [m for m in self.methods if hasattr(self.probe(m).credit_method, "V")]

    def last_epoch(self, method: str) -> int | None:
        """Epoch of the method's last.pt, from the records (checked when it is loaded)."""
        if not ck.last_path(self.run_dir, method).exists():
            return None
        epochs = [r["epoch"] for r in self.rows if r.get("method") == method and "train/loss" in r]
        if epochs:
            return max(epochs)
        return ck.load_checkpoint(ck.last_path(self.run_dir, method))["epoch"]

    def available_epochs(self, method: str) -> list[int]:
        """Epochs with a checkpoint: kept snapshots and the last one."""
        last = self.last_epoch(method)
        return sorted(
            set(ck.snapshots(self.run_dir, method)) | ({last} if last is not None else set())
        )

    def epochs(self, method: str) -> list[int]:
        """The epochs to look at for a method: the requested ones, else every available one."""
        avail = self.available_epochs(method)
        missing = [e for e in self.requested_epochs if e not in avail]
        if missing:
            raise ValueError(
                f"{method}: no checkpoint for epochs {missing} in {self.run_dir}; "
                f"available: {avail} (params keep_ckpt_every keeps more)"
            )
        return self.requested_epochs or avail

    def checkpoint_path(self, method: str, epoch: int) -> Path:
        snap = ck.snapshot_path(self.run_dir, method, epoch)
        if snap.exists():
            return snap
        if epoch == self.last_epoch(method):
            return ck.last_path(self.run_dir, method)
        raise FileNotFoundError(
            f"{method}: no checkpoint for epoch {epoch} in {self.run_dir}; "
            f"available: {self.available_epochs(method)}"
        )

    def load(self, method: str, epoch: int) -> tuple[torch.nn.Module, CreditMethod, int]:
        """(net, credit method, step) as of a checkpoint."""
        path = self.checkpoint_path(method, epoch)
        state = ck.load_checkpoint(path, map_location=self.device)
        if state["epoch"] != epoch:
            raise ck.CheckpointError(
                f"{path}: holds epoch {state['epoch']}, not {epoch}; the "
                "records and checkpoints disagree (is the run still going?)"
            )
        net = cifar.build_net(self.P, self.data, self.device)
        meth = cifar.build_method(method, net, self.P, self.device)
        net.load_state_dict(state["model"])
        meth.load_state_dict(state["method_state"])
        return net, meth, int(state["step"])

    def probe(self, method: str, epoch: int | None = None) -> Probe:
        """The method at a checkpoint epoch (default: its last) on the fixed batch."""
        epoch = self.epochs(method)[-1] if epoch is None else int(epoch)
        key = (method, epoch)
        if key not in self._probes:
            net, meth, step = self.load(method, epoch)
            hs, true, loss, err = metrics.true_gradients(net, self.x, self.y)
            ctx = CreditContext(
                hs=hs,
                y=self.y,
                g_L=true[-1],
                err=err,
                loss=loss,
                step=step,
                total_steps=self.total_steps,
            )
            credits = meth.credits(net, ctx).detach()
            self._probes[key] = Probe(
                method, epoch, step, net, meth, ctx, true, credits, seed=self.P.seed
            )
        return self._probes[key]


def layer_alignment(probe: Probe) -> dict[str, np.ndarray]:
    """Per-layer `cos` (mean over examples of cos(g_l, ∂ℓ/∂h_l)) and `rho` (median of
    ‖g_l‖/‖∂ℓ/∂h_l‖) at one checkpoint, (L,) each."""
    L = probe.num_layers
    return {
        "layers": np.arange(L),
        "cos": metrics.cosine_per_layer(probe.credits, probe.true[:L]).cpu().numpy(),
        "rho": metrics.rho_per_layer(probe.credits, probe.true[:L]).cpu().numpy(),
    }


@dataclass
class Grid:
    """A per-layer quantity over epochs: values[l, e] for layer l at epochs[e] (NaN: not logged)."""

    name: str
    method: str
    epochs: np.ndarray  # (E,)
    layers: np.ndarray  # (L,)
    values: np.ndarray  # (L, E)


def checkpoint_grids(
    diag: RunDiagnostics, method: str, epochs: Sequence[int] | None = None
) -> dict[str, Grid]:
    """`cos` and `rho` per layer at each loaded checkpoint epoch (recomputed on the batch)."""
    epochs = list(diag.epochs(method) if epochs is None else epochs)
    per = [layer_alignment(diag.probe(method, e)) for e in epochs]
    layers = np.arange(diag.num_layers)
    return {
        name: Grid(
            name,
            method,
            np.array(epochs),
            layers,
            np.stack([p[name] for p in per], 1) if per else np.zeros((len(layers), 0)),
        )
        for name in ("cos", "rho")
    }


def layer_epoch_grid(rows: Iterable[dict], method: str, prefix: str = "cos") -> Grid:
    """A per-layer diagnostic (`cos`, `rho`, `nudge_eff`, `value_corr`, ...) of one method over
    the epochs the run logged it, from its metrics rows: values (L, E)."""
    found: dict[int, np.ndarray] = {}
    for r in rows:
        if r.get("method") == method and "epoch" in r:
            vals = layer_values(r, prefix)
            if vals.size:
                found[int(r["epoch"])] = vals  # a later row for the same epoch wins
    epochs = sorted(found)
    L = max((len(v) for v in found.values()), default=0)
    values = np.full((L, len(epochs)), np.nan)
    for j, e in enumerate(epochs):
        values[: len(found[e]), j] = found[e]
    return Grid(prefix, method, np.array(epochs, dtype=int), np.arange(L), values)


def nudge_data(probe: Probe, layer: int, eps_grid: Sequence[float]) -> dict:
    """Change of the mean loss after h_l ← h_l − ε‖h_l‖·dir/‖dir‖ over the ε grid, along the
    credit, the true gradient and a random direction (arrays over ε), and the nudge efficiency
    Δℓ(credit)/Δℓ(true) (1 = as good as BP, <= 0 = useless). The random direction is drawn
    from the run's seed and the layer, so the same probe gives the same curves."""
    L = probe.num_layers
    if not 0 <= layer < L:
        raise ValueError(f"layer {layer}: the net has layers 0..{L - 1}")
    gen = torch.Generator(device=probe.credits.device).manual_seed(probe.seed * 1009 + layer)
    c = metrics.nudge_curves(
        probe.net,
        probe.ctx.hs,
        probe.ctx.y,
        layer,
        probe.credits[layer],
        probe.true[layer],
        list(eps_grid),
        gen,
    )
    out = {k: np.asarray(v, dtype=float) for k, v in c.items()}
    out |= {"layer": layer, "method": probe.method, "epoch": probe.epoch}
    return out


def value_vs_loss(probe: Probe, layer: int) -> dict:
    """Credit bridge: its value V_φ(h_l, l, y) per example next to the realized loss ℓ, and
    their correlation over examples (what `value_corr/layer_xx` records)."""
    V = getattr(probe.credit_method, "V", None)
    if V is None:
        raise ValueError(f"{probe.method} has no value network (only credit_bridge has V)")
    L = probe.num_layers
    if not 0 <= layer <= L:
        raise ValueError(f"layer {layer}: the value net has layers 0..{L}")
    with torch.no_grad():
        v = V(
            probe.ctx.hs[layer][None],
            probe.net.target_features(probe.ctx.y),
            slice(layer, layer + 1),
        )[0]  # (B,)
    value, loss = v.cpu().numpy().astype(float), probe.ctx.loss.cpu().numpy().astype(float)
    vc, lc = value - value.mean(), loss - loss.mean()
    corr = float((vc * lc).sum() / max(np.linalg.norm(vc) * np.linalg.norm(lc), 1e-12))
    return {
        "value": value,
        "loss": loss,
        "corr": corr,
        "layer": layer,
        "method": probe.method,
        "epoch": probe.epoch,
    }


# ---------------------------------------------------------------- every seed of an experiment


@dataclass(frozen=True)
class Stat:
    """mean ± std (sample std, ddof=1) over n seeds; std is NaN for n < 2."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        a = np.asarray(values, dtype=float)
        if a.size == 0:
            return cls(math.nan, math.nan, 0)
        return cls(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else math.nan, int(a.size))

    def __str__(self) -> str:
        if self.n == 0:
            return "– (n=0)"
        if self.n == 1:
            return f"{self.mean:.4f} (n=1)"
        return f"{self.mean:.4f} ± {self.std:.4f} (n={self.n})"


@dataclass
class SeedRun:
    """One expected seed of an experiment: its record, or why there is none."""

    seed: int
    run_dir: Path
    status: str  # completed, diverged, failed, timeout, interrupted, incomplete, missing, ...
    reason: str | None = None
    summary: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.status in FINISHED

    @property
    def methods(self) -> list[str]:
        return list((self.summary.get("methods") or {}).keys())

    def method_problem(self, method: str) -> str | None:
        """Why this seed's method is left out of the aggregate (None: it is in)."""
        if not self.usable:
            return self.status + (f" ({self.reason})" if self.reason else "")
        m = (self.summary.get("methods") or {}).get(method)
        if not isinstance(m, dict):
            return "not run"
        if m.get("status") == "completed":
            return None
        if m.get("status") == "diverged":
            step = (m.get("diverged") or {}).get("step", m.get("step"))
            return "diverged" + (f" at step {step}" if step is not None else "")
        return str(m.get("status"))


def _seed_of(path: Path) -> int | None:
    m = re.fullmatch(r"seed(-?\d+)", path.name)
    return int(m.group(1)) if m else None


def collect_seeds(
    root: str | Path, experiment: str, profile: str | None, seeds: Sequence[int] = ()
) -> list[SeedRun]:
    """Every expected seed of `root/<experiment>/<profile>/`: the seeds with a run directory
    there, and the `seeds` asked for (one with no directory is `missing`)."""
    exp_dir = run_dir_for(root, experiment, profile, 0).parent
    found = {
        s: p
        for p in (exp_dir.glob("seed*") if exp_dir.is_dir() else [])
        if p.is_dir() and (s := _seed_of(p)) is not None
    }
    out = []
    for seed in sorted(set(found) | {int(s) for s in seeds}):
        run_dir = found.get(seed, run_dir_for(root, experiment, profile, seed))
        if seed not in found:
            out.append(SeedRun(seed, run_dir, "missing", "no run directory"))
            continue
        try:
            summary = read_summary(run_dir)
        except (OSError, ValueError) as e:
            out.append(SeedRun(seed, run_dir, "unreadable", f"summary.json: {e}"))
            continue
        if summary is None:
            out.append(
                SeedRun(
                    seed,
                    run_dir,
                    "incomplete",
                    "no summary.json: still running, or stopped before its end",
                    rows=read_metrics(run_dir),
                )
            )
            continue
        status = str(summary.get("status"))
        reason = None if status in FINISHED else (summary.get("error") or None)
        out.append(SeedRun(seed, run_dir, status, reason, summary, read_metrics(run_dir)))
    return out


def method_names(runs: Iterable[SeedRun]) -> list[str]:
    """Methods of the usable runs: the registry's order first, then any others."""
    seen = {m: None for r in runs if r.usable for m in r.methods}
    return [m for m in METHOD_NAMES if m in seen] + [m for m in seen if m not in METHOD_NAMES]


def seed_table(runs: Sequence[SeedRun]) -> list[dict]:
    """One row per expected seed: status, and what in it is left out of the aggregates."""
    table = []
    for r in runs:
        left_out = [f"{m}: {p}" for m in r.methods if (p := r.method_problem(m)) and r.usable]
        table.append(
            {
                "seed": r.seed,
                "status": r.status,
                "aggregated": r.usable,
                "note": r.reason or "; ".join(left_out) or None,
            }
        )
    return table


def excluded_text(runs: Sequence[SeedRun], method: str) -> str | None:
    """`seed 3: diverged at step 6; seed 5: missing (no run directory)` for one method."""
    parts = [f"seed {r.seed}: {p}" for r in runs if (p := r.method_problem(method))]
    return "; ".join(parts) or None


def final_stats(runs: Sequence[SeedRun], keys: Sequence[str] = ("test/acc",)) -> list[dict]:
    """One row per method: each key's final value (summary.json) as a Stat over the seeds
    where that method completed, the seeds used, and the seeds left out, named."""
    table = []
    for method in method_names(runs):
        ok = [r for r in runs if r.method_problem(method) is None]
        row: dict = {"method": method}
        for key in keys:
            vals = [row_value(r.summary["methods"][method].get("final") or {}, key) for r in ok]
            row[key] = Stat.of([v for v in vals if math.isfinite(v)])
        row["seeds"] = [r.seed for r in ok]
        row["excluded"] = excluded_text(runs, method)
        table.append(row)
    return table


def curve_bands(runs: Sequence[SeedRun], key: str, x: str = "epoch") -> dict[str, dict]:
    """method -> {x, mean, std, n} of a logged metric over `x` (epoch or step), across the
    seeds where the method completed (std with ddof=1; NaN where n < 2)."""
    out = {}
    for method in method_names(runs):
        by_x: dict[float, list[float]] = {}
        for r in runs:
            if r.method_problem(method) is not None:
                continue
            seen: dict[float, float] = {}
            for row in r.rows:
                if row.get("method") == method and x in row:
                    v = row_value(row, key)
                    if math.isfinite(v):
                        seen[number(row[x])] = v  # one value per seed and x: the last logged
            for xv, v in seen.items():
                by_x.setdefault(xv, []).append(v)
        xs = sorted(by_x)
        stats = [Stat.of(by_x[xv]) for xv in xs]
        if xs:
            out[method] = {
                "x": np.array(xs),
                "mean": np.array([s.mean for s in stats]),
                "std": np.array([s.std for s in stats]),
                "n": np.array([s.n for s in stats]),
                "excluded": excluded_text(runs, method),
            }
    return out


def final_layer_values(run: SeedRun, method: str, prefix: str) -> np.ndarray:
    """A per-layer diagnostic of a method at its last logged row that has it: (L,)."""
    for row in reversed(run.rows):
        if row.get("method") == method:
            vals = layer_values(row, prefix)
            if vals.size:
                return vals
    return np.zeros(0)


def layer_bands(runs: Sequence[SeedRun], prefix: str = "cos") -> dict[str, dict]:
    """method -> {layers, mean, std, n} of a per-layer diagnostic at the end of training,
    across the seeds where the method completed."""
    out = {}
    for method in method_names(runs):
        per = [
            v
            for r in runs
            if r.method_problem(method) is None
            and (v := final_layer_values(r, method, prefix)).size
        ]
        if not per:
            continue
        L = min(len(v) for v in per)
        stats = [Stat.of([v[l] for v in per]) for l in range(L)]
        out[method] = {
            "layers": np.arange(L),
            "mean": np.array([s.mean for s in stats]),
            "std": np.array([s.std for s in stats]),
            "n": np.array([s.n for s in stats]),
            "excluded": excluded_text(runs, method),
        }
    return out


# what each toy prefix is measured against (cbcore.toy_lq.Probe.measure)
KNOWN_ANSWERS = {
    "cos": "∂ℓ/∂h_l",
    "softcos": "∇V_l soft",
    "bridge_cos": "∂ℓ/∂h_l",
    "bridge_softcos": "∇V_l soft",
}


def known_answers_table(runs: Sequence[SeedRun]) -> list[dict]:
    """Toy (Phase A): one row per layer, the final per-layer cosine of each method's credit
    with the exact costate ∂ℓ/∂h_l (`cos`) and with the soft-value gradient ∇V_l (`softcos`;
    for the credit bridge also its pure bridge credit ∇V_φ, `bridge_…`), each a Stat over the
    seeds where the method completed, next to the broadcast baseline g_l = g_L. Empty for an
    experiment whose records have no soft-value cosines (CIFAR has no closed form)."""
    usable = [r for r in runs if r.usable]
    if not any(k.startswith("softcos/layer_") for r in usable for row in r.rows for k in row):
        return []
    columns: list[tuple[str, str, str]] = []  # (column, method, prefix)
    for method in method_names(runs):
        for prefix in KNOWN_ANSWERS:
            if any(final_layer_values(r, method, prefix).size for r in usable):
                columns.append((f"{method} {prefix} (vs {KNOWN_ANSWERS[prefix]})", method, prefix))
    finals = {
        (m, p): [final_layer_values(r, m, p) for r in runs if r.method_problem(m) is None]
        for _, m, p in columns
    }
    baseline = [layer_values(r.summary.get("baseline") or {}, "cos") for r in usable]
    baseline = [b for b in baseline if b.size]
    L = max((v.size for vs in finals.values() for v in vs), default=0)
    table = []
    for l in range(L):
        row: dict = {"layer": l}
        if baseline:
            row["broadcast cos"] = Stat.of([b[l] for b in baseline if b.size > l])
        for col, m, p in columns:
            row[col] = Stat.of([v[l] for v in finals[(m, p)] if v.size > l])
        table.append(row)
    return table


@dataclass(frozen=True)
class SummarySpec:
    """What the summary notebook shows for an experiment."""

    x: str  # the curves' x axis: epoch or step
    finals: tuple[str, ...]  # summary.json final keys, one column each
    curves: tuple[str, ...]  # metrics.jsonl keys plotted over x with bands
    layer_prefix: str = "cos"


SUMMARIES = {
    "cifar10": SummarySpec(
        "epoch", ("test/acc", "train/acc", "cos/mean"), ("test/acc", "train/acc")
    ),
    "toy_lq": SummarySpec(
        "step", ("cos/mean", "softcos/mean", "eval/loss"), ("cos/mean", "softcos/mean", "eval/loss")
    ),
}


def summary_spec(experiment: str) -> SummarySpec:
    if experiment not in SUMMARIES:
        raise KeyError(
            f"no summary layout for experiment '{experiment}'; known: {sorted(SUMMARIES)}"
        )
    return SUMMARIES[experiment]


def format_table(table: list[dict]) -> str:
    """Plain text of a table of rows (Stats as `mean ± std (n=…)`, lists joined)."""
    rows = [
        {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()}
        for r in table
    ]
    return cifar.format_table(rows)
