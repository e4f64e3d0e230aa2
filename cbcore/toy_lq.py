"""Phase A: the linear-quadratic toy with closed-form answers (DESIGN §5).

    h_0 = x ~ N(0, I_d),   h_l = M_l h_{l-1}  (l = 1..L),   y = T x,   ℓ = ½·mean_d((h_L − y)²)

`M_l = exp(θ S_l)` with `S_l` random skew-symmetric (orthogonal, so perfectly conditioned,
and θ = 0.6 turns P_0 far enough from the identity that the broadcast credit scores a low
cosine at layer 0); `T` is a random orthogonal matrix. Known answers, by matrix products:

    P_l = M_L ⋯ M_{l+1}   (P_L = I)
    exact costate   ∂ℓ/∂h_l = P_l^T (h_L − y)/d
    soft value      V_l(h) = −λ log E exp(−V_{l+1}(M_{l+1}(h + σξ))/λ),  V_L = ℓ
                           = ½ (P_l h − y)^T R_l^{-1} (P_l h − y) + (λ/2)·logdet(R_l/d)
                    R_l    = d·I + (σ²/λ) Σ_{j=l}^{L-1} P_j P_j^T
    soft gradient   ∇V_l(h) = P_l^T R_l^{-1} (P_l h − y)

(R_l is DESIGN's one-step recursion `(S^{-1} + σ² M M^T/λ)^{-1}` unrolled: each noise kick at
h_j, j ≥ l, reaches h_L through P_j. tests/test_toy_lq.py checks both forms and a Monte Carlo.)
The toy is a `CreditNet`, so the same credit methods, train step and metrics run on it.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cbcore import metrics
from cbcore.methods import CreditContext, make_method
from cbcore.params import ToyLQParams
from cbcore.records import RunRecord, layer_key
from cbcore.train import train_step


def random_skew(d: int, generator: torch.Generator) -> Tensor:
    """Skew-symmetric S with eigenvalues ±iω, ω spread over about [0, 2]: (d, d)."""
    A = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return (A - A.T) / math.sqrt(2 * d)


def random_orthogonal(d: int, generator: torch.Generator) -> Tensor:
    """Haar-random orthogonal matrix (QR of a Gaussian with the sign fix): (d, d)."""
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None]


class ToyLQ(nn.Module):
    """The linear residual toy as a `CreditNet`: embed = identity, block l = M_l, output = identity.

    loss_per_example is ½·mean_d((z − y)²), so ∂ℓ_i/∂h_L = (h_L − y)/d and DFA's output error
    e = (z − y)/d has C = d columns.
    """

    def __init__(self, d: int, num_layers: int, theta: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        S = torch.stack([random_skew(d, gen) for _ in range(num_layers)])  # (L, d, d)
        self.M = nn.Parameter(torch.linalg.matrix_exp(theta * S).float())  # (L, d, d)
        self.register_buffer("T", random_orthogonal(d, gen).float())  # (d, d) target map
        self.num_layers, self.d, self.out_dim, self.target_dim = num_layers, d, d, d

    def embed(self, x: Tensor) -> Tensor:
        return x

    def block(self, l: int, h: Tensor) -> Tensor:
        return h @ self.M[l].T  # (B, d)

    def step_all(self, h: Tensor) -> Tensor:
        return torch.bmm(h, self.M.transpose(1, 2))  # (L, N, d): M_{l+1} h[l]

    def output(self, h: Tensor) -> Tensor:
        return h

    def loss_per_example(self, z: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (z - y).pow(2).mean(-1)  # (B,)

    def output_error(self, z: Tensor, y: Tensor) -> Tensor:
        return (z - y) / self.d  # (B, d)

    def target_features(self, y: Tensor) -> Tensor:
        return y

    def stacked_block_params(self) -> list[Tensor]:
        return [self.M]

    def head_parameters(self) -> list[nn.Parameter]:
        return []

    def embed_parameters(self) -> list[nn.Parameter]:
        return []

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A batch x ~ N(0, I), y = T x: (n, d), (n, d)."""
        x = torch.randn(n, self.d, generator=generator, device=self.T.device)
        return x, x @ self.T.T

    @torch.no_grad()
    def trajectory(self, x: Tensor) -> Tensor:
        """h_0..h_L: (L+1, B, d)."""
        hs = [x]
        for l in range(self.num_layers):
            hs.append(self.block(l, hs[-1]))
        return torch.stack(hs)


# --- closed-form answers (matrix products; float64 inside, no autograd through the net)


