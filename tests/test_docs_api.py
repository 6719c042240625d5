"""The API reference is complete: every public name has a docstring, full annotations and an entry on a reference page.

mkdocstrings renders what it finds and skips an object without a docstring silently, so this is the
check that fails when a public name, or a public method or property of a public class, has none.
"""

import inspect
import re
from pathlib import Path

import pytest

import binom_opt as bo
from binom_opt import bounds, distributed, functional, innerloop, maml

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
MODULES = {"binom_opt": bo, "binom_opt.functional": functional, "binom_opt.distributed": distributed, "binom_opt.bounds": bounds}
# What the drop-ins hand out (learn2learn's learner, higher's fmodel and diffopt): public through them.
HANDED_OUT = {"binom_opt.maml.MAMLLearner": maml.MAMLLearner, "binom_opt.innerloop.FunctionalModel": innerloop.FunctionalModel,
              "binom_opt.innerloop.DifferentiableOptimizer": innerloop.DifferentiableOptimizer}


def public_objects():
    found = dict(HANDED_OUT)
    for prefix, module in MODULES.items():
        for name in module.__all__:
            found[f"{prefix}.{name}"] = getattr(module, name)
    return found


def members(cls):
    """The public methods and properties a class defines itself (inherited ones are documented where defined)."""
    for name, value in vars(cls).items():
        if name.startswith("_") or not (inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))):
            continue
        yield name, value


PUBLIC = public_objects()
CALLABLES = {path: obj for path, obj in PUBLIC.items() if inspect.isfunction(obj)}
CALLABLES.update({f"{path}.{name}": getattr(value, "__func__", value) for path, obj in PUBLIC.items() if inspect.isclass(obj)
                  for name, value in members(obj) if not isinstance(value, property)})


@pytest.mark.parametrize("path", sorted(PUBLIC))
def test_public_name_has_a_docstring(path):
    obj = PUBLIC[path]
    assert inspect.getdoc(obj), f"{path} has no docstring: the API reference would show nothing for it"
    if inspect.isclass(obj):
        missing = [name for name, _ in members(obj) if not inspect.getdoc(getattr(obj, name))]  # an override may inherit its doc
        assert missing == [], f"{path}: methods/properties without a docstring: {missing}"


def test_every_public_name_is_on_a_reference_page():
    directives = set()
    for page in REFERENCE.glob("*.md"):
        directives |= set(re.findall(r"^::: (\S+)", page.read_text(), flags=re.M))
    documented_modules = {d for d in directives if d in MODULES}
    missing = [path for path in PUBLIC if path not in directives and path.rsplit(".", 1)[0] not in documented_modules]
    assert missing == [], f"no reference entry (a '::: name' line under docs/reference/) for {missing}"


@pytest.mark.parametrize("path", sorted(CALLABLES))
def test_public_callable_is_fully_annotated(path):
    fn = CALLABLES[path]
    signature = inspect.signature(fn)
    unannotated = [name for name, p in signature.parameters.items()
                   if p.annotation is inspect.Parameter.empty and name not in ("self", "cls")]
    assert unannotated == [], f"{path}: parameters without a type annotation: {unannotated}"
    if fn.__name__ != "__init__":
        assert signature.return_annotation is not inspect.Signature.empty, f"{path} has no return annotation"
