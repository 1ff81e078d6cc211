import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fpkern.data.formats import DataFormatError
from fpkern.data.images import IMAGE_SETS, load_digits, load_image_dataset


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def test_registry_names():
    assert set(IMAGE_SETS) == {"digits", "cifar10", "mnist", "fashion_mnist", "folder", "npz"}


def test_digits_default(digits):
    x, y = digits
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.uint8
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert int(x.max()) >= 250 and int(x.min()) == 0
    assert 30 < float(x.float().mean()) < 120
    per_image_std = x.float().flatten(1).std(1)
    assert (per_image_std > 20).all()          # no blank images
    assert len({bytes(img.numpy()) for img in x}) > 1700  # distinct images


def test_digits_native_matches_sklearn_and_resize_preserves_content(digits):
    from sklearn.datasets import load_digits as sk

    native = load_digits(image_size=None).images
    ref = np.rint(sk().images * 255 / 16).astype(np.uint8)
    assert native.shape == (1797, 1, 8, 8)
    assert torch.equal(native[:, 0], torch.from_numpy(ref))
    # 8 -> 16 is bilinear with half-pixel centres (align_corners=False), edges clamped
    src = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)
    i0 = np.floor(src).astype(int)
    w = src - i0
    m = np.zeros((16, 8))
    m[np.arange(16), i0] += 1 - w
    m[np.arange(16), np.minimum(i0 + 1, 7)] += w
    want = np.rint(m @ native[:, 0].double().numpy() @ m.T)
    assert np.abs(digits.images[:, 0].double().numpy() - want).max() <= 1
    assert abs(float(digits.images.float().mean() - native.float().mean())) < 2
    assert load_image_dataset("digits", image_size=28, channels=3).images.shape == (1797, 3, 28, 28)


def test_digits_has_no_test_split():
    with pytest.raises(ValueError, match="only a 'train' split"):
        load_image_dataset("digits", split="test")


def test_unknown_name_and_bad_options():
    with pytest.raises(ValueError, match="cifar10, digits, fashion_mnist, folder, mnist, npz"):
        load_image_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        load_image_dataset("digits", split="val")
    with pytest.raises(ValueError, match="channels"):
        load_image_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_image_dataset("digits", image_size=0)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-python.tar.gz"),
    ("mnist", "train-images-idx3-ubyte"),
    ("fashion_mnist", "t10k-labels-idx1-ubyte"),
    ("folder", "PNG/JPEG"),
    ("npz", "train.npz"),
])
def test_file_sets_need_data_dir(tmp_path, name, expected):
    with pytest.raises(ValueError, match=f"{name}.*data_dir.*{expected}"):
        load_image_dataset(name)
    with pytest.raises(FileNotFoundError, match=expected):
        load_image_dataset(name, tmp_path / "missing")


def test_cifar_via_entry_point_resize_and_grey(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    data = np.zeros((2, 3, 32, 32), np.uint8)
    data[:, 0] = 255                      # pure red
    (d / "test_batch").write_bytes(pickle.dumps({b"data": data.reshape(2, -1),
                                                 b"labels": [3, 4]}, protocol=2))
    out = load_image_dataset("cifar10", tmp_path, split="test", image_size=16, channels=1)
    assert out.images.shape == (2, 1, 16, 16) and out.images.dtype == torch.uint8
    assert (out.images == 76).all()       # luma of (255, 0, 0) = 76.245
    assert out.labels.tolist() == [3, 4]


def test_folder_and_npz_splits(tmp_path):
    (tmp_path / "arrs").mkdir()
    for split, value in (("train", 10), ("test", 20)):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(tmp_path / "imgs" / split / "a.png")
        np.savez(tmp_path / "arrs" / f"{split}.npz", x=np.full((3, 4, 4), value, np.uint8))
    for name, sub in (("folder", "imgs"), ("npz", "arrs")):
        assert int(load_image_dataset(name, tmp_path / sub).images.max()) == 10
        assert int(load_image_dataset(name, tmp_path / sub, split="test").images.max()) == 20
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(flat / "a.png")
    assert load_image_dataset("folder", flat).images.shape == (1, 1, 4, 4)
    with pytest.raises(FileNotFoundError, match="no test split"):
        load_image_dataset("folder", flat, split="test")
    single = tmp_path / "arrs" / "train.npz"
    assert load_image_dataset("npz", single, image_size=8).images.shape == (3, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="single file"):
        load_image_dataset("npz", single, split="test")


def test_format_errors_pass_through(tmp_path):
    (tmp_path / "train.npz").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match="train.npz"):
        load_image_dataset("npz", tmp_path)
