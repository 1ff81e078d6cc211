"""Readers for image data sets stored on disk: CIFAR-10, MNIST-style idx files, image folders
and ``.npz`` arrays.

Every reader returns ``ImageData(images, labels)``: ``images`` a uint8 tensor [N, C, H, W]
and ``labels`` an int64 tensor [N] or ``None``. A file that is corrupt or does not match its
format raises ``DataFormatError`` (a ``ValueError``) whose message names the file and what
was wrong; files that are simply absent raise ``FileNotFoundError`` naming what is expected
where.

Trust: CIFAR-10 batches are pickles. They are read with a restricted unpickler that only
resolves the few globals a CIFAR batch needs (NumPy's array reconstruction and
``_codecs.encode``), so a crafted batch cannot run code; any other global raises
``DataFormatError``. ``.npz`` files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DataFormatError",
    "ImageData",
    "read_idx",
    "read_mnist",
    "read_cifar10",
    "read_image_folder",
    "read_npz",
    "IMAGE_EXTENSIONS",
    "NPZ_IMAGE_KEYS",
    "NPZ_LABEL_KEYS",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


class DataFormatError(ValueError):
    """A data file is corrupt or does not match its expected format."""


class ImageData(NamedTuple):
    """uint8 images [N, C, H, W] and optional int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")


# --------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# idx type code -> big-endian NumPy dtype (http://yann.lecun.com/exdb/mnist/, "IDX format")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: corrupt or truncated gzip stream ({e})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (gzipped or not, detected from its content) into a NumPy array.

    Header: two zero bytes, a type code, the number of dimensions d, then d big-endian
    uint32 sizes; the payload must hold exactly prod(sizes) items.
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DataFormatError(f"{path}: truncated idx file ({len(data)} bytes, no header)")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(f"{path}: bad idx magic {data[:4].hex()} (expected 0000TTDD with "
                              f"type TT in {sorted(f'{c:02x}' for c in _IDX_DTYPES)}, DD >= 1)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{path}: truncated idx header ({len(data)} bytes, need {header} "
                              f"for {ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataFormatError(f"{path}: idx file {what}: dims {dims} of {dtype.name} need "
                              f"{expected} bytes, file has {len(data)}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx(data_dir: Path, stem: str, subdirs: tuple[str, ...]) -> Path | None:
    for sub in ("", "raw", *subdirs):
        for suffix in ("", ".gz"):
            p = data_dir / sub / f"{stem}{suffix}" if sub else data_dir / f"{stem}{suffix}"
            if p.is_file():
                return p
    return None


def read_mnist(data_dir: str | Path, split: str = "train", *,
               subdirs: tuple[str, ...] = ("MNIST/raw", "FashionMNIST/raw")) -> ImageData:
    """Read MNIST or Fashion-MNIST idx files (same names, same layout) for ``split``.

    Looks for ``{train,t10k}-images-idx3-ubyte`` and ``...-labels-idx1-ubyte`` (optionally
    ``.gz``) in ``data_dir``, ``data_dir/raw`` or torchvision's ``data_dir/<Name>/raw``.
    Returns images [N, 1, H, W] uint8 and labels [N] int64.
    """
    _check_split(split)
    data_dir = Path(data_dir)
    prefix = _MNIST_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_idx(data_dir, s, subdirs) for s in stems]
    if None in paths:
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise FileNotFoundError(
            f"MNIST-style {split} split: missing {', '.join(missing)} (optionally .gz) in "
            f"{data_dir}, {data_dir / 'raw'} or {', '.join(str(data_dir / s) for s in subdirs)}")
    img_path, lab_path = paths
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(f"{img_path}: expected uint8 images of 3 dimensions [N, H, W], "
                              f"got {images.dtype} with shape {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataFormatError(f"{lab_path}: expected uint8 labels of 1 dimension [N], "
                              f"got {labels.dtype} with shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DataFormatError(f"{lab_path}: {labels.shape[0]} labels but {img_path} holds "
                              f"{images.shape[0]} images")
    return ImageData(torch.from_numpy(images.copy())[:, None],
                     torch.from_numpy(labels.astype(np.int64)))


