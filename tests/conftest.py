"""Test options: ``pytest --device cuda`` runs every device-independent test on that device; hypothesis profiles.

With ``--device D`` (default ``cpu``) new tensors and modules are made on ``D`` (``torch.set_default_device``),
seeded generators come from ``cases.generator`` on ``D``, and TF32 is off on CUDA, so float64 references
stay exact. Tests marked ``cpu_only`` (resident-memory measurements, processes, gloo, files and the example
bitwise reproducibility) run with ``--device cpu`` only; ``--device cpu`` runs the whole suite, as plain ``pytest`` does.

``pytest --hypothesis-profile ci`` (or CI=1) runs hypothesis derandomized; tests that fix ``max_examples`` in
their own ``@settings`` keep it.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)

if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for the device-independent tests (e.g. cuda)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: runs on the CPU only: host memory, processes, files, the examples, bitwise reproducibility")
    device = torch.device(config.getoption("--device"))
    if device.type != "cpu":
        torch.set_default_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    device = config.getoption("--device")
    if torch.device(device).type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"cpu_only: runs with --device cpu, not {device}")
    for item in items:
        if item.get_closest_marker("cpu_only"):
            item.add_marker(skip)
