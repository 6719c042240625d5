"""Omniglot for few-shot learning: finding (or downloading) the data, caching it, the MAML split, task sampling.

Omniglot (Lake et al., 2015) has 1623 handwritten characters from 50 alphabets, 20 drawings each,
shipped as ``images_background.zip`` (964 characters) and ``images_evaluation.zip`` (659). The
first load decodes all 32,460 PNGs once with Pillow, resized (default 28x28, Lanczos, as Finn et
al. 2017 and learn2learn do) and cached as uint8 in ``~/.cache/binom_opt`` (``$XDG_CACHE_HOME`` is
honoured); later loads read the cache. Every zip is checked against the pinned SHA-256 of the
release before anything reads it (a download before it is saved, a zip put there by hand on first
use), and the cache records the digest it was decoded from. With 4400 / 400 / 1692 classes (1100 /
100 / 423 characters in four rotations) in the train / val / test splits:

>>> chars = OmniglotCharacters.load()  # doctest: +SKIP
>>> sampler = TaskSampler(chars.splits()["train"], ways=5, shots=1, queries=15,
...                       generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
>>> x_support, y_support, x_query, y_query = sampler.sample_batch(32)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import itertools
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

__all__ = ["ALLOW_MODIFIED_ENV", "CONTENT_SHA256", "DRAWINGS", "SPLITS", "ZIP_SHA256", "FewShotSplit", "OmniglotCharacters",
           "OmniglotChecksumError", "OmniglotDataError", "OmniglotNotFound", "TaskSampler", "allow_modified_data", "cache_file",
           "find_omniglot_root", "maml_split", "sha256_file", "user_cache"]

SPLITS = {"images_background": (30, 964), "images_evaluation": (20, 659)}
"""The two parts of the release: name -> (number of alphabets, number of characters)."""
DRAWINGS = 20
"""Drawings (by 20 different people) per character."""
SOURCE_SIZE = 105
"""Side of every Omniglot PNG, in pixels."""
MAML_SIZES = {"train": 1100, "val": 100, "test": 423}
"""Characters per split in the MAML protocol, in the order they are taken from the shuffled 1623."""
CACHE_VERSION = 3  # bump when the preprocessing changes, so that old cache files are not reused
URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
ZIP_SHA256 = {
    "images_background": {
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640": "the authors' release, 9,464,212 bytes",
        "a5fc79093341e8d800b1146ef11a64ff070ee16367f6c432810de6b9ba5341b3": "the same drawings repacked, 8,588,032 bytes",
    },
    "images_evaluation": {
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee": "the authors' release, 6,462,886 bytes",
        "a623286fa404ff48b7ae17a512cb5452423a971c5d2b095bf2d89eab8e5740c8": "the same drawings repacked, 5,863,926 bytes",
    },
}
"""The SHA-256 of each split's zip that is accepted: the authors' release that `URL` serves, and a deterministic
repack of the same PNG files (entries sorted, fixed timestamps, deflate level 9)."""
CONTENT_SHA256 = {
    "images_background": "deaa02f758afda524b3a045c7af40311f2d9ded3e2a39f715ece8470d474bc6a",
    "images_evaluation": "3d5e035f27423c362bf9a181af649b43cda64c1008f842177ddc5203269c901e",
}
"""What an extracted folder is checked against, having no zip to hash: the SHA-256 of the lines
``"<sha256 of the PNG>  <split>/<Alphabet>/<characterNN>/<IIII_DD>.png\\n"``, one per drawing, sorted by path."""
ALLOW_MODIFIED_ENV = "BINOM_OPT_ALLOW_MODIFIED_DATA"
"""Set to 1 to use Omniglot files whose digest is not the release's (as ``--allow-modified-data`` does)."""
# What zipfile raises for a truncated or damaged archive (bad headers, names, data or CRC).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, NotImplementedError)


class OmniglotDataError(RuntimeError):
    """The Omniglot files exist but are corrupt, truncated or incomplete."""


class OmniglotChecksumError(OmniglotDataError):
    """An Omniglot file's SHA-256 is not the release's: it is refused before anything reads it."""


class OmniglotNotFound(FileNotFoundError):
    """Omniglot is neither where it was looked for nor downloadable; the message gives the fixes."""


