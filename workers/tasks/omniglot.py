"""Omniglot N-way K-shot classification (Lake et al., 2015), as in MAML (Finn et al., 2017, section 5.2).

Data: ``images_background.zip`` and ``images_evaluation.zip`` of the official release (1,623
characters, 20 drawings each, 105x105 black-and-white PNG), read from ``task.path`` or else the
data root its caller passes (the folder itself, or its ``omniglot/`` sub-folder).

Pixels: every image goes through :func:`preprocess_image` (grey, resized to ``image_size`` with
LANCZOS as the MAML reference's resize script, inverted): ink is 1.0, paper is 0.0, values in [0, 1].
The service uses the same function for uploaded images, so they match training exactly.

Cache: the zips are decoded once per ``image_size`` into ``cache_dir`` as
``omniglot_{S}px_{fingerprint}.npy`` (uint8, (characters, 20, S, S), ink = 255) plus a ``.json``
naming the characters; the fingerprint hashes the zips' member names, CRCs and sizes, so other data
gets another cache. Files are written to a temporary name and renamed, under a file lock, so
concurrent workers build it once. Later loads memory-map the ``.npy``; one process shares one array.

Splits (characters in a fixed order: background before evaluation, then alphabet, then character):
  * ``paper``: shuffled with ``numpy.random.default_rng(0)``; the first 1,200 to meta-train, the
    other 423 to meta-test. Each character rotated by 0/90/180/270 degrees gives 4 classes (4,800
    train, 1,692 test). A smaller data set keeps the proportion: round(n * 1200 / 1623) to train.
  * ``official``: the background alphabets (964 characters) to meta-train, the evaluation
    alphabets (659) to meta-test, without rotations (the protocol of Lake et al.).
  * ``val`` is the test characters in both (the task coordinates differ, so the tasks do too):
    the paper trains on all 1,200 characters and holds out no third set.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import posixpath
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from workers.errors import DatasetError
from workers.spec import OmniglotTask
from workers.tasks.base import Split, to_tensor
from workers.tasks.episodes import EpisodeFamily, shuffled_parts, square_pixels

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps the cache whole
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ZIPS = ("images_background.zip", "images_evaluation.zip")
DRAWINGS = 20  # per character
PAPER_CHARACTERS, PAPER_TRAIN = 1623, 1200
_CACHE_VERSION = 1
_HOW_TO_SET = ("set the task's `path` field to the folder that holds images_background.zip and "
               "images_evaluation.zip, or the data root setting (MAML_DATA_ROOT for the service, "
               "--data-root for python -m workers)")


class OmniglotData(NamedTuple):
    images: np.ndarray  # (characters, 20, S, S) uint8, ink = 255, paper = 0
    characters: tuple[str, ...]  # "images_background/<Alphabet>/characterNN", background ones first
    background: int  # how many of the characters come from images_background.zip


# ---------------------------------------------------------------------------------------------- pixels


def preprocess_array(img: Image.Image, image_size: int) -> np.ndarray:
    """An image as Omniglot training sees it: (S, S) uint8, ink = 255 and paper = 0.

    A transparent background is paper: it turns white, then 0 once inverted.
    """
    return 255 - square_pixels(img, image_size, "L")


def preprocess_image(img: Image.Image, image_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (1, S, S) tensor in [0, 1], ink = 1.0: exactly what the model saw in training."""
    return to_tensor(preprocess_array(img, image_size), dtype).unsqueeze(0)


# ----------------------------------------------------------------------------------------------- files


def find_folder(path: str | None, data_root: Path | None) -> Path:
    """The folder holding both zips: ``task.path`` if given, else the data root (or its omniglot/)."""
    if path is not None:
        candidates = [Path(path).expanduser()]
    elif data_root is not None:
        candidates = [Path(data_root).expanduser(), Path(data_root).expanduser() / "omniglot"]
    else:
        raise DatasetError("task.path", f"no Omniglot folder is configured; {_HOW_TO_SET}")
    for folder in candidates:
        if all((folder / name).is_file() for name in ZIPS):
            return folder
    looked = []
    for folder in candidates:
        if not folder.is_dir():
            looked.append(f"{folder} (no such folder)")
        else:
            missing = [name for name in ZIPS if not (folder / name).is_file()]
            looked.append(f"{folder} (missing {', '.join(missing)})")
    raise DatasetError("task.path", f"Omniglot not found; looked in {'; '.join(looked)}; {_HOW_TO_SET}")


def _png_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    return [info for info in archive.infolist()
            if not info.is_dir() and info.filename.lower().endswith(".png")
            and not posixpath.basename(info.filename).startswith(".")
            and "__MACOSX" not in info.filename]


