"""Image classification datasets for the vision (ViT) task, and their augmentation.

The default is Fashion-MNIST read from the Debian/Ubuntu package ``dataset-fashion-mnist``
(four gzip IDX files under ``/usr/share/datasets/fashion-mnist/``). Users give a folder of IDX
files (e.g. the original MNIST), a ``.npz`` file, or a folder of images (one subfolder per
class); scikit-learn's bundled 8x8 digits serve as a tiny smoke-test dataset. Images are kept
as uint8 ``(N, C, H, W)`` tensors and normalized per batch with the training split's
per-channel mean and std.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_choice, check_int
from .._extras import require

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SOURCES = ("fashion-mnist", "idx", "npz", "folder", "digits")
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "val_x": "t10k-images-idx3-ubyte", "val_y": "t10k-labels-idx1-ubyte"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_INSTALL_FASHION = ("install with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu package, files land "
                    "in /usr/share/datasets/fashion-mnist/) or point --data at a folder with the four IDX files")
# IDX type byte -> (big-endian numpy dtype, torch dtype)
_IDX_DTYPES = {0x08: (">u1", torch.uint8), 0x09: (">i1", torch.int8), 0x0B: (">i2", torch.int16),
               0x0C: (">i4", torch.int32), 0x0D: (">f4", torch.float32), 0x0E: (">f8", torch.float64)}
_VAL_DIRS = ("val", "valid", "validation", "test")
_GRAY_MODES = ("1", "L", "LA")
_COLOR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV")


def read_idx(path: str | Path) -> torch.Tensor:
    """The array stored in an IDX file (gzip-compressed if its name ends in ``.gz``).

    Header: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64) and the number of dimensions, then each dimension as a
    big-endian uint32; the data follows, big-endian, in C order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # bad or truncated gzip stream
        raise ValueError(f"IDX file {str(path)!r} could not be read: {err}") from None
    if len(data) < 4:
        raise ValueError(f"IDX file {str(path)!r} is truncated: {len(data)} bytes, shorter than the 4-byte magic")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file: bad magic number 0x{data[:4].hex()} (expected 00 00, "
                         f"a type byte in {[f'0x{t:02X}' for t in _IDX_DTYPES]} and the number of dimensions)")
    np_dtype, _ = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {str(path)!r} is truncated: {len(data)} bytes, its {ndim}-dimensional header "
                         f"alone needs {header}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape) * np.dtype(np_dtype).itemsize
    if len(data) - header != expected:
        state = "is truncated" if len(data) - header < expected else "has trailing bytes"
        raise ValueError(f"IDX file {str(path)!r} {state}: shape {shape} needs {expected} data bytes, the file holds "
                         f"{len(data) - header}")
    array = np.frombuffer(data, dtype=np_dtype, count=math.prod(shape), offset=header)
    array = array.astype(np.dtype(np_dtype).newbyteorder("="))  # native byte order, writable copy
    return torch.from_numpy(array.reshape(shape))


@dataclass
class ImageDataset:
    """uint8 images and int64 labels of the train and validation splits, with the training
    split's per-channel statistics (of pixel values scaled to [0, 1])."""

    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor  # (M, C, H, W) uint8
    val_y: torch.Tensor  # (M,) int64
    n_classes: int
    source: str
    flip: bool  # whether random horizontal flips are a sensible augmentation
    mean: torch.Tensor  # (C,) float32
    std: torch.Tensor  # (C,) float32

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.train_x.shape[1:])

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """float32 ``(x / 255 - mean) / std`` per channel; ``x`` is (..., C, H, W), shape kept."""
        mean = self.mean.to(x_uint8.device).view(-1, 1, 1)
        std = self.std.to(x_uint8.device).clamp_min(1e-8).view(-1, 1, 1)  # a constant channel normalizes to 0
        return (x_uint8.float() / 255 - mean) / std


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of the uint8 images ``x`` (N, C, H, W) scaled to
    [0, 1], exact (from a 256-bin histogram per channel, in float64) and memory-light."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = (counts * values).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()


