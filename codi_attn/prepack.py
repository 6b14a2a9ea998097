"""CPU float32 inference: the decoder's linear layers with their weights packed once for oneDNN.

PyTorch's default CPU matmul repacks the weight into its kernel's blocked layout at every call. Extraction's
one-position steps (six thoughts, EOT, each decoded token) multiply a few dozen rows by every weight of the
model, so that repacking is an extra pass over all weights per step, on a machine where those steps are
bound by memory bandwidth. Packing once at load time (the layout PyTorch's inductor uses for frozen weights)
measured at GPT-2 shape on 2 CPU threads: 1.9x on the decoder's matmuls at 24 rows, 1.3x at 96, 1.08x at
the prefill's ~1,200. Results agree with `F.linear` to float32 rounding (~3e-6 relative), and each row's
result does not depend on the other rows of the batch. The MLP's activation (GPT-2's tanh GELU, LLaMA's SiLU)
runs inside its linear layer's kernel when it is one oneDNN has (checked numerically, not by name), which
saves a pass over the MLP's widest tensor: 5-9% of GPT-2-shape extraction time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codi_attn.presets import FAMILIES


CANNOT_MOVE = ("this layer holds oneDNN-prepacked float32 weights (codi_attn.prepack), which cannot be copied, "
               "moved or cast: load the model again with the device and dtype you want, or with "
               "load_codi(..., prepack=False)")


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packing applies: float32 on a CPU whose PyTorch build has oneDNN's packed linear."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


POST_OPS = {("gelu", "tanh"): lambda x: F.gelu(x, approximate="tanh"), ("gelu", "none"): F.gelu,
            ("swish", ""): F.silu}  # oneDNN post-op (name, algorithm) -> what it computes


def onednn_activation(act: nn.Module) -> tuple[str, str] | None:
    """The oneDNN post-op that computes what `act` computes (checked on a probe in float32), or None."""
    probe = torch.linspace(-8.0, 8.0, 257)
    with torch.no_grad():
        out = act(probe)
    for post_op, reference in POST_OPS.items():
        if torch.allclose(out, reference(probe), atol=1e-6, rtol=0):
            return post_op
    return None


class PackedLinear(nn.Module):
    """y = act(x W^T + b) with W [out_features, in_features] held in oneDNN's packed layout (inference only);
    act is the identity or a oneDNN post-op (`POST_OPS`).

    The packed weight is an opaque tensor: the module cannot be copied, moved or cast (an error says so and
    what to do instead); load the model again for another device or dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, post_op: tuple[str, str] = ("none", "")):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.post_op = post_op
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous()),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name, algorithm = self.post_op
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, name, [], algorithm)

    def _apply(self, fn, recurse: bool = True):
        try:  # no-op moves (to the CPU, to float32) pass; anything else cannot handle the opaque packed tensor
            return super()._apply(fn, recurse)
        except (NotImplementedError, RuntimeError, AssertionError) as err:
            raise RuntimeError(CANNOT_MOVE) from err

    def __deepcopy__(self, memo):
        raise TypeError(CANNOT_MOVE)

    def extra_repr(self) -> str:
        act = "" if self.post_op[0] == "none" else f", post_op={'/'.join(filter(None, self.post_op))}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{act}"


def packed(module: nn.Module, post_op: tuple[str, str] = ("none", "")) -> PackedLinear:
    """The packed twin of an nn.Linear or a GPT-2 Conv1D (whose weight is stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return PackedLinear(weight, module.bias, post_op)


def prepack_linear_layers(layers: nn.Module, mlp_activation: tuple[str, str] | None = None) -> tuple[int, int]:
    """Replace every nn.Linear / Conv1D inside `layers` (e.g. the decoder blocks) by its PackedLinear, in place,
    one at a time (each original is freed as its twin replaces it); forward hooks registered later attach to
    the new modules. mlp_activation (linear, activation), e.g. ("c_fc", "act"): in every module with both,
    the activation moves into the linear layer's kernel (and becomes the identity) where oneDNN has it.
    Returns (layers packed, activations fused)."""
    from transformers.pytorch_utils import Conv1D

    fused = 0
    if mlp_activation is not None:
        linear_name, act_name = mlp_activation
        for module in list(layers.modules()):
            linear, act = getattr(module, linear_name, None), getattr(module, act_name, None)
            post_op = onednn_activation(act) if isinstance(act, nn.Module) else None
            if isinstance(linear, (nn.Linear, Conv1D)) and post_op is not None:
                setattr(module, linear_name, packed(linear, post_op))
                setattr(module, act_name, nn.Identity())
                fused += 1
    targets = [(parent, name) for parent in layers.modules() for name, child in parent.named_children()
               if isinstance(child, (nn.Linear, Conv1D))]
    for parent, name in targets:
        setattr(parent, name, packed(getattr(parent, name)))
    return len(targets) + fused, fused


def prepack_decoder(lm: nn.Module, device: torch.device, dtype: torch.dtype) -> str:
    """Pack the HF causal LM's decoder (its base model; the tied LM head is left alone) with its family's MLP
    activation fused, where `can_prepack`; returns the record for `model.source["linear"]`."""
    if not can_prepack(device, dtype):
        return linear_kernel(0)
    return linear_kernel(*prepack_linear_layers(lm.base_model, FAMILIES[lm.config.model_type].mlp_activation))


def linear_kernel(n_packed: int, n_fused: int = 0) -> str:
    """How the decoder's linear layers run, for the record of a model's numerics."""
    if not n_packed:
        return "PyTorch default"
    return f"oneDNN, {n_packed} weights prepacked" + (f", {n_fused} with the MLP activation fused" if n_fused else "")
