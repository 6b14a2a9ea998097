"""Strict loading in the release layout: keys, shapes, LoRA merge, ties, formats, presets, offline errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from codi_attn.fixtures import release_state_dict, save_checkpoint
from codi_attn.model import CODILoadError, load_codi, locate_sources, read_state_dict
from codi_attn.presets import PRESETS


def write_variant(tmp_path, ckpt_dir, edit) -> str:
    """A copy of a checkpoint with `edit(state)` applied; returns its directory."""
    state = read_state_dict(str(ckpt_dir))
    edit(state)
    save_checkpoint(state, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_release_layout_keys_and_dtypes(tiny_gpt2, tiny_llama):
    gpt2 = read_state_dict(str(tiny_gpt2[1]))
    assert "codi.base_model.model.transformer.h.0.attn.c_attn.base_layer.weight" in gpt2
    assert gpt2["codi.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"].dtype == torch.float32
    assert gpt2["codi.base_model.model.transformer.h.0.attn.c_attn.base_layer.weight"].dtype == torch.bfloat16
    assert {"prj.1.weight", "prj.3.bias", "prj.ln.weight"} <= set(gpt2) and "prj.0.weight" not in gpt2
    llama = read_state_dict(str(tiny_llama[1]))
    assert "codi.base_model.model.model.layers.1.self_attn.o_proj.lora_B.default.weight" in llama
    assert "codi.base_model.model.model.layers.0.mlp.gate_proj.base_layer.weight" in llama
    assert "codi.base_model.model.lm_head.weight" in llama


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_special_ids_and_shapes(family, request):
    model = request.getfixturevalue(f"{family}_model")
    vocab = model.lm.config.vocab_size - 3
    assert (model.pad_id, model.bot_id, model.eot_id) == (vocab, vocab + 1, vocab + 2)
    assert model.tokenizer.pad_token_id == vocab
    assert model.lm.get_input_embeddings().weight.shape[0] == vocab + 3
    assert model.lm.get_output_embeddings().weight.data_ptr() == model.lm.get_input_embeddings().weight.data_ptr()
    assert model.source["lora_rank"] == 8


def test_lora_is_merged_exactly(tiny_gpt2, tiny_llama, unpacked_models):
    """Merged weight = base + alpha/r * B @ A, computed here independently (GPT-2 Conv1D is [in, out])."""
    gpt2_model, llama_model = unpacked_models["gpt2"], unpacked_models["llama"]
    state = read_state_dict(str(tiny_gpt2[1]))
    pre = "codi.base_model.model.transformer.h.0.attn.c_attn."
    a, b = state[pre + "lora_A.default.weight"], state[pre + "lora_B.default.weight"]
    expected = state[pre + "base_layer.weight"].float() + (32 / 8) * (b @ a).T
    torch.testing.assert_close(gpt2_model.lm.transformer.h[0].attn.c_attn.weight, expected, atol=1e-6, rtol=0)

    state = read_state_dict(str(tiny_llama[1]))
    pre = "codi.base_model.model.model.layers.1.self_attn.v_proj."
    a, b = state[pre + "lora_A.default.weight"], state[pre + "lora_B.default.weight"]
    expected = state[pre + "base_layer.weight"].float() + (32 / 8) * (b @ a)
    torch.testing.assert_close(llama_model.lm.model.layers[1].self_attn.v_proj.weight, expected, atol=1e-6, rtol=0)


def test_lora_changes_outputs(tmp_path, tiny_gpt2, gpt2_model):
    """Zeroing the checkpoint's LoRA B (the official loader's silent failure mode) gives other logits."""
    zeroed = write_variant(tmp_path, tiny_gpt2[1], lambda s: [t.zero_() for k, t in s.items() if ".lora_B." in k])
    bare = load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=zeroed, device="cpu", dtype="float32")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(gpt2_model.lm(ids).logits, bare.lm(ids).logits, atol=1e-3)


def test_renamed_prefix_is_named(tmp_path, tiny_gpt2):
    def rename(state):
        for key in [k for k in state if k.startswith("codi.")]:
            state["model." + key[len("codi."):]] = state.pop(key)

    ckpt = write_variant(tmp_path, tiny_gpt2[1], rename)
    with pytest.raises(CODILoadError) as err:
        load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=ckpt)
    message = str(err.value)
    assert "missing keys:" in message and "unexpected keys:" in message
    assert "codi.base_model.model.lm_head.weight" in message and "model.base_model.model" in message
    assert "different key prefix" in message


def test_missing_prj_ln_is_named(tmp_path, tiny_gpt2):
    ckpt = write_variant(tmp_path, tiny_gpt2[1], lambda s: (s.pop("prj.ln.weight"), s.pop("prj.ln.bias")))
    with pytest.raises(CODILoadError, match=r"missing keys: 2 \(first: prj.ln.bias, prj.ln.weight\)"):
        load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=ckpt)


def test_wrong_shape_is_named(tmp_path, tiny_gpt2):
    ckpt = write_variant(tmp_path, tiny_gpt2[1], lambda s: s.__setitem__("prj.3.bias", torch.zeros(7)))
    with pytest.raises(CODILoadError, match=r"wrong shapes: 1 \(first: prj.3.bias \(7,\) != \(64,\)\)"):
        load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=ckpt)


def test_untied_lm_head_that_disagrees_is_rejected(tmp_path, tiny_llama):
    """codi-spec: a stored lm_head must agree with the embedding within bf16 rounding. Its bf16 rounding loads;
    1% off, far more than a rounding but inside a loose absolute tolerance for weights this small, is refused."""
    key = "codi.base_model.model.lm_head.weight"
    rounded = write_variant(tmp_path / "rounded", tiny_llama[1], lambda s: s.__setitem__(
        key, s[key].to(torch.bfloat16).to(s[key].dtype)))
    load_codi("llama", base=str(tiny_llama[0]), ckpt=rounded)
    for name, change in (("plus_one", lambda s: s[key].add_(1.0)), ("one_percent", lambda s: s[key].mul_(1.01))):
        ckpt = write_variant(tmp_path / name, tiny_llama[1], change)
        with pytest.raises(CODILoadError, match="tied tensors differ"):
            load_codi("llama", base=str(tiny_llama[0]), ckpt=ckpt)


@pytest.mark.parametrize("name, damage, what", [
    ("pytorch_model.bin", lambda b: b[: len(b) // 2], "cannot be read as a torch.save state dict"),
    ("pytorch_model.bin", lambda b: bytes(range(256)) * 20, "cannot be read as a torch.save state dict"),
    ("pytorch_model.bin", lambda b: b"", "cannot be read as a torch.save state dict"),
    ("model.safetensors", lambda b: b[: len(b) // 2], "cannot be read as safetensors"),
    ("model.safetensors", lambda b: bytes(range(256)) * 20, "cannot be read as safetensors"),
])
def test_corrupt_checkpoint_file_is_named(tmp_path, tiny_gpt2, tiny_llama, name, damage, what):
    """A truncated, garbage or empty weights file: one CODILoadError naming the file and what is wrong."""
    family, (base, ckpt) = ("gpt2", tiny_gpt2) if name.endswith(".bin") else ("llama", tiny_llama)
    bad = tmp_path / "ckpt" / name
    bad.parent.mkdir()
    bad.write_bytes(damage((ckpt / name).read_bytes()))
    with pytest.raises(CODILoadError) as err:
        load_codi(family, base=str(base), ckpt=str(bad.parent))
    message = str(err.value)
    assert f"checkpoint file {bad} ({bad.stat().st_size} bytes) {what}" in message
    assert "truncated or not a checkpoint" in message and len(message.splitlines()) == 1


def test_checkpoint_that_is_not_a_state_dict(tmp_path, tiny_gpt2):
    path = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CODILoadError, match=rf"checkpoint file {path} holds a list, not a state dict of tensors"):
        read_state_dict(str(path))


@pytest.mark.parametrize("family, key", [("gpt2", "prj.3.bias"), ("llama", "codi.base_model.model.lm_head.weight")])
def test_nan_or_inf_in_a_tensor_is_named(tmp_path, tiny_gpt2, tiny_llama, family, key):
    """Non-finite weights are reported at load, naming the tensor; for LLaMA's tied lm_head this comes before
    (instead of) a 'tied tensors differ' message."""
    base, ckpt = tiny_gpt2 if family == "gpt2" else tiny_llama

    def poison(state):
        state[key][0, ...] = float("nan")
        state[key].view(-1)[-1] = float("inf")

    bad = write_variant(tmp_path, ckpt, poison)
    with pytest.raises(CODILoadError) as err:
        load_codi(family, base=str(base), ckpt=bad)
    message = str(err.value)
    assert f"checkpoint {bad}/pytorch_model.bin holds NaN or inf in 1 tensor(s) (first: {key}: " in message
    assert "1 inf" in message and "tied tensors" not in message


def test_checkpoint_without_lora_loads_strictly(tmp_path, tiny_gpt2):
    """A full-parameter CODI (the demo model's layout: codi. + HF keys, prj.*) takes the same strict path."""
    from codi_attn.fixtures import codi_module
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_gpt2[0])
    module = codi_module(config, lora_rank=None, seed=3)
    state = release_state_dict(module)
    assert "codi.transformer.h.0.attn.c_attn.weight" in state
    save_checkpoint(state, tmp_path / "plain", fmt="safetensors")
    model = load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=str(tmp_path / "plain"), dtype="float32",
                      prepack=False)
    assert model.source["lora_rank"] is None
    torch.testing.assert_close(model.lm.transformer.h[0].mlp.c_fc.weight,
                               state["codi.transformer.h.0.mlp.c_fc.weight"].float())