def _images(x, what: str) -> torch.Tensor:
    """uint8 (N, C, H, W) from an array of (N, H, W), (N, H, W, C) with C in {1, 3}, or (N, C, H, W)."""
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"{what} must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise ValueError(f"{what} must be uint8 pixel values 0..255, got dtype {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise ValueError(f"{what} must hold pixel values 0..255, got {int(x.min())}..{int(x.max())}")
        x = x.to(torch.uint8)
    return x.contiguous()


def _labels(y, n_images: int, what: str) -> torch.Tensor:
    """int64 (N,) class labels; (N, 1) is accepted."""
    y = torch.as_tensor(y)
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise ValueError(f"{what} must have shape (N,), got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{what} must be integer class labels, got dtype {y.dtype}")
    if len(y) != n_images:
        raise ValueError(f"{what} has {len(y)} labels for {n_images} images")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"{what} must be class labels >= 0, got {int(y.min())}")
    return y.long().contiguous()


def _split(n: int, val_fraction: float, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), each sorted: a seeded random ``val_fraction`` held out."""
    if n < 2:
        raise ValueError(f"{what} has {n} image(s), too few to split off a validation set (needs at least 2)")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _dataset(train_x, train_y, val_x, val_y, source: str, flip: bool, n_classes: int | None = None) -> ImageDataset:
    """Validate the splits and compute the training statistics."""
    train_x = _images(train_x, f"the training images of {source}")
    val_x = _images(val_x, f"the validation images of {source}")
    train_y = _labels(train_y, len(train_x), f"the training labels of {source}")
    val_y = _labels(val_y, len(val_x), f"the validation labels of {source}")
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError(f"the dataset {source} is empty ({len(train_x)} training and {len(val_x)} validation images)")
    if train_x.shape[1:] != val_x.shape[1:]:
        raise ValueError(f"the training images of {source} are {tuple(train_x.shape[1:])} (C, H, W) but the "
                         f"validation images are {tuple(val_x.shape[1:])}")
    top = int(max(train_y.max(), val_y.max()))
    if n_classes is None:
        n_classes = top + 1
    elif top >= n_classes:
        raise ValueError(f"the labels of {source} go up to {top}, but it has {n_classes} classes")
    mean, std = channel_stats(train_x)
    return ImageDataset(train_x, train_y, val_x, val_y, n_classes, source, flip, mean, std)


def _split_dataset(x, y, val_fraction: float, seed: int, source: str, flip: bool,
                   n_classes: int | None = None) -> ImageDataset:
    x = _images(x, f"the images of {source}")
    y = _labels(y, len(x), f"the labels of {source}")
    if len(x) == 0:
        raise ValueError(f"the dataset {source} is empty (no images)")
    train, val = _split(len(x), val_fraction, seed, source)
    return _dataset(x[train], y[train], x[val], y[val], source, flip, n_classes)


def _existing(path: str | Path | None, source: str, what: str) -> Path:
    if path is None:
        raise ValueError(f"source {source!r} needs a path ({what})")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist (source {source!r} needs {what})")
    return path


def _idx_file(folder: Path, name: str) -> Path | None:
    """``name`` in ``folder``, gzip-compressed or not (also MNIST's ``train-images.idx3-ubyte`` spelling)."""
    for stem in (name, name.replace("-idx", ".idx")):
        for candidate in (folder / (stem + ".gz"), folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _idx_dataset(folder: Path, source: str, flip: bool, missing_hint: str, n_classes: int | None) -> ImageDataset:
    files = {key: _idx_file(folder, name) for key, name in IDX_FILES.items()}
    missing = [IDX_FILES[key] + "[.gz]" for key, f in files.items() if f is None]
    if missing:
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)} in {str(folder)!r}; {missing_hint}")
    return _dataset(*(read_idx(files[key]) for key in IDX_FILES), source=source, flip=flip, n_classes=n_classes)