def products(M: Tensor) -> Tensor:
    """P_l = M_L ⋯ M_{l+1} for l = 0..L (P_L = I): (L+1, d, d)."""
    L, d, _ = M.shape
    M = M.detach().double()
    P = [torch.eye(d, dtype=M.dtype, device=M.device)]
    for l in range(L - 1, -1, -1):
        P.append(P[-1] @ M[l])
    return torch.stack(P[::-1])


def exact_costates(M: Tensor, hs: Tensor, y: Tensor) -> Tensor:
    """∂ℓ/∂h_l = P_l^T (h_L − y)/d for l = 0..L: (L+1, B, d)."""
    d = M.shape[-1]
    r = (hs[-1].double() - y.double()) / d  # (B, d)
    return torch.einsum("lij,bi->lbj", products(M), r).to(hs.dtype)


def soft_value_matrices(M: Tensor, sigma: float, lam: float) -> tuple[Tensor, Tensor]:
    """P_l and R_l = d·I + (σ²/λ) Σ_{j≥l} P_j P_j^T of the soft value, l = 0..L: (L+1, d, d) each."""
    P = products(M)
    d = M.shape[-1]
    PPt = P @ P.transpose(1, 2)  # (L+1, d, d)
    kicks = torch.cat(
        [PPt[:-1].flip(0).cumsum(0).flip(0), torch.zeros_like(PPt[:1])]
    )  # Σ_{j=l}^{L-1}
    R = d * torch.eye(d, dtype=P.dtype, device=P.device) + (sigma**2 / lam) * kicks
    return P, R