_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(folder: Path) -> str:
    """A hash of the zips' member names, CRCs and sizes: a cache key that follows the content."""
    stats = tuple((str((folder / name).resolve()), (folder / name).stat().st_size,
                   (folder / name).stat().st_mtime_ns) for name in ZIPS)
    if stats not in _FINGERPRINTS:
        digest = hashlib.sha256(f"omniglot-v{_CACHE_VERSION}".encode())
        for name in ZIPS:
            digest.update(name.encode())
            with _open_zip(folder / name) as archive:
                for info in sorted(_png_members(archive), key=lambda i: i.filename):
                    digest.update(f"{info.filename}\0{info.CRC}\0{info.file_size}\n".encode())
        _FINGERPRINTS[stats] = digest.hexdigest()[:16]
    return _FINGERPRINTS[stats]


@contextlib.contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError("task.path", f"cannot read {path} as a zip file: {exc}") from exc
    with archive:
        yield archive


def decode_zips(folder: Path, image_size: int) -> OmniglotData:
    """Decode and resize every drawing of both zips (the slow path, run once per cache)."""
    start = time.perf_counter()
    characters: list[str] = []
    blocks: list[np.ndarray] = []
    background = 0
    for name in ZIPS:
        with _open_zip(folder / name) as archive:
            by_character: dict[str, list[zipfile.ZipInfo]] = {}
            for info in _png_members(archive):
                by_character.setdefault(posixpath.dirname(info.filename), []).append(info)
            if not by_character:
                raise DatasetError("task.path", f"{folder / name} holds no PNG images")
            for character in sorted(by_character):
                members = sorted(by_character[character], key=lambda i: i.filename)
                if len(members) != DRAWINGS:
                    raise DatasetError("task.path", f"{folder / name}: {character} has {len(members)} "
                                       f"drawings, expected {DRAWINGS}")
                block = np.empty((DRAWINGS, image_size, image_size), dtype=np.uint8)
                for j, info in enumerate(members):
                    try:
                        with Image.open(io.BytesIO(archive.read(info))) as img:
                            block[j] = preprocess_array(img, image_size)
                    except (OSError, ValueError, zipfile.BadZipFile) as exc:
                        raise DatasetError("task.path", f"cannot decode {info.filename} in "
                                           f"{folder / name}: {exc}") from exc
                characters.append(character)
                blocks.append(block)
        if name == ZIPS[0]:
            background = len(characters)
    log.info("decoded %d Omniglot characters at %dpx in %.1fs", len(characters), image_size,
             time.perf_counter() - start)
    return OmniglotData(np.stack(blocks), tuple(characters), background)


# ----------------------------------------------------------------------------------------------- cache

_MEMORY: dict[Path, OmniglotData] = {}
_MEMORY_LOCK = threading.Lock()


