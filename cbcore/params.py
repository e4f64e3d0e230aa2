"""Parameters: frozen dataclasses loaded from YAML, validated before any work starts.

An experiment's parameters are the dataclass defaults, overlaid by `params/<experiment>.yaml`,
then by the experiment's section of `params/profiles/<profile>.yaml`, then by explicit
overrides (`--set key=value`). Every layer is checked: an unknown key (with a did-you-mean),
a wrong type or an out-of-range value is a `ParamsError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAMS_DIR = Path(__file__).resolve().parents[1] / "params"


class ParamsError(ValueError):
    """A parameter file or override is wrong; the message names the source and the key."""


def p(default: Any, doc: str, *, ge=None, gt=None, le=None, lt=None, choices=None):
    """Declare one parameter: default, a one-line doc (with unit), and its allowed range."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


METHOD_NAMES = ("bp", "dfa", "state_bridge", "credit_bridge")


@dataclass(frozen=True)
class CreditParams:
    """Hyperparameters shared by every credit method (the seed guide's vocabulary)."""

    seed: int = p(42, "random seed for init, data order, noise and feedback matrices")
    methods: list = p(list(METHOD_NAMES), "credit methods to run, in order", choices=METHOD_NAMES)
    sigma_bridge: float = p(
        0.05, "bridge noise std (state units), anchors and continuations", ge=0.0
    )
    lam: float = p(0.1, "soft-min temperature of the credit-bridge target (loss units)", gt=0.0)
    K: int = p(4, "continuations per anchor for the bridge target", ge=1)
    num_anchors: int = p(2, "anchors per state, the clean state included", ge=1)
    term_grad_weight: float = p(1.0, "weight of terminal value-gradient matching", ge=0.0)
    fm_weight: float = p(0.0, "weight of final-loss (Monte-Carlo) value matching", ge=0.0)
    gate_err: float = p(
        0.0,
        "if > 0: blend the bridge credit per layer, trusted as far as the local-difference error of it and every later layer is below gate_err (needs cont_weight > 0; 0: the seed's global blend)",
        ge=0.0,
    )
    cont_weight: float = p(
        0.0,
        "weight of the local-difference match of V at the continuations' inputs a+σξ_k to their values c_k (0: the seed's estimator)",
        ge=0.0,
    )
    ema_momentum: float = p(0.995, "EMA momentum of the bridges' target nets", ge=0.0, lt=1.0)
    lr_fb: float = p(1.0e-3, "Adam learning rate of the feedback networks", gt=0.0)
    fb_hidden: int = p(
        256, "hidden width of the feedback networks (value net, state predictor)", ge=1
    )
    fb_depth: int = p(2, "hidden layers of the feedback networks", ge=1)
    value_quadratic: bool = p(True, "value net has a per-layer quadratic term ½‖A h + C y + b‖²/r")
    value_rank: int = p(64, "rank r of the value net's quadratic term", ge=1)
    value_mlp: bool = p(
        True, "value net has the MLP term MLP([h, y]) (false: quadratic term + per-layer offset)"
    )
    warmup_frac: float = p(
        0.2, "fraction of training where credit_bridge uses DFA credits", ge=0.0, le=1.0
    )
    blend_frac: float = p(
        0.1, "fraction of training for the linear DFA→bridge blend", ge=0.0, le=1.0
    )
    dfa_scale: float = p(
        1.0, "scale of the DFA feedback matrices (entries N(0, dfa_scale²/C))", gt=0.0
    )
    fb_batch_frac: float = p(
        1.0, "fraction of the batch the feedback nets train on per step", gt=0.0, le=1.0
    )


@dataclass(frozen=True)
class ToyLQParams(CreditParams):
    """Phase A: linear-quadratic toy with closed-form answers (DESIGN §5)."""

    d_hidden: int = p(64, "state dimension d", ge=1)
    num_layers: int = p(12, "number of linear layers L", ge=1)
    theta: float = p(0.6, "rotation strength: M_l = exp(theta·S_l), S_l random skew", ge=0.0)
    num_steps: int = p(8000, "training steps", ge=1)
    batch_size: int = p(256, "examples per step", ge=1)
    train_forward: bool = p(False, "train the M_l (true) or freeze them and probe credits (false)")
    lr: float = p(1.0e-3, "AdamW learning rate of the M_l when train_forward", gt=0.0)
    weight_decay: float = p(0.0, "AdamW weight decay of the M_l", ge=0.0)
    log_every: int = p(100, "steps between logged diagnostics", ge=1)
    eval_batch: int = p(512, "examples in the fixed diagnostic batch", ge=1)
    device: str = p("cpu", "torch device: cpu, cuda, or auto")
    num_threads: int = p(
        1, "torch CPU threads (0: torch's default; $CBCORE_NUM_THREADS from the runner wins)", ge=0
    )
    sigma_bridge: float = p(0.1, "bridge noise std (state units)", ge=0.0)
    K: int = p(8, "continuations per anchor for the bridge target", ge=1)


