"""examples/fewshot/imagenet.py on small data sets written here in every form it reads, and
examples/miniimagenet_maml.py end to end on them (the real sets cannot be downloaded)."""

from __future__ import annotations

import csv
import io
import math
import os
import pickle
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from fewshot.imagenet import DataNotFound, ImageSplit, UnsafePickleError, _unpickle, load_miniimagenet, load_tieredimagenet
from fewshot.models import build_network
from fewshot.omniglot import TaskSampler

pytestmark = pytest.mark.cpu_only  # files and example scripts on the host

SIZE = 84
COUNTS = {"train": [5, 7, 6], "val": [4, 4, 5], "test": [6, 4, 4]}  # images per class (tieredImageNet's differ)


def colour(split: str, c: int, i: int) -> tuple:
    """A distinct flat colour per image, far enough apart to survive JPEG."""
    return (40 * c + 20, 30 * i + 10, {"train": 30, "val": 130, "test": 230}[split])


def image(split: str, c: int, i: int, size=(SIZE, SIZE)) -> np.ndarray:
    return np.broadcast_to(np.array(colour(split, c, i), np.uint8), (*size[::-1], 3)).copy()


def interleaved(split: str):
    """(class, index within class) of each image, classes interleaved as files often are."""
    order = [(c, i) for i in range(max(COUNTS[split])) for c, n in enumerate(COUNTS[split]) if i < n]
    return order