def user_cache(name: str = "") -> Path:
    """``~/.cache/binom_opt/<name>`` (or under ``$XDG_CACHE_HOME``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "binom_opt" / name


def _has_splits(root: Path) -> bool:
    return all((root / f"{s}.zip").is_file() or (root / s).is_dir() for s in SPLITS)


def find_omniglot_root(data_root: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The Omniglot folder: `data_root`, else ``$OMNIGLOT_ROOT``, else ``~/.cache/binom_opt/omniglot``.

    The folder holds ``images_background.zip`` and ``images_evaluation.zip`` (the canonical release), or
    the same extracted as folders. A path given (argument or environment) must hold them: it is
    reported, never silently replaced. With nothing given and nothing in the user cache,
    ``download=True`` fetches the release there (with a progress bar); nothing is created unless the
    download succeeds and both zips have the SHA-256 of :data:`ZIP_SHA256` (else
    :class:`OmniglotChecksumError`). Raises :class:`OmniglotNotFound` with the fixes otherwise.

    >>> find_omniglot_root("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fewshot.omniglot.OmniglotNotFound: Omniglot not found in /nonexistent (given as data_root): ...
    """
    given = [(data_root, "given as data_root"), (os.environ.get("OMNIGLOT_ROOT") or None, "from $OMNIGLOT_ROOT")]
    for path, origin in given:
        if path is not None:
            root = Path(path).expanduser()
            if not _has_splits(root):
                raise OmniglotNotFound(
                    f"Omniglot not found in {root} ({origin}): expected images_background.zip and images_evaluation.zip "
                    "(or the folders extracted from them). Point --data-root / $OMNIGLOT_ROOT at the folder that holds them."
                )
            return root
    root = user_cache("omniglot")
    if _has_splits(root):
        return root
    if not download:
        raise OmniglotNotFound(_fixes(root, "it is not there"))
    _download(root)
    return root


def _fixes(root: Path, why: str) -> str:
    return (
        f"Omniglot is needed in {root}, but {why}. Either (1) point --data-root or $OMNIGLOT_ROOT at a folder "
        f"holding images_background.zip and images_evaluation.zip (the canonical release, {URL.format('...')}), "
        f"or (2) run with internet access once, and the examples download them into {root} (--download)."
    )


def _download(root: Path) -> None:
    """Fetch the canonical zips into `root`: into a temporary folder first, moved into place once both arrived
    and have a pinned SHA-256, so that a failed or refused download leaves nothing behind."""
    with tempfile.TemporaryDirectory(prefix="omniglot_download_") as tmp:
        for split in SPLITS:
            url, target = URL.format(split), Path(tmp) / f"{split}.zip"
            try:
                _fetch(url, target, split)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                raise OmniglotNotFound(_fixes(root, f"downloading it failed ({error})")) from None
            digest = sha256_file(target)
            if digest not in ZIP_SHA256[split]:
                raise OmniglotChecksumError(
                    f"{split}.zip downloaded from {url} is not the Omniglot release: its SHA-256 is {digest} "
                    f"({target.stat().st_size:,} bytes), expected {_expected(split)}. It was discarded and nothing was "
                    f"written to {root}. The transfer was cut short, or the file was changed on the way or at its source: "
                    "run again, or get the zips elsewhere, check their SHA-256 (docs/data.md lists them) and point "
                    "--data-root or $OMNIGLOT_ROOT at them.")
        root.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            shutil.move(str(Path(tmp) / f"{split}.zip"), root / f"{split}.zip")


