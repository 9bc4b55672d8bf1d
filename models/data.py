"""Datasets the models are trained, calibrated and evaluated on.

Fashion-MNIST is resolved in this order: an explicit ``root`` -> a torchvision
download (when online) -> the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, read in place) -> the small subset
bundled with the package (1,000 train + 1,000 test images).
ImageNet comes from an ImageFolder root (``train/`` for calibration, ``val/``
for evaluation) with the transforms timm resolves for the model.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

log = logging.getLogger(__name__)

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
BUNDLED_FMNIST = Path(__file__).parent / "assets" / "fmnist_subset.safetensors"
CACHE_DIR = Path(os.environ.get("VIT_SNN_CACHE", Path.home() / ".cache" / "vit-snn"))


@dataclass
class ResolvedData:
    """A dataset plus where it came from (printed so numbers can be read right)."""
    dataset: Dataset
    source: str
    subset: bool = False


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(dims))


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fmnist_folder(root: Path) -> Optional[Path]:
    """The folder under ``root`` that holds the IDX files (flat or torchvision layout)."""
    for folder in (root, root / "raw", root / "FashionMNIST" / "raw"):
        if all(_find_idx(folder, s) for s in FMNIST_FILES["test"] + FMNIST_FILES["train"]):
            return folder
    return None


def fmnist_tensors(images: np.ndarray | torch.Tensor, labels) -> TensorDataset:
    """uint8 images [N, 28, 28] -> normalised float [N, 1, 28, 28] with int64 labels."""
    x = torch.as_tensor(np.array(images), dtype=torch.float32).unsqueeze(1) / 255.0
    x = (x - FMNIST_MEAN) / FMNIST_STD
    return TensorDataset(x, torch.as_tensor(np.array(labels), dtype=torch.int64))


def _from_folder(folder: Path, split: str) -> TensorDataset:
    img_stem, lbl_stem = FMNIST_FILES[split]
    images = read_idx(_find_idx(folder, img_stem))
    labels = read_idx(_find_idx(folder, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in {folder} do not match: {images.shape} images, {labels.shape} labels")
    return fmnist_tensors(images, labels)


def _try_download() -> Optional[Path]:
    """torchvision's download into the cache; None when offline."""
    import torchvision

    root = CACHE_DIR / "data"
    try:
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # offline: any network error ends this step of the chain
        log.info("Fashion-MNIST download unavailable (%s)", exc.__class__.__name__)
        return None
    return _fmnist_folder(root)


def load_bundled_fmnist(split: str) -> TensorDataset:
    from safetensors.torch import load_file

    tensors = load_file(str(BUNDLED_FMNIST))
    return fmnist_tensors(tensors[f"{split}_images"].numpy(), tensors[f"{split}_labels"].numpy())


def fashion_mnist(split: str, root: Optional[str] = None, download: bool = True,
                  system_dir: Path = DEBIAN_FMNIST) -> ResolvedData:
    """Fashion-MNIST ``split`` ('train' or 'test') through the resolution chain."""
    if split not in FMNIST_FILES:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    if root:
        path = Path(root).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data root {path} does not exist: pass data.root=DIR with the Fashion-MNIST IDX files")
        folder = _fmnist_folder(path)
        if folder is None:
            raise ValueError(f"data root {path} holds no Fashion-MNIST files "
                             f"(expected {', '.join(FMNIST_FILES['train'] + FMNIST_FILES['test'])}, optionally .gz)")
        return ResolvedData(_from_folder(folder, split), str(folder))
    if download:
        folder = _try_download()
        if folder is not None:
            return ResolvedData(_from_folder(folder, split), str(folder))
    folder = _fmnist_folder(system_dir)
    if folder is not None:
        return ResolvedData(_from_folder(folder, split), str(folder))
    return ResolvedData(load_bundled_fmnist(split), f"bundled subset ({BUNDLED_FMNIST.name})", subset=True)


def _read_image(path: str):
    """An RGB image; a file PIL cannot read is a ValueError naming it (not a crash in the middle of a run)."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"cannot read image file {path} ({exc.__class__.__name__}): remove or replace it") from None


def image_folder(root: str, split: str, model) -> ResolvedData:
    """ImageNet-style ImageFolder ``root/split`` with timm's eval transforms for ``model``."""
    import timm.data
    import torchvision

    path = Path(root).expanduser() / split
    if not path.is_dir():
        raise FileNotFoundError(f"data root {path} does not exist: pass data.root=DIR holding train/ and val/ ImageFolders")
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    try:
        ds = torchvision.datasets.ImageFolder(str(path), transform=transform, loader=_read_image)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"data root {path} holds no images: {exc}") from None
    return ResolvedData(ds, str(path))


def cifar(name: str, split: str, root: Optional[str], model) -> ResolvedData:
    """CIFAR-10/100 through torchvision (download when online), resized for ``model``."""
    import timm.data
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    folder = Path(root).expanduser() if root else CACHE_DIR / "data"
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    try:
        ds = cls(str(folder), train=(split == "train"), transform=transform, download=root is None)
    except Exception as exc:
        raise FileNotFoundError(f"{name} is not in {folder} and could not be downloaded ({exc.__class__.__name__}): "
                                f"pass data.root=DIR holding torchvision's {name} files") from None
    return ResolvedData(ds, str(folder))


def load_dataset(cfg, split: str, model=None) -> ResolvedData:
    """Dispatch on ``cfg.name`` (a data config group entry)."""
    if cfg.name == "fashion_mnist":
        return fashion_mnist(split, cfg.root, cfg.download)
    if cfg.name == "imagenet":
        if not cfg.root:
            raise ValueError("ImageNet needs data.root=DIR (an ImageFolder root with train/ and val/)")
        return image_folder(cfg.root, {"train": "train", "test": "val"}[split], model)
    if cfg.name in ("cifar10", "cifar100"):
        return cifar(cfg.name, split, cfg.root, model)
    raise ValueError(f"unknown data set {cfg.name!r}: use fashion_mnist, imagenet, cifar10 or cifar100")
