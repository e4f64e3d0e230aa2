"""Phase B: the CIFAR-10 experiment loop (DESIGN §6).

One call of `run_cifar(P, run_dir)` is one seed: it trains every method of `P.methods` in
turn, each from the same initialization (the net is built under `torch.manual_seed(P.seed)`)
and the same data order (a data generator seeded from `P.seed`), and writes the record of
DESIGN §8 into `run_dir`:

    metrics.jsonl   per epoch {"method", "epoch", "step", "train/loss", "train/acc",
                    "test/acc", "train/lr", "time/epoch_s" (training + test evaluation),
                    <method logs: feedback losses as epoch means, α at the epoch's end>}, and every
                    `diag_every` epochs (and at epochs 0 and the last) a diagnostics row
                    {"method", "epoch", "step", "cos/layer_00", ...} (cbcore.metrics.diagnose)
    summary.json    per method: status (completed | diverged), final metrics, divergence
    checkpoints/    per method: last.pt after every epoch (the resume point), kept snapshots

Re-running the same run directory resumes: finished methods are skipped, an interrupted one
continues from its last checkpoint, and metric rows logged after that checkpoint are dropped
first, so the record has no duplicates and matches an uninterrupted run.

The loop never syncs with the host inside an epoch except to refresh the progress bar's
postfix a few times: loss, correct predictions and the first non-finite loss are accumulated
on the device and read once per epoch.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cbcore import checkpoint as ck
from cbcore.data import DeviceLoader, ImageData, load_data, normalize
from cbcore.methods import CreditMethod, make_method
from cbcore.metrics import diagnose
from cbcore.model import ResMLP
from cbcore.params import CifarParams, to_dict
from cbcore.records import RunRecord, read_metrics
from cbcore.train import make_optimizer, train_step

EXPERIMENT = "cifar10"
NUM_THREADS_VAR = "CBCORE_NUM_THREADS"
# Params that may change between a run and its resume without changing what was trained.
RESUME_FREE = ("methods", "data_dir", "diag_every", "diag_batch", "keep_ckpt_every")


class ResumeError(RuntimeError):
    """A run directory's checkpoints cannot continue with these params; says what differs."""


def setup_device(spec: str = "auto") -> torch.device:
    """Resolve a `device` param (auto → cuda if available, else cpu) and apply the thread
    count from $CBCORE_NUM_THREADS (set by the batch runner when runs share the CPU)."""
    threads = os.environ.get(NUM_THREADS_VAR)
    if threads:
        try:
            torch.set_num_threads(int(threads))
        except ValueError as e:
            raise ValueError(f"${NUM_THREADS_VAR}={threads!r}: expected a thread count") from e
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {spec!r} but CUDA is not available here; use device: auto or cpu")
    return device


def prepare_data(P: CifarParams, device: torch.device, *, allow_download: bool = True) -> ImageData:
    """The data set on `device`; with `max_train` > 0 a fixed random subset of the training
    split (seed 0: the same subset for every seed, whatever the file order)."""
    data = load_data(P.dataset, P.data_dir, device, allow_download=allow_download)
    return subset_train(data, P.max_train)


def subset_train(data: ImageData, max_train: int) -> ImageData:
    if max_train <= 0 or max_train >= len(data.train_y):
        return data
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train_y), generator=g)[:max_train].to(data.train_x.device)
    return replace(data, train_x=data.train_x[idx], train_y=data.train_y[idx])


