"""Image datasets (`tucker_attention.data.images`): IDX files, the five sources of
``load_images``, training-split statistics, normalization and batch augmentation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tucker_attention.data.images import (
    FASHION_MNIST_DIR,
    IMAGE_SOURCES,
    ImageDataset,
    augment,
    load_images,
    read_idx,
)

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
APT_HINT = "apt-get install dataset-fashion-mnist"
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    code = IDX_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_idx_folder(folder: Path, train_x, train_y, val_x, val_y, gz=(True, False, False, True)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array, z in zip(IDX_NAMES, (train_x, train_y, val_x, val_y), gz):
        write_idx(folder / (name + (".gz" if z else "")), array)
    return folder


def write_png(path: Path, array: np.ndarray) -> np.ndarray:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[..., i, j] = img[..., i + dy, j + dx], zero outside the image."""
    h, w = img.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(p, p), (p, p)])
    return padded[..., p + dy:p + dy + h, p + dx:p + dx + w]


# ---------------------------------------------------------------- read_idx

@pytest.mark.parametrize("dtype, shape, gz", [
    (np.uint8, (3, 4, 5), True),
    (np.uint8, (7,), False),
    (np.int8, (2, 3), False),
    (np.int16, (4, 2), True),
    (np.int32, (2, 3), True),
    (np.int32, (2, 1, 3, 2), False),
    (np.float32, (2, 2, 3), False),
    (np.float64, (5,), True),
])
def test_read_idx_matches_numpy(tmp_path, dtype, shape, gz):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal(shape).astype(dtype) * 1e3
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), array)
    out = read_idx(path)
    assert out.shape == shape
    assert out.dtype == torch.from_numpy(array).dtype
    np.testing.assert_array_equal(out.numpy(), array)


def test_read_idx_ubyte_is_uint8_and_writable(tmp_path):
    out = read_idx(write_idx(tmp_path / "x.gz", np.arange(6, dtype=np.uint8).reshape(2, 3)))
    assert out.dtype == torch.uint8
    out += 1  # a writable copy, not a view of the file's bytes
    assert out.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("name, data, match", [
    ("bad_magic", b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "bad magic"),
    ("bad_type", b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "bad magic"),
    ("short", b"\x00\x00", "truncated"),
    ("short_header", b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated"),
    ("short_data", b"\x00\x00\x08\x02\x00\x00\x00\x02\x00\x00\x00\x03" + bytes(5), "truncated"),
    ("long_data", b"\x00\x00\x08\x01\x00\x00\x00\x02" + bytes(3), "trailing"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_bad_files_name_the_file(tmp_path, name, data, match, gz):
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=match) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_truncated_gzip_stream_and_missing_file(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))[:30])
    with pytest.raises(ValueError, match="could not be read") as err:
        read_idx(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nothing.gz"):
        read_idx(tmp_path / "nothing.gz")


# ---------------------------------------------------------------- sources

def test_unknown_source_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source") as err:
        load_images("cifar")
    assert all(s in str(err.value) for s in IMAGE_SOURCES)
    with pytest.raises(ValueError, match="val_fraction"):
        load_images("digits", val_fraction=1.0)
    for source in ("idx", "npz", "folder"):
        with pytest.raises(ValueError, match="needs a path"):
            load_images(source)
        with pytest.raises(FileNotFoundError, match="not-here"):
            load_images(source, str(tmp_path / "not-here"))


def test_idx_folder(tmp_path):
    rng = np.random.default_rng(1)
    tx, ty = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), np.array([0, 1, 2, 1, 0, 2], np.uint8)
    vx, vy = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8), np.array([2, 0, 1], np.uint8)
    data = load_images("idx", str(write_idx_folder(tmp_path / "mnist", tx, ty, vx, vy)))
    assert isinstance(data, ImageDataset)
    assert data.train_x.shape == (6, 1, 5, 4) and data.val_x.shape == (3, 1, 5, 4)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    assert data.image_shape == (1, 5, 4) and data.n_classes == 3 and data.flip is False
    np.testing.assert_array_equal(data.train_x[:, 0].numpy(), tx)
    np.testing.assert_array_equal(data.val_x[:, 0].numpy(), vx)
    assert data.train_y.tolist() == ty.tolist() and data.val_y.tolist() == vy.tolist()
    assert data.mean.shape == (1,) and data.std.shape == (1,) and data.mean.dtype == torch.float32

    # the other compression of each file, and a missing file, named in the error
    data2 = load_images("idx", str(write_idx_folder(tmp_path / "other", tx, ty, vx, vy, gz=(False, True, True, False))))
    assert torch.equal(data2.train_x, data.train_x) and torch.equal(data2.val_y, data.val_y)
    (tmp_path / "other" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_images("idx", str(tmp_path / "other"))

    bad = write_idx_folder(tmp_path / "bad", tx, ty[:5], vx, vy)
    with pytest.raises(ValueError, match="5 labels for 6 images"):
        load_images("idx", str(bad))
    empty = write_idx_folder(tmp_path / "empty", tx[:0], ty[:0], vx, vy)
    with pytest.raises(ValueError, match="empty"):
        load_images("idx", str(empty))


def test_fashion_mnist_missing_folder_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=APT_HINT) as err:
        load_images("fashion-mnist", str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value) and "--data" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=APT_HINT):
        load_images("fashion-mnist", str(tmp_path / "empty"))


