"""Tests of examples/fewshot: the PNG decoder, Omniglot loading and caching, the MAML split, task
sampling and Conv4. Tests marked `needs_data` use the real Omniglot at ``$OMNIGLOT_ROOT`` or, by
default, ``../shared/data/omniglot`` next to the repository, and are skipped when it is absent."""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fewshot import models, omniglot, png
from fewshot.models import Conv4
from fewshot.omniglot import (
    DRAWINGS,
    SPLITS,
    FewShotSplit,
    OmniglotCharacters,
    OmniglotDataError,
    TaskSampler,
    cache_file,
    default_cache_dir,
    find_omniglot_root,
    maml_split,
)
from fewshot.png import PNG_SIGNATURE, decode_png

pytestmark = pytest.mark.cpu_only  # the example scripts, processes and files run on the host

DATA = Path(os.environ.get("OMNIGLOT_ROOT") or Path(__file__).resolve().parents[2] / "shared/data/omniglot")


def _has_omniglot(root: Path) -> bool:
    try:
        find_omniglot_root(root)
    except FileNotFoundError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _has_omniglot(DATA), reason=f"Omniglot not found at {DATA} (set $OMNIGLOT_ROOT to run these tests)"
)
needs_zips = pytest.mark.skipif(
    not all((DATA / f"{split}.zip").is_file() for split in SPLITS),
    reason=f"the Omniglot zips are not in {DATA}",
)


@pytest.fixture(scope="session")
def loaded(tmp_path_factory):
    """Omniglot decoded once for the whole session into a temporary cache: (characters, cache dir, log)."""
    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        characters = OmniglotCharacters.load(DATA, cache_dir=cache_dir)
    return characters, cache_dir, log.getvalue()


def _distinct_split(characters: int = 10, rotations: bool = True) -> FewShotSplit:
    """A split whose image (c, d) is a constant 20 * c + d, so a sampled image tells where it came from."""
    ids = torch.arange(characters * DRAWINGS, dtype=torch.uint8).reshape(characters, DRAWINGS, 1, 1)
    return FewShotSplit(ids.expand(-1, -1, 28, 28).clone(), rotations=rotations)


