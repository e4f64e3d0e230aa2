"""cbcore.data: every source gives the same tensors, the cache, errors, augmentation, loader."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbcore import data as D
from cbcore.data import DeviceLoader, ImageData, augment, default_pad, load_data, normalize

CLASSES = ["airplane", "bird", "cat"]  # alphabetical, so folder and pickle indices agree
N_TRAIN, N_TEST = 4, 2  # per class


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # never write to ~/.cache


@pytest.fixture
def fake() -> dict[str, np.ndarray]:
    """Tiny CIFAR: 3 classes, 4 train + 2 test random 32×32 RGB images each, class-sorted."""
    rng = np.random.default_rng(0)
    return {
        "train_x": rng.integers(0, 256, (3 * N_TRAIN, 3, 32, 32), dtype=np.uint8),
        "train_y": np.repeat(np.arange(3), N_TRAIN),
        "test_x": rng.integers(0, 256, (3 * N_TEST, 3, 32, 32), dtype=np.uint8),
        "test_y": np.repeat(np.arange(3), N_TEST),
    }


def write_batches(d: Path, fake) -> Path:
    """The official format: dicts with b'data' (N, 3072) uint8 CHW rows and b'labels'."""
    d.mkdir(parents=True)
    parts = np.array_split(np.arange(len(fake["train_y"])), 5)
    for i, idx in enumerate(parts, 1):
        batch = {
            b"data": fake["train_x"][idx].reshape(len(idx), -1),
            b"labels": fake["train_y"][idx].tolist(),
        }
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {
        b"data": fake["test_x"].reshape(len(fake["test_y"]), -1),
        b"labels": fake["test_y"].tolist(),
    }
    (d / "test_batch").write_bytes(pickle.dumps(test))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CLASSES]}))
    return d


def write_folder(root: Path, fake, ext: str = ".png") -> Path:
    for split in ("train", "test"):
        for i, (img, y) in enumerate(zip(fake[f"{split}_x"], fake[f"{split}_y"])):
            f = root / split / CLASSES[y] / f"{i:04d}{ext}"
            f.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(f)  # (H, W, 3)
    return root


def write_tar(path: Path, folder: Path) -> Path:
    """A .tar.gz of the folder under a prefix, plus a macOS ._ file that must be skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(folder / "train", arcname="cifar10/train")
        tf.add(folder / "test", arcname="cifar10/test")
        junk = b"not an image"
        info = tarfile.TarInfo("cifar10/train/cat/._0000.png")
        info.size = len(junk)
        tf.addfile(info, io.BytesIO(junk))
    return path


def assert_same(a: ImageData, b: ImageData) -> None:
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.classes == b.classes


def test_every_source_gives_the_same_tensors(tmp_path, fake):
    batches = write_batches(tmp_path / "pkl" / "cifar-10-batches-py", fake)
    folder = write_folder(tmp_path / "folder", fake)
    tar = write_tar(tmp_path / "tar" / "cifar10.tar.gz", folder)
    official_tar = tmp_path / "official" / "cifar-10-python.tar.gz"  # the file torchvision fetches
    official_tar.parent.mkdir()
    with tarfile.open(official_tar, "w:gz") as tf:
        tf.add(batches, arcname="cifar-10-batches-py")

    from_pkl = load_data("cifar10", tmp_path / "pkl", allow_download=False)
    assert from_pkl.classes == CLASSES and "official python batches" in from_pkl.source
    assert torch.equal(from_pkl.train_x, torch.from_numpy(fake["train_x"]))
    assert torch.equal(from_pkl.test_y, torch.from_numpy(fake["test_y"]))
    assert from_pkl.train_x.dtype == torch.uint8 and from_pkl.train_y.dtype == torch.int64
    assert (from_pkl.image_shape, from_pkl.input_dim, from_pkl.num_classes) == (
        (3, 32, 32),
        3072,
        3,
    )

    for other in (
        load_data("cifar10", batches, allow_download=False),  # the batches folder itself
        load_data("cifar10", folder, allow_download=False),
        load_data("cifar10", tmp_path / "tar", allow_download=False),  # *.tar.gz inside data_dir
        load_data("cifar10", tar, allow_download=False),  # the archive as data_dir
        load_data("cifar10", official_tar, allow_download=False),
    ):
        assert_same(from_pkl, other)
    x = torch.from_numpy(fake["train_x"]).double().div(255).transpose(0, 1).flatten(1)  # (3, n)
    assert torch.allclose(from_pkl.mean.double(), x.mean(1), atol=1e-6)
    assert torch.allclose(from_pkl.std.double(), x.std(1, correction=0), atol=1e-6)


def test_jpeg_folder_decodes_close_to_the_originals(tmp_path, fake):
    folder = write_folder(tmp_path / "jpg", fake, ext=".jpg")
    d = load_data("cifar10", folder, allow_download=False)
    assert d.train_x.shape == (12, 3, 32, 32) and torch.equal(
        d.train_y, torch.from_numpy(fake["train_y"])
    )
    ref = np.stack(
        [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("train/*/*.jpg"))]
    )
    assert torch.equal(d.train_x, torch.from_numpy(ref).permute(0, 3, 1, 2))  # same pixels as PIL


