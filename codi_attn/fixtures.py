"""Tiny CODI models with random weights, saved exactly in the release layout (codi-spec section 2).

They exist so that tests, benchmarks and offline runs take the same loading path as the real
releases without downloading anything: a base-model directory (config + tokenizer + weights) and a
checkpoint directory whose state dict has peft's keys, non-zero LoRA, a projection, bf16 base
weights and fp32 LoRA/projection weights. `full_size_codi` builds GPT-2-124M- or LLaMA-3.2-1B-shaped
models in memory for benchmarks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from codi_attn.model import ATTENTION, CODIModel, CODIModule, fuse_gelu, make_projection, wrap_lora
from codi_attn.prepack import linear_kernel, prepack_decoder
from codi_attn.presets import PRESETS

_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did she sell altogether? Weng earns $12 an hour for babysitting. The answer is: 72. "
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take? "
    "James writes a 3-page letter to 2 different friends twice a week. 0123456789 +-*/=<<>>#### . , ? ! $ %"
)
SPECIAL = {"gpt2": ("<|endoftext|>",), "llama": ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")}


def build_tokenizer(family: str, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a fixed snippet; LLaMA-style adds BOS like Llama-3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = list(SPECIAL[family])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if family == "llama":
        bos = special[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[0])


def tiny_config(family: str, vocab_size: int, **overrides):
    """A small GPT-2 or LLaMA config (LLaMA with GQA: fewer KV heads than query heads)."""
    from transformers import GPT2Config, LlamaConfig

    if family == "gpt2":
        args = dict(vocab_size=vocab_size, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                    eos_token_id=0, bos_token_id=0)
        return GPT2Config(**{**args, **overrides})
    args = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=2, tie_word_embeddings=True, rope_theta=500000.0)
    return LlamaConfig(**{**args, **overrides})


def codi_module(config, lora_rank: int | None = 8, prj_dim: int | None = None, seed: int = 0) -> CODIModule:
    """A randomly initialised CODI module in the official layout (peft-wrapped when lora_rank is set).

    LoRA B matrices are random (peft starts them at zero) so that LoRA visibly changes outputs.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.resize_token_embeddings(config.vocab_size + 3, mean_resizing=False)
    if lora_rank is not None:
        lm = wrap_lora(lm, lora_rank, PRESETS["gpt2"].lora_alpha)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0.0, 0.05)
    d = config.hidden_size
    return CODIModule(lm, make_projection(d, prj_dim or d))


def release_state_dict(module: CODIModule) -> dict[str, torch.Tensor]:
    """The module's state dict as the releases store it: base weights bf16, LoRA and prj fp32, no shared storage."""
    state = {}
    for key, tensor in module.state_dict().items():
        keep_fp32 = key.startswith("prj.") or ".lora_" in key
        state[key] = tensor.detach().to(torch.float32 if keep_fp32 else torch.bfloat16).clone().contiguous()
    return state


def save_checkpoint(state: dict[str, torch.Tensor], ckpt_dir: Path, fmt: str = "bin") -> Path:
    """Write `pytorch_model.bin` (torch.save) or `model.safetensors` into ckpt_dir."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = ckpt_dir / "model.safetensors"
        save_file(state, str(path))
    else:
        path = ckpt_dir / "pytorch_model.bin"
        torch.save(state, path)
    return path


def build_tiny_codi(out_dir: str | Path, family: str = "gpt2", seed: int = 0, fmt: str = "bin",
                    lora_rank: int | None = 8, **config_overrides) -> tuple[Path, Path]:
    """Build and save a tiny CODI model; returns (base_dir, ckpt_dir) for `load_codi(..., base=, ckpt=)`."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    base_dir, ckpt_dir = out / "base", out / "ckpt"
    tokenizer = build_tokenizer(family)
    config = tiny_config(family, vocab_size=len(tokenizer), **config_overrides)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    save_checkpoint(release_state_dict(codi_module(config, lora_rank=lora_rank, seed=seed + 1)), ckpt_dir, fmt)
    return base_dir, ckpt_dir


def full_size_codi(family: str = "gpt2", dtype: torch.dtype = torch.float32, device: str = "cpu",
                   seed: int = 0, prepack: bool = True) -> CODIModel:
    """A GPT-2-124M- or LLaMA-3.2-1B-shaped CODI model with random weights, built in memory (for benchmarks).

    The tokenizer is the tiny fixture tokenizer (ids below 400, no [PAD] of its own: pad_id, bot_id and eot_id are
    the model's rows past the release vocabulary, which the runner writes by id); the vocabulary size is the
    release's. `prepack` as in `load_codi`.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if family == "gpt2":
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    else:
        config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                             tie_word_embeddings=True, rope_theta=500000.0, head_dim=64)
    v = config.vocab_size  # read before resizing, which updates the config
    torch.manual_seed(seed)
    fuse_gelu(config)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=torch.float32)
    lm.resize_token_embeddings(v + 3, mean_resizing=False)
    tokenizer = build_tokenizer(family)
    prj = make_projection(config.hidden_size, config.hidden_size)
    lm.to(device=device, dtype=dtype).eval()
    prj.to(device=device, dtype=dtype).eval()
    linear = prepack_decoder(lm, torch.device(device), dtype) if prepack else linear_kernel(0)
    return CODIModel(lm=lm, prj=prj, tokenizer=tokenizer, name=f"{family}-full-size-random", pad_id=v, bot_id=v + 1,
                     eot_id=v + 2, stop_ids=(tokenizer.eos_token_id,), n_layers=config.num_hidden_layers,
                     n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", config.num_attention_heads),
                     max_positions=getattr(config, "max_position_embeddings", 1024), device=torch.device(device),
                     dtype=dtype, source={"linear": linear})
