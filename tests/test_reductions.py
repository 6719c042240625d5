"""Per-task reductions: which tasks hold a NaN or an infinity, whatever the reduction's plan."""

import pytest
import torch

from binom_opt.core import reductions


@pytest.mark.parametrize("concatenated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_tasks_flags_nan_and_inf_and_never_a_large_finite_value(monkeypatch, concatenated, dtype):
    if not concatenated:  # above the cap: the largest magnitude of each tensor
        monkeypatch.setattr(reductions, "CONCATENATED_VALUES", 0)
    big = torch.finfo(dtype).max
    w = torch.ones(4, 3, 2, dtype=dtype)
    b = torch.full((4, 3), big, dtype=dtype)  # sums of these overflow; no task is flagged for them
    w[1, 2, 0], b[2, 0] = float("nan"), float("-inf")
    empty = torch.ones(4, 0, dtype=dtype)
    assert reductions.nonfinite_tasks([w, empty, b]).tolist() == [False, True, True, False]
    assert reductions.nonfinite_tasks([b]).tolist() == [False, False, True, False]
    assert reductions.nonfinite_tasks([torch.ones(1, 5, dtype=dtype)]).tolist() == [False]
    assert reductions.nonfinite_tasks([empty]).tolist() == [False] * 4  # no values: no task flagged, one flag each


def test_round_norms_multiply_each_round_by_its_factor():
    rounds = reductions.RoundNorms()
    rounds.add({"a": torch.tensor([[3.0]]), "b": torch.tensor([[4.0]])}, -2.0)  # a round of -2 * (3, 4)
    rounds.add({"a": torch.tensor([[1.0]]), "b": torch.tensor([[0.0]])})
    assert [r.tolist() for r in rounds.rounds()] == [[10.0], [1.0]]


@pytest.mark.parametrize("tasks", [1, 2])
@pytest.mark.parametrize("sizes", ["equal", "unequal", "reshaped", "above the cap", "strided", "bfloat16"])
def test_held_rounds_give_the_norms_of_rounds_reduced_one_by_one(monkeypatch, sizes, tasks):
    """Held rounds are reduced at once (one concatenation where they can be, else their entries in one call): the
    norms of rounds reduced as they come."""
    if sizes == "above the cap":
        monkeypatch.setattr(reductions, "CONCATENATED_VALUES", 1)
    gen = torch.Generator().manual_seed(2)
    held, each = reductions.RoundNorms(hold=True), reductions.RoundNorms()
    for r in range(3):
        width = 3 if sizes != "unequal" else 3 + r
        vector = {"a": torch.randn(tasks, width, generator=gen), "b": torch.randn(tasks, 2, 2, generator=gen)}
        if sizes == "strided":
            vector["b"] = vector["b"].transpose(1, 2)
        if sizes == "reshaped" and r == 1:  # as many values, another shape: no stack of the entry's rounds
            vector["b"] = vector["b"].reshape(tasks, 4)
        if sizes == "bfloat16":
            vector = {n: t.bfloat16() for n, t in vector.items()}
        factor = [1.0, -0.5, 2.0][r]
        held.add(vector, factor)
        each.add(vector, factor)
    for a, b in zip(held.rounds(), each.rounds(), strict=True):
        assert a.shape == (tasks,) and a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    assert reductions.RoundNorms(hold=True).rounds() is None


@pytest.mark.parametrize("one_task", [False, True])
@pytest.mark.parametrize("concatenated", [True, False])
def test_change_norms_are_the_round_norms_of_the_differences(monkeypatch, concatenated, one_task):
    if not concatenated:
        monkeypatch.setattr(reductions, "CONCATENATED_VALUES", 0)
    gen = torch.Generator().manual_seed(3)
    B = 1 if one_task else 2
    vectors = [[torch.randn(B, 3, generator=gen), torch.randn(B, 2, 2, generator=gen)] for _ in range(4)]
    rounds = reductions.RoundNorms()
    for before, after in zip(vectors, vectors[1:]):
        rounds.add({"a": after[0] - before[0], "b": after[1] - before[1]})
    given = [[t.squeeze(0) for t in vector] for vector in vectors] if one_task else vectors  # without the task axis
    got = reductions.change_norms(given, one_task=one_task)
    assert len(got) == 3 and all(n.shape == (B,) and n.dtype == torch.float64 for n in got)
    for a, b in zip(got, rounds.rounds()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("concatenated", [True, False])
def test_nonfinite_groups_flag_each_group_as_one_call_each(monkeypatch, concatenated):
    if not concatenated:
        monkeypatch.setattr(reductions, "CONCATENATED_VALUES", 0)
    big = torch.finfo(torch.float32).max
    w, b = torch.ones(4, 3, 2), torch.full((4, 3), big)
    w[1, 2, 0], b[2, 0] = float("nan"), float("-inf")
    v = torch.ones(4, 5)
    v[3, 1] = float("inf")
    groups = [[w, torch.ones(4, 0)], [b, v], [], [torch.ones(4, 0)]]
    got = reductions.nonfinite_groups(groups)
    assert got.shape == (4, 4) and got.dtype == torch.bool
    assert got.tolist() == [reductions.nonfinite_tasks(group).tolist() if group else [False] * 4 for group in groups]
    assert got.tolist()[:2] == [[False, True, False, False], [False, False, True, True]]
    assert reductions.nonfinite_groups([[], []]).tolist() == [[False], [False]]


@pytest.mark.parametrize("axis", [True, False])
@pytest.mark.parametrize("widths", ["equal", "unequal", "above the cap"])
def test_one_task_groups_are_flagged_from_one_flat_concatenation(monkeypatch, widths, axis):
    """One task's groups (``tasks=1``) are flagged from one flat concatenation, with or without the task axis: the
    flags of each tensor's own check."""
    if widths == "above the cap":
        monkeypatch.setattr(reductions, "CONCATENATED_VALUES", 0)
    first = [torch.ones(3, 2), torch.ones(0), torch.ones(4)]
    second = [torch.ones(3, 2), torch.ones(4)] if widths != "unequal" else [torch.ones(5)]
    for bad in [None, (0, 0), (1, 0), (1, -1)]:
        groups = [[t.clone() for t in first], [t.clone() for t in second]]
        if bad is not None:
            group, index = bad
            groups[group][index].view(-1)[0] = float("nan") if index else float("inf")
        given = [[t.unsqueeze(0) for t in group] for group in groups] if axis else groups
        got = reductions.nonfinite_groups(given, tasks=1)
        expected = [[any(not bool(torch.isfinite(t).all()) for t in group)] for group in groups]
        assert got.shape == (2, 1) and got.dtype == torch.bool and got.tolist() == expected


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("widths", ["equal", "unequal", "above the cap", "an empty group"])
def test_flags_and_norm_together_are_the_flags_and_the_norms_apart(monkeypatch, widths, tasks):
    """One task's flags and the norm of the outer gradient come from one concatenation: the same flags as
    nonfinite_groups, and the norm of every value together (the total the stats read); a meta-batch's, or many values,
    as nonfinite_groups and entry_norms give them."""
    if widths == "above the cap":
        monkeypatch.setattr(reductions, "CONCATENATED_VALUES", 0)
    gen = torch.Generator().manual_seed(5)
    first = [torch.randn(tasks, 3, 2, generator=gen), torch.randn(tasks, 4, generator=gen)]
    second = {"equal": [torch.randn(tasks, 10, generator=gen)], "unequal": [torch.randn(tasks, 5, generator=gen)],
              "above the cap": [torch.randn(tasks, 10, generator=gen)], "an empty group": []}[widths]
    g = [torch.randn(tasks, 2, 2, generator=gen, dtype=torch.float64), torch.randn(tasks, 3, generator=gen, dtype=torch.float64)]
    for bad in [None, 0, 1]:
        groups = [[t.clone() for t in first], [t.clone() for t in second]]
        if bad is not None and groups[bad]:
            groups[bad][-1][-1, 0] = float("nan")
        flags, norm = reductions.nonfinite_groups_and_norm(groups, g, tasks)
        assert flags.tolist() == reductions.nonfinite_groups(groups, tasks).tolist()
        if tasks == 1 and widths not in ("above the cap", "an empty group"):  # together: the total, in the widest dtype
            expected = torch.cat([t.flatten() for t in g]).norm().view(1, 1)
            assert norm.dtype == torch.float64 and torch.equal(norm, expected)
        else:
            assert torch.equal(norm, reductions.entry_norms(g))


def test_flat_concatenates_every_value_in_order_promoted_to_the_widest():
    got = reductions.flat([torch.tensor([[1, 2]], dtype=torch.int64), torch.tensor([0.5], dtype=torch.float64), torch.ones(0)])
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 2.0, 0.5]


def test_one_task_flags_come_from_the_norms_and_an_overflowed_norm_is_checked_exactly():
    """One task's checks read the norms of its final point and meta-gradient (one operator with the outer gradient's
    norm): a NaN or infinite value flags its group; finite values whose squares overflow the norm are checked exactly,
    and flag nothing."""
    from binom_opt.core.checks import flags_from_norms

    huge, nan = [torch.full((3,), 1e30)], [torch.tensor([1.0, float("nan")])]
    for final, vectors, adjoints, expected in [([torch.ones(2)], [torch.ones(2)], [], ([0.0], [0.0])),
                                               (huge, [torch.ones(3)], [], ([0.0], [0.0])),
                                               ([torch.ones(2)], nan, [], ([0.0], [1.0])),
                                               ([torch.tensor([float("inf"), 0.0])], [torch.ones(2)], [1.0], ([1.0], [1.0]))]:
        norms = reductions.group_norms([final, vectors], 1)
        assert norms is not None
        host = {"group_norms": norms.tolist(), **({"bad_adjoints": adjoints} if adjoints else {})}
        flags_from_norms(host, final, vectors)
        assert (host["final_bad"], host["bad"]) == expected and "group_norms" not in host
    assert reductions.group_norms([[torch.ones(2)], [torch.ones(3)]], 1) is None  # unequal: the flags on the device
    assert reductions.group_norms([[torch.ones(2, 2)], [torch.ones(2, 2)]], 2) is None


def test_a_finite_meta_gradient_whose_squares_overflow_is_no_error_and_a_nan_one_is():
    import torch.nn.functional as F

    import binom_opt as bo

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    for estimator in (bo.FirstOrder(), bo.Exact()):
        learner = bo.MAML(model, lr=0.1, estimator=estimator).clone()
        learner.adapt(lambda m: F.mse_loss(m(x), y))
        model.zero_grad()
        (F.mse_loss(learner(x), y) * 1e30).backward()  # finite, its squares beyond float32
        assert bool(torch.isfinite(model.weight.grad).all()) and float(model.weight.grad.abs().max()) > 1e28
        learner = bo.MAML(model, lr=0.1, estimator=estimator).clone()
        learner.adapt(lambda m: F.mse_loss(m(x), y))
        with pytest.raises(FloatingPointError, match="meta-gradient is not finite"):
            (F.mse_loss(learner(x), y) * float("nan")).backward()
