"""Loaders on the real staged files; dataset lookup and its error message."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from encouraging_loss.lab import data

from .helpers import shared_dataset


@pytest.mark.parametrize(("name", "n_train"), [("fashion-mnist", 60000), ("mnist", 10000)])
def test_idx_loader_real_files(name, n_train):
    folder = shared_dataset(name)
    dataset = data.load_idx_dataset(name, folder)
    assert dataset.train_images.shape == (n_train, 28, 28)
    assert dataset.test_images.shape == (10000, 28, 28)
    assert dataset.train_images.dtype == np.uint8
    assert set(np.unique(dataset.test_labels)) == set(range(10))
    assert len(dataset.classes) == 10


def test_notmnist_has_test_only():
    dataset = data.load_idx_dataset("notmnist", shared_dataset("notmnist"))
    assert dataset.train_images is None
    assert dataset.test_images.shape[1:] == (28, 28)
    assert dataset.classes[0] == "A"


def test_read_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="path"):
        data.read_idx(bad)


def test_cifar10_jpeg_pack_subset():
    folder = shared_dataset("cifar10")
    dataset = data.load_cifar10(folder, max_train=200, max_test=50)
    assert dataset.train_images.shape == (200, 32, 32, 3)
    assert dataset.test_images.shape == (50, 32, 32, 3)
    # The pack is sorted by class; a seeded random subset must mix classes.
    assert len(np.unique(dataset.train_labels)) == 10
    assert 80 < dataset.train_images.mean() < 180


def test_cifar10_pickle_layout(tmp_path):
    """The official python layout, written from real images of the JPEG pack."""
    real = data.load_cifar10(shared_dataset("cifar10"), max_train=60, max_test=12)
    layout = tmp_path / "cifar10" / "cifar-10-batches-py"
    layout.mkdir(parents=True)
    rows = real.train_images.transpose(0, 3, 1, 2).reshape(-1, 3072)
    for i in range(5):
        batch = {
            b"data": rows[i * 12 : (i + 1) * 12],
            b"labels": real.train_labels[i * 12 : (i + 1) * 12].tolist(),
        }
        (layout / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test_rows = real.test_images.transpose(0, 3, 1, 2).reshape(-1, 3072)
    (layout / "test_batch").write_bytes(
        pickle.dumps({b"data": test_rows, b"labels": real.test_labels.tolist()})
    )
    loaded = data.load_dataset("cifar10", tmp_path)
    assert loaded.train_images.shape == (60, 32, 32, 3)
    assert sorted(loaded.train_labels.tolist()) == sorted(real.train_labels.tolist())
    first = np.flatnonzero(np.all(loaded.train_images == real.train_images[0], axis=(1, 2, 3)))
    assert len(first) >= 1


def test_lookup_order_and_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env-root"))
    assert data.default_data_root() == tmp_path / "env-root"
    assert data.candidate_dirs("mnist")[0] == tmp_path / "env-root" / "mnist"
    assert data.candidate_dirs("mnist", tmp_path / "x")[0] == tmp_path / "x" / "mnist"
    monkeypatch.delenv(data.ENV_VAR)
    assert data.default_data_root() == Path("~/.cache/encouraging-loss/data").expanduser()
    assert Path("/usr/share/datasets/fashion-mnist") in data.candidate_dirs("fashion-mnist")


def test_missing_dataset_message_lists_folders(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.find_dataset("mnist", tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "mnist") in message


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="name"):
        data.find_dataset("imagenet")


def test_debian_path_found_without_root(tmp_path, monkeypatch):
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))  # an empty configured root
    assert data.find_dataset("fashion-mnist") == Path("/usr/share/datasets/fashion-mnist")


def test_splits_hold_out_validation_from_train(data_root):
    dataset = data.load_dataset("fashion-mnist", data_root, max_train=500, max_test=100)
    splits = data.make_splits(dataset, val_fraction=0.2)
    assert len(splits.train_y) == 400 and len(splits.val_y) == 100 and len(splits.test_y) == 100
    assert splits.input_shape == (1, 28, 28)
    assert abs(splits.train_x.mean().item()) < 1e-4  # standardised with train statistics
    with pytest.raises(ValueError, match="val_fraction"):
        data.make_splits(dataset, val_fraction=1.0)


def test_standardized_splits_use_train_statistics():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (20, 5, 6)]
    labels = [rng.integers(0, 3, n) for n in (20, 5, 6)]
    splits = data.standardized_splits(images, labels, num_classes=3)
    assert splits.input_shape == (3, 4, 4) and len(splits.val_y) == 5 and splits.num_classes == 3
    assert splits.train_x.mean(dim=(0, 2, 3)).abs().max().item() < 1e-5
    assert splits.std.shape == (1, 3, 1, 1) and splits.test_y.dtype == torch.int64
    with pytest.raises(ValueError, match="images, labels"):
        data.standardized_splits(images, labels[:2], num_classes=3)
