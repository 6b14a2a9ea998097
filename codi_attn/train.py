"""Train the offline demo CODI model on the synthetic task (codi-spec section 7).

A GPT-2-architecture CODI is trained from scratch, full parameters, with the
official objective: teacher CE on question -> CoT + "The answer is: N" + eos;
student CE on EOT -> "The answer is: N" + eos after question + BOT and six latents
fed one at a time through the KV cache (z_{k+1} = prj(h_k)); distillation =
SmoothL1 between student and detached teacher hidden states (embeddings and every
layer) at the "The answer is:" token, divided by the teacher's std, averaged over
layers. Loss = student CE + distill_factor x distillation + teacher CE.

Batches hold problems with one number of operations, so every sequence of a batch
has the same length (the question's sentences have fixed lengths) and nothing is
padded. A same-size question -> answer model without CoT is the baseline.

    python -m codi_attn.train --out codi_attn/demo_model --seed 0
    python -m codi_attn.train --out codi_attn/demo_model --seed 0 --baseline
"""

import argparse
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from codi_attn import synthetic
from codi_attn.answers import normalize_question, parse_answer, parse_gold
from codi_attn.extract import N_LATENTS
from codi_attn.model import make_projection

EOS, UNK, ANSWER = "<|endoftext|>", "[UNK]", "The answer is:"
CURRICULUM_HELP = (
    "Phases as 'END:MODE:W1/.../W7;...': up to fraction END of the steps, MODE "
    "'teacher' (teacher CE only) or 'codi' (full loss), with problems of 1..7 "
    "operations drawn with weights W1..W7 (one weight per number of operations, up to the "
    "largest number in the test split)."
)


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(n_texts: int = 5000) -> PreTrainedTokenizerFast:
    """Word-level tokenizer built from the task's text: eos (id 0), unk, then
    "The answer is:", every word, symbol and whole number (0..MAX_VALUE) seen in
    n_texts training records, sorted. No BOS; pad/bot/eot are NOT in it."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<<|>>|\d+|[^\w\s]"), behavior="isolated"),
    ])
    stream = synthetic.train_stream(steps=(1, 2, 3, 4))
    pieces = {str(v) for v in range(synthetic.MAX_VALUE + 1)}
    for _ in range(n_texts):
        rec = next(stream)
        for text in (rec["question"], rec["answer"]):
            pieces.update(p for p, _ in pre.pre_tokenize_str(text))
    vocab = {t: i for i, t in enumerate([EOS, UNK, ANSWER] + sorted(pieces))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=UNK)
    fast.add_tokens([ANSWER])  # matched whole, before pre-tokenization; keeps its id
    return fast


def gold_answer(record: dict) -> float:
    return parse_gold(record["answer"])


@dataclass
class Encoded:
    """Token ids of a batch of problems with one number of operations.
    question [B, Q] (the text as the extractor tokenizes it), cot [B, C] (the
    <<a op b=c>> steps), answer [B, 3] ("The answer is:", N, eos)."""

    question: torch.Tensor
    cot: torch.Tensor
    answer: torch.Tensor


def encode(tok: PreTrainedTokenizerFast, records: list[dict]) -> Encoded:
    """Encode records whose questions and CoTs have equal token lengths."""
    def ids(texts: list[str]) -> torch.Tensor:
        return torch.tensor([tok.encode(t, add_special_tokens=False) for t in texts])

    questions = [normalize_question(r["question"]) for r in records]
    cots = [" ".join(re.findall(r"<<[^>]*>>", r["answer"])) for r in records]
    answers = [f"{ANSWER} {int(gold_answer(r))}{EOS}" for r in records]
    return Encoded(ids(questions), ids(cots), ids(answers))


# ----------------------------------------------------------------------------- model


class CODI(nn.Module):
    """A GPT-2 LM `codi` over V+3 ids (pad/bot/eot = V, V+1, V+2) and the latent
    projection `prj` (Linear, GELU, Linear, LayerNorm), as in codi-spec section 1."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.codi = GPT2LMHeadModel(config)
        d = config.n_embd
        self.prj = make_projection(d, d)
        self.bot_id, self.eot_id = config.vocab_size - 2, config.vocab_size - 1

    def embed(self, token_id: int, batch: int) -> torch.Tensor:
        """The input embedding of one id for a batch: [B, 1, d]."""
        return self.codi.transformer.wte.weight[token_id].expand(batch, 1, -1)

    def think(self, question: torch.Tensor, latents: str | torch.Tensor = "prj", cache: DynamicCache | None = None
              ) -> tuple[DynamicCache, torch.Tensor]:
        """Question + BOT, then six latents fed one at a time; returns the KV cache
        (Q + 7 positions) and the fed latents [B, 6, d]. latents: 'prj' (z_{k+1} = prj(h_k)),
        'zeros' or 'bot' (every latent replaced by zeros or by the BOT embedding), or a
        tensor [B, 6, d] fed as given (e.g. another problem's latents). question: [B, Q]
        token ids; a given cache already holds the question (only BOT is fed)."""
        lm, B = self.codi.transformer, question.shape[0]
        if isinstance(latents, str) and latents not in ("prj", "zeros", "bot"):
            raise ValueError(f"latents must be 'prj', 'zeros', 'bot' or a [B, 6, d] tensor, not {latents!r}")
        bot = torch.full((B, 1), self.bot_id, dtype=torch.long)
        if cache is None:
            cache = DynamicCache(config=self.codi.config)
            h = lm(input_ids=torch.cat([question, bot], 1), cache=cache, use_cache=True).last_hidden_state
        else:
            h = lm(input_ids=bot, cache=cache, use_cache=True).last_hidden_state
        fed = []
        for k in range(N_LATENTS):
            if not isinstance(latents, str):
                z = latents[:, k: k + 1]
            elif latents == "prj":
                z = self.prj(h[:, -1:])
            elif latents == "zeros":
                z = torch.zeros_like(h[:, -1:])
            else:
                z = self.embed(self.bot_id, B)
            fed.append(z)
            h = lm(inputs_embeds=z, cache=cache, use_cache=True).last_hidden_state
        return cache, torch.cat(fed, 1)


