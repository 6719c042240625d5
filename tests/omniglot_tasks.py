"""A few real Omniglot tasks, read straight from the canonical zip with Pillow (no example code involved)."""

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(os.environ.get("OMNIGLOT_ROOT") or Path(__file__).resolve().parents[2] / "shared/data/omniglot")


def available() -> bool:
    return (ROOT / "images_background.zip").is_file()


def real_tasks(count: int, ways: int = 5, shots: int = 1, queries: int = 3, seed: int = 0, dtype=torch.float64):
    """``count`` tasks ``(x_support, y_support, x_query, y_query)`` stacked over tasks: images ``[count, ways*n, 1, 28, 28]``
    (ink = 1), labels ``[count, ways*n]``, from characters of ``images_background.zip`` drawn with ``seed``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(ROOT / "images_background.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))
        by_character = {}
        for name in names:
            by_character.setdefault(name.rsplit("/", 1)[0], []).append(name)
        characters = sorted(by_character)

        def image(name):
            with archive.open(name) as handle:
                picture = Image.open(handle).convert("L").resize((28, 28), Image.Resampling.BOX)
            return 1.0 - torch.from_numpy(np.asarray(picture, dtype=np.float64) / 255.0)

        parts = {"xs": [], "ys": [], "xq": [], "yq": []}
        for _ in range(count):
            chosen = rng.choice(len(characters), ways, replace=False)
            support, query = [], []
            for label, c in enumerate(chosen):
                drawings = rng.choice(by_character[characters[c]], shots + queries, replace=False)
                support += [(image(n), label) for n in drawings[:shots]]
                query += [(image(n), label) for n in drawings[shots:]]
            for key, items in (("xs", support), ("xq", query)):
                parts[key].append(torch.stack([x for x, _ in items]).unsqueeze(1))
            parts["ys"].append(torch.tensor([y for _, y in support]))
            parts["yq"].append(torch.tensor([y for _, y in query]))
    return tuple(torch.stack(parts[k]).to(dtype) if k.startswith("x") else torch.stack(parts[k]) for k in ("xs", "ys", "xq", "yq"))
