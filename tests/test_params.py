"""Params: the shipped files load; every error kind names the file and the key (item 6)."""

from __future__ import annotations

import dataclasses

import pytest

from cbcore.params import (
    EXPERIMENTS,
    CifarParams,
    ParamsError,
    ToyLQParams,
    load_params,
    parse_override,
    save_params,
)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shipped_files_hold_the_seed_key_parameters():
    toy = load_params("toy_lq")
    assert (toy.d_hidden, toy.num_layers, toy.num_steps, toy.sigma_bridge, toy.lam, toy.K) == (
        64,
        12,
        8000,
        0.1,
        0.1,
        8,
    )
    assert (toy.term_grad_weight, toy.fm_weight, toy.ema_momentum, toy.lr_fb) == (
        1.0,
        0.0,
        0.995,
        1e-3,
    )
    assert toy.train_forward is False
    c = load_params("cifar10")
    assert (c.d_hidden, c.num_blocks, c.epochs, c.sigma_bridge, c.lam, c.K) == (
        512,
        12,
        100,
        0.05,
        0.1,
        4,
    )
    assert (c.term_grad_weight, c.ema_momentum, c.lr_fb, c.warmup_frac) == (1.0, 0.995, 1e-3, 0.2)
    for exp in EXPERIMENTS:
        for profile in ("quick", "paper"):
            load_params(exp, profile)


def test_params_are_frozen_and_documented():
    p = load_params("toy_lq")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.lam = 0.5
    for cls in (ToyLQParams, CifarParams):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "toy_lq.yaml", "sigma_brige: 0.1\n")
    with pytest.raises(ParamsError) as e:
        load_params("toy_lq", params_dir=tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "'sigma_brige'" in msg and "did you mean 'sigma_bridge'" in msg


def test_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path, "cifar10.yaml", "num_blocks: twelve\n")
    with pytest.raises(ParamsError) as e:
        load_params("cifar10", params_dir=tmp_path)
    assert str(path) in str(e.value) and "'num_blocks'" in str(e.value) and "int" in str(e.value)


def test_float_written_as_1e_minus_3_gets_a_hint(tmp_path):
    write(tmp_path, "cifar10.yaml", "lr_fb: 1e-3\n")
    with pytest.raises(ParamsError, match=r"lr_fb.*1\.0e-3"):
        load_params("cifar10", params_dir=tmp_path)


def test_out_of_range_names_file_key_and_bound(tmp_path):
    path = write(tmp_path, "toy_lq.yaml", "ema_momentum: 1.5\n")
    with pytest.raises(ParamsError) as e:
        load_params("toy_lq", params_dir=tmp_path)
    assert (
        str(path) in str(e.value) and "'ema_momentum'" in str(e.value) and "< 1.0" in str(e.value)
    )


def test_bad_choice_names_file_key_and_choices(tmp_path):
    path = write(tmp_path, "cifar10.yaml", "methods: [bp, credit_brige]\n")
    with pytest.raises(ParamsError) as e:
        load_params("cifar10", params_dir=tmp_path)
    assert (
        str(path) in str(e.value)
        and "'methods'" in str(e.value)
        and "credit_bridge" in str(e.value)
    )


def test_profile_section_errors_name_the_profile_file(tmp_path):
    write(tmp_path, "toy_lq.yaml", "lam: 0.1\n")
    path = write(tmp_path, "profiles/quick.yaml", "toy_lq:\n  num_step: 5\n")
    with pytest.raises(ParamsError) as e:
        load_params("toy_lq", "quick", params_dir=tmp_path)
    assert str(path) in str(e.value) and "did you mean 'num_steps'" in str(e.value)


def test_missing_profile_lists_available(tmp_path):
    write(tmp_path, "profiles/quick.yaml", "toy_lq: {}\n")
    with pytest.raises(ParamsError, match=r"profile 'fast' not found.*quick"):
        load_params("toy_lq", "fast", params_dir=tmp_path)


def test_override_errors_and_parsing():
    assert parse_override("lr_fb=1e-3") == ("lr_fb", 1e-3)
    assert parse_override("methods=[bp, dfa]") == ("methods", ["bp", "dfa"])
    assert parse_override("train_forward=true") == ("train_forward", True)
    with pytest.raises(ParamsError, match="key=value"):
        parse_override("lam")
    with pytest.raises(ParamsError, match=r"override: unknown key 'lamda'.*'lam'"):
        load_params("toy_lq", overrides={"lamda": 0.2})


def test_unknown_experiment():
    with pytest.raises(ParamsError, match="did you mean 'toy_lq'"):
        load_params("toy_qlq")


def test_saved_params_load_back(tmp_path):
    import yaml

    p = load_params("cifar10", "quick", {"lam": 0.25})
    save_params(p, tmp_path / "params.yaml")
    back = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert CifarParams(**back) == p