def new_model(vocab_size: int, d: int, n_layer: int, n_head: int, n_positions: int) -> CODI:
    """A randomly initialised CODI over vocab_size + 3 ids (dropout 0, tied head)."""
    config = GPT2Config(
        vocab_size=vocab_size + 3, n_positions=n_positions, n_embd=d, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=vocab_size, tie_word_embeddings=True,
    )
    return CODI(config)


# ----------------------------------------------------------------------------- losses


def teacher_forward(model: CODI, b: Encoded, cache: DynamicCache | None = None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Teacher CE on everything after the question, and the hidden states
    (embeddings + every layer, last one after ln_f) at "The answer is:":
    n_layer+1 x [B, d]. A given (empty) cache is left holding the question only."""
    ids = torch.cat([b.question, b.cot, b.answer], 1)
    Q, C = b.question.shape[1], b.cot.shape[1]
    out = model.codi(input_ids=ids, cache=cache, use_cache=cache is not None, output_hidden_states=True)
    if cache is not None:
        cache.crop(Q - ids.shape[1])  # keep the question's keys and values
    ce = F.cross_entropy(out.logits[:, Q - 1:-1].flatten(0, 1), ids[:, Q:].flatten())
    return ce, tuple(h[:, Q + C] for h in out.hidden_states)


def student_forward(model: CODI, b: Encoded, cache: DynamicCache | None = None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Student CE on "The answer is:", N, eos after question + BOT + six latents + EOT,
    and its hidden states at "The answer is:": n_layer+1 x [B, d]. A given cache
    holds the question's keys and values."""
    cache, _ = model.think(b.question, cache=cache)
    eot = torch.full((b.answer.shape[0], 1), model.eot_id, dtype=torch.long)
    out = model.codi(input_ids=torch.cat([eot, b.answer], 1), cache=cache, output_hidden_states=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), b.answer.flatten())
    return ce, tuple(h[:, 1] for h in out.hidden_states)


