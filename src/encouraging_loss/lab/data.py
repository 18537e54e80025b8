"""Local dataset loaders for the lab: MNIST-format idx files and CIFAR-10.

Datasets are looked up by name under a *data root* laid out like ``../shared/data``
(``ROOT/fashion-mnist``, ``ROOT/mnist``, ``ROOT/notmnist``, ``ROOT/cifar10``). The root is, in
order: the ``data_root`` argument (``--data-root``), the ``ENCOURAGING_LOSS_DATA`` environment
variable, then ``~/.cache/encouraging-loss/data``. Fashion-MNIST is also found at the Debian
package path ``/usr/share/datasets/fashion-mnist`` without any configuration.

Nothing here touches the network except :func:`download`, which is explicit and optional.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "ENCOURAGING_LOSS_DATA"
DEFAULT_CACHE_ROOT = Path("~/.cache/encouraging-loss/data")
# Where Debian packages install datasets; searched after the configured root.
SYSTEM_PATHS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
IDX_DATASETS = ("fashion-mnist", "mnist", "notmnist")
DATASETS = (*IDX_DATASETS, "cifar10")
CIFAR10_NPZ = "cifar10-jpeg-q75.npz"

# fmt: off
_CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple("0123456789"),
    "notmnist": tuple("ABCDEFGHIJ"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}
# fmt: on


class DatasetNotFoundError(FileNotFoundError):
    """A dataset was not found in any of the searched folders (the message lists them)."""


@dataclass
class ImageDataset:
    """An image classification dataset held in memory as uint8 arrays.

    Attributes:
        name: dataset name, e.g. ``"fashion-mnist"``.
        train_images: ``(N, H, W)`` or ``(N, H, W, C)`` uint8, or ``None`` when absent.
        train_labels: ``(N,)`` int64, or ``None``.
        test_images: like ``train_images`` for the test split.
        test_labels: ``(M,)`` int64.
        classes: class names, index = label.
        source: the folder the files were read from.
    """

    name: str
    train_images: np.ndarray | None
    train_labels: np.ndarray | None
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: Path


def default_data_root() -> Path:
    """The data root without ``--data-root``: ``$ENCOURAGING_LOSS_DATA`` if set, else the cache."""
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env).expanduser() if env else DEFAULT_CACHE_ROOT.expanduser()


def _root(data_root: str | os.PathLike | None) -> Path:
    return Path(data_root).expanduser() if data_root is not None else default_data_root()


def candidate_dirs(name: str, data_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for dataset ``name`` (one of :data:`DATASETS`), first match wins.

    Args:
        data_root: explicit root holding datasets by name; ``None`` uses :func:`default_data_root`.

    Raises:
        ValueError: if ``name`` is not a known dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"name: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return [_root(data_root) / name, *SYSTEM_PATHS.get(name, ())]


def _has_files(name: str, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if name == "cifar10":
        return (folder / CIFAR10_NPZ).is_file() or _cifar_pickle_dir(folder) is not None
    return _find_idx(folder, "t10k-images-idx3-ubyte") is not None


def find_dataset(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The first of :func:`candidate_dirs` that holds dataset ``name``'s files.

    Raises:
        DatasetNotFoundError: with a one-line message listing every folder searched.
    """
    dirs = candidate_dirs(name, data_root)
    for folder in dirs:
        if _has_files(name, folder):
            return folder
    looked = ", ".join(str(d) for d in dirs)
    hint = " (or apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""
    raise DatasetNotFoundError(
        f"dataset {name!r} not found; looked in: {looked}; pass --data-root DIR with DIR/{name}"
        f" or set {ENV_VAR}{hint}"
    )


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed) as an array of the header's shape.

    Args:
        path: file in the MNIST idx format (magic ``0x000008DD``: uint8 data, DD dimensions).

    Raises:
        ValueError: if the header is not a uint8 idx header or the size does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4:
        raise ValueError(f"path: {path} is too short to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"path: {path} is not a uint8 idx file (magic {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"path: {path} holds {data.size} values, header says {shape}")
    return data.reshape(shape)


def load_idx_dataset(name: str, folder: str | os.PathLike) -> ImageDataset:
    """Load an MNIST-format dataset; without train files (notMNIST) ``train_images`` is ``None``.

    Args:
        name: dataset name, used for class names.
        folder: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    Raises:
        FileNotFoundError: if the test files are missing.
    """
    folder = Path(folder)
    splits: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    for split in ("train", "t10k"):
        images = _find_idx(folder, f"{split}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{split}-labels-idx1-ubyte")
        if images is None or labels is None:
            splits[split] = None
            continue
        x, y = read_idx(images), read_idx(labels).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"folder: {folder} has {len(x)} {split} images but {len(y)} labels")
        splits[split] = (x, y)
    if splits["t10k"] is None:
        raise FileNotFoundError(f"folder: no t10k idx files in {folder}")
    classes = _CLASS_NAMES.get(name, tuple(str(i) for i in range(10)))
    return ImageDataset(name, *(splits["train"] or (None, None)), *splits["t10k"], classes, folder)


def _cifar_pickle_dir(folder: Path) -> Path | None:
    for candidate in (folder, folder / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file() and (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.asarray(batch[b"labels"], dtype=np.int64)


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    from PIL import Image  # Pillow is part of the [lab] extra; only CIFAR's JPEG pack needs it

    out = np.empty((len(indices), 32, 32, 3), dtype=np.uint8)
    for row, i in enumerate(indices):
        jpeg = blob[offsets[i] : offsets[i + 1]].tobytes()
        with Image.open(io.BytesIO(jpeg)) as image:
            out[row] = np.asarray(image.convert("RGB"))
    return out


def _subset_indices(n: int, limit: int | None, seed: int) -> np.ndarray:
    # A seeded permutation: the JPEG pack is sorted by class, so a prefix would be one class.
    order = np.random.default_rng(seed).permutation(n)
    return order if limit is None else np.sort(order[:limit])


def _check_limits(max_train: int | None, max_test: int | None) -> None:
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value <= 0:
            raise ValueError(f"{arg}: must be positive or None, got {value}")


def _cifar_split(pickles: Path | None, pack: dict, split: str, limit: int | None, seed: int):
    """``(images, labels)`` of one CIFAR-10 split: a seeded random subset (all, shuffled, if
    ``limit`` is ``None``), from the pickles in ``pickles`` or else the JPEG ``pack``."""
    if pickles is not None:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        images, labels = zip(*(_read_cifar_batch(pickles / name) for name in files), strict=True)
        keep = _subset_indices(sum(map(len, labels)), limit, seed)
        return np.concatenate(images)[keep], np.concatenate(labels)[keep]
    keep = _subset_indices(len(pack[f"{split}_labels"]), limit, seed)
    images = _decode_jpegs(pack[f"{split}_jpeg"], pack[f"{split}_offsets"], keep)
    return images, pack[f"{split}_labels"][keep].astype(np.int64)


def load_cifar10(
    folder: str | os.PathLike,
    max_train: int | None = None,
    max_test: int | None = None,
    subset_seed: int = 0,
) -> ImageDataset:
    """Load CIFAR-10 (``(N, 32, 32, 3)`` uint8) from the python pickles or the JPEG ``.npz`` pack.

    Args:
        folder: folder with ``cifar-10-batches-py/`` (or its contents) or ``cifar10-jpeg-q75.npz``.
        max_train: decode at most this many train images (a seeded random subset), ``None`` = all.
        max_test: the same for the test split.

    Raises:
        FileNotFoundError: if neither layout is present.
        ValueError: if a limit is not positive.
    """
    _check_limits(max_train, max_test)
    folder = Path(folder)
    pickles, pack = _cifar_pickle_dir(folder), {}
    if pickles is None:
        if not (folder / CIFAR10_NPZ).is_file():
            raise FileNotFoundError(f"folder: no CIFAR-10 pickles or {CIFAR10_NPZ} in {folder}")
        with np.load(folder / CIFAR10_NPZ) as npz:
            pack = {key: npz[key] for key in npz.files}
    train = _cifar_split(pickles, pack, "train", max_train, subset_seed)
    test = _cifar_split(pickles, pack, "test", max_test, subset_seed + 1)
    return ImageDataset("cifar10", *train, *test, _CLASS_NAMES["cifar10"], folder)


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    subset_seed: int = 0,
) -> ImageDataset:
    """Find and load dataset ``name``.

    Args:
        name: one of :data:`DATASETS`.
        data_root: explicit data root or ``None`` for the default search.
        max_train: keep at most this many train examples (seeded random subset).
        max_test: keep at most this many test examples (seeded random subset).
        subset_seed: seed of the subset choice; fixed across runs so losses see the same data.

    Raises:
        DatasetNotFoundError: if the dataset is in none of the searched folders.
        ValueError: if a limit is not positive.
    """
    folder = find_dataset(name, data_root)
    if name == "cifar10":
        return load_cifar10(folder, max_train, max_test, subset_seed)
    _check_limits(max_train, max_test)
    data = load_idx_dataset(name, folder)
    if data.train_images is not None and max_train is not None:
        keep = _subset_indices(len(data.train_labels), max_train, subset_seed)
        data.train_images, data.train_labels = data.train_images[keep], data.train_labels[keep]
    if max_test is not None:
        keep = _subset_indices(len(data.test_labels), max_test, subset_seed + 1)
        data.test_images, data.test_labels = data.test_images[keep], data.test_labels[keep]
    return data


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` or ``(N, H, W, C)`` uint8 images as a float32 ``(N, C, H, W)`` in ``[0, 1]``.

    Raises:
        ValueError: if ``images`` is not 3- or 4-dimensional.
    """
    if images.ndim == 3:
        images = images[:, None, :, :]
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"images: expected 3 or 4 dimensions, got shape {images.shape}")
    # A float copy straight from NumPy: the uint8 array may be a read-only view of the file's
    # bytes, which torch.from_numpy warns about even though nothing writes to it.
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0)


@dataclass
class Splits:
    """Float tensors ready for training: train, held-out validation and test.

    The validation split is cut from the training data (never from test) and is what model
    selection uses.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    # Per-channel statistics used to standardise, shaped (1, C, 1, 1): raw pixels in [0, 1]
    # are ``x * std + mean`` (attacks with an ε in pixel units need them).
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, ``(C, H, W)``."""
        return tuple(self.train_x.shape[1:])


def make_splits(data: ImageDataset, val_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    """Hold a validation split out of train and standardise with train statistics.

    Args:
        data: a dataset with a train split.
        val_fraction: share of train examples held out for validation, in ``(0, 1)``.
        split_seed: seed of the split, fixed so that all losses and seeds share the same split.

    Raises:
        ValueError: if the dataset has no train split or ``val_fraction`` is out of range.
    """
    if data.train_images is None or data.train_labels is None:
        raise ValueError(f"data: dataset {data.name!r} has no train split to train on")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in (0, 1), got {val_fraction}")
    n = len(data.train_labels)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction: leaves no training examples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).numpy()
    val_idx, train_idx = order[:n_val], order[n_val:]
    images = (data.train_images[train_idx], data.train_images[val_idx], data.test_images)
    labels = (data.train_labels[train_idx], data.train_labels[val_idx], data.test_labels)
    return standardized_splits(images, labels, len(data.classes))


def standardized_splits(images, labels, num_classes: int) -> Splits:
    """:class:`Splits` of the train, validation and test uint8 ``images`` and their integer
    ``labels`` (NumPy), standardised per channel with the training images' statistics.

    Raises:
        ValueError: unless there are three of each, of matching lengths.
    """
    if len(images) != 3 or [len(x) for x in images] != [len(y) for y in labels]:
        raise ValueError("images, labels: expected train, val and test parts of equal lengths")
    xs = [to_tensor(part) for part in images]
    mean = xs[0].mean(dim=(0, 2, 3), keepdim=True)
    std = xs[0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    tensors = []
    for x, y in zip(xs, labels, strict=True):
        tensors += [(x - mean) / std, torch.from_numpy(y.astype(np.int64))]
    return Splits(*tensors, num_classes=num_classes, mean=mean, std=std)


def load_splits(
    name: str,
    data_root: str | os.PathLike | None,
    max_train: int | None = None,
    max_test: int | None = None,
    val_fraction: float = 0.1,
) -> tuple[ImageDataset, Splits]:
    """:func:`load_dataset`, then :func:`make_splits`: the data of an image-based task.

    Returns:
        ``(dataset, splits)``.

    Raises:
        ValueError: as :func:`load_dataset` and :func:`make_splits` do.
    """
    dataset = load_dataset(name, data_root, max_train=max_train, max_test=max_test)
    return dataset, make_splits(dataset, val_fraction=val_fraction)


def download(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """Download ``name`` into its data-root folder, returned, with torchvision (``--download``).

    Args:
        name: ``"fashion-mnist"``, ``"mnist"`` or ``"cifar10"``.

    Raises:
        RuntimeError: if torchvision is not installed.
        ValueError: if the dataset cannot be downloaded this way.
    """
    try:
        import torchvision.datasets as tvd  # optional; not a lab dependency
    except ImportError as error:
        raise RuntimeError("--download needs torchvision, which is not installed") from error
    target = _root(data_root) / name
    target.mkdir(parents=True, exist_ok=True)
    if name in ("fashion-mnist", "mnist"):
        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
        for train in (True, False):
            cls(str(target / "_tv"), train=train, download=True)
        raw = next((target / "_tv").glob("*/raw"))
        for path in raw.glob("*-ubyte.gz"):
            os.replace(path, target / path.name)
    elif name == "cifar10":
        tvd.CIFAR10(str(target), train=True, download=True)
    else:
        raise ValueError(f"name: {name!r} cannot be downloaded; place its files under {target}")
    return target


def find_data_folder(
    relative: str, required: tuple[str, ...], data_root: str | os.PathLike | None = None
) -> Path:
    """``ROOT/relative`` (e.g. ``"tu/PROTEINS"``) when it holds every ``required`` file.

    Args:
        relative: folder under the data root.
        required: file names (relative to that folder) that must all exist.
        data_root: explicit data root or ``None`` for the default.

    Raises:
        ValueError: if ``relative`` is empty or absolute.
        DatasetNotFoundError: naming the folder and the first missing file.
    """
    if not relative or Path(relative).is_absolute():
        raise ValueError(f"relative: expected a folder under the data root, got {relative!r}")
    folder = _root(data_root) / relative
    for name in required:
        if not (folder / name).is_file():
            raise DatasetNotFoundError(
                f"dataset {relative!r} not found: {folder / name} is missing; pass --data-root "
                f"DIR with DIR/{relative} or set {ENV_VAR}"
            )
    return folder


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, pad: int = 4
) -> torch.Tensor:
    """Random crops of zero-padded images and random horizontal flips, on the input's device.

    Args:
        images: ``(N, C, H, W)`` batch.
        generator: CPU generator deciding crops and flips (seeded per step for exact resume).
        pad: padding on each side; crops shift by up to ``pad`` pixels.

    Raises:
        ValueError: if ``images`` is not 4-dimensional or ``pad`` is negative.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, C, H, W), got shape {tuple(images.shape)}")
    if pad < 0:
        raise ValueError(f"pad: must be non-negative, got {pad}")
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = shifts[:, 0, None] + torch.arange(height, device=images.device)
    cols = shifts[:, 1, None] + torch.arange(width, device=images.device)
    batch_index = torch.arange(n, device=images.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
    crops = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flips[:, None, None, None], crops.flip(3), crops)
