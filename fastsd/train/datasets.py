"""Small image datasets for training fastsd's UNet in pixel space, all local (nothing is downloaded).

  digits   scikit-learn's bundled 8x8 handwritten digits (`load_digits`: 1,797 images, 10 classes, grey
           levels 0..16), scaled to [-1, 1]. Held-out split: a fixed 20% of each class (numpy seed 0).
  mnist    MNIST IDX files given by path: a folder holding train-images-idx3-ubyte[.gz] and
           train-labels-idx1-ubyte[.gz] (also the "train-images.idx3-ubyte" spelling), or the images file
           itself with the labels file beside it. Held-out: the t10k files when present, else a fixed 10%.
  cifar10  CIFAR-10 "python version" batches given by path (the cifar-10-batches-py folder: data_batch_1..5,
           optional test_batch and batches.meta). Held-out: test_batch when present, else a fixed 10%.
  folder   a folder of images, one subfolder per class (class = subfolder name, classes sorted by name), or a
           folder of images alone (one class). Hidden files are skipped, EXIF Orientation is applied.
           Held-out: a fixed 10% of each class. Greyscale images give a 1-channel dataset, else RGB.

Every dataset is returned as float32 arrays (N, C, H, W) in [-1, 1] with int64 labels.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field

import numpy as np

DATASETS = ("digits", "mnist", "cifar10", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset that can't be loaded; the message is one line, meant for the user."""


@dataclass
class Dataset:
    name: str
    train_x: np.ndarray  # (N, C, H, W) float32 in [-1, 1]
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray  # the fixed held-out split
    test_y: np.ndarray
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])


def check_path(name: str, path: str | None) -> str | None:
    """A one-line reason why `path` can't hold dataset `name` (None when it may): for argparse's error()."""
    if name not in DATASETS:
        return f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}"
    if name == "digits":
        return None
    if path is None:
        return f"dataset {name!r} needs --data-path (nothing is downloaded)"
    if not os.path.exists(path):
        return f"--data-path {path}: no such file or folder"
    return None


def load_dataset(name: str, path: str | None = None, image_size: int | None = None,
                 channels: int | None = None) -> Dataset:
    """Load dataset `name` (see the module doc); `image_size` resizes (bilinear, antialiased when shrinking)
    to a square side, `channels` (folder only) forces 1 or 3 channels."""
    why = check_path(name, path)
    if why:
        raise DatasetError(why)
    if name == "digits":
        ds = load_digits_dataset()
    elif name == "mnist":
        ds = load_mnist(path)
    elif name == "cifar10":
        ds = load_cifar10(path)
    else:
        ds = load_image_folder(path, image_size or 32, channels)
    check_labels(ds)
    if image_size is not None and image_size != ds.image_size:
        check_data_memory(len(ds.train_x) + len(ds.test_x), ds.channels, image_size)
        ds.train_x, ds.test_x = resize(ds.train_x, image_size), resize(ds.test_x, image_size)
    return ds


def check_labels(ds: Dataset) -> None:
    """DatasetError when a label is not one of the dataset's classes (it would index past the class embedding)."""
    for split, y in (("training", ds.train_y), ("held-out", ds.test_y)):
        if len(y) and (y.min() < 0 or y.max() >= ds.num_classes):
            raise DatasetError(f"{ds.name}: {split} labels run {y.min()}..{y.max()} but there are {ds.num_classes} "
                               f"classes (0..{ds.num_classes - 1})")


def available_memory() -> int | None:
    """Bytes of memory available to this process now (Linux MemAvailable; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_data_memory(n: int, channels: int, size: int) -> None:
    """DatasetError when n float32 images of size x size (and a resizing copy) can't fit in memory."""
    need, have = 2 * 4 * n * channels * size * size, available_memory()
    if have is not None and need > have:
        raise DatasetError(f"{n} images at {size}x{size} need {need / 2 ** 30:.1f} GiB of memory, "
                           f"{have / 2 ** 30:.1f} GiB is available: use a smaller --image-size")


def resize(x: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x)
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[2])
    return out.clamp(-1, 1).numpy()


def fixed_split(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): `fraction` of each class held out (at least one image when a class has two
    or more), chosen by a seeded permutation, so the split is the same on every run and machine."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * fraction))
        k = max(k, 1) if len(idx) >= 2 else 0
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_unit(a: np.ndarray, max_value: float) -> np.ndarray:
    return (a.astype(np.float32) / np.float32(max_value) * 2.0 - 1.0).astype(np.float32)


def _split_dataset(name, x, y, class_names, fraction) -> Dataset:
    tr, te = fixed_split(y, fraction)
    return Dataset(name, x[tr], y[tr], x[te], y[te], class_names)


