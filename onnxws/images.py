"""``onnxws data``: a folder of images to an evaluation ``.npz`` of model-ready arrays.

A folder with one subfolder per class gives labels ``y`` (class indices from a class file, one
name per line in index order; without one, the sorted subfolder names map to 0..n-1, and that
mapping is printed and saved beside the npz); a flat folder gives images without labels.
``--group-by REGEX`` fills the ``group`` array (one id per distinct match, e.g. the source
photograph of several views). Preprocessing is a ``Preprocessing``; the ``imagenet`` preset is
torchvision's evaluation transform: RGB, short side to 256 (bilinear), centre 224 crop, /255,
ImageNet mean and std, NCHW float32.

Pillow reads the images (a dependency of matplotlib already, so onnxws declares it directly
rather than as an extra). The whole set is sized before any image is decoded: a set that would
not fit in memory is refused with its size; an unreadable image is named.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from onnxws.atomic import atomic_file, write_atomic
from onnxws.data import GROUP, LABELS, available_memory
from onnxws.errors import InputError, UsageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
LAYOUTS = ("nchw", "nhwc")
DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class Preprocessing:
    """How one image becomes one sample.

    Attributes:
        size: the short side is resized to this (bilinear), keeping the aspect ratio.
        crop: then the centre ``crop x crop`` square is kept (``crop <= size``).
        layout: ``nchw`` (channels first, as PyTorch exports) or ``nhwc``.
        dtype: ``float32`` (``(x / 255 - mean) / std``) or ``uint8`` (raw 0-255 pixels, for models
            with the normalisation in the graph; mean and std are then not applied).
        mean, std: per-channel, RGB order, on the 0-1 scale.
    """

    size: int = 256
    crop: int = 224
    layout: str = "nchw"
    dtype: str = "float32"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.size < 1 or not 1 <= self.crop <= self.size:
            raise UsageError(f"--size {self.size} and --crop {self.crop}: need 1 <= crop <= size")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout {self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise UsageError("--mean and --std take 3 numbers each (RGB), std > 0")

    def sample_bytes(self) -> int:
        return 3 * self.crop * self.crop * np.dtype(self.dtype).itemsize

    def apply(self, path: Path) -> np.ndarray:
        """One image as an array ``[3, crop, crop]`` (nchw) or ``[crop, crop, 3]`` (nhwc)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise InputError(f"image {path} could not be read ({type(exc).__name__}: {exc}); remove or replace it") from exc
        w, h = rgb.size  # sizes and offsets computed as torchvision's Resize(size) + CenterCrop(crop) do
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        resized = rgb.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)
        w, h = resized.size
        left, top = int(round((w - self.crop) / 2.0)), int(round((h - self.crop) / 2.0))
        pixels = np.asarray(resized.crop((left, top, left + self.crop, top + self.crop)), dtype=np.uint8)
        if self.dtype == "float32":
            pixels = ((pixels.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1)) if self.layout == "nchw" else pixels


PRESETS = {"imagenet": Preprocessing()}


def preprocessing(preset: str | None = "imagenet", **overrides: object) -> Preprocessing:
    """A preset with the options given (None values ignored) applied over it."""
    if preset is not None and preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset is not None else Preprocessing()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class ImageSet:
    """The images of a folder, their labels and groups, before decoding.

    Attributes:
        files: image paths, in a fixed order (class folders in index order, names sorted).
        labels: class index per file, or None for a flat folder.
        classes: class names in index order (None for a flat folder).
        groups: group id per file (``--group-by``), or None.
        mapping_from_folders: the class indices come from sorted folder names, not a class file.
    """

    files: list[Path]
    labels: list[int] | None
    classes: list[str] | None
    groups: list[int] | None = None
    mapping_from_folders: bool = False


