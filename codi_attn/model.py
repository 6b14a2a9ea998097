"""Load a CODI model strictly, in the release layout (codi-spec sections 1-2), as a plain HF model + projection.

Only the base model's config and tokenizer are read from `base`; every weight comes from the checkpoint,
checked key by key and shape by shape. LoRA (when the checkpoint has it) is merged once at load time.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from codi_attn.hub import error_line
from codi_attn.prepack import linear_kernel, prepack_decoder
from codi_attn.provenance import fingerprint_files
from codi_attn.presets import DEMO_DIR, FAMILIES, PRESETS, get_preset

CKPT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
BF16_ROUNDING = 2.0 ** -8  # tied tensors stored apart may differ by one bf16 rounding (codi-spec), relative
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
TOKENIZERS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))  # any one set is a tokenizer


class CODILoadError(ValueError):
    """A model source that cannot be found, reached or loaded strictly."""


def make_projection(d_model: int, d_proj: int) -> nn.Sequential:
    """CODI's projection: Dropout(0), Linear(d, p), GELU, Linear(p, d), then LayerNorm (keys prj.1, prj.3, prj.ln)."""
    prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(d_model, d_proj), nn.GELU(), nn.Linear(d_proj, d_model))
    prj.add_module("ln", nn.LayerNorm(d_model))
    return prj


class CODIModule(nn.Module):
    """The official module's parameter layout: `codi` (the causal LM, peft-wrapped when LoRA) and `prj`."""

    def __init__(self, codi: nn.Module, prj: nn.Sequential):
        super().__init__()
        self.codi = codi
        self.prj = prj


ATTENTION = "sdpa"  # the attention kernel CODI models are loaded with


