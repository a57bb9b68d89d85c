"""Reading images and defect masks from disk into fixed-size uint8 / bool tensors.

Images and masks are turned upright by their EXIF orientation tag (as a viewer shows them) before
anything else; sizes reported in errors are the upright ones. Images come back as ``torch.uint8``
tensors [C, S, S] (C = 3 by default) whatever their stored mode: 8-bit grayscale is repeated to
three channels, 16-bit and 32-bit grayscale are scaled to 8 bits (not clipped), palette images are
expanded, alpha channels are dropped. Masks come back as ``torch.bool`` [S, S] where any nonzero
stored value marks a defect pixel.

Every problem with a file raises :class:`DataError` with the file's path and what was wrong.
Functions that read many files (:func:`read_images`) try every file first and then report all the
bad ones in one error, so a broken folder is fixed in one pass instead of one file per run.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..safety import UserError, allocation_failed

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "BlankFramesWarning",
    "DataWarning",
    "collect_images",
    "list_images",
    "read_image",
    "read_image_at_both_sizes",
    "read_images",
    "resize_image",
    "read_mask",
    "unfinished_image",
]

#: File name endings (lower case) treated as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_T = TypeVar("_T")


class DataError(UserError, ValueError):
    """A problem with input data; the message names the file(s) or folder and what was wrong.

    A :class:`~defect_fast.safety.UserError` (one line, exit status 2 at the command line) and,
    for older callers, a ValueError.

    ``problems`` lists one ``"<path>: <problem>"`` line per bad file when several were found.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems: list[str] = list(problems)


class DataWarning(UserWarning):
    """Something in a data folder was skipped (e.g. a file that is not an image)."""


class BlankFramesWarning(DataWarning):
    """Images read that are of one colour throughout (:func:`warn_blank`): a failed exposure, a
    covered lens."""


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def images_inside(folder: Path) -> int:
    """How many image files lie directly in ``folder``, hidden ones aside (0 where it cannot be
    listed): a sub-folder :func:`list_images` does not read, named when it holds some."""
    try:
        return sum(1 for e in folder.iterdir() if not _is_hidden(e) and is_image_file(e) and not e.is_dir())
    except OSError:
        return 0


#: What :func:`list_images` advises of sub-folders holding images, by default.
SUB_FOLDERS_ADVICE = ("give each folder itself where a command takes several, as predict and calibrate do; to train "
                      "on them, gather their images into one folder, each under a name of its own")


def list_images(folder: str | os.PathLike, *, warn: bool = True, advice: str = SUB_FOLDERS_ADVICE) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name.

    Hidden files (name starting with ".") are ignored silently; sub-folders are not read, with one
    :class:`DataWarning` naming those that hold images (and how many), and ``advice``. Other files whose
    extension is not in :data:`IMAGE_EXTENSIONS` (e.g. ``notes.txt``, ``Thumbs.db``) are skipped
    with one :class:`DataWarning` naming all of them. Files with an image extension are returned
    even if they turn out to be unreadable: reading them raises :class:`DataError`.

    Raises:
        DataError: ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    images, skipped, subfolders = [], [], []
    for entry in folder.iterdir():
        if _is_hidden(entry):
            continue
        if entry.is_dir():
            inside = images_inside(entry)
            if inside:
                subfolders.append(f"{entry.name} ({inside})")
            continue
        (images if is_image_file(entry) else skipped).append(entry)
    if subfolders and warn:  # images sorted into sub-folders are a common layout: not read, and said so
        warn_data(f"{folder}: sub-folders are not read; skipped {len(subfolders)} holding images: "
                  f"{', '.join(sorted(subfolders))} ({advice})", stacklevel=_callers_level())
    if skipped and warn:
        names = ", ".join(sorted(p.name for p in skipped))
        warn_data(f"{folder}: skipped {len(skipped)} file(s) that are not images (extensions "
                  f"{', '.join(IMAGE_EXTENSIONS)}): {names}", stacklevel=_callers_level())
    return sorted(images, key=lambda p: p.name)