# --------------------------------------------------------------------------------------------
# CIFAR-10 python pickles
# --------------------------------------------------------------------------------------------

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TARBALL = "cifar-10-python.tar.gz"
_CIFAR_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
# np.ndarray's pickle reconstructor, whichever module this NumPy keeps it in
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,   # py3 pickles of bytes, protocol 2
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR batch needs; anything else is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _unpickle_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means a bad file
        raise DataFormatError(f"{source}: not a valid CIFAR-10 pickle batch "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{source}: expected a pickled dict, got {type(obj).__name__}")
    batch = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataFormatError(f"{source}: CIFAR-10 batch is missing key(s) {missing}; found "
                              f"keys {sorted(map(str, batch))}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise DataFormatError(f"{source}: 'data' must be a uint8 array of shape [N, 3072], "
                              f"got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataFormatError(f"{source}: 'labels' is not a list of ints ({e})") from None
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{source}: 'labels' has shape {labels.shape}, expected "
                              f"({data.shape[0]},) to match 'data'")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{source}: labels must lie in 0..9, got "
                              f"[{labels.min()}, {labels.max()}]")
    return data, labels


def _cifar_batches_from_dir(batch_dir: Path, names: tuple[str, ...]) -> list[tuple[bytes, str]]:
    return [((batch_dir / n).read_bytes(), str(batch_dir / n)) for n in names]


def _cifar_batches_from_tar(tar_path: Path, names: tuple[str, ...]) -> list[tuple[bytes, str]]:
    # Members are read in memory, never extracted, so member paths cannot escape data_dir.
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            found = {}
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base in names and member.isreg():
                    f = tar.extractfile(member)
                    found[base] = (f.read(), f"{tar_path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{tar_path}: corrupt or truncated tar archive ({e})") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise DataFormatError(f"{tar_path}: archive lacks CIFAR-10 batch(es) {missing}")
    return [found[n] for n in names]


def read_cifar10(data_dir: str | Path, split: str = "train") -> ImageData:
    """Read CIFAR-10 (python version) for ``split``: images [N, 3, 32, 32] uint8, labels [N].

    ``data_dir`` may be the extracted ``cifar-10-batches-py`` folder, a folder containing it,
    a folder containing ``cifar-10-python.tar.gz``, or that tarball itself (read in place,
    nothing is extracted). The extracted folder wins when both exist. ``train`` is
    ``data_batch_1..5``, ``test`` is ``test_batch``.
    """
    _check_split(split)
    data_dir = Path(data_dir)
    names = _CIFAR_BATCHES[split]
    if data_dir.is_file():
        raws = _cifar_batches_from_tar(data_dir, names)
    else:
        batch_dir = next((d for d in (data_dir, data_dir / _CIFAR_DIR)
                          if (d / names[0]).is_file()), None)
        if batch_dir is not None:
            missing = [n for n in names if not (batch_dir / n).is_file()]
            if missing:
                raise FileNotFoundError(f"CIFAR-10 {split} split: {batch_dir} lacks {missing}")
            raws = _cifar_batches_from_dir(batch_dir, names)
        elif (data_dir / _CIFAR_TARBALL).is_file():
            raws = _cifar_batches_from_tar(data_dir / _CIFAR_TARBALL, names)
        else:
            raise FileNotFoundError(
                f"CIFAR-10 {split} split: expected {data_dir / _CIFAR_DIR}/"
                f"{{{','.join(names)}}} or {data_dir / _CIFAR_TARBALL}")
    parts = [_unpickle_cifar_batch(raw, source) for raw, source in raws]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageData(images, torch.from_numpy(labels))


# --------------------------------------------------------------------------------------------
# image folder (PNG / JPEG via Pillow)
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA")


def _list_images(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(root).as_posix())


def _center_crop_resize(img, size: int):
    from PIL import Image

    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), getattr(Image, "Resampling", Image).BILINEAR)
    return img


