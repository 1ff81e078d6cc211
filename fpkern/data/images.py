"""Image data sets by name: ``load_image_dataset(name, data_dir, split=..., image_size=...,
channels=...)`` and its plain-dict registry ``IMAGE_SETS``.

=============  =================================================================================
name           source (native size)
=============  =================================================================================
digits         scikit-learn's handwritten digits, shipped inside the package (no download):
               1797 8x8 images, grey levels 0..16 mapped to round(v * 255 / 16), resized to
               16x16 by default (bilinear, see ``resize_images``); only a ``train`` split
cifar10        ``data_dir``: ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (3x32x32)
mnist          ``data_dir``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (1x28x28)
fashion_mnist  same file names and layout as mnist
folder         ``data_dir``: PNG/JPEG files, recursively; ``data_dir/<split>/`` if it exists,
               else ``data_dir`` itself as the train split
npz            ``data_dir``: an ``.npz`` file (the train split) or a folder with
               ``<split>.npz``; see ``read_npz`` for keys, layouts and value ranges
=============  =================================================================================

Every set returns ``ImageData(images, labels)``: uint8 [N, C, H, W] and int64 [N] labels (or
``None``). ``image_size`` resizes to a square (``None`` keeps the native size, 16 for
digits); ``channels`` converts to 1 (luma) or 3 (grey repeated) channels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .formats import ImageData, read_cifar10, read_image_folder, read_mnist, read_npz, SPLITS
from .transforms import convert_channels, resize_images

__all__ = ["IMAGE_SETS", "load_image_dataset", "load_digits", "DIGITS_SIZE"]

log = logging.getLogger(__name__)

DIGITS_SIZE = 16


def load_digits(image_size: int | None = DIGITS_SIZE) -> ImageData:
    """scikit-learn's 1797 handwritten digits as uint8 [1797, 1, S, S] with labels 0..9.

    The 0..16 grey levels become round(v * 255 / 16); the 8x8 images are resized to
    ``image_size`` (default 16; ``None`` keeps 8) with ``resize_images`` (bilinear).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    grey = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255 / 16)).astype(np.uint8)
    images = torch.from_numpy(grey)[:, None].contiguous()
    if image_size is not None:
        images = resize_images(images, image_size)
    return ImageData(images, torch.as_tensor(bunch.target, dtype=torch.int64))


def _need_dir(name: str, data_dir: str | Path | None, expected: str) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from files: pass data_dir, {expected}")
    path = Path(data_dir)
    if not path.exists():
        raise FileNotFoundError(f"dataset {name!r}: data_dir {path} does not exist; {expected}")
    return path


_EXPECTED = {
    "cifar10": "a folder holding cifar-10-batches-py/{data_batch_1..5,test_batch} "
               "or cifar-10-python.tar.gz",
    "mnist": "a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
             "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz)",
    "folder": "a folder of PNG/JPEG images (searched recursively; a train/ or test/ subfolder "
              "selects the split)",
    "npz": "an .npz file (the train split) or a folder holding train.npz / test.npz",
}
_EXPECTED["fashion_mnist"] = _EXPECTED["mnist"]


def _digits(*, data_dir, split, image_size, channels) -> ImageData:
    if split != "train":
        raise ValueError("dataset 'digits' has only a 'train' split (all 1797 images), "
                         f"got split={split!r}")
    if data_dir is not None:
        log.debug("dataset 'digits' ships with scikit-learn; ignoring data_dir=%s", data_dir)
    return load_digits(DIGITS_SIZE if image_size is None else image_size)


def _cifar10(*, data_dir, split, image_size, channels) -> ImageData:
    return read_cifar10(_need_dir("cifar10", data_dir, _EXPECTED["cifar10"]), split)


def _mnist(*, data_dir, split, image_size, channels) -> ImageData:
    return read_mnist(_need_dir("mnist", data_dir, _EXPECTED["mnist"]), split)


def _fashion_mnist(*, data_dir, split, image_size, channels) -> ImageData:
    return read_mnist(_need_dir("fashion_mnist", data_dir, _EXPECTED["fashion_mnist"]), split)


def _folder(*, data_dir, split, image_size, channels) -> ImageData:
    root = _need_dir("folder", data_dir, _EXPECTED["folder"])
    if (root / split).is_dir():
        root = root / split
    elif split != "train":
        raise FileNotFoundError(f"dataset 'folder': no {split} split, expected a folder "
                                f"{root / split}")
    # Pillow resizes and converts each image itself (sizes may differ between files).
    return read_image_folder(root, image_size=image_size, channels=channels)


def _npz(*, data_dir, split, image_size, channels) -> ImageData:
    path = _need_dir("npz", data_dir, _EXPECTED["npz"])
    if path.is_dir():
        path = path / f"{split}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"dataset 'npz': {path} does not exist; expected "
                                    f"{_EXPECTED['npz']}")
    elif split != "train":
        raise FileNotFoundError(f"dataset 'npz': {path} is a single file (the train split); "
                                f"for split {split!r} pass a folder holding {split}.npz")
    return read_npz(path)


ImageLoader = Callable[..., ImageData]

IMAGE_SETS: dict[str, ImageLoader] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "mnist": _mnist,
    "fashion_mnist": _fashion_mnist,
    "folder": _folder,
    "npz": _npz,
}


def load_image_dataset(name: str, data_dir: str | Path | None = None, *, split: str = "train",
                       image_size: int | None = None, channels: int | None = None) -> ImageData:
    """Load the image set ``name`` (a key of ``IMAGE_SETS``) as uint8 [N, C, H, W] + labels.

    name: one of digits, cifar10, mnist, fashion_mnist, folder, npz.
    data_dir: where file-based sets live (see the module table); ignored for digits.
    split: "train" or "test".
    image_size: square output size; None keeps the native size (16 for digits).
    channels: 1 or 3 to convert; None keeps the native channels.
    """
    loader = IMAGE_SETS.get(name) if isinstance(name, str) else None
    if loader is None:
        raise ValueError(f"unknown image data set {name!r}; valid names: "
                         f"{', '.join(sorted(IMAGE_SETS))}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    images, labels = loader(data_dir=data_dir, split=split, image_size=image_size,
                            channels=channels)
    if image_size is not None:
        images = resize_images(images, image_size)
    if channels is not None:
        images = convert_channels(images, channels)
    log.info("loaded %s/%s: %d images of shape %s", name, split, images.shape[0],
             tuple(images.shape[1:]))
    return ImageData(images, labels)