def collect_images(items: Iterable[str | os.PathLike]) -> list[Path]:
    """The image files named by a list of files and folders (e.g. a command line's arguments).

    Folders contribute their images (:func:`list_images`: sorted by name, non-images skipped with
    a warning); files are taken as given, in order (reading them reports a non-image).

    A path named twice (a folder and a file in it, the same path spelt twice: compared as absolute
    paths, links not followed, so a link beside its target is a name of its own) is taken once,
    at its first place, with a warning: predict wrote its map twice, under two names.

    Returns:
        the image paths, in the order of ``items``.
    Raises:
        DataError: listing, in one message, every item that does not exist, is neither a file nor
            a folder, or is a folder without images (``.problems`` holds one line each).
    """
    items = list(items)
    paths: list[Path] = []
    problems: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                problems.append(f"{p}: folder holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif p.exists():
            problems.append(f"{p}: not a file or folder")
        else:
            problems.append(f"{p}: no such file or folder")
    if problems and len(problems) == 1:
        raise DataError(problems[0], problems)
    raise_problems(problems, len(items), "inputs", "images")
    seen: set[str] = set()
    once, twice = [], []
    for p in paths:
        key = os.path.abspath(p)
        (twice if key in seen else once).append(p)
        seen.add(key)
    if twice:
        warnings.warn(f"{len(twice)} image path(s) given more than once are taken once: "
                      f"{', '.join(str(p) for p in twice[:3])}"
                      f"{', ...' if len(twice) > 3 else ''}", DataWarning, stacklevel=_callers_level())
    return once


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
    """Open and fully decode ``path``; any failure becomes a DataError naming the file."""
    if not path.exists():
        if path.is_symlink():  # listed in its folder, so "does not exist" puzzles
            raise DataError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist")
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    # A damaged file reaches PIL's parsers in ways they do not all turn into OSError (a TIFF tag of
    # the wrong type: TypeError; EXIF values: struct.error): any failure of this file is the file's.
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image is implausibly large ({exc}); every image is resized to the model's input, so "
                        "downscale it, or cut it into pieces, before") from None
    except MemoryError:
        raise DataError(f"{path}: cannot open image: not enough memory") from None
    except Exception as exc:  # noqa: BLE001 - see above
        raise DataError(f"{path}: cannot open image ({_reason(exc)})") from None
    # the pages counted before the decode: counting seeks back to the first page, which reads its tags
    # again, and after the decode a TIFF's orientation, which PIL had applied and dropped, came back
    # and was applied a second time (a multi-page TIFF with orientation 2..8 read wrongly)
    try:  # counting a TIFF's pages parses them all: a damaged later page raises here (TypeError)
        frames, count_error = getattr(img, "n_frames", 1), None
    except Exception as exc:  # noqa: BLE001 - the first page is read all the same; the rest is not
        frames, count_error = None, exc
        with contextlib.suppress(Exception):
            img.seek(0)  # the count stopped on the damaged page: its tags (orientation) are not the first's
    turn = _defer_tiff_orientation(img)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:  # PIL warns too, without the file's name
        warn_data(f"{path}: {img.width}x{img.height} pixels, over PIL's {limit} (twice that is refused); "
                  "decoding it takes much memory", stacklevel=2)
    try:
        img.load()  # decode now so truncated / corrupt data fails here, not later
    except MemoryError:  # a plausible size (under PIL's bomb limit) that this process cannot hold
        size = f"{img.width}x{img.height}"
        img.close()
        raise DataError(f"{path}: too large to decode here ({size} pixels): not enough memory") from None
    except Exception as exc:  # noqa: BLE001 - see above
        img.close()
        raise DataError(f"{path}: corrupt or truncated image ({_reason(exc)})") from None
    if img.width == 0 or img.height == 0:
        raise DataError(f"{path}: image has zero size ({img.width}x{img.height})")
    try:  # decoded, but not written to its end: a PNG cut before its IEND, a zero-filled rest (a stalled copy)
        unfinished = unfinished_image(path)
    except OSError:
        unfinished = None
    if unfinished is not None:  # its missing part reads as black pixels, a defect or a blank the model never saw
        img.close()
        raise DataError(f"{path}: {unfinished}")
    img = _turned(img, _UPRIGHT[turn], path) if turn is not None else _apply_orientation(img, path)
    # its size upright, as every size is said
    if count_error is not None:
        warn_data(f"{path}: its pages after the first cannot be counted ({_reason(count_error)}); the first, "
                  f"{img.width}x{img.height}, is read", stacklevel=2)
    if isinstance(frames, int) and frames > 1:  # a multi-page TIFF, an animated GIF or PNG
        warn_data(f"{path}: holds {frames} frames (pages); the first, {img.width}x{img.height}, is read", stacklevel=2)
    return img


def _defer_tiff_orientation(img: Image.Image) -> int | None:
    """For a TIFF whose orientation tag turns it by 90 degrees (5..8): take the tag out before PIL
    decodes it and return it, for the caller to turn the decoded pixels (None for any other image).

    NB: PIL turns such a TIFF itself while loading it and gives its size as turned from the start,
    but it decodes the stored rows at the turned width (Pillow 13: scrambled pixels, no error). So the
    size is set back to the stored one and the tag removed before the decode, which then reads the
    pixels as stored. A PIL without the stored size (``_tile_size``: Pillow 10 and earlier) decodes
    such a TIFF as stored and leaves the turn to :func:`upright`: None, nothing changed.
    """
    tags = getattr(img, "tag_v2", None)
    if img.format != "TIFF" or tags is None:
        return None
    orientation = tags.get(_EXIF_ORIENTATION)
    if orientation not in (5, 6, 7, 8):
        return None
    stored = getattr(img, "_tile_size", None)
    if not (isinstance(stored, tuple) and len(stored) == 2):
        return None
    del tags[_EXIF_ORIENTATION]
    img.getexif().pop(_EXIF_ORIENTATION, None)  # PIL's own turn after the decode reads this copy
    img._size = stored  # noqa: SLF001 - see above
    return orientation


def _reason(exc: BaseException) -> str:
    """An exception as the reason in a one-line message: its text, and its kind where the text
    alone says little (PIL's parsers raise TypeError or struct.error on damaged fields)."""
    text = str(exc)
    if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError)) and text:
        return text
    return f"{error_kind(exc)}: {text}" if text else error_kind(exc)


def error_kind(exc: BaseException) -> str:
    """The name of an exception's class, with its module unless built in (struct.error, not error)."""
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


#: EXIF tag holding how the stored pixels must be turned to be seen upright (1 = as stored).
_EXIF_ORIENTATION = 0x0112
#: How each EXIF orientation is undone (the table of PIL's ImageOps.exif_transpose).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def undecoded(img: Image.Image) -> bool:
    """Whether ``img``'s pixels are still to be decoded from its file: tiles left (as after a seek
    to another frame), or none loaded yet (Pillow 11 keeps them as _im, Pillow 10 as im)."""
    return bool(getattr(img, "tile", None)) or img.__dict__.get("_im", img.__dict__.get("im", True)) is None


def load_as_stored(img: Image.Image) -> None:
    """``img.load()``, leaving a TIFF turned by 90 degrees by its orientation tag (5..8) as stored,
    with the tag: PIL turns such a TIFF as it loads it and drops the tag, and decodes it at the
    turned width (scrambled grey and 16-bit pixels, no error; see :func:`_defer_tiff_orientation`).
    Every other image is loaded as PIL loads it (a JPEG or PNG stored, its EXIF tag kept; a TIFF
    flipped or turned by 180 degrees, 2..4, turned by PIL, its tag dropped), and so is one already
    decoded. :func:`upright` then turns it as the file's readers do, once either way."""
    if getattr(img, "fp", None) is None or not undecoded(img):
        img.load()
        return
    turn = _defer_tiff_orientation(img)
    try:
        img.load()
    finally:
        if turn is not None:  # the tag back, for upright (and whoever holds the image) to turn it by
            img.tag_v2[_EXIF_ORIENTATION] = turn
            img.getexif()[_EXIF_ORIENTATION] = turn


