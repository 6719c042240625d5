"""README.md's first lines, its usage example and its switching diffs must stay true (they are run here).

The usage example is also the first snippet of docs/getting-started.md, and the diffs are also on
docs/switching.md: both copies run, with the same checks.
"""

import re
from pathlib import Path

import higher
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import binom_opt as bo

import references as R
from cases import small_model, tasks
from l2l_reference import l2l
from omniglot_tasks import available, real_tasks

pytestmark = pytest.mark.cpu_only  # the example scripts, processes and files run on the host

TOL, STEPS = 1e-10, 3
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
USAGE_DOCUMENTS = ["README.md", "docs/getting-started.md"]  # whose first python block is the usage example
DIFF_DOCUMENTS = ["README.md", "docs/switching.md"]  # that show the three switching diffs


def code_blocks(language, text=README):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_the_two_commands():
    first = code_blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    assert first[0].startswith("pip install torch==2.13.0") and first[0].endswith("python examples/omniglot_anil.py")
    assert first[1].startswith("pip install torch==2.13.0") and first[1].endswith("python -m pytest -q")
    assert README.index("```bash") < README.index("\n## ")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = code_blocks("bash")[0].strip().splitlines()[1]
    assert test_command in ci


@pytest.mark.parametrize("document", USAGE_DOCUMENTS)
def test_usage_example_runs(document):
    blocks = code_blocks("python", (ROOT / document).read_text())
    assert blocks, f"{document} has no python example"
    namespace = {}
    exec(compile(blocks[0], f"{document} usage example", "exec"), namespace)
    assert namespace["engine"].last_stats.hvp_count > 0


# --- the switching diffs of the README run for real ---------------------------------------------


def diff_sides(block):
    before, after = [], []
    for line in block.splitlines():
        marker, code = line[:1], line[1:]
        if marker in (" ", "-"):
            before.append(code)
        if marker in (" ", "+"):
            after.append(code)
    return "\n".join(before), "\n".join(after)


def switching_diffs(document):
    return re.findall(r"(\d) lines? out, (\d) in(?:(?!```).)*```diff\n(.*?)```", (ROOT / document).read_text(), flags=re.S)


DIFFS = {document: switching_diffs(document) for document in DIFF_DOCUMENTS}


@pytest.mark.parametrize("document", DIFF_DOCUMENTS)
def test_readme_has_the_three_switching_diffs_and_counts_their_lines(document):
    assert len(DIFFS[document]) == 3
    for removed, added, block in DIFFS[document]:
        lines = block.splitlines()
        assert (sum(line.startswith("-") for line in lines), sum(line.startswith("+") for line in lines)) == (int(removed), int(added))


def omniglot_net(ways=5):
    """The network of higher's maml-omniglot example: Conv-BatchNorm(momentum=1)-ReLU(inplace)-MaxPool x 3."""
    torch.manual_seed(0)
    blocks = []
    for channels in (1, 64, 64):
        blocks += [torch.nn.Conv2d(channels, 64, 3), torch.nn.BatchNorm2d(64, momentum=1, affine=True),
                   torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2, 2)]
    return torch.nn.Sequential(*blocks, torch.nn.Flatten(), torch.nn.Linear(64, ways)).double()


def run_client(code, mode):
    """Run a README loop on a fresh network (in ``mode``) over real Omniglot tasks; the meta-gradients it produced."""
    net = omniglot_net()
    x_spt, y_spt, x_qry, y_qry = real_tasks(2, queries=2)
    with torch.no_grad():  # running statistics away from their initialisation, for eval mode
        net(x_qry.flatten(0, 1))
    net.train(mode == "train")
    tasks = [(x_spt[i], y_spt[i], x_qry[i], y_qry[i]) for i in range(2)]
    namespace = dict(
        torch=torch, F=F, bo=bo, l2l=l2l, higher=higher, net=net, model=net, inner_opt=torch.optim.SGD(net.parameters(), lr=0.1),
        task_num=2, n_inner_iter=3, x_spt=x_spt, y_spt=y_spt, x_qry=x_qry, y_qry=y_qry, tasks=tasks, meta_batch_size=2,
        fast_lr=0.1, adaptation_steps=3, loss=torch.nn.CrossEntropyLoss(reduction="mean"),
    )
    exec(compile(code, "README.md", "exec"), namespace)
    return {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.skipif(not available(), reason="the Omniglot zips are not at $OMNIGLOT_ROOT")
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("index", range(2), ids=["learn2learn", "higher"])
@pytest.mark.parametrize("document", DIFF_DOCUMENTS)
def test_switched_client_loops_give_the_original_meta_gradient(document, index, mode):
    before, after = diff_sides(DIFFS[document][index][2])
    original, switched = run_client(before, mode), run_client(after, mode)
    assert R.relative_error(switched, original) < TOL
    explicit = run_client(after.replace("first_order=False)", "first_order=False, estimator=bo.Exact())")
                          .replace("bo.innerloop_ctx(net, inner_opt, ", "bo.innerloop_ctx(net, inner_opt, estimator=bo.Exact(), "), mode)
    assert R.relative_error(explicit, original) < TOL
    if mode == "eval":  # the running statistics matter: another policy gives another meta-gradient
        other = run_client(after.replace("first_order=False)", "first_order=False, bn='transductive')")
                           .replace("bo.innerloop_ctx(net, inner_opt, ", "bo.innerloop_ctx(net, inner_opt, bn='transductive', "), mode)
        assert R.relative_error(other, original) > 1e-3


def run_snippet(code):
    """Run the torch.func README snippet on a fresh model and return the gradients it produced."""
    model = small_model()
    params = {n: p.detach() for n, p in model.named_parameters()}
    inner_loss = lambda p, x, y: F.cross_entropy(functional_call(model, p, (x,)), y)
    namespace = dict(torch=torch, F=F, bo=bo, model=model, tasks=tasks(), steps=STEPS, lr=0.1, params=params,
                     inner_loss=inner_loss, meta_grads=[torch.zeros_like(p) for p in params.values()])
    exec(compile(code, "README.md", "exec"), namespace)
    return dict(zip(params, namespace["meta_grads"]))


@pytest.mark.parametrize("document", DIFF_DOCUMENTS)
def test_torch_func_switch_gives_the_original_meta_gradient(document):
    before, after = diff_sides(DIFFS[document][2][2])
    assert R.relative_error(run_snippet(after), run_snippet(before)) < TOL


def test_readme_and_switching_page_show_the_same_diffs():
    assert DIFFS["README.md"] == DIFFS["docs/switching.md"]
