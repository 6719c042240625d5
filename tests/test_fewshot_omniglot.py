"""Tests of examples/fewshot: Omniglot finding, downloading, decoding and caching, the MAML split,
task sampling and Conv4. Tests marked `needs_data` use the real Omniglot at ``$OMNIGLOT_ROOT`` or, by
default, ``../shared/data/omniglot`` next to the repository, and are skipped when it is absent."""

from __future__ import annotations

import contextlib
import doctest
import hashlib
import http.server
import io
import os
import shutil
import sys
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fewshot import models, omniglot
from fewshot.models import Conv4
from fewshot.omniglot import (
    ALLOW_MODIFIED_ENV,
    CONTENT_SHA256,
    DRAWINGS,
    SPLITS,
    ZIP_SHA256,
    FewShotSplit,
    OmniglotCharacters,
    OmniglotChecksumError,
    OmniglotDataError,
    OmniglotNotFound,
    TaskSampler,
    cache_file,
    find_omniglot_root,
    maml_split,
    sha256_file,
    user_cache,
)

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


def _lanczos_ink(png: bytes, size: int) -> np.ndarray:
    """The preprocessing of Finn et al. (2017) and learn2learn: Pillow's Lanczos resize, then ink = 1 - pixel."""
    with Image.open(io.BytesIO(png)) as image:
        return 255 - np.asarray(image.convert("L").resize((size, size), Image.Resampling.LANCZOS), dtype=np.int64)


@needs_data
def test_cached_images_are_the_drawings_resized_in_order(loaded):
    characters, _, _ = loaded
    index = characters.characters.index("character03", characters.alphabets.index("Latin"))
    assert (characters.alphabets[index], characters.origins[index]) == ("Latin", "images_background")
    with omniglot._open_split(DATA, "images_background") as (_, names, read):
        files = [name for name in names if name.startswith("Latin/character03/")]
        reference = np.stack([_lanczos_ink(read(name), 28) for name in files])
    assert [name[-6:-4] for name in files] == [f"{d:02d}" for d in range(1, DRAWINGS + 1)]
    assert np.array_equal(characters.images[index].numpy(), reference)
    # Ink is white on black: the strokes' pixels are bright, the frame is background.
    assert characters.images[index][:, 0].max() == 0 and characters.images[index].amax(dim=(-2, -1)).min() > 100


@pytest.mark.parametrize("size", [28, 84, 33])
@pytest.mark.parametrize("mode", ["L", "1", "RGB"])
def test_decoding_reads_any_png_mode_and_size(size, mode):
    drawing = np.random.default_rng(size).integers(0, 256, size=(105, 105), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(drawing).convert(mode).save(encoded, format="PNG")
    decoded = omniglot._decode(Path("x.zip"), "a/b/c.png", encoded.getvalue(), size)
    assert decoded.shape == (size, size) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, _lanczos_ink(encoded.getvalue(), size))


@pytest.mark.parametrize(("data", "message"), [(b"not a png", "cannot decode"), (None, r"is \(20, 20\), expected 105x105")])
def test_bad_drawings_name_the_file(data, message):
    if data is None:
        encoded = io.BytesIO()
        Image.new("L", (20, 20)).save(encoded, format="PNG")
        data = encoded.getvalue()
    with pytest.raises(OmniglotDataError, match=message) as error:
        omniglot._decode(Path("images_background.zip"), "Latin/character01/0683_01.png", data, 28)
    assert "images_background.zip" in str(error.value)


@needs_data
def test_cache_is_built_once_per_image_size(loaded):
    characters, cache_dir, log = loaded
    assert "Decoding the 32,460 Omniglot drawings once" in log and str(cache_dir) in log
    assert {p.name for p in cache_dir.iterdir()} == {cache_file(cache_dir, s, 28).name for s in SPLITS}
    assert cache_file(cache_dir, "images_background", 84) != cache_file(cache_dir, "images_background", 28)
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):
        again = OmniglotCharacters.load(DATA, cache_dir=cache_dir)
    assert quiet.getvalue() == ""
    assert torch.equal(again.images, characters.images) and again.alphabets == characters.alphabets


