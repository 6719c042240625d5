"""The call context: the module policy around support-loss calls, and errors that say what to change."""

import pytest

from binom_opt.core import norm_layers
from binom_opt.core.calls import calls
from binom_opt.core.options import Options


@pytest.mark.parametrize("modules", [True, False])
def test_the_module_policy_is_entered_only_for_calls_that_run_modules(modules):
    with calls(Options(), None, "inner step 0", modules=modules):
        assert bool(norm_layers._active) == modules
    assert not norm_layers._active


@pytest.mark.parametrize("modules", [True, False])
def test_known_failures_are_explained_either_way(modules):
    with pytest.raises(RuntimeError, match="no second derivative.*Raised during the Hessian-vector products at steps 0..1"):
        with calls(Options(), None, "the Hessian-vector products at steps 0..1", modules=modules):
            raise RuntimeError("derivative for aten::_flash_attention_backward is not implemented")