def test_second_load_is_served_from_the_cache(tmp_path, fake, monkeypatch):
    folder = write_folder(tmp_path / "folder", fake)
    calls = D._decode_calls
    first = load_data("cifar10", folder, allow_download=False)
    assert D._decode_calls == calls + 1 and "decoded; cached to" in first.source
    assert list((folder / ".cache").glob("cifar10-folder-*.pt"))

    monkeypatch.setattr(D, "_decode_images", lambda *a: pytest.fail("decoded again"))
    second = load_data("cifar10", folder, allow_download=False)
    assert D._decode_calls == calls + 1 and "from cache" in second.source
    assert_same(first, second)


def test_cache_is_rebuilt_when_an_image_changes(tmp_path, fake):
    folder = write_folder(tmp_path / "folder", fake)
    first = load_data("cifar10", folder, allow_download=False)
    f = folder / "train" / "airplane" / "0000.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    second = load_data("cifar10", folder, allow_download=False)
    assert "decoded" in second.source
    assert second.train_x[0].sum() == 0 and first.train_x[0].sum() > 0


def test_cache_falls_back_when_data_dir_is_not_writable(tmp_path, fake):
    folder = write_folder(tmp_path / "folder", fake)
    (folder / ".cache").write_text(
        "a file where the cache dir would go"
    )  # mkdir fails, as read-only
    first = load_data("cifar10", folder, allow_download=False)
    assert str(tmp_path / "xdg" / "cbcore") in first.source
    second = load_data("cifar10", folder, allow_download=False)
    assert "from cache" in second.source
    assert_same(first, second)


def test_cache_skips_a_data_dir_marked_read_only(tmp_path, fake):
    tar = write_tar(tmp_path / "ro" / "cifar10.tar.gz", write_folder(tmp_path / "folder", fake))
    tar.parent.chmod(0o555)  # root could still write there: the mode bits alone must stop it
    try:
        first = load_data("cifar10", tar, allow_download=False)
        second = load_data("cifar10", tar, allow_download=False)
    finally:
        tar.parent.chmod(0o755)
    assert not (tar.parent / ".cache").exists()
    assert str(tmp_path / "xdg" / "cbcore") in first.source and "from cache" in second.source
    assert_same(first, second)


def test_missing_data_names_the_path_and_the_ways_to_provide_it(tmp_path):
    where = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError) as e:
        load_data("cifar10", where, allow_download=False)
    msg = str(e.value)
    assert str(where) in msg
    for way in ("cifar-10-batches-py", "train/<class>", ".tar.gz", "dataset: digits"):
        assert way in msg


def test_incomplete_batches_name_the_missing_file(tmp_path, fake):
    d = write_batches(tmp_path / "cifar-10-batches-py", fake)
    (d / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        load_data("cifar10", tmp_path, allow_download=False)


def test_corrupt_pickle_names_the_file(tmp_path, fake):
    d = write_batches(tmp_path / "cifar-10-batches-py", fake)
    (d / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=r"data_batch_3.*dataset: digits"):
        load_data("cifar10", tmp_path, allow_download=False)


def test_pickle_that_would_run_code_is_refused(tmp_path, fake):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = write_batches(tmp_path / "cifar-10-batches-py", fake)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match=r"test_batch.*refusing to unpickle builtins.print"):
        load_data("cifar10", tmp_path, allow_download=False)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_corrupt_image_names_the_file(tmp_path, fake, ext):
    folder = write_folder(tmp_path / "folder", fake, ext=ext)
    bad = folder / "test" / "bird" / f"0003{ext}"
    bad.write_bytes(b"definitely not an image")
    with pytest.raises(ValueError, match="cannot decode image") as e:
        load_data("cifar10", folder, allow_download=False)
    assert str(bad) in str(e.value)


def test_truncated_tar_names_the_archive(tmp_path, fake):
    tar = write_tar(tmp_path / "full.tar.gz", write_folder(tmp_path / "folder", fake))
    cut = tmp_path / "cut" / "cut.tar.gz"
    cut.parent.mkdir()
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt archive") as e:
        load_data("cifar10", cut, allow_download=False)
    assert str(cut) in str(e.value)


def test_failed_download_falls_through_to_the_image_folder(tmp_path, fake, monkeypatch):
    import torchvision.datasets

    def offline(**kw):
        raise OSError("no route to host")

    monkeypatch.setattr(D, "_reachable", lambda host, timeout=3.0: True)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    folder = write_folder(tmp_path / "folder", fake)
    with pytest.warns(UserWarning, match="download .* failed"):
        d = load_data("cifar10", folder, allow_download=True)
    assert "image folder" in d.source


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="'cifar100'.*cifar10"):
        load_data("cifar100", ".")


def test_digits():
    d = load_data("digits", "unused", allow_download=False)
    assert d.train_x.shape[1:] == (1, 8, 8) and d.train_x.dtype == torch.uint8
    assert (len(d.train_y), len(d.test_y)) == (1437, 360)
    assert d.classes == [str(i) for i in range(10)] and d.num_classes == 10 and d.input_dim == 64
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    counts = torch.bincount(torch.cat([d.train_y, d.test_y]))  # (10,)
    assert (torch.bincount(d.test_y) - 0.2 * counts).abs().max() <= 1  # stratified
    assert default_pad(d.image_shape) == 1 and default_pad((3, 32, 32)) == 4


