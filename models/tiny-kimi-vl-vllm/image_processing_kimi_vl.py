"""Kimi-VL image preprocessing as remote code for transformers' AutoImageProcessor (trust_remote_code), so that
vLLM's Kimi-VL can load the bundled vLLM-shaped Kimi checkpoint. It implements exactly data/processor.py's
KimiProcessor.preprocess_image (tests/test_kimi_remote_code.py checks them equal): shrink to at most
in_token_limit patches (PIL bicubic), pad right and bottom with black to multiples of patch * merge, scale to
[0, 1] and normalize per channel, cut into patches in raster order: pixel_values (sum of h*w, 3, P, P) and
image_grid_hws (images, 2). Written for this repository; copied into the checkpoint by tools/train_tiny.py.
"""

import math

import numpy as np
import torch
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


class KimiVLImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_hws"]

    def __init__(self, patch_size=14, in_token_limit=4096, merge_kernel_size=(2, 2), pad_input=True,
                 num_pooled_tokens=1024, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **kwargs):
        super().__init__(**kwargs)
        if pad_input is not True:
            raise ValueError("pad_input must be true: only padding (no center crop) is implemented")
        self.patch_size, self.in_token_limit = patch_size, in_token_limit
        self.merge_kernel_size, self.pad_input = list(merge_kernel_size), pad_input
        self.num_pooled_tokens = num_pooled_tokens
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def resize_and_pad(self, image):
        P, (kh, kw) = self.patch_size, self.merge_kernel_size
        w, h = image.size
        if (w // P) * (h // P) > self.in_token_limit:
            s = math.sqrt(self.in_token_limit / ((w // P) * (h // P)))
            image = image.resize((int(w * s), int(h * s)), Image.BICUBIC)
        w, h = image.size
        canvas = Image.new("RGB", (w + (P * kw - w % (P * kw)) % (P * kw), h + (P * kh - h % (P * kh)) % (P * kh)))
        canvas.paste(image, (0, 0))
        return canvas

    def patches(self, image):
        """One RGB PIL image -> (gh * gw, 3, P, P) float32 patches in raster order, and [gh, gw]."""
        P = self.patch_size
        image = self.resize_and_pad(image.convert("RGB"))
        x = (np.asarray(image, dtype=np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
        x = (x - np.asarray(self.image_mean, np.float32)[:, None, None]) / np.asarray(self.image_std, np.float32)[:, None, None]
        gh, gw = x.shape[1] // P, x.shape[2] // P
        x = x.reshape(3, gh, P, gw, P).transpose(1, 3, 0, 2, 4).reshape(gh * gw, 3, P, P)
        return torch.from_numpy(np.ascontiguousarray(x)), [gh, gw]

    def preprocess(self, images, return_tensors=None, **kwargs):
        images = images if isinstance(images, (list, tuple)) else [images]
        done = [self.patches(im) for im in images]
        return BatchFeature({"pixel_values": torch.cat([p for p, _ in done]),
                             "image_grid_hws": torch.tensor([g for _, g in done])}, tensor_type=return_tensors)