def _sampler(split: FewShotSplit, seed: int, ways=5, shots=1, queries=15) -> TaskSampler:
    return TaskSampler(split, ways, shots, queries, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------- PNG


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = [abs(estimate - left), abs(estimate - up), abs(estimate - up_left)]
    return (left, up, up_left)[distances.index(min(distances))]


def _encode_png(samples: np.ndarray, depth: int, filters: list[int], color_type=0, interlace=0) -> bytes:
    """Reference encoder: grayscale samples (h, w) below 2**depth, row y filtered with `filters[y]`."""
    height, width = samples.shape
    per_byte = 8 // depth
    padded = np.zeros((height, -(-width // per_byte) * per_byte), np.int64)
    padded[:, :width] = samples
    shifts = np.arange(8 - depth, -1, -depth)
    rows = (padded.reshape(height, -1, per_byte) << shifts).sum(-1).tolist()
    raw, prev = bytearray(), [0] * len(rows[0])
    for kind, row in zip(filters, rows):
        raw.append(kind)
        for x, (value, up) in enumerate(zip(row, prev)):
            left, up_left = (row[x - 1], prev[x - 1]) if x else (0, 0)
            predictor = (0, left, up, (left + up) // 2, _paeth(left, up, up_left))[kind]
            raw.append((value - predictor) % 256)
        prev = row
    header = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace)
    chunks = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw))) + _chunk(b"IEND", b"")
    return PNG_SIGNATURE + chunks


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
@pytest.mark.parametrize("width", [1, 7, 13, 64])
def test_png_all_filters_and_depths(depth, width):
    rng = np.random.default_rng(depth * 100 + width)
    samples = rng.integers(0, 2**depth, size=(15, width))
    samples[5:10] = np.add.outer(np.arange(5), np.arange(width)) % 2**depth  # smooth rows too
    filters = [y % 5 for y in range(15)]  # every filter type three times, after each other type
    decoded = decode_png(_encode_png(samples, depth, filters))
    assert decoded.dtype == np.uint8 and decoded.shape == samples.shape
    np.testing.assert_array_equal(decoded, samples * (255 // (2**depth - 1)))


@needs_data
def test_png_matches_pillow_on_omniglot():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for split in SPLITS:
        with omniglot._open_split(DATA, split) as (_, names, read):
            for index in rng.choice(len(names), size=150, replace=False):
                data = read(names[index])
                expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
                np.testing.assert_array_equal(decode_png(data), expected, err_msg=names[index])
    # An ink count from SOURCE.md of the data set, checked without Pillow.
    with omniglot._open_split(DATA, "images_background") as (_, _, read):
        assert (decode_png(read("Alphabet_of_the_Magi/character01/0709_01.png")) == 0).sum() == 905


def test_png_matches_pillow_on_synthetic_images():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:61, 0:47]
    walk = np.zeros((61, 47), np.int64)
    walk[0] = rng.integers(0, 256, 47)
    for row in range(1, 61):  # each pixel near the mean of the two above it (up and up-left)
        walk[row] = (walk[row - 1] + np.roll(walk[row - 1], 1)) // 2 + rng.integers(-2, 3, 47)
    images = {
        "noise": rng.integers(0, 256, (61, 47)),
        "horizontal gradient": x * 5,
        "vertical gradient": y * 4,
        "diagonal": (x + y) * 3,
        "rings": np.hypot(x - 20, y - 30) * 7,
        "waves": 127 + 120 * np.sin(x / 5) * np.cos(y / 7),
        "walk": walk,
        "mixed": np.where(y < 30, rng.integers(0, 256, (61, 47)), x * y),
    }
    for name, image in images.items():
        pixels = Image.fromarray((np.asarray(image).astype(np.int64) % 256).astype(np.uint8))
        for mode in ("L", "1"):  # 8-bit and (dithered) 1-bit grayscale
            buffer = io.BytesIO()
            pixels.convert(mode).save(buffer, "PNG")
            expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
            np.testing.assert_array_equal(decode_png(buffer.getvalue()), expected, err_msg=f"{name} {mode}")


def _bad_pngs() -> dict[str, tuple[bytes, str]]:
    """Invalid or unsupported PNGs, each with a pattern its error message must match."""
    good = _encode_png(np.arange(12).reshape(3, 4), 8, [0, 1, 4])
    zeros = np.zeros((2, 2), int)

    def png_2x1(idat: bytes, depth: int = 8) -> bytes:
        header = _chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, depth, 0, 0, 0, 0))
        return PNG_SIGNATURE + header + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")

    cases = {
        "bad signature": (b"GIF89a" + good[6:], "signature"),
        "RGB": (_encode_png(zeros, 8, [0, 0], color_type=2), "color type 2"),
        "16 bits": (png_2x1(zlib.compress(bytes(5)), depth=16), "bit depth 16"),
        "interlaced": (_encode_png(zeros, 8, [0, 0], interlace=1), "interlaced"),
        "IDAT byte flipped": (good[:45] + bytes([good[45] ^ 0xFF]) + good[46:], "CRC mismatch in the IDAT"),
        "no IEND": (good[: -len(_chunk(b"IEND", b""))], "truncated"),
        "critical chunk": (good[:33] + _chunk(b"ABCD", b"") + good[33:], "critical chunk"),
        "IDAT first": (PNG_SIGNATURE + good[33:], "IHDR"),
        "filter type 7": (png_2x1(zlib.compress(bytes([7, 1, 2]))), "filter type 7"),
        "short data": (png_2x1(zlib.compress(bytes([0, 1]))), "expected 3"),
        "not zlib": (png_2x1(b"garbage"), "bad image data"),
        "cut zlib stream": (png_2x1(zlib.compress(bytes([0, 1, 2]))[:-3]), "truncated"),
    }
    for cut in (0, 5, 8, 20, 33, 45, len(good) - 1):
        cases[f"cut at {cut}"] = (good[:cut], "signature" if cut < 8 else "truncated")
    return cases


BAD_PNGS = _bad_pngs()


@pytest.mark.parametrize(("data", "message"), BAD_PNGS.values(), ids=BAD_PNGS.keys())
def test_png_rejects_unsupported_and_corrupt_files(data, message):
    with pytest.raises(ValueError, match=message):
        decode_png(data)


# ---------------------------------------------------------------------------------------------- Omniglot


@needs_data
def test_all_characters_and_drawings_are_loaded(loaded):
    characters, _, _ = loaded
    assert characters.images.shape == (1623, DRAWINGS, 28, 28) and characters.images.dtype == torch.uint8
    assert characters.origins.count("images_background") == 964
    assert characters.origins.count("images_evaluation") == 659
    names = list(zip(characters.alphabets, characters.characters))
    assert len(set(names)) == 1623
    assert len(set(characters.alphabets)) == 50
    assert characters.alphabets.count("Tifinagh") == 55 and characters.alphabets.count("ULOG") == 26
    for split, (_, n_characters) in SPLITS.items():
        with omniglot._open_split(DATA, split) as (_, files, _):
            assert len(files) == n_characters * DRAWINGS
    # Ink is bright on a dark background, and every drawing has some.
    assert characters.images.float().mean() < 40 and characters.images.amax(dim=(-2, -1)).min() > 0


