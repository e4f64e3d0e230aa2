"""Datasets as uint8 image tensors on the device (DESIGN §6).

The whole dataset is moved to the device once; batches are index slices of it, and
augmentation (random crop with zero padding + horizontal flip) and normalization run on
the device, vectorized over the batch. No DataLoader, no workers.

`cifar10` sources, tried in order:
  1. the official python batches: `data_dir/cifar-10-batches-py/` (or `data_dir` itself);
  2. torchvision's download into `data_dir`, only with `allow_download` and a reachable host;
  3. an image folder `train/<class>/*`, `test/<class>/*` in `data_dir` or `data_dir/cifar10`,
     or a `.tar.gz` of one (`data_dir` itself, or `*.tar.gz` inside those folders); the
     official `cifar-10-python.tar.gz` is read the same way, without extracting.
Decoded image folders and archives are cached as uint8 tensors in `data_dir/.cache/`
(or `$XDG_CACHE_HOME/cbcore`, `~/.cache/cbcore` when that is not writable).

`digits` is scikit-learn's 8×8 digits (shipped, offline), scaled to uint8 0..255.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import socket
import tarfile
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

DATASETS = ("cifar10", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
CIFAR_HOST = ("www.cs.toronto.edu", 443)  # where torchvision downloads CIFAR-10 from
CACHE_VERSION = 1  # bump when the cached layout or decoding changes
SPLITS = ("train", "test")


@dataclass(repr=False)
class ImageData:
    """A labelled image dataset held as uint8 tensors on one device."""

    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, C, H, W) uint8
    test_y: Tensor  # (M,) int64
    classes: list[str]
    source: str  # which source and path it came from, and whether from the cache
    mean: Tensor  # (C,) float32, per-channel mean of train_x / 255
    std: Tensor  # (C,) float32, per-channel std of train_x / 255

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    @property
    def input_dim(self) -> int:
        return math.prod(self.image_shape)

    def __repr__(self) -> str:
        return (
            f"ImageData({len(self.train_y)} train / {len(self.test_y)} test, "
            f"shape {self.image_shape}, {self.num_classes} classes, "
            f"device {self.train_x.device}; {self.source})"
        )


def load_data(
    dataset: str,
    data_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    allow_download: bool = True,
) -> ImageData:
    """Load `dataset` ("cifar10" or "digits") and move it to `device` once."""
    if dataset == "digits":
        raw, classes, source = _load_digits()
    elif dataset == "cifar10":
        raw, classes, source = _load_cifar10(Path(data_dir).expanduser(), allow_download)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    train_x, train_y, test_x, test_y = (raw[k].to(device) for k in _KEYS)
    mean, std = _channel_stats(train_x)
    return ImageData(train_x, train_y, test_x, test_y, classes, source, mean, std)


def normalize(x_uint8: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x / 255 - mean) / std per channel, flattened to float32 (N, C*H*W)."""
    x = x_uint8.float().div_(255)  # (N, C, H, W)
    mean = mean.to(x.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std = std.to(x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).flatten(1)  # (N, C*H*W)


def augment(x_uint8: Tensor, generator: torch.Generator, pad: int) -> Tensor:
    """Random crop with `pad` zero padding, then random horizontal flip; uint8, same shape.

    One gather for the whole batch on x's device. Random numbers come from `generator`
    (drawn on its device and moved to x's), so the result is fixed by its state.
    """
    if x_uint8.ndim != 4 or x_uint8.dtype != torch.uint8:
        raise ValueError(
            f"augment expects uint8 (N, C, H, W), got {x_uint8.dtype} {tuple(x_uint8.shape)}"
        )
    if pad < 0:
        raise ValueError(f"augment pad must be >= 0, got {pad}")
    n, c, h, w = x_uint8.shape
    dev = x_uint8.device
    shift = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=generator.device)
    shift, flip = shift.to(dev) - pad, flip.to(dev).bool()  # (2, N) in [-pad, pad], (N,)
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = ar_h + shift[0, :, None]  # (N, H) source row of each output row
    cols = torch.where(flip[:, None], w - 1 - ar_w, ar_w) + shift[1, :, None]  # (N, W)
    row_in, col_in = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)  # (N, H), (N, W)
    inside = row_in[:, :, None] & col_in[:, None, :]  # (N, H, W)
    out = x_uint8[
        torch.arange(n, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows.clamp(0, h - 1)[:, None, :, None],
        cols.clamp(0, w - 1)[:, None, None, :],
    ]  # (N, C, H, W)
    return out * inside[:, None]  # zero where the crop falls in the padding


def default_pad(image_shape: tuple[int, ...]) -> int:
    """Crop padding for an image shape (C, H, W): H // 8 (4 for 32×32, 1 for 8×8)."""
    return int(image_shape[-2]) // 8


class DeviceLoader:
    """Batches as index slices of device tensors: (x float (B, C*H*W) normalized, y int64 (B,)).

    With `train`, iterates the train split in a fresh order drawn from `generator` each
    epoch; otherwise the test split in order. `augment` applies `augment(...)` with
    `default_pad`. Use drop_last=False to evaluate on every example.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        train: bool,
        augment: bool,
        generator: torch.Generator,
        drop_last: bool = True,
    ):
        self.x = data.train_x if train else data.test_x  # (N, C, H, W) uint8
        self.y = data.train_y if train else data.test_y  # (N,)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and batch_size > len(self.y):
            split = "train" if train else "test"
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(self.y)} {split} examples with "
                "drop_last=True (no batches); lower batch_size or pass drop_last=False"
            )
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self.generator, self.drop_last = generator, drop_last
        self.pad = default_pad(data.image_shape)
        self.mean, self.std = data.mean.to(self.x.device), data.std.to(self.x.device)

    def __len__(self) -> int:
        n, b = len(self.y), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, dev, g = len(self.y), self.x.device, self.generator
        if self.train:
            order = torch.randperm(n, generator=g, device=g.device).to(dev)  # (N,)
        else:
            order = torch.arange(n, device=dev)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]  # (B,)
            xb = self.x[idx]  # (B, C, H, W) uint8
            if self.augment:
                xb = augment(xb, g, self.pad)
            yield normalize(xb, self.mean, self.std), self.y[idx]


# ---------------------------------------------------------------------------------------
# sources

_KEYS = ("train_x", "train_y", "test_x", "test_y")
Raw = dict[str, Tensor]  # _KEYS -> uint8 images / int64 labels on the CPU


def _load_digits() -> tuple[Raw, list[str], str]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # (1797, 64) floats 0..16, (1797,)
    x = np.rint(x * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    raw = _raw(*(torch.from_numpy(a) for a in (xtr, ytr, xte, yte)))
    source = "digits: scikit-learn load_digits (offline), stratified 80/20 split, random_state=0"
    return raw, [str(i) for i in range(10)], source


def _raw(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> Raw:
    ys = (train_y.to(torch.int64), test_y.to(torch.int64))
    return dict(zip(_KEYS, (train_x.contiguous(), ys[0], test_x.contiguous(), ys[1])))


def how_to_provide(data_dir: Path) -> str:
    """The ways to give `load_data("cifar10", data_dir)` its data, for error messages."""
    d = data_dir
    return (
        "Provide CIFAR-10 one of these ways: put the official python batches in "
        f"{d}/cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta, from "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, which also works unextracted "
        f"in {d}); an image folder "
        f"{d}/train/<class>/*.png and {d}/test/<class>/*.png; a .tar.gz of such a folder in {d} "
        "(or pass its path as data_dir); allow_download=True on a machine with internet; "
        "or use dataset: digits (offline, shipped with scikit-learn)."
    )


def _load_cifar10(data_dir: Path, allow_download: bool) -> tuple[Raw, list[str], str]:
    searched = []
    if not data_dir.is_file():
        for d in (data_dir / "cifar-10-batches-py", data_dir):
            searched.append(f"{d}/data_batch_1")
            if (d / "data_batch_1").is_file() or (d / "batches.meta").is_file():
                raw, classes = _read_cifar_batches(d, data_dir)
                return raw, classes, f"cifar10: official python batches {d}"
    if allow_download and not data_dir.is_file():
        searched.append(f"torchvision download into {data_dir}")
        d = _try_download(data_dir)
        if d is not None:
            raw, classes = _read_cifar_batches(d, data_dir)
            return raw, classes, f"cifar10: torchvision download, official python batches {d}"
    roots = [data_dir] if data_dir.is_file() else [data_dir, data_dir / "cifar10"]
    for root in roots:
        if not root.is_file():
            searched.append(f"{root}/train/<class>/*, {root}/test/<class>/*")
            if (root / "train").is_dir() or (root / "test").is_dir():
                return _load_cached(root, "folder", data_dir)
    for root in roots:
        searched.append(str(root) if root.is_file() else f"{root}/*.tar.gz")
        archives = (
            [root] if root.is_file() else sorted([*root.glob("*.tar.gz"), *root.glob("*.tgz")])
        )
        if archives:
            return _load_cached(archives[0], "tar", data_dir)
    raise FileNotFoundError(
        f"cifar10: no data found at {data_dir}. Searched: {'; '.join(searched)}. "
        + how_to_provide(data_dir)
    )


def _reachable(host: tuple[str, int], timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host opens within `timeout` s (DNS included)."""
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(host, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)  # a hung DNS lookup can't block exit
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _try_download(data_dir: Path) -> Path | None:
    """torchvision's CIFAR-10 download into data_dir; None (with a warning) when it fails."""
    if not _reachable(CIFAR_HOST):
        return None
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(data_dir), train=True, download=True)
        return data_dir / "cifar-10-batches-py"
    except Exception as e:  # any failure means: try the next source
        warnings.warn(
            f"cifar10: torchvision download into {data_dir} failed ({e}); trying image folders",
            stacklevel=3,
        )
        return None


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles only numpy arrays and plain containers (CIFAR batches), nothing executable."""

    ALLOWED = {
        *(
            (f"numpy.{core}.multiarray", n)
            for core in ("core", "_core")
            for n in ("_reconstruct", "scalar")
        ),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, data: bytes, data_dir: Path) -> dict:
    try:
        d = _NumpyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types on garbage
        raise ValueError(
            f"{path}: not a readable CIFAR-10 pickle ({e}). {how_to_provide(data_dir)}"
        ) from e
    if not isinstance(d, dict):
        raise ValueError(
            f"{path}: expected a dict, got {type(d).__name__}. {how_to_provide(data_dir)}"
        )
    return d


def _read_cifar_batches(d: Path, data_dir: Path) -> tuple[Raw, list[str]]:
    names = (*CIFAR_BATCHES, "test_batch", "batches.meta")
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        hint = how_to_provide(data_dir)
        raise FileNotFoundError(
            f"{d}: incomplete CIFAR-10 python batches, missing {missing}. {hint}"
        )
    return _parse_cifar_batches({n: (d / n, (d / n).read_bytes()) for n in names}, data_dir)


def _parse_cifar_batches(
    files: dict[str, tuple[Path, bytes]], data_dir: Path
) -> tuple[Raw, list[str]]:
    def batch(name: str) -> tuple[Tensor, Tensor]:
        path, data = files[name]
        d = _unpickle(path, data, data_dir)
        try:
            x = np.asarray(d[b"data"], dtype=np.uint8)  # (N, 3072) row-major C, H, W
            y = np.asarray(d[b"labels"], dtype=np.int64)  # (N,)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
                raise ValueError(f"data {x.shape} / labels {y.shape}, expected (N, 3072) / (N,)")
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"{path}: not a CIFAR-10 batch ({e!r}). {how_to_provide(data_dir)}"
            ) from e
        return torch.from_numpy(x.reshape(-1, 3, 32, 32)), torch.from_numpy(y)

    train = [batch(n) for n in CIFAR_BATCHES]
    test_x, test_y = batch("test_batch")
    meta_path, meta = files["batches.meta"]
    try:
        classes = [
            c.decode() if isinstance(c, bytes) else str(c)
            for c in _unpickle(meta_path, meta, data_dir)[b"label_names"]
        ]
    except KeyError as e:
        raise ValueError(f"{meta_path}: no b'label_names'. {how_to_provide(data_dir)}") from e
    train_x = torch.cat([x for x, _ in train])  # (50000, 3, 32, 32)
    train_y = torch.cat([y for _, y in train])  # (50000,)
    return _raw(train_x, train_y, test_x, test_y), classes


# ---------------------------------------------------------------------------------------
# image folders and archives, with a cache of the decoded tensors

_decode_calls = 0  # how many times an image folder or archive was decoded (tests read it)


def _folder_files(root: Path) -> dict[str, list[tuple[str, Path]]]:
    """split -> sorted (class, file) for image files in root/<split>/<class>/ (hidden skipped)."""
    out: dict[str, list[tuple[str, Path]]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        for cls_dir in sorted((root / split).iterdir()):
            if cls_dir.is_dir() and not cls_dir.name.startswith("."):
                for f in sorted(cls_dir.iterdir()):
                    if _is_image(f.name):
                        out[split].append((cls_dir.name, f))
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _cache_dirs(data_dir: Path) -> list[Path]:
    """data_dir/.cache, then the user cache; a folder without write bits is left alone, even
    for root (who could write there anyway)."""
    base = data_dir.parent if data_dir.is_file() else data_dir
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    marked_read_only = (
        base.is_dir() and not (base / ".cache").exists() and not base.stat().st_mode & 0o222
    )
    return ([] if marked_read_only else [base / ".cache"]) + [Path(xdg) / "cbcore"]


def _cache_key(path: Path, kind: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{kind}|{path.resolve()}".encode())
    if kind == "tar":
        st = path.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        for split, files in _folder_files(path).items():
            for cls, f in files:
                st = f.stat()
                h.update(f"|{split}/{cls}/{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _load_cached(path: Path, kind: str, data_dir: Path) -> tuple[Raw, list[str], str]:
    """Decode an image folder ("folder") or archive ("tar"), or read it from the cache."""
    what = f"cifar10: {'image folder' if kind == 'folder' else 'tar.gz'} {path}"
    name = f"cifar10-{kind}-{_cache_key(path, kind)}.pt"
    for d in _cache_dirs(data_dir):
        f = d / name
        if f.is_file():
            try:
                blob = torch.load(f, map_location="cpu", weights_only=True)
                raw = {k: blob[k] for k in _KEYS}
                return raw, list(blob["classes"]), f"{what} (from cache {f})"
            except Exception as e:  # a bad cache is rebuilt, never fatal
                warnings.warn(f"{f}: unreadable cache ({e}); decoding {path} again", stacklevel=3)
    global _decode_calls
    _decode_calls += 1
    raw, classes = _read_folder(path, data_dir) if kind == "folder" else _read_tar(path, data_dir)
    written = _write_cache(name, {**raw, "classes": classes}, _cache_dirs(data_dir))
    return raw, classes, f"{what} (decoded; cached to {written})"


def _write_cache(name: str, blob: dict, dirs: list[Path]) -> Path | None:
    """Save to the first writable dir (atomically); None with a warning when none is."""
    errors = []
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".pt")
            os.close(fd)
            try:
                torch.save(blob, tmp)
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600
                os.replace(tmp, d / name)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return d / name
        except OSError as e:
            errors.append(f"{d}: {e}")
    why = "; ".join(errors)
    warnings.warn(
        f"cifar10: cannot write the cache ({why}); the next load decodes again", stacklevel=3
    )
    return None


def _read_folder(root: Path, data_dir: Path) -> tuple[Raw, list[str]]:
    files = _folder_files(root)
    items = {s: [(cls, str(f), f.read_bytes()) for cls, f in files[s]] for s in SPLITS}
    return _images_to_raw(items, str(root), data_dir)


def _read_tar(path: Path, data_dir: Path) -> tuple[Raw, list[str]]:
    """Read train/<class>/* images (or official CIFAR batches) straight from the archive."""
    items: dict[str, list[tuple[str, str, bytes]]] = {s: [] for s in SPLITS}
    batches: dict[str, tuple[Path, bytes]] = {}
    prefixes: set[tuple[str, ...]] = set()
    try:
        with tarfile.open(path, "r|*") as tf:  # streaming: one pass over the compressed file
            for m in tf:
                parts = PurePosixPath(m.name).parts
                if not m.isfile() or any(p.startswith(".") for p in parts):
                    continue  # directories, links, hidden files (e.g. macOS ._* files)
                if parts[-1] in (*CIFAR_BATCHES, "test_batch", "batches.meta"):
                    batches[parts[-1]] = (Path(f"{path}:{m.name}"), tf.extractfile(m).read())
                elif len(parts) >= 3 and parts[-3] in SPLITS and _is_image(parts[-1]):
                    prefixes.add(parts[:-3])
                    data = tf.extractfile(m).read()
                    items[parts[-3]].append((parts[-2], f"{path}:{m.name}", data))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(
            f"{path}: truncated or corrupt archive ({e}). {how_to_provide(data_dir)}"
        ) from e
    if len(prefixes) > 1:
        found = sorted("/".join(p) or "." for p in prefixes)
        raise ValueError(f"{path}: several train/ test/ folders inside ({found}); keep one")
    if not items["train"] and not items["test"] and len(batches) == len(CIFAR_BATCHES) + 2:
        return _parse_cifar_batches(batches, data_dir)
    for s in SPLITS:
        items[s].sort(key=lambda it: (it[0], it[1]))  # archives need not be in order
    return _images_to_raw(items, str(path), data_dir)


def _images_to_raw(
    items: dict[str, list[tuple[str, str, bytes]]], where: str, data_dir: Path
) -> tuple[Raw, list[str]]:
    """Decode split -> [(class, name, bytes)]; class index = alphabetical order of train classes."""
    for s in SPLITS:
        if not items[s]:
            exts = " ".join(IMAGE_EXTENSIONS)
            hint = how_to_provide(data_dir)
            raise FileNotFoundError(f"{where}: no images ({exts}) in {s}/<class>/. {hint}")
    classes = sorted({cls for cls, _, _ in items["train"]})
    extra = sorted({cls for cls, _, _ in items["test"]} - set(classes))
    if extra:
        raise ValueError(
            f"{where}: test classes {extra} have no train/ folder; train classes are {classes}"
        )
    index = {c: i for i, c in enumerate(classes)}
    xs, ys = [], []
    for s in SPLITS:
        xs.append(_decode_images([(name, data) for _, name, data in items[s]], data_dir))
        ys.append(torch.tensor([index[cls] for cls, _, _ in items[s]], dtype=torch.int64))
    shapes = {tuple(x.shape[1:]) for x in xs}
    if len(shapes) > 1:
        raise ValueError(
            f"{where}: train and test image sizes differ {sorted(shapes)}; resize them"
        )
    return _raw(xs[0], ys[0], xs[1], ys[1]), classes


def _decode_images(files: list[tuple[str, bytes]], data_dir: Path) -> Tensor:
    """Decode encoded images to RGB uint8 (N, 3, H, W); errors name the file."""
    out: list[Tensor | None] = [None] * len(files)
    jpegs = [i for i, (name, _) in enumerate(files) if name.lower().endswith(JPEG_EXTENSIONS)]
    for start in range(0, len(jpegs), 4096):  # torchvision decodes a list ~4x faster than PIL
        chunk = jpegs[start : start + 4096]
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates it for torchcodec
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_jpeg

                bufs = [torch.frombuffer(bytearray(files[i][1]), dtype=torch.uint8) for i in chunk]
                for i, img in zip(chunk, decode_jpeg(bufs, mode=ImageReadMode.RGB)):
                    out[i] = img  # (3, H, W)
        except Exception:  # a bad file fails its chunk (PIL below names it), as would a
            pass  # torchvision without decode_jpeg
    for i, (name, data) in enumerate(files):
        if out[i] is None:
            out[i] = _decode_pil(name, data, data_dir)
    shape = out[0].shape
    for (name, _), img in zip(files, out):
        if img.shape != shape:
            sizes = f"{tuple(img.shape)} (C, H, W), the first is {tuple(shape)}"
            raise ValueError(f"{name}: image size {sizes}; resize all images to one size")
    return torch.stack(out)  # (N, 3, H, W)


def _decode_pil(name: str, data: bytes, data_dir: Path) -> Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.array(im.convert("RGB"))  # (H, W, 3)
    except Exception as e:  # PIL raises many types on bad data
        raise ValueError(f"{name}: cannot decode image ({e}). {how_to_provide(data_dir)}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of x / 255 for uint8 (N, C, H, W), exact from 256-bin histograms."""
    counts = torch.stack(
        [torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(x.shape[1])]
    )
    p = counts.double() / counts.sum(1, keepdim=True)  # (C, 256) value frequencies
    v = torch.arange(256, dtype=torch.float64, device=x.device) / 255  # (256,)
    mean = p @ v  # (C,)
    std = (p @ (v * v) - mean * mean).clamp_min(0).sqrt().clamp_min(1e-8)  # (C,)
    return mean.float(), std.float()