def test_fashion_mnist_installed_or_clear_error():
    if all((Path(FASHION_MNIST_DIR) / (n + ".gz")).is_file() for n in IDX_NAMES):
        data = load_images()
        assert data.train_x.shape == (60000, 1, 28, 28) and data.val_x.shape == (10000, 1, 28, 28)
        assert data.n_classes == 10 and data.flip is True
        assert torch.bincount(data.train_y).tolist() == [6000] * 10
        assert torch.bincount(data.val_y).tolist() == [1000] * 10
        assert abs(float(data.mean) - 0.2860) < 1e-3 and abs(float(data.std) - 0.3530) < 1e-3
    else:
        with pytest.raises(FileNotFoundError, match=APT_HINT):
            load_images()


def npz_images(n=50, seed=0):
    """Channel-last (n, 6, 5, 3) images, all distinct, with a constant 'marker' image at index 17."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    x[17] = 7
    return x


def test_npz_channel_last_split(tmp_path):
    x = npz_images()
    y = np.arange(50) % 4
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y)
    data = load_images("npz", str(path), val_fraction=0.2, seed=3)
    assert data.train_x.shape == (40, 3, 6, 5) and data.val_x.shape == (10, 3, 6, 5)
    assert data.n_classes == 4 and data.flip is False
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    marker = nchw[17]
    in_train = sum(torch.equal(im, marker) for im in data.train_x)
    in_val = sum(torch.equal(im, marker) for im in data.val_x)
    assert in_train + in_val == 1
    # every image of either split is one of the originals, with its label, and none is in both
    originals = {nchw[i].numpy().tobytes(): int(y[i]) for i in range(50)}
    seen = [(im.numpy().tobytes(), int(lab)) for split in ("train", "val")
            for im, lab in zip(getattr(data, f"{split}_x"), getattr(data, f"{split}_y"))]
    assert len({k for k, _ in seen}) == 50 and all(originals[k] == lab for k, lab in seen)

    again = load_images("npz", str(path), val_fraction=0.2, seed=3)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.val_y, data.val_y)
    other = load_images("npz", str(path), val_fraction=0.2, seed=4)
    assert not torch.equal(other.val_x, data.val_x)


def test_npz_with_test_split_and_layouts(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "gray.npz"
    np.savez(path, x_train=rng.integers(0, 256, (8, 4, 4), dtype=np.uint8), y_train=np.arange(8)[:, None] % 3,
             x_test=rng.integers(0, 256, (2, 4, 4), dtype=np.uint8), y_test=np.array([[0], [2]]))
    data = load_images("npz", str(path))
    assert data.image_shape == (1, 4, 4) and len(data.train_y) == 8 and data.val_y.tolist() == [0, 2]
    nchw = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    np.savez(path := tmp_path / "nchw.npz", x_train=nchw, y_train=np.arange(4), x_test=nchw[:1], y_test=[1])
    data = load_images("npz", str(path))
    assert data.image_shape == (3, 5, 6)
    np.testing.assert_array_equal(data.train_x.numpy(), nchw)

    np.savez(bad := tmp_path / "bad.npz", x_train=nchw, y_train=np.arange(3))
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        load_images("npz", str(bad))
    np.savez(bad, x_train=nchw)
    with pytest.raises(ValueError, match="y_train"):
        load_images("npz", str(bad))
    np.savez(bad, x_train=nchw, y_train=np.arange(4), x_test=nchw)
    with pytest.raises(ValueError, match="x_test and y_test"):
        load_images("npz", str(bad))
    np.savez(bad, x_train=nchw[:0], y_train=np.arange(0))
    with pytest.raises(ValueError, match="empty"):
        load_images("npz", str(bad))


def test_folder_with_train_and_val(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("val", {"cat": 1, "dog": 1})):
        for cls, count in counts.items():
            for i in range(count):
                written[split, cls, i] = write_png(tmp_path / split / cls / f"{i}.png",
                                                   rng.integers(0, 256, (6, 7), dtype=np.uint8))
    data = load_images("folder", str(tmp_path))
    assert data.train_x.shape == (5, 1, 6, 7) and data.val_x.shape == (2, 1, 6, 7)
    assert data.n_classes == 2 and data.flip is False
    assert data.train_y.tolist() == [0, 0, 0, 1, 1] and data.val_y.tolist() == [0, 1]
    np.testing.assert_array_equal(data.train_x[3, 0].numpy(), written["train", "dog", 0])
    np.testing.assert_array_equal(data.val_x[0, 0].numpy(), written["val", "cat", 0])


def test_folder_flat_layout_rgb_split(tmp_path):
    rng = np.random.default_rng(4)
    for cls in ("b", "a"):
        for i in range(5):
            write_png(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    data = load_images("folder", str(tmp_path), val_fraction=0.2, seed=1)
    assert data.train_x.shape == (8, 3, 4, 4) and data.val_x.shape == (2, 3, 4, 4)
    assert data.n_classes == 2 and data.mean.shape == (3,)
    again = load_images("folder", str(tmp_path), val_fraction=0.2, seed=1)
    assert torch.equal(again.val_x, data.val_x) and torch.equal(again.train_y, data.train_y)
    from PIL import Image

    with Image.open(tmp_path / "a" / "0.png") as im:
        first_a = torch.from_numpy(np.array(im))
    hits = [torch.equal(im, first_a.permute(2, 0, 1)) for im in torch.cat([data.train_x, data.val_x])]
    assert sum(hits) == 1


def test_folder_odd_size_and_mixed_channels(tmp_path):
    write_png(tmp_path / "x" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "x" / "b.png", np.full((4, 4, 3), 9, np.uint8))
    write_png(tmp_path / "y" / "c.png", np.ones((4, 4), np.uint8))
    data = load_images("folder", str(tmp_path), val_fraction=0.3)
    assert data.image_shape == (3, 4, 4)  # grayscale images join an RGB dataset as 3 equal channels
    write_png(tmp_path / "y" / "odd.png", np.ones((5, 4), np.uint8))
    with pytest.raises(ValueError, match="odd.png"):
        load_images("folder", str(tmp_path))


def test_digits():
    pytest.importorskip("sklearn")
    data = load_images("digits")
    assert len(data.train_y) + len(data.val_y) == 1797 and len(data.val_y) == 180
    assert data.image_shape == (1, 8, 8) and data.n_classes == 10 and data.flip is False
    assert int(data.train_x.max()) == 255 and data.train_x.dtype == torch.uint8
    again, other = load_images("digits"), load_images("digits", seed=1)
    assert torch.equal(again.val_x, data.val_x) and torch.equal(again.train_y, data.train_y)
    assert not torch.equal(other.val_y, data.val_y)
    with pytest.raises(ValueError, match="no path"):
        load_images("digits", "somewhere")


# ---------------------------------------------------------------- statistics and augmentation

def test_mean_std_from_training_split_only_and_normalize(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(0, 200, (30, 5, 5, 3), dtype=np.uint8)
    x[..., 1] //= 4  # channels with different statistics
    np.savez(path := tmp_path / "s.npz", x_train=x, y_train=np.zeros(30, int),
             x_test=np.full((10, 5, 5, 3), 255, np.uint8), y_test=np.zeros(10, int))
    data = load_images("npz", str(path))
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(data.mean.numpy(), ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(data.std.numpy(), ref.std(axis=(0, 1, 2)), rtol=1e-6)
    z = data.normalize(data.train_x)
    assert z.dtype == torch.float32 and z.shape == data.train_x.shape
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.equal(data.normalize(data.train_x[0]), z[0])  # a single (C, H, W) image too


def batch(n=32, c=2, h=6, w=5, seed=0):
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def test_augment_identity_and_flips():
    x = batch()
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), pad=0, flip=False), x)
    out = augment(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(x) and 0 < sum(kept) < len(x)


@pytest.mark.parametrize("flip", [False, True])
def test_augment_shifts_within_pad(flip):
    x, pad = batch(), 2
    out = augment(x, torch.Generator().manual_seed(1), pad=pad, flip=flip).numpy()
    shifts, flips = set(), 0
    for o, xi in zip(out, x.numpy()):
        found = [(dy, dx, f) for f in ((False, True) if flip else (False,))
                 for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if np.array_equal(o, shifted(xi[..., ::-1] if f else xi, dy, dx))]
        assert found, "output is not a shifted (and possibly flipped) copy of its input"
        shifts.add(found[0][:2])
        flips += found[0][2]
    assert len(shifts) > 5  # many different shifts, not only (0, 0)
    assert (0 < flips < len(x)) if flip else flips == 0


def test_augment_deterministic_and_dtypes():
    x = batch()
    a = augment(x, torch.Generator().manual_seed(7), pad=2, flip=True)
    b = augment(x, torch.Generator().manual_seed(7), pad=2, flip=True)
    c = augment(x, torch.Generator().manual_seed(8), pad=2, flip=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    xf = x.float() / 255
    af = augment(xf, torch.Generator().manual_seed(7), pad=2, flip=True)
    assert af.dtype == torch.float32 and torch.equal(af, a.float() / 255)
    with pytest.raises(ValueError, match="batch, channels"):
        augment(x[0], torch.Generator(), pad=1)