def upright(img: Image.Image, where: str | os.PathLike = "PIL image") -> Image.Image:
    """``img`` turned/flipped as its EXIF orientation tag says (phones and rotated cameras store
    pixels sideways and set the tag), as it is displayed: a new image, or ``img`` itself when it
    needs no turn (no tag, 1, or a value EXIF does not define, as PIL leaves those). The image
    readers apply it to every file; apply it to a PIL image opened by hand to score it as its file
    (one not yet decoded is decoded here, by :func:`load_as_stored`: PIL's own turn of a TIFF as it
    decodes would come on top of this one)."""
    load_as_stored(img)
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF block: PIL gives no orientation either
        return img
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return img
    # the pixels only: exif_transpose also re-encodes the EXIF block without the tag, which fails
    # on a block PIL reads but cannot write back (struct.error: an internal error, a stopped line)
    return _transposed(img, method, where)


def _transposed(img: Image.Image, method: Image.Transpose, where: str | os.PathLike) -> Image.Image:
    try:
        return img.transpose(method)
    except MemoryError:
        raise DataError(f"{where}: too large to turn upright here ({img.width}x{img.height} pixels): not enough "
                        "memory") from None


def _turned(img: Image.Image, method: Image.Transpose, path: Path) -> Image.Image:
    """``img`` turned by ``method``, the stored one closed."""
    try:
        return _transposed(img, method, path)
    finally:
        img.close()


def _apply_orientation(img: Image.Image, path: Path) -> Image.Image:
    """:func:`upright` of a file's image, the stored one closed when it was turned."""
    turned = upright(img, path)
    if turned is not img:
        img.close()
    return turned


def _scale_to_uint8(a: np.ndarray, mode: str, note: Callable[[str, str, str], None] | None = None) -> np.ndarray:
    """Wide grayscale (16/32-bit integer or float) -> uint8, scaled to the full range.

    NB: "I;16*" uses the full 16-bit range (65535 -> 255). "I" (32-bit int) is read as 16-bit
    data when its values lie in [0, 65535] (the usual case: 16-bit TIFF/PNG decoded to "I").
    "F" is read as [0, 1] (scaled by 255) or else as [0, 255] (taken as is), the first range its
    bulk lies in: all its values within 5 % of the range, but for outliers, which are clipped (and
    said): a few (0.1 %) of any size (a hot pixel at 3 in a [0, 1] frame), or up to 1 % within
    twice the range (glints, processing overshoot at 1.2); [0, 255] allows no margin below 0 (a
    frame of values from -10 to 10 is signed data, not a dark image). A frame is read by the same rule as its
    neighbours whatever its outliers: one hot pixel read a [0, 1] frame as [0, 255] (black) and a
    [0, 255] frame by its own min..max (dark). Values in no such range (12-bit data as float, a
    height map) are rescaled from the image's own min..max, said through ``note``: its brightness
    is then not comparable with other images'. ``note(kind, text, detail)``: a key of
    :data:`_FLOAT_NOTES`, the sentence for this image, and the part of it that is this image's own.
    """
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        a = a * (255.0 / 65535.0)
    elif mode == "I" and lo >= 0 and hi <= 65535:
        a = a * (255.0 / 65535.0)
    elif mode == "F" and (top := _float_range(a, lo, hi, note)) is not None:
        a = a * (255.0 / top)
    else:
        if note is not None:
            kind = f"{'float' if mode == 'F' else '32-bit integer'} pixels from {lo:.6g} to {hi:.6g}"
            note("own range", f"{kind}, in no range this reader knows ({'[0, 1] or [0, 255]' if mode == 'F' else '[0, 65535]'}), "
                 "are rescaled from this image's own minimum and maximum: its brightness is not comparable with "
                 "other images'", kind)
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _float_range(a: np.ndarray, lo: float, hi: float, note: Callable[[str, str, str], None] | None) -> float | None:
    """The top of the range a float frame is read in (1 or 255), or None (see :func:`_scale_to_uint8`)."""
    unit_bulk = None  # said when the frame is read as [0, 255] though its bulk lies in [0, 1]
    q = None  # the frame's quantiles, the same for both ranges
    for top in (1.0, 255.0):
        low, high = (-0.05 if top == 1.0 else 0.0), 1.05 * top  # [0, 255] frames of negative values: signed data
        if lo >= low and hi <= high:
            if top == 255.0 and unit_bulk is not None and note is not None:
                note(*unit_bulk)
            return top
        if not a.size:
            continue
        if q is None:
            q = np.quantile(a, [0.001, 0.01, 0.5, 0.99, 0.999])
        if (q[0] >= low and q[4] <= high) or (q[1] >= low and q[3] <= high and lo >= -top and hi <= 2 * top):
            if note is not None:
                out = int(((a < low) | (a > high)).sum())
                detail = f"read as [0, {top:g}]; {out} outside it, from {lo:.4g} to {hi:.4g}"
                note("clipped", f"float pixels read as [0, {top:g}]; {out} outside it (from {lo:.4g} to {hi:.4g}) "
                     "are clipped", detail)
                if unit_bulk is not None:
                    note(*unit_bulk)
            return top
        # the bulk in [0, 1], not whole numbers (a dark [0, 255] frame) and not at 0, with too much outside
        # it for outliers: read as [0, 255], near black, which is said
        if top == 1.0 and 0.05 < q[2] <= 1.05 and not np.array_equal(a, np.round(a)):
            share = float(((a >= -0.05) & (a <= 1.05)).mean())
            unit_bulk = ("unit bulk", f"float pixels read as [0, 255] (from {lo:.4g} to {hi:.4g}), though {share:.0%} of "
                         "them lie in [0, 1]: if the frame is [0, 1], its glints or overshoot are too many to clip here, "
                         "and it reads near black; save it clipped to [0, 1]",
                         f"from {lo:.4g} to {hi:.4g}, {share:.0%} in [0, 1]")
    return None


@contextlib.contextmanager
def _converting(path: Path, img: Image.Image):
    """Turn a failure while converting or resizing a decoded image into a DataError naming it
    (so that :func:`run_collecting` goes on with the other files)."""
    mode = img.mode
    try:
        yield
    except DataError:
        raise
    except (OSError, ValueError, TypeError, MemoryError) as exc:
        raise DataError(f"{path}: cannot convert its {mode} pixels ({type(exc).__name__}: {exc})") from None