# --------------------------------------------------------------------------------------------- digits

def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _to_unit(d.images[:, None], 16.0)  # (1797, 1, 8, 8), grey levels 0..16
    y = d.target.astype(np.int64)
    return _split_dataset("digits", x, y, [str(i) for i in range(10)], 0.2)


# --------------------------------------------------------------------------------------------- MNIST (IDX)

def read_idx(path: str) -> np.ndarray:
    """An IDX file (uint8 data, as MNIST's), optionally gzipped."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: can't read ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    head = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:head])
    if len(data) - head != int(np.prod(dims)):
        raise DatasetError(f"{path}: IDX header says {dims} but the file holds {len(data) - head} bytes")
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


def _find(folder: str, names: list[str]) -> str | None:
    for n in names:
        for cand in (n, n + ".gz"):
            p = os.path.join(folder, cand)
            if os.path.isfile(p):
                return p
    return None


def _idx_pair(folder: str, prefix: str) -> tuple[str | None, str | None]:
    return (_find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]),
            _find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]))


def _read_idx_pair(images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{images} / {labels}: expected (N, H, W) images and (N,) labels, got "
                           f"{x.shape} and {y.shape}")
    return _to_unit(x[:, None], 255.0), y.astype(np.int64)


def load_mnist(path: str) -> Dataset:
    if os.path.isdir(path):
        folder = path
        images, labels = _idx_pair(folder, "train")
    else:
        folder = os.path.dirname(os.path.abspath(path))
        images = path
        base = os.path.basename(path)
        lab = base.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
        labels = os.path.join(folder, lab) if lab != base and os.path.isfile(os.path.join(folder, lab)) else None
    if images is None or labels is None:
        raise DatasetError(f"--data-path {path}: no MNIST train-images-idx3-ubyte[.gz] with its "
                           f"train-labels-idx1-ubyte[.gz] there")
    x, y = _read_idx_pair(images, labels)
    names = [str(i) for i in range(int(y.max()) + 1)]
    t_images, t_labels = _idx_pair(folder, "t10k")
    if t_images and t_labels and os.path.abspath(t_images) != os.path.abspath(images):
        tx, ty = _read_idx_pair(t_images, t_labels)
        return Dataset("mnist", x, y, tx, ty, names)
    return _split_dataset("mnist", x, y, names, 0.1)


# --------------------------------------------------------------------------------------------- CIFAR-10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR-10 python batches are pickles (the official format). A pickle can name any importable
    callable and so run code; this unpickler resolves only the few globals a dict of numpy arrays needs
    (array reconstruction, dtype, and the bytes codec) and refuses every other one, so a crafted file fails
    to load instead of running code. Only open files you trust all the same."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays are allowed)")
        try:
            return super().find_class(*target)
        except (ImportError, AttributeError):  # numpy < 2 has numpy.core, not numpy._core
            return super().find_class(module.replace("numpy._core", "numpy.core"), name)


def load_cifar_batch(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DatasetError(f"{path}: not a CIFAR python batch ({e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_cifar_batch(path)
    data, labels = d.get("data"), d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or labels is None or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: expected 'data' (N, 3072) uint8 and 'labels'")
    y = np.asarray(labels, dtype=np.int64)
    return _to_unit(data.reshape(-1, 3, 32, 32), 255.0), y


def load_cifar10(path: str) -> Dataset:
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        batches = sorted(f for f in os.listdir(folder) if f.startswith("data_batch_"))
        if not batches:
            raise DatasetError(f"--data-path {path}: no CIFAR-10 data_batch_* files there")
        files = [os.path.join(folder, f) for f in batches]
    else:
        files = [path]
    parts = [_cifar_arrays(f) for f in files]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test = os.path.join(folder, "test_batch")
    held = _cifar_arrays(test) if os.path.isfile(test) and os.path.abspath(test) not in map(os.path.abspath, files) \
        else None
    # CIFAR-10's 10 classes, or as many as the labels use (CIFAR-100's python files have 'fine_labels' 0..99)
    n = max(10, int(max(y.max(initial=0), held[1].max(initial=0) if held else 0)) + 1)
    names = [str(i) for i in range(n)]
    for meta_file, key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
        meta = os.path.join(folder, meta_file)
        m = load_cifar_batch(meta).get(key) if os.path.isfile(meta) else None
        if isinstance(m, list) and len(m) == n:
            names = [v.decode() if isinstance(v, bytes) else str(v) for v in m]
            break
    if held:
        return Dataset("cifar10", x, y, held[0], held[1], names)
    return _split_dataset("cifar10", x, y, names, 0.1)


# --------------------------------------------------------------------------------------------- image folder

def read_image(path: str):
    """One image of a folder dataset, as PIL reads it: PNG, JPEG, WebP, BMP, GIF or TIFF only (checked by content,
    not name), at most fastsd.image.MAX_INPUT_PIXELS pixels, turned upright as its EXIF Orientation says (a phone's
    photo; fastsd.image.upright); 16-bit and float images scaled to 8 bits (fastsd.image.checked_8bit).
    DatasetError (one line naming the file) otherwise."""
    import warnings

    from PIL import Image

    from fastsd.image import INPUT_FORMATS, MAX_INPUT_PIXELS, checked_8bit, upright  # (EPS would run gs)

    try:
        with warnings.catch_warnings():  # the size is checked here, not by PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=INPUT_FORMATS) as im:
                if im.width * im.height > MAX_INPUT_PIXELS:
                    raise DatasetError(f"{path}: {im.width}x{im.height} pixels is above the limit of "
                                       f"{MAX_INPUT_PIXELS} pixels")
                im.load()
                out = im.copy()
    except Image.UnidentifiedImageError:
        raise DatasetError(f"{path}: not a PNG, JPEG, WebP, BMP, GIF or TIFF image") from None
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: too many pixels ({str(e).splitlines()[0]})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        if isinstance(e, DatasetError):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"{path}: not a readable image ({msg})") from None
    try:
        return checked_8bit(upright(out), path)
    except ValueError as e:
        raise DatasetError(str(e)) from None


def _image_files(folder: str) -> list[str]:
    """The image files of one folder, by name and sorted; hidden ones (macOS's ._photo.jpg, .thumbnail.png)
    skipped. DatasetError for a name that is not a readable file (a FIFO would block the read)."""
    out = []
    for f in sorted(os.listdir(folder)):
        if f.startswith(".") or not f.lower().endswith(IMAGE_EXTS):
            continue
        p = os.path.join(folder, f)
        if not os.path.isfile(p):
            what = "a broken symbolic link" if os.path.islink(p) and not os.path.exists(p) else \
                "not a regular file (a folder, FIFO or device)"
            raise DatasetError(f"{p}: {what}; remove it or rename it")
        out.append(p)
    return out


def _class_folders(path: str) -> tuple[list[str], list[list[str]]]:
    """(class names, image files per class) of a folder dataset: one subfolder per class (hidden ones skipped), or,
    when no subfolder holds images, the images in `path` itself as one class (diffusers' imagefolder layout).
    DatasetError for a class folder without images or images beside the class folders (neither is trained on)."""
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    per_class = [_image_files(os.path.join(path, c)) for c in classes]
    loose = _image_files(path)
    if not any(per_class):
        return ([os.path.basename(os.path.abspath(path))], [loose]) if loose else ([], [])
    if loose:
        raise DatasetError(f"--data-path {path}: {len(loose)} image(s) beside the class subfolders "
                           f"({os.path.basename(loose[0])}, ...); move them into a class subfolder")
    empty = [c for c, fs in zip(classes, per_class) if not fs]
    if empty:
        raise DatasetError(f"--data-path {path}: class folder {empty[0]!r} has no images" +
                           (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else "") + "; remove it or add images")
    return classes, per_class


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _square(im, mode: str | None, size: int):
    """`im` in `mode` (None: "L" for a grey image, else "RGB"), resized (bicubic) to size x size."""
    from PIL import Image

    im = im.convert(mode or ("L" if im.mode in GREY_MODES else "RGB"))
    return im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC)


def load_image_folder(path: str, image_size: int = 32, channels: int | None = None) -> Dataset:
    if not os.path.isdir(path):
        raise DatasetError(f"--data-path {path}: an image-folder dataset is a folder with one subfolder per class")
    classes, per_class = _class_folders(path)
    files = [f for fs in per_class for f in fs]
    labels = [i for i, fs in enumerate(per_class) for _ in fs]
    if not files:
        raise DatasetError(f"--data-path {path}: no images in class subfolders (expected {path}/<class>/*.png)")
    check_data_memory(len(files), channels or 3, image_size)
    if channels not in (None, 1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    # each image is made small as it is read (a folder of photos would not fit in memory at full size); grey ones
    # stay grey until every image is seen, as the dataset is grey only when all of them are
    small = [_square(read_image(f), {1: "L", 3: "RGB"}.get(channels), image_size) for f in files]
    if channels is None:
        channels = 1 if all(im.mode == "L" for im in small) else 3
    arrs = []
    for im in small:
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        arrs.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    x = _to_unit(np.stack(arrs), 255.0)
    y = np.asarray(labels, dtype=np.int64)
    return _split_dataset("folder", x, y, classes, 0.1)