def build_net(P: CifarParams, data: ImageData, device: torch.device | str = "cpu") -> ResMLP:
    """The residual MLP, initialized from P.seed alone (built on the CPU, so every method and
    every device starts from the same weights); the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(P.seed)
        net = ResMLP(data.input_dim, data.num_classes, P.d_hidden, P.num_blocks, P.mlp_ratio)
    return net.to(device)


def build_method(name: str, net: ResMLP, P: CifarParams, device: torch.device) -> CreditMethod:
    with torch.random.fork_rng(devices=[]):  # method factories draw from their own generators
        method = make_method(name, net, P)
    return method.to(device)


def diagnostic_batch(P: CifarParams, data: ImageData) -> tuple[Tensor, Tensor]:
    """The fixed diagnostic batch: `diag_batch` training examples (unaugmented), chosen by
    P.seed, the same for every method and epoch."""
    g = torch.Generator().manual_seed(P.seed)
    n = min(P.diag_batch, len(data.train_y))
    idx = torch.randperm(len(data.train_y), generator=g)[:n].to(data.train_x.device)
    return normalize(data.train_x[idx], data.mean, data.std), data.train_y[idx]


def autocast(P: CifarParams, device: torch.device):
    """bf16 autocast for the forward passes when `amp_bf16` (diagnostics stay in float32)."""
    if not P.amp_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(net: ResMLP, loader: DeviceLoader) -> float:
    """Accuracy over every example of the loader (one host sync, at the end)."""
    correct = torch.zeros((), dtype=torch.int64, device=loader.x.device)
    n = 0
    for x, y in loader:
        h = net.embed(x)
        for l in range(net.num_layers):
            h = net.block(l, h)
        correct += (net.output(h).argmax(-1) == y).sum()
        n += len(y)
    return correct.item() / max(n, 1)


def maybe_compile(net: ResMLP, P: CifarParams) -> None:
    """`compile`: torch.compile the block forwards (per-layer `block` with a dynamic layer
    index, and the layer-batched `step_all` the bridges use)."""
    if P.compile:
        # bp's block VJPs and the bridge's double backward retain graphs, which donated
        # buffers forbid
        torch._functorch.config.donated_buffer = False
        net.block = torch.compile(net.block, dynamic=True)
        net.step_all = torch.compile(net.step_all)


@dataclass
class MethodState:
    """Everything that changes while one method trains: what a checkpoint holds."""

    name: str
    net: ResMLP
    method: CreditMethod
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    data_gen: torch.Generator  # data order and augmentation (DeviceLoader draws both from it)
    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    result: dict = field(default_factory=lambda: {"status": "running"})

    def checkpoint(self, P: CifarParams, device: torch.device, done: bool) -> dict:
        return {
            "format": ck.FORMAT, "method": self.name, "epoch": self.epoch, "step": self.step,
            "done": done, "result": self.result, "params": to_dict(P), "device": device.type,
            "model": self.net.state_dict(), "method_state": self.method.state_dict(),
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": ck.generator_states({"data": self.data_gen}),
        }

    def snapshot(self, P: CifarParams) -> dict:
        """A kept epoch for the diagnostics notebook: model and method, no optimizer."""
        return {"format": ck.FORMAT, "method": self.name, "epoch": self.epoch,
                "step": self.step, "done": False, "result": self.result, "params": to_dict(P),
                "model": self.net.state_dict(), "method_state": self.method.state_dict()}

    def restore(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.method.load_state_dict(state["method_state"])
        if "optimizer" in state:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            ck.restore_generator_states(state["rng"], {"data": self.data_gen})
        self.epoch, self.step, self.result = state["epoch"], state["step"], state["result"]


def new_state(name: str, P: CifarParams, data: ImageData, device: torch.device,
              total_steps: int) -> MethodState:
    net = build_net(P, data, device)
    method = build_method(name, net, P, device)
    opt, sched = make_optimizer(net, P.lr, P.weight_decay, total_steps)
    data_gen = torch.Generator(device=device).manual_seed(P.seed)
    return MethodState(name, net, method, opt, sched, data_gen)


def check_resumable(state: dict, P: CifarParams, device: torch.device, path: Path) -> None:
    """A checkpoint continues only the run it came from: same params (bar RESUME_FREE)."""
    old, new = state.get("params", {}), to_dict(P)
    defaults = to_dict(type(P)())  # a key the checkpoint predates had its default value
    diff = [f"{k}: {old.get(k, defaults[k])!r} → {new[k]!r}" for k in new
            if k not in RESUME_FREE and old.get(k, defaults[k]) != new[k]]
    if diff:
        raise ResumeError(f"{path}: made with other params ({'; '.join(diff)}); resume with "
                          "the same params, or use a new run_dir (or delete its checkpoints/)")
    if not state["done"] and state.get("device") != device.type:
        raise ResumeError(f"{path}: made on {state.get('device')}, resuming on {device.type}; "
                          "resume on the same kind of device, or use a new run_dir")


def mean_cos(diag: dict) -> float:
    vals = [v for k, v in diag.items() if k.startswith("cos/layer_")]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass
class CifarResult:
    """What `run_cifar` returns: the run directory, summary entries and all metric rows."""

    run_dir: Path
    methods: dict[str, dict]  # name -> {"status", "final", "diverged"?}
    rows: list[dict]


def train_method(ms: MethodState, P: CifarParams, data: ImageData, device: torch.device,
                 record: RunRecord, run_dir: Path, *, progress: bool = True,
                 verbose: bool = True,
                 on_epoch_end: Callable[[dict], None] | None = None) -> dict:
    """Train one method from its state to the end (or to divergence); returns its result."""
    train = DeviceLoader(data, P.batch_size, train=True, augment=P.augment, generator=ms.data_gen)
    test = DeviceLoader(data, max(P.batch_size, 1024), train=False, augment=False,
                        generator=ms.data_gen, drop_last=False)
    total_steps = P.epochs * len(train)
    x_diag, y_diag = diagnostic_batch(P, data)
    say = tqdm.write if verbose else (lambda *_: None)

    def diagnostics() -> dict:
        t0 = time.perf_counter()
        d = diagnose(ms.net, ms.method, x_diag, y_diag, step=ms.step, total_steps=total_steps,
                     seed=P.seed)
        row = {"method": ms.name, "epoch": ms.epoch, "step": ms.step, **d,
               "time/diag_s": time.perf_counter() - t0}
        record.log(row)
        ms.result["last_diag"] = {"epoch": ms.epoch, "cos/mean": mean_cos(d)}
        return row

    if ms.epoch == 0:
        diagnostics()  # the initial alignment, before any update
    postfix_every = max(1, len(train) // 10)
    while ms.epoch < P.epochs:
        epoch = ms.epoch + 1
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        bad_step = torch.full((), -1, dtype=torch.int64, device=device)  # first non-finite loss
        bad_value = torch.zeros((), device=device)
        fb_sums: dict[str, Tensor] = {}
        schedules: dict[str, float] = {}
        bar = tqdm(train, desc=f"{ms.name} {epoch}/{P.epochs}", leave=False, disable=not progress)
        for i, (x, y) in enumerate(bar):
            with autocast(P, device):
                res = train_step(ms.net, ms.method, ms.opt, x, y, ms.step, total_steps, ms.sched)
            loss = res.loss.float()
            first = ~torch.isfinite(loss) & (bad_step < 0)
            bad_step = torch.where(first, ms.step, bad_step)
            bad_value = torch.where(first, loss, bad_value)
            loss_sum += loss
            correct += res.correct
            for k, v in res.logs.items():
                if isinstance(v, Tensor):  # measurements: epoch mean
                    fb_sums[k] = fb_sums[k] + v.float() if k in fb_sums else v.float()
                else:  # host scalars are schedules (the bridge's α): value at the epoch's end
                    schedules[k] = float(v)
            ms.step += 1
            if progress and (i + 1) % postfix_every == 0:  # a host sync, 10 times an epoch
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}",
                                acc=f"{correct.item() / ((i + 1) * len(y)):.3f}")
        bar.close()
        n = len(train)
        train_loss = loss_sum.item() / n  # the epoch's one sync
        ms.epoch = epoch
        row = {"method": ms.name, "epoch": epoch, "step": ms.step, "train/loss": train_loss,
               "train/acc": correct.item() / (n * P.batch_size),
               "test/acc": evaluate(ms.net, test), "train/lr": ms.sched.get_last_lr()[0],
               "time/epoch_s": time.perf_counter() - t0,
               **{k: v.item() / n for k, v in fb_sums.items()}, **schedules}
        record.log(row)
        ms.result["final"] = {"test/acc": row["test/acc"], "train/acc": row["train/acc"],
                              "train/loss": train_loss, "epoch": epoch}
        diverged = int(bad_step.item()) >= 0
        if diverged:
            ms.result["status"] = "diverged"
            ms.result["diverged"] = {"step": int(bad_step.item()), "value": bad_value.item()}
            say(f"{ms.name}: non-finite loss {bad_value.item()} at step {int(bad_step.item())}"
                f" (epoch {epoch}); marked diverged, going on with the next method")
        elif epoch % P.diag_every == 0 or epoch == P.epochs:
            diagnostics()
        say(f"{ms.name} epoch {epoch}/{P.epochs}: loss {train_loss:.4f}  "
            f"train {row['train/acc']:.4f}  test {row['test/acc']:.4f}  "
            f"{row['time/epoch_s']:.1f} s")
        done = diverged or epoch == P.epochs
        if done and not diverged:
            ms.result["status"] = "completed"
        if done:
            ms.result["final"]["cos/mean"] = ms.result.get("last_diag", {}).get("cos/mean")
        ck.save_checkpoint(ms.checkpoint(P, device, done), ck.last_path(run_dir, ms.name))
        if P.keep_ckpt_every and epoch % P.keep_ckpt_every == 0:
            ck.save_checkpoint(ms.snapshot(P), ck.snapshot_path(run_dir, ms.name, epoch))
        if on_epoch_end is not None:
            on_epoch_end(row)
        if done:
            break
    return ms.result


def run_cifar(P: CifarParams, run_dir: str | Path, *, profile: str | None = None,
              data: ImageData | None = None, progress: bool = True, verbose: bool = True,
              on_epoch_end: Callable[[dict], None] | None = None) -> CifarResult:
    """Train each method of P.methods in turn (same init, same data order) and record it all
    in run_dir; resume whatever a previous call of the same run_dir left unfinished.

    `data`: an already loaded data set (tests, benchmarks); loaded from P otherwise.
    `progress`: a tqdm bar per epoch; `verbose`: one line per epoch.
    `on_epoch_end(row)`: called after each epoch's checkpoint is written.
    """
    run_dir = Path(run_dir)
    device = setup_device(P.device)
    if data is None:
        data = prepare_data(P, device)
    else:
        data = subset_train(data, P.max_train)
    record = RunRecord(run_dir, P, experiment=EXPERIMENT, profile=profile, device=str(device))

    saved: dict[str, dict] = {}
    for name in P.methods:
        path = ck.last_path(run_dir, name)
        if path.exists():
            saved[name] = ck.load_checkpoint(path, map_location=device)
            check_resumable(saved[name], P, device, path)
    done_epoch = {name: saved[name]["epoch"] if name in saved else -1 for name in P.methods}
    record.drop_rows(lambda r: r.get("method") in done_epoch
                     and r.get("epoch", 0) > done_epoch[r["method"]])

    results: dict[str, dict] = {}
    steps_per_epoch = len(data.train_y) // P.batch_size
    for name in P.methods:
        state = saved.get(name)
        if state is not None and state["done"]:
            results[name] = state["result"]
            if verbose:
                tqdm.write(f"{name}: already {state['result']['status']} (checkpoint), skipped")
            continue
        ms = new_state(name, P, data, device, P.epochs * steps_per_epoch)
        maybe_compile(ms.net, P)
        if state is not None:
            ms.restore(state)
            if verbose:
                tqdm.write(f"{name}: resuming after epoch {ms.epoch} from {ck.last_path(run_dir, name)}")
        results[name] = train_method(ms, P, data, device, record, run_dir, progress=progress,
                                     verbose=verbose, on_epoch_end=on_epoch_end)
        del ms
        if device.type == "cuda":
            torch.cuda.empty_cache()

    methods = {name: summary_entry(r) for name, r in results.items()}
    record.write_summary({"methods": methods}, status="completed")
    return CifarResult(run_dir, methods, read_metrics(run_dir))


def summary_entry(result: dict) -> dict:
    out = {"status": result["status"], "final": result.get("final", {})}
    if "diverged" in result:
        out["diverged"] = result["diverged"]
    return out


def load_trained(run_dir: str | Path, method: str, epoch: int | None = None,
                 device: torch.device | str = "cpu", data: ImageData | None = None):
    """(P, net, credit method) as of a run's checkpoint: the latest (`epoch=None`) or a kept
    snapshot — for the diagnostics notebook. Data is loaded from P unless given."""
    from cbcore.params import params_from_dict

    path = ck.last_path(run_dir, method) if epoch is None else ck.snapshot_path(run_dir, method, epoch)
    if not path.exists():
        kept = ck.snapshots(run_dir, method)
        raise FileNotFoundError(f"{path}: no checkpoint; kept epochs for {method}: {kept}")
    device = torch.device(device)
    state = ck.load_checkpoint(path, map_location=device)
    P = params_from_dict(EXPERIMENT, state["params"], str(path))
    data = data if data is not None else prepare_data(P, device)
    net = build_net(P, data, device)
    meth = build_method(method, net, P, device)
    net.load_state_dict(state["model"])
    meth.load_state_dict(state["method_state"])
    return P, net, meth


# --- tables and curves for the notebook (plots take these)


def epoch_curves(rows: list[dict], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """method -> (epochs, values) of one metric, from the rows that have it."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        if key in r and "method" in r:
            v = r[key]
            epochs, vals = out.setdefault(r["method"], ([], []))
            epochs.append(r["epoch"])
            vals.append(float(v))  # non-finite values are stored as strings ("nan")
    return out


