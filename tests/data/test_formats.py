import gzip
import io
import pickle
import pickletools
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fpkern.data.formats import (DataFormatError, read_cifar10, read_idx, read_image_folder,
                                 read_mnist, read_npz)

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------ CIFAR-10

def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    return {b"batch_label": b"batch", b"data": data, b"labels": labels,
            b"filenames": [b"x.png"] * n}


def _cifar_names():
    return [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _write_cifar_dir(root: Path, n=3):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for i, name in enumerate(_cifar_names()):
        batches[name] = _cifar_batch(n + i, seed=i)
        (d / name).write_bytes(pickle.dumps(batches[name], protocol=2))
    return d, batches


def _expected(batches, names):
    data = np.concatenate([batches[n][b"data"] for n in names]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([batches[n][b"labels"] for n in names])
    return torch.from_numpy(data), torch.from_numpy(labels)


def test_cifar_dir_round_trip(tmp_path):
    d, batches = _write_cifar_dir(tmp_path)
    train = read_cifar10(tmp_path, "train")
    x, y = _expected(batches, _cifar_names()[:5])
    assert train.images.dtype == torch.uint8 and train.images.shape == (3 * 5 + 10, 3, 32, 32)
    assert torch.equal(train.images, x) and torch.equal(train.labels, y)
    assert train.labels.dtype == torch.int64
    test = read_cifar10(d, "test")  # the batches folder itself works too
    x, y = _expected(batches, ["test_batch"])
    assert torch.equal(test.images, x) and torch.equal(test.labels, y)
    # channel planes: pixel (c, 0, 1) is byte c * 1024 + 1 of the row
    assert test.images[0, 2, 0, 1] == batches["test_batch"][b"data"][0, 2 * 1024 + 1]


def test_cifar_tarball_round_trip(tmp_path):
    src, batches = _write_cifar_dir(tmp_path / "src")
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    for where in (tmp_path, tar_path):
        train = read_cifar10(where, "train")
        x, y = _expected(batches, _cifar_names()[:5])
        assert torch.equal(train.images, x) and torch.equal(train.labels, y)
    test = read_cifar10(tmp_path, "test")
    assert torch.equal(test.images, _expected(batches, ["test_batch"])[0])


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), as the original CIFAR files do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_py2_str


def test_cifar_python2_era_pickle(tmp_path):
    d, batches = _write_cifar_dir(tmp_path)
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(batches["test_batch"])
    raw = buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in raw
    assert not any("UNICODE" in op.name for op, _, _ in pickletools.genops(raw))
    (d / "test_batch").write_bytes(raw)
    x, y = _expected(batches, ["test_batch"])
    got = read_cifar10(tmp_path, "test")
    assert torch.equal(got.images, x) and torch.equal(got.labels, y)


def test_cifar_str_keys_accepted(tmp_path):
    d, batches = _write_cifar_dir(tmp_path)
    b = batches["test_batch"]
    (d / "test_batch").write_bytes(pickle.dumps({"data": b[b"data"], "labels": b[b"labels"]}))
    assert torch.equal(read_cifar10(tmp_path, "test").labels, torch.tensor(b[b"labels"]))


def test_cifar_wrong_keys(tmp_path):
    d, batches = _write_cifar_dir(tmp_path)
    b = batches["data_batch_3"]
    (d / "data_batch_3").write_bytes(pickle.dumps({b"images": b[b"data"], b"labels": []}))
    with pytest.raises(DataFormatError, match=r"data_batch_3.*missing key.*'data'"):
        read_cifar10(tmp_path, "train")


@pytest.mark.parametrize("bad, match", [
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"shape \[N, 3072\]"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"'labels' has shape"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"0\.\.9"),
    ([1, 2, 3], "expected a pickled dict"),
])
def test_cifar_bad_contents(tmp_path, bad, match):
    d, _ = _write_cifar_dir(tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataFormatError, match=match) as e:
        read_cifar10(tmp_path, "test")
    assert "test_batch" in str(e.value)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_cifar_refuses_arbitrary_globals(tmp_path):
    d, _ = _write_cifar_dir(tmp_path)
    target = tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(target), b"labels": []}))
    with pytest.raises(DataFormatError, match=r"test_batch.*refusing to load global"):
        read_cifar10(tmp_path, "test")
    assert not target.exists()