def read_image_folder(root: str | Path, *, image_size: int | None = None,
                      channels: int | None = None) -> ImageData:
    """Read every PNG/JPEG under ``root`` (recursively, sorted by relative path) via Pillow.

    Files with other extensions are skipped; a file with an image extension that Pillow
    cannot decode raises ``DataFormatError`` naming it. ``channels`` 1 converts to Pillow
    "L" (ITU-R 601-2 luma), 3 to "RGB" (alpha dropped); ``None`` gives 1 if every image is
    greyscale, else 3. ``image_size`` center-crops each image to a square and resizes it
    (Pillow bilinear, antialiased when shrinking); ``None`` keeps the size, which must then
    be the same for every image. Labels: when every image lies inside a first-level
    subfolder, the label is that subfolder's index in sorted order (as torchvision's
    ``ImageFolder``); otherwise ``None``.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    paths = _list_images(root)
    if not paths:
        raise DataFormatError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    bad = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
    if channels is None:   # headers only: Image.open does not decode pixels
        modes = []
        for p in paths:
            try:
                with Image.open(p) as img:
                    modes.append(img.mode)
            except bad as e:
                raise DataFormatError(f"{p}: not a readable image ({e})") from None
        channels = 1 if all(m in _GREY_MODES for m in modes) else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img = img.convert(mode)   # decodes; truncated data fails here
        except bad as e:
            raise DataFormatError(f"{p}: not a readable image ({e})") from None
        if image_size is not None:
            img = _center_crop_resize(img, image_size)
        arr = np.asarray(img, dtype=np.uint8)
        if arrays and arr.shape != arrays[0].shape:
            raise DataFormatError(f"{p}: image size {img.size[0]}x{img.size[1]} differs from "
                                  f"{paths[0]} ({arrays[0].shape[1]}x{arrays[0].shape[0]}); "
                                  f"pass image_size to resize")
        arrays.append(arr)
    stacked = np.stack(arrays)
    images = torch.from_numpy(stacked[:, None] if channels == 1 else
                              stacked.transpose(0, 3, 1, 2).copy())
    rel = [p.relative_to(root).parts for p in paths]
    labels = None
    if all(len(parts) > 1 for parts in rel):
        classes = sorted({parts[0] for parts in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64)
    log.info("read %d images of shape %s from %s", len(paths), tuple(images.shape[1:]), root)
    return ImageData(images.contiguous(), labels)


# --------------------------------------------------------------------------------------------
# .npz arrays
# --------------------------------------------------------------------------------------------

NPZ_IMAGE_KEYS = ("images", "x", "arr_0", "data")
NPZ_LABEL_KEYS = ("labels", "y")


def _npz_layout(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """-> NCHW. [N, H, W] is greyscale; 4-D is NCHW when dim 1 is 1 or 3 and dim 3 is not,
    otherwise NHWC (so an ambiguous [N, 3, 3, 3] is read as NHWC, NumPy's usual layout)."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3) and arr.shape[3] not in (1, 3):
            return arr
        if arr.shape[3] in (1, 3):
            return arr.transpose(0, 3, 1, 2)
    raise DataFormatError(f"{path}: array {key!r} has shape {arr.shape}; expected [N, H, W], "
                          f"[N, H, W, C] or [N, C, H, W] with C in (1, 3)")


def _npz_to_uint8(arr: np.ndarray, path: Path, key: str) -> np.ndarray:
    """uint8 as is; other integers must lie in 0..255; floats must lie in [0, 1] (* 255,
    rounded)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataFormatError(f"{path}: integer array {key!r} ({arr.dtype}) must lie in "
                                  f"0..255, got [{lo}, {hi}]")
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise DataFormatError(f"{path}: float array {key!r} contains NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise DataFormatError(f"{path}: float array {key!r} must lie in [0, 1], got "
                                  f"[{lo:.4g}, {hi:.4g}]")
        return np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
    raise DataFormatError(f"{path}: array {key!r} has unsupported dtype {arr.dtype}")


def read_npz(path: str | Path, *, key: str | None = None) -> ImageData:
    """Read images (and labels, if present) from a ``.npz`` file, without pickle.

    The image array is ``key`` or the first of ``NPZ_IMAGE_KEYS`` present (or the only array
    in the file); labels are the first of ``NPZ_LABEL_KEYS`` present, [N] integers. Layout
    and value range are detected (see ``_npz_layout`` / ``_npz_to_uint8``): [N, H, W],
    NHWC or NCHW; uint8, integers in 0..255, or floats in [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as e:  # noqa: BLE001 -- zip / header / pickle errors all mean a bad file
        raise DataFormatError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") \
            from None
    if key is None:
        key = next((k for k in NPZ_IMAGE_KEYS if k in arrays), None)
        if key is None and len(arrays) == 1:
            key = next(iter(arrays))
    if key is None or key not in arrays:
        raise DataFormatError(f"{path}: no image array {key or ''}; expected one of "
                              f"{list(NPZ_IMAGE_KEYS)}, found keys {sorted(arrays)}")
    images = _npz_to_uint8(_npz_layout(arrays[key], path, key), path, key)
    labels = None
    label_key = next((k for k in NPZ_LABEL_KEYS if k in arrays and k != key), None)
    if label_key is not None:
        lab = arrays[label_key]
        if lab.shape != (images.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
            raise DataFormatError(f"{path}: labels {label_key!r} must be integers of shape "
                                  f"({images.shape[0]},) to match {key!r}, got {lab.dtype} "
                                  f"with shape {lab.shape}")
        labels = torch.from_numpy(lab.astype(np.int64))
    return ImageData(torch.from_numpy(np.ascontiguousarray(images)), labels)
