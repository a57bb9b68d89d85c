"""Reading images and masks, and MVTec-style loading. The synthetic data set: tests/test_data_synthetic.py."""
from __future__ import annotations

import io
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from defect_fast.data import (
    DataError,
    DataWarning,
    find_mask,
    list_images,
    load_test_set,
    load_train_images,
    make_synthetic_dataset,
    read_image,
    read_images,
    read_mask,
    to_model_range,
    from_model_range,
)
from defect_fast.data.io import collect_images


def _data_warnings(seen) -> list:
    """The DataWarnings among the warnings pytest.warns recorded: it records every warning, and a
    ResourceWarning from an object of another test collected meanwhile is not this test's."""
    return [w for w in seen if issubclass(w.category, DataWarning)]


SHARED = Path(__file__).resolve().parents[2] / "shared"
MAGTILE = SHARED / "data" / "magnetic-tile"


def _save(path: Path, array: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kw)
    return path


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# read_image: modes, scaling, resizing
# --------------------------------------------------------------------------------------------


def test_rgb_png_exact_at_native_size(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = read_image(_save(tmp_path / "a.png", a), None)
    assert t.dtype == torch.uint8 and t.shape == (3, 5, 7)
    assert torch.equal(t, torch.from_numpy(a).permute(2, 0, 1))


def test_grayscale_repeated_to_three_channels_and_one_channel(tmp_path):
    a = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    p = _save(tmp_path / "g.png", a)
    t = read_image(p, None)
    assert t.shape == (3, 6, 8)
    for c in range(3):
        assert torch.equal(t[c], torch.from_numpy(a))
    one = read_image(p, 16, channels=1)
    assert one.shape == (1, 16, 16)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    p = _save(tmp_path / "d16.png", a)
    with Image.open(p) as im:
        assert im.mode.startswith("I;16")
    t = read_image(p, None)
    assert t[0, 0].tolist() == [0, 1, 128, 255]  # 32768 * 255 / 65535 = 127.5 -> 128


def test_32bit_int_and_float_tiff(tmp_path):
    i32 = np.array([[0, 65535, 13107]], dtype=np.int32)
    assert read_image(_save(tmp_path / "i.tif", i32), None)[0, 0].tolist() == [0, 255, 51]
    f01 = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert read_image(_save(tmp_path / "f.tif", f01), None)[0, 0].tolist() == [0, 128, 255]
    fwide = np.array([[-10.0, 0.0, 10.0]], dtype=np.float32)  # rescaled from its own min..max, and said
    with pytest.warns(DataWarning, match=re.escape("float pixels from -10 to 10, in no range this reader knows")):
        assert read_image(_save(tmp_path / "w.tif", fwide), None)[0, 0].tolist() == [0, 128, 255]
    # one pixel of overshoot keeps the frame's rule (1.02 read the frame as [0, 255]: black)
    over = np.array([[0.0, 0.5, 1.02]], dtype=np.float32)
    assert read_image(_save(tmp_path / "o.tif", over), None)[0, 0].tolist() == [0, 128, 255]
    under = np.array([[-0.02, 0.5, 1.0]], dtype=np.float32)
    assert read_image(_save(tmp_path / "u.tif", under), None)[0, 0].tolist() == [0, 128, 255]


def test_rgba_la_and_palette(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 0  # fully transparent
    t = read_image(_save(tmp_path / "rgba.png", rgba), None)
    assert t[:, 0, 0].tolist() == [200, 100, 50]  # alpha dropped, colour kept

    la = np.stack([np.full((2, 2), 77, np.uint8), np.full((2, 2), 3, np.uint8)], axis=-1)
    assert read_image(_save(tmp_path / "la.png", la, mode="LA"), None)[:, 1, 1].tolist() == [77, 77, 77]
    # premultiplied grey ("La", which PIL converts to "LA" only) is unpremultiplied as "RGBa" is
    from defect_fast.data.io import _to_8bit

    half = Image.fromarray(np.array([[[200, 128]]], np.uint8), mode="LA").convert("La")
    rgba_half = Image.fromarray(np.array([[[200, 200, 200, 128]]], np.uint8), mode="RGBA").convert("RGBa")
    assert np.asarray(_to_8bit(half, 3, tmp_path)).tolist() == np.asarray(_to_8bit(rgba_half, 3, tmp_path)).tolist()
    assert abs(int(np.asarray(_to_8bit(half, 1, tmp_path))[0, 0]) - 200) <= 1

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 240, 130, 5] + [0] * 762)
    pal.save(tmp_path / "p.png")
    t = read_image(tmp_path / "p.png", None)
    assert t[:, 0, 0].tolist() == [10, 20, 30] and t[:, 0, 1].tolist() == [240, 130, 5]


def test_jpeg_bmp_and_uppercase_extensions(tmp_path):
    a = np.full((20, 30), 90, dtype=np.uint8)
    for name in ("a.jpg", "b.BMP", "c.JPEG", "d.tiff"):
        t = read_image(_save(tmp_path / name, a), 8)
        assert t.shape == (3, 8, 8)
        assert abs(int(t.float().mean().round()) - 90) <= 1


def test_resize_is_antialiased_bilinear(tmp_path):
    checker = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    t = read_image(_save(tmp_path / "c.png", checker), 8)
    # nearest or non-antialiased sampling would return 0s and 255s
    assert t.shape == (3, 8, 8)
    assert int(t.min()) >= 120 and int(t.max()) <= 135


def test_tiny_image_upsampled_unless_min_side(tmp_path):
    p = _save(tmp_path / "tiny.png", np.full((2, 3), 200, dtype=np.uint8))
    assert torch.all(read_image(p, 16) == 200)
    with pytest.raises(DataError, match=r"tiny\.png.*3x2.*minimum side of 8"):
        read_image(p, 16, min_side=8)


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("empty.png", b"", "empty"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "corrupt|not a readable"),
        ("text.jpg", b"this is not an image\n", "not a readable"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, name, content, problem):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=problem) as err:
        read_image(p, 8)
    assert str(p) in str(err.value)