def clear_memory_cache() -> None:
    """Forget the arrays loaded in this process (the files on disk stay)."""
    with _MEMORY_LOCK:
        _MEMORY.clear()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache dir must be readable by every worker
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_cache(npy: Path, meta_path: Path, image_size: int) -> OmniglotData | None:
    """The cached data, or None when it is absent or does not match its description."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable Omniglot cache %s: %s", npy, exc)
        return None
    characters = tuple(meta.get("characters", ()))
    if (meta.get("version") != _CACHE_VERSION or images.dtype != np.uint8
            or images.shape != (len(characters), DRAWINGS, image_size, image_size)):
        log.warning("ignoring an Omniglot cache that does not match its description: %s", npy)
        return None
    return OmniglotData(images, characters, int(meta["background"]))


def load_omniglot(folder: Path, image_size: int, cache_dir: Path | None) -> OmniglotData:
    """Both zips as one array, from this process's memory, the disk cache, or decoded (then cached).

    Without ``cache_dir`` nothing is written: the zips are decoded once per process.
    """
    stem = f"omniglot_{image_size}px_{fingerprint(folder)}"
    if cache_dir is None:
        key = folder.resolve() / stem  # one decoded copy per process and content
        with _MEMORY_LOCK:
            if key not in _MEMORY:
                log.warning("no Omniglot cache folder is configured: decoding the zips in this process")
                _MEMORY[key] = decode_zips(folder, image_size)
            return _MEMORY[key]
    npy, meta_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    with _MEMORY_LOCK:
        if npy in _MEMORY:
            return _MEMORY[npy]
        data = _read_cache(npy, meta_path, image_size)
        if data is None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with _file_lock(cache_dir / f"{stem}.lock"):
                data = _read_cache(npy, meta_path, image_size)  # another process may have built it
                if data is None:
                    built = decode_zips(folder, image_size)
                    # The .json is written last: its presence means the .npy beside it is complete.
                    _write_atomic(npy, lambda f: np.save(f, built.images))
                    meta = {"version": _CACHE_VERSION, "image_size": image_size, "source": str(folder),
                            "background": built.background, "characters": list(built.characters)}
                    _write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
                    log.info("cached Omniglot at %s", npy)
                    data = _read_cache(npy, meta_path, image_size) or built
        _MEMORY[npy] = data
        return data


# ---------------------------------------------------------------------------------------------- splits


def split_characters(data: OmniglotData, split: str) -> dict[str, np.ndarray]:
    """Character indices of each split ("train", "test"; "val" is "test"). See the module docstring."""
    n = len(data.characters)
    if split == "official":
        train, test = np.arange(data.background), np.arange(data.background, n)
    else:
        n_train = min(max(round(n * PAPER_TRAIN / PAPER_CHARACTERS), 1), n - 1)
        train, test = shuffled_parts(n, [n_train])
    return {"train": train, "val": test, "test": test}


def split_classes(characters: np.ndarray, rotations: int) -> np.ndarray:
    """(classes, 2) rows of (character index, quarter turns): each rotation a class of its own."""
    turns = np.tile(np.arange(rotations), len(characters))
    return np.stack([np.repeat(characters, rotations), turns], axis=1)


class OmniglotFamily(EpisodeFamily):
    """N-way K-shot Omniglot tasks; a class is a (character, quarter turns) row of ``classes``."""

    spec: OmniglotTask

    def __init__(self, spec: OmniglotTask, *, data_root: Path | None, cache_dir: Path | None,
                 dtype: torch.dtype = torch.float32) -> None:
        if spec.shots + spec.queries > DRAWINGS:
            raise DatasetError("task.shots", f"shots + queries = {spec.shots + spec.queries}: Omniglot has "
                               f"only {DRAWINGS} drawings per character")
        super().__init__(spec, (1, spec.image_size, spec.image_size), dtype)
        self.folder = find_folder(spec.path, data_root)
        cache = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.data = load_omniglot(self.folder, spec.image_size, cache)
        self.characters = split_characters(self.data, spec.split)
        self.classes = split_counts_checked(spec, self.folder, self.characters)

    def class_sizes(self, split: Split) -> list[int]:
        return [DRAWINGS] * len(self.classes[split])

    def load_examples(self, split: Split, c: int, items: np.ndarray) -> np.ndarray:
        character, turns = self.classes[split][c]
        drawings = np.rot90(self.data.images[character, items], k=int(turns), axes=(1, 2))
        return drawings[:, None]  # (len(items), 1, S, S)


def split_counts_checked(spec: OmniglotTask, folder: Path, characters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The classes of each split (each rotation of a character a class); DatasetError when a split
    is empty or has fewer classes than ``spec.ways``."""
    if any(len(chars) == 0 for chars in characters.values()):
        sizes = ", ".join(f"{name} {len(chars)}" for name, chars in characters.items() if name != "val")
        raise DatasetError("task.path", f"{folder}: too few characters to split ({sizes})")
    rotations = 4 if spec.split == "paper" else 1
    classes = {name: split_classes(chars, rotations) for name, chars in characters.items()}
    for name in ("train", "test"):
        if len(classes[name]) < spec.ways:
            raise DatasetError("task.ways", f"{spec.ways}-way tasks need {spec.ways} classes, but the "
                               f"'{name}' half of the {spec.split} split has only {len(classes[name])}")
    return classes


def check(spec: OmniglotTask, data_root: Path | None) -> None:
    """Everything :class:`OmniglotFamily` checks, from the zips' listings alone: no drawing is
    decoded and nothing of the data's size is allocated (the control plane's check at submission)."""
    if spec.shots + spec.queries > DRAWINGS:
        raise DatasetError("task.shots", f"shots + queries = {spec.shots + spec.queries}: Omniglot has "
                           f"only {DRAWINGS} drawings per character")
    folder = find_folder(spec.path, data_root)
    count, background = count_characters(folder)
    shape_only = OmniglotData(np.empty((count, 0, 0, 0), np.uint8), ("",) * count, background)
    split_counts_checked(spec, folder, split_characters(shape_only, spec.split))


def count_characters(folder: Path) -> tuple[int, int]:
    """(characters, of which in the background zip) from the zips' listings, each character checked
    to have its 20 drawings, as :func:`decode_zips` finds them."""
    count, background = 0, 0
    for name in ZIPS:
        with _open_zip(folder / name) as archive:
            by_character: dict[str, int] = {}
            for info in _png_members(archive):
                character = posixpath.dirname(info.filename)
                by_character[character] = by_character.get(character, 0) + 1
        if not by_character:
            raise DatasetError("task.path", f"{folder / name} holds no PNG images")
        for character, drawings in sorted(by_character.items()):
            if drawings != DRAWINGS:
                raise DatasetError("task.path", f"{folder / name}: {character} has {drawings} drawings, "
                                   f"expected {DRAWINGS}")
        count += len(by_character)
        if name == ZIPS[0]:
            background = count
    return count, background