def write_mini_csv(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    for split in COUNTS:
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            for c, i in interleaved(split):
                wnid = f"n0{split}{c}"
                name = f"{wnid}{i:08d}.jpg"
                Image.fromarray(image(split, c, i, size=(100, 90))).save(root / "images" / name, quality=95)
                writer.writerow([name, wnid])
    return root


def write_mini_pickles(root: Path) -> Path:
    root.mkdir(parents=True)
    for split in COUNTS:
        order = interleaved(split)
        classes = {f"n0{split}{c}": [k for k, (cc, _) in enumerate(order) if cc == c] for c in range(len(COUNTS[split]))}
        data = {"image_data": np.stack([image(split, c, i) for c, i in order]), "class_dict": classes}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump(data, f)
    return root


def write_tiered(root: Path, form: str) -> Path:
    root.mkdir(parents=True)
    offset = {"train": 0, "val": 3, "test": 6}  # the labels of a split need not start at 0
    for split in COUNTS:
        order = interleaved(split)
        labels = {"label_specific": np.array([offset[split] + c for c, _ in order]),
                  "label_general": np.zeros(len(order), dtype=np.int64),
                  "label_specific_str": [f"class{k}" for k in range(9)]}
        with open(root / f"{split}_labels.pkl", "wb") as f:
            pickle.dump(labels, f)
        images = [image(split, c, i) for c, i in order]
        if form == "png":
            encoded = []
            for im in images:
                buffer = io.BytesIO()
                Image.fromarray(im).save(buffer, format="PNG")
                encoded.append(buffer.getvalue())
            with open(root / f"{split}_images_png.pkl", "wb") as f:
                pickle.dump(encoded, f)
        else:
            np.savez(root / f"{split}_images.npz", images=np.stack(images))
    return root


LOADERS = {
    "mini-csv": lambda tmp: (lambda split: load_miniimagenet(write_once(tmp, write_mini_csv), split, cache_dir=tmp / "cache")),
    "mini-pickle": lambda tmp: (lambda split: load_miniimagenet(write_once(tmp, write_mini_pickles), split)),
    "tiered-png": lambda tmp: (lambda split: load_tieredimagenet(write_once(tmp, lambda r: write_tiered(r, "png")), split)),
    "tiered-npz": lambda tmp: (lambda split: load_tieredimagenet(write_once(tmp, lambda r: write_tiered(r, "npz")), split)),
}


def write_once(tmp: Path, writer) -> Path:
    root = tmp / "data"
    return root if root.exists() else writer(root)


@pytest.mark.parametrize("form", sorted(LOADERS))
def test_every_form_loads_every_class_and_image_in_order(form, tmp_path):
    load = LOADERS[form](tmp_path)
    for split, counts in COUNTS.items():
        data = load(split)
        assert data.num_classes == len(counts) and data.counts.tolist() == counts
        for c, n in enumerate(counts):
            got = data.class_images(torch.tensor([c]), torch.arange(n)[None])
            assert got.shape == (1, n, 3, SIZE, SIZE) and got.dtype == torch.uint8
            expected = torch.tensor([colour(split, c, i) for i in range(n)], dtype=torch.float64)
            tolerance = 3 if form == "mini-csv" else 0  # JPEG
            assert (got[0, :, :, SIZE // 2, SIZE // 2].double() - expected).abs().max() <= tolerance, (split, c)


def test_csv_images_are_decoded_once_into_the_cache(tmp_path):
    load = LOADERS["mini-csv"](tmp_path)
    first = load("val")
    cached = tmp_path / "cache" / "miniimagenet_val_84px.npz"
    assert cached.is_file()
    for f in (tmp_path / "data" / "images").iterdir():
        f.unlink()  # the cache alone serves the second load
    again = load("val")
    assert np.array_equal(first.images, again.images)


def test_python2_pickles_load(tmp_path):
    """The original tieredImageNet labels were pickled by Python 2: str objects that are not ASCII."""
    raw = b"\x80\x02}q\x00(U\x0elabel_specificq\x01]q\x02(K\x00K\x01eU\x12label_specific_strq\x03]q\x04(U\x04caf\xe9q\x05U\x01bq\x06eu."
    path = tmp_path / "labels.pkl"
    path.write_bytes(raw)
    assert _unpickle(path) == {"label_specific": [0, 1], "label_specific_str": ["café", "b"]}


def _png(colour_: tuple) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(np.array(colour_, np.uint8), (SIZE, SIZE, 3)).copy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _real_shaped() -> dict:
    """What the shared pickles hold, at their shapes and types (fewer images)."""
    rng = np.random.default_rng(0)
    pngs = [_png((c, 2 * c, 3 * c)) for c in range(4)]
    return {
        "mini": {"image_data": rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8),
                 "class_dict": {"n01532829": list(range(6)), "n01558993": list(range(6, 12))}},
        "tiered labels": {"label_specific": np.arange(12, dtype=np.int64) % 3, "label_general": np.zeros(12, np.int64),
                          "label_specific_str": ["n01530575", "n01531178", "n01532829"],
                          "label_general_str": ["bird"], "counts": [np.int64(4), np.float64(0.5), 3, 2.5, True]},
        "tiered images (bytes)": pngs,
        "tiered images (object array)": np.array(pngs, dtype=object),
    }


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and all(map(_equal, a.flat, b.flat))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", [*sorted({2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL}), "numpy 1"])
@pytest.mark.parametrize("kind", sorted(_real_shaped()))
def test_pickles_of_the_shared_forms_load_at_every_protocol(kind, protocol, tmp_path):
    data = _real_shaped()[kind]
    raw = pickle.dumps(data, protocol=2 if protocol == "numpy 1" else protocol)
    if protocol == "numpy 1":  # the module names numpy 1 wrote, which numpy 2 still reads
        raw = raw.replace(b"numpy._core.", b"numpy.core.")
    path = tmp_path / "data.pkl"
    path.write_bytes(raw)
    assert _equal(_unpickle(path), data)


def test_numpy_1_arrays_of_protocol_5_load(tmp_path):
    """numpy 1 names the array constructor of protocol 5 numpy.core.numeric._frombuffer; numpy 2 reads it with a warning
    that the loader keeps to itself."""
    path = tmp_path / "array.pkl"
    path.write_bytes(b"\x80\x05cnumpy.core.numeric\n_frombuffer\n(C\x03abcVu1\n(K\x03tVC\ntR.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _equal(_unpickle(path), np.frombuffer(b"abc", np.uint8))


class _Payload:
    """Unpickling it calls `call` with `args`: what a pickle that runs code does."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


PAYLOADS = {"os.system": lambda marker: _Payload(os.system, f"touch {shlex.quote(str(marker))}"),
            "open": lambda marker: _Payload(open, str(marker), "w")}
NAMES = {"os.system": f"{os.system.__module__}.system", "open": f"{open.__module__}.open"}  # posix.system, io.open


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(payload, tmp_path):
    marker = tmp_path / "marker"
    data = {"image_data": np.zeros((2, SIZE, SIZE, 3), np.uint8), "class_dict": {"a": [0, 1]}, "x": PAYLOADS[payload](marker)}
    (tmp_path / "control.pkl").write_bytes(pickle.dumps({"x": PAYLOADS[payload](tmp_path / "control")}))
    with open(tmp_path / "control.pkl", "rb") as f:
        pickle.load(f)  # the payload is live: pickle.load runs it
    assert (tmp_path / "control").exists()
    root = tmp_path / "data"
    root.mkdir()
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(UnsafePickleError) as error:
        load_miniimagenet(root, "train")
    message = str(error.value)
    assert str(root / "mini-imagenet-cache-train.pkl") in message and f"names {NAMES[payload]}" in message
    assert "numpy arrays, dtypes and scalars, and dict, list, tuple, str, bytes, int and float" in message
    assert not marker.exists()


def test_the_example_refuses_such_a_pickle_in_one_line(tmp_path):
    import miniimagenet_maml

    marker = tmp_path / "marker"
    root = write_mini_pickles(tmp_path / "data")
    (root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": PAYLOADS["os.system"](marker)}))
    with pytest.raises(SystemExit, match=r"^error: .*mini-imagenet-cache-train\.pkl: refused: the pickle names"):
        miniimagenet_maml.main(tiny(root, tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["train_labels.pkl", "train_images_png.pkl"])
def test_tiered_pickles_are_read_the_same_way(name, tmp_path):
    marker = tmp_path / "marker"
    root = write_tiered(tmp_path / "data", "png")
    (root / name).write_bytes(pickle.dumps([PAYLOADS["open"](marker)], protocol=2))
    with pytest.raises(UnsafePickleError, match=f"{name}: refused: the pickle names {NAMES['open']}"):
        load_tieredimagenet(root, "train")
    assert not marker.exists()


@pytest.mark.parametrize(("raw", "message"), [
    (b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", "bytes encoded as 'rot13'"),  # only latin-1, as pickle writes bytes
    (pickle.dumps({"label_specific": [0, 1]})[:-5], "not a readable pickle"),
])
def test_other_pickles_are_short_errors(raw, message, tmp_path):
    path = tmp_path / "labels.pkl"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        _unpickle(path)


def test_tasks_sample_from_classes_of_different_sizes(tmp_path):
    data = LOADERS["tiered-png"](tmp_path)("train")
    sampler = TaskSampler(data, ways=3, shots=1, queries=3, generator=torch.Generator().manual_seed(0))
    x_s, y_s, x_q, y_q = sampler.sample_batch(5)
    assert x_s.shape == (5, 3, 3, SIZE, SIZE) and x_q.shape == (5, 9, 3, SIZE, SIZE)
    assert y_s.tolist() == [[0, 1, 2]] * 5 and y_q.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 5
    assert x_s.dtype == torch.float32 and float(x_s.min()) >= 0 and float(x_s.max()) <= 1
    with pytest.raises(ValueError, match="exceeds the 5 images of the smallest class"):
        TaskSampler(data, ways=3, shots=2, queries=4, generator=torch.Generator())


@pytest.mark.parametrize("loader", [load_miniimagenet, load_tieredimagenet])
def test_missing_data_says_it_cannot_be_downloaded(loader, tmp_path):
    with pytest.raises(DataNotFound, match="cannot be downloaded automatically: it is a subset of ImageNet") as error:
        loader(tmp_path, "train")
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match="split must be one of"):
        loader(tmp_path, "training")


def test_image_split_checks_its_labels():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageSplit(np.zeros((3, 84, 84, 3), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="labels must lie in 0..1"):
        ImageSplit(np.zeros((2, 84, 84, 3), np.uint8), np.array([0, 2]), ["a", "b"])


def tiny(root: Path, out: Path, *extra: str) -> list:
    return ["--data-root", str(root), "--out", str(out), "--ways", "3", "--shots", "1", "--queries", "2", "--steps", "1",
            "--eval-steps", "2", "--meta-batch", "2", "--iterations", "3", "--hidden", "4", "--eval-every", "1",
            "--val-tasks", "2", "--eval-tasks", "4", "--no-progress", *extra]


@pytest.mark.parametrize(("dataset", "form"), [("mini", "mini-pickle"), ("tiered", "tiered-npz")])
def test_the_example_runs_end_to_end_with_early_stopping(dataset, form, tmp_path):
    import miniimagenet_maml

    root = tmp_path / "data"
    (write_mini_pickles if form == "mini-pickle" else lambda r: write_tiered(r, "npz"))(root)
    results = miniimagenet_maml.main(tiny(root, tmp_path / "out", "--dataset", dataset, "--estimator", "binom"))
    assert results["dataset"] == {"mini": "miniImageNet", "tiered": "tieredImageNet"}[dataset]
    assert results["config"]["early_stopping"] and results["test"]["tasks"] == 4
    best = max(results["history"]["val"], key=lambda r: r["accuracy"])  # the first of equals
    assert results["tested_iteration"] == best["iteration"]
    assert (tmp_path / "out" / "results.json").is_file()


def test_the_example_without_data_is_a_short_error(tmp_path):
    import miniimagenet_maml

    with pytest.raises(SystemExit, match="error: miniImageNet not found in .*cannot be downloaded"):
        miniimagenet_maml.main(tiny(tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("preset", "shots", "meta_batch"), [("paper", 1, 4), ("paper-1shot", 1, 4), ("paper-5shot", 5, 2)])
def test_paper_presets_are_table_1s_protocol(preset, shots, meta_batch):
    """Finn et al. (2017) on miniImageNet: 5-way, Conv4-32, K = 5 at alpha = 0.01 (10 steps at test), 15 queries,
    20,000 iterations with early stopping; meta-batch 4 at 1 shot, 2 at 5 shots."""
    import miniimagenet_maml

    from fewshot.run import common_parser, parse

    parser = common_parser(miniimagenet_maml.__doc__, miniimagenet_maml.DEFAULTS, miniimagenet_maml.PRESETS, omniglot=False)
    args = parse(parser, ["--preset", preset, "--data-root", "unused"])
    assert (args.ways, args.shots, args.queries, args.meta_batch) == (5, shots, 15, meta_batch)
    assert (args.steps, args.eval_steps, args.inner_lr, args.hidden) == (5, 10, 0.01, 32)
    assert (args.iterations, args.early_stopping, args.eval_tasks) == (20000, True, 600)


def test_the_resnet12_example_trains_end_to_end(tmp_path):
    """--network resnet12 through main(): ResNet-12 (4-10-20-40) meta-trained on the generated 84x84 images."""
    import miniimagenet_maml

    root = write_mini_pickles(tmp_path / "data")
    results = miniimagenet_maml.main(tiny(root, tmp_path / "out", "--network", "resnet12", "--estimator", "exact",
                                          "--no-early-stopping"))
    assert results["config"]["network"] == "resnet12" and results["test"]["tasks"] == 4
    assert [r["iteration"] for r in results["history"]["train"]] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in results["history"]["train"])
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)["model"]
    assert state["features.3.body.6.weight"].shape == (40, 40, 3, 3)  # the last block's third convolution
    torch.manual_seed(0)  # the seed main() builds the network from: meta-training moved every block
    initial = build_network("resnet12", in_channels=3, out_features=3, image_size=84, hidden=4).state_dict()
    assert all(not torch.equal(initial[k], state[k]) for k in ("features.0.body.0.weight", "features.3.shortcut.0.weight",
                                                                "head.weight"))


def test_a_checkpoint_resumes_only_with_its_network(tmp_path):
    import miniimagenet_maml

    root = write_mini_pickles(tmp_path / "data")
    miniimagenet_maml.main(tiny(root, tmp_path / "out", "--iterations", "1", "--eval-every", "0"))
    with pytest.raises(SystemExit, match=r"other settings \(network: conv4 -> resnet12"):
        miniimagenet_maml.main(tiny(root, tmp_path / "out", "--network", "resnet12", "--resume"))


@pytest.mark.parametrize(("preset", "shots", "steps", "lr"), [("resnet12-1shot", 1, 15, 0.05), ("resnet12-5shot", 5, 20, 0.1)])
def test_resnet12_presets_are_ye_and_chaos_inner_loops(preset, shots, steps, lr):
    """Ye & Chao (ICLR 2022), MAML on ResNet-12: K = 15 at alpha = 0.05 (1-shot), K = 20 at alpha = 0.1 (5-shot)."""
    import miniimagenet_maml

    from fewshot.run import common_parser, parse

    parser = common_parser(miniimagenet_maml.__doc__, miniimagenet_maml.DEFAULTS, miniimagenet_maml.PRESETS, omniglot=False)
    args = parse(parser, ["--preset", preset, "--data-root", "unused"])
    assert (args.network, args.hidden, args.ways, args.shots) == ("resnet12", 64, 5, shots)
    assert (args.steps, args.eval_steps, args.inner_lr) == (steps, steps, lr)
