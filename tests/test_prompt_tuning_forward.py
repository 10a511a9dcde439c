"""Prompt tuning's forward with per-token inputs PEFT ignores (issue 19, item 12): `position_ids` and
`token_type_ids` describe the real tokens only; PEFT drops them with a warning, so do we — same logits and loss
as PEFT's model (they used to crash on the [B, n + T] vs [B, T] shape mismatch)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import pair, tokens
from conftest import require

import lowrank_ext as L

peft = require("peft", "0.21.2")


@pytest.mark.parametrize("arg", ["position_ids", "token_type_ids"])
def test_ignored_token_inputs_match_peft(arg):
    base, ref = pair("llama")
    pm = peft.get_peft_model(ref, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    ours = L.inject(base, L.PromptTuningConfig(5))
    with torch.no_grad():
        ours.prompt_embeddings["default"].copy_(pm.prompt_encoder["default"].embedding.weight)
    ids = tokens()
    value = 2 * torch.arange(ids.shape[1]).expand_as(ids) if arg == "position_ids" else torch.zeros_like(ids)
    with pytest.warns(UserWarning, match=r"not supported for parameter efficient tuning"):
        b = pm(input_ids=ids, labels=ids, **{arg: value})
    with pytest.warns(UserWarning, match=rf"lowrank_ext::PromptTuningModel.forward: {arg} is ignored with prompt "
                                         rf"tuning, as PEFT ignores it"):
        a = ours(input_ids=ids, labels=ids, **{arg: value})
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    # the adapters disabled: the base model gets them as given (PEFT's disable_adapter does the same)
    if arg == "position_ids":
        with L.disable_adapters(ours), pm.disable_adapter():
            a, b = ours(input_ids=ids, position_ids=value), pm(input_ids=ids, position_ids=value)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a.logits, ref(input_ids=ids).logits, atol=1e-4)  # RoPE: spaced positions count