def _fetch(url: str, target: Path, split: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {split}.zip", leave=False) as bar:
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                bar.update(len(block))


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _expected(split: str) -> str:
    return " or ".join(f"{digest} ({what})" for digest, what in ZIP_SHA256[split].items())


def allow_modified_data(allow: bool = False) -> bool:
    """Whether Omniglot files whose digest is not the release's may be used: `allow`, or ``$BINOM_OPT_ALLOW_MODIFIED_DATA``
    set to 1 (or true, yes)."""
    return allow or os.environ.get(ALLOW_MODIFIED_ENV, "").strip().lower() in ("1", "true", "yes")


def _stamp(root: Path, split: str) -> str:
    """One state of a split's zip (its real path, size, modification and change times): while it holds, the digest the
    cache recorded stands and the zip is not hashed again. An extracted folder has none ("") and is hashed each time."""
    zip_path = root / f"{split}.zip"
    if not zip_path.is_file():
        return ""
    stat = zip_path.stat()
    return f"{zip_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"


def _source_sha256(root: Path, split: str) -> str:
    """The SHA-256 of a split's zip, else of its extracted folder's drawings (as :data:`CONTENT_SHA256`)."""
    zip_path = root / f"{split}.zip"
    if zip_path.is_file():
        return sha256_file(zip_path)
    with _open_split(root, split) as (_, names, read):
        lines = [f"{hashlib.sha256(read(name)).hexdigest()}  {split}/{name}\n" for name in sorted(names)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _accepted(split: str, digest: str) -> bool:
    return digest in ZIP_SHA256[split] or digest == CONTENT_SHA256[split]


def _check_source(source: Path, split: str, digest: str, allow_modified: bool) -> None:
    """Refuse (or, when allowed, warn about) a zip or extracted folder whose digest is not the release's."""
    if _accepted(split, digest):
        return
    if source.is_file():
        digest, expected = f"{digest} ({source.stat().st_size:,} bytes)", _expected(split)
    else:
        expected = f"{CONTENT_SHA256[split]} (the release's drawings)"
    _refuse(f"{source} is not the Omniglot release: its SHA-256 is {digest}, expected {expected}.",
            f"It is truncated, damaged or changed: replace it with the release ({URL.format(split)})", allow_modified)


def _refuse(problem: str, fix: str, allow_modified: bool) -> None:
    if allow_modified:
        warnings.warn(f"{problem} Using it as a locally modified copy (--allow-modified-data or ${ALLOW_MODIFIED_ENV}).",
                      UserWarning, stacklevel=3)
        return
    raise OmniglotChecksumError(f"{problem} {fix}. To use a copy you modified on purpose, pass --allow-modified-data "
                                f"(allow_modified=True) or set {ALLOW_MODIFIED_ENV}=1.")


def _source_root(data_root: str | os.PathLike | None, download: bool, needed: bool) -> Path | None:
    """The data root; when every split is cached (not `needed`), None if there is none, as the cache serves alone."""
    if needed:
        return find_omniglot_root(data_root, download=download)
    try:
        return find_omniglot_root(data_root)
    except OmniglotNotFound:
        return None


def _verified_source(root: Path, split: str, cached: _Part | None, allow_modified: bool) -> tuple[str, str]:
    """``(sha256, stamp)`` of a split's source, checked: hashed unless the stamp is the one the cache recorded."""
    stamp = _stamp(root, split)
    unchanged = bool(stamp) and cached is not None and cached.stamp == stamp
    digest = cached.sha256 if unchanged else _source_sha256(root, split)
    zip_path = root / f"{split}.zip"
    _check_source(zip_path if zip_path.is_file() else root / split, split, digest, allow_modified)
    return digest, stamp


@contextlib.contextmanager
def _open_split(root: Path, split: str):
    """Yield ``(source, names, read)`` for one split: the zip (preferred: complete or unreadable) or the
    extracted folder, the sorted ``Alphabet/characterNN/IIII_DD.png`` names, and ``read(name) -> bytes``."""
    zip_path = root / f"{split}.zip"
    if not zip_path.is_file():
        folder = root / split
        names = [p.relative_to(folder).as_posix() for p in folder.glob("*/*/*.png")]
        yield folder, sorted(names, key=_path_key), lambda name: (folder / name).read_bytes()
        return
    try:
        with zipfile.ZipFile(zip_path) as archive:
            prefix = f"{split}/"
            names = [n[len(prefix):] for n in archive.namelist() if n.startswith(prefix)]
            names = [n for n in names if n.endswith(".png") and n.count("/") == 2]  # skips folder entries
            yield zip_path, sorted(names, key=_path_key), lambda name: archive.read(prefix + name)
    except _ZIP_ERRORS as e:
        raise OmniglotDataError(f"{zip_path} is corrupt or truncated ({type(e).__name__}: {e}). Delete it and download "
                                "it again.") from e


def _path_key(name: str) -> list[str]:
    """Sort by path components, so that each character's files are contiguous and in folder order."""
    return name.split("/")


def _character_of(name: str) -> str:
    return name.rsplit("/", 1)[0]


def _check_counts(split: str, source: Path, names: list[str]) -> None:
    per_character = Counter(_character_of(n) for n in names)
    alphabets = {c.split("/")[0] for c in per_character}
    n_alphabets, n_characters = SPLITS[split]
    if (len(alphabets), len(per_character), set(per_character.values())) != (n_alphabets, n_characters, {DRAWINGS}):
        raise OmniglotDataError(
            f"{source} does not hold the complete Omniglot {split}: expected {n_alphabets} alphabets and {n_characters} "
            f"characters with {DRAWINGS} drawings each, found {len(alphabets)} alphabets, {len(per_character)} "
            f"characters and {len(names)} PNGs. Delete it and download it again."
        )


def _decode_split(root: Path, split: str, image_size: int, progress: bool) -> tuple[np.ndarray, list[str]]:
    """Decode one split to (characters, 20, size, size) uint8 with 255 = ink, and the character names."""
    with _open_split(root, split) as (source, names, read):
        _check_counts(split, source, names)
        groups = tqdm(itertools.groupby(names, key=_character_of), total=SPLITS[split][1], desc=f"decoding {split}",
                      unit="character", leave=False, disable=not progress)
        characters, images = [], []
        for character, files in groups:
            characters.append(character)
            images.append(np.stack([_decode(source, f, read(f), image_size) for f in files]))
    return np.stack(images), characters


def _decode(source: Path, name: str, data: bytes, image_size: int) -> np.ndarray:
    """One drawing as ink (255 = ink) at ``image_size``: Pillow's Lanczos resize, the preprocessing of Finn et al.
    (2017) and learn2learn, inverted so that the background is 0."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (SOURCE_SIZE, SOURCE_SIZE):
                raise OmniglotDataError(f"{source}: {name} is {image.size}, expected {SOURCE_SIZE}x{SOURCE_SIZE}")
            resized = image.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
            return 255 - np.asarray(resized, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise OmniglotDataError(f"{source}: cannot decode {name} ({e}). Delete it and download it again.") from e


def cache_file(cache_dir: str | os.PathLike, split: str, image_size: int) -> Path:
    """The cache file of one split at one image size.

    >>> cache_file("/tmp/cache", "images_background", 28).name
    'omniglot_images_background_28px_v3.npz'
    """
    return Path(cache_dir) / f"omniglot_{split}_{image_size}px_v{CACHE_VERSION}.npz"


class _Part(NamedTuple):
    """One split decoded: the images, the character names, and the digest and stamp of the source it came from."""

    images: np.ndarray
    characters: list[str]
    sha256: str
    stamp: str


def _read_cache(path: Path, split: str, image_size: int, verbose: bool) -> _Part | None:
    """The cached split, or None if absent, unreadable or made without a record of its source."""
    if not path.is_file():
        return None
    expected = (SPLITS[split][1], DRAWINGS, image_size, image_size)
    try:
        with np.load(path, allow_pickle=False) as cached:
            if "source_sha256" not in cached:
                raise ValueError("it does not record the SHA-256 of the data it was decoded from")
            part = _Part(cached["images"], cached["characters"].tolist(), str(cached["source_sha256"]), str(cached["source_stamp"]))
        if part.images.shape != expected or part.images.dtype != np.uint8 or len(part.characters) != expected[0]:
            raise ValueError(f"holds {part.images.dtype} {part.images.shape}, expected uint8 {expected}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        if verbose:
            print(f"Ignoring the cache file {path} ({e}); rebuilding it.", file=sys.stderr)
        return None
    return part


def _write_cache(path: Path, part: _Part) -> None:
    write_npz(path, compressed=True, images=part.images, characters=np.array(part.characters),
              source_sha256=np.array(part.sha256), source_stamp=np.array(part.stamp))


def write_npz(path: Path, compressed: bool, **arrays: np.ndarray) -> None:
    """Write an ordinary file (the umask's mode) under a temporary name, then rename it: a crash never leaves
    half a cache, and processes writing the same cache at once (the ranks of a torchrun on a cold cache) each
    write their own file, the last rename winning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            (np.savez_compressed if compressed else np.savez)(out, **arrays)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def maml_split(seed: int = 0) -> dict[str, np.ndarray]:
    """Character indices (into the 1623 of :class:`OmniglotCharacters`) of the MAML protocol split.

    As Finn et al. (2017): shuffle all 1623 characters with a fixed seed, keep the first 1200 for
    meta-training (the last 100 of those held out for validation), the other 423 for meta-testing.
    Uses its own ``numpy.random.default_rng(seed)``, never the global random state.

    >>> {name: len(indices) for name, indices in maml_split(seed=0).items()}
    {'train': 1100, 'val': 100, 'test': 423}
    """
    order = np.random.default_rng(seed).permutation(sum(n for _, n in SPLITS.values()))
    bounds = np.cumsum([0, *MAML_SIZES.values()])
    return {name: np.sort(order[a:b]) for name, a, b in zip(MAML_SIZES, bounds[:-1], bounds[1:])}


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class OmniglotCharacters:
    """All 1623 Omniglot characters, background ones first, each part sorted by alphabet and character.

    `images` is uint8 (1623, 20, size, size) with 255 = ink, 0 = background; per character,
    `alphabets` and `characters` give its folder names and `origins` its part of the release.
    """

    images: torch.Tensor
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]
    origins: tuple[str, ...]

    def __repr__(self) -> str:
        count, drawings, height, width = self.images.shape
        return f"OmniglotCharacters({count} characters x {drawings} drawings, {height}x{width})"

    @classmethod
    def load(cls, data_root: str | os.PathLike | None = None, *, image_size: int = 28, cache_dir: str | os.PathLike | None = None,
             download: bool = False, verbose: bool = True, allow_modified: bool = False) -> OmniglotCharacters:
        """Load from the cache in `cache_dir` (default ``~/.cache/binom_opt``), building it on first use.

        `data_root` and `download` are as in :func:`find_omniglot_root`. Each split's source is checked against
        :data:`ZIP_SHA256` (an extracted folder against :data:`CONTENT_SHA256`) on first use and whenever it changed,
        and the cache is rebuilt when the source is not the one it was decoded from. A digest that is not the
        release's raises :class:`OmniglotChecksumError`, or only warns with `allow_modified` (or
        ``$BINOM_OPT_ALLOW_MODIFIED_DATA=1``). Building the cache decodes every PNG once (with a progress bar when
        `verbose`). Raises OmniglotDataError for corrupt, truncated or incomplete data.
        """
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        allow_modified = allow_modified_data(allow_modified)
        cache_dir = Path(cache_dir) if cache_dir is not None else user_cache()
        paths = {split: cache_file(cache_dir, split, image_size) for split in SPLITS}
        parts = {split: _read_cache(path, split, image_size, verbose) for split, path in paths.items()}
        root = _source_root(data_root, download, needed=any(part is None for part in parts.values()))
        sources = {}
        for split, part in parts.items():
            if root is None:  # all cached, the source gone: the digest the cache recorded decides
                if not _accepted(split, part.sha256):
                    _refuse(f"{paths[split]} was decoded from a copy of {split} whose SHA-256 {part.sha256} is not the "
                            "release's, and that copy is no longer there.", "Delete it to decode the release again", allow_modified)
                continue
            sources[split] = _verified_source(root, split, part, allow_modified)
            if part is not None and part.sha256 != sources[split][0]:
                if verbose:
                    print(f"The Omniglot {split} in {root} is not the one {paths[split]} was decoded from; rebuilding it.",
                          file=sys.stderr)
                parts[split] = None
        todo = [split for split, part in parts.items() if part is None]
        if todo:
            if verbose:
                print(f"Decoding the {sum(SPLITS[s][1] for s in todo) * DRAWINGS:,} Omniglot drawings once into {cache_dir} "
                      "(later runs read them from there)", file=sys.stderr)
            for split in todo:
                parts[split] = _Part(*_decode_split(root, split, image_size, progress=verbose), *sources[split])
                _write_cache(paths[split], parts[split])
        names = [(name, split) for split in SPLITS for name in parts[split].characters]
        return cls(
            images=torch.from_numpy(np.concatenate([parts[split].images for split in SPLITS])),
            alphabets=tuple(name.split("/")[0] for name, _ in names),
            characters=tuple(name.split("/")[1] for name, _ in names),
            origins=tuple(split for _, split in names),
        )

    def splits(self, seed: int = 0, rotations: bool = True) -> dict[str, FewShotSplit]:
        """The ``"train"``, ``"val"`` and ``"test"`` :class:`FewShotSplit` of :func:`maml_split`."""
        return {name: FewShotSplit(self.images[indices], rotations=rotations, characters=indices)
                for name, indices in maml_split(seed).items()}


class FewShotSplit:
    """The classes of one split: each character and, with ``rotations=True``, its rotations by 90,
    180 and 270 degrees as further classes (the augmentation of Santoro et al. 2016 and Finn et al. 2017).

    `images` is uint8 (characters, drawings, size, size); class ``c`` is character ``c // 4`` turned
    counter-clockwise ``c % 4`` times (``c`` itself without rotations).

    >>> split = FewShotSplit(torch.zeros(3, 20, 28, 28, dtype=torch.uint8))
    >>> split.num_classes, split.drawings
    (12, 20)
    """

    def __init__(self, images: torch.Tensor, rotations: bool = True, characters: np.ndarray | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be uint8 of shape (characters, drawings, size, size), got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.images, self.turns, self.characters = images, 4 if rotations else 1, characters

    @property
    def num_classes(self) -> int:
        return len(self.images) * self.turns

    @property
    def drawings(self) -> int:
        return self.images.shape[1]

    @property
    def counts(self) -> np.ndarray:
        """Drawings per class: 20 for every class."""
        return np.full(self.num_classes, self.drawings)

    def class_images(self, classes: torch.Tensor, drawings: torch.Tensor) -> torch.Tensor:
        """uint8 (len(classes), drawings.shape[1], size, size): drawings ``drawings[i]`` of ``classes[i]``
        (moved in numpy: on a task's few images torch's thread pool costs more than it saves)."""
        characters, turns = (classes // self.turns).numpy(), (classes % self.turns).numpy()
        images = self.images.numpy()[characters[:, None], drawings.numpy()]
        for k in range(1, self.turns):
            images[turns == k] = np.rot90(images[turns == k], k, axes=(-2, -1))
        return torch.from_numpy(images)


class TaskSampler:
    """N-way K-shot tasks from a :class:`FewShotSplit` (or an ``ImageSplit`` of :mod:`fewshot.imagenet`), with
    all randomness from `generator`.

    Each task draws `ways` distinct classes and, per class, `shots + queries` distinct drawings, so
    support and query never share an image. Class ``i`` of the task gets label ``i``. Images are
    float32 in [0, 1] (for Omniglot 1 = ink) of shape (channels, size, size), laid out class by class.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the generator for resuming.

    >>> split = FewShotSplit(torch.randint(0, 256, (10, 20, 28, 28), dtype=torch.uint8))
    >>> sampler = TaskSampler(split, ways=5, shots=1, queries=15, generator=torch.Generator().manual_seed(0))
    >>> [tuple(t.shape) for t in sampler.sample()]
    [(5, 1, 28, 28), (5,), (75, 1, 28, 28), (75,)]
    >>> tuple(sampler.sample_batch(4)[0].shape)
    (4, 5, 1, 28, 28)
    """

    def __init__(self, split: FewShotSplit, ways: int, shots: int, queries: int, generator: torch.Generator):
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if ways > split.num_classes:
            raise ValueError(f"ways={ways} exceeds the {split.num_classes} classes of the split")
        if shots + queries > split.counts.min():
            raise ValueError(f"shots + queries = {shots + queries} exceeds the {split.counts.min()} images of the smallest class")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.split, self.generator = split, generator
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One task: x_support (ways*shots, 1, S, S), y_support (ways*shots,), x_query, y_query."""
        return tuple(torch.from_numpy(part) for part in self._task())

    def sample_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`batch_size` tasks stacked along a new leading dimension."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tasks = [self._task() for _ in range(batch_size)]
        return tuple(torch.from_numpy(np.stack(parts)) for parts in zip(*tasks))

    def _task(self) -> tuple[np.ndarray, ...]:
        g, ways, shots = self.generator, self.ways, self.shots
        classes = torch.randperm(self.split.num_classes, generator=g)[:ways]
        counts = self.split.counts[classes.numpy()]
        drawings = torch.stack([torch.randperm(int(n), generator=g)[:shots + self.queries] for n in counts])
        images = self.split.class_images(classes, drawings).numpy()
        images = (images[:, :, None] if images.ndim == 4 else images).astype(np.float32) / 255  # grayscale: add a channel
        labels = np.broadcast_to(np.arange(ways, dtype=np.int64)[:, None], drawings.shape)
        shape = images.shape[2:]
        return (images[:, :shots].reshape(-1, *shape), labels[:, :shots].flatten(),
                images[:, shots:].reshape(-1, *shape), labels[:, shots:].flatten())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
