"""Cards of the start and sample steps: the run's settings, the demo banner, the sampled problems."""
from __future__ import annotations

from metaflow.cards import Markdown, Table

from codi_attn.runs import as_written

DEMO_BANNER = ("DEMO MODEL: this run uses the small offline demo CODI model shipped with codi-attn, "
               "not a released CODI checkpoint. Its attention says nothing about GPT-2 or LLaMA CODI; "
               "run with --model gpt2 or --model llama (and --ckpt/--base for local copies) for those.")


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def start_card(settings: dict, demo: bool, warnings: list[str] = ()) -> list:
    """Banner (demo model), warnings and a table of the validated settings."""
    parts = [Markdown("# AttentionFlow: settings")]
    if demo:
        parts.append(Markdown(f"> **{DEMO_BANNER}**"))
    parts += [Markdown(f"> **Warning:** {w}") for w in warnings]
    shown = {**settings}
    n, n_records = shown.pop("n", None), shown.pop("n_records", None)
    shown["n_problems"] = f"{n or n_records} of {n_records} in the split"
    parts.append(Table([[k, as_written(k, v) if v != "" else "(none)"] for k, v in shown.items()],
                       headers=["parameter", "value"]))
    return parts


def sample_card(problems: list[dict], fingerprint: str, dataset: str, split: str, n_records: int,
                seed: int, n_shards: int, shard_size: int, show: int = 10) -> list:
    """Summary of the sample (size, source, fingerprint, sharding) and its first problems."""
    n = len(problems)
    how = (f"seed-{seed} sample of {n} of {n_records}" if n < n_records else f"all {n_records} problems")
    parts = [
        Markdown(f"# Sample: {n} problems"),
        Table([
            ["dataset", dataset],
            ["split", f"{split} ({n_records} problems)"],
            ["sample", how],
            ["dataset fingerprint", fingerprint],
            ["shards", f"{n_shards} of up to {shard_size} problems"],
            ["first ids", ", ".join(p["id"] for p in problems[:6]) + (" …" if n > 6 else "")],
        ], headers=["", ""]),
        Markdown(f"## First {min(show, n)} problems"),
        Table([[p["id"], _short(p["question"]), p["answer"]] for p in problems[:show]],
              headers=["id", "question", "gold answer"]),
    ]
    return parts
