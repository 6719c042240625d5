"""miniImageNet and tieredImageNet for few-shot learning, in the forms they are shared in.

Neither set can be downloaded here: both are subsets of ImageNet, whose licence does not allow
redistribution, so every copy comes from ImageNet itself (with the split files) or from the
pre-processed files that research groups pass around. Point ``--data-root`` at a folder holding one
of these forms:

miniImageNet (Vinyals et al., 2016; the split of Ravi & Larochelle, 2017: 64 / 16 / 20 classes of
600 images):

* ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``) beside an ``images/`` folder,
  as Ravi & Larochelle's script makes them; images of any size are resized (Lanczos);
* ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with ``image_data`` (uint8, N x 84 x 84 x 3)
  and ``class_dict`` (class name -> list of indices), the form learn2learn and others read.

tieredImageNet (Ren et al., 2018: 351 / 97 / 160 classes, 608 categories in 34 groups):

* ``{split}_images_png.pkl`` (a list of PNG-encoded images) or ``{split}_images.npz`` (key ``images``,
  uint8 N x 84 x 84 x 3), with ``{split}_labels.pkl`` (a dict whose ``label_specific`` gives each
  image's class).

The pickles are read by an unpickler that loads only what these files hold (numpy arrays, dtypes and
scalars; dict, list, tuple, str, bytes, int, float): ``pickle.load`` would import and call whatever
a file names, so a file passed around could run any code. Anything else raises :class:`UnsafePickleError`.

>>> split = ImageSplit(np.zeros((6, 84, 84, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
>>> split.num_classes, split.counts.tolist()
(3, [2, 2, 2])
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .omniglot import user_cache, write_npz

__all__ = ["ImageSplit", "DataNotFound", "UnsafePickleError", "load_miniimagenet", "load_tieredimagenet", "SPLITS"]

SPLITS = ("train", "val", "test")
NOT_SHAREABLE = ("{name} cannot be downloaded automatically: it is a subset of ImageNet, whose licence does not allow "
                 "redistribution. Build it from ImageNet with the split files, or get the pre-processed files your group "
                 "uses, and point --data-root at the folder ({forms}).")


class DataNotFound(FileNotFoundError):
    """The data set is not where it was looked for; the message says what was expected."""


class UnsafePickleError(ValueError):
    """A pickle names a class or function beyond the plain data these sets hold; nothing of it was run."""


class ImageSplit:
    """The classes of one split: uint8 colour images ``[N, H, W, 3]`` (or PNG bytes, decoded when sampled),
    each image's class in ``labels`` (``0 .. num_classes - 1``) and the class names.

    The interface :class:`~fewshot.omniglot.TaskSampler` samples from: ``num_classes``, ``counts`` (images per
    class, which may differ) and ``class_images(classes, drawings)``.
    """

    def __init__(self, images: Union[np.ndarray, Sequence[bytes]], labels: np.ndarray, names: Sequence[str],
                 image_size: int = 84):
        labels = np.asarray(labels, dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"labels must lie in 0..{len(names) - 1}, got {labels.min()}..{labels.max()}")
        self.images, self.names, self.image_size = images, list(names), image_size
        order = np.argsort(labels, kind="stable")  # each class's images in their file order
        self.counts = np.bincount(labels, minlength=len(names))
        self._starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self._order = order

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def class_images(self, classes: torch.Tensor, drawings: torch.Tensor) -> torch.Tensor:
        """uint8 ``(len(classes), drawings.shape[1], 3, S, S)``: image ``drawings[i, j]`` of class ``classes[i]``."""
        index = self._order[self._starts[classes.numpy()][:, None] + drawings.numpy()]
        picked = np.stack([self._image(i) for i in index.flatten()])
        return torch.from_numpy(picked.reshape(*index.shape, *picked.shape[1:])).permute(0, 1, 4, 2, 3)

    def _image(self, i: int) -> np.ndarray:
        image = self.images[i]
        if isinstance(image, (bytes, bytearray)):
            image = _resized(Image.open(io.BytesIO(image)), self.image_size)
        elif image.shape[:2] != (self.image_size, self.image_size):
            image = _resized(Image.fromarray(image), self.image_size)
        return image


def _resized(image: Image.Image, size: int) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def load_miniimagenet(root: Union[str, os.PathLike], split: str, image_size: int = 84,
                      cache_dir: Optional[Union[str, os.PathLike]] = None, verbose: bool = True) -> ImageSplit:
    """One split of miniImageNet from ``root`` (the pickle form, else the CSV form; see the module docstring).

    The CSV form's images are decoded once and cached as uint8 in ``cache_dir`` (default ``~/.cache/binom_opt``).
    """
    root, split = Path(root).expanduser(), _check_split(split)
    cache = root / f"mini-imagenet-cache-{split}.pkl"
    if cache.is_file():
        data = _unpickle(cache)
        if not {"image_data", "class_dict"} <= set(data):
            raise ValueError(f"{cache}: expected a dict with 'image_data' and 'class_dict', got keys {sorted(data)}")
        names = sorted(data["class_dict"])
        labels = np.empty(len(data["image_data"]), dtype=np.int64)
        for c, name in enumerate(names):
            labels[np.asarray(data["class_dict"][name])] = c
        return ImageSplit(np.asarray(data["image_data"], dtype=np.uint8), labels, names, image_size)
    table = root / f"{split}.csv"
    if not table.is_file() or not (root / "images").is_dir():
        raise DataNotFound(f"miniImageNet not found in {root}: expected mini-imagenet-cache-{split}.pkl, or {split}.csv "
                           "beside an images/ folder. " + NOT_SHAREABLE.format(
                               name="miniImageNet", forms="Ravi & Larochelle's CSV files and images/, or the pickles"))
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "label"} <= set(rows[0]):
        raise ValueError(f"{table}: expected the header 'filename,label'")
    names = sorted({r["label"] for r in rows})
    labels = np.array([names.index(r["label"]) for r in rows])
    cached = Path(cache_dir or user_cache()) / f"miniimagenet_{split}_{image_size}px.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as saved:
            if len(saved["images"]) == len(rows):
                return ImageSplit(saved["images"], labels, names, image_size)
    files = tqdm(rows, desc=f"decoding miniImageNet {split}", unit="image", leave=False, disable=not verbose)
    images = np.stack([_resized(Image.open(root / "images" / r["filename"]), image_size) for r in files])
    write_npz(cached, compressed=False, images=images)  # uncompressed: read back without inflating
    return ImageSplit(images, labels, names, image_size)


def load_tieredimagenet(root: Union[str, os.PathLike], split: str, image_size: int = 84) -> ImageSplit:
    """One split of tieredImageNet from ``root`` (see the module docstring); PNG images are decoded when sampled."""
    root, split = Path(root).expanduser(), _check_split(split)
    labels_file, png, npz = root / f"{split}_labels.pkl", root / f"{split}_images_png.pkl", root / f"{split}_images.npz"
    if not labels_file.is_file() or not (png.is_file() or npz.is_file()):
        raise DataNotFound(f"tieredImageNet not found in {root}: expected {labels_file.name} with {png.name} or {npz.name}. "
                           + NOT_SHAREABLE.format(name="tieredImageNet", forms="the pickles or the npz of Ren et al."))
    meta = _unpickle(labels_file)
    if "label_specific" not in meta:
        raise ValueError(f"{labels_file}: expected a dict with 'label_specific', got keys {sorted(meta)}")
    specific = np.asarray(meta["label_specific"], dtype=np.int64)
    classes = np.unique(specific)  # splits number their classes globally or from 0: renumber from 0
    strings = meta.get("label_specific_str")
    names = [str(strings[c]) if strings is not None and len(strings) > c else str(c) for c in classes]
    labels = np.searchsorted(classes, specific)
    if png.is_file():
        images = _unpickle(png)
    else:
        with np.load(npz, allow_pickle=False) as data:
            images = data["images"]
    return ImageSplit(images, labels, names, image_size)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


# The only globals a pickle of these sets may name: how numpy 1 and numpy 2 write arrays (every protocol), dtypes and
# scalars, and the builtin types protocols 0-2 name. Each is a constructor of data: none imports or runs anything else.
_PICKLE_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [(module, name) for module in ("builtins", "__builtin__")
       for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float", "bool", "complex")]
)
_PICKLE_DATA = "numpy arrays, dtypes and scalars, and dict, list, tuple, str, bytes, int and float"


def _latin1(text: str, encoding: str) -> bytes:
    """What protocols 0-2 name to rebuild bytes (``_codecs.encode(text, "latin1")``), for that encoding only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}, not 'latin1'")
    return text.encode("latin1")


class _DataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals of :data:`_PICKLE_GLOBALS`: a file cannot make it import or
    call anything else, so loading runs no code from the file."""

    def __init__(self, file, path: Path, **options):
        super().__init__(file, **options)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) not in _PICKLE_GLOBALS:
            raise UnsafePickleError(
                f"{self.path}: refused: the pickle names {module}.{name}, and loading it would call that. This loader reads "
                f"only what miniImageNet's and tieredImageNet's pickles hold: {_PICKLE_DATA}. If the file should be the "
                "data set, get it again from a source you trust.")
        with warnings.catch_warnings():  # numpy 2 reads numpy 1's module names, with a DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _unpickle(path: Path):
    """The data of a pickle, read by :class:`_DataUnpickler`."""
    with open(path, "rb") as f:
        try:
            try:
                return _DataUnpickler(f, path).load()
            except UnicodeDecodeError:  # pickles written by Python 2 (the original tieredImageNet files)
                f.seek(0)
                return _DataUnpickler(f, path, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); expected {_PICKLE_DATA}") from e
