"""The demo model's card (<out>/README.md), written from its metrics.json."""
from __future__ import annotations

import json
from pathlib import Path

from codi_attn.demo.tokenizer import EOS


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def write_card(out: Path, m: dict) -> None:
    """<out>/README.md: the model card, from metrics.json's content m."""
    t, r, nocot = m["test"], m["recipe"], m.get("nocot")
    rows = [("teacher (explicit CoT)", t["teacher"]), ("student, six thoughts", t["prj"]),
            ("student, thoughts = zeros", t["zeros"]), ("student, thoughts = BOT embedding", t["bot"]),
            ("student, thoughts of another problem with as many operations (latent swap)", t.get("swap")),
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
                       "thoughts (see the ablations and the swap).")
    ablated = max(t["zeros"], t["bot"])
    dependence = (": it cannot answer without thoughts of the kind it makes." if ablated <= t["prj"] / 2
                  else "; the ablated student keeps more than half of its accuracy.")
    swap_line = ""
    if t.get("swap") is not None:
        drop = t["prj"] - t["swap"]
        swap_line = ("Feeding each problem the six thoughts that another problem with as many operations computed "
                     f"costs {100 * drop:.1f} points: the thoughts carry "
                     + ("little problem-specific information; the answer comes mostly from reading the question "
                        "again while decoding." if drop < 0.05 else "problem-specific information."))
    thoughts_section = ""
    if m.get("thoughts"):
        th = m["thoughts"]
        thoughts_section = (f"\n## What its thoughts hold\nFrom the `join_thoughts` step of flow run `{th['run']}` "
                            f"({th['n_problems']} problems of the test split; its card has the figures and intervals):"
                            "\n\n" + "\n".join(f"- {line}" for line in th["findings"]) + "\n")
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

Zeroing the six thoughts (or replacing them with the BOT embedding) costs the student
{100 * (t['prj'] - t['zeros']):.1f} ({100 * (t['prj'] - t['bot']):.1f}) points{dependence}
{swap_line}
No-CoT baseline: {nocot_line}
{thoughts_section}
## Task
`codi_attn/demo/task.py`: a start value 1..{m['task']['max_value']} and {ops_range(m)} chained operations
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
the question. Student: question + BOT, six thoughts (z_k+1 = prj(h_k)) fed one at a time
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
python -m codi_attn.demo.train --out codi_attn/demo/weights --seed {r['seed']}
python -m codi_attn.demo.train --out codi_attn/demo/weights --seed {r['seed']} --baseline
python -m codi_attn.demo.train --out codi_attn/demo/weights --evaluate   # re-measure the test split in every mode
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


def thoughts_entry(run) -> dict:
    """What a finished AttentionFlow run (a metaflow Run) found in the thoughts: <out>/thoughts.json's content."""
    report = run.data.thought_report
    if report is None:
        raise SystemExit(f"run {run.pathspec} skipped the thought analysis (--thought_analysis false)")
    return {"run": run.pathspec, "n_problems": report.settings["n_problems"], "findings": report.findings}


def update_report(out: Path) -> None:
    """Merge <out>/nocot.json (the baseline, when trained) and <out>/thoughts.json (a flow run's findings, when
    recorded) into <out>/metrics.json and rewrite <out>/README.md."""
    m = json.loads((out / "metrics.json").read_text())
    for key in ("nocot", "thoughts"):
        if (out / f"{key}.json").exists():
            m[key] = json.loads((out / f"{key}.json").read_text())
    (out / "metrics.json").write_text(json.dumps(m, indent=1) + "\n")
    write_card(out, m)
