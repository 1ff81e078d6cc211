import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from fpkern.data.transforms import (ImageDataset, center, convert_channels, dequantize,
                                    prepare_images, quantize, random_hflip, resize_images,
                                    to_unit_interval, uncenter)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n=8, c=3, h=5, w=7, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=_gen(seed), dtype=torch.uint8)


def test_to_unit_interval_and_center_range():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    u = to_unit_interval(x)
    assert u.dtype == torch.float32
    assert torch.allclose(u.flatten(), torch.tensor([0, 1 / 255, 128 / 255, 1.0]))
    c = center(u)
    assert float(c.min()) == -1.0 and float(c.max()) == 1.0
    with pytest.raises(TypeError, match="uint8"):
        to_unit_interval(u)


def test_center_inverse():
    x = torch.rand(4, 3, 6, 6, generator=_gen(), dtype=torch.float64)
    assert torch.allclose(uncenter(center(x)), x, atol=1e-15)
    assert torch.allclose(center(uncenter(x * 2 - 1)), x * 2 - 1, atol=1e-15)


def test_dequantize_range_mean_and_quantize_inverse():
    k = torch.arange(256, dtype=torch.uint8).repeat(400).reshape(400, 1, 16, 16)
    y = dequantize(k, _gen())
    assert y.dtype == torch.float32 and float(y.min()) >= 0 and float(y.max()) <= 1
    mean = y.reshape(400, 256).mean(0)
    want = (torch.arange(256) + 0.5) / 256
    assert torch.allclose(mean, want, atol=0.05 / 256 * 16)   # 400 draws of U/256 per level
    # each value stays in its own bin: floor(256 y) == k
    assert torch.equal(quantize(y), k)
    assert torch.equal(quantize(to_unit_interval(k)), k)
    assert torch.equal(dequantize(k, _gen(5)), dequantize(k, _gen(5)))
    assert not torch.equal(dequantize(k, _gen(5)), dequantize(k, _gen(6)))


def test_random_hflip():
    x = _images(200)
    y = random_hflip(x, _gen())
    same = (y == x).flatten(1).all(1)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 60 < int(flipped.sum()) < 140
    assert torch.equal(y, random_hflip(x, _gen()))
    assert torch.equal(random_hflip(x, _gen(), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x[0], _gen(), p=0.0), x[0])


@pytest.mark.parametrize("centered", [False, True])
def test_prepare_images(centered):
    x = _images(16)
    y = prepare_images(x, generator=_gen(), random_flip=True, uniform_dequantization=True,
                       centered=centered)
    assert y.shape == x.shape and y.dtype == torch.float32
    lo, hi = (-1, 1) if centered else (0, 1)
    assert float(y.min()) >= lo and float(y.max()) <= hi
    back = quantize(uncenter(y) if centered else y)
    assert torch.equal(back, random_hflip(x, _gen()))   # same generator order: flip, then noise
    plain = prepare_images(x, centered=centered)
    assert torch.allclose(plain, center(x / 255) if centered else x / 255)


def test_resize_images():
    x = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(resize_images(x, 16), torch.full((2, 3, 16, 16), 77, dtype=torch.uint8))
    assert resize_images(x, 8) is x
    y = _images(3, 1, 32, 32)
    small = resize_images(y, 8, chunk=2)
    assert small.shape == (3, 1, 8, 8) and small.dtype == torch.uint8
    # antialiased shrink by 4 is close to 4x4 box averages
    box = y.float().reshape(3, 1, 8, 4, 8, 4).mean((3, 5))
    assert (small.float() - box).abs().mean() < 12
    with pytest.raises(ValueError, match="image_size"):
        resize_images(y, 0)


def test_convert_channels_matches_pillow():
    x = _images(2, 3, 6, 5)
    grey = convert_channels(x, 1)
    for i in range(2):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy()).convert("L")
        assert torch.equal(grey[i, 0], torch.from_numpy(np.array(pil)))
    rgb = convert_channels(grey, 3)
    assert rgb.shape == (2, 3, 6, 5) and torch.equal(rgb[:, 2], grey[:, 0])
    assert convert_channels(x, 3) is x
    with pytest.raises(ValueError, match="channels"):
        convert_channels(x, 2)


def test_image_dataset_deterministic_and_epochs():
    x = _images(10)
    kw = dict(random_flip=True, uniform_dequantization=True, centered=True, seed=7)
    a, b = ImageDataset(x, **kw), ImageDataset(x, **kw)
    assert len(a) == 10
    item = a[3]
    assert item.shape == (3, 5, 7) and item.dtype == torch.float32
    assert float(item.min()) >= -1 and float(item.max()) <= 1
    assert torch.equal(item, b[3]) and torch.equal(item, a[3]) and torch.equal(a[-7], item)
    same = ImageDataset(x[:1].expand(4, -1, -1, -1), **kw)   # identical images:
    assert not torch.equal(same[0], same[1])                   # noise differs per index
    a.set_epoch(1)
    assert not torch.equal(a[3], item)
    assert not torch.equal(ImageDataset(x, **{**kw, "seed": 8})[3], item)
    plain = ImageDataset(x)
    assert torch.equal(plain[2], x[2] / 255)
    with pytest.raises(IndexError):
        a[10]
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(x, torch.zeros(3, dtype=torch.long))


def test_image_dataset_with_distributed_sampler_and_workers():
    x = _images(11)
    ds = ImageDataset(x, random_flip=True, uniform_dequantization=True, seed=1)
    full = torch.stack([ds[i] for i in range(len(ds))])
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(0)
        idx = list(sampler)
        batches = list(DataLoader(ds, batch_size=4, sampler=sampler,
                                  num_workers=2 if rank == 0 else 0))
        got = torch.cat(batches)
        assert torch.equal(got, full[idx])    # items do not depend on rank, order or workers
        seen += idx
    assert sorted(set(seen)) == list(range(11))