@dataclass
class CODIModel:
    """A loaded CODI model ready for latent inference."""

    lm: nn.Module  # HF causal LM (LoRA merged), eval mode
    prj: nn.Sequential
    tokenizer: object  # HF tokenizer with [PAD] = pad_id added
    name: str
    pad_id: int
    bot_id: int
    eot_id: int
    stop_ids: tuple[int, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_positions: int
    device: torch.device
    dtype: torch.dtype
    is_demo: bool = False
    source: dict = field(default_factory=dict)
    attention: str = ATTENTION  # the LM's attention kernel for the prefill and decoding (thought steps: eager)

    @property
    def family(self) -> str:
        return self.lm.config.model_type


def check_device(name: str) -> torch.device:
    """The torch device `name`; ValueError when it is not cpu, cuda or cuda:N, or a CUDA device this machine does
    not have."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: codi-attn runs on the CPU or a CUDA GPU; choose auto, cpu, cuda or "
                         "cuda:N")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"{name!r} asks for a CUDA GPU and torch sees none here (torch.cuda.is_available() is "
                             f"False); use --device cpu, or --device auto (the GPU wherever a task has one)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return dev


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """auto = CUDA + bf16 when a GPU is present, else CPU + fp32."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else check_device(device)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return dev, names[dtype]


def fuse_gelu(config) -> bool:
    """Run GPT-2's "gelu_new" as PyTorch's fused tanh GELU: the same formula in one kernel instead of eight
    elementwise passes, rounded once instead of after every pass (fp32: within 2e-7; bf16: within one ulp of
    the unfused result on ~40% of values). The passes took ~10% of CPU extraction time. True if it changed."""
    if getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"
        return True
    return False


def is_local(source: str) -> bool:
    """A source that names a path rather than a hub id."""
    return os.path.exists(os.path.expanduser(source)) or source.startswith(("/", "~", ".")) or source.count("/") > 1


def resolve_sources(model: str, ckpt: str | None = None, base: str | None = None) -> tuple[str, str]:
    """The (base, ckpt) a run will load; checks local paths exist. Cheap: nothing is loaded."""
    preset = get_preset(model)
    if model == "demo" and not (base or ckpt) and not (DEMO_DIR / "ckpt").is_dir():
        raise CODILoadError(f"the demo model is missing from {DEMO_DIR}; reinstall codi-attn or rebuild it with "
                            f"`python -m codi_attn.demo.train --out {DEMO_DIR}`")
    base, ckpt = base or preset.base, ckpt or preset.ckpt
    for what, src in (("base model", base), ("checkpoint", ckpt)):
        if is_local(src) and not Path(src).expanduser().is_dir() and not Path(src).expanduser().is_file():
            raise CODILoadError(f"{what} directory not found: {src}")
    return base, ckpt


def hub_hint(what: str, source: str, flag: str, why: Exception | str) -> CODILoadError:
    """The error for a hub id that cannot be loaded, `why` an exception or words, saying what to pass instead."""
    if isinstance(why, Exception):
        why = error_line(why)
    return CODILoadError(f"could not load the {what} {source!r} from the Hugging Face hub ({why}). Without network "
                         f"access, download it elsewhere and pass a local directory instead: {flag} /path/to/dir")


def _load_config_and_tokenizer(base: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(os.path.expanduser(base))
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(base))
    except (OSError, ValueError) as err:
        if is_local(base):
            raise CODILoadError(f"base model directory {base} has no readable config/tokenizer: {err}") from err
        raise hub_hint("base model", base, "--base", err) from err
    return config, tokenizer


def _hub_cached(repo: str, name: str) -> Path | bool | None:
    """A hub repo's file in the local hub cache, without network: its path, False when the cache knows the repo
    lacks it, None when the cache cannot tell."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, name)
    return Path(found) if isinstance(found, str) else (False if found is not None else None)


def base_files(base: str) -> dict[str, Path] | None:
    """config.json and the tokenizer files a load reads from `base` ({name: path}): a local directory, or a hub
    id in the local hub cache (None when the cache does not hold its config and a tokenizer). A local directory
    without config.json or a tokenizer raises CODILoadError naming the files expected."""
    names = (CONFIG_FILE, *TOKENIZER_FILES)
    if is_local(base):
        root = Path(base).expanduser()
        if not root.is_dir():
            raise CODILoadError(f"base model {base} is not a directory: pass the folder that holds its config.json "
                                f"and tokenizer files")
        found = {n: root / n for n in names if (root / n).is_file()}
    else:
        cached = {n: _hub_cached(base, n) for n in names}
        found = {n: p for n, p in cached.items() if isinstance(p, Path)}
        if CONFIG_FILE not in found or not any(all(n in found for n in t) for t in TOKENIZERS):
            return None
    if CONFIG_FILE not in found:
        raise CODILoadError(f"base model directory {base} has no {CONFIG_FILE} (the base model's config)")
    if not any(all(n in found for n in t) for t in TOKENIZERS):
        raise CODILoadError(f"base model directory {base} has no tokenizer: expected tokenizer.json, or vocab.json "
                            f"and merges.txt, or tokenizer.model")
    return found


def check_family(model: str, model_type: str | None, where: str | Path) -> None:
    """CODILoadError unless the base config's model_type is a supported family and the preset's own."""
    family = get_preset(model).family
    if model_type not in FAMILIES:
        raise CODILoadError(f"unsupported model family {model_type!r} in {where}; supported: {', '.join(FAMILIES)}")
    if model_type != family:
        other = next(p.name for p in PRESETS.values() if p.family == model_type)
        raise CODILoadError(f"--model {model} is a {family} CODI model, but {where} has model_type {model_type!r}: "
                            f"pass --model {other} for this base, or a {family} --base")


def _checkpoint_file(ckpt: str, download: bool = True) -> Path | None:
    """The state-dict file of a checkpoint given as a file, a directory or a hub id (download=False: from the
    local hub cache only, None when it cannot tell which file the hub would give)."""
    path = Path(ckpt).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        present = [path / name for name in CKPT_FILES if (path / name).is_file()]
        if len(present) > 1:
            raise CODILoadError(f"checkpoint directory {ckpt} holds both {' and '.join(p.name for p in present)}; "
                                f"pass the one to load: " + " or ".join(f"--ckpt {p}" for p in present))
        if not present:
            raise CODILoadError(f"checkpoint directory {ckpt} holds none of {', '.join(CKPT_FILES)}")
        return present[0]
    if is_local(ckpt):
        raise CODILoadError(f"checkpoint directory not found: {ckpt}")
    if not download:
        for name in CKPT_FILES:  # the order hf_hub_download tries them in below
            cached = _hub_cached(ckpt, name)
            if cached is not False:
                return cached
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    err: Exception | None = None
    offline: Exception | None = None
    for name in CKPT_FILES:
        try:
            return Path(hf_hub_download(ckpt, name))
        except LocalEntryNotFoundError as e:  # offline and not cached (an EntryNotFoundError too: caught first);
            offline = offline or e  # the next file may be in the cache
        except EntryNotFoundError as e:  # the repo answered: it has no such file
            err = e
        except Exception as e:  # unknown repo, gated, hub down: all mean "pass a local dir"
            raise hub_hint("checkpoint", ckpt, "--ckpt", e) from e
    if offline is not None:
        raise hub_hint("checkpoint", ckpt, "--ckpt", offline) from offline
    raise CODILoadError(f"hub repo {ckpt} holds none of {', '.join(CKPT_FILES)}") from err


def locate_sources(model: str, ckpt: str | None = None, base: str | None = None) -> dict[str, dict[str, Path] | None]:
    """The files a load of this model reads, found without loading or downloading anything: {'base': {name: path},
    'ckpt': {name: path}}, None for a hub id the local hub cache cannot answer for. On the way it checks what
    can be checked cheaply (CODILoadError): config and tokenizer present, the config's family that of the
    preset, one checkpoint file."""
    base, ckpt = resolve_sources(model, ckpt, base)
    found = {"base": base_files(base)}
    if found["base"] is not None:
        config = found["base"][CONFIG_FILE]
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError) as e:
            raise CODILoadError(f"{config} cannot be read as JSON: {e}") from None
        check_family(model, model_type, config)
    ckpt_file = _checkpoint_file(ckpt, download=False)
    found["ckpt"] = None if ckpt_file is None else {ckpt_file.name: ckpt_file}
    return found


def _unreadable(path: Path, e: Exception) -> CODILoadError:
    first = str(e).splitlines()[0] if str(e) else "no message"
    what = first if len(first) <= 240 else first[:240].rsplit(" ", 1)[0] + " ..."  # whole words, marked cut
    kind = "safetensors" if path.suffix == ".safetensors" else "a torch.save state dict"
    return CODILoadError(f"checkpoint file {path} ({path.stat().st_size} bytes) cannot be read as {kind} "
                         f"({type(e).__name__}: {what}); it is truncated or not a checkpoint: download or copy it "
                         "again")


def _read_checkpoint(ckpt: str | Path, meta: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, dtypes as stored, or with `meta` only their shapes (meta tensors: a safetensors
    file's header, a torch.save file's pickle, no weight read); a file that is truncated or not a checkpoint raises
    CODILoadError naming it."""
    import pickle

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = _checkpoint_file(str(ckpt))
    try:
        if path.suffix != ".safetensors":
            state = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True)
        elif not meta:
            state = load_file(str(path))
        else:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (SafetensorError, RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError, OSError) as e:
        raise _unreadable(path, e) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CODILoadError(f"checkpoint file {path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def read_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (`pytorch_model.bin` or `model.safetensors`), dtypes as stored; a file that is
    truncated or not a checkpoint raises CODILoadError naming it."""
    return _read_checkpoint(ckpt, meta=False)


def check_checkpoint(model: str, base: Path, ckpt: Path) -> None:
    """The checkpoint file `ckpt`'s keys and shapes against the CODI module of preset `model` on the config in the
    local folder `base`, without reading a weight or allocating one (meta tensors): CODILoadError as `load_codi`
    would raise it, at the cost of a header."""
    from transformers import AutoConfig

    state = _read_checkpoint(ckpt, meta=True)
    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        module, _ = codi_module(config, state, get_preset(model).lora_alpha)
    check_keys(module.state_dict(), state, f"checkpoint {ckpt}")


def _describe(keys: list[str], n: int = 5) -> str:
    return f"{len(keys)} (first: {', '.join(sorted(keys)[:n])})"


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """'key: a NaN, b inf' for every floating tensor of the state that holds NaN or inf."""
    found = []
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(f"{key}: {int(tensor.isnan().sum())} NaN, {int(tensor.isinf().sum())} inf")
    return found


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
    """Strict check: every key used, none missing, shapes equal, every value finite; tied tensors must agree.

    Raises CODILoadError naming `where`, the first few offending keys and their counts.
    """
    expected = module.state_dict()
    check_keys(expected, state, where)
    non_finite = _non_finite(state)
    if non_finite:  # before the ties: a NaN in a tied tensor is the problem, not the tie
        raise CODILoadError(f"{where} holds NaN or inf in {len(non_finite)} tensor(s) (first: "
                            f"{'; '.join(non_finite[:3])}); the weights are corrupt: download or copy them again")
    by_storage: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    for names in by_storage.values():
        first = state[names[0]].float()
        for other in names[1:]:
            if not torch.allclose(first, state[other].float(), rtol=BF16_ROUNDING, atol=0.0):
                raise CODILoadError(f"tied tensors differ in {where}: {names[0]} vs {other} "
                                    f"(max |diff| {(first - state[other].float()).abs().max():.3g})")


def check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str) -> None:
    """Every key of `expected` in `state` with its shape, and no other: CODILoadError naming `where`, the first few
    offending keys and their counts."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    if misshaped:
        problems.append(f"wrong shapes: {_describe(misshaped, 3)}")
    if problems:
        hint = ""
        if missing and unexpected:
            hint = (f"\nA different key prefix? The model expects e.g. {sorted(missing)[0]!r}, "
                    f"the file has e.g. {sorted(unexpected)[0]!r}.")
        raise CODILoadError(f"{where} does not match the CODI model:\n  " + "\n  ".join(problems) + hint)


def codi_module(config, state: dict[str, torch.Tensor], lora_alpha: float) -> tuple[CODIModule, int | None]:
    """The CODI module the checkpoint `state` must fill, weights uninitialised (under torch.device("meta"): no
    memory): the base causal LM of `config` with the three special tokens, LoRA of the checkpoint's rank (None:
    none), the projection of its width; and that rank."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=torch.float32)
        lm.resize_token_embeddings(config.vocab_size + 3, mean_resizing=False)
    rank = lora_rank(state)
    if rank is not None:
        lm = wrap_lora(lm, rank, lora_alpha)
    d_model = config.hidden_size
    prj_w = state.get("prj.1.weight")
    return CODIModule(lm, make_projection(d_model, prj_w.shape[0] if prj_w is not None else d_model)), rank


def lora_rank(state: dict[str, torch.Tensor]) -> int | None:
    """The LoRA rank read from the `lora_A` shapes, or None for a checkpoint trained without LoRA."""
    ranks = {t.shape[0] for k, t in state.items() if ".lora_A." in k}
    if len(ranks) > 1:
        raise CODILoadError(f"checkpoint mixes LoRA ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def wrap_lora(lm: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wrap an HF causal LM in peft LoRA exactly as CODI trained it (targets and fan_in_fan_out by family)."""
    from peft import LoraConfig, get_peft_model

    family = FAMILIES[lm.config.model_type]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(family.lora_targets),
                        fan_in_fan_out=family.fan_in_fan_out)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(lm, config)


