"""Options: one frozen object, validated once; keyword arguments as sugar at every entry point."""

import dataclasses

import pytest
import torch

import binom_opt as bo
from binom_opt.functional import meta_gradient

from cases import mlp_sine


def test_options_are_frozen_and_keywords_replace_fields():
    options = bo.Options(hvp="rev", memory_budget="1MiB")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.hvp = "fwd"
    resolved = bo.Options.resolve(options, chunk_size=2)
    assert (resolved.hvp, resolved.memory_budget, resolved.chunk_size) == ("rev", "1MiB", 2)
    assert bo.Options.resolve() == bo.Options()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hvp": "forward"}, "hvp must be one of"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory_budget": "lots"}, "memory_budget"),
        ({"randomness": "fresh"}, "randomness must be one of"),
        ({"bn": "running"}, "bn must be one of"),
        ({"nan_policy": "ignore"}, "nan_policy must be one of"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
    ],
)
def test_bad_options_name_the_field_and_the_choices(fields, message):
    with pytest.raises(ValueError, match=message):
        bo.Options(**fields)


def test_unknown_keywords_list_the_options():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['chunksize'\].*chunk_size"):
        bo.Options.resolve(chunksize=2)
    with pytest.raises(TypeError, match="options must be a binom_opt.Options"):
        bo.Options.resolve({"hvp": "rev"})


def test_every_entry_point_takes_options_and_keywords_alike():
    case = mlp_sine()
    opt = case.inner_opt()
    options = bo.Options(chunk_size=3, memory_budget="1GiB")
    engine = bo.MetaGradientEngine(case.model, opt, 3, options=options)
    assert engine.options == options
    assert bo.MetaGradientEngine(case.model, opt, 3, chunk_size=3, memory_budget="1GiB").options == options
    assert bo.MAML(case.model, lr=0.1, options=options).options == options
    with pytest.raises(ValueError, match="randomness must be one of"):
        bo.MAML(case.model, lr=0.1, randomness="fresh")
    with pytest.raises(ValueError, match="bn must be one of"):
        with bo.innerloop_ctx(case.model, opt, bn="running"):
            pass
    with pytest.raises(TypeError, match="Unknown option"):
        meta_gradient(lambda p: p["w"].sum(), lambda p: p["w"].sum(), {"w": torch.ones(2)}, steps=1, lr=0.1, hvps="rev")