def test_truncated_png_and_missing_file(tmp_path):
    data = _png_bytes(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png.*(corrupt|truncated)"):
        read_image(p, 8)
    with pytest.raises(DataError, match=r"nope\.png: file does not exist"):
        read_image(tmp_path / "nope.png", 8)
    (tmp_path / "link.png").symlink_to("moved/away.png")  # listed in its folder: said to be a link to nothing
    with pytest.raises(DataError, match=r"link\.png: a symbolic link to moved/away\.png, which does not exist"):
        read_image(tmp_path / "link.png", 8)


def test_an_image_too_large_for_memory_is_a_data_error(tmp_path, monkeypatch):
    """A size under PIL's bomb limit can still be more than the process may hold: one line naming
    the file and its size, not a MemoryError (the service sets the photo aside with it)."""
    from PIL import ImageFile

    p = _save(tmp_path / "big.png", np.zeros((6, 9, 3), dtype=np.uint8))

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(DataError, match=r"big\.png: too large to decode here \(9x6 pixels\)"):
        read_image(p, 8)


# --------------------------------------------------------------------------------------------
# read_mask
# --------------------------------------------------------------------------------------------


def test_mask_any_nonzero_and_nearest_resize(tmp_path):
    m = np.zeros((4, 4), dtype=np.uint8)
    m[1:3, 1:3] = 1  # value 1, not 255: still a defect
    t = read_mask(_save(tmp_path / "m.png", m), 8)
    assert t.dtype == torch.bool and t.shape == (8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(t, expected)


def test_mask_colour_channels(tmp_path):
    m = np.zeros((3, 3, 3), dtype=np.uint8)
    m[0, 0, 0] = 255  # red pixel
    m[2, 2, 2] = 9  # faint blue pixel
    t = read_mask(_save(tmp_path / "c.png", m), None)
    assert t.sum() == 2 and t[0, 0] and t[2, 2]


@pytest.mark.parametrize("hidden,paint", [(255, 255), (0, 0), (0, 200)])
def test_a_mask_drawn_on_a_transparent_layer_is_read_by_what_is_painted(tmp_path, hidden, paint):
    """The colour under transparent pixels is not seen by whoever drew the mask: white paint on a
    layer whose hidden colour is white read as all defect, black paint on transparent black as
    none (the image then counted as defect-free in the pixel metrics)."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = hidden
    rgba[2:5, 3:6] = (paint, paint, paint, 255)  # 9 painted pixels
    t = read_mask(_save(tmp_path / "m.png", rgba, "RGBA"), None)
    assert int(t.sum()) == 9 and bool(t[2:5, 3:6].all())
    la = np.zeros((8, 8, 2), dtype=np.uint8)
    la[..., 0] = hidden
    la[2:5, 3:6] = (paint, 255)
    assert int(read_mask(_save(tmp_path / "la.png", la, "LA"), None).sum()) == 9
    opaque = rgba.copy()
    opaque[..., 3] = 255  # no transparency: the colours, as before
    assert int(read_mask(_save(tmp_path / "o.png", opaque, "RGBA"), None).sum()) == (64 if hidden else (9 if paint else 0))


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def test_list_images_sorted_hidden_ignored_non_images_warned(tmp_path):
    a = np.zeros((4, 4), dtype=np.uint8)
    for name in ("b.png", "a.JPG", "c.bmp", ".hidden.png"):
        _save(tmp_path / name, a)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    with pytest.warns(DataWarning, match=r"skipped 2 file.*Thumbs\.db, notes\.txt"):
        names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "c.bmp"]
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_sub_folders_holding_images_are_named_when_skipped(tmp_path):
    a = np.zeros((4, 4), dtype=np.uint8)
    _save(tmp_path / "top.png", a)
    for i in range(3):
        _save(tmp_path / "2024-05-01" / f"{i}.png", a)
    (tmp_path / "empty").mkdir()
    with pytest.warns(DataWarning, match=r"sub-folders are not read; skipped 1 holding images: 2024-05-01 \(3\) "
                                         r"\(give each folder itself where a command takes several, .*to train on "
                                         r"them, gather their images into one folder, each under a name of its own\)$"):
        assert [p.name for p in list_images(tmp_path)] == ["top.png"]
    # a test set's class folder: its own advice
    root = _mvtec(tmp_path / "set")
    _save(root / "test" / "good" / "day2" / "0.png", a)
    with pytest.warns(DataWarning, match=r"good: sub-folders are not read; skipped 1 holding images: day2 \(1\) \(a "
                                         r"class's images go in its folder itself: its sub-folders are no classes\)$") as seen:
        load_test_set(root, 16)
    assert [w.filename for w in _data_warnings(seen)] == [__file__]  # the caller's line, not the package's


def test_an_mvtec_root_without_train_good_is_refused(tmp_path):
    (tmp_path / "train" / "Good").mkdir(parents=True)
    _save(tmp_path / "train" / "Good" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    _save(tmp_path / "example.png", np.zeros((8, 8), dtype=np.uint8))  # would have been trained on alone
    with pytest.raises(DataError, match=r"has a train/ folder but no train/good/ \(found: Good\)"):
        load_train_images(tmp_path, 8)


def test_read_images_reports_all_bad_files_at_once(tmp_path):
    good = np.full((6, 6), 50, dtype=np.uint8)
    paths = [_save(tmp_path / "ok1.png", good), tmp_path / "bad1.png", _save(tmp_path / "ok2.png", good), tmp_path / "bad2.jpg"]
    paths[1].write_bytes(b"")
    paths[3].write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        read_images(paths, 4, where=tmp_path, workers=2)
    msg = str(err.value)
    assert "2 problem(s) in 4" in msg and "bad1.png" in msg and "bad2.jpg" in msg
    assert len(err.value.problems) == 2
    ok = read_images([paths[0], paths[2]], 4)
    assert ok.shape == (2, 3, 4, 4) and torch.all(ok == 50)


def test_read_images_collects_every_kind_of_bad_file(tmp_path, monkeypatch):
    import defect_fast.data.io as dio

    good = np.full((12, 12), 50, dtype=np.uint8)
    ok = _save(tmp_path / "ok.png", good)
    small = _save(tmp_path / "small.png", np.full((3, 3), 9, dtype=np.uint8))
    (tmp_path / "folder.png").mkdir()
    cut = tmp_path / "cut.png"
    cut.write_bytes(_png_bytes(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))[:60])
    odd = _save(tmp_path / "odd.png", good)
    real = dio._to_8bit

    def failing(img, channels, path, notes=None):  # a conversion PIL cannot do, for one file only
        if Path(path).name == "odd.png":
            raise ValueError("conversion not supported")
        return real(img, channels, path, notes)

    monkeypatch.setattr(dio, "_to_8bit", failing)
    paths = [ok, tmp_path / "missing.png", small, tmp_path / "folder.png", cut, odd]
    with pytest.raises(DataError) as err:
        read_images(paths, 8, min_side=8, where=tmp_path, workers=2)
    problems = err.value.problems
    assert len(problems) == 5, problems
    for name, what in (("missing.png", "does not exist"), ("small.png", "smaller than the minimum side"),
                       ("folder.png", "not a file"), ("cut.png", "corrupt|truncated|not a readable"),
                       ("odd.png", "cannot convert its L pixels .*conversion not supported")):
        assert any(p.startswith(str(tmp_path / name)) and re.search(what, p) for p in problems), (name, problems)
    # masks go through the same guard
    monkeypatch.setattr(dio.np, "asarray", lambda *a, **k: (_ for _ in ()).throw(MemoryError("too big")))
    with pytest.raises(DataError, match=r"ok\.png: cannot convert its L pixels \(MemoryError: too big\)"):
        read_mask(ok, 8)


def test_collect_images_reports_every_missing_input(tmp_path):
    a = _save(tmp_path / "imgs" / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _save(tmp_path / "imgs" / "b.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.warns(DataWarning, match="given more than once are taken once"):  # a named twice: once
        assert collect_images([a, tmp_path / "imgs"]) == [a, tmp_path / "imgs" / "b.png"]
    with pytest.raises(DataError) as err:
        collect_images([tmp_path / "imgs", tmp_path / "nope.png", tmp_path / "empty", tmp_path / "gone"])
    assert sorted(err.value.problems) == sorted([f"{tmp_path / 'nope.png'}: no such file or folder",
                                                 f"{tmp_path / 'gone'}: no such file or folder",
                                                 f"{tmp_path / 'empty'}: folder holds no images (extensions "
                                                 ".png, .jpg, .jpeg, .bmp, .tif, .tiff)"])
    with pytest.raises(DataError, match=r"^\S*nope\.png: no such file or folder$"):
        collect_images([tmp_path / "nope.png"])


def test_load_train_images_root_folder_and_errors(tmp_path):
    root = make_synthetic_dataset(tmp_path / "ds", n_train=3, n_test_good=1, n_test_defect=1, size=32)
    imgs, paths = load_train_images(root, 16)
    assert imgs.shape == (3, 3, 16, 16) and imgs.dtype == torch.uint8
    assert [p.name for p in paths] == ["000.png", "001.png", "002.png"]
    same, _ = load_train_images(root / "train" / "good", 16)
    also, _ = load_train_images(root / "train", 16)
    assert torch.equal(imgs, same) and torch.equal(imgs, also)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: no training images"):
        load_train_images(empty, 16)
    (empty / "readme.txt").write_text("x")
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no training images"):
        load_train_images(empty, 16)


def _mvtec(tmp_path: Path) -> Path:
    return make_synthetic_dataset(tmp_path / "ds", n_train=2, n_test_good=2, n_test_defect=2, size=32, seed=3)


def test_load_test_set_layout(tmp_path):
    root = _mvtec(tmp_path)
    # a mask named <stem>.png is accepted too, and an empty mask is allowed
    (root / "ground_truth" / "spot" / "001_mask.png").rename(root / "ground_truth" / "spot" / "001.png")
    _save(root / "ground_truth" / "scratch" / "001_mask.png", np.zeros((32, 32), dtype=np.uint8))
    ts = load_test_set(root, 16)
    assert len(ts) == 6
    assert ts.classes == ["good", "good", "scratch", "scratch", "spot", "spot"]
    assert ts.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert ts.class_names == ["good", "scratch", "spot"]
    assert ts.images.shape == (6, 3, 16, 16) and ts.masks.shape == (6, 16, 16) and ts.masks.dtype == torch.bool
    assert not ts.masks[:2].any() and ts.mask_paths[:2] == [None, None]
    assert ts.masks[2].any() and not ts.masks[3].any() and ts.masks[5].any()
    assert ts.mask_paths[5].name == "001.png"
    ref = read_mask(root / "ground_truth" / "scratch" / "000_mask.png", 16)
    assert torch.equal(ts.masks[2], ref)



@pytest.mark.parametrize("with_ground_truth", [True, False])
def test_masks_kept_beside_their_images_are_not_test_images(tmp_path, with_ground_truth):
    """A line's folder of defective parts with each mask beside its image: evaluate counted every
    mask as one more defective part (image-level results only, without ground_truth/), in silence."""
    root = _mvtec(tmp_path)
    if not with_ground_truth:
        shutil.rmtree(root / "ground_truth")
    for cls in ("scratch", "spot"):
        for name in ("000", "001"):
            _save(root / "test" / cls / f"{name}_mask.png", np.full((32, 32), 255, dtype=np.uint8))
    # no lone.png beside it: a test image of that name
    _save(root / "test" / "spot" / "lone_mask.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    if with_ground_truth:
        defect = np.zeros((32, 32), dtype=np.uint8)
        defect[4:12, 4:12] = 255
        _save(root / "ground_truth" / "spot" / "lone_mask_mask.png", defect)
    # a test image of that name, with its own mask in ground_truth/: a part, not a mask
    _save(root / "test" / "spot" / "part.png", np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
    _save(root / "test" / "spot" / "part_mask.png", np.random.default_rng(2).integers(0, 256, (32, 32, 3), np.uint8))
    if with_ground_truth:
        for name in ("part", "part_mask"):
            defect = np.zeros((32, 32), dtype=np.uint8)
            defect[4:12, 4:12] = 255
            _save(root / "ground_truth" / "spot" / f"{name}_mask.png", defect)
    with pytest.warns(DataWarning, match=r"test: \d file\(s\) named <image>_mask beside their images are taken for "
                                         r"masks, not test images, and left out \(scratch/000_mask\.png, "
                                         r"scratch/001_mask\.png, spot/000_mask\.png, \.\.\.\); masks go in .*ground_truth/"
                                         r"<class>/, named <image>_mask\.png") as seen:
        ts = load_test_set(root, 16, require_masks=with_ground_truth)
    assert len(_data_warnings(seen)) == 1 and seen[0].filename == __file__
    assert str(seen[0].message).startswith(f"{root / 'test'}: {4 if with_ground_truth else 5} file(s)")
    assert [p.name for p in ts.paths] == ["000.png", "001.png", "000.png", "001.png", "000.png", "001.png",
                                          "lone_mask.png", "part.png"] + (["part_mask.png"] if with_ground_truth else [])


def test_a_mask_in_ground_truth_good_that_marks_a_defect_is_said(tmp_path):
    """Masks in ground_truth/good/ are never read (good images count as defect-free): a blank one,
    as some datasets ship, is fine; one marking a defect, which contradicts the image's folder, was
    ignored without a word."""
    root = _mvtec(tmp_path)
    good = root / "ground_truth" / "good"
    good.mkdir()
    _save(good / "000_mask.png", np.zeros((32, 32), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_test_set(root, 16)
    _save(good / "001_mask.png", np.full((32, 32), 255, dtype=np.uint8))
    with pytest.warns(DataWarning, match=r"good: 1 mask\(s\) mark defect pixels, but the images of test/good/ count "
                                         r"as defect-free and their masks are not read: 001_mask\.png") as seen:
        ts = load_test_set(root, 16)
    assert len(_data_warnings(seen)) == 1 and ts.labels.tolist()[:2] == [0, 0] and not ts.masks[:2].any()

def test_a_stack_of_images_this_process_cannot_hold_is_a_one_line_error(tmp_path, monkeypatch):
    """The preallocated stack of every image: torch's allocation error was an internal error."""
    root = _mvtec(tmp_path)
    real_empty = torch.empty

    def no_memory(shape, *args, **kwargs):
        if len(shape) == 4 and shape[-1] == 4096:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory")
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_memory)
    with pytest.raises(DataError, match=r"^.*test: 6 images at 4096 x 4096 need 0\.3 GiB in memory, more than this "
                                        r"process can allocate; use a smaller --image-size or fewer images$"):
        load_test_set(root, 4096)
    paths = sorted((root / "train" / "good").glob("*.png"))
    with pytest.raises(DataError, match=f"^train/good: {len(paths)} images at 4096 x 4096 need"):
        read_images(paths, 4096, where="train/good")
    assert read_images(paths, 16).shape == (len(paths), 3, 16, 16)  # other errors of torch.empty are not caught
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        read_images(paths, 16)
    # a size past what torch counts in bytes: its "overflowed" error was an internal error
    from defect_fast.data.io import image_stack

    monkeypatch.undo()
    with pytest.raises(DataError, match="^t: 12 images at 3000000000 x 3000000000 need"):
        image_stack((12, 3, 3_000_000_000, 3_000_000_000), "t")


def test_load_test_set_reports_every_problem_at_once(tmp_path):
    root = _mvtec(tmp_path)
    (root / "ground_truth" / "scratch" / "000_mask.png").unlink()
    _save(root / "ground_truth" / "spot" / "001_mask.png", np.zeros((30, 32), dtype=np.uint8))
    (root / "test" / "good" / "001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as err:
        load_test_set(root, 16)
    msg = str(err.value)
    assert len(err.value.problems) == 3
    expected_mask = root / "ground_truth" / "scratch" / "000_mask.png"
    assert f"{root / 'test' / 'scratch' / '000.png'}: no ground-truth mask (expected {expected_mask}" in msg
    assert "001_mask.png: mask is 32x30 (width x height) but its image" in msg and "test/spot/001.png is 32x32" in msg
    assert "test/good/001.png" in msg


def test_a_folder_where_a_mask_goes_is_named(tmp_path):
    root = _mvtec(tmp_path)
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    mask.unlink()
    mask.mkdir()
    with pytest.raises(DataError, match=f"{mask}: not a file; expected the ground-truth mask of .*000.png there"):
        load_test_set(root, 16)


def test_a_mask_whose_extension_is_in_mixed_case_is_found(tmp_path):
    """Images are matched by extension in any case; a mask "000_mask.Png" was "no ground-truth mask"."""
    root = _mvtec(tmp_path)
    want = load_test_set(root, 16).masks
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    mask.rename(mask.with_name("000_mask.Png"))
    assert find_mask(root, "scratch", "000.png") == mask.with_name("000_mask.Png")
    assert torch.equal(load_test_set(root, 16).masks, want)
    # the name in another case: 000_MASK.png, and an image IMG.png whose mask is img_mask.png
    mask.with_name("000_mask.Png").rename(mask.with_name("000_MASK.PNG"))
    other = root / "ground_truth" / "scratch" / "001_mask.png"
    (root / "test" / "scratch" / "001.png").rename(root / "test" / "scratch" / "A001.png")
    other.rename(other.with_name("a001_mask.png"))
    assert find_mask(root, "scratch", "000.png") == mask.with_name("000_MASK.PNG")
    assert find_mask(root, "scratch", "A001.png") == other.with_name("a001_mask.png")
    assert torch.equal(load_test_set(root, 16).masks, want)
    other.with_name("a001_mask.png").rename(other.with_name("A001_mask.png"))  # the exact name, when there, first
    _save(other.with_name("a001_mask.png"), np.zeros((32, 32), np.uint8))
    assert find_mask(root, "scratch", "A001.png") == other.with_name("A001_mask.png")


def test_a_mask_named_in_the_other_unicode_form_is_found(tmp_path):
    """macOS writes names decomposed (NFD): "café_mask.png" copied from one did not match the image
    "café.png" (composed), which was refused as having no mask, beside a warning that the mask
    belonged to no image."""
    import unicodedata
    import warnings

    root = _mvtec(tmp_path)
    want = load_test_set(root, 16).masks
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    (root / "test" / "scratch" / "000.png").rename(root / "test" / "scratch" / f"{nfc}.png")
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    mask.rename(mask.with_name(f"{nfd}_mask.png"))
    assert find_mask(root, "scratch", f"{nfc}.png") == mask.with_name(f"{nfd}_mask.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mask said to belong to no image
        ts = load_test_set(root, 16)
    assert sorted(m.sum().item() for m in ts.masks) == sorted(m.sum().item() for m in want)


def test_two_images_sharing_a_stem_do_not_share_a_mask_silently(tmp_path):
    """000.png and 000.bmp both found 000_mask.png: one defective image was judged against another's
    defect, without a word."""
    root = _mvtec(tmp_path)
    img = root / "test" / "scratch" / "000.png"
    Image.open(img).save(img.with_suffix(".bmp"))
    with pytest.raises(DataError, match=r"000_mask\.png: the ground-truth mask of 2 images \(000\.bmp, 000\.png\)"):
        load_test_set(root, 16)


def test_masks_that_are_not_two_level_or_cover_most_of_the_image_are_warned_of(tmp_path):
    root = _mvtec(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # clean 0/255 masks: no warning
        load_test_set(root, 16)
    for mask in sorted((root / "ground_truth").rglob("*.png")):
        m = np.asarray(Image.open(mask))
        _save(mask, np.where(m > 0, 0, 255).astype(np.uint8))  # inverted
    with pytest.warns(DataWarning, match=r"mask\(s\) mark more than half of their image"):
        load_test_set(root, 16)
    for mask in sorted((root / "ground_truth").rglob("*.png")):
        soft = 255 - np.asarray(Image.open(mask))  # the original 0/255 mask again
        soft[(soft > 0) & (np.arange(soft.shape[1])[None, :] % 2 == 0)] = 128  # with a second defect level
        _save(mask, soft)
    with pytest.warns(DataWarning, match=r"hold more than two values \(soft edges or JPEG"):
        load_test_set(root, 16)
    for mask in sorted((root / "ground_truth").rglob("*.png")):
        thin = np.zeros((32, 32), dtype=np.uint8)
        thin[:, 10] = 255  # a one-pixel crack between the samples of the resize to 16
        _save(mask, thin)
    with pytest.warns(DataWarning, match=r"4 mask\(s\) lose every defect pixel in the resize to 16 x 16") as seen:
        ts = load_test_set(root, 16)
    assert len(_data_warnings(seen)) == 1 and not ts.masks.any() and ts.labels.tolist() == [0, 0, 1, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # at its own size the crack is kept
        assert int(load_test_set(root, 32).masks.sum()) == 4 * 32


def test_load_test_set_without_test_folder(tmp_path):
    with pytest.raises(DataError, match=r"no test/ folder \(expected an MVTec-style layout: test/good/ and "
                                        r"test/<defect class>/ holding the images\)$"):
        load_test_set(tmp_path, 16)
    # a line's good/ and bad/ folders: where they go is said
    for cls in ("good", "bad"):
        _save(tmp_path / "line" / cls / "0.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"line: no test/ folder .*; its folders of images \(bad, good\) go in test/, "
                                        r"the defect-free ones' named good, and their masks in ground_truth/<class>/$"):
        load_test_set(tmp_path / "line", 16)
    real_iterdir = Path.iterdir

    def unlistable(self):  # a folder this process may not list (root lists them all: as if)
        if self == tmp_path / "line":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "iterdir", unlistable)
        with pytest.raises(DataError, match=r"line: no test/ folder \(expected an MVTec-style layout: test/good/ and "
                                            r"test/<defect class>/ holding the images\)$"):
            load_test_set(tmp_path / "line", 16)
    with pytest.raises(DataError, match=r"nope: no such folder"):  # not "no test/ folder" of a folder that is not there
        load_test_set(tmp_path / "nope", 16)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"a\.png: not a folder"):
        load_test_set(tmp_path / "a.png", 16)


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = to_model_range(x)
    assert f.dtype == torch.float32 and float(f.min()) == -1.0 and float(f.max()) == 1.0
    assert torch.equal(from_model_range(f), x)


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_magnetic_tile_test_set_loads():
    if not MAGTILE.is_dir():
        pytest.skip(f"{MAGTILE} not present (the shared data folder beside the checkout)")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", DataWarning)  # the folders hold only images; four masks are empty
        ts = load_test_set(MAGTILE, 256)
    said = [str(w.message) for w in seen if issubclass(w.category, DataWarning)]
    assert len(said) == 1 and said[0].startswith(f"{MAGTILE}: 4 mask(s) mark no pixel as defect"), said
    counts = {c: ts.classes.count(c) for c in ts.class_names}
    assert counts == {"good": 100, "blowhole": 57, "break": 42, "crack": 28, "fray": 16, "uneven": 51}
    assert int(ts.labels.sum()) == 194
    empty = [p.name for p, m, y in zip(ts.paths, ts.masks, ts.labels) if y == 1 and not m.any()]
    assert len(empty) == 4 and all(p.startswith("exp") for p in empty)  # empty in the annotation itself
    assert torch.equal(ts.images[:, 0], ts.images[:, 2])  # grayscale repeated


# --------------------------------------------------------------------------------------------
# EXIF orientation
# --------------------------------------------------------------------------------------------

#: What a viewer does with the stored pixels [H, W, ...] for each EXIF orientation value.
_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),  # turn 90 degrees clockwise
    7: lambda a: np.swapaxes(np.rot90(a, 2), 0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _save_oriented(path: Path, array: np.ndarray, orientation: int, **kw) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(path, array, exif=exif.tobytes(), **kw)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_to_png_images(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    p = _save_oriented(tmp_path / "o.png", stored, orientation)
    with Image.open(p) as im:
        assert im.getexif()[0x0112] == orientation
    t = read_image(p, None)
    expected = np.ascontiguousarray(_UPRIGHT[orientation](stored))
    assert t.shape == (3, *expected.shape[:2])
    assert torch.equal(t, torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_deflate"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_tag_applied_to_tiff_images(tmp_path, orientation, compression):
    # PIL turns a TIFF with orientation 5..8 itself while decoding and scrambles its rows (Pillow 13)
    rng = np.random.default_rng(orientation)
    for name, stored in (("rgb", rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
                         ("gray16", rng.integers(0, 256, (5, 7), dtype=np.uint16) * 257)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        p = tmp_path / f"{name}.tif"
        Image.fromarray(stored).save(p, exif=exif, compression=compression)
        expected = np.ascontiguousarray(_UPRIGHT[orientation](stored if name == "rgb" else (stored // 257).astype(np.uint8)))
        expected = expected if name == "rgb" else np.repeat(expected[..., None], 3, axis=2)
        t = read_image(p, None)
        assert t.shape == (3, *expected.shape[:2]), (name, orientation)
        assert torch.equal(t, torch.from_numpy(expected).permute(2, 0, 1)), (name, orientation)
    # a second page: counting the pages sought back to the first, which re-read its turned size
    stored = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "two.tif", exif=exif, compression=compression, save_all=True,
                                 append_images=[Image.fromarray(255 - stored)])
    with pytest.warns(DataWarning, match="holds 2 frames"):
        t = read_image(tmp_path / "two.tif", None)
    assert torch.equal(t, torch.from_numpy(np.ascontiguousarray(_UPRIGHT[orientation](stored))).permute(2, 0, 1))
    m = np.zeros((4, 6), dtype=np.uint8)
    m[0, 5] = 255  # top-right as stored
    Image.fromarray(m).save(tmp_path / "m.tif", exif=exif, compression=compression)
    assert torch.equal(read_mask(tmp_path / "m.tif", None), torch.from_numpy(np.ascontiguousarray(_UPRIGHT[orientation](m)) != 0))


def test_exif_orientation_jpeg_16bit_and_mask(tmp_path):
    # a dark left half, stored sideways by a "phone": orientation 6 (turn clockwise to view)
    stored = np.zeros((40, 24), dtype=np.uint8)
    stored[:20] = 200  # top half bright as stored -> right half bright when upright
    t = read_image(_save_oriented(tmp_path / "phone.jpg", stored, 6, quality=95), None)
    assert t.shape == (3, 24, 40)
    assert float(t[:, :, 25:].float().mean()) > 190 and float(t[:, :, :15].float().mean()) < 10

    wide = (stored.astype(np.uint16) * 257)
    t16 = read_image(_save_oriented(tmp_path / "d16.png", wide, 8), None)
    assert torch.equal(t16[0], torch.from_numpy(np.ascontiguousarray(np.rot90(stored, 1))))

    m = np.zeros((4, 6), dtype=np.uint8)
    m[0, 5] = 255  # top-right as stored
    mask = read_mask(_save_oriented(tmp_path / "m.png", m, 3), None)
    assert mask.shape == (4, 6) and bool(mask[3, 0]) and int(mask.sum()) == 1


def test_sideways_photo_matches_its_upright_mask(tmp_path):
    """A photo stored 48x32 with orientation 6 is seen 32x48; its mask was drawn on the upright view."""
    root = tmp_path / "ds"
    good = np.full((32, 48), 128, dtype=np.uint8)
    _save(root / "train" / "good" / "000.png", good)
    _save(root / "test" / "good" / "000.png", good)
    stored = np.full((32, 48), 128, dtype=np.uint8)
    stored[0:4, 0:4] = 255  # top-left as stored -> top-right when upright
    _save_oriented(root / "test" / "spot" / "000.png", stored, 6)
    upright_mask = np.zeros((48, 32), dtype=np.uint8)
    upright_mask[0:4, 28:32] = 255
    _save(root / "ground_truth" / "spot" / "000_mask.png", upright_mask)
    # a mask of the upright size of a photo turned a quarter was drawn on the upright view: nothing to say
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ts = load_test_set(root, 16)
    assert not [w for w in seen if "turned or flipped" in str(w.message)]
    img, mask = ts.images[1, 0].float(), ts.masks[1]
    assert mask.any()
    assert float(img[mask].mean()) > 200 and float(img[~mask].mean()) < 140
    # a mask stored as its image is, with its orientation, lies on the same pixels: nothing to say
    stored_mask = np.zeros((32, 48), dtype=np.uint8)
    stored_mask[0:4, 0:4] = 255
    _save_oriented(root / "ground_truth" / "spot" / "000_mask.png", stored_mask, 6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(load_test_set(root, 16).masks[1], mask)
    assert not [w for w in seen if "turned or flipped" in str(w.message)]
    # whether a mask was drawn on the upright view or on the stored pixels cannot be told where the
    # turn keeps the size (a square image; a flip, or a turn by 180 degrees): said, for the user to look
    for orientation, shape in ((6, (40, 40)), (3, (32, 48))):
        square = np.full(shape, 128, dtype=np.uint8)
        square[0:4, 0:4] = 255
        _save_oriented(root / "test" / "spot" / "000.png", square, orientation)
        _save(root / "ground_truth" / "spot" / "000_mask.png", np.zeros(shape, dtype=np.uint8))
        with pytest.warns(DataWarning, match=re.escape("1 mask(s) belong to images stored turned or flipped")) as seen:
            load_test_set(root, 16)
        said = [str(w.message) for w in _data_warnings(seen) if "turned or flipped" in str(w.message)]
        assert "ground_truth/spot/000_mask.png" in said[0], orientation


def test_read_image_at_both_sizes_decodes_once_what_read_image_gives(tmp_path):
    from defect_fast.data.io import read_image_at_both_sizes

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((30, 50)) * 65535).astype(np.uint16)).save(tmp_path / "wide16.png")  # 16-bit grey
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "square.png")
    for name in ("wide16.png", "square.png"):
        small, full = read_image_at_both_sizes(tmp_path / name, 32)
        assert torch.equal(small, read_image(tmp_path / name, 32)) and torch.equal(full, read_image(tmp_path / name, None))
    assert read_image_at_both_sizes(tmp_path / "wide16.png", 32)[1].shape == (3, 30, 50)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        read_image_at_both_sizes(tmp_path / "bad.png", 32)


# --------------------------------------------------------------------------------------------
# Damaged fields, odd containers
# --------------------------------------------------------------------------------------------


def test_a_photo_whose_exif_pil_cannot_write_back_is_still_turned_upright(tmp_path):
    """exif_transpose re-encoded the EXIF block without the orientation tag and raised struct.error
    on a field it reads but cannot write: an internal error, and a line service stopped at every
    start on the same file. Only the pixels are turned now."""
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Cam"
    buf = io.BytesIO()
    Image.new("RGB", (20, 24), (90, 90, 90)).save(buf, "JPEG", exif=exif)
    # the Make tag renumbered to one PIL's table types as LONG: its ASCII value no longer packs
    data = buf.getvalue().replace(b"\x01\x0f\x00\x02", b"\x01\x20\x00\x02", 1)
    assert data != buf.getvalue()
    (tmp_path / "photo.jpg").write_bytes(data)
    assert read_image(tmp_path / "photo.jpg", None).shape == (3, 20, 24)  # 20 wide, 24 high, turned: 24 x 20


def test_any_failure_of_a_damaged_file_is_a_data_error_naming_it(tmp_path):
    """A TIFF tag of the wrong type made PIL's decoder raise TypeError, which passed through as an
    internal error (only OSError and the like were taken for the file's)."""
    buf = io.BytesIO()
    Image.new("L", (20, 24), 90).save(buf, "TIFF")
    data = buf.getvalue().replace(b"\x11\x01\x04\x00", b"\x11\x01\x02\x00")  # StripOffsets: LONG -> ASCII
    assert data != buf.getvalue()
    (tmp_path / "scan.tif").write_bytes(data)
    with pytest.raises(DataError) as err:
        read_image(tmp_path / "scan.tif", None)
    assert str(err.value).startswith(f"{tmp_path / 'scan.tif'}: ") and "TypeError" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_file_of_several_frames_is_read_by_its_first_and_said_so(tmp_path):
    p = tmp_path / "scan.tif"
    Image.new("L", (16, 16), 0).save(p, save_all=True, append_images=[Image.new("L", (64, 48), 200)])
    with pytest.warns(DataWarning, match=re.escape(f"{p}: holds 2 frames (pages); the first, 16x16, is read")):
        assert read_image(p, None).shape == (3, 16, 16)
    # its first page stored sideways: its size said upright, as it is read (it was said as stored)
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[0x0112] = 6
    Image.new("L", (32, 16), 0).save(p, save_all=True, append_images=[Image.new("L", (64, 48), 200)], tiffinfo=tags)
    with pytest.warns(DataWarning, match=re.escape(f"{p}: holds 2 frames (pages); the first, 16x32, is read")):
        assert read_image(p, None).shape == (3, 32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(_save(tmp_path / "one.tif", np.zeros((4, 4), np.uint8)), None)  # one frame: nothing said


def test_a_16_bit_colour_png_mask_is_refused_not_read_empty(tmp_path):
    """PIL keeps the high byte of a 16-bit colour PNG's values: a mask drawn with 255 read as no
    defect at all. 16-bit grayscale (read exactly) and 8-bit colour masks are read as before."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    m = np.zeros((16, 16, 3), np.uint16)
    m[4:8, 4:8] = 255
    raw = b"".join(b"\x00" + m[y].astype(">u2").tobytes() for y in range(16))
    p = tmp_path / "rgb16_mask.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with Image.open(p) as im:
        assert im.mode == "RGB" and not np.asarray(im).any()  # what PIL makes of it
    with pytest.raises(DataError, match=re.escape(f"{p}: a 16-bit colour PNG")):
        read_mask(p, None)
    # also with an EXIF orientation (the turned image carries no format: the check was skipped)
    exif = Image.Exif()
    exif[0x0112] = 3
    turned = tmp_path / "rgb16_turned_mask.png"
    turned.write_bytes(p.read_bytes()[:-12] + chunk(b"eXIf", exif.tobytes()[6:]) + chunk(b"IEND", b""))
    with Image.open(turned) as im:
        assert im.getexif().get(0x0112) == 3
    with pytest.raises(DataError, match=re.escape(f"{turned}: a 16-bit colour PNG")):
        read_mask(turned, None)
    assert read_image(p, None).shape == (3, 16, 16)  # as an image, the high byte is its 8-bit value
    gray = m[..., 0]
    assert int(read_mask(_save(tmp_path / "g16.png", gray), None).sum()) == 16
    assert int(read_mask(_save(tmp_path / "rgb8.png", (m > 0).astype(np.uint8) * 255), None).sum()) == 16


def test_a_float_frame_in_0_1_with_a_hot_pixel_is_read_as_0_1(tmp_path):
    """Past the 0.05 margin, one hot pixel read the whole [0, 1] frame as [0, 255]: black."""
    a = np.random.default_rng(0).random((64, 64)).astype(np.float32) * 0.9 + 0.05
    a[0, 0] = 3.0
    p = _save(tmp_path / "hot.tif", a)
    with pytest.warns(DataWarning, match=re.escape(f"{p}: float pixels read as [0, 1]; 1 outside it")):
        t = read_image(p, None)[0]
    assert t[0, 0] == 255 and abs(int(t[1:, 1:].float().mean()) - int(a[1:, 1:].mean() * 255)) <= 1
    wide = np.clip(a, 0, 1) * 200  # a [0, 255] frame keeps its rule (mean about 100)
    assert 95 <= int(read_image(_save(tmp_path / "wide.tif", wide), None)[0].float().mean()) <= 105


def test_a_float_frame_is_read_by_its_range_whatever_its_glints_or_hot_pixels(tmp_path):
    """Glints on 0.2 % of a [0, 1] frame read it as [0, 255] (near black: its score 8 times the
    8-bit image's) and one hot pixel in a [0, 255] frame read it by its own min..max (dark), both
    without a word; a frame in neither range is rescaled by its own, and that is said."""
    rng = np.random.default_rng(1)
    base = rng.random((100, 100)) * 0.8 + 0.1
    want = np.rint(base * 255)
    glints = base.copy()
    glints.flat[rng.choice(base.size, 20, replace=False)] = 1.2  # 0.2 %
    p = _save(tmp_path / "glints.tif", glints.astype(np.float32))
    with pytest.warns(DataWarning, match=re.escape(f"{p}: float pixels read as [0, 1]; 20 outside it")):
        t = read_image(p, None, 1)[0].numpy().astype(float)
    kept = glints <= 1.0
    assert np.abs(t[kept] - want[kept]).max() <= 1 and (t[~kept] == 255).all()
    hot = base * 255
    hot[0, 0] = 400.0
    p = _save(tmp_path / "hot255.tif", hot.astype(np.float32))
    with pytest.warns(DataWarning, match=re.escape(f"{p}: float pixels read as [0, 255]; 1 outside it")):
        t = read_image(p, None, 1)[0].numpy().astype(float)
    assert t[0, 0] == 255 and np.abs(t - want).flat[1:].max() <= 1
    many = base.copy()  # 2 % at 1.5: too many to clip as outliers; read as [0, 255], and said
    many.flat[rng.choice(base.size, 200, replace=False)] = 1.5
    p = _save(tmp_path / "many.tif", many.astype(np.float32))
    with pytest.warns(DataWarning, match=re.escape(f"{p}: float pixels read as [0, 255] (from 0.1001 to 1.5), though "
                                                   "98% of them lie in [0, 1]")):
        read_image(p, None, 1)
    many.flat[0] = -0.2  # and with one outlier below 0, clipped as such: both are said
    p = _save(tmp_path / "many2.tif", many.astype(np.float32))
    with pytest.warns(DataWarning) as seen:
        read_image(p, None, 1)
    said = [str(w.message) for w in _data_warnings(seen)]
    assert any("1 outside it" in m for m in said) and any("of them lie in [0, 1]" in m for m in said), said
    dark = np.zeros((100, 100), np.float32)  # a dark [0, 255] frame with a few bright pixels: as before, quiet
    dark.flat[:50] = 200.0
    dark.flat[50:5100] = 1.0  # whole numbers: [0, 255] data, its median at 1 notwithstanding
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert int(read_image(_save(tmp_path / "dark.tif", dark), None, 1).max()) == 200
    for exposure in (1.0, 0.5):  # 12-bit data as float: no known range, each frame by its own
        p = _save(tmp_path / f"12bit-{exposure}.tif", (base * 4095 * exposure).astype(np.float32))
        with pytest.warns(DataWarning, match=re.escape(f"{p}: float pixels from")) as seen:
            t = read_image(p, None, 1)[0]
        assert "rescaled from this image's own minimum and maximum" in str(_data_warnings(seen)[0].message)
        assert t.min() == 0 and t.max() == 255
    i32 = (base * 100_000).astype(np.int32)  # past 16 bits: the same, said
    with pytest.warns(DataWarning, match="32-bit integer pixels from .* in no range this reader knows"):
        read_image(_save(tmp_path / "i32.tif", i32), None, 1)


def test_a_test_folder_says_what_it_does_not_read_or_take_as_defect_free(tmp_path):
    """Images put directly in test/ were not read, and class folders not named good (OK, Good)
    were all taken as defective, both without a word."""
    root = _mvtec(tmp_path)
    _save(root / "test" / "extra.png", np.zeros((32, 32), np.uint8))
    with pytest.warns(DataWarning, match=re.escape("images directly in test/ are not read, only its class folders: "
                                                   "1 skipped (extra.png)")):
        assert len(load_test_set(root, 16)) == 6
    (root / "test" / "extra.png").unlink()
    (root / "test" / "good").rename(root / "test" / "OK")
    shutil.rmtree(root / "ground_truth")  # image-level only (with masks, OK/ is refused for lacking them)
    with pytest.warns(DataWarning, match=re.escape("no good/ folder, so every test image is taken as defective "
                                                   "(classes OK, scratch, spot)")):
        assert load_test_set(root, 16, require_masks=False).labels.tolist() == [1] * 6
    (root / "test" / "OK").rename(root / "test" / "Good")  # the name is good/, exactly: a warning says so
    with pytest.warns(DataWarning, match=re.escape("no good/ folder, so every test image is taken as defective "
                                                   "(classes Good, scratch, spot)")):
        assert load_test_set(root, 16, require_masks=False).labels.tolist() == [1] * 6


def test_what_no_test_image_uses_is_said_not_left_out_silently(tmp_path):
    """A mask whose image was renamed or deleted, an empty class folder and a ground_truth/ class
    with no test/ folder left images out of the metrics without a word."""
    root = _mvtec(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)  # the complete set: nothing to say
        assert len(load_test_set(root, 16)) == 6
    (root / "test" / "spot" / "001.png").rename(root / "test" / "spot" / "001-old.png.bak")
    (root / "test" / "crack").mkdir()
    _save(root / "ground_truth" / "dent" / "000_mask.png", np.zeros((32, 32), np.uint8))
    with pytest.warns(DataWarning) as seen:
        assert len(load_test_set(root, 16)) == 5
    said = [str(w.message) for w in _data_warnings(seen) if "left out of the metrics" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in seen]
    assert "class folder(s) with no images: crack" in said[0]
    assert "2 mask(s) or mask folder(s)" in said[0]
    assert "dent/ (no test/dent/ folder)" in said[0] and "spot/001_mask.png" in said[0]
    # a mask found by another name of the same file (a file system that ignores case answers to the
    # name asked for, 000_mask.png, where the folder lists 000_MASK.png): not said to be unused
    for extra in (root / "test" / "crack", root / "ground_truth" / "dent" / "000_mask.png"):
        extra.rmdir() if extra.is_dir() else extra.unlink()
    (root / "test" / "spot" / "001-old.png.bak").rename(root / "test" / "spot" / "001.png")
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    os.link(mask, mask.with_name("000_MASK.png"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_test_set(root, 16)
    assert not [w for w in seen if "left out of the metrics" in str(w.message)], [str(w.message) for w in seen]


def test_a_damaged_page_after_the_first_leaves_the_first_read_and_is_said(tmp_path):
    """Counting a TIFF's pages parses every one: a damaged second page raised TypeError (an internal
    error) from the count, and left the file on that page, whose tags are not the first's."""
    import struct

    a = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="TIFF", save_all=True, append_images=[Image.fromarray(a)])
    d = bytearray(buf.getvalue())
    first = struct.unpack_from("<I", d, 4)[0]
    n1 = struct.unpack_from("<H", d, first)[0]
    second = struct.unpack_from("<I", d, first + 2 + 12 * n1)[0]
    for i in range(struct.unpack_from("<H", d, second)[0]):  # its ImageWidth tag renumbered: no width
        if struct.unpack_from("<H", d, second + 2 + 12 * i)[0] == 256:
            struct.pack_into("<H", d, second + 2 + 12 * i, 0xFFF0)
    p = tmp_path / "two.tif"
    p.write_bytes(bytes(d))
    with pytest.warns(DataWarning, match=re.escape(f"{p}: its pages after the first cannot be counted")):
        t = read_image(p, None)
    assert np.array_equal(t.permute(1, 2, 0).numpy(), a)


def test_16_bit_images_that_use_a_sixteenth_of_the_range_are_warned_of_once(tmp_path):
    """A 12-bit camera's frames stored in 16-bit files (values 0..4095) are read by the full 16-bit
    range: dark, in 17 grey levels at most. The many-file readers say so in one warning."""
    import struct
    import zlib

    rng = np.random.default_rng(0)
    frame = (2000 + rng.normal(0, 30, (32, 32))).clip(0, 4095).astype(np.uint16)
    folder = tmp_path / "cam"
    for i in range(4):
        _save(folder / f"{i}.png", frame)
    _save(folder / "4.tif", frame)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rgb = np.repeat(frame[..., None], 3, axis=2)  # and a 16-bit colour PNG, which PIL reads by its high bytes
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(32))
    (folder / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 16, 2, 0, 0, 0))
                                   + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    paths = sorted(folder.iterdir())
    # the colour PNG's bound is its high byte's: (8 + 1) * 256 - 1
    with pytest.warns(DataWarning, match=r"cam: 6 of 6 16-bit images hold values up to 2303 at most \(of 65535\), "
                                         r"so they are read at 10 grey level\(s\) or fewer") as seen:
        images = read_images(paths, 32, where=folder)
    said = _data_warnings(seen)
    assert len(said) == 1 and int(images.max()) <= 16 and said[0].filename == __file__  # the caller's line
    _save(folder / "full.png", (frame.astype(np.uint32) * 16).astype(np.uint16))  # scaled to 16 bits: no warning
    _save(folder / "eight.png", (frame // 16).astype(np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert int(read_images([folder / "full.png", folder / "eight.png"], 32).float().mean()) > 100
    root = make_synthetic_dataset(tmp_path / "ds", n_train=2, n_test_good=2, n_test_defect=1, size=32, seed=3)
    _save(root / "test" / "good" / "000.png", frame)
    with pytest.warns(DataWarning, match=r"1 of 4 16-bit images hold values up to") as seen:
        load_test_set(root, 32)
    assert len(_data_warnings(seen)) == 1


def test_black_16_bit_frames_are_called_blank_not_a_bit_depth(tmp_path):
    """All-zero 16-bit frames (a failed shutter) are not a 10-bit camera's: scaling advice does not fit them."""
    folder = tmp_path / "cam"
    for i in range(2):
        _save(folder / f"{i}.png", np.zeros((16, 16), np.uint16))
    with pytest.warns(DataWarning, match=r"cam: 2 of 2 16-bit images are black, every value 0 \(.*\): blank frames\?") as seen:
        read_images(sorted(folder.iterdir()), 16, where=folder)
    assert "bits" not in str(_data_warnings(seen)[0].message)


def test_blank_frames_among_the_images_are_named_once(tmp_path):
    """A frame of one colour throughout (a failed exposure, a covered lens) is named by the
    many-file readers: among defect-free images it would set the thresholds by its score."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "line"
    for i in range(3):
        _save(folder / f"part_{i}.png", rng.integers(0, 256, (16, 16, 3)).astype(np.uint8))
    _save(folder / "black.png", np.zeros((16, 16), np.uint8))
    _save(folder / "red.png", np.broadcast_to(np.array([200, 0, 0], np.uint8), (16, 16, 3)).copy())
    _save(folder / "black16.png", np.zeros((16, 16), np.uint16))  # called black by the 16-bit check already
    with pytest.warns(DataWarning) as seen:
        read_images(sorted(folder.iterdir()), 16, where=folder)
    said = [str(w.message) for w in _data_warnings(seen)]
    blank = [m for m in said if "one colour throughout" in m]
    assert len(blank) == 1 and blank[0].startswith(f"{folder}: 2 of 6 images are of one colour throughout (")
    assert "black.png" in blank[0] and "red.png" in blank[0] and "black16" not in blank[0] and "part_" not in blank[0]
    root = make_synthetic_dataset(tmp_path / "ds", n_train=2, n_test_good=2, n_test_defect=1, size=32, seed=3)
    _save(root / "test" / "good" / "000.png", np.full((32, 32), 128, np.uint8))
    with pytest.warns(DataWarning, match=r"1 of 4 images are of one colour throughout \(.*000.png\)"):
        load_test_set(root, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        read_images([folder / "part_0.png"], 16)  # a photographed surface: nothing said
    # a black 16-bit frame beside a dark one: the 16-bit warning speaks of bit depth for both, so the
    # blank warning names the black one too
    dim = np.full((16, 16), 60, np.uint16)
    dim[::2] = 2000
    _save(folder / "dim16.png", dim)
    with pytest.warns(DataWarning) as seen:
        read_images([folder / "black16.png", folder / "dim16.png"], 16, where=folder)
    said = [str(w.message) for w in _data_warnings(seen)]
    assert any("grey level(s) or fewer" in m for m in said)
    assert any("1 of 2 images are of one colour throughout" in m and "black16.png" in m for m in said), said


def test_a_big_endian_16_bit_tiff_reads_as_its_little_endian_twin(tmp_path):
    """PIL opens a 16-bit TIFF in big-endian byte order (ImageJ's default, many camera programs) as
    "I;16B", for which it refuses getextrema(): the few-levels check made every reader fail with an
    unnamed ValueError. Both byte orders read the same, few levels are warned of, masks read too."""
    rng = np.random.default_rng(0)
    full = rng.integers(0, 65536, (24, 40)).astype(np.uint16)
    few = (2000 + rng.normal(0, 30, (24, 40))).clip(0, 4095).astype(np.uint16)
    for name, frame in (("full", full), ("few", few)):
        Image.frombytes("I;16B", (40, 24), frame.astype(">u2").tobytes()).save(tmp_path / f"{name}_be.tif")
        Image.fromarray(frame).save(tmp_path / f"{name}_le.tif")
    with Image.open(tmp_path / "full_be.tif") as im:
        assert im.mode == "I;16B"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert torch.equal(read_image(tmp_path / "full_be.tif", 32), read_image(tmp_path / "full_le.tif", 32))
    with pytest.warns(DataWarning, match=r"2 of 2 16-bit images hold values up to"):
        both = read_images([tmp_path / "few_be.tif", tmp_path / "few_le.tif"], 32, where=tmp_path)
    assert torch.equal(both[0], both[1])
    Image.frombytes("I;16B", (40, 24), (full > 30000).astype(">u2").tobytes()).save(tmp_path / "mask_be.tif")
    assert torch.equal(read_mask(tmp_path / "mask_be.tif", None), torch.from_numpy(full > 30000))


def test_warnings_that_name_files_are_kept_in_no_registry(tmp_path):
    """Under the default filter, every distinct warning text stays in its module's warning registry
    for the life of the process: a service reading multi-page TIFFs or a 12-bit camera's frames,
    each named in its warning, grew by every frame. They are still shown, from the caller's line."""
    import subprocess
    import sys

    frame = np.full((16, 16), 2000, np.uint16)
    for i in range(30):
        Image.fromarray(frame).save(tmp_path / f"f{i}.png")
        Image.fromarray(frame.astype(np.uint8)).save(tmp_path / f"m{i}.tif", save_all=True,
                                                     append_images=[Image.fromarray(frame.astype(np.uint8))])
    script = (
        "import sys, pathlib\n"
        "from defect_fast.data import read_images\n"
        "d = pathlib.Path(sys.argv[1])\n"
        "for i in range(30):\n"
        "    read_images([d / f'f{i}.png'], 16)\n"
        "    read_images([d / f'm{i}.tif'], 16)\n"
        "grown = {name: len(m.__dict__.get('__warningregistry__', {})) for name, m in list(sys.modules.items())\n"
        "         if isinstance(getattr(m, '__dict__', None), dict)}\n"
        "print(max(grown.values()))\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) <= 2  # a version stamp and another library's odd warning, not 60 texts
    assert run.stderr.count("frames (pages)") == 30 and run.stderr.count("16-bit images hold values") == 30
    assert "<string>:5: DataWarning" in run.stderr  # the caller's line, as warnings.warn shows it


def _rgb16_tiff(path: Path, rgb: np.ndarray, orientation: int | None = None) -> None:
    """A little-endian uncompressed 16-bit RGB TIFF (PIL writes none), optionally with an orientation tag."""
    import struct

    h, w, _ = rgb.shape
    data = rgb.astype("<u2").tobytes()
    entries = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, None),
               (274, 3, 1, orientation), (277, 3, 1, 3), (278, 3, 1, h), (279, 4, 1, len(data))]
    entries = [e for e in entries if e[0] != 274 or orientation is not None]
    bits_at = 8 + 2 + 12 * len(entries) + 4
    data_at = bits_at + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = bits_at if tag == 258 else data_at if tag == 273 else value
        ifd += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else \
            struct.pack("<HHII", tag, kind, count, value)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)


def test_a_16_bit_colour_tiff_is_treated_as_a_16_bit_colour_png(tmp_path):
    """PIL reads a 16-bit RGB TIFF by the high bytes of its values, as it does a 16-bit colour PNG:
    a 12-bit colour camera's frames come out dark without a word, and a mask drawn with values
    under 256 reads as no defect. Both are now said, as for the PNG (also when an orientation tag
    turns the image, which leaves the turned copy without the file's tags)."""
    frame = np.full((16, 16, 3), 2000, np.uint16)
    for name, orientation in (("cam.tif", None), ("cam_turned.tif", 3)):
        _rgb16_tiff(tmp_path / name, frame, orientation)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "RGB"
        with pytest.warns(DataWarning, match=r"hold values up to 2047 at most"):  # 2000's high byte, 7: (7 + 1) * 256 - 1
            read_images([tmp_path / name], 16, where=tmp_path)
    mask = np.zeros((16, 16, 3), np.uint16)
    mask[4:8, 4:8] = 255
    for name, orientation in (("mask.tif", None), ("mask_turned.tif", 6)):
        _rgb16_tiff(tmp_path / name, mask, orientation)
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: a 16-bit colour TIFF")):
            read_mask(tmp_path / name, None)
    with warnings.catch_warnings():  # 8-bit colour TIFFs as before
        warnings.simplefilter("error", DataWarning)
        eight = np.full((16, 16, 3), 7, np.uint8)
        eight[0, 0] = 6  # not a blank frame, which is warned of
        Image.fromarray(eight).save(tmp_path / "eight.tif")
        assert int(read_images([tmp_path / "eight.tif"], 16).max()) == 7


# --------------------------------------------------------------------------------------------
# Boundaries and rules the tests above left open
# --------------------------------------------------------------------------------------------


def test_min_side_is_checked_against_the_shorter_side(tmp_path):
    """A strip 64 wide and 4 high is too small for min_side 8 (its short side), however wide it is."""
    p = _save(tmp_path / "strip.png", np.full((4, 64), 9, dtype=np.uint8))
    with pytest.raises(DataError, match=r"strip\.png: image is 64x4 pixels, smaller than the minimum side of 8"):
        read_image(p, 16, min_side=8)
    assert read_image(p, 16, min_side=4).shape == (3, 16, 16)


def test_a_16_bit_grey_alpha_png_mask_is_refused_as_16_bit_colour(tmp_path):
    """PIL reads a 16-bit grey+alpha PNG (colour type 4) by its high bytes, as it does 16-bit RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    la = np.zeros((8, 8, 2), np.uint16)
    la[..., 1] = 65535  # opaque
    la[2:4, 2:4, 0] = 255  # a defect drawn at 255: high byte 0
    raw = b"".join(b"\x00" + la[y].astype(">u2").tobytes() for y in range(8))
    p = tmp_path / "la16_mask.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 4, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=re.escape(f"{p}: a 16-bit colour PNG")):
        read_mask(p, None)


def test_few_levels_are_values_below_4096_only(tmp_path):
    """The warning is for 16-bit images whose values all lie below 4096 (12 bits): one reaching
    4096 is not warned of."""
    for top, warned in ((4095, True), (4096, False)):
        a = np.zeros((8, 8), np.uint16)
        a[0, 0] = top
        p = _save(tmp_path / f"{top}" / "a.png", a)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            read_images([p], 8)
        assert any("grey level(s) or fewer" in str(w.message) for w in _data_warnings(seen)) == warned, top


def test_32_bit_int_up_to_65535_and_float_up_to_255_keep_their_fixed_scales(tmp_path):
    """"I" with values in [0, 65535] is 16-bit data (65535 -> 255), "F" in [0, 255] is taken as
    is: neither is stretched from its own minimum, also when the maximum is the range's end."""
    i32 = np.array([[1000, 65535], [30000, 2000]], np.int32)
    t = read_image(_save(tmp_path / "i.tif", i32), None, 1)[0]
    assert t.tolist() == [[round(1000 * 255 / 65535), 255], [round(30000 * 255 / 65535), round(2000 * 255 / 65535)]]
    f32 = np.array([[10.0, 255.0], [100.0, 20.0]], np.float32)
    t = read_image(_save(tmp_path / "f.tif", f32), None, 1)[0]
    assert t.tolist() == [[10, 255], [100, 20]]


def test_an_empty_mask_is_said_as_empty_not_as_losing_its_defect_in_the_resize(tmp_path):
    """A defective image's mask stored without a defect pixel (four of magnetic-tile's "uneven"
    masks): its pixels count as defect-free ones in the pixel metrics, which was not said."""
    root = _mvtec(tmp_path)
    _save(root / "ground_truth" / "scratch" / "001_mask.png", np.zeros((32, 32), dtype=np.uint8))
    with pytest.warns(DataWarning, match=r"1 mask\(s\) mark no pixel as defect: their images count as defective, "
                                         r"and every pixel of them as defect-free in the pixel metrics .*"
                                         r"scratch/001_mask\.png") as seen:
        ts = load_test_set(root, 16)
    assert len(_data_warnings(seen)) == 1  # and not "lose every defect pixel in the resize"
    assert not ts.masks[3].any() and ts.labels[3] == 1


def test_a_mask_named_stem_mask_is_preferred_to_one_named_stem(tmp_path):
    """Both ``000_mask.png`` and ``000.png`` in ground_truth/: the documented order takes the first."""
    root = _mvtec(tmp_path)
    gt = root / "ground_truth" / "scratch"
    _save(gt / "000.png", np.zeros((32, 32), dtype=np.uint8))
    assert find_mask(root, "scratch", root / "test" / "scratch" / "000.png") == gt / "000_mask.png"


def test_a_missing_class_folder_of_masks_is_one_problem_not_one_per_image(tmp_path):
    """ground_truth/<class>/ missing was said as "no ground-truth mask" for each of its images, in
    one line of 1.4 kB for 8 images, never saying the folder was missing."""
    import shutil

    root = _mvtec(tmp_path)
    n = len(list((root / "test" / "scratch").glob("*.png")))
    shutil.rmtree(root / "ground_truth" / "scratch")
    (root / "ground_truth" / "spot" / "000_mask.png").unlink()
    with pytest.raises(DataError) as err:
        load_test_set(root, 16)
    assert len(err.value.problems) == 2
    assert err.value.problems[0].startswith(f"{root / 'ground_truth' / 'scratch'}: no such folder; the ground-truth "
                                            f"masks of the {n} images in {root / 'test' / 'scratch'} (000.png")
    assert "spot/000.png: no ground-truth mask" in err.value.problems[1]
    gt = root / "ground_truth" / "scratch"
    for what, make in (("a link to nothing", lambda: gt.symlink_to(tmp_path / "gone")),
                       ("not a folder", lambda: gt.write_bytes(b"x"))):
        make()
        with pytest.raises(DataError) as err:
            load_test_set(root, 16)
        assert len(err.value.problems) == 2, err.value.problems
        assert err.value.problems[0].startswith(f"{gt}: {what}; the ground-truth masks of the {n} images")
        gt.unlink()


def test_a_ground_truth_folder_is_used_even_when_masks_are_not_required(tmp_path):
    """require_masks=False accepts a root without ground_truth/; one that has it is read as usual,
    and a defective image without its mask is still a problem."""
    root = _mvtec(tmp_path)
    ts = load_test_set(root, 16, require_masks=False)
    assert ts.has_masks and ts.masks[2].any()
    (root / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DataError, match="no ground-truth mask"):
        load_test_set(root, 16, require_masks=False)


def test_good_comes_first_whatever_the_names_of_the_defect_classes(tmp_path):
    root = _mvtec(tmp_path)
    for top in ("test", "ground_truth"):
        (root / top / "spot").rename(root / top / "abrasion")
    ts = load_test_set(root, 16)
    assert ts.classes == ["good", "good", "abrasion", "abrasion", "scratch", "scratch"]
    assert ts.labels.tolist() == [0, 0, 1, 1, 1, 1]


def test_a_mask_marking_exactly_half_its_image_is_not_warned_of(tmp_path):
    root = _mvtec(tmp_path)
    half = np.zeros((32, 32), dtype=np.uint8)
    half[:16] = 255
    for mask in sorted((root / "ground_truth").rglob("*.png")):
        _save(mask, half)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_test_set(root, 32)


def test_a_zero_byte_file_is_said_to_be_empty(tmp_path):
    """Named as empty (0 bytes), not as an unreadable format (the name holds no "empty" here)."""
    p = tmp_path / "part7.png"
    p.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{p}: file is empty (0 bytes)")):
        read_image(p, 8)


def test_a_sub_folder_without_images_is_not_said_to_hold_images(tmp_path):
    _save(tmp_path / "top.png", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert [p.name for p in list_images(tmp_path)] == ["top.png"]


def test_a_mask_whose_width_is_already_the_size_is_still_resized_to_the_square(tmp_path):
    m = np.zeros((16, 32), dtype=np.uint8)
    m[4:8, 8:16] = 255
    t = read_mask(_save(tmp_path / "wide_mask.png", m), 32)
    assert t.shape == (32, 32) and int(t.sum()) == 2 * 4 * 8


def test_unfinished_png_and_jpeg_files_are_told_from_finished_ones(tmp_path):
    """A PNG cut off before its IEND chunk decodes, and so does a PNG or JPEG whose writer set the
    full size first and stalled (the rest zeros): such files are unfinished; what follows a
    finished file's end (zero padding, a trailer) does not make it so, and other formats are not
    judged by their ends."""
    import io

    from defect_fast.data.io import unfinished_image

    a = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)

    def encoded(fmt: str) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt)
        return buf.getvalue()

    def check(name: str, data: bytes):
        (tmp_path / name).write_bytes(data)
        return unfinished_image(tmp_path / name)

    png, jpg, bmp = encoded("PNG"), encoded("JPEG"), encoded("BMP")
    assert check("a.png", png) is None and check("a.jpg", jpg) is None and check("a.bmp", bmp) is None
    for cut in (4, 12, 16):
        assert "IEND" in check("cut.png", png[:-cut])
    half = len(png) // 2
    assert "IEND" in check("pre.png", png[:half] + bytes(len(png) - half))  # full size first, stalled
    assert "end marker" in check("pre.jpg", jpg[: len(jpg) // 3] + bytes(len(jpg) - len(jpg) // 3))
    assert "end marker" in check("big.jpg", jpg[:100] + bytes(200_000))  # zeros over several blocks
    assert check("padded.png", png + bytes(100)) is None and check("trailer.png", png + b"tool data") is None
    assert check("padded.jpg", jpg + bytes(100)) is None and check("trailer.jpg", jpg + b"maker note") is None
    assert check("pre.bmp", bmp[:100] + bytes(len(bmp) - 100)) is None  # not told by its end: write and rename
    # a long trailer after a finished file's end (a PNG tool's data; a JPEG's motion-photo video, padded)
    assert check("long.png", png + bytes(range(256)) * 400) is None
    assert check("motion.jpg", jpg + b"ftypmp42" * 100 + bytes(64)) is None
    # an EXIF thumbnail's end marker, in a header segment, is not the image's own
    thumb = b"Exif\0\0" + b"\xff\xd8 thumbnail \xff\xd9"
    with_thumb = jpg[:2] + b"\xff\xe1" + (len(thumb) + 2).to_bytes(2, "big") + thumb + jpg[2:]
    assert check("thumb.jpg", with_thumb) is None
    cut = len(with_thumb) // 2
    assert "end marker" in check("thumb_pre.jpg", with_thumb[:cut] + bytes(len(with_thumb) - cut))


def test_every_reader_refuses_a_file_not_written_to_its_end(tmp_path):
    """A grayscale PNG whose writer set its full size first and stalled decodes, its rest black:
    predict scored it, calibrate set the image threshold by it and train learnt from it, while
    watch rejected the same file."""
    root = _mvtec(tmp_path)
    good = root / "test" / "good" / "000.png"
    a = np.asarray(Image.open(good).convert("L"))
    _save(good, a)
    data = good.read_bytes()
    cut = int(len(data) * 0.6)
    stalled = good.with_name("009.png")
    stalled.write_bytes(data[:cut] + bytes(len(data) - cut))
    assert np.asarray(Image.open(stalled)).shape == a.shape  # PIL decodes it, without a word
    with pytest.raises(DataError, match=re.escape(f"{stalled}: a PNG without its IEND chunk")):
        read_image(stalled, None)
    with pytest.raises(DataError) as err:
        load_test_set(root, 16)
    assert err.value.problems == [f"{stalled}: a PNG without its IEND chunk at the end (cut off, or still being written)"]
    stalled.rename(root / "train" / "good" / "009.png")
    with pytest.raises(DataError, match="009.png: a PNG without its IEND chunk"):
        load_train_images(root, 16)
    assert read_image(good, None)[0].shape[-2:] == a.shape  # the finished file is read as before


def test_the_search_for_an_end_stops_when_the_file_got_shorter(tmp_path):
    """A writer starting a file again (O_TRUNC) while its end was looked for left the search
    reading nothing for ever: the watch service hung."""
    import threading

    from defect_fast.data.io import _found_after

    (tmp_path / "a.png").write_bytes(b"x" * 1000)
    seen = []
    with open(tmp_path / "a.png", "rb") as f:
        t = threading.Thread(target=lambda: seen.append(_found_after(f, b"IEND", 0, 5_000_000)), daemon=True)
        t.start()
        t.join(10)
    assert seen == [False]


def test_an_image_named_twice_is_taken_once_with_a_warning(tmp_path):
    """`predict RUN folder folder/a.png` wrote a's map twice, under two names, without a word."""
    from defect_fast.data.io import collect_images

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        _save(folder / name, np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.warns(DataWarning, match=r"1 image path\(s\) given more than once are taken once: .*a\.png$"):
        got = collect_images([folder, folder / "a.png", tmp_path / "in" / ".." / "in" / "b.png"][:2])
    assert got == [folder / "a.png", folder / "b.png"]
    with pytest.warns(DataWarning, match="2 image path"):
        assert collect_images([folder, folder / "a.png", tmp_path / "in" / ".." / "in" / "b.png"]) == got
    (folder / "latest.png").symlink_to("a.png")  # a name of its own beside its target: both kept, nothing said
    import warnings as w

    with w.catch_warnings():
        w.simplefilter("error")
        assert collect_images([folder]) == [folder / "a.png", folder / "b.png", folder / "latest.png"]


def test_a_mask_drawn_on_the_stored_pixels_of_a_turned_image_says_why_its_size_differs(tmp_path):
    """"mask is 24x40 but its image is 40x24" gave no hint that the image is turned upright by its
    EXIF orientation, while most tools show the stored pixels, where the mask was drawn."""
    root = _mvtec(tmp_path)
    img = root / "test" / "scratch" / "000.png"
    _save_oriented(img, np.zeros((24, 40, 3), dtype=np.uint8), 6)  # stored 40 wide, 24 high: upright 24 x 40
    _save(root / "ground_truth" / "scratch" / "000_mask.png", np.zeros((24, 40), dtype=np.uint8))
    with pytest.raises(DataError, match=r"mask is 40x24 \(width x height\) but its image .*000\.png is 24x40, turned "
                                        r"upright by its EXIF orientation 6 \(stored 40x24\): draw the mask on the "
                                        r"upright image"):
        load_test_set(root, 16)
    _save(img, np.zeros((24, 40, 3), dtype=np.uint8))  # no orientation: no such note
    _save(root / "ground_truth" / "scratch" / "000_mask.png", np.zeros((40, 24), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_test_set(root, 16)
    assert "mask is 24x40 (width x height)" in str(err.value) and "EXIF" not in str(err.value)


def test_the_orientation_behind_the_turned_mask_warning_is_read_as_the_image_reader_reads_it(tmp_path):
    """A PNG's orientation is found by walking its chunks (PIL decodes a PNG with no eXIf chunk to
    look for one); EXIF in an ImageMagick text chunk is still found, as the reader turns by it."""
    from PIL import PngImagePlugin

    from defect_fast.data.dataset import _orientation

    a = np.zeros((20, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "exif.png", exif=exif.tobytes())
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "before the pixels")
    Image.fromarray(a).save(tmp_path / "late.png", pnginfo=info, exif=exif.tobytes())
    raw = exif.tobytes().hex()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(raw) // 2:8d}\n{raw}\n")
    Image.fromarray(a).save(tmp_path / "raw.png", pnginfo=info)
    Image.fromarray(a).save(tmp_path / "plain.png")
    Image.fromarray(a).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    for name, want in (("exif.png", 6), ("late.png", 6), ("raw.png", 6), ("plain.png", None), ("turned.jpg", 6)):
        with Image.open(tmp_path / name) as im:
            assert im.getexif().get(0x0112) == want, name  # what PIL, and so the image reader, takes
        assert _orientation(tmp_path / name) == want, name
    (tmp_path / "cut.png").write_bytes((tmp_path / "exif.png").read_bytes()[:40])  # damaged: no answer, no error
    assert _orientation(tmp_path / "cut.png") is None


def test_float_frames_of_many_files_are_said_once_per_kind(tmp_path):
    """A folder of 12-bit frames saved as float gave one warning per file (each naming it); now the
    readers of many files (training, predict, the test set) say each kind once, with the count and
    three files; a single file is still said on its own, as before."""
    from defect_fast.data.io import check_images

    rng = np.random.default_rng(0)
    for i in range(5):
        _save(tmp_path / "train" / "good" / f"f{i}.tif", (rng.random((40, 40)) * 4095).astype(np.float32))
    glints = rng.random((40, 40)) * 0.8 + 0.1
    glints.flat[:5] = 1.2
    _save(tmp_path / "train" / "good" / "g.tif", glints.astype(np.float32))
    _save(tmp_path / "train" / "good" / "plain.png", rng.integers(60, 120, (40, 40), dtype=np.uint8))
    folder = tmp_path / "train" / "good"
    paths = sorted(folder.iterdir())
    for read in (lambda: read_images(paths, 32, where=folder), lambda: check_images(paths, 32, where=folder),
                 lambda: load_train_images(tmp_path, 32)):
        with pytest.warns(DataWarning) as seen:
            read()
        said = [str(w.message) for w in _data_warnings(seen)]
        assert len(said) == 2, said
        own = next(m for m in said if "no range this reader knows" in m)
        assert own.startswith(f"{folder}: 5 of 7 images have pixels in no range this reader knows")
        assert f"{folder / 'f0.tif'} (float pixels from " in own and own.endswith(", ...")
        assert "f3.tif" not in own  # three named
        clipped = next(m for m in said if "clipped" in m)
        assert clipped == (f"{folder}: 1 of 7 images have float pixels outside the range they are read in, clipped: "
                           f"{folder / 'g.tif'} (read as [0, 1]; 5 outside it, from 0.1003 to 1.2)")
    with warnings.catch_warnings():  # predict's second read of a part check_images warned of: quiet
        warnings.simplefilter("error", DataWarning)
        read_images(paths, 32, where=folder, warn=False)
    # the test set, the same
    test = tmp_path / "test" / "good"
    test.mkdir(parents=True)
    for p in paths[:3]:
        (test / p.name).write_bytes(p.read_bytes())
    with pytest.warns(DataWarning) as seen:
        load_test_set(tmp_path, 32, require_masks=False)
    assert [m for m in map(str, (w.message for w in _data_warnings(seen))) if "no range" in m][0].startswith(
        f"{tmp_path / 'test'}: 3 of 3 images have pixels in no range")


def test_width_to_height_ratios_read_as_people_write_them():
    from defect_fast.data.io import _ratio, outside_proportions

    assert [_ratio(r) for r in (1.0, 2.6126, 1 / 2.8, 62.0, 1 / 130.4)] == ["1:1", "2.6:1", "1:2.8", "62:1", "1:130"]
    said = outside_proportions([(64, 64), (6400, 50)], ["a", "b"], [0.36, 2.6], "here")
    assert said.startswith("here: 1 of 2 images are of other proportions than the training images (width:height "
                           "1:2.8 to 2.6:1): b (6400x50); ")
    assert outside_proportions([(64, 64)], ["a"], None, "here") is None  # not recorded: nothing said
    assert outside_proportions([(80, 64), (64, 80)], ["a", "b"], [1.0, 1.0], "here") is None  # within 1.25


def test_an_image_over_pil_s_size_limit_is_refused_with_what_to_do(tmp_path, monkeypatch):
    """PIL refuses an image of over twice its pixel limit (a line-scan frame): one line that names
    the file and says what would let it be read."""
    p = _save(tmp_path / "scan.png", np.zeros((20, 20), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError) as err:
        read_image(p, 16)
    assert str(err.value).startswith(f"{p}: image is implausibly large (") and "downscale it" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB key", "L key"])
def test_transparent_pixels_are_said_to_be_read_as_the_colour_under_them(tmp_path, mode):
    """An image cut out on a transparent layer was read with black where it is transparent, in silence."""
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    if mode.endswith("key"):  # a PNG's colour key: pixels of that colour are transparent
        a[:, :8] = 7
        img = Image.fromarray(a if mode == "RGB key" else a[..., 0])
        img.save(tmp_path / "cut.png", transparency=(7, 7, 7) if mode == "RGB key" else 7)
    elif mode == "P":
        img = Image.fromarray(a).quantize(16)
        img.info["transparency"] = 0  # palette entry 0 is transparent
        img.save(tmp_path / "cut.png", transparency=0)
    else:
        alpha = np.full((32, 32), 255, np.uint8)
        alpha[:, 24:] = 0  # a quarter transparent
        rgba = Image.fromarray(np.dstack([a, alpha]), mode="RGBA")
        (rgba if mode == "RGBA" else rgba.convert("LA")).save(tmp_path / "cut.png")
    with pytest.warns(DataWarning, match=r"cut\.png: has transparent pixels \(.*% of it\), read as the colour stored "
                                         r"under them: alpha is dropped") as seen:
        t = read_image(tmp_path / "cut.png", None)
    assert [w.filename for w in seen] == [__file__]
    if mode.endswith("key"):  # the pixels as stored, the key's colour too
        assert torch.equal(t, torch.from_numpy(a if mode == "RGB key" else a[..., :1].repeat(3, -1)).permute(2, 0, 1))
    with pytest.warns(DataWarning, match=r"1 of 2 images have transparent pixels, read as the colour stored under "
                                         r"them: alpha is dropped: .*cut\.png \(.*% of it\)"):
        Image.fromarray(a).save(tmp_path / "whole.png")
        read_images([tmp_path / "cut.png", tmp_path / "whole.png"], 32)
    if mode == "RGB key":  # of a 16-bit PNG, PIL matches the key on the high bytes: 0x07FF is no 0x0707
        import struct
        import zlib

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

        wide = np.random.default_rng(3).integers(0, 65536, (32, 32, 3)).astype(">u2")
        wide[:, :8] = 0x07FF
        rows = b"".join(b"\0" + wide[y].tobytes() for y in range(32))
        (tmp_path / "wide.png").write_bytes(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", 0x0707, 0x0707, 0x0707)) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))
        from defect_fast.data.io import _to_8bit

        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            read_image(tmp_path / "wide.png", None)
            with Image.open(tmp_path / "wide.png") as im:  # a PIL image given as such, as Detector.predict reads it
                _to_8bit(im, 3, Path("PIL image"))
        assert not [w for w in said if "transparent" in str(w.message)]
    opaque = Image.fromarray(np.dstack([a, np.full((32, 32), 255, np.uint8)]), mode="RGBA")
    opaque.save(tmp_path / "opaque.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        read_image(tmp_path / "opaque.png", 32)  # an alpha channel with nothing transparent: nothing to say