def _to_8bit(img: Image.Image, channels: int, path: Path, notes: list | None = None) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3), 8 bits per channel. What the
    conversion of wide grey pixels says of the image is warned of, or, given ``notes``, put there
    as (kind, path, detail) for :func:`warn_float_notes` to say of many files at once."""
    mode = img.mode

    def note(kind: str, text: str, detail: str) -> None:
        if notes is not None:
            notes.append((kind, path, detail))
        else:
            warn_data(f"{path}: {text}", stacklevel=_callers_level())

    if mode.startswith("I;16") or mode in ("I", "F"):
        try:
            gray = Image.fromarray(_scale_to_uint8(np.asarray(img), mode, note), mode="L")
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        return gray if channels == 1 else gray.convert("RGB")
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img = img.convert("RGBA")  # expand the palette (keeps palette transparency, then dropped)
    elif mode in ("L", "RGB") and "transparency" in img.info and _wide_colour(img, path) is None:
        # a colour key: that colour is transparent (of a 16-bit PNG, PIL matches the key on the high bytes only)
        img = img.convert("LA" if mode == "L" else "RGBA")  # (the pixels as they are, the key as alpha)
    band = next((b for b in img.getbands() if b in ("A", "a")), None)  # (premultiplied: "a")
    if band is not None:
        alpha = np.asarray(img.getchannel(band))
        if int(alpha.min()) < 255:  # what lies under a transparent part is read as the part's surface
            share = float((alpha < 255).mean())
            note("transparent", f"has transparent pixels ({share:.1%} of it), read as the colour stored under them: "
                 "alpha is dropped", f"{share:.1%} of it")
    if img.mode in ("1", "L", "LA", "La"):
        # premultiplied "La" has no conversion to "L" of its own: through "LA", as "RGBa" -> "RGB" unpremultiplies
        gray = (img.convert("LA") if img.mode == "La" else img).convert("L")
        return gray if channels == 1 else gray.convert("RGB")
    rgb = img.convert("RGB")  # P/RGBA/RGBa/CMYK/YCbCr/LAB/HSV: alpha dropped
    return rgb.convert("L") if channels == 1 else rgb


def _as_tensor(img: Image.Image) -> torch.Tensor:
    """An 8-bit "L" or "RGB" PIL image -> uint8 [C, H, W]."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


#: A 16-bit image whose values all lie below this is read at 17 grey levels or fewer (65535 -> 255).
FEW_LEVELS_BELOW = 4096


def few_levels_top(img: Image.Image, path: Path | None = None) -> int | None:
    """The largest value of a 16-bit image whose values all lie below :data:`FEW_LEVELS_BELOW`
    (an upper bound of it for a 16-bit colour PNG or TIFF, which PIL decodes by its high bytes; found
    by the header of ``path`` or the TIFF's tags), else None."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img)  # not getextrema(), which PIL refuses for "I;16B" (big-endian TIFF) and "I;16L"
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        return hi if 0 <= lo and hi < FEW_LEVELS_BELOW else None
    if img.mode in ("RGB", "RGBA", "LA") and _wide_colour(img, path) is not None:
        high = max(hi for _lo, hi in img.getextrema()[:1 if img.mode == "LA" else 3])
        return (high + 1) * 256 - 1 if high < FEW_LEVELS_BELOW >> 8 else None
    return None


def _load_images(path: str | os.PathLike, size: int | None, channels: int, min_side: int | None,
                 original: bool, few_levels: list[tuple[Path, int]] | None = None, notes: list | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
    """(read_image's tensor, the original (width, height), the image at that size when ``original``
    asks for it: the same tensor when no resize was needed), from one decode. ``few_levels``
    collects (path, largest value) for a 16-bit image whose values all lie below
    :data:`FEW_LEVELS_BELOW` (:func:`warn_few_levels`); ``notes``, what the conversion of float
    or 32-bit pixels says of it (:func:`warn_float_notes`; without it, warned of at once)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    with _open(path) as img:  # closed at the end: PIL keeps a multi-page file open after decoding it
        orig = img.size
        if few_levels is not None:
            top = few_levels_top(img, path)
            if top is not None:
                few_levels.append((path, top))
        if min_side is not None and min(orig) < min_side:
            raise DataError(f"{path}: image is {orig[0]}x{orig[1]} pixels, smaller than the minimum side of {min_side}")
        full = None
        with _converting(path, img):
            eight = _to_8bit(img, channels, path, notes)  # a new image, kept after the file's is closed
            if size is not None and eight.size != (size, size):
                if original:
                    full = _as_tensor(eight)
                # NB: PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased.
                eight = eight.resize((size, size), Image.BILINEAR)
            t = _as_tensor(eight)
    return t, orig, (t if full is None else full) if original else None


def _load_image(path: str | os.PathLike, size: int | None, channels: int, min_side: int | None,
                few_levels: list[tuple[Path, int]] | None = None, notes: list | None = None
                ) -> tuple[torch.Tensor, tuple[int, int]]:
    """read_image plus the original (width, height)."""
    t, orig, _ = _load_images(path, size, channels, min_side, False, few_levels, notes)
    return t, orig


def few_levels_message(few_levels: list[tuple[Path, int]], total: int, where: str | os.PathLike) -> str | None:
    """What :func:`warn_few_levels` says of ``few_levels`` (None when it is empty)."""
    if not few_levels:
        return None
    top = max(hi for _p, hi in few_levels)
    names = sorted(str(p) for p, _hi in few_levels)
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    if top == 0:  # no bit depth explains a black frame: the camera's exposure (or shutter) does
        return (f"{where}: {len(names)} of {total} 16-bit images are black, every value 0 ({shown}): blank frames?")
    return (f"{where}: {len(names)} of {total} 16-bit images hold values up to {top} at most (of 65535), so they "
            f"are read at {round(top * 255 / 65535) + 1} grey level(s) or fewer ({shown}); 16-bit data is read by its "
            "full range: scale the data of a 10-, 12- or 14-bit camera to it (each value times 2**(16 - bits)), or "
            "save the images as 8-bit, before training and inspecting")