def soft_values(
    M: Tensor, hs: Tensor, y: Tensor, sigma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Soft values V_l(h_l) (L+1, B) and their gradients ∇V_l(h_l) (L, B, d), l = 0..L-1 for the
    gradients (∇V_L is the exact costate). `hs` may be any states at each layer, (L+1, B, d)."""
    P, R = soft_value_matrices(M, sigma, lam)
    u = torch.einsum("lij,lbj->lbi", P, hs.double()) - y.double()  # (L+1, B, d): P_l h − y
    w = torch.linalg.solve(R, u.transpose(1, 2)).transpose(1, 2)  # R_l^{-1} u
    d = M.shape[-1]
    const = 0.5 * lam * (torch.linalg.slogdet(R)[1] - d * math.log(d))  # (L+1,)
    V = 0.5 * (u * w).sum(-1) + const[:, None]
    grad = torch.einsum("lij,lbi->lbj", P[:-1], w[:-1])  # P_l^T R_l^{-1} u
    return V.to(hs.dtype), grad.to(hs.dtype)


def soft_value_mc(
    M: Tensor,
    h: Tensor,
    y: Tensor,
    layer: int,
    sigma: float,
    lam: float,
    n: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Monte Carlo −λ log E exp(−ℓ(h_L)/λ) over n noisy rollouts h_{j+1} = M_{j+1}(h_j + σξ_j)
    from states h (B, d) at `layer`, and its standard error (delta method): (B,), (B,).
    The nested soft-min of DESIGN §4 telescopes to this single expectation."""
    M = M.detach().double()
    z = h.double().repeat(n, 1)  # (n·B, d)
    for j in range(layer, M.shape[0]):
        xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        z = (z + sigma * xi) @ M[j].T
    loss = 0.5 * (z - y.double().repeat(n, 1)).pow(2).mean(-1).view(n, -1)  # (n, B)
    est = -lam * (torch.logsumexp(-loss / lam, 0) - math.log(n))
    w = torch.exp(-(loss - est) / lam)  # exp(−ℓ/λ) / mean: mean 1, so se = λ·std(w)/√n
    return est, lam * w.std(0) / math.sqrt(n)


# --- the experiment


@dataclass
class ToyResult:
    """What `run_toy` returns: the logged rows (as in metrics.jsonl) and the summary."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    run_dir: Path | None = None


NUM_THREADS_VAR = "CBCORE_NUM_THREADS"  # set by the batch runner when runs share the CPU


def resolve_device(name: str) -> torch.device:
    """The `device` param: auto → cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device: {name!r} but CUDA is not available here; use auto or cpu")
    return torch.device(name)


@contextmanager
def cpu_threads(num_threads: int):
    """Run with $CBCORE_NUM_THREADS, else `num_threads` (0: torch's default) torch CPU threads,
    and restore the count after. The toy's ops are small: one thread is about as fast as two,
    and when runs share the cores, more threads than free cores stall each other (measured on
    this project's 2-core box under load: 50 → 730 ms per credit-bridge step)."""
    before = torch.get_num_threads()
    env = os.environ.get(NUM_THREADS_VAR)
    try:
        n = int(env) if env else num_threads
    except ValueError as e:
        raise ValueError(f"${NUM_THREADS_VAR}={env!r}: expected a thread count") from e
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_layer(prefix: str, values: Tensor) -> dict[str, float]:
    return {layer_key(prefix, l): v for l, v in enumerate(values.tolist())}


def summarize(values: dict[str, float], prefix: str) -> dict[str, float]:
    """`prefix/mean` and `prefix/min` over the `prefix/layer_xx` entries."""
    vals = [v for k, v in values.items() if k.startswith(prefix + "/layer_")]
    return {f"{prefix}/mean": sum(vals) / len(vals), f"{prefix}/min": min(vals)} if vals else {}


class Probe:
    """The fixed diagnostic batch of a network and its closed-form answers."""

    def __init__(self, net: ToyLQ, P: ToyLQParams, generator: torch.Generator) -> None:
        self.x, self.y = net.sample(P.eval_batch, generator)
        self.sigma, self.lam = P.sigma_bridge, P.lam

    @torch.no_grad()
    def measure(self, net: ToyLQ, method, step: int, total: int) -> dict[str, float]:
        """Per-layer cos/rho of the method's credit vs the exact costate (and of the credit and,
        for credit_bridge, the pure bridge credit ∇V_φ vs the soft-value gradient)."""
        L = net.num_layers
        hs = net.trajectory(self.x)
        true = exact_costates(net.M, hs, self.y)  # (L+1, B, d)
        _, soft = soft_values(net.M, hs, self.y, self.sigma, self.lam)  # (L, B, d)
        loss = net.loss_per_example(hs[-1], self.y)
        err = net.output_error(hs[-1], self.y)
        ctx = CreditContext(
            hs=hs, y=self.y, g_L=true[-1], err=err, loss=loss, step=step, total_steps=total
        )
        with torch.enable_grad():
            g = method.credits(net, ctx)  # (L, B, d)
        out = {"eval/loss": float(loss.mean())}
        out |= per_layer("cos", metrics.cosine_per_layer(g, true[:L]))
        out |= per_layer("rho", metrics.rho_per_layer(g, true[:L]))
        out |= per_layer("softcos", metrics.cosine_per_layer(g, soft))
        out |= per_layer("softrho", metrics.rho_per_layer(g, soft))
        bridge = getattr(method, "bridge_credits", None)
        if bridge is not None:
            with torch.enable_grad():
                gb = bridge(net, ctx)
            out |= per_layer("bridge_cos", metrics.cosine_per_layer(gb, true[:L]))
            out |= per_layer("bridge_rho", metrics.rho_per_layer(gb, true[:L]))
            out |= per_layer("bridge_softcos", metrics.cosine_per_layer(gb, soft))
            out |= per_layer("bridge_softrho", metrics.rho_per_layer(gb, soft))
        for name, values in method.diagnose(net, ctx, true[:L]).items():
            if name != "bridge_cos":  # already measured above, with its rho
                out |= per_layer(name, values)
        bc = metrics.broadcast_credits(true[-1], L)
        out |= per_layer("broadcast_cos", metrics.cosine_per_layer(bc, true[:L]))
        out |= per_layer("broadcast_rho", metrics.rho_per_layer(bc, true[:L]))
        return out


def final_metrics(row: dict) -> dict:
    """The summary's `final` block of a method: its last row's per-layer values + mean/min."""
    final = {k: v for k, v in row.items() if "/layer_" in k or k.startswith(("train/", "eval/"))}
    for prefix in ("cos", "rho", "softcos", "bridge_cos", "bridge_softcos"):
        final |= summarize(row, prefix)
    return final


def run_method(name: str, P: ToyLQParams, device: torch.device, log, progress: bool) -> dict:
    """Train one method for P.num_steps on a fresh copy of the seeded toy; returns its summary."""
    torch.manual_seed(P.seed)
    net = ToyLQ(P.d_hidden, P.num_layers, P.theta, P.seed).to(device)
    probe = Probe(net, P, torch.Generator(device=device).manual_seed(P.seed + 1))
    data_gen = torch.Generator(device=device).manual_seed(P.seed + 2)  # same data for every method
    method = make_method(name, net, P).to(device)
    opt = None
    if P.train_forward:
        opt = torch.optim.AdamW(net.parameters(), lr=P.lr, weight_decay=P.weight_decay)
    else:
        net.requires_grad_(False)  # frozen: no forward graph to the M_l
    total, last = P.num_steps, {}
    t0 = time.perf_counter()
    steps = range(total)
    if progress:
        steps = tqdm(steps, desc=name, mininterval=2.0, leave=False)
    for step in steps:
        x, y = net.sample(P.batch_size, data_gen)
        res = train_step(net, method, opt, x, y, step, total)
        if step % P.log_every == 0 or step == total - 1:
            row = {"method": name, "step": step + 1, "train/loss": float(res.loss)}  # host sync
            row |= {k: float(v) for k, v in res.logs.items()}
            row |= probe.measure(net, method, step + 1, total)
            row["time/wall_s"] = time.perf_counter() - t0
            log(row)
            last = row
            bad = [
                k
                for k, v in row.items()
                if isinstance(v, float)
                and not math.isfinite(v)
                and (k.startswith("train/") or k.endswith("loss"))
            ]
            if bad:
                return {
                    "status": "diverged",
                    "step": step + 1,
                    "value": row[bad[0]],
                    "key": bad[0],
                    "final": final_metrics(row),
                    "wall_s": time.perf_counter() - t0,
                }
    return {"status": "completed", "final": final_metrics(last), "wall_s": time.perf_counter() - t0}


def method_line(name: str, result: dict) -> str:
    """One line per finished method: status, time, and its credit's final cosine."""
    f = result["final"]
    prefix = "bridge_cos" if "bridge_cos/mean" in f else "cos"
    line = f"{name}: {result['status']} in {result['wall_s']:.0f} s"
    if result["status"] != "completed":
        line += f" (step {result['step']}, {result['key']} = {result['value']})"
    return line + f"; final {prefix} mean {f[prefix + '/mean']:.3f}, min {f[prefix + '/min']:.3f}"


def broadcast_baseline(P: ToyLQParams, device: torch.device) -> dict:
    """cos/rho of the broadcast credit g_l = g_L against the exact costate, on the initial toy."""
    net = ToyLQ(P.d_hidden, P.num_layers, P.theta, P.seed).to(device)
    probe = Probe(net, P, torch.Generator(device=device).manual_seed(P.seed + 1))
    hs = net.trajectory(probe.x)
    true = exact_costates(net.M, hs, probe.y)
    L = P.num_layers
    bc = metrics.broadcast_credits(true[-1], L)
    out = per_layer("cos", metrics.cosine_per_layer(bc, true[:L]))
    out |= per_layer("rho", metrics.rho_per_layer(bc, true[:L]))
    return out | summarize(out, "cos")


def run_toy(
    P: ToyLQParams,
    run_dir: str | Path | None = None,
    progress: bool = True,
    profile: str | None = None,
) -> ToyResult:
    """The whole Phase A experiment: every method of P.methods on the seeded toy (frozen, or
    training the M_l when P.train_forward), logged every P.log_every steps. With a run_dir it
    writes the run record of DESIGN §8 (params.yaml, provenance.json, metrics.jsonl, summary.json)."""
    with cpu_threads(P.num_threads):
        return _run_toy(P, run_dir, progress, profile)


def _run_toy(P: ToyLQParams, run_dir, progress: bool, profile: str | None) -> ToyResult:
    device = resolve_device(P.device)
    result = ToyResult(run_dir=Path(run_dir) if run_dir is not None else None)
    record = None
    if run_dir is not None:
        record = RunRecord(run_dir, P, experiment="toy_lq", profile=profile, device=str(device))
        record.metrics_path.unlink(missing_ok=True)  # a rerun replaces the record, not appends

    def log(row: dict) -> None:
        result.rows.append(row)
        if record is not None:
            record.log(row)

    baseline = broadcast_baseline(P, device)
    methods = {}
    for name in P.methods:
        methods[name] = run_method(name, P, device, log, progress)
        if progress:
            tqdm.write(method_line(name, methods[name]))
    status = (
        "completed" if all(m["status"] == "completed" for m in methods.values()) else "diverged"
    )
    result.summary = {"methods": methods, "baseline": baseline, "train_forward": P.train_forward}
    if record is not None:
        record.write_summary(result.summary, status=status)
        result.summary = {"status": status, **result.summary}
    return result


# --- tables and curves for the notebook (figures: cbcore.plots, toy LQ section)

ABLATIONS_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_lq_ablations.json"


def layer_curves(rows: list[dict], prefix: str) -> dict[str, tuple[list[int], list[list[float]]]]:
    """method -> (steps, [layer][step]) of a per-layer metric (`cos`, `bridge_softcos`, ...)."""
    out: dict[str, tuple[list[int], list[list[float]]]] = {}
    for row in rows:
        vals = [row[k] for k in sorted(row) if k.startswith(prefix + "/layer_")]
        if not vals:
            continue
        steps, layers = out.setdefault(row["method"], ([], [[] for _ in vals]))
        steps.append(row["step"])
        for l, v in enumerate(vals):
            layers[l].append(v)
    return out


def alignment_curves(rows: list[dict], metric: str = "cos") -> dict:
    """Panels for `cbcore.plots.toy_layer_curves`: each method's credit (`cos` or `rho` against
    the exact costate), the credit bridge's pure credit ∇V_φ, and the broadcast baseline."""
    curves = layer_curves(rows, metric)
    bridge = layer_curves(rows, f"bridge_{metric}")
    for name, c in bridge.items():
        curves[f"{name} (∇V_φ)"] = c
    base = layer_curves(rows, f"broadcast_{metric}")
    if base:
        curves["broadcast"] = next(iter(base.values()))
    return curves


def metric_curves(rows: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """method -> (steps, values) of one logged scalar (`train/loss`, `cos/mean`, ...)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        value = row.get(key)
        if value is None and key.endswith("/mean"):
            value = summarize(row, key[: -len("/mean")]).get(key)
        if value is not None:
            steps, vals = out.setdefault(row["method"], ([], []))
            steps.append(row["step"])
            vals.append(value)
    return out


FINAL_COLUMNS = (
    ("cos", "cos"),
    ("rho", "rho"),
    ("bridge_cos", "∇V_φ cos"),
    ("bridge_rho", "∇V_φ rho"),
    ("bridge_softcos", "∇V_φ cos vs soft"),
)


def final_table(summary: dict) -> list[dict]:
    """One row per layer: the broadcast baseline and every method's final cos/rho against the
    exact costate (for the credit bridge also its pure credit ∇V_φ, and that against ∇V_soft)."""
    base = summary.get("baseline", {})
    methods = summary.get("methods", {})
    L = sum(1 for k in base if k.startswith("cos/layer_"))
    table = []
    for l in range(L):
        row: dict = {
            "layer": l,
            "broadcast cos": base[layer_key("cos", l)],
            "broadcast rho": base[layer_key("rho", l)],
        }
        for name, m in methods.items():
            final = m.get("final", {})
            for prefix, label in FINAL_COLUMNS:
                if layer_key(prefix, l) in final:
                    row[f"{name} {label}"] = final[layer_key(prefix, l)]
        table.append(row)
    return table


def ablation_table(path: str | Path = ABLATIONS_PATH) -> list[dict]:
    """The measured ablations of the credit bridge's value net on the frozen toy, written by
    `python benchmarks/toy_lq_alignment.py --ablations`: one row per variant."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [{"variant": r["variant"], "change": r["change"], **r["results"]} for r in data["rows"]]


@torch.no_grad()
def known_answer_checks(P: ToyLQParams, n_mc: int = 20_000, batch: int = 4) -> list[dict]:
    """Per layer, on the seeded toy: the largest relative error of the closed-form costate
    against autograd, and the closed-form soft value against a Monte Carlo of
    −λ log E exp(−ℓ/λ) over n_mc noisy rollouts (difference and MC standard error; at
    layer L there is no noise left, so the MC is exact)."""
    net = ToyLQ(P.d_hidden, P.num_layers, P.theta, P.seed)
    gen = torch.Generator().manual_seed(P.seed + 3)
    x, y = net.sample(batch, gen)
    hs, true, _, _ = metrics.true_gradients(net, x, y)
    closed = exact_costates(net.M, hs, y)
    V, _ = soft_values(net.M, hs, y, P.sigma_bridge, P.lam)
    table = []
    for l in range(P.num_layers + 1):
        rel = ((closed[l] - true[l]).norm(dim=-1) / true[l].norm(dim=-1)).max()
        mc, se = soft_value_mc(net.M, hs[l], y, l, P.sigma_bridge, P.lam, n_mc, gen)
        table.append(
            {
                "layer": l,
                "costate rel err (vs autograd)": float(rel),
                "soft V (closed form)": float(V[l].mean()),
                "soft V (MC)": float(mc.mean()),
                "max |closed − MC|": float((V[l].double() - mc).abs().max()),
                "MC std error": float(se.max()),
            }
        )
    return table
