"""A folder of images as calibration or verification data for a one-input vision model.

Each image is read with Pillow, converted to RGB (or grayscale for a 1-channel input),
resized to the input's height and width (static dims, or --shape), scaled to 0..1 and
normalised with a preset's mean and std, then laid out as the input says: NCHW when axis 1
holds the channels (1 or 3), NHWC when the last axis does. The preset defaults to the
ImageNet statistics for colour inputs, which is what torchvision and timm models expect;
grayscale inputs get 0..1.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxprune.calibration.specs import InputSpec, whole_batches
from onnxprune.errors import DataError, InputError

__all__ = ["IMAGE_SUFFIXES", "PRESETS", "ImageInput", "image_input", "image_files",
           "image_batches"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# name -> (mean, std) per channel, applied after scaling to 0..1.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0,), (1.0,)),
    "minus1to1": ((0.5,), (0.5,)),
}
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageInput:
    """The image input of a model: its spec, layout, channels, height, width and fixed batch
    size (None: any)."""

    spec: InputSpec
    layout: str  # NCHW or NHWC
    channels: int
    height: int | None
    width: int | None
    batch: int | None

    def describe(self) -> str:
        h = self.height if self.height is not None else "?"
        w = self.width if self.width is not None else "?"
        return f"{self.layout} {self.channels}x{h}x{w}"


def image_input(specs: Sequence[InputSpec],
                shapes: Mapping[str, tuple[int, ...]] | None = None) -> ImageInput | str:
    """The model's image input, or why it has none: one float input of rank 4 whose axis 1
    (NCHW) or last axis (NHWC) holds 1 or 3 channels. `shapes` (from --shape) fills in
    symbolic dims."""
    names = ", ".join(s.name for s in specs)
    if len(specs) != 1:
        return f"images feed a model with one input, this one has {len(specs)} ({names})"
    spec = specs[0]
    dims: tuple[int | str | None, ...] | None = spec.dims
    if shapes and spec.name in shapes:
        dims = shapes[spec.name]
    if not np.issubdtype(spec.dtype, np.floating):
        return f"input '{spec.name}' is {spec.dtype}, not a float image"
    if dims is None or len(dims) != 4:
        rank = "unknown" if dims is None else len(dims)
        return f"input '{spec.name}' has rank {rank}, not 4 (N, C, H, W or N, H, W, C)"
    fixed = [d if isinstance(d, int) else None for d in dims]
    if fixed[1] in (1, 3):
        layout, c, h, w = "NCHW", fixed[1], fixed[2], fixed[3]
    elif fixed[3] in (1, 3):
        layout, c, h, w = "NHWC", fixed[3], fixed[1], fixed[2]
    else:
        return (f"input '{spec.name}' has no axis of 1 or 3 channels at 1 or 3 (dims "
                f"{list(dims)}); give its shape with --shape {spec.name}:1,3,H,W")
    assert c is not None
    # The batch is fixed only where the graph fixes it: --shape's first dim is a choice
    # for generated data, not a limit the model has.
    batch = spec.dims[0] if spec.dims and isinstance(spec.dims[0], int) else None
    return ImageInput(spec, layout, c, h, w, batch)


def image_files(folder: Path) -> list[Path]:
    """The images in a folder, in name order (regular files only)."""
    return [f for f in sorted(folder.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading images needs the Pillow package: pip install "
                         "'onnxprune[image]'") from None
    return Image


def _preset(name: str | None, channels: int, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    chosen = name or ("imagenet" if channels == 3 else "none")
    if chosen not in PRESETS:
        raise InputError(f"--image-preset {chosen}: choose from {', '.join(PRESETS)}")
    mean, std = (np.asarray(v, np.float32) for v in PRESETS[chosen])
    if mean.size not in (1, channels):
        raise InputError(f"{folder}: the {chosen} preset is for 3-channel images and the model "
                         f"takes {channels}; give --image-preset none or minus1to1")
    return mean, std


def _read(path: Path, image: Any, item: ImageInput) -> np.ndarray:
    """One image as float32 [H, W, C], scaled to 0..1."""
    try:
        with image.open(path) as img:
            img = img.convert("RGB" if item.channels == 3 else "L")
            img = img.resize((item.width, item.height), image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e}); remove it or convert it to "
                        "PNG/JPEG") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def image_batches(folder: Path, specs: Sequence[InputSpec], *,
                  shapes: Mapping[str, tuple[int, ...]] | None, preset: str | None,
                  batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the folder's images, resized, scaled and laid out for the model's input."""
    item = image_input(specs, shapes)
    if isinstance(item, str):
        raise DataError(f"{folder}: a folder of images needs a model with one image input, "
                        f"and {item}")
    name = item.spec.name
    if item.height is None or item.width is None:
        c = item.channels
        shape = f"1,{c},H,W" if item.layout == "NCHW" else f"1,H,W,{c}"
        raise DataError(f"{folder}: input '{name}' has no fixed height and width; give them "
                        f"with --shape {name}:{shape}")
    if batch_size < 1:
        raise InputError(f"{folder}: --batch-size must be >= 1")
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    image = _pillow()
    mean, std = _preset(preset, item.channels, folder)
    rows = item.batch or batch_size
    files = whole_batches(files, rows, item.batch is not None, folder, "image")
    for start in range(0, len(files), rows):
        batch = np.stack([(_read(f, image, item) - mean) / std
                          for f in files[start:start + rows]])
        if item.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        yield {name: np.ascontiguousarray(batch).astype(item.spec.dtype)}
