"""Omniglot for few-shot learning: finding (or downloading) the data, caching it, the MAML split, task sampling.

Omniglot (Lake et al., 2015) has 1623 handwritten characters from 50 alphabets, 20 drawings each,
shipped as ``images_background.zip`` (964 characters) and ``images_evaluation.zip`` (659). The
first load decodes all 32,460 PNGs once with Pillow, resized (default 28x28, Lanczos, as Finn et
al. 2017 and learn2learn do) and cached as uint8 in ``~/.cache/binom_opt`` (``$XDG_CACHE_HOME`` is
honoured); later loads read the cache. With 4400 / 400 / 1692 classes (1100 / 100 / 423 characters
in four rotations) in the train / val / test splits:

>>> chars = OmniglotCharacters.load()  # doctest: +SKIP
>>> sampler = TaskSampler(chars.splits()["train"], ways=5, shots=1, queries=15,
...                       generator=torch.Generator().manual_seed(0))  # doctest: +SKIP
>>> x_support, y_support, x_query, y_query = sampler.sample_batch(32)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

__all__ = ["DRAWINGS", "SPLITS", "FewShotSplit", "OmniglotCharacters", "OmniglotDataError", "OmniglotNotFound", "TaskSampler",
           "cache_file", "find_omniglot_root", "maml_split", "user_cache"]

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
# What zipfile raises for a truncated or damaged archive (bad headers, names, data or CRC).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError, NotImplementedError)


class OmniglotDataError(RuntimeError):
    """The Omniglot files exist but are corrupt, truncated or incomplete."""


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
    download succeeds. Raises :class:`OmniglotNotFound` with the fixes otherwise.

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
    """Fetch the canonical zips into `root`: into a temporary folder first, moved into place once all arrived
    and were checked, so that a failed download leaves nothing behind."""
    with tempfile.TemporaryDirectory(prefix="omniglot_download_") as tmp:
        for split in SPLITS:
            url, target = URL.format(split), Path(tmp) / f"{split}.zip"
            try:
                with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {split}.zip", leave=False) as bar:
                        for block in iter(lambda: response.read(1 << 16), b""):
                            out.write(block)
                            bar.update(len(block))
                with _open_split(Path(tmp), split) as (source, names, _):
                    _check_counts(split, source, names)
            except (urllib.error.URLError, OSError, OmniglotDataError) as error:
                raise OmniglotNotFound(_fixes(root, f"downloading it failed ({error})")) from None
        root.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            shutil.move(str(Path(tmp) / f"{split}.zip"), root / f"{split}.zip")


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


def _read_cache(path: Path, split: str, image_size: int, verbose: bool) -> tuple[np.ndarray, list[str]] | None:
    """The cached ``(images, character names)`` of one split, or None if absent or unreadable."""
    if not path.is_file():
        return None
    expected = (SPLITS[split][1], DRAWINGS, image_size, image_size)
    try:
        with np.load(path) as cached:
            images, characters = cached["images"], cached["characters"].tolist()
        if images.shape != expected or images.dtype != np.uint8 or len(characters) != expected[0]:
            raise ValueError(f"holds {images.dtype} {images.shape}, expected uint8 {expected}")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        if verbose:
            print(f"Ignoring unreadable cache file {path} ({e}); rebuilding it.", file=sys.stderr)
        return None
    return images, characters


def _write_cache(path: Path, images: np.ndarray, characters: list[str]) -> None:
    write_npz(path, compressed=True, images=images, characters=np.array(characters))


def write_npz(path: Path, compressed: bool, **arrays: np.ndarray) -> None:
    """Write an ordinary file (the umask's mode) under a temporary name, then rename it: a crash never leaves
    half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
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
             download: bool = False, verbose: bool = True) -> OmniglotCharacters:
        """Load from the cache in `cache_dir` (default ``~/.cache/binom_opt``), building it on first use.

        `data_root` and `download` are as in :func:`find_omniglot_root`. Building the cache decodes every
        PNG once (with a progress bar when `verbose`). Raises OmniglotDataError for corrupt, truncated
        or incomplete data.
        """
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        cache_dir = Path(cache_dir) if cache_dir is not None else user_cache()
        paths = {split: cache_file(cache_dir, split, image_size) for split in SPLITS}
        parts = {split: _read_cache(path, split, image_size, verbose) for split, path in paths.items()}
        todo = [split for split, part in parts.items() if part is None]
        if todo:
            root = find_omniglot_root(data_root, download=download)
            if verbose:
                print(f"Decoding the {sum(SPLITS[s][1] for s in todo) * DRAWINGS:,} Omniglot drawings once into {cache_dir} "
                      "(later runs read them from there)", file=sys.stderr)
            for split in todo:
                parts[split] = _decode_split(root, split, image_size, progress=verbose)
                _write_cache(paths[split], *parts[split])
        names = [(name, split) for split in SPLITS for name in parts[split][1]]
        return cls(
            images=torch.from_numpy(np.concatenate([parts[split][0] for split in SPLITS])),
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