#: What the conversion of float and 32-bit pixels, or of transparent ones, says of an image, by
#: kind: said of many files at once (:func:`warn_float_notes`), with each file's own part of it in
#: brackets.
_FLOAT_NOTES = {
    "transparent": "have transparent pixels, read as the colour stored under them: alpha is dropped",
    "own range": ("have pixels in no range this reader knows ([0, 1] or [0, 255] for float, [0, 65535] for 32-bit "
                  "integers), each rescaled from its own minimum and maximum: their brightness is not comparable "
                  "with other images'"),
    "clipped": "have float pixels outside the range they are read in, clipped",
    "unit bulk": ("are read as [0, 255] though most of their float pixels lie in [0, 1]: if they are [0, 1] frames, "
                  "their glints or overshoot are too many to clip here, and they read near black; save them clipped "
                  "to [0, 1]"),
}


def warn_float_notes(notes: list[tuple[str, Path, str]], total: int, where: str | os.PathLike) -> None:
    """One warning per kind of ``notes`` (:func:`_to_8bit`'s (kind, path, detail)), naming up to
    three files with their details and the count: a folder of 12-bit frames saved as float was
    one warning per file."""
    for kind, head in _FLOAT_NOTES.items():
        said = sorted((str(p), d) for k, p, d in notes if k == kind)
        if said:
            shown = ", ".join(f"{p} ({d})" for p, d in said[:3]) + (", ..." if len(said) > 3 else "")
            warn_data(f"{where}: {len(said)} of {total} images {head}: {shown}", stacklevel=_callers_level())


def warn_few_levels(few_levels: list[tuple[Path, int]], total: int, where: str | os.PathLike) -> None:
    """One warning for the 16-bit images :func:`_load_images` found with values below
    :data:`FEW_LEVELS_BELOW` (none: no warning): 16-bit data is read by its full range (65535 -> 255),
    so the data of a 10- or 12-bit camera stored in 16-bit files comes out dark, in a few grey levels.
    It is attributed to the first caller outside this package and torch (the user's line)."""
    message = few_levels_message(few_levels, total, where)
    if message is not None:  # (black frames: blank ones, which a page that names blank frames names once)
        warn_data(message, stacklevel=_callers_level(),
                  category=BlankFramesWarning if max(hi for _p, hi in few_levels) == 0 else DataWarning)


def blank_images(images: torch.Tensor) -> torch.Tensor:
    """bool [N]: which of the uint8 images [N, C, H, W] are of one colour throughout (every channel
    constant): a frame of a failed exposure or a covered lens, which no camera's noise leaves on a
    photographed surface."""
    flat = images.flatten(2)
    return (flat.amax(2) == flat.amin(2)).all(1)


def black_said(few_levels: list[tuple[Path, int]]) -> list[Path]:
    """The files :func:`few_levels_message` calls black frames: all of them when every one is all 0
    (its black-frame wording), else none (its bit-depth wording names them all)."""
    return [p for p, _top in few_levels] if few_levels and max(top for _p, top in few_levels) == 0 else []


def warn_blank(images: torch.Tensor | Sequence[bool], paths: Sequence[Path], where: str | os.PathLike,
               said: Iterable[Path] = ()) -> None:
    """One warning naming the images read that are blank (:func:`blank_images`; or ``images`` is
    that list of flags), but for those in ``said`` (16-bit frames already called black by
    :func:`warn_few_levels`): among defect-free images a blank frame sets the thresholds by its
    score, and at inspection it is a camera fault."""
    said = set(said)
    flags = blank_images(images).tolist() if isinstance(images, torch.Tensor) else list(images)
    blank = [str(p) for p, b in zip(paths, flags) if b and p not in said]
    if blank:
        shown = ", ".join(blank[:3]) + (", ..." if len(blank) > 3 else "")  # in the order given (image 2 before 10)
        warn_data(f"{where}: {len(blank)} of {len(paths)} images are of one colour throughout ({shown}): blank "
                  "frames (a failed exposure, a covered lens)?", stacklevel=_callers_level(), category=BlankFramesWarning)


#: How far (a factor) an image's width-to-height ratio may lie outside the ratios of the training
#: images before it is said: every image is stretched to the model's square input, so one of other
#: proportions is stretched otherwise than the images the model learnt (a long strip of a surface
#: trained on square images, a black square on it, can score under the threshold). A line's own
#: spread passes (magnetic tile's training photographs lie between 1:2.8 and 2.6:1, its test
#: images up to 2.7:1, inside the margin).
PROPORTIONS_MARGIN = 1.25


def proportions(sizes: Iterable[tuple[int, int]]) -> list[float]:
    """[lowest, highest] width-to-height ratio of images of (width, height) ``sizes``: what a run
    records of its training images (:func:`outside_proportions`)."""
    ratios = [w / h for w, h in sizes]
    return [min(ratios), max(ratios)]


def outside_proportions(sizes: Sequence[tuple[int, int]], names: Sequence[object], trained: Sequence[float] | None,
                        where: str | os.PathLike, total: int | None = None) -> str | None:
    """The warning for the images of (width, height) ``sizes`` whose width-to-height ratio lies
    more than :data:`PROPORTIONS_MARGIN` outside ``trained`` (the training images' [lowest,
    highest], as :func:`proportions` gives it; None: not recorded, nothing said), naming up to
    three of them, "of ``total``" images (default: as many as ``sizes``); None when there is none."""
    if not trained:
        return None
    lo, hi = trained
    out = [(str(n), w, h) for n, (w, h) in zip(names, sizes)
           if not lo / PROPORTIONS_MARGIN <= w / h <= hi * PROPORTIONS_MARGIN]
    if not out:
        return None
    shown = ", ".join(f"{n} ({w}x{h})" for n, w, h in out[:3]) + (", ..." if len(out) > 3 else "")
    span = _ratio(lo) if _ratio(lo) == _ratio(hi) else f"{_ratio(lo)} to {_ratio(hi)}"
    return (f"{where}: {len(out)} of {total or len(sizes)} images are of other proportions than the training images "
            f"(width:height {span}): {shown}; every image is stretched to the model's square "
            "input, so their defects are stretched otherwise than the model learnt and can pass unseen: inspect "
            "pieces of the trained proportions, or train on images of these")


