"""Data: the Gaussian-mixture oracle, 2-D toy sets, embedded digits and real image formats."""

from fpkern.data.formats import (DataFormatError, ImageData, read_cifar10, read_idx,
                                 read_image_folder, read_mnist, read_npz)
from fpkern.data.images import IMAGE_SETS, load_digits, load_image_dataset
from fpkern.data.mixture import GaussianMixture
from fpkern.data.toy2d import TOY_SETS, sample_toy
from fpkern.data.transforms import (ImageDataset, center, convert_channels, dequantize,
                                    prepare_images, quantize, random_hflip, resize_images,
                                    to_unit_interval, uncenter)

__all__ = [
    "GaussianMixture", "TOY_SETS", "sample_toy", "IMAGE_SETS", "load_image_dataset",
    "load_digits", "ImageData", "DataFormatError", "ImageDataset", "prepare_images",
    "dequantize", "random_hflip", "center", "uncenter", "quantize", "to_unit_interval",
    "resize_images", "convert_channels", "read_cifar10", "read_mnist", "read_idx",
    "read_image_folder", "read_npz",
]