def layer_curves(rows: list[dict], prefix: str = "cos") -> dict[str, tuple[list[int], list[list[float]]]]:
    """method -> (epochs, per-layer values [layer][epoch]) of a per-layer diagnostic."""
    out: dict[str, tuple[list[int], list[list[float]]]] = {}
    for r in rows:
        keys = sorted(k for k in r if k.startswith(f"{prefix}/layer_"))
        if not keys or "method" not in r:
            continue
        epochs, layers = out.setdefault(r["method"], ([], [[] for _ in keys]))
        epochs.append(r["epoch"])
        for layer, k in zip(layers, keys):
            layer.append(r[k])
    return out


def final_table(result: CifarResult) -> list[dict]:
    """One row per method: status, final test/train accuracy, mean cosine, divergence."""
    table = []
    for name, m in result.methods.items():
        f = m.get("final", {})
        table.append({"method": name, "status": m["status"], "epochs": f.get("epoch"),
                      "test/acc": f.get("test/acc"), "train/acc": f.get("train/acc"),
                      "cos/mean": f.get("cos/mean"),
                      "diverged at step": m.get("diverged", {}).get("step")})
    return table


def format_table(table: list[dict]) -> str:
    """Plain-text table of `final_table` rows (numbers to 4 places)."""
    if not table:
        return ""
    cols = list(table[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r[c]) for c in cols] for r in table]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