def codi_loss(model: CODI, b: Encoded, distill_factor: float = 1.0) -> dict[str, torch.Tensor]:
    """The official CODI objective on one batch; 'loss' is the sum to minimise.
    The question is run once: teacher and student continue from the same keys and
    values (the same computation the two separate passes would make)."""
    cache = DynamicCache(config=model.codi.config)
    teacher_ce, t_hidden = teacher_forward(model, b, cache)
    student_ce, s_hidden = student_forward(model, b, cache)
    distill = sum(F.smooth_l1_loss(s, t.detach()) / t.detach().std() for s, t in zip(s_hidden, t_hidden))
    distill = distill / len(t_hidden)
    loss = student_ce + distill_factor * distill + teacher_ce
    return {"loss": loss, "teacher_ce": teacher_ce, "student_ce": student_ce, "distill": distill}


def nocot_loss(model: CODI, b: Encoded) -> dict[str, torch.Tensor]:
    """Baseline: CE on "The answer is:", N, eos right after the question."""
    Q = b.question.shape[1]
    ids = torch.cat([b.question, b.answer], 1)
    logits = model.codi(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, Q - 1:-1].flatten(0, 1), b.answer.flatten())
    return {"loss": ce}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy(model: CODI, cache: DynamicCache, first: torch.Tensor, max_new: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding after the cached prefix, starting by feeding `first`
    [B, L]; the EOT id is excluded from the argmax; stops at eos. Returns the new
    ids of each row, eos excluded."""
    B = first.shape[0]
    rows: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    ids = first
    for _ in range(max_new):
        logits = model.codi(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        logits[:, model.eot_id] = -math.inf
        ids = logits.argmax(-1, keepdim=True)
        for i in range(B):
            if not done[i] and ids[i, 0].item() != eos_id:
                rows[i].append(ids[i, 0].item())
        done |= ids[:, 0] == eos_id
        if done.all():
            break
    return rows


def length_groups(tok: PreTrainedTokenizerFast, records: list[dict]) -> dict[tuple[int, int], list[int]]:
    """Record indices grouped by (question length, CoT length) in tokens."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        e = encode(tok, [r])
        groups.setdefault((e.question.shape[1], e.cot.shape[1]), []).append(i)
    return groups


def batches_by_length(tok: PreTrainedTokenizerFast, records: list[dict], size: int,
                      groups: dict[tuple[int, int], list[int]] | None = None) -> Iterator[tuple[list[int], Encoded]]:
    """(indices, encoded batch) over records grouped by question and CoT length (`groups`: their
    `length_groups`, when already computed)."""
    for idx in (groups or length_groups(tok, records)).values():
        for s in range(0, len(idx), size):
            chunk = idx[s:s + size]
            yield chunk, encode(tok, [records[i] for i in chunk])


def swap_partners(groups: dict[tuple[int, int], list[int]]) -> dict[int, int]:
    """For each record of `length_groups`, another record with the same question and CoT lengths (the
    next one of its group, cyclically): whose latents it is fed in the 'swap' control. A record alone in
    its group is its own partner."""
    partner = {}
    for idx in groups.values():
        for j, i in enumerate(idx):
            partner[i] = idx[(j + 1) % len(idx)]
    return partner


@torch.no_grad()
def predict(model: CODI, tok: PreTrainedTokenizerFast, records: list[dict], mode: str = "prj",
            batch_size: int = 256) -> list[float | None]:
    """Parsed answers. mode: 'prj', 'zeros', 'bot' (student through six latents,
    then EOT and greedy decoding, codi-spec section 3), 'swap' (each problem fed the
    six latents its `swap_partners` partner computed: a different problem of the same
    shape), 'teacher' (greedy CoT after the question) or 'nocot' (greedy after the
    question, for the baseline)."""
    model.eval()
    preds: list[float | None] = [None] * len(records)
    groups = length_groups(tok, records)
    batches = list(batches_by_length(tok, records, batch_size, groups))
    swapped: dict[int, torch.Tensor] = {}  # record -> the latents it is fed in 'swap' mode
    if mode == "swap":
        own = {i: z for idx, b in batches for i, z in zip(idx, model.think(b.question)[1])}
        swapped = {i: own[j] for i, j in swap_partners(groups).items()}
    for idx, b in batches:
        B = len(idx)
        if mode in ("teacher", "nocot"):
            cache = DynamicCache(config=model.codi.config)
            rows = greedy(model, cache, b.question, 64, tok.eos_token_id)
        else:
            latents = torch.stack([swapped[i] for i in idx]) if mode == "swap" else mode
            cache, _ = model.think(b.question, latents=latents)
            rows = greedy(model, cache, torch.full((B, 1), model.eot_id), 16, tok.eos_token_id)
        for i, row in zip(idx, rows):
            preds[i] = parse_answer(tok.decode(row, skip_special_tokens=True))
    return preds


def accuracy(model: CODI, tok: PreTrainedTokenizerFast, records: list[dict], mode: str = "prj") -> float:
    preds = predict(model, tok, records, mode)
    return sum(p == gold_answer(r) for p, r in zip(preds, records)) / len(records)


# ----------------------------------------------------------------------------- training


@dataclass
class Recipe:
    """Everything that decides the trained weights (with the seed)."""

    d: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 128
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: float = 0.03
    weight_decay: float = 0.01
    distill_factor: float = 1.0
    curriculum: str = ("0.06:teacher:1/1/1/0/0/0/0;0.25:codi:1/2/2/1/0/0/0;0.5:codi:0/1/1/2/2/1/1;"
                       "1:codi:0/0/1/1/2/2/2")
    seed: int = 0

    def phases(self) -> list[tuple[float, str, list[float]]]:
        out = []
        for phase in self.curriculum.split(";"):
            end, mode, weights = phase.split(":")
            if len(weights.split("/")) != len(OPS):
                raise ValueError(f"curriculum phase {phase!r} needs {len(OPS)} weights, one per number of "
                                 f"operations 1..{len(OPS)}")
            out.append((float(end), mode, [float(w) for w in weights.split("/")]))
        return out


def lr_at(r: Recipe, step: int) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine to min_lr."""
    w = max(1, int(r.warmup * r.steps))
    if step < w:
        return r.lr * (step + 1) / w
    p = (step - w) / max(1, r.steps - w)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * p))


def make_optimizer(model: nn.Module, r: Recipe) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.98))


def train(r: Recipe, tok: PreTrainedTokenizerFast, baseline: bool = False, eval_every: int = 0,
          eval_records: list[dict] | None = None, log_every: int = 50) -> tuple[CODI, dict]:
    """Train a CODI (or, with baseline, a same-size no-CoT model, trained on the
    no-CoT loss in every phase) for r.steps batches. Returns the model and a log with
    the loss curve, the held-out curve and the training time (wall and CPU
    seconds, held-out checks excluded)."""
    torch.manual_seed(r.seed)
    rng = random.Random(r.seed)
    streams = {k: synthetic.train_stream(seed=1000 * r.seed + k, steps=(k,)) for k in OPS}
    model = new_model(len(tok), r.d, r.n_layer, r.n_head, r.n_positions)
    opt = make_optimizer(model, r)
    phases = r.phases()
    log: dict = {"losses": [], "curve": []}
    t0, cpu0, seconds_eval, cpu_eval = time.time(), time.process_time(), 0.0, 0.0
    for step in range(r.steps):
        _, mode, weights = next(ph for ph in phases if step < ph[0] * r.steps or ph is phases[-1])
        mode = "nocot" if baseline else mode
        k = rng.choices(OPS, weights)[0]
        b = encode(tok, [next(streams[k]) for _ in range(r.batch_size)])
        for g in opt.param_groups:
            g["lr"] = lr_at(r, step)
        model.train()
        if mode == "nocot":
            losses = nocot_loss(model, b)
        elif mode == "teacher":
            losses = {"loss": teacher_forward(model, b)[0]}
        else:
            losses = codi_loss(model, b, r.distill_factor)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log["losses"].append(round(losses["loss"].item(), 5))
        if log_every and (step % log_every == 0 or step == r.steps - 1):
            parts = " ".join(f"{n} {v.item():.3f}" for n, v in losses.items())
            elapsed = time.time() - t0 - seconds_eval
            print(f"step {step:5d}/{r.steps} {mode:7s} k={k} {parts} lr {lr_at(r, step):.2e} "
                  f"{elapsed:.0f}s ({elapsed / (step + 1):.2f} s/step)", flush=True)
        if eval_every and eval_records and ((step + 1) % eval_every == 0 or step == r.steps - 1):
            te, ce = time.time(), time.process_time()
            modes = ("nocot",) if baseline else ("teacher", "prj", "zeros")
            point = {"step": step + 1, "train_s": round(te - t0 - seconds_eval)}
            point |= {m: accuracy(model, tok, eval_records, m) for m in modes}
            log["curve"].append(point)
            print("eval", json.dumps(point), flush=True)
            seconds_eval += time.time() - te
            cpu_eval += time.process_time() - ce
    log["train_s"] = round(time.time() - t0 - seconds_eval, 1)
    log["cpu_s"] = round(time.process_time() - cpu0 - cpu_eval, 1)
    return model, log


# ----------------------------------------------------------------------------- saving


def save_model(model: CODI, tok: PreTrainedTokenizerFast, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """<out>/base: config.json (vocab_size V) and tokenizer; <out>/ckpt/model.safetensors:
    'codi.' + GPT2LMHeadModel keys (lm_head cloned) and 'prj.*'."""
    base = out / "base"
    config = GPT2Config.from_dict(model.codi.config.to_dict())
    config.vocab_size, config.pad_token_id = len(tok), None  # the loader adds [PAD] = V
    config.save_pretrained(base)
    tok.save_pretrained(base)
    state = {k: v.detach().to(dtype).clone().contiguous() for k, v in model.state_dict().items()}
    (out / "ckpt").mkdir(parents=True, exist_ok=True)
    save_file(state, out / "ckpt" / "model.safetensors", metadata={"format": "pt"})


def load_model(out: Path) -> tuple[CODI, PreTrainedTokenizerFast]:
    """Load a model saved by save_model strictly (fp32)."""
    tok = PreTrainedTokenizerFast.from_pretrained(out / "base")
    config = GPT2Config.from_pretrained(out / "base")
    config.vocab_size += 3
    model = CODI(config)
    state = {k: v.float() for k, v in load_file(out / "ckpt" / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    model.codi.tie_weights()
    return model.eval(), tok


def majority_accuracy(test: list[dict], seed: int) -> tuple[float, float]:
    """Accuracy on test of always answering the most common answer of 10k
    training problems with the test split's mix of operation counts."""
    stream = synthetic.train_stream(seed=10_000 + seed)
    common = Counter(gold_answer(next(stream)) for _ in range(10_000)).most_common(1)[0][0]
    return common, sum(gold_answer(r) == common for r in test) / len(test)


# ----------------------------------------------------------------------------- report


def evaluate_all(model: CODI, tok: PreTrainedTokenizerFast, test: list[dict], modes: tuple[str, ...]) -> dict:
    """Held-out accuracy of each mode, overall and by number of operations."""
    steps = [len(re.findall(r"<<", r["answer"])) for r in test]
    result: dict = {}
    for mode in modes:
        ok = [p == gold_answer(r) for p, r in zip(predict(model, tok, test, mode), test)]
        result[mode] = round(sum(ok) / len(ok), 4)
        for k in sorted(set(steps)):
            sel = [o for o, s in zip(ok, steps) if s == k]
            result.setdefault("by_steps", {}).setdefault(str(k), {})[mode] = round(sum(sel) / len(sel), 4)
    return result


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_card(out: Path, m: dict) -> None:
    """<out>/README.md: the model card, from metrics.json's content m."""
    t, r, nocot = m["test"], m["recipe"], m.get("nocot")
    rows = [("teacher (explicit CoT)", t["teacher"]), ("student, six latents", t["prj"]),
            ("student, latents = zeros", t["zeros"]), ("student, latents = BOT embedding", t["bot"]),
            ("student, latents of another problem of the same shape (swap)", t.get("swap")),
            ("no-CoT baseline, same size and compute", nocot and nocot["test"]["nocot"]),
            ("most common answer", m["majority"]["accuracy"])]
    by_steps = "\n".join(
        f"| {k} | {pct(v['teacher'])} | {pct(v['prj'])} | {pct(v['zeros'])} | {pct(v['bot'])} | "
        f"{pct(v.get('swap'))} | "
        f"{pct(nocot and nocot['test']['by_steps'].get(k, {}).get('nocot'))} |" for k, v in t["by_steps"].items())
    curve = "\n".join(f"| {p['step']} | {p['train_s']} | {pct(p['teacher'])} | {pct(p['prj'])} | {pct(p['zeros'])} |"
                      for p in m["curve"])
    nocot_line = "not trained yet (`--baseline`)."
    if nocot:
        nocot_line = (
            f"question -> \"The answer is: N\" with the same GPT-2 config, {nocot['recipe']['steps']} steps "
            f"with the same curriculum weights, optimiser and schedule; {nocot['train_s']:.0f} s of training "
            f"on {nocot['device']}, {nocot['cpu_s']:.0f} s of CPU time against the student's {m['cpu_s']:.0f} s.")
        gap = 100 * (t["prj"] - nocot["test"]["nocot"])
        nocot_line += (f" The student is {gap:.1f} points better." if gap > 0 else
                       " On this task the no-CoT model does as well as the student or better: a model of this "
                       "size can answer without any chain of thought, while the student answers through its "
                       "latents (see the ablations and the swap).")
    ablated = max(t["zeros"], t["bot"])
    dependence = (": it cannot answer without latents of the kind it makes." if ablated <= t["prj"] / 2
                  else "; the ablated student keeps more than half of its accuracy.")
    swap_line = ""
    if t.get("swap") is not None:
        drop = t["prj"] - t["swap"]
        swap_line = (f"Feeding each problem the six latents that another problem of the same shape computed costs "
                     f"{100 * drop:.1f} points: the latents carry "
                     + ("little problem-specific information; the answer comes mostly from reading the question "
                        "again while decoding." if drop < 0.05 else "problem-specific information."))
    text = f"""# Demo CODI model (synthetic arithmetic, trained offline)

A {m['model']['params']:,}-parameter GPT-2-architecture CODI trained from scratch here, on
one CPU thread, with the official objective (codi-spec section 7). It is the default
`--model` of the flow; its held-out split is `--dataset synthetic` (test).

## Held-out accuracy
{len_test(m)} problems of the synthetic test split ({ops_text(m)} operations, a third each), greedy
decoding exactly as codi-spec section 3 (fp32, sdpa, batch of equal-length questions):

| model | accuracy |
|---|---|
""" + "\n".join(f"| {name} | {pct(v)} |" for name, v in rows) + f"""

By number of operations:

| ops | teacher | student | zeros | BOT | swap | no-CoT |
|---|---|---|---|---|---|---|
{by_steps}

Zeroing the six latents (or replacing them with the BOT embedding) costs the student
{100 * (t['prj'] - t['zeros']):.1f} ({100 * (t['prj'] - t['bot']):.1f}) points{dependence}
{swap_line}
No-CoT baseline: {nocot_line}

## Task
`codi_attn/synthetic.py`: a start value 1..{m['task']['max_value']} and {ops_range(m)} chained operations
(gets/buys/finds b more, gives away/sells/loses b, doubles, triples; b in 1..{m['task']['max_operand']}),
every intermediate value in 0..{m['task']['max_value']}, written as GSM8K records
(`a+b=<<a+b=c>>c` lines, `#### N`). Test split: {len_test(m)} distinct questions from seed
{m['task']['test_seed']}; training problems come from other seeds and skip every chain
(start value and operations) of the test split, so no test question is trained on,
not even with other names. Example:

```
{m['task']['example']['question']}
{m['task']['example']['answer']}
```

## Model and tokenizer
GPT-2 from config: d={r['d']}, {r['n_layer']} layers, {r['n_head']} heads, {r['n_positions']} positions,
dropout 0, tied head; vocabulary V={m['model']['vocab']} (word level: words, symbols, whole
numbers, "The answer is:" as one token; eos `{EOS}` id 0, no BOS) plus pad/bot/eot =
V, V+1, V+2. prj = Linear, GELU, Linear, LayerNorm (codi-spec section 1).
`base/` holds config.json (vocab_size V) and the tokenizer; `ckpt/model.safetensors`
({m['model']['ckpt_bytes'] / 1e6:.2f} MB, fp32) holds `codi.` + the GPT2LMHeadModel keys (embeddings
resized to V+3, lm_head stored equal to wte) and `prj.*`, as a CODI trained without LoRA.

## Recipe
Teacher: question, the `<<...>>` steps (all of them), "The answer is:" N, eos; CE after
the question. Student: question + BOT, six latents (z_k+1 = prj(h_k)) fed one at a time
through the KV cache with gradients through all of them, EOT, "The answer is:" N, eos;
CE after EOT. Distillation: SmoothL1 at "The answer is:" for the {r['n_layer'] + 1} hidden states
(embeddings and every layer), teacher detached, divided by the teacher's std, averaged.
Loss = student CE + {r['distill_factor']} x distillation + teacher CE. The question is run once and both
passes continue from its keys and values.
AdamW (betas 0.9/0.98, weight decay {r['weight_decay']} on matrices, clip 1.0), batch {r['batch_size']} of fresh
problems with one number of operations each, {r['steps']} steps, lr warmup to {r['lr']} over
{100 * r['warmup']:.0f}% of the steps then cosine to {r['min_lr']}. Curriculum (fraction of the steps: mode,
weights of 1..{max(m['task']['steps'])} operations): `{r['curriculum']}`. Seed {r['seed']}.

Training took {m['train_s']:.0f} s of wall-clock time ({m['s_per_step']:.2f} s/step, {m['cpu_s']:.0f} s of CPU time) on one thread
of a 2-core machine shared with other jobs; the whole command {m['wall_s']:.0f} s. Reproduce with

```
python -m codi_attn.train --out codi_attn/demo_model --seed {r['seed']}
python -m codi_attn.train --out codi_attn/demo_model --seed {r['seed']} --baseline
python -m codi_attn.train --out codi_attn/demo_model --evaluate   # re-measure the test split in every mode
```

## Training curve
First {m['curve_problems']} test problems:

| step | train s | teacher | student | zeros |
|---|---|---|---|---|
{curve}
"""
    (out / "README.md").write_text(text)


def ops_text(m: dict) -> str:
    """'5, 6 and 7' from the task's numbers of operations."""
    steps = [str(k) for k in m["task"]["steps"]]
    return ", ".join(steps[:-1]) + " and " + steps[-1]


def ops_range(m: dict) -> str:
    return f"{min(m['task']['steps'])}-{max(m['task']['steps'])}"


def len_test(m: dict) -> int:
    return m["test"]["n"]


def main() -> None:
    p = argparse.ArgumentParser(
        description="Train the offline demo CODI model on the synthetic task, evaluate it on the "
                    "held-out split and write <out>/base, <out>/ckpt, <out>/metrics.json, <out>/README.md. "
                    "The step budget is fixed, so a seed gives the same checkpoint.")
    d = Recipe()
    p.add_argument("--out", type=Path, default=Path("codi_attn/demo_model"), help="output directory")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the initialisation, data stream and curriculum")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (batches)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="problems per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--d", type=int, default=d.d, help="hidden size")
    p.add_argument("--layers", type=int, default=d.n_layer, help="transformer layers")
    p.add_argument("--heads", type=int, default=d.n_head, help="attention heads")
    p.add_argument("--distill-factor", type=float, default=d.distill_factor, help="weight of the distillation loss")
    p.add_argument("--curriculum", default=d.curriculum, help=CURRICULUM_HELP)
    p.add_argument("--eval-every", type=int, default=400, help="steps between held-out checks (0: none)")
    p.add_argument("--eval-problems", type=int, default=200, help="test problems in each held-out check")
    p.add_argument("--baseline", action="store_true",
                   help="instead train the same-size no-CoT baseline for --baseline-steps, write "
                        "<out>/nocot.json and add it to metrics.json and the card (the checkpoint is not touched)")
    p.add_argument("--evaluate", action="store_true",
                   help="train nothing: re-evaluate the model saved in --out on the whole test split (every "
                        "mode, including the latent swap) and rewrite the test entry of its metrics.json and README")
    p.add_argument("--baseline-steps", type=int, default=5000,
                   help="no-CoT steps: 5000 take about the CPU time of the 2000 CODI steps "
                        "(about 0.18 and 0.43 CPU seconds a step)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.evaluate:
        reevaluate(a.out)
        return
    t0 = time.time()
    r = Recipe(d=a.d, n_layer=a.layers, n_head=a.heads, steps=a.baseline_steps if a.baseline else a.steps,
               batch_size=a.batch_size, lr=a.lr, distill_factor=a.distill_factor, curriculum=a.curriculum,
               seed=a.seed)
    tok = build_tokenizer()
    test = synthetic.synthetic_records("test")
    model, log = train(r, tok, baseline=a.baseline, eval_every=a.eval_every, eval_records=test[:a.eval_problems])
    a.out.mkdir(parents=True, exist_ok=True)
    if a.baseline:
        nocot = {"recipe": asdict(r), "device": str(torch.get_default_device()), "train_s": log["train_s"],
                 "cpu_s": log["cpu_s"], "curve": log["curve"], "test": evaluate_all(model, tok, test, ("nocot",)),
                 "wall_s": round(time.time() - t0, 1)}
        (a.out / "nocot.json").write_text(json.dumps(nocot, indent=1) + "\n")
        print(json.dumps(nocot["test"]))
    else:
        save_model(model, tok, a.out)
        model, tok = load_model(a.out)  # report what was saved
        common, majority = majority_accuracy(test, a.seed)
        subset = test[:SUBSET]
        m = {
            "task": {"generator": "codi_attn.synthetic", "max_value": synthetic.MAX_VALUE,
                     "max_operand": synthetic.MAX_OPERAND, "steps": list(synthetic.STEPS),
                     "test_seed": synthetic.SEEDS["test"], "example": test[1]},
            "model": {"params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                      "ckpt_bytes": (a.out / "ckpt" / "model.safetensors").stat().st_size, "dtype": "float32"},
            "recipe": asdict(r), "train_s": log["train_s"], "cpu_s": log["cpu_s"],
            "s_per_step": round(log["train_s"] / r.steps, 3),
            "test": {"n": len(test)} | evaluate_all(model, tok, test, TEST_MODES),
            "majority": {"answer": common, "accuracy": round(majority, 4)},
            "subset": {"n": SUBSET} | {mode: accuracy(model, tok, subset, mode) for mode in ("prj", "zeros")},
            "curve": log["curve"], "curve_problems": a.eval_problems,
            "loss_every_50": [round(sum(log["losses"][i:i + 50]) / len(log["losses"][i:i + 50]), 4)
                              for i in range(0, len(log["losses"]), 50)],
            "wall_s": round(time.time() - t0, 1),
        }
        (a.out / "metrics.json").write_text(json.dumps(m, indent=1) + "\n")
        print(json.dumps({k: m[k] for k in ("test", "majority")}))
    if (a.out / "metrics.json").exists():
        update_report(a.out)


def reevaluate(out: Path) -> None:
    """Evaluate the model saved in <out> on the whole test split in every mode of TEST_MODES and
    rewrite the test entry of <out>/metrics.json and the README (e.g. after a mode was added)."""
    path = out / "metrics.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: --evaluate re-evaluates a model that `--out {out}` trained")
    model, tok = load_model(out)
    m = json.loads(path.read_text())
    test = synthetic.synthetic_records("test", m["test"]["n"])
    m["test"] = {"n": len(test)} | evaluate_all(model, tok, test, TEST_MODES)
    path.write_text(json.dumps(m, indent=1) + "\n")
    print(json.dumps(m["test"]))
    update_report(out)


def update_report(out: Path) -> None:
    """Merge <out>/nocot.json (the baseline, when trained) into <out>/metrics.json and
    rewrite <out>/README.md."""
    m = json.loads((out / "metrics.json").read_text())
    if (out / "nocot.json").exists():
        m["nocot"] = json.loads((out / "nocot.json").read_text())
    (out / "metrics.json").write_text(json.dumps(m, indent=1) + "\n")
    write_card(out, m)


OPS = tuple(range(1, max(synthetic.STEPS) + 1))  # numbers of operations the curriculum draws from
SUBSET = 100  # first test problems whose accuracy the tests check against metrics.json
TEST_MODES = ("teacher", "prj", "zeros", "bot", "swap")  # evaluated on the whole test split

if __name__ == "__main__":
    main()