@needs_data
def test_cached_images_are_area_averaged_drawings_in_order(loaded):
    characters, _, _ = loaded
    index = characters.characters.index("character03", characters.alphabets.index("Latin"))
    assert (characters.alphabets[index], characters.origins[index]) == ("Latin", "images_background")
    with omniglot._open_split(DATA, "images_background") as (_, names, read):
        files = [name for name in names if name.startswith("Latin/character03/")]
        drawings = np.stack([decode_png(read(name)) for name in files])
    assert [name[-6:-4] for name in files] == [f"{d:02d}" for d in range(1, DRAWINGS + 1)]
    ink = torch.from_numpy(1 - drawings / 255)[:, None]
    reference = F.interpolate(ink, size=(28, 28), mode="area")[:, 0] * 255
    # Within rounding of torch's area interpolation (ties are rounded up, exactly).
    assert (characters.images[index].double() - reference).abs().max() <= 0.5 + 1e-9


def test_area_resize_matches_torch_at_other_sizes():
    rng = np.random.default_rng(0)
    drawings = rng.integers(0, 256, size=(3, 105, 105), dtype=np.uint8)
    for size in (28, 84, 105, 33):
        ink = torch.from_numpy(1 - drawings / 255)[:, None]
        reference = F.interpolate(ink, size=(size, size), mode="area")[:, 0] * 255
        resized = torch.from_numpy(omniglot._to_ink(drawings, size)).double()
        assert (resized - reference).abs().max() <= 0.5 + 1e-9


@needs_data
def test_cache_is_built_once_per_image_size(loaded):
    characters, cache_dir, log = loaded
    assert "Decoding 32,460 Omniglot PNGs" in log and str(cache_dir) in log
    assert {p.name for p in cache_dir.iterdir()} == {cache_file(cache_dir, s, 28).name for s in SPLITS}
    assert cache_file(cache_dir, "images_background", 84) != cache_file(cache_dir, "images_background", 28)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):
        again = OmniglotCharacters.load(DATA, cache_dir=cache_dir)
    assert quiet.getvalue() == ""
    assert torch.equal(again.images, characters.images) and again.alphabets == characters.alphabets


def test_unreadable_cache_is_rebuilt(tmp_path):
    path = cache_file(tmp_path, "images_evaluation", 28)
    path.write_bytes(b"not an npz file")
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert omniglot._read_cache(path, "images_evaluation", 28, verbose=True) is None
    assert "rebuilding" in log.getvalue() and str(path) in log.getvalue()


def test_default_cache_dir_avoids_read_only_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    assert default_cache_dir(tmp_path) == tmp_path / ".binom_opt_cache"
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    assert default_cache_dir(read_only) == tmp_path / "user_cache" / "binom_opt" / "omniglot_cache"


def test_maml_split_sizes_disjoint_and_seeded():
    split = maml_split()
    assert {name: len(indices) for name, indices in split.items()} == {"train": 1100, "val": 100, "test": 423}
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(1623))
    torch.manual_seed(1)
    np.random.seed(1)
    first = maml_split(seed=0)
    torch.manual_seed(2)
    np.random.seed(2)
    np.random.rand(10)
    second = maml_split(seed=0)
    assert all(np.array_equal(first[name], second[name]) for name in first)
    assert not np.array_equal(maml_split(seed=1)["test"], first["test"])


@needs_data
def test_splits_and_rotations(loaded):
    characters, _, _ = loaded
    splits = characters.splits(seed=0)
    assert {name: s.num_classes for name, s in splits.items()} == {"train": 4400, "val": 400, "test": 1692}
    flat = characters.splits(seed=0, rotations=False)
    assert {name: s.num_classes for name, s in flat.items()} == {"train": 1100, "val": 100, "test": 423}
    for name, indices in maml_split(seed=0).items():
        assert np.array_equal(splits[name].characters, indices)
        assert torch.equal(splits[name].images, characters.images[indices])


