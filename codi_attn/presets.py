"""Model presets: where each released CODI model lives and how it was trained (codi-spec section 1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo" / "weights"


@dataclass(frozen=True)
class Preset:
    """A named CODI model: base model and checkpoint (hub ids or local dirs) plus training facts."""

    name: str
    family: str  # the base config's model_type (a key of FAMILIES)
    base: str
    ckpt: str
    lora_alpha: float
    stop_tokens: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Family:
    """Architecture facts that follow from the base config's `model_type`."""

    lora_targets: tuple[str, ...]
    fan_in_fan_out: bool  # GPT-2's Conv1D stores weights as [in, out]
    mlp_activation: tuple[str, str]  # (linear, activation): the MLP's linear layer and the activation applied to it
    blocks: str  # the base model's list of decoder blocks
    attention: str  # a block's attention module (returns output and, under eager, the weights)
    out_proj: str  # the attention output projection, whose input holds the per-head outputs (codi-spec trap 4)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(lora_targets=("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True, mlp_activation=("c_fc", "act"),
                   blocks="h", attention="attn", out_proj="attn.c_proj"),
    "llama": Family(
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        fan_in_fan_out=False,
        mlp_activation=("gate_proj", "act_fn"),
        blocks="layers", attention="self_attn", out_proj="self_attn.o_proj",
    ),
}

PRESETS: dict[str, Preset] = {
    "gpt2": Preset(
        name="gpt2",
        family="gpt2",
        base="openai-community/gpt2",
        ckpt="zen-E/CODI-gpt2",
        lora_alpha=32,
        stop_tokens=("<|endoftext|>",),
        description="released CODI GPT-2 (124M, 12 layers x 12 heads)",
    ),
    "llama": Preset(
        name="llama",
        family="llama",
        base="meta-llama/Llama-3.2-1B-Instruct",
        ckpt="zen-E/CODI-llama3.2-1b-Instruct",
        lora_alpha=32,
        # The Instruct eos, and the base model's eos that the official test script stops at.
        stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
        description="released CODI LLaMA-3.2-1B-Instruct (16 layers x 32 query heads, 8 KV heads)",
    ),
    "demo": Preset(
        name="demo",
        family="gpt2",
        base=str(DEMO_DIR / "base"),
        ckpt=str(DEMO_DIR / "ckpt"),
        lora_alpha=32,
        stop_tokens=(),
        description="offline demo CODI model shipped with codi-attn (small GPT-2, synthetic arithmetic)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`, or a ValueError that lists the presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