def _npz_dataset(path: Path, val_fraction: float, seed: int) -> ImageDataset:
    source = f"npz {str(path)!r}"
    if not path.is_file():
        raise ValueError(f"source 'npz' needs a .npz file, {str(path)!r} is not a file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zlib.error) as err:
        raise ValueError(f"could not read {str(path)!r} as a .npz file: {err}") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise ValueError(f"{source} has no array {key!r} (needs x_train, y_train and optionally x_test, y_test; "
                             f"has {sorted(arrays)})")
    has_test = ("x_test" in arrays, "y_test" in arrays)
    if has_test == (True, True):
        return _dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], source, False)
    if any(has_test):
        raise ValueError(f"{source} has only one of x_test and y_test; give both, or neither to split off "
                         f"a validation set from the training arrays")
    return _split_dataset(arrays["x_train"], arrays["y_train"], val_fraction, seed, source + " (split)", False)


def _read_image(file: Path) -> np.ndarray:
    """(H, W) uint8 for grayscale images, (H, W, 3) for color ones."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            im.load()
            if im.mode in _GRAY_MODES:
                return np.asarray(im.convert("L"))
            if im.mode in _COLOR_MODES:
                return np.asarray(im.convert("RGB"))
            raise ValueError(f"image {str(file)!r} has mode {im.mode!r}; only 8-bit grayscale and color images "
                             f"are supported")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"could not read the image {str(file)!r}: {err}") from None


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.suffix.lower() in IMAGE_EXTENSIONS)


def _read_class_folders(dirs: dict[str, Path], classes: list[str]) -> tuple[list[np.ndarray], list[int], list[Path]]:
    images, labels, files = [], [], []
    for label, name in enumerate(classes):
        if name not in dirs:
            continue
        for f in _image_files(dirs[name]):
            images.append(_read_image(f))
            labels.append(label)
            files.append(f)
    return images, labels, files


def _stack(images: list[np.ndarray], files: list[Path], color: bool) -> torch.Tensor:
    """(N, C, H, W) uint8; every image must have the first one's height and width."""
    size = images[0].shape[:2]
    for im, f in zip(images, files):
        if im.shape[:2] != size:
            raise ValueError(f"image {str(f)!r} is {im.shape[1]}x{im.shape[0]} (WxH), but {str(files[0])!r} is "
                             f"{size[1]}x{size[0]}: all images of a folder dataset must have the same size")
    if color:
        images = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im for im in images]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return torch.from_numpy(np.stack(images)).unsqueeze(1)


def _folder_dataset(path: Path, val_fraction: float, seed: int) -> ImageDataset:
    source = f"image folder {str(path)!r}"
    if not path.is_dir():
        raise ValueError(f"source 'folder' needs a folder of class subfolders, {str(path)!r} is not a folder")
    split = (path / "train").is_dir()
    train_root = path / "train" if split else path
    train_dirs = _class_dirs(train_root)
    classes = sorted(train_dirs)
    if not classes:
        raise ValueError(f"{source} is empty: {str(train_root)!r} holds no class subfolders")
    for d in train_dirs.values():
        if not _image_files(d):
            raise ValueError(f"class folder {str(d)!r} of {source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images, labels, files = _read_class_folders(train_dirs, classes)
    n_train = len(images)
    if split:
        val_root = next((path / v for v in _VAL_DIRS if (path / v).is_dir()), None)
        if val_root is None:
            raise ValueError(f"{source} has a 'train' folder but no validation folder (one of {list(_VAL_DIRS)})")
        val_dirs = _class_dirs(val_root)
        unknown = sorted(set(val_dirs) - set(classes))
        if unknown:
            raise ValueError(f"the validation folder {str(val_root)!r} has classes {unknown} that the training "
                             f"folder lacks")
        more = _read_class_folders(val_dirs, classes)
        images, labels, files = images + more[0], labels + more[1], files + more[2]
    color = any(im.ndim == 3 for im in images)
    x, y = _stack(images, files, color), torch.tensor(labels, dtype=torch.int64)
    if split:
        return _dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], source, False, len(classes))
    return _split_dataset(x, y, val_fraction, seed, source, False, len(classes))