@dataclass(frozen=True)
class CifarParams(CreditParams):
    """Phase B: residual MLP on CIFAR-10 (DESIGN §6)."""

    dataset: str = p("cifar10", "data set", choices=("cifar10", "digits"))
    data_dir: str = p("data", "where data sets live and decoded caches are written")
    d_hidden: int = p(512, "residual stream width d", ge=1)
    num_blocks: int = p(12, "residual blocks L", ge=1)
    mlp_ratio: int = p(4, "block hidden width = mlp_ratio · d_hidden", ge=1)
    epochs: int = p(100, "training epochs per method", ge=1)
    batch_size: int = p(256, "examples per step", ge=1)
    lr: float = p(1.0e-3, "AdamW peak learning rate (cosine schedule)", gt=0.0)
    weight_decay: float = p(0.05, "AdamW weight decay", ge=0.0)
    augment: bool = p(True, "random crop (pad 4) and horizontal flip on the device")
    diag_every: int = p(5, "epochs between diagnostics on the fixed batch", ge=1)
    diag_batch: int = p(256, "examples in the fixed diagnostic batch", ge=1)
    keep_ckpt_every: int = p(
        0, "epochs between checkpoint snapshots kept for diagnostics (0: only the last)", ge=0
    )
    max_train: int = p(0, "if > 0, use only this many training examples", ge=0)
    device: str = p("auto", "torch device: auto, cpu or cuda")
    amp_bf16: bool = p(False, "bf16 autocast for the forward passes (GPU)")
    compile: bool = p(False, "torch.compile the block forward (GPU)")


EXPERIMENTS: dict[str, type] = {"toy_lq": ToyLQParams, "cifar10": CifarParams}
NOTEBOOKS: dict[str, str] = {"toy_lq": "toy_lq.ipynb", "cifar10": "cifar.ipynb"}


def param_docs(cls: type) -> dict[str, str]:
    """One-line doc of every parameter of a params class."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        return isinstance(value, list)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def check_value(cls: type, key: str, value: Any, source: str) -> Any:
    """Validate one key against the dataclass; return the (possibly coerced) value."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = (
            f" (did you mean '{close[0]}'?)"
            if close
            else f" (known keys: {', '.join(sorted(fields))})"
        )
        raise ParamsError(f"{source}: unknown key '{key}'{hint}")
    f = fields[key]
    hints = typing.get_type_hints(cls)
    tp = hints[key]
    if not _type_ok(value, tp):
        hint = ""
        if tp is float and isinstance(value, str):
            hint = " (YAML reads 1e-3 as text: write floats as 1.0e-3)"
        raise ParamsError(
            f"{source}: key '{key}' must be of type {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__}){hint}; {f.metadata.get('doc', '')}"
        )
    if tp is float:
        value = float(value)
    m = f.metadata
    bounds = [
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, ok, sym in bounds:
        b = m.get(name)
        if b is not None and not ok(value, b):
            raise ParamsError(
                f"{source}: key '{key}' = {value!r} is out of range (must be {sym} {b})"
            )
    choices = m.get("choices")
    if choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in choices:
                close = difflib.get_close_matches(str(item), list(choices), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ParamsError(
                    f"{source}: key '{key}' has invalid value {item!r}{hint}; choose from {list(choices)}"
                )
    return value


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key=value` override; the value is read as YAML (so 1e-3, true, [a, b] work)."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ParamsError(f"--set {text!r}: value is not valid YAML: {e}") from e
    if isinstance(value, str):  # YAML reads 1e-3 as a string; accept it as a float
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return key.strip(), value


def load_params(
    experiment: str,
    profile: str | None = None,
    overrides: dict | None = None,
    params_dir: str | Path | None = None,
) -> Any:
    """Resolve an experiment's parameters: defaults ← yaml ← profile ← overrides."""
    if experiment not in EXPERIMENTS:
        close = difflib.get_close_matches(experiment, list(EXPERIMENTS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamsError(f"unknown experiment '{experiment}'{hint}; known: {sorted(EXPERIMENTS)}")
    cls = EXPERIMENTS[experiment]
    pdir = Path(params_dir) if params_dir is not None else PARAMS_DIR
    values: dict[str, Any] = {}

    base = pdir / f"{experiment}.yaml"
    if base.exists():
        for k, v in _read_yaml(base).items():
            values[k] = check_value(cls, k, v, str(base))
    if profile is not None:
        ppath = pdir / "profiles" / f"{profile}.yaml"
        if not ppath.exists():
            avail = sorted(x.stem for x in (pdir / "profiles").glob("*.yaml"))
            raise ParamsError(f"{ppath}: profile '{profile}' not found; available: {avail}")
        section = _read_yaml(ppath).get(experiment) or {}
        if not isinstance(section, dict):
            raise ParamsError(f"{ppath}: section '{experiment}' must be a mapping")
        for k, v in section.items():
            values[k] = check_value(cls, k, v, f"{ppath} [{experiment}]")
    for k, v in (overrides or {}).items():
        values[k] = check_value(cls, k, v, "override")
    return cls(**values)


def params_from_dict(experiment: str, values: dict, source: str = "params") -> Any:
    """Build and validate an experiment's params from a full or partial dict."""
    cls = EXPERIMENTS[experiment]
    return cls(**{k: check_value(cls, k, v, source) for k, v in values.items()})


def to_dict(params: Any) -> dict:
    return dataclasses.asdict(params)


def save_params(params: Any, path: str | Path) -> None:
    """Write the resolved params as YAML, each key with its doc as a comment."""
    docs = param_docs(type(params))
    lines = [f"# resolved {type(params).__name__}"]
    for k, v in to_dict(params).items():
        lines.append(
            f"{yaml.safe_dump({k: v}, default_flow_style=True).strip()[1:-1]}  # {docs[k]}"
        )
    Path(path).write_text("\n".join(lines) + "\n")