def _ratio(r: float) -> str:
    """A width:height ratio as "2.6:1" or "1:2.8" (two digits; whole numbers from 10 on: "130:1")."""
    big = r if r >= 1 else 1 / r
    text = f"{big:.0f}" if big >= 10 else f"{big:.2g}"
    return f"{text}:1" if r >= 1 else f"1:{text}"


def warn_data(message: str, stacklevel: int = 1, category: type[Warning] = DataWarning) -> None:
    """``warnings.warn(message, category, stacklevel)``, shown and filtered as it would be, but
    kept in no warning registry (under the "once" action Python keeps each text in its own, as
    ever), for warnings whose text varies: a count, a file's name. The messages of one file's reading name the file, and the registry
    that the default filter keeps in the warning line's module holds every distinct text for the
    life of the process: a service reading a 12-bit camera's frames or multi-page TIFFs, each
    named, would grow by every frame. (So a file read twice is warned of twice: the "default" and
    "module" actions show a text again, as "always" does; the command line shows a text once.)"""
    import sys

    try:
        frame = sys._getframe(stacklevel)  # 1: the caller of this function, as warnings.warn counts
    except ValueError:  # beyond the stack: as warnings.warn does
        frame = None
    if frame is None:
        filename, lineno, globals_ = "sys", 1, sys.__dict__
    else:
        filename, lineno, globals_ = frame.f_code.co_filename, frame.f_lineno, frame.f_globals
    warnings.warn_explicit(message, category, filename, lineno, module=globals_.get("__name__", "<string>"),
                           registry=None)


def _callers_level() -> int:
    """The ``stacklevel`` of :func:`warnings.warn` (called by the caller of this function) that names
    the first frame outside this package and torch (decorators such as ``torch.no_grad`` add frames)."""
    import sys

    ours = tuple(str(p) + os.sep for p in (Path(__file__).resolve().parents[1], Path(torch.__file__).resolve().parent))
    frame, level = sys._getframe(2), 2  # the frame that calls warnings.warn is level 1
    while frame is not None and frame.f_code.co_filename.startswith(ours):
        frame, level = frame.f_back, level + 1
    return level


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [C, H, W] (C = 1 or 3) -> uint8 [C, size, size] by the resize :func:`read_image`
    gives files (PIL's bilinear filter, antialiased when shrinking, on 8-bit pixels)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"resize_image takes uint8 [C, H, W] with C = 1 or 3, got {image.dtype} {tuple(image.shape)}")
    a = image.detach().cpu().permute(1, 2, 0).contiguous().numpy()
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode="L" if a.shape[-1] == 1 else "RGB")
    return _as_tensor(img.resize((size, size), Image.BILINEAR))