@pytest.mark.parametrize("content", ["garbage", "no digest"])
def test_unreadable_cache_is_rebuilt(tmp_path, content):
    path = cache_file(tmp_path, "images_evaluation", 1)
    if content == "garbage":
        path.write_bytes(b"not an npz file")
    else:  # as written before caches recorded their source
        np.savez_compressed(path, images=np.zeros((659, DRAWINGS, 1, 1), np.uint8), characters=np.array(["a/b"] * 659))
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert omniglot._read_cache(path, "images_evaluation", 1, verbose=True) is None
    assert "rebuilding" in log.getvalue() and str(path) in log.getvalue()
    assert content == "garbage" or "does not record the SHA-256" in log.getvalue()


def test_user_cache_is_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache("omniglot") == tmp_path / "binom_opt" / "omniglot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache() == Path.home() / ".cache" / "binom_opt"


def test_cache_files_have_ordinary_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        path = cache_file(tmp_path / "new", "images_evaluation", 28)
        omniglot._write_cache(path, omniglot._Part(np.zeros((1, DRAWINGS, 28, 28), np.uint8), ["Angelic/character01"], "0" * 64, ""))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644 and [p.name for p in path.parent.iterdir()] == [path.name]


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
        (5, 10, 11, "exceeds the 20 images of the smallest class"),
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


@pytest.fixture(autouse=True)
def _no_allowance(monkeypatch):
    """Modified data is refused unless a test allows it: the variable of the environment the tests run in is not used."""
    monkeypatch.delenv(ALLOW_MODIFIED_ENV, raising=False)


@pytest.fixture
def user_cache_dir(tmp_path, monkeypatch):
    """An empty user cache, and no $OMNIGLOT_ROOT: where the download goes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("OMNIGLOT_ROOT", raising=False)
    return tmp_path / "xdg"


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A web server on 127.0.0.1 with the download URL pointed at it: it serves ``files`` (name -> bytes, filled by
    the test) and lists the paths it was asked for in ``requested``. Downloads go to a temporary folder of the test's
    own, so that what a download leaves behind can be seen; the server stops with the test."""
    files, requested = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            body = files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for proxy in ("http_proxy", "HTTP_PROXY"):  # straight to the loopback, never through a proxy
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(omniglot, "URL", f"http://127.0.0.1:{httpd.server_port}/{{}}.zip")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    try:
        yield files, requested
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


TAMPERED = "images_evaluation/Angelic/character01/0965_01.png"