def _digits_dataset(val_fraction: float, seed: int) -> ImageDataset:
    digits = require("sklearn.datasets", "the 'digits' dataset").load_digits()
    x = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8))  # values 0..16 -> 0..255
    return _split_dataset(x, torch.from_numpy(digits.target), val_fraction, seed, "scikit-learn 8x8 digits", False, 10)


def load_images(source: str = "fashion-mnist", path: str | Path | None = None, *, val_fraction: float = 0.1,
                seed: int = 0) -> ImageDataset:
    """The image dataset ``source`` (one of :data:`IMAGE_SOURCES`), read from ``path``.

    ``fashion-mnist``: the four gzip IDX files in ``path`` (default :data:`FASHION_MNIST_DIR`),
    the 10k test images as validation split. ``idx``: the same four files (gzip or not) in the
    folder ``path``. ``npz``: arrays ``x_train``, ``y_train`` (and ``x_test``, ``y_test``).
    ``folder``: ``path/train/<class>/*`` and ``path/val/<class>/*``, or ``path/<class>/*``.
    ``digits``: scikit-learn's 8x8 digits (no path). Where no validation split is given, a
    seeded random ``val_fraction`` of the images is held out.
    """
    check_choice("source", source, IMAGE_SOURCES)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    check_int("seed", seed, low=0)
    if source == "fashion-mnist":
        folder = Path(FASHION_MNIST_DIR if path is None else path)
        if not folder.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder {str(folder)!r} does not exist: {_INSTALL_FASHION}")
        return _idx_dataset(folder, f"Fashion-MNIST ({str(folder)!r})", True, _INSTALL_FASHION, 10)
    if source == "digits":
        if path is not None:
            raise ValueError(f"source 'digits' is scikit-learn's bundled dataset and takes no path, got {path!r}")
        return _digits_dataset(val_fraction, seed)
    if source == "idx":
        folder = _existing(path, source, "a folder with the four IDX files")
        if not folder.is_dir():
            raise ValueError(f"source 'idx' needs a folder with the four IDX files, {str(folder)!r} is not a folder")
        return _idx_dataset(folder, f"IDX files in {str(folder)!r}", False,
                            "give a folder with " + ", ".join(IDX_FILES.values()) + " (each optionally .gz)", None)
    if source == "npz":
        return _npz_dataset(_existing(path, source, "a .npz file"), val_fraction, seed)
    return _folder_dataset(_existing(path, source, "a folder of class subfolders"), val_fraction, seed)


def augment(x: torch.Tensor, generator: torch.Generator, *, pad: int = 2, flip: bool = False) -> torch.Tensor:
    """Random crops (shift each image by its own (dy, dx) in [-pad, pad]², filling with zeros)
    and, if ``flip``, random horizontal flips (p = 0.5 per image) of the batch ``x`` (B, C, H, W).

    One gather, no loop over images; deterministic given ``generator``'s state. With ``pad=0``
    and ``flip=False``, ``x`` is returned as is.
    """
    check_int("pad", pad, low=0)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (batch, channels, height, width) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if pad == 0 and not flip:
        return x
    batch, channels, height, width = x.shape
    draw = {"generator": generator, "device": generator.device}
    shift = torch.randint(-pad, pad + 1, (2, batch), **draw).to(x.device)
    padded = x.new_zeros(batch, channels, height + 2 * pad, width + 2 * pad)
    padded[:, :, pad:pad + height, pad:pad + width] = x
    rows = torch.arange(height, device=x.device) + (shift[0] + pad)[:, None]  # (B, H)
    cols = torch.arange(width, device=x.device) + (shift[1] + pad)[:, None]  # (B, W)
    if flip:
        flipped = (torch.rand(batch, **draw) < 0.5).to(x.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    b = torch.arange(batch, device=x.device)[:, None, None, None]
    c = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


__all__ = ["FASHION_MNIST_DIR", "IMAGE_SOURCES", "ImageDataset", "augment", "channel_stats", "load_images", "read_idx"]
