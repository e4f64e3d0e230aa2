"""Checkpoints of a run directory: written atomically, read with `weights_only=True`.

    run_dir/checkpoints/<method>/last.pt        the resume point: written after every epoch
                                                and when the method ends (`done`)
    run_dir/checkpoints/<method>/epoch_005.pt   a kept snapshot (model + method, no optimizer)

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (state_dicts of
the model, the method — its feedback nets, EMA targets, feedback matrices, Adam state and
noise generator — the optimizer and scheduler, RNG states), so `torch.load(weights_only=True)`
reads it without unpickling code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
FORMAT = 1  # bump when the layout of a checkpoint dict changes
_SNAPSHOT = re.compile(r"epoch_(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not belong to this run; the message names the file."""


def method_dir(run_dir: str | Path, method: str) -> Path:
    return Path(run_dir) / CKPT_DIR / method


def last_path(run_dir: str | Path, method: str) -> Path:
    """The resume checkpoint of one method."""
    return method_dir(run_dir, method) / "last.pt"


def snapshot_path(run_dir: str | Path, method: str, epoch: int) -> Path:
    return method_dir(run_dir, method) / f"epoch_{epoch:03d}.pt"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a reader (or a resume after
    a kill) sees the old checkpoint or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with weights_only=True; errors name the file and what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types on a truncated or foreign file
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {why}); delete it to restart "
            "this method from scratch") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {found!r}, expected {FORMAT}; "
                              "it was written by another cbcore version — use a new run_dir")
    return state


def snapshots(run_dir: str | Path, method: str) -> list[int]:
    """Epochs with a kept snapshot for one method, ascending."""
    d = method_dir(run_dir, method)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for f in d.iterdir() if (m := _SNAPSHOT.fullmatch(f.name)))


def generator_states(generators: dict[str, torch.Generator]) -> dict:
    """RNG states to store: the named generators and torch's global ones (CPU, CUDA)."""
    out = {name: g.get_state() for name, g in generators.items()}
    out["torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_generator_states(states: dict, generators: dict[str, torch.Generator]) -> None:
    """Inverse of `generator_states` (the CUDA states only where CUDA is in use)."""
    for name, g in generators.items():
        g.set_state(states[name])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