def test_both_file_formats_load_the_same_weights(tmp_path, tiny_gpt2, unpacked_models):
    state = read_state_dict(str(tiny_gpt2[1]))
    save_checkpoint(state, tmp_path / "st", fmt="safetensors")
    gpt2_model = unpacked_models["gpt2"]  # the .bin fixture
    other = load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=str(tmp_path / "st"), dtype="float32", prepack=False)
    for (name, p), (_, q) in zip(gpt2_model.lm.named_parameters(), other.lm.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_dtype_and_device_overrides(tiny_gpt2):
    model = load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=str(tiny_gpt2[1]), dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and next(model.lm.parameters()).dtype == torch.bfloat16
    assert next(model.prj.parameters()).dtype == torch.bfloat16


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown model preset 'gpt3'.*gpt2, llama, demo"):
        load_codi("gpt3")


def test_missing_checkpoint_directory(tiny_gpt2):
    with pytest.raises(CODILoadError, match="checkpoint directory not found: ~/nope/codi_ckpt"):
        load_codi("llama", base=str(tiny_gpt2[0]), ckpt="~/nope/codi_ckpt")


def test_checkpoint_directory_without_weights(tmp_path, tiny_gpt2):
    with pytest.raises(CODILoadError, match="holds none of model.safetensors, pytorch_model.bin"):
        load_codi("gpt2", base=str(tiny_gpt2[0]), ckpt=str(tmp_path))


def test_preset_of_another_family_is_refused_at_load(tiny_gpt2, tiny_llama):
    with pytest.raises(CODILoadError, match=rf"^--model gpt2 is a gpt2 CODI model, but {tiny_llama[0]} has model_type "
                                            r"'llama': pass --model llama for this base, or a gpt2 --base$"):
        load_codi("gpt2", base=str(tiny_llama[0]), ckpt=str(tiny_gpt2[1]))


def test_located_files_of_local_sources(tiny_gpt2):
    base, ckpt = tiny_gpt2
    found = locate_sources("gpt2", ckpt=str(ckpt), base=str(base))
    assert found == {"base": {n: base / n for n in ("config.json", "tokenizer.json", "tokenizer_config.json")},
                     "ckpt": {"pytorch_model.bin": ckpt / "pytorch_model.bin"}}


def test_hub_ids_are_located_in_the_local_cache_without_network(hub_cache, tmp_path):
    """A hub id is answered from the local hub cache (offline): the snapshot's files at the cached revision;
    the checkpoint is the file hf_hub_download would give (the cache knows there is no model.safetensors)."""
    cache, revision = hub_cache
    found = locate_sources("gpt2", ckpt="codi-test/ckpt", base="codi-test/base")
    snapshot = cache / "models--codi-test--base" / "snapshots" / revision
    assert found["base"]["config.json"] == snapshot / "config.json" and set(found["base"]) == {
        "config.json", "tokenizer.json", "tokenizer_config.json"}
    assert found["ckpt"] == {"pytorch_model.bin": cache / "models--codi-test--ckpt" / "snapshots" / revision /
                             "pytorch_model.bin"}
    (cache / "models--codi-test--ckpt" / ".no_exist" / revision / "model.safetensors").unlink()
    unknown = locate_sources("gpt2", ckpt="codi-test/ckpt", base="codi-test/other")
    assert unknown == {"base": None, "ckpt": None}  # is there a model.safetensors? only the hub can say


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_codi("gpt2", dtype="fp8")


def test_presets_carry_release_facts():
    assert PRESETS["gpt2"].ckpt == "zen-E/CODI-gpt2"
    assert PRESETS["llama"].base == "meta-llama/Llama-3.2-1B-Instruct"
    assert PRESETS["llama"].stop_tokens == ("<|eot_id|>", "<|end_of_text|>")
    assert PRESETS["gpt2"].lora_alpha == PRESETS["llama"].lora_alpha == 32


def test_stop_ids_are_the_release_stop_tokens(gpt2_model, llama_model):
    """codi-spec's stop tokens, looked up by name in each tokenizer: GPT-2 stops at <|endoftext|>; LLaMA at the
    Instruct eos <|eot_id|> and at the base model's <|end_of_text|> as well."""
    def ids(model, *names):
        return {model.tokenizer.convert_tokens_to_ids(n) for n in names}

    assert set(gpt2_model.stop_ids) == ids(gpt2_model, "<|endoftext|>")
    assert set(llama_model.stop_ids) == ids(llama_model, "<|eot_id|>", "<|end_of_text|>")
    assert len(llama_model.stop_ids) == 2


def test_unreachable_hub_id_says_what_to_pass(tmp_path):
    """Offline, a hub id fails with a message naming the id and the local-path override."""
    code = "from codi_attn.model import load_codi; load_codi('llama')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0
    assert "CODILoadError" in run.stderr
    assert "'meta-llama/Llama-3.2-1B-Instruct'" in run.stderr and "--base /path/to/dir" in run.stderr


def test_unreachable_hub_checkpoint_says_what_to_pass(tmp_path, tiny_llama):
    """Offline, with a local base, the preset's hub checkpoint fails with a message naming its id and --ckpt, not
    as a repo that holds no weights (huggingface_hub's offline error is an EntryNotFoundError too)."""
    code = f"from codi_attn.model import load_codi; load_codi('llama', base={str(tiny_llama[0])!r})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode != 0 and "CODILoadError" in run.stderr and "holds none" not in run.stderr
    assert "checkpoint 'zen-E/CODI-llama3.2-1b-Instruct'" in run.stderr and "--ckpt /path/to/dir" in run.stderr


def test_missing_demo_model_says_how_to_rebuild(monkeypatch, tmp_path):
    import codi_attn.model as model_mod

    monkeypatch.setattr(model_mod, "DEMO_DIR", tmp_path / "weights")
    with pytest.raises(CODILoadError, match="demo model is missing.*python -m codi_attn.demo.train"):
        model_mod.resolve_sources("demo")


def test_gpt2_gelu_is_fused_and_equals_gelu_new(unpacked_models):
    """The loader runs GPT-2's gelu_new as the fused gelu_pytorch_tanh (recorded in source); in fp32 the
    model's logits equal those of the same weights with the unfused gelu_new."""
    import copy

    from transformers.activations import NewGELUActivation

    gpt2_model = unpacked_models["gpt2"]  # copyable
    assert gpt2_model.lm.config.activation_function == "gelu_pytorch_tanh"
    assert "gelu_new" in gpt2_model.source["activation"]
    unfused = copy.deepcopy(gpt2_model.lm)
    for block in unfused.transformer.h:
        block.mlp.act = NewGELUActivation()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        fused_logits, plain_logits = gpt2_model.lm(ids).logits, unfused(ids).logits
    assert type(gpt2_model.lm.transformer.h[0].mlp.act) is not NewGELUActivation
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-5, rtol=1e-5)


def test_llama_activation_is_left_alone(llama_model):
    assert llama_model.source["activation"] == llama_model.lm.config.hidden_act == "silu"