@pytest.fixture(scope="session")
def tampered_evaluation() -> bytes:
    """images_evaluation.zip with one drawing changed (a block of ink added): a valid and complete zip."""
    out = io.BytesIO()
    with zipfile.ZipFile(DATA / "images_evaluation.zip") as original, zipfile.ZipFile(out, "w") as tampered:
        for info in original.infolist():
            data = original.read(info)
            if info.filename == TAMPERED:
                with Image.open(io.BytesIO(data)) as image:
                    changed = image.copy()
                changed.paste(0, (40, 40, 60, 60))
                encoded = io.BytesIO()
                changed.save(encoded, format="PNG")
                data = encoded.getvalue()
            tampered.writestr(info, data)
    return out.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _snapshot(folder: Path) -> dict:
    """Every file and folder under `folder`, with each file's bytes and modification time."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@needs_zips
def test_the_download_is_verified_and_saved_into_the_user_cache(server, user_cache_dir):
    files, requested = server
    files.update({f"{split}.zip": (DATA / f"{split}.zip").read_bytes() for split in SPLITS})
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        root = find_omniglot_root(download=True)
    assert root == user_cache_dir / "binom_opt" / "omniglot"
    assert requested == ["/images_background.zip", "/images_evaluation.zip"]
    assert {p.name: sha256_file(p) for p in root.iterdir()} == {name: _sha256(data) for name, data in files.items()}
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in root.iterdir())
    assert "downloading images_background.zip" in log.getvalue()
    assert find_omniglot_root() == root  # found there from now on, without downloading
    assert len(requested) == 2 and list((user_cache_dir.parent / "tmp").iterdir()) == []


@needs_zips
@pytest.mark.parametrize("served", ["tampered", "truncated"])
def test_a_tampered_or_truncated_download_is_refused_and_changes_nothing(server, user_cache_dir, tampered_evaluation, served,
                                                                         tmp_path):
    files, requested = server
    files.update({f"{split}.zip": (DATA / f"{split}.zip").read_bytes() for split in SPLITS})
    bad = "images_evaluation" if served == "tampered" else "images_background"
    files[f"{bad}.zip"] = tampered_evaluation if served == "tampered" else files[f"{bad}.zip"][:3_000_000]
    root = user_cache_dir / "binom_opt" / "omniglot"
    root.mkdir(parents=True)
    (root / "images_background.zip").write_bytes(b"an older copy")  # no complete release here: the download runs
    before = _snapshot(user_cache_dir)
    with pytest.raises(OmniglotChecksumError) as error:
        OmniglotCharacters.load(download=True, verbose=False)
    message = str(error.value)
    assert f"{bad}.zip downloaded from {omniglot.URL.format(bad)} is not the Omniglot release" in message
    assert f"its SHA-256 is {_sha256(files[f'{bad}.zip'])}" in message
    assert all(digest in message for digest in ZIP_SHA256[bad])
    assert f"nothing was written to {root}" in message and "run again" in message
    assert _snapshot(user_cache_dir) == before  # the data root, and the image cache beside it, as they were
    assert list((tmp_path / "tmp").iterdir()) == []  # the downloaded files are gone too
    assert requested == [f"/{split}.zip" for split in SPLITS][:2 if served == "tampered" else 1]


@needs_zips
def test_the_tampered_zip_passes_every_check_but_its_digest(tampered_evaluation, tmp_path):
    """One drawing changed, nothing else: the zip opens and holds every drawing, so only the digest tells."""
    (tmp_path / "images_evaluation.zip").write_bytes(tampered_evaluation)
    with omniglot._open_split(tmp_path, "images_evaluation") as (source, names, read):
        omniglot._check_counts("images_evaluation", source, names)
        changed = read(TAMPERED.split("/", 1)[1])
    with omniglot._open_split(DATA, "images_evaluation") as (_, original_names, read):
        assert original_names == names and read(TAMPERED.split("/", 1)[1]) != changed


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_failed_download_gives_the_fixes_and_leaves_nothing(user_cache_dir, monkeypatch):
    requested = []

    def offline(url, timeout):
        requested.append(url)
        raise omniglot.urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(omniglot.urllib.request, "urlopen", offline)
    with pytest.raises(OmniglotNotFound) as error:
        OmniglotCharacters.load(download=True, verbose=False)
    message = str(error.value)
    assert "downloading it failed" in message and "(1) point --data-root or $OMNIGLOT_ROOT" in message
    assert "(2) run with internet access once" in message and "name resolution" in message
    assert requested == ["https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"]
    assert not user_cache_dir.exists()  # neither the data folder nor the image cache


def test_no_download_gives_the_fixes_without_touching_the_network(user_cache_dir, monkeypatch):
    monkeypatch.setattr(omniglot.urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download was asked for"))
    with pytest.raises(OmniglotNotFound, match=r"it is not there\. Either \(1\)"):
        find_omniglot_root(download=False)
    assert not user_cache_dir.exists()


def _root(tmp_path: Path, **replaced: bytes) -> Path:
    """A data root holding the real zips (links to them), except the splits given, written from their bytes."""
    root = tmp_path / "root"
    root.mkdir()
    for split in SPLITS:
        if split in replaced:
            (root / f"{split}.zip").write_bytes(replaced[split])
        else:
            (root / f"{split}.zip").symlink_to(DATA / f"{split}.zip")
    return root


def _modified_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "locally modified copy" in str(w.message)]


@needs_zips
def test_a_modified_zip_in_the_data_root_is_refused_unless_allowed(loaded, tampered_evaluation, tmp_path, monkeypatch):
    characters, session_cache, _ = loaded
    cache = tmp_path / "cache"
    shutil.copytree(session_cache, cache)  # the real data's cache: a source that changed is caught with a cache too
    root = _root(tmp_path, images_evaluation=tampered_evaluation)
    before = _snapshot(cache)
    with pytest.raises(OmniglotChecksumError) as error:
        OmniglotCharacters.load(root, cache_dir=cache)
    message = str(error.value)
    assert (f"{root / 'images_evaluation.zip'} is not the Omniglot release: its SHA-256 is {_sha256(tampered_evaluation)} "
            f"({len(tampered_evaluation):,} bytes)") in message
    assert all(digest in message for digest in ZIP_SHA256["images_evaluation"])
    assert "--allow-modified-data" in message and f"{ALLOW_MODIFIED_ENV}=1" in message
    assert _snapshot(cache) == before

    # Allowed: a warning, and the split is decoded again from the modified copy, whose digest its cache records.
    log = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(log):
        warnings.simplefilter("always")
        modified = OmniglotCharacters.load(root, cache_dir=cache, allow_modified=True)
    assert len(_modified_warnings(caught)) == 1 and str(root / "images_evaluation.zip") in _modified_warnings(caught)[0]
    assert "is not the one" in log.getvalue() and "rebuilding it" in log.getvalue()
    assert "Decoding the 13,180 Omniglot drawings" in log.getvalue()
    with np.load(cache_file(cache, "images_evaluation", 28)) as saved:
        assert str(saved["source_sha256"]) == _sha256(tampered_evaluation)
    assert _snapshot(cache)["omniglot_images_background_28px_v3.npz"] == before["omniglot_images_background_28px_v3.npz"]
    changed = (modified.images != characters.images).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [characters.alphabets.index("Angelic")]  # the one character whose drawing was changed

    # The variable allows it as the flag does, from the cache; without either it is refused again.
    monkeypatch.setenv(ALLOW_MODIFIED_ENV, "1")
    log = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(log):
        warnings.simplefilter("always")
        again = OmniglotCharacters.load(root, cache_dir=cache)
    assert len(_modified_warnings(caught)) == 1 and log.getvalue() == "" and torch.equal(again.images, modified.images)
    monkeypatch.delenv(ALLOW_MODIFIED_ENV)
    with pytest.raises(OmniglotChecksumError, match="images_evaluation.zip is not the Omniglot release"):
        OmniglotCharacters.load(root, cache_dir=cache)


@needs_zips
def test_an_unchanged_zip_is_not_hashed_again(loaded, tmp_path, monkeypatch):
    _, cache, _ = loaded
    hashed = []
    sha256 = omniglot.sha256_file
    monkeypatch.setattr(omniglot, "sha256_file", lambda path: hashed.append(Path(path).name) or sha256(path))
    OmniglotCharacters.load(DATA, cache_dir=cache, verbose=False)
    assert hashed == []  # the sizes and times the cache recorded still hold
    copies = tmp_path / "copies"
    copies.mkdir()
    for split in SPLITS:
        shutil.copy(DATA / f"{split}.zip", copies)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        OmniglotCharacters.load(copies, cache_dir=cache)
    assert hashed == [f"{split}.zip" for split in SPLITS] and log.getvalue() == ""  # other files, the same bytes


@needs_zips
def test_an_extracted_folder_is_checked_by_its_drawings(tmp_path):
    with zipfile.ZipFile(DATA / "images_evaluation.zip") as archive:
        archive.extractall(tmp_path)
    assert omniglot._verified_source(tmp_path, "images_evaluation", None, False) == (CONTENT_SHA256["images_evaluation"], "")
    drawing = tmp_path / TAMPERED
    drawing.write_bytes(drawing.read_bytes() + b"\0")
    with pytest.raises(OmniglotChecksumError) as error:
        omniglot._verified_source(tmp_path, "images_evaluation", None, False)
    assert f"{tmp_path / 'images_evaluation'} is not the Omniglot release" in str(error.value)
    assert f"expected {CONTENT_SHA256['images_evaluation']} (the release's drawings)" in str(error.value)


def _fake_cache(cache: Path, **digests: str) -> None:
    """A cache of 1x1 images for each split, recording the digest given for it."""
    for split, digest in digests.items():
        count = SPLITS[split][1]
        omniglot._write_cache(cache_file(cache, split, 1), omniglot._Part(
            np.zeros((count, DRAWINGS, 1, 1), np.uint8), [f"Alphabet/character{c:04d}" for c in range(count)], digest, ""))


def test_a_cache_without_its_source_serves_only_what_came_from_the_release(user_cache_dir, tmp_path):
    release = {split: next(iter(ZIP_SHA256[split])) for split in SPLITS}
    _fake_cache(tmp_path / "cache", **release)
    assert OmniglotCharacters.load(image_size=1, cache_dir=tmp_path / "cache").images.shape == (1623, DRAWINGS, 1, 1)
    _fake_cache(tmp_path / "cache", images_evaluation="0" * 64)
    with pytest.raises(OmniglotChecksumError) as error:
        OmniglotCharacters.load(image_size=1, cache_dir=tmp_path / "cache")
    assert str(cache_file(tmp_path / "cache", "images_evaluation", 1)) in str(error.value) and "0" * 64 in str(error.value)
    assert "no longer there" in str(error.value) and "--allow-modified-data" in str(error.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OmniglotCharacters.load(image_size=1, cache_dir=tmp_path / "cache", allow_modified=True)
    assert len(_modified_warnings(caught)) == 1


@pytest.mark.parametrize(("value", "allowed"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True),
                                                 ("True", True)])
def test_the_variable_allows_modified_data(monkeypatch, value, allowed):
    if value is not None:
        monkeypatch.setenv(ALLOW_MODIFIED_ENV, value)
    assert omniglot.allow_modified_data() is allowed and omniglot.allow_modified_data(True)


def test_the_examples_pass_the_flag_and_report_a_refusal_in_one_line(monkeypatch):
    import dataset_distillation

    from fewshot import run

    seen = {}

    def refuse(*args, **kwargs):
        seen.update(kwargs)
        raise OmniglotChecksumError("x/images_background.zip is not the Omniglot release")

    monkeypatch.setattr(run.OmniglotCharacters, "load", refuse)
    parser = run.common_parser("", {}, {})
    for argv, allowed in (([], False), (["--allow-modified-data"], True)):
        with pytest.raises(SystemExit, match="^error: x/images_background.zip is not the Omniglot release$"):
            run.load_tasks(run.parse(parser, argv))
        assert seen["allow_modified"] is allowed
    assert dataset_distillation.parse(["--allow-modified-data"]).allow_modified_data


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


def _load_errors(root: Path, tmp_path: Path) -> tuple[str, str]:
    """Loading damaged data: the refusal of its digest, then with allow_modified the error that names the damage.
    Nothing is cached from it either way."""
    with pytest.raises(OmniglotChecksumError) as refused:
        OmniglotCharacters.load(root, cache_dir=tmp_path / "cache", verbose=False)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(OmniglotDataError) as damaged:
        warnings.simplefilter("always")
        OmniglotCharacters.load(root, cache_dir=tmp_path / "cache", verbose=False, allow_modified=True)
    assert damaged.type is OmniglotDataError and len(_modified_warnings(caught)) == 1
    assert not any((tmp_path / "cache").glob("*.npz"))
    return str(refused.value), str(damaged.value)


@needs_data
@needs_zips
def test_truncated_zip_is_reported(tmp_path):
    truncated = tmp_path / "images_background.zip"
    truncated.write_bytes((DATA / "images_background.zip").read_bytes()[:3_000_000])
    root = _root_with_background(tmp_path, truncated)
    refused, message = _load_errors(root, tmp_path)
    assert refused.startswith(f"{root / 'images_background.zip'} is not the Omniglot release: its SHA-256 is ")
    assert "(3,000,000 bytes), expected" in refused and "(the same drawings repacked, 8,588,032 bytes)" in refused
    assert str(root / "images_background.zip") in message and "download it again" in message


@needs_data
@needs_zips
def test_corrupt_zip_member_is_reported(tmp_path):
    data = bytearray((DATA / "images_background.zip").read_bytes())
    data[2000:2100] = bytes(b ^ 0x5A for b in data[2000:2100])  # inside the first drawings
    corrupt = tmp_path / "images_background.zip"
    corrupt.write_bytes(bytes(data))
    refused, message = _load_errors(_root_with_background(tmp_path, corrupt), tmp_path)
    assert f"its SHA-256 is {_sha256(bytes(data))}" in refused
    assert "images_background.zip is corrupt" in message and "download it again" in message


@needs_data
def test_incomplete_zip_is_reported(tmp_path):
    incomplete = tmp_path / "images_background.zip"
    with zipfile.ZipFile(incomplete, "w") as archive:
        for drawing in range(1, DRAWINGS + 1):
            archive.writestr(f"images_background/Latin/character01/0683_{drawing:02d}.png", b"")
    refused, message = _load_errors(_root_with_background(tmp_path, incomplete), tmp_path)
    assert "images_background.zip is not the Omniglot release" in refused
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
    # A partly extracted folder is refused by its digest, and reported like an incomplete zip past it.
    refused, message = _load_errors(_root_with_background(tmp_path, extracted), tmp_path)
    assert f"{tmp_path / 'root' / 'images_background'} is not the Omniglot release" in refused
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


@pytest.mark.parametrize("module", [omniglot, models], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