def test_rotated_classes():
    images = torch.randint(0, 256, (3, DRAWINGS, 28, 28), dtype=torch.uint8)
    split = FewShotSplit(images)
    drawings = torch.tensor([[4, 0]] * 12)
    got = split.class_images(torch.arange(12), drawings)
    for c in range(12):
        expected = torch.rot90(images[c // 4][[4, 0]], c % 4, dims=(-2, -1))
        assert torch.equal(got[c], expected)
    unrotated = FewShotSplit(images, rotations=False).class_images(torch.tensor([2]), drawings[:1])
    assert torch.equal(unrotated[0], images[2][[4, 0]])


def test_tasks_have_disjoint_support_and_query():
    sampler = _sampler(_distinct_split(rotations=False), seed=0, ways=5, shots=5, queries=15)
    for _ in range(20):
        x_support, y_support, x_query, y_query = sampler.sample()
        support_ids = (x_support[:, 0, 0, 0] * 255).round().long()
        query_ids = (x_query[:, 0, 0, 0] * 255).round().long()
        for label in range(5):
            support, query = support_ids[y_support == label], query_ids[y_query == label]
            assert len(support) == 5 and len(query) == 15
            drawn = torch.cat([support, query])
            assert len(set(drawn.tolist())) == 20  # no drawing twice
            assert len(set((drawn // DRAWINGS).tolist())) == 1  # all from the label's character
        assert len(set((support_ids // DRAWINGS).tolist())) == 5  # five different characters


def test_sampler_is_seeded_by_its_generator_only():
    split = _distinct_split()
    torch.manual_seed(1)
    first = _sampler(split, seed=3).sample_batch(4)
    torch.manual_seed(2)
    torch.rand(10)
    second = _sampler(split, seed=3).sample_batch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other = _sampler(split, seed=4).sample_batch(4)
    assert not torch.equal(first[0], other[0])


def test_sampler_state_dict_resumes_the_stream():
    sampler = _sampler(_distinct_split(), seed=0)
    sampler.sample()
    state = sampler.state_dict()
    expected = sampler.sample_batch(3)
    sampler.sample_batch(2)
    resumed = _sampler(_distinct_split(), seed=123)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.sample_batch(3), expected))


@needs_data
@pytest.mark.parametrize(("ways", "shots", "queries"), [(5, 1, 15), (20, 5, 15), (5, 5, 1)])
def test_task_shapes_and_labels(loaded, ways, shots, queries):
    characters, _, _ = loaded
    sampler = _sampler(characters.splits()["train"], seed=0, ways=ways, shots=shots, queries=queries)
    x_support, y_support, x_query, y_query = sampler.sample()
    assert x_support.shape == (ways * shots, 1, 28, 28) and x_query.shape == (ways * queries, 1, 28, 28)
    assert x_support.dtype == x_query.dtype == torch.float32
    assert x_support.min() >= 0 and x_support.max() <= 1 and x_query.max() > 0.5
    assert y_support.dtype == y_query.dtype == torch.int64
    assert torch.equal(torch.bincount(y_support, minlength=ways), torch.full((ways,), shots))
    assert torch.equal(torch.bincount(y_query, minlength=ways), torch.full((ways,), queries))
    batch = sampler.sample_batch(3)
    assert [tuple(t.shape) for t in batch] == [
        (3, ways * shots, 1, 28, 28),
        (3, ways * shots),
        (3, ways * queries, 1, 28, 28),
        (3, ways * queries),
    ]


@pytest.mark.parametrize(
    ("ways", "shots", "queries", "message"),
    [
        (41, 1, 1, "ways=41 exceeds the 40 classes"),
        (5, 10, 11, "exceeds the 20 drawings"),
        (0, 1, 1, "ways"),
        (5, -1, 1, "shots"),
        (5, 1, 0, "queries"),
        (5, 1.0, 1, "shots"),
    ],
)
def test_sampler_rejects_impossible_tasks(ways, shots, queries, message):
    with pytest.raises(ValueError, match=message):
        TaskSampler(_distinct_split(), ways, shots, queries, generator=torch.Generator())


def test_sampler_rejects_bad_batch_size_and_generator():
    with pytest.raises(ValueError, match="batch_size"):
        _sampler(_distinct_split(), seed=0).sample_batch(0)
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        TaskSampler(_distinct_split(), 5, 1, 1, generator=0)


# ------------------------------------------------------------------------------------ missing or bad data


def test_missing_root_names_path_and_expected_files(tmp_path, monkeypatch):
    missing = tmp_path / "no_omniglot_here"
    with pytest.raises(FileNotFoundError) as error:
        find_omniglot_root(missing)
    for part in (str(missing), "images_background.zip", "images_evaluation.zip"):
        assert part in str(error.value)
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path / "from_environment"))
    with pytest.raises(FileNotFoundError, match="from_environment"):
        OmniglotCharacters.load(cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no_omniglot_here"):  # the argument wins over the variable
        find_omniglot_root(missing)


@needs_zips
def test_download_fetches_and_checks_the_release(tmp_path, monkeypatch):
    """The download path, offline: urlopen is replaced by reading the local copies of the zips."""
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return open(DATA / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(omniglot.urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "downloaded"
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert find_omniglot_root(root, download=True) == root
    assert requested == [omniglot._URL.format(split) for split in SPLITS]
    assert requested[0] == (
        "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"
    )
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip", "images_evaluation.zip"]
    assert "Downloading" in log.getvalue()


def _root_with_background(tmp_path: Path, background: Path) -> Path:
    """A root whose images_background is `background` and whose images_evaluation is the real one."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    evaluation = DATA / "images_evaluation.zip"
    if not evaluation.is_file():
        evaluation = DATA / "images_evaluation"
    (root / evaluation.name).symlink_to(evaluation)
    shutil.move(background, root / background.name)
    return root


def _load_error(root: Path, tmp_path: Path) -> str:
    with pytest.raises(OmniglotDataError) as error:
        OmniglotCharacters.load(root, cache_dir=tmp_path / "cache", verbose=False)
    assert not any((tmp_path / "cache").glob("*.npz"))  # nothing cached from bad data
    return str(error.value)


@needs_data
@needs_zips
def test_truncated_zip_is_reported(tmp_path):
    truncated = tmp_path / "images_background.zip"
    truncated.write_bytes((DATA / "images_background.zip").read_bytes()[:3_000_000])
    root = _root_with_background(tmp_path, truncated)
    message = _load_error(root, tmp_path)
    assert str(root / "images_background.zip") in message and "download it again" in message


@needs_data
@needs_zips
def test_corrupt_zip_member_is_reported(tmp_path):
    data = bytearray((DATA / "images_background.zip").read_bytes())
    data[2000:2100] = bytes(b ^ 0x5A for b in data[2000:2100])  # inside the first drawings
    corrupt = tmp_path / "images_background.zip"
    corrupt.write_bytes(bytes(data))
    message = _load_error(_root_with_background(tmp_path, corrupt), tmp_path)
    assert "images_background.zip is corrupt" in message and "download it again" in message


@needs_data
def test_incomplete_zip_is_reported(tmp_path):
    incomplete = tmp_path / "images_background.zip"
    with zipfile.ZipFile(incomplete, "w") as archive:
        for drawing in range(1, DRAWINGS + 1):
            archive.writestr(f"images_background/Latin/character01/0683_{drawing:02d}.png", b"")
    message = _load_error(_root_with_background(tmp_path, incomplete), tmp_path)
    assert "expected 30 alphabets and 964 characters" in message
    assert "found 1 alphabets, 1 characters" in message


@needs_data
@needs_zips
def test_extracted_folders_read_like_the_zip(tmp_path):
    extracted = tmp_path / "images_background"
    with zipfile.ZipFile(DATA / "images_background.zip") as archive:
        members = [n for n in archive.namelist() if n.startswith("images_background/Greek/")]
        archive.extractall(tmp_path, members)
    with omniglot._open_split(tmp_path, "images_background") as (source, names, read):
        assert source == extracted and len(names) == 24 * DRAWINGS
        folder_files = {name: read(name) for name in names}
    with omniglot._open_split(DATA, "images_background") as (_, names, read):
        assert folder_files == {name: read(name) for name in names if name.startswith("Greek/")}
    # A partly extracted folder is reported like an incomplete zip.
    message = _load_error(_root_with_background(tmp_path, extracted), tmp_path)
    assert str(tmp_path / "root" / "images_background") in message
    assert "found 1 alphabets, 24 characters" in message


# ------------------------------------------------------------------------------------------- Conv4, docs


@pytest.mark.parametrize(("image_size", "side"), [(28, 1), (84, 5)])
def test_conv4_shapes(image_size, side):
    net = Conv4(in_channels=1, out_features=5, hidden=64, image_size=image_size)
    x = torch.randn(6, 1, image_size, image_size)
    assert net.features(x).shape == (6, 64 * side * side)
    assert net(x).shape == (6, 5)
    assert isinstance(net.features, torch.nn.Sequential) and isinstance(net.head, torch.nn.Linear)
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 4 and all(m.running_mean is None for m in batch_norms)
    tracked = Conv4(image_size=image_size, track_running_stats=True)
    assert all(m.running_mean is not None for m in tracked.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_conv4_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least 16"):
        Conv4(image_size=15)


@pytest.mark.parametrize("module", [png, omniglot, models], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