def test_cifar_truncated_pickle_and_tar(tmp_path):
    d, _ = _write_cifar_dir(tmp_path / "a")
    raw = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="test_batch.*not a valid CIFAR-10 pickle"):
        read_cifar10(tmp_path / "a", "test")

    src, _ = _write_cifar_dir(tmp_path / "b")
    tar_path = tmp_path / "c" / "cifar-10-python.tar.gz"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    raw = tar_path.read_bytes()
    tar_path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match="cifar-10-python.tar.gz.*corrupt or truncated"):
        read_cifar10(tmp_path / "c", "train")


def test_cifar_tar_missing_batch(tmp_path):
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        raw = pickle.dumps(_cifar_batch(2, 0), protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    assert read_cifar10(tmp_path, "test").images.shape == (2, 3, 32, 32)
    with pytest.raises(DataFormatError, match=r"tar.gz.*lacks.*data_batch_1"):
        read_cifar10(tmp_path, "train")


def test_cifar_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*cifar-10-python.tar.gz"):
        read_cifar10(tmp_path, "train")
    d, _ = _write_cifar_dir(tmp_path)
    (d / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4"):
        read_cifar10(tmp_path, "train")


# ------------------------------------------------------------------------------------- idx

def _idx_bytes(arr: np.ndarray, code=0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) \
        + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_mnist(root: Path, prefix: str, n: int, gz: bool, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images),
                      (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(arr)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    images, labels = _write_mnist(tmp_path, "train", 7, gz)
    test_images, _ = _write_mnist(tmp_path, "t10k", 4, gz, seed=1)
    data = read_mnist(tmp_path, "train")
    assert data.images.shape == (7, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.labels, torch.from_numpy(labels.astype(np.int64)))
    assert torch.equal(read_mnist(tmp_path, "test").images[:, 0], torch.from_numpy(test_images))


def test_mnist_torchvision_layout(tmp_path):
    images, _ = _write_mnist(tmp_path / "FashionMNIST" / "raw", "train", 3, gz=True)
    assert torch.equal(read_mnist(tmp_path, "train").images[:, 0], torch.from_numpy(images))


def test_read_idx_other_dtypes(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    (tmp_path / "a").write_bytes(_idx_bytes(arr, code=0x0C))
    out = read_idx(tmp_path / "a")
    assert out.dtype == np.int32 and np.array_equal(out, arr)
    f = np.linspace(0, 1, 6).astype(np.float32)
    (tmp_path / "b").write_bytes(_idx_bytes(f, code=0x0D))
    assert np.array_equal(read_idx(tmp_path / "b"), f)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    _write_mnist(tmp_path, "train", 5, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    raw = p.read_bytes()[:-10]
    if gz:
        p.unlink()
        p = tmp_path / "train-images-idx3-ubyte.gz"
        raw = gzip.compress(raw)
    p.write_bytes(raw)
    with pytest.raises(DataFormatError, match=r"train-images-idx3-ubyte.*truncated"):
        read_mnist(tmp_path, "train")


def test_idx_trailing_bytes_and_short_header(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(_idx_bytes(np.zeros((2, 2), np.uint8)) + b"\0")
    with pytest.raises(DataFormatError, match="x: idx file has trailing bytes"):
        read_idx(p)
    p.write_bytes(b"\0\0\x08\x03\0\0\0\x02")
    with pytest.raises(DataFormatError, match="truncated idx header"):
        read_idx(p)
    p.write_bytes(b"\0\0")
    with pytest.raises(DataFormatError, match="no header"):
        read_idx(p)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x03", b"\x00\x00\x07\x03", b"\x00\x00\x08\x00"])
def test_idx_bad_magic(tmp_path, magic):
    _write_mnist(tmp_path, "train", 2, gz=False)
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(magic + p.read_bytes()[4:])
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte.*bad idx magic"):
        read_mnist(tmp_path, "train")


def test_idx_corrupt_gzip(tmp_path):
    _write_mnist(tmp_path, "train", 2, gz=True)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 12])
    with pytest.raises(DataFormatError, match=r"idx3-ubyte.gz.*gzip"):
        read_mnist(tmp_path, "train")


def test_mnist_mismatched_files(tmp_path):
    _write_mnist(tmp_path, "train", 4, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: 3 labels.*4 images"):
        read_mnist(tmp_path, "train")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros((4, 28, 28), np.uint8)))
    with pytest.raises(DataFormatError, match=r"train-labels-idx1-ubyte: expected uint8 labels"):
        read_mnist(tmp_path, "train")


def test_mnist_missing_files(tmp_path):
    _write_mnist(tmp_path, "train", 2, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        read_mnist(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        read_mnist(tmp_path, "test")


# ------------------------------------------------------------------------------ image folder

def _save(path: Path, arr: np.ndarray, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return arr


def test_folder_png_round_trip_with_labels(tmp_path):
    a = _save(tmp_path / "cat" / "b.png", RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    b = _save(tmp_path / "cat" / "sub" / "a.png", RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    c = _save(tmp_path / "ant" / "z.PNG", RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = read_image_folder(tmp_path)
    assert data.images.dtype == torch.uint8 and data.images.shape == (3, 3, 5, 7)
    # sorted by relative path: ant/z.PNG, cat/b.png, cat/sub/a.png
    for got, want in zip(data.images, (c, a, b)):
        assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1))
    assert data.labels.tolist() == [0, 1, 1]


def test_folder_grey_and_channel_conversion(tmp_path):
    g = _save(tmp_path / "g.png", RNG.integers(0, 256, (6, 6), dtype=np.uint8))
    data = read_image_folder(tmp_path)
    assert data.images.shape == (1, 1, 6, 6) and data.labels is None
    assert torch.equal(data.images[0, 0], torch.from_numpy(g))
    rgb = read_image_folder(tmp_path, channels=3).images
    assert rgb.shape == (1, 3, 6, 6) and all(torch.equal(rgb[0, i], rgb[0, 0]) for i in range(3))
    c = _save(tmp_path / "c.png", RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    mixed = read_image_folder(tmp_path)
    assert mixed.images.shape == (2, 3, 6, 6)  # one colour image -> RGB for all
    grey = read_image_folder(tmp_path, channels=1).images
    assert torch.equal(grey[0, 0], torch.from_numpy(np.array(Image.fromarray(c).convert("L"))))


def test_folder_jpeg_and_resize(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)   # green | red | blue | green: the centre crop
    img[:, :20] = img[:, 60:] = (10, 200, 10)  # keeps only the red and blue halves
    img[:, 20:40] = (200, 40, 10)
    img[:, 40:60] = (10, 40, 200)
    _save(tmp_path / "x.jpg", img, quality=95)
    _save(tmp_path / "y.jpeg", np.full((20, 20, 3), 128, np.uint8), quality=95)
    with pytest.raises(DataFormatError, match=r"y.jpeg: image size 20x20 differs.*80x40"):
        read_image_folder(tmp_path)
    data = read_image_folder(tmp_path, image_size=8)
    assert data.images.shape == (2, 3, 8, 8)
    x = data.images[0].int()
    assert (x[0, :, 0] > 150).all() and (x[2, :, -1] > 150).all()
    assert (x[1] < 100).all()
    assert ((data.images[1].int() - 128).abs() <= 3).all()


def test_folder_corrupt_image(tmp_path):
    _save(tmp_path / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DataFormatError, match=r"bad.png: not a readable image"):
        read_image_folder(tmp_path)
    (tmp_path / "bad.png").unlink()
    raw = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataFormatError, match=r"trunc.png: not a readable image"):
        read_image_folder(tmp_path)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataFormatError, match="no image files"):
        read_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "nope")


# --------------------------------------------------------------------------------------- npz

def test_npz_layouts_and_dtypes(tmp_path):
    nhwc = RNG.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    nchw = nhwc.transpose(0, 3, 1, 2)
    labels = np.arange(4)
    np.savez(tmp_path / "a.npz", x=nhwc, y=labels)
    np.savez(tmp_path / "b.npz", images=nchw)
    np.savez(tmp_path / "c.npz", nhwc.astype(np.float32) / 255)   # arr_0, floats in [0, 1]
    np.savez(tmp_path / "d.npz", data=nhwc[..., 0].astype(np.int64))  # [N, H, W] ints
    want = torch.from_numpy(nchw.copy())
    a = read_npz(tmp_path / "a.npz")
    assert a.images.dtype == torch.uint8 and torch.equal(a.images, want)
    assert torch.equal(a.labels, torch.arange(4))
    b = read_npz(tmp_path / "b.npz")
    assert torch.equal(b.images, want) and b.labels is None
    assert torch.equal(read_npz(tmp_path / "c.npz").images, want)
    assert torch.equal(read_npz(tmp_path / "d.npz").images, want[:, :1])
    np.savez(tmp_path / "e.npz", samples=nhwc)
    assert torch.equal(read_npz(tmp_path / "e.npz").images, want)  # single array, any key
    np.savez(tmp_path / "f.npz", foo=nhwc, bar=nchw)
    assert torch.equal(read_npz(tmp_path / "f.npz", key="bar").images, want)
    # floats are rounded to the nearest level, not truncated
    near = np.clip((nhwc.astype(np.float64) - 0.3) / 255, 0, 1)
    np.savez(tmp_path / "g.npz", x=near)
    assert torch.equal(read_npz(tmp_path / "g.npz").images, want)
    # ambiguous [N, 3, W, 3] is read as NHWC
    amb = RNG.integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "h.npz", x=amb)
    assert torch.equal(read_npz(tmp_path / "h.npz").images,
                       torch.from_numpy(amb).permute(0, 3, 1, 2))


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 5, 6, 3), np.uint8), "y": np.arange(3)}, r"labels 'y'.*shape \(4,\)"),
    ({"x": np.zeros((4, 5, 6, 2), np.uint8)}, r"'x' has shape \(4, 5, 6, 2\)"),
    ({"x": np.zeros((2, 4, 5, 6, 3), np.uint8)}, "has shape"),
    ({"x": np.full((2, 4, 4), 1.5, np.float32)}, r"must lie in \[0, 1\]"),
    ({"x": np.full((2, 4, 4), -0.5, np.float32)}, r"must lie in \[0, 1\]"),
    ({"x": np.full((2, 4, 4), np.nan, np.float32)}, "NaN"),
    ({"x": np.full((2, 4, 4), 300, np.int32)}, r"0\.\.255"),
    ({"x": np.zeros((2, 4, 4), np.complex64)}, "unsupported dtype"),
    ({"foo": np.zeros((2, 4, 4), np.uint8), "bar": np.zeros(2)},
     r"no image array.*\['bar', 'foo'\]"),
])
def test_npz_bad_contents(tmp_path, arrays, match):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataFormatError, match=match) as e:
        read_npz(p)
    assert "bad.npz" in str(e.value)


def test_npz_not_a_zip_and_object_arrays(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"PK not really")
    with pytest.raises(DataFormatError, match="junk.npz: not a readable .npz"):
        read_npz(p)
    np.savez(p, x=np.array([object()] * 2, dtype=object))
    with pytest.raises(DataFormatError, match="junk.npz"):   # allow_pickle=False
        read_npz(p)
