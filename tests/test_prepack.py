"""oneDNN-prepacked linear layers (CPU float32): same numbers as PyTorch's, hooks and batching intact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from codi_attn.extract import extract
from codi_attn.model import load_codi
from codi_attn.prepack import PackedLinear, can_prepack, onednn_activation, packed, prepack_linear_layers

from test_extract import QUESTIONS

pytestmark = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                                reason="this PyTorch build has no oneDNN packed linear")

LINEARS_PER_BLOCK = {"gpt2": 4, "llama": 7}  # c_attn, c_proj, c_fc, mlp c_proj / q, k, v, o, gate, up, down


def test_packed_linear_equals_f_linear_for_linear_and_conv1d():
    """Non-square shapes, so that a Conv1D weight used untransposed ([in, out]) cannot pass."""
    torch.manual_seed(0)
    linear, conv = nn.Linear(24, 40), Conv1D(40, 24)  # Conv1D(nf=out, nx=in): weight [24, 40]
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 5, 24)
    for module in (linear, conv):
        twin = packed(module)
        assert (twin.in_features, twin.out_features) == (24, 40)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), module(x), atol=1e-5, rtol=1e-5)
    no_bias = PackedLinear(linear.weight, None)
    torch.testing.assert_close(no_bias(x), F.linear(x, linear.weight), atol=1e-5, rtol=1e-5)


def test_row_result_does_not_depend_on_the_batch():
    torch.manual_seed(1)
    layer = packed(nn.Linear(64, 96))
    x = torch.randn(32, 64)
    with torch.no_grad():
        whole = layer(x)
        for k in (0, 7, 31):
            torch.testing.assert_close(layer(x[k: k + 1])[0], whole[k], atol=1e-6, rtol=0)


def test_prepack_replaces_only_the_linear_layers():
    body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Sequential(Conv1D(16, 8), nn.GELU()))
    assert prepack_linear_layers(body) == (2, 0)
    assert [type(m).__name__ for m in body.modules()] == ["Sequential", "PackedLinear", "LayerNorm", "Sequential",
                                                          "PackedLinear", "GELU"]


class MLP(nn.Module):
    """The shape of GPT-2's MLP: act(c_fc(x)) then c_proj."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.c_fc, self.act, self.c_proj = Conv1D(32, 8), act, Conv1D(8, 32)
        nn.init.normal_(self.c_fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


@pytest.mark.parametrize("act, post_op", [(nn.GELU(approximate="tanh"), ("gelu", "tanh")),
                                          (nn.GELU(), ("gelu", "none")), (nn.SiLU(), ("swish", "")),
                                          (nn.ReLU(), None), (nn.Tanh(), None)])
def test_mlp_activation_is_fused_only_where_onednn_computes_the_same(act, post_op):
    """The activation is recognised by what it computes (a tanh GELU is not an exact GELU); fused, the MLP's
    output is unchanged; an activation oneDNN lacks stays a module of its own."""
    assert onednn_activation(act) == post_op
    torch.manual_seed(2)
    mlp, x = MLP(act), torch.randn(4, 3, 8)
    with torch.no_grad():
        before = mlp(x)
        assert prepack_linear_layers(mlp, ("c_fc", "act")) == (2, int(post_op is not None))
        after = mlp(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert isinstance(mlp.act, nn.Identity) == (post_op is not None)
    assert mlp.c_fc.post_op == (post_op or ("none", ""))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loaded_model_is_packed_and_matches_the_unpacked_one(family, request, unpacked_models):
    """The loader packs every decoder linear layer on CPU float32 (recorded in source); logits and extracted
    attention equal those of the same checkpoint with PyTorch's linear layers."""
    model, plain = request.getfixturevalue(f"{family}_model"), unpacked_models[family]
    n = LINEARS_PER_BLOCK[family] * model.n_layers
    assert model.source["linear"] == (f"oneDNN, {n} weights prepacked, {model.n_layers} with the MLP activation "
                                      "fused")  # GPT-2's tanh GELU, LLaMA's SiLU
    assert sum(isinstance(m, PackedLinear) for m in model.lm.modules()) == n
    assert plain.source["linear"] == "PyTorch default"
    assert not any(isinstance(m, PackedLinear) for m in plain.lm.modules())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(model.lm(ids).logits, plain.lm(ids).logits, atol=1e-4, rtol=1e-4)
    ours, theirs = (extract(m, QUESTIONS, batch_size=3, max_new_tokens=4) for m in (model, plain))
    np.testing.assert_allclose(ours.attention, theirs.attention, atol=1e-5)
    np.testing.assert_allclose(ours.mass, theirs.mass, atol=1e-5)


def test_bfloat16_is_not_packed(tiny_gpt2):
    base, ckpt = tiny_gpt2
    model = load_codi("gpt2", base=str(base), ckpt=str(ckpt), device="cpu", dtype="bfloat16")
    assert model.source["linear"] == "PyTorch default"
    assert not can_prepack(torch.device("cpu"), torch.bfloat16)
    assert not can_prepack(torch.device("cuda"), torch.float32)


def test_copying_or_casting_a_packed_model_says_what_to_do_instead(gpt2_model):
    import copy

    with pytest.raises(TypeError, match=r"load_codi\(\.\.\., prepack=False\)"):
        copy.deepcopy(gpt2_model.lm)
    layer = packed(nn.Linear(8, 4))
    layer.to("cpu").float()  # no-op moves are fine
    with pytest.raises(RuntimeError, match="cannot be copied, moved or cast"):
        layer.to(torch.bfloat16)


class _SaturatingSiLU(nn.Module):
    """SiLU up to x ~ 1.8, capped at 1.5 beyond: what oneDNN's swish computes only near zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x).clamp(max=1.5)


def test_an_activation_that_agrees_with_a_post_op_only_near_zero_is_not_fused():
    """The numeric check covers the range pre-activations reach (several units), not just around zero."""
    assert onednn_activation(_SaturatingSiLU()) is None
    mlp = MLP(_SaturatingSiLU())
    assert prepack_linear_layers(mlp, ("c_fc", "act")) == (2, 0) and isinstance(mlp.act, _SaturatingSiLU)


def test_every_failed_move_of_a_packed_layer_says_what_to_do_instead():
    """Whatever PyTorch raises for the opaque packed tensor (NotImplementedError for another dtype or the meta
    device, AssertionError or RuntimeError for a GPU, as the build has one or not), the caller gets the advice."""
    layer = packed(nn.Linear(8, 4))
    for move in (lambda: layer.double(), lambda: layer.to("meta"), lambda: layer.cuda()):
        with pytest.raises(RuntimeError, match="cannot be copied, moved or cast"):
            move()