def test_normalize_formula():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # (1, 2, 1, 2)
    out = normalize(x, torch.tensor([0.5, 0.2]), torch.tensor([0.5, 0.1]))
    assert out.dtype == torch.float32 and out.shape == (1, 4)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0, 0.0, 2.0]]))


# ---------------------------------------------------------------------------------------
# augmentation


def images(n=64, seed=0) -> torch.Tensor:
    return torch.randint(
        1, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_augment_shape_dtype_and_determinism():
    x = images()
    a = augment(x, torch.Generator().manual_seed(1), pad=2)
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(1), pad=2))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(2), pad=2))


def test_augment_without_padding_only_flips_along_width():
    x = images()
    a = augment(x, torch.Generator().manual_seed(0), pad=0)
    same = (a == x).flatten(1).all(1)  # (N,)
    flipped = (a == x.flip(-1)).flatten(1).all(1)  # (N,)
    assert (same | flipped).all()
    assert same.any() and flipped.any()  # both happen
    assert torch.equal(a.sort(-1).values, x.sort(-1).values)  # each row is a permutation


def test_augment_is_a_zero_padded_crop_then_maybe_a_flip():
    x, pad = images(32), 2
    a = augment(x, torch.Generator().manual_seed(3), pad=pad)
    padded = torch.nn.functional.pad(x, (pad,) * 4)  # (N, C, H + 2p, W + 2p), zeros
    used = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(
                a[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy : dy + 8, dx : dx + 8])
            )
        ]
        assert len(matches) == 1, i  # pixels are 1..255, so the crop is unique
        used.add(matches[0])
    assert len(used) > 5  # offsets and flips vary across the batch


# ---------------------------------------------------------------------------------------
# loader


def indexed_data(n: int = 50) -> ImageData:
    """Images whose first pixel is their index, so a batch says which examples it holds."""
    x = torch.randint(
        0, 256, (n, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    y = torch.arange(n) % 3
    mean, std = D._channel_stats(x)
    return ImageData(x, y, x[:10], y[:10], CLASSES, "test", mean, std)


def indices(xb: torch.Tensor, d: ImageData) -> list[int]:
    first = xb[:, 0] * d.std[0] + d.mean[0]  # (B,) the first pixel / 255
    return (first * 255).round().long().tolist()


def test_loader_visits_each_example_once_in_a_seeded_order():
    d = indexed_data(50)

    def epoch(seed, drop_last=False):
        loader = DeviceLoader(
            d,
            16,
            train=True,
            augment=False,
            generator=torch.Generator().manual_seed(seed),
            drop_last=drop_last,
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        return [i for xb, _ in batches for i in indices(xb, d)], batches

    order, batches = epoch(0)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert [len(yb) for _, yb in batches] == [16, 16, 16, 2]
    xb, yb = batches[0]
    assert xb.shape == (16, 48) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert torch.equal(yb, d.train_y[order[:16]])  # labels travel with their images
    assert epoch(0)[0] == order and epoch(1)[0] != order
    dropped, batches = epoch(0, drop_last=True)
    assert len(batches) == 3 and len(set(dropped)) == 48


def test_loader_new_order_each_epoch_and_test_split_in_order():
    d = indexed_data(50)
    loader = DeviceLoader(
        d, 10, train=True, augment=False, generator=torch.Generator().manual_seed(0)
    )
    e1 = [i for xb, _ in loader for i in indices(xb, d)]
    e2 = [i for xb, _ in loader for i in indices(xb, d)]
    assert sorted(e1) == sorted(e2) and e1 != e2
    test = DeviceLoader(
        d, 4, train=False, augment=False, generator=torch.Generator(), drop_last=False
    )
    assert [i for xb, _ in test for i in indices(xb, d)] == list(range(10))


def test_loader_normalizes_the_train_set_to_zero_mean_unit_std():
    d = load_data("digits", "unused", allow_download=False)
    loader = DeviceLoader(
        d,
        100,
        train=True,
        augment=False,
        generator=torch.Generator().manual_seed(0),
        drop_last=False,
    )
    x = torch.cat([xb for xb, _ in loader]).double()  # (N, 64), one channel
    assert x.shape == (1437, 64)
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-3


def test_loader_augments_and_refuses_an_empty_epoch():
    d = indexed_data(50)
    plain = next(
        iter(
            DeviceLoader(
                d, 50, train=True, augment=False, generator=torch.Generator().manual_seed(0)
            )
        )
    )
    aug = next(
        iter(
            DeviceLoader(
                d, 50, train=True, augment=True, generator=torch.Generator().manual_seed(0)
            )
        )
    )
    assert aug[0].shape == plain[0].shape and not torch.equal(aug[0], plain[0])
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 50 train examples"):
        DeviceLoader(d, 64, train=True, augment=False, generator=torch.Generator())