def read_image_at_both_sizes(path: str | os.PathLike, size: int, channels: int = 3,
                             few_levels: list[tuple[Path, int]] | None = None, notes: list | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`read_image` of ``path`` at ``size``, the image at its own size), decoded once: what
    a tool that shows its maps on the photograph needs. Raises DataError as :func:`read_image`.
    ``few_levels`` collects the file when it is a 16-bit image of few levels (:func:`warn_few_levels`);
    ``notes``, what the conversion of its pixels says (:func:`note_once`; without it, warned of)."""
    t, _orig, full = _load_images(path, size, channels, None, True, few_levels, notes)
    return t, full


def note_once(notes: list[tuple[str, Path, str]], said: set[str]) -> list[str]:
    """What ``notes`` (:func:`_to_8bit`'s) say of kinds not in ``said`` yet (added to it): one
    sentence each, for a service that says each kind once, not for every frame of a camera."""
    lines = []
    for kind, path, detail in notes:
        if kind not in said:
            said.add(kind)
            lines.append(f"{path} ({detail}): images like it {_FLOAT_NOTES[kind]}")
    return lines


def read_image(path: str | os.PathLike, size: int | None, channels: int = 3, *, min_side: int | None = None) -> torch.Tensor:
    """Read one image file as a uint8 tensor [channels, size, size].

    Args:
        path: a PNG, JPEG, BMP or TIFF file (any PIL mode: grayscale 1/8/16/32-bit or float,
            RGB, RGBA, LA, palette, CMYK...). Grayscale is repeated to 3 channels when
            ``channels == 3``; colour is converted to luma when ``channels == 1``; alpha is
            dropped; 16-bit data is scaled to 8 bits (65535 -> 255), not clipped.
        size: side of the square output; the image is resized with antialiased bilinear
            filtering (aspect ratio is not kept). None keeps the original size.
        channels: 3 (default) or 1.
        min_side: if given, images whose shorter original side is below it are rejected
            (images smaller than ``size`` are otherwise upsampled).

    Returns:
        torch.uint8 [channels, size, size] (values 0..255).

    Raises:
        DataError: missing, empty, corrupt, truncated or non-image file, or too small; the
            message names the file.
    """
    return _load_image(path, size, channels, min_side)[0]


def _load_mask(path: str | os.PathLike, size: int | None, notes: list[tuple[str, Path]] | None = None
               ) -> tuple[torch.Tensor, tuple[int, int]]:
    """read_mask plus the original (width, height); ``notes`` collects ("levels" | "half" | "empty" |
    "emptied", path) for a mask with more than two values (soft edges, JPEG), marking more than half
    its image, marking no pixel at all, or whose every defect pixel fell between the samples of the
    resize."""
    path = Path(path)
    with _open(path) as stored:  # closed at the end: PIL keeps a multi-page file open after decoding it
        return _mask_of(stored, path, size, notes)


def _mask_of(img: Image.Image, path: Path, size: int | None, notes: list[tuple[str, Path]] | None
             ) -> tuple[torch.Tensor, tuple[int, int]]:
    """:func:`_load_mask` of the opened file ``img``."""
    # the file's header (a turned image has no format), read only for the modes such a PNG decodes to
    kind = _wide_colour(img, path) if img.mode in ("RGB", "RGBA", "LA") else None
    if kind is not None:
        raise DataError(f"{path}: a 16-bit colour {kind}, which is read by the high byte of each value only (a "
                        "mask value under 256 reads as 0, no defect); save the mask as 8-bit or 16-bit grayscale")
    orig = img.size
    with _converting(path, img):
        if img.mode in ("1", "L", "I", "F") or img.mode.startswith("I;16"):
            values = np.asarray(img)
            defect = values != 0
        else:
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")
            alpha = np.asarray(img.getchannel("A")) if "A" in img.getbands() else None
            if alpha is not None and alpha.min() == 0:  # drawn on a transparent layer: what is painted is the defect
                values = alpha
                defect = alpha != 0
            else:
                values = np.asarray(img.convert("RGB"))
                defect = (values != 0).any(axis=2)
        if notes is not None:
            if np.unique(values).size > 2:
                notes.append(("levels", path))
            if defect.mean() > 0.5:
                notes.append(("half", path))
            if not defect.any():
                notes.append(("empty", path))
        if size is not None and orig != (size, size):
            m = Image.fromarray(defect.astype(np.uint8) * 255, mode="L").resize((size, size), Image.NEAREST)
            had = bool(defect.any())
            defect = np.asarray(m) != 0
            if notes is not None and had and not defect.any():
                notes.append(("emptied", path))
    return torch.from_numpy(np.ascontiguousarray(defect)), orig


def _wide_colour(img: Image.Image, path: Path | None) -> str | None:
    """"PNG" or "TIFF" when an image PIL decoded as 8-bit colour ("RGB", "RGBA", "LA") is stored with
    16 bits per sample, which PIL reads by their high bytes (a PNG by its header, of ``path``, a TIFF
    by its BitsPerSample tag), else None."""
    fmt, tags = img.format, getattr(img, "tag_v2", None)
    if fmt is None and path is not None:  # turned upright: a new image, without the file's format and tags
        with contextlib.suppress(Exception), Image.open(path) as stored:
            fmt, tags = stored.format, dict(getattr(stored, "tag_v2", None) or {})
    if fmt == "TIFF" and tags is not None:
        bits = tags.get(258)  # BitsPerSample: one value per sample
        bits = bits if isinstance(bits, tuple) else (bits,)
        return "TIFF" if all(b == 16 for b in bits) else None
    if fmt != "PNG":
        return None
    header = _png_header(path) if path is not None else None
    if header is None and getattr(img, "filename", ""):  # a PIL image given as such ("PIL image"): its own file
        header = _png_header(Path(img.filename))
    return "PNG" if header in ((16, 2), (16, 4), (16, 6)) else None


_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and CRC: the last 8 bytes of every PNG


def _found_after(f, needle: bytes, start: int, stop: int) -> bool:
    """Whether ``needle`` lies in the file's bytes [start, stop), read a block at a time."""
    pos, carry = start, b""
    while pos < stop:
        f.seek(pos)
        got = f.read(min(1 << 20, stop - pos))
        if not got:  # the file got shorter since (a writer starting it again): no end there
            return False
        block = carry + got
        if needle in block:
            return True
        pos += len(got)
        carry = block[-(len(needle) - 1):]
    return False


def _jpeg_scan_data(f) -> int | None:
    """Where the first scan's coded data of a JPEG begins (past its header segments, whose
    lengths are followed: an EXIF thumbnail's end marker lies in one), or None when the header
    ends first."""
    f.seek(2)
    while True:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if marker[1] == 0xFF:  # a fill byte
            f.seek(-1, os.SEEK_CUR)
            continue
        if marker[1] in (0x01, 0xD8) or 0xD0 <= marker[1] <= 0xD7:  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2:
            return None
        if marker[1] == 0xDA:  # start of scan: its coded data follow its header
            return f.tell() + int.from_bytes(length, "big") - 2
        f.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)


def unfinished_image(path: str | os.PathLike) -> str | None:
    """Why a PNG or JPEG file that may decode has not been written to its end, or None (other
    formats, and finished files). A PNG cut off before its IEND chunk decodes, and so does a
    file whose writer set its full size first (SMB copies, some FTP clients) and stalled: the rest
    is zeros, which a JPEG or PNG decoder reads as pixels. A PNG must hold the IEND chunk (what
    follows it is ignored, as PIL ignores it); a JPEG whose file ends in zero bytes must hold its
    end marker after its image data began (before the zeros: a trailer may follow it; a JPEG whose
    data simply stops does not decode)."""
    with open(path, "rb") as f:
        head = f.read(8)
        end = f.seek(0, os.SEEK_END)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            # at the end, or (data a tool appended after it) anywhere
            if _found_after(f, _PNG_END, max(0, end - 65536), end) or _found_after(f, _PNG_END, 8, end):
                return None
            return "a PNG without its IEND chunk at the end (cut off, or still being written)"
        if not head.startswith(b"\xff\xd8\xff"):
            return None
        pos = end
        while pos > 0:  # back over the zeros at the end, a block at a time (the header is not zeros)
            step = min(65536, pos)
            f.seek(pos - step)
            kept = f.read(step).rstrip(b"\0")
            if kept:
                pos = pos - step + len(kept)  # just after the last byte that is not zero
                break
            pos -= step
        if pos == end:
            return None
        data = _jpeg_scan_data(f)
        if data is None or not _found_after(f, b"\xff\xd9", data, pos):
            return "a JPEG whose last bytes are zeros, not its end marker (still being written)"
    return None


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG file, from its header (the first chunk, IHDR, at a fixed
    place by the PNG specification); None when the file does not start so."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def read_mask(path: str | os.PathLike, size: int | None) -> torch.Tensor:
    """Read a ground-truth mask file as a bool tensor [size, size] (True = defect pixel).

    Any nonzero stored value (in any colour channel) is a defect (a 16-bit colour PNG or TIFF is
    refused: PIL keeps the high byte of its values only); in a mask with transparent
    pixels (alpha 0 somewhere: drawn on a transparent layer), its painted pixels (alpha not 0) are,
    whatever colour they or the hidden background have. Resizing uses
    nearest-neighbour sampling, so defects thinner than the downsampling step can shrink or vanish.
    None keeps the original size.

    Raises:
        DataError: missing, empty, corrupt or non-image file; the message names the file.
    """
    return _load_mask(path, size)[0]


