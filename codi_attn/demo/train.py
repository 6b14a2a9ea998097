"""Train the offline demo CODI model on the synthetic task (codi-spec section 7).

A GPT-2-architecture CODI is trained from scratch, full parameters, with the
official objective: teacher CE on question -> CoT + "The answer is: N" + eos;
student CE on EOT -> "The answer is: N" + eos after question + BOT and six thoughts
fed one at a time through the KV cache (z_{k+1} = prj(h_k), the runner's loop with
gradients); distillation = SmoothL1 between student and detached teacher hidden
states (embeddings and every layer) at the "The answer is:" token, divided by the
teacher's std, averaged over layers. Loss = student CE + distill_factor x
distillation + teacher CE.

Batches hold problems with one number of operations, so every sequence of a batch
has the same length (the question's sentences have fixed lengths) and nothing is
padded. A same-size question -> answer model without CoT is the baseline.

    python -m codi_attn.demo.train --out codi_attn/demo/weights --seed 0
    python -m codi_attn.demo.train --out codi_attn/demo/weights --seed 0 --baseline
    python -m codi_attn.demo.train --out codi_attn/demo/weights --evaluate
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedTokenizerFast

from codi_attn.demo import task
from codi_attn.demo.card import update_report
from codi_attn.demo.codi import CODI, load_model, new_model, save_model
from codi_attn.demo.evaluate import SUBSET, TEST_MODES, accuracy, evaluate_all, reevaluate
from codi_attn.demo.tokenizer import Encoded, build_tokenizer, encode, gold_answer

DEFAULT_OUT = Path(__file__).parent / "weights"
OPS = tuple(range(1, max(task.STEPS) + 1))  # numbers of operations the curriculum draws from
CURRICULUM_HELP = (
    "Phases as 'END:MODE:W1/.../W7;...': up to fraction END of the steps, MODE "
    "'teacher' (teacher CE only) or 'codi' (full loss), with problems of 1..7 "
    "operations drawn with weights W1..W7 (one weight per number of operations, up to the "
    "largest number in the test split)."
)


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
    """Student CE on "The answer is:", N, eos after question + BOT + six thoughts + EOT,
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
    streams = {k: task.train_stream(seed=1000 * r.seed + k, steps=(k,)) for k in OPS}
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


def majority_accuracy(test: list[dict], seed: int) -> tuple[float, float]:
    """Accuracy on test of always answering the most common answer of 10k
    training problems with the test split's mix of operation counts."""
    stream = task.train_stream(seed=10_000 + seed)
    common = Counter(gold_answer(next(stream)) for _ in range(10_000)).most_common(1)[0][0]
    return common, sum(gold_answer(r) == common for r in test) / len(test)


def main() -> None:
    p = argparse.ArgumentParser(
        description="Train the offline demo CODI model on the synthetic task, evaluate it on the "
                    "held-out split and write <out>/base, <out>/ckpt, <out>/metrics.json, <out>/README.md. "
                    "The step budget is fixed, so a seed gives the same checkpoint.")
    d = Recipe()
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
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
    p.add_argument("--thoughts", metavar="RUN_ID",
                   help="train nothing: write the findings of a finished AttentionFlow run on this model (its "
                        "join_thoughts step; a run id or 'latest') to <out>/thoughts.json and the card")
    p.add_argument("--baseline-steps", type=int, default=5000,
                   help="no-CoT steps: 5000 take about the CPU time of the 2000 CODI steps "
                        "(about 0.18 and 0.43 CPU seconds a step)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.evaluate:
        print(json.dumps(reevaluate(a.out)))
        return
    if a.thoughts:
        from codi_attn.demo.card import thoughts_entry
        from codi_attn.export import find_run

        entry = thoughts_entry(find_run(a.thoughts))
        (a.out / "thoughts.json").write_text(json.dumps(entry, indent=1) + "\n")
        update_report(a.out)
        print("\n".join(entry["findings"]))
        return
    t0 = time.time()
    r = Recipe(d=a.d, n_layer=a.layers, n_head=a.heads, steps=a.baseline_steps if a.baseline else a.steps,
               batch_size=a.batch_size, lr=a.lr, distill_factor=a.distill_factor, curriculum=a.curriculum,
               seed=a.seed)
    tok = build_tokenizer()
    test = task.synthetic_records("test")
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
            "task": {"generator": "codi_attn.demo.task", "max_value": task.MAX_VALUE,
                     "max_operand": task.MAX_OPERAND, "steps": list(task.STEPS),
                     "test_seed": task.SEEDS["test"], "example": test[1]},
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


if __name__ == "__main__":
    main()