def _stop_ids(tokenizer, names: tuple[str, ...]) -> tuple[int, ...]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[n] for n in names if n in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise CODILoadError("the tokenizer has no eos token and the preset names no stop token")
    return tuple(dict.fromkeys(ids))


def load_codi(model: str = "demo", ckpt: str | None = None, base: str | None = None,
              dtype: str = "auto", device: str = "auto", prepack: bool = True) -> CODIModel:
    """Load a CODI model by preset name, optionally overriding its checkpoint and base (local dir or hub id).

    prepack: on CPU in float32, pack the decoder's linear weights once for oneDNN (`codi_attn.prepack`); such a
    model cannot be deep-copied, moved or cast (load it again instead, or pass prepack=False).
    `source['files']` records the files read: {'base': {name: {'path', 'size', 'sha256'}}, 'ckpt': {...}}."""
    preset = get_preset(model)
    base, ckpt = resolve_sources(model, ckpt, base)
    dev, dt = resolve_device_dtype(device, dtype)
    base_files(base)  # a local base without config or tokenizer: named before transformers tries
    config, tokenizer = _load_config_and_tokenizer(base)
    check_family(model, config.model_type, base)
    ckpt_file = _checkpoint_file(ckpt)
    files = {"base": fingerprint_files(base_files(base)), "ckpt": fingerprint_files({ckpt_file.name: ckpt_file})}
    state = read_state_dict(ckpt_file)

    vocab = config.vocab_size  # V: pad/bot/eot are V, V+1, V+2
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.pad_token_id != vocab:
        raise CODILoadError(f"the tokenizer of {base} gives [PAD] id {tokenizer.pad_token_id}, expected "
                            f"the config's vocab_size {vocab}")

    fused = fuse_gelu(config)
    module, rank = codi_module(config, state, preset.lora_alpha)  # every weight from the checkpoint, checked here
    lm, prj = module.codi, module.prj
    check_state_dict(module, state, f"checkpoint {ckpt_file}")
    module.load_state_dict(state, strict=True)
    if rank is not None:
        lm = lm.merge_and_unload()
    lm.tie_weights()
    lm.to(device=dev, dtype=dt).eval()
    prj.to(device=dev, dtype=dt).eval()
    linear = prepack_decoder(lm, dev, dt) if prepack else linear_kernel(0)

    return CODIModel(
        lm=lm, prj=prj, tokenizer=tokenizer, name=model,
        pad_id=vocab, bot_id=vocab + 1, eot_id=vocab + 2,
        stop_ids=_stop_ids(tokenizer, preset.stop_tokens),
        n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        max_positions=getattr(config, "max_position_embeddings", None) or config.n_positions,
        device=dev, dtype=dt, is_demo=(model == "demo" and base == PRESETS["demo"].base),
        source={"base": base, "ckpt": ckpt, "lora_rank": rank, "lora_alpha": preset.lora_alpha if rank else None,
                "activation": "gelu_pytorch_tanh (fused form of the config's gelu_new)" if fused
                else getattr(config, "hidden_act", None) or config.activation_function,
                "linear": linear, "files": files},
    )