# --------------------------------------------------------------------------------------------
# Many files
# --------------------------------------------------------------------------------------------


def default_workers() -> int:
    """Threads used for reading (PIL releases the GIL while decoding and resizing)."""
    return max(1, min(8, os.cpu_count() or 1))


def run_collecting(fn: Callable[[int], _T], n: int, workers: int | None = None) -> tuple[list[_T | None], list[str]]:
    """Run ``fn(i)`` for i in range(n) on a thread pool; DataErrors are collected, not raised.

    Returns (results with None where fn failed, sorted list of problem lines).
    """
    results: list[_T | None] = [None] * n
    problems: list[str] = []

    def one(i: int) -> None:
        try:
            results[i] = fn(i)
        except DataError as exc:
            problems.extend(exc.problems or [str(exc)])

    workers = default_workers() if workers is None else max(1, workers)
    if workers == 1 or n <= 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(n)))
    return results, sorted(problems)


def raise_problems(problems: Sequence[str], total: int, what: str, where: str | os.PathLike) -> None:
    """Raise one DataError listing every problem line (no-op when there are none)."""
    if not problems:
        return
    lines = "\n  ".join(problems)
    raise DataError(f"{where}: {len(problems)} problem(s) in {total} {what}:\n  {lines}", problems)


def image_stack(shape: tuple[int, ...], where: str | os.PathLike, dtype: torch.dtype = torch.uint8,
                fill: int | None = None) -> torch.Tensor:
    """An uninitialised (or ``fill``-ed) tensor for a stack of images; when this process cannot
    allocate it, a one-line :class:`DataError` with ``where``, the count, the size and the memory it needs."""
    try:
        t = torch.empty(shape, dtype=dtype)
        return t if fill is None else t.fill_(fill)
    except (MemoryError, RuntimeError) as exc:
        if not allocation_failed(exc):
            raise
        n, side = shape[0], shape[-1]
        gib = math.prod(shape) * torch.empty((), dtype=dtype).element_size() / 2**30
        raise DataError(f"{where}: {n} images at {side} x {side} need {gib:.1f} GiB in memory, more than this "
                        "process can allocate; use a smaller --image-size or fewer images") from None


def image_keys(images: torch.Tensor) -> list[bytes]:
    """SHA-256 of each image's pixels as read [N, C, S, S]: equal keys, equal images (the keys a
    model file records of the images its run trained on and set its thresholds on)."""
    return [hashlib.sha256(img.contiguous().numpy().tobytes()).digest() for img in images]


def read_images(
    paths: Iterable[str | os.PathLike],
    size: int,
    channels: int = 3,
    *,
    min_side: int | None = None,
    workers: int | None = None,
    where: str | os.PathLike = "images",
    sizes: list | None = None,
    warn: bool = True,
) -> torch.Tensor:
    """Read many image files into one uint8 tensor [N, channels, size, size].

    Files are read on a thread pool into a preallocated tensor (no second copy). All files are
    attempted; if any fail, one :class:`DataError` lists every bad file and its problem
    (``.problems`` holds the lines), with ``where`` (e.g. the folder) at the start of the message.
    ``sizes``: a list that receives each file's own (width, height), upright.
    ``warn=False``: no warning of few grey levels, float pixels or blank frames (files
    :func:`check_images` read before, and warned of).
    """
    paths = [Path(p) for p in paths]
    out = image_stack((len(paths), channels, size, size), where)
    few_levels, notes = _read_each(paths, size, channels, min_side, workers, where, sizes, out.__setitem__)
    if warn:
        warn_few_levels(few_levels, len(paths), where)
        warn_float_notes(notes, len(paths), where)
        warn_blank(out, paths, where, said=black_said(few_levels))
    return out


def _read_each(paths: list[Path], size: int, channels: int, min_side: int | None, workers: int | None,
               where: str | os.PathLike, sizes: list | None, keep: Callable[[int, torch.Tensor], Any]
               ) -> tuple[list[tuple[Path, int]], list[tuple[str, Path, str]]]:
    """Read each file of ``paths`` on a thread pool, handing image i to ``keep(i, image)`` (and its own
    (width, height) to ``sizes[i]``); one :class:`DataError` names every bad file. Returns the
    16-bit files of few levels (:func:`warn_few_levels`) and what the conversion of float pixels
    said (:func:`warn_float_notes`)."""
    if sizes is not None:
        sizes[:] = [None] * len(paths)
    few_levels: list[tuple[Path, int]] = []
    notes: list[tuple[str, Path, str]] = []

    def one(i: int) -> None:
        image, orig = _load_image(paths[i], size, channels, min_side, few_levels, notes)
        keep(i, image)
        if sizes is not None:
            sizes[i] = orig

    _, problems = run_collecting(one, len(paths), workers)
    raise_problems(problems, len(paths), "image files", where)
    return few_levels, notes


def check_images(
    paths: Sequence[str | os.PathLike],
    size: int,
    channels: int = 3,
    *,
    min_side: int | None = None,
    workers: int | None = None,
    where: str | os.PathLike = "images",
    sizes: list | None = None,
) -> None:
    """Read every file as :func:`read_images` does, keeping none of them: the same
    :class:`DataError` naming every bad file, the same warnings and ``sizes``, in the memory of a
    few images, for a set too large to hold (``predict`` then reads it again in parts, with
    ``warn=False``)."""
    paths = [Path(p) for p in paths]
    blank = [False] * len(paths)

    def keep(i: int, image: torch.Tensor) -> None:
        blank[i] = bool(blank_images(image.unsqueeze(0))[0])

    few_levels, notes = _read_each(paths, size, channels, min_side, workers, where, sizes, keep)
    warn_few_levels(few_levels, len(paths), where)
    warn_float_notes(notes, len(paths), where)
    warn_blank(blank, paths, where, said=black_said(few_levels))
