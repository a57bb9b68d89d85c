"""Loading a training folder and an MVTec-style test set into memory.

MVTec AD layout (also used by the magnetic-tile data and :mod:`defect_fast.data.synthetic`)::

    root/train/good/*.png                      defect-free training images
    root/test/good/*.png                       defect-free test images (no masks)
    root/test/<class>/*.png                    defective test images, one folder per defect class
    root/ground_truth/<class>/<stem>_mask.png  their masks (``<stem>.png`` is accepted too)

Images are kept as uint8 (600 images at 512x512x3 take 470 MB); convert batches to the models'
float range with :func:`to_model_range` when they are used.
"""
from __future__ import annotations

import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .io import (
    IMAGE_EXTENSIONS,
    DataError,
    DataWarning,
    _callers_level,
    _load_image,
    _load_mask,
    black_said,
    image_stack,
    images_inside,
    list_images,
    raise_problems,
    read_images,
    run_collecting,
    warn_blank,
    warn_data,
    warn_few_levels,
    warn_float_notes,
)

__all__ = ["GOOD", "TestSet", "find_mask", "load_test_set", "load_train_images", "to_model_range", "from_model_range"]

#: Folder name of defect-free images in the MVTec layout.
GOOD = "good"


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., H, W] in 0..255 -> float32 in [-1, 1] (the models' input range)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def from_model_range(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in 0..255 (values outside [-1, 1] are clipped)."""
    return images.detach().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def _train_folder(path: Path) -> Path:
    """root -> root/train/good; root/train -> root/train/good; otherwise the folder itself."""
    if (path / "train" / GOOD).is_dir():
        return path / "train" / GOOD
    if path.name == "train" and (path / GOOD).is_dir():
        return path / GOOD
    if (path / "train").is_dir():  # an MVTec-style root whose train/good/ is missing or misspelt
        found = sorted(d.name for d in (path / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
        raise DataError(f"{path}: has a train/ folder but no train/{GOOD}/ (found: {', '.join(found) or 'no folders'}); "
                        f"the defect-free training images go in {path / 'train' / GOOD}")
    return path


def load_train_images(
    root_or_folder: str | os.PathLike,
    size: int,
    *,
    channels: int = 3,
    min_side: int | None = None,
    workers: int | None = None,
    sizes: list | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """Read all defect-free training images.

    Args:
        root_or_folder: an MVTec-style root (``root/train/good`` is read) or a plain folder of
            images. Non-image files are skipped with a warning (see :func:`list_images`).
        size: side of the square images returned (bilinear, antialiased resize).
        channels, min_side: as in :func:`defect_fast.data.read_image`.
        workers: reader threads (default: up to 8).
        sizes: a list that receives each file's own (width, height), upright.

    Returns:
        (uint8 tensor [N, channels, size, size], list of the N file paths in the same order).

    Raises:
        DataError: folder missing or without images, or any unreadable image (all of them are
            listed in one message).
    """
    path = Path(root_or_folder)
    folder = _train_folder(path)
    paths = list_images(folder)
    if not paths:
        hint = "" if folder != path else f" (nor an MVTec-style {path / 'train' / GOOD})"
        raise DataError(f"{folder}: no training images found (extensions {', '.join(IMAGE_EXTENSIONS)}){hint}")
    images = read_images(paths, size, channels, min_side=min_side, workers=workers, where=folder, sizes=sizes)
    return images, paths


def _orientation(path: Path) -> int | None:
    """The EXIF orientation of an image file when it turns or flips it (2 to 8), else None. A
    PNG's chunks are walked for its eXIf chunk (PIL decodes a PNG without one whole to look for
    it after the pixels); other formats hold it in their header."""
    try:
        with open(path, "rb") as f:
            png, exif = f.read(8) == b"\x89PNG\r\n\x1a\n", None
            while png and (head := f.read(8)) and len(head) == 8:
                length, kind = int.from_bytes(head[:4], "big"), head[4:]
                if kind == b"eXIf":
                    exif = Image.Exif()
                    exif.load(b"Exif\x00\x00" + f.read(length))
                    break
                if kind in (b"tEXt", b"zTXt", b"iTXt") and f.read(min(length, 21)).lower() == b"raw profile type exif":
                    png = False  # EXIF in a text chunk (ImageMagick): PIL reads it, as the image reader does
                    break
                if kind == b"IEND":
                    break
                f.seek(length + 4 - (min(length, 21) if kind in (b"tEXt", b"zTXt", b"iTXt") else 0), os.SEEK_CUR)
        if exif is not None:
            orientation = exif.get(0x0112)
        elif png:
            orientation = None
        else:
            with Image.open(path) as im:
                orientation = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - only a hint: the file was read
        return None
    return orientation if orientation in range(2, 9) else None


def _turned_note(img_path: Path, mask_size: tuple, img_size: tuple) -> str:
    """For a mask of the image's size turned a quarter: that the image is read upright by its EXIF
    orientation (most tools show the stored pixels, on which such a mask was drawn), else ""."""
    if tuple(mask_size) != tuple(img_size)[::-1]:
        return ""
    orientation = _orientation(img_path)  # only a hint: the size mismatch is the error
    if orientation not in (5, 6, 7, 8):
        return ""
    return (f", turned upright by its EXIF orientation {orientation} (stored {img_size[1]}x{img_size[0]}): draw the "
            "mask on the upright image")


@dataclass
class TestSet:
    """An MVTec-style test set in memory (N images).

    Attributes:
        images: uint8 [N, C, S, S].
        masks: bool [N, S, S] (True = defect; all False for good images, and possibly for
            defective images whose mask is empty).
        labels: int64 [N], 0 = good, 1 = defective.
        classes: defect class name per image ("good" for good images).
        paths: image file per image.
        mask_paths: mask file per image (None for good images).
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[Path]
    mask_paths: list[Path | None] = field(default_factory=list)
    #: False when the set came without a ground_truth/ folder (``require_masks=False``): the
    #: masks are then all False and say nothing; only image-level results apply.
    has_masks: bool = True
    #: Each image file's own (width, height), upright, before the resize to the model's square.
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_names(self) -> list[str]:
        """Distinct classes, "good" first, then the defect classes sorted."""
        names = sorted(set(self.classes))
        return ([GOOD] if GOOD in names else []) + [n for n in names if n != GOOD]


def _mask_candidates(root: Path, cls: str, image: Path) -> list[Path]:
    """Mask paths tried for a defective image, preferred first."""
    gt = root / "ground_truth" / cls
    stems = (f"{image.stem}_mask", image.stem)
    exts = [".png"] + [e for e in IMAGE_EXTENSIONS if e != ".png"]
    return [gt / f"{s}{e}" for s in stems for e in exts]


def _own_mask(root: Path, cls: str, image: Path) -> bool:
    """Whether ``image`` has a mask named ``<stem>_mask`` (not ``<stem>``, which another image's
    ``<stem>_mask`` names as well) in ``ground_truth/<cls>/``."""
    found = find_mask(root, cls, image)
    return found is not None and found.stem.lower() == f"{image.stem}_mask".lower()


def find_mask(root: str | os.PathLike, cls: str, image: str | os.PathLike) -> Path | None:
    """The ground-truth mask file of ``image`` of defect class ``cls`` under ``root``, or None.

    Tries ``ground_truth/<cls>/<stem>_mask.<ext>`` then ``ground_truth/<cls>/<stem>.<ext>``
    (``.png`` first, then the other image extensions, in lower or upper case, then in any case:
    ``.Png``, as images are matched; last, the whole name in any case: ``000_MASK.png``).
    """
    candidates = _mask_candidates(Path(root), cls, Path(image))
    for cand in candidates:
        for c in (cand, cand.with_suffix(cand.suffix.upper())):
            if c.is_file():
                return c
    gt = candidates[0].parent
    try:  # an extension in mixed case: the folder listed, only when the usual names are not there
        listed = [e.name for e in os.scandir(gt)]
    except OSError:
        return None
    names = {(Path(n).stem, Path(n).suffix.lower()): gt / n for n in listed}
    for cand in candidates:
        hit = names.get((cand.stem, cand.suffix))
        if hit is not None and hit.is_file():
            return hit
    # then the name in any case (000_MASK.png), exact names having come first, and in either Unicode
    # form: macOS writes names decomposed (NFD), so a mask copied from one did not match "café.png"
    names = {(_loose(Path(n).stem), Path(n).suffix.lower()): gt / n for n in sorted(listed)}
    for cand in candidates:
        hit = names.get((_loose(cand.stem), cand.suffix))
        if hit is not None and hit.is_file():
            return hit
    return None


def _loose(name: str) -> str:
    """``name`` as names are matched last: composed Unicode (NFC), lower case."""
    return unicodedata.normalize("NFC", name).lower()


def _file_id(path: Path) -> tuple | Path:
    """What tells files apart (device and inode; the path where it cannot be looked at)."""
    try:
        st = path.stat()
    except OSError:
        return path
    return (st.st_dev, st.st_ino)


def _warn_unclaimed(root: Path, class_dirs: list[Path], items: list, has_masks: bool) -> None:
    """One :class:`DataWarning` for what the test set holds that no test image uses: class folders
    without images, and masks (or ``ground_truth/`` class folders) no image claims. Either is
    usually an image renamed, moved or deleted: the metrics would leave it out without a word."""
    counted = {cls for cls, _img, _mask in items}
    empty = [d.name for d in class_dirs if d.name not in counted]
    said = []
    if empty:
        said.append(f"class folder(s) with no images: {', '.join(empty)}")
    gt = root / "ground_truth"
    if has_masks and gt.is_dir():
        # by the file itself: on a file system that ignores case the name found may be written otherwise
        claimed = {_file_id(m) for _cls, _img, m in items if m is not None}
        unclaimed = []
        for d in sorted(e for e in gt.iterdir() if e.is_dir() and not e.name.startswith(".")):
            if d.name == GOOD:  # some datasets give good images blank masks; one that marks a defect is said
                _warn_marked_good_masks(d)
                continue
            if d.name not in counted:
                if d.name not in empty and list_images(d, warn=False):
                    unclaimed.append(f"{d.name}/ (no test/{d.name}/ folder)")
                continue
            unclaimed.extend(f"{d.name}/{m.name}" for m in list_images(d, warn=False) if _file_id(m) not in claimed)
        if unclaimed:
            shown = ", ".join(unclaimed[:3]) + (", ..." if len(unclaimed) > 3 else "")
            said.append(f"{len(unclaimed)} mask(s) or mask folder(s) in {gt} that belong to no test image: {shown}")
    if said:
        warnings.warn(f"{root}: left out of the metrics: {'; '.join(said)} (an image renamed, moved or deleted?)",
                      DataWarning, stacklevel=3)


def _warn_marked_good_masks(folder: Path) -> None:
    """One :class:`DataWarning` naming the masks in ``ground_truth/good/`` that mark defect pixels:
    the images of ``test/good/`` count as defect-free and no mask of theirs is read, so such an
    image, defective by its mask, is scored as a good one (it belongs in its defect class)."""
    marked = []
    for m in list_images(folder, warn=False):
        try:
            if bool(_load_mask(m, None)[0].any()):
                marked.append(m.name)
        except Exception:  # noqa: BLE001 - an unreadable file here is never read for the metrics either
            continue
    if marked:
        warnings.warn(f"{folder}: {len(marked)} mask(s) mark defect pixels, but the images of test/{GOOD}/ count as "
                      f"defect-free and their masks are not read: {', '.join(marked[:3])}"
                      f"{', ...' if len(marked) > 3 else ''} (move such an image, and its mask, to its defect class)",
                      DataWarning, stacklevel=4)


def load_test_set(
    root: str | os.PathLike,
    size: int,
    *,
    channels: int = 3,
    min_side: int | None = None,
    workers: int | None = None,
    require_masks: bool = True,
) -> TestSet:
    """Read an MVTec-style test set (``root/test/<class>/`` + ``root/ground_truth/<class>/``).

    Classes are the sub-folders of ``root/test``; "good" comes first, then the others sorted;
    images within a class are sorted by name. Masks are resized with nearest-neighbour sampling.
    A file named ``<image>_mask`` beside ``<image>`` in a class folder is taken for a mask kept
    there, not a test image, and left out (a :class:`DataWarning` says where masks go).

    Args:
        root: dataset root holding ``test/`` (and ``ground_truth/`` for defect classes).
        size: side of the square images and masks returned.
        channels, min_side, workers: as in :func:`load_train_images`.
        require_masks: False accepts a root without any ``ground_truth/`` folder (images sorted into
            class folders, no pixel masks): :attr:`TestSet.has_masks` is then False. A
            ``ground_truth/`` folder that exists must hold a mask for every defective image.

    Returns:
        :class:`TestSet`.

    Raises:
        DataError: listing, in one message, every problem found: unreadable images or masks, a
            defective image without a mask (naming the mask paths that were expected), a mask
            whose size differs from its image's (naming both files and sizes), a mask two images
            would share (the same stem). Empty masks are allowed (a :class:`DataWarning` names them).
    """
    root = Path(root)
    test = root / "test"
    if not root.is_dir():  # what is wrong with it, before what it lacks
        raise DataError(f"{root}: {'no such folder' if not root.exists() else 'not a folder'} (expected a dataset "
                        "in MVTec-style layout: test/<class>/ holding the images)")
    if not test.is_dir():
        try:
            found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                           and images_inside(d))[:4]
        except OSError:  # a folder only listable by others: what is missing is said all the same
            found = []
        hint = (f"; its folders of images ({', '.join(found)}) go in test/, the defect-free ones' named {GOOD}, and "
                "their masks in ground_truth/<class>/") if found else ""
        raise DataError(f"{root}: no test/ folder (expected an MVTec-style layout: test/{GOOD}/ and "
                        f"test/<defect class>/ holding the images){hint}")
    class_dirs = sorted((d for d in test.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: (d.name != GOOD, d.name))
    if not class_dirs:
        raise DataError(f"{test}: no class folders (expected test/good/ and test/<defect class>/)")
    loose = list_images(test, warn=False)
    if loose:  # the layout has every test image in a class folder: these would silently not count
        warnings.warn(f"{test}: images directly in test/ are not read, only its class folders: {len(loose)} skipped "
                      f"({', '.join(p.name for p in loose[:3])}{', ...' if len(loose) > 3 else ''})",
                      DataWarning, stacklevel=2)
    if class_dirs[0].name != GOOD:  # every image would count as defective (an "OK" or "Good" folder too)
        warnings.warn(f"{test}: no {GOOD}/ folder, so every test image is taken as defective (classes "
                      f"{', '.join(d.name for d in class_dirs)}); the defect-free images' folder must be named "
                      f"{GOOD}", DataWarning, stacklevel=2)

    items: list[tuple[str, Path, Path | None]] = []
    problems: list[str] = []
    has_masks = require_masks or (root / "ground_truth").exists()
    beside: list[Path] = []
    for d in class_dirs:
        class_images = list_images(d, advice="a class's images go in its folder itself: its sub-folders are no classes")
        # a mask kept beside its image (<stem>_mask.png next to <stem>.png) would count as one more defective part
        stems = {p.stem for p in class_images}
        # (one with a mask named after it in ground_truth/, <stem>_mask_mask, is a test image of that name)
        masks_here = [p for p in class_images if p.stem.endswith("_mask") and p.stem[: -len("_mask")] in stems
                      and not (d.name != GOOD and has_masks and _own_mask(root, d.name, p))]
        if masks_here:
            beside.extend(masks_here)
            left_out = set(masks_here)
            class_images = [p for p in class_images if p not in left_out]
        gt_class = root / "ground_truth" / d.name
        if d.name != GOOD and has_masks and class_images and not gt_class.is_dir():  # one line, not one per image
            shown = ", ".join(p.name for p in class_images[:3]) + (", ..." if len(class_images) > 3 else "")
            what = ("no such folder" if not os.path.lexists(gt_class) else
                    "a link to nothing" if gt_class.is_symlink() and not gt_class.exists() else "not a folder")
            problems.append(f"{gt_class}: {what}; the ground-truth masks of the {len(class_images)} images in "
                            f"{d} ({shown}) are expected there")
            items.extend((d.name, img, None) for img in class_images)
            continue
        for img in class_images:
            mask = None
            if d.name != GOOD and has_masks:
                mask = find_mask(root, d.name, img)
                if mask is None:
                    odd = [c for c in _mask_candidates(root, d.name, img) if c.exists() and not c.is_file()]
                    if odd:  # a folder (or a device) where the mask goes
                        problems.append(f"{odd[0]}: not a file; expected the ground-truth mask of {img} there")
                    else:
                        gt = root / "ground_truth" / d.name
                        expected = f"{gt / (img.stem + '_mask.png')} or {gt / (img.stem + '.png')}"
                        problems.append(f"{img}: no ground-truth mask (expected {expected})")
            items.append((d.name, img, mask))
    if beside:
        warn_data(f"{test}: {len(beside)} file(s) named <image>_mask beside their images are taken for masks, not test "
                  f"images, and left out ({', '.join(str(p.relative_to(test)) for p in beside[:3])}"
                  f"{', ...' if len(beside) > 3 else ''}); masks go in {root / 'ground_truth'}/<class>/, named "
                  "<image>_mask.png", stacklevel=_callers_level())
    claimed: dict[Path, list[Path]] = {}
    for _cls, img, mask in items:
        if mask is not None:
            claimed.setdefault(mask, []).append(img)
    for mask, imgs in claimed.items():  # a.png and a.bmp find the same a_mask.png: one of them is wrong
        if len(imgs) > 1:
            problems.append(f"{mask}: the ground-truth mask of {len(imgs)} images ({', '.join(p.name for p in imgs)}), "
                            "which share its stem; rename all but one of them")
    if not items:
        raise DataError(f"{test}: no test images in {', '.join(d.name for d in class_dirs)}")
    _warn_unclaimed(root, class_dirs, items, has_masks)

    n = len(items)
    images = image_stack((n, channels, size, size), test)
    masks = image_stack((n, size, size), f"{test} masks", torch.bool, fill=0)
    sizes: list = [None] * n

    def one(i: int) -> None:
        cls, img_path, mask_path = items[i]
        img, img_size = _load_image(img_path, size, channels, min_side, few_levels, float_notes)
        images[i], sizes[i] = img, tuple(img_size)
        if mask_path is not None:
            m, m_size = _load_mask(mask_path, size, notes)
            if m_size != img_size:
                raise DataError(
                    f"{mask_path}: mask is {m_size[0]}x{m_size[1]} (width x height) but its image "
                    f"{img_path} is {img_size[0]}x{img_size[1]}" + _turned_note(img_path, m_size, img_size)
                )
            masks[i] = m
            # a mask the size of the stored pixels of a turned image was refused above; one the size of a
            # square image, or of one flipped or turned by 180 degrees, may have been drawn on either view
            turned = _orientation(img_path)
            if turned is not None and (turned in (2, 3, 4) or img_size[0] == img_size[1]) \
                    and _orientation(mask_path) != turned:
                notes.append(("turned", mask_path))

    notes: list[tuple[str, Path]] = []
    few_levels: list[tuple[Path, int]] = []
    float_notes: list[tuple[str, Path, str]] = []
    _, read_problems = run_collecting(one, n, workers)
    raise_problems(sorted(problems + read_problems), n, "test images", root)
    warn_few_levels(few_levels, n, test)
    warn_float_notes(float_notes, n, test)
    warn_blank(images, [img for _cls, img, _mask in items], test, said=black_said(few_levels))
    for kind, what in (("levels", "hold more than two values (soft edges or JPEG compression?); every nonzero "
                                  "pixel counts as defect"),
                       ("half", "mark more than half of their image as defect (inverted, defect drawn black?)"),
                       ("turned", "belong to images stored turned or flipped (an EXIF orientation of 2 to 8), "
                                  "which are read upright, and carry no such orientation themselves: their size "
                                  "does not tell on which view they were drawn, and one drawn on the stored pixels, "
                                  "as most tools show them, lies on the wrong pixels (draw it on the upright image, "
                                  "or give it the image's orientation)"),
                       ("empty", "mark no pixel as defect: their images count as defective, and every pixel of "
                                 "them as defect-free in the pixel metrics (as pixel-level evaluations commonly count them); draw "
                                 "the defect, or move the image to good/ if it has none"),
                       ("emptied", f"lose every defect pixel in the resize to {size} x {size} (defects thinner than "
                                   "its sampling step, which is nearest-neighbour): their images count as defective, "
                                   "and every pixel of them as defect-free in the pixel metrics (a larger --image-size "
                                   "keeps them)")):
        odd = sorted(str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for k, p in notes if k == kind)
        if odd:
            warnings.warn(f"{root}: {len(odd)} mask(s) {what}: {', '.join(odd[:3])}{', ...' if len(odd) > 3 else ''}",
                          DataWarning, stacklevel=2)

    classes = [c for c, _, _ in items]
    labels = torch.tensor([0 if c == GOOD else 1 for c in classes], dtype=torch.int64)
    return TestSet(
        images=images,
        masks=masks,
        labels=labels,
        classes=classes,
        paths=[p for _, p, _ in items],
        mask_paths=[m for _, _, m in items],
        has_masks=has_masks,
        sizes=sizes,
    )