def find_images(folder: Path, classes_file: Path | None = None, group_by: str | None = None) -> ImageSet:
    """The images under ``folder``: one subfolder per class, or a flat folder of images.

    Raises:
        InputError: no images; images both at the top level and in subfolders; a class folder
            not in the class file; a file ``group_by`` does not match.
        UsageError: an invalid regular expression.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    top = sorted(p for p in folder.iterdir() if _is_image(p))
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in subfolders if any(_is_image(p) for p in d.rglob("*"))]
    if top and class_dirs:
        raise InputError(f"{folder} holds images both at its top level and in subfolders ({class_dirs[0].name}/): use "
                         "one subfolder per class, or a flat folder")
    if classes_file is not None and not class_dirs:
        raise InputError(f"--classes {classes_file} was given but {folder} has no class subfolders")
    if class_dirs:
        names = [d.name for d in class_dirs]
        if classes_file is not None:
            classes = _read_classes(classes_file)
            index = {name: i for i, name in enumerate(classes)}
            unknown = [n for n in names if n not in index]
            if unknown:
                raise InputError(f"class folder(s) {unknown[:5]} not in {classes_file} ({len(classes)} classes); "
                                 "name each subfolder after a line of the class file")
        else:
            classes, index = names, {name: i for i, name in enumerate(names)}
        files, labels = [], []
        for d in sorted(class_dirs, key=lambda d: index[d.name]):
            for path in sorted(p for p in d.rglob("*") if _is_image(p)):
                files.append(path)
                labels.append(index[d.name])
        found = ImageSet(files, labels, classes, mapping_from_folders=classes_file is None)
    else:
        if not top:
            raise InputError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        found = ImageSet(top, None, None)
    if group_by is not None:
        found.groups = _groups(found.files, folder, group_by)
    return found


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_classes(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"class file {path} could not be read ({type(exc).__name__}: {exc})") from exc
    classes = [line for line in lines if line]
    if not classes or len(set(classes)) != len(classes):
        raise InputError(f"class file {path}: need one distinct class name per line, in index order")
    return classes


def _groups(files: list[Path], root: Path, pattern: str) -> list[int]:
    """Group id per file: files whose relative path gives the same match (its first group, if any) share one."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-by {pattern!r} is not a regular expression: {exc}") from exc
    ids: dict[str, int] = {}
    groups = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        match = regex.search(rel)
        if match is None:
            raise InputError(f"--group-by {pattern!r} does not match {rel}; every image needs a group")
        key = match.group(1) if regex.groups else match.group(0)
        groups.append(ids.setdefault(key, len(ids)))
    return groups


def build_npz(folder: Path, out: Path, prep: Preprocessing, *, input_name: str = "x", classes_file: Path | None = None,
              group_by: str | None = None) -> dict[str, object]:
    """Read every image of ``folder``, preprocess it and write ``out`` (``input_name``, ``y``, ``group``).

    Returns a summary: samples, shape, dtype, classes, bytes, and the path of the saved class
    mapping (``<out stem>.classes.txt``) when the classes came from folder names.

    Raises:
        InputError: see ``find_images``; the arrays would not fit in memory; an unreadable image;
            the output cannot be written.
    """
    found = find_images(folder, classes_file, group_by)
    need = len(found.files) * prep.sample_bytes()
    have = available_memory()
    if have is not None and need > have:
        raise InputError(f"{len(found.files)} images at {prep.crop}x{prep.crop} {prep.dtype} are {need / 2**30:.1f} GiB, "
                         f"more than the {have / 2**30:.1f} GiB of memory available; use fewer images or --dtype uint8")
    shape = (3, prep.crop, prep.crop) if prep.layout == "nchw" else (prep.crop, prep.crop, 3)
    batch = np.empty((len(found.files), *shape), dtype=prep.dtype)
    for i, path in enumerate(found.files):
        batch[i] = prep.apply(path)
    arrays: dict[str, np.ndarray] = {input_name: batch}
    if found.labels is not None:
        arrays[LABELS] = np.asarray(found.labels, dtype=np.int64)
    if found.groups is not None:
        arrays[GROUP] = np.asarray(found.groups, dtype=np.int64)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        raise InputError(f"could not write {out}: {exc.strerror or exc}") from exc
    summary: dict[str, object] = {"output": str(out), "samples": len(found.files), "input": input_name,
                                  "shape": [len(found.files), *shape], "dtype": prep.dtype, "bytes": out.stat().st_size,
                                  "classes": len(found.classes) if found.classes else None,
                                  "groups": len(set(found.groups)) if found.groups is not None else None}
    if found.classes is not None and found.mapping_from_folders:
        mapping = out.with_name(out.name.removesuffix(".npz") + ".classes.txt")
        write_atomic(mapping, ("\n".join(found.classes) + "\n").encode())
        summary["class_mapping"] = str(mapping)
        summary["class_names"] = found.classes
    return summary
