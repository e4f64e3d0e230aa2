"""cbcore.checkpoint: atomic writes, weights_only reads, clear errors, exact RNG and method state."""

from __future__ import annotations

import pytest
import torch

from cbcore import checkpoint as ck
from cbcore.methods import make_method
from cbcore.model import ResMLP
from cbcore.params import CifarParams
from cbcore.train import make_optimizer, train_step


def state(value: float = 1.0) -> dict:
    return {"format": ck.FORMAT, "w": torch.full((3,), value), "epoch": 2, "names": ["a", "b"],
            "nested": {"t": (1, 2.5), "none": None}}


def test_roundtrip_weights_only_leaves_no_temp_files(tmp_path):
    path = ck.last_path(tmp_path, "dfa")
    ck.save_checkpoint(state(), path)
    ck.save_checkpoint(state(2.0), path)  # overwrite
    got = ck.load_checkpoint(path)
    assert torch.equal(got["w"], torch.full((3,), 2.0))
    assert got["names"] == ["a", "b"] and got["nested"] == {"t": (1, 2.5), "none": None}
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save_checkpoint(state(1.0), path)

    def half_write(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unreadable_and_foreign_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match=r"last\.pt: unreadable checkpoint.*delete it"):
        ck.load_checkpoint(bad)
    torch.save({"format": 99}, bad)
    with pytest.raises(ck.CheckpointError, match=r"format 99, expected 1"):
        ck.load_checkpoint(bad)


class Foreign:
    """An arbitrary class: unpickling it would mean running code from the file."""


def test_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "obj": Foreign()}, path)
    with pytest.raises(ck.CheckpointError, match="unreadable"):
        ck.load_checkpoint(path)


def test_generator_states_restore_the_same_draws():
    g = torch.Generator().manual_seed(5)
    torch.randn(4, generator=g)
    saved = ck.generator_states({"data": g})
    a, a_global = torch.randn(4, generator=g), torch.randn(2)
    torch.randn(9, generator=g)
    torch.randn(9)
    ck.restore_generator_states(saved, {"data": g})
    assert torch.equal(torch.randn(4, generator=g), a) and torch.equal(torch.randn(2), a_global)


def test_snapshots_lists_kept_epochs(tmp_path):
    for e in (10, 2):
        ck.save_checkpoint(state(), ck.snapshot_path(tmp_path, "bp", e))
    ck.save_checkpoint(state(), ck.last_path(tmp_path, "bp"))
    assert ck.snapshots(tmp_path, "bp") == [2, 10]
    assert ck.snapshots(tmp_path, "dfa") == []


@pytest.mark.parametrize("name", ["state_bridge", "credit_bridge"])
def test_method_state_through_a_checkpoint_continues_bit_exactly(tmp_path, name):
    """Feedback nets, EMA targets, Adam state and the noise generator all travel in the
    method's state_dict: a method rebuilt from a checkpoint takes the same next step."""
    P = CifarParams(fb_hidden=16, fb_depth=1, value_rank=4, K=2, warmup_frac=0.0, blend_frac=0.0)
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))

    def build():
        torch.manual_seed(1)
        net = ResMLP(12, 5, 16, 3, mlp_ratio=2)
        method = make_method(name, net, P)
        opt, sched = make_optimizer(net, 1.0e-3, 0.0, 10)
        return net, method, opt, sched

    net, method, opt, sched = build()
    for step in range(3):
        train_step(net, method, opt, x, y, step, 10, sched)
    ck.save_checkpoint({"format": ck.FORMAT, "model": net.state_dict(),
                        "method": method.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict()}, tmp_path / "c.pt")
    after = train_step(net, method, opt, x, y, 3, 10, sched)

    net2, method2, opt2, sched2 = build()
    saved = ck.load_checkpoint(tmp_path / "c.pt")
    net2.load_state_dict(saved["model"])
    method2.load_state_dict(saved["method"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    again = train_step(net2, method2, opt2, x, y, 3, 10, sched2)
    assert torch.equal(after.credits, again.credits)
    for (k, a), b in zip(method.state_dict().items(), method2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
