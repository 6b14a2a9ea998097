"""Card of one extract shard: live progress bar while it runs, then the shard's outcome."""
from __future__ import annotations

from metaflow.cards import Markdown, ProgressBar, Table


class ExtractProgress:
    """Live card of a shard. ``card`` is ``current.card``; call update() after every batch."""

    def __init__(self, card, shard_index: int, n_shards: int, n_problems: int, model_info: dict):
        self.card = card
        self.n = n_problems
        card.append(Markdown(f"# Extract: shard {shard_index + 1} of {n_shards}"))
        card.append(Markdown(
            f"Model **{model_info['name']}** ({model_info['n_layers']} layers x {model_info['n_heads']} heads, "
            f"{model_info['dtype']} on {model_info['device']}); {n_problems} problems."))
        self.bar = ProgressBar(max=max(n_problems, 1), label="problems", value=0, metadata="starting")
        card.append(self.bar)
        card.refresh()

    def update(self, done: int, n_failed: int, elapsed_s: float) -> None:
        rate = done / elapsed_s if elapsed_s > 0 else 0.0
        note = f"{done}/{self.n} done, {rate:.2f} problems/s" + (f", {n_failed} failed" if n_failed else "")
        self.bar.update(done, metadata=note)
        self.card.refresh()

    def finish(self, ids: list[str], correct, failed: list[dict], elapsed_s: float) -> None:
        """Append the shard's outcome (the card is rendered once more when the task ends)."""
        n_ok = len(ids)
        acc = f"{100 * float(correct.mean()):.1f}%" if n_ok else "n/a"
        self.card.append(Markdown("## Outcome"))
        self.card.append(Table([
            ["extracted", f"{n_ok} of {self.n}"],
            ["failed", str(len(failed))],
            ["accuracy (extracted)", acc],
            ["time", f"{elapsed_s:.1f} s ({elapsed_s / max(self.n, 1):.2f} s/problem)"],
            ["ids", f"{ids[0]} … {ids[-1]}" if n_ok else "none"],
        ], headers=["", ""]))
        if failed:
            self.card.append(Markdown("## Failed problems"))
            self.card.append(Table([[f["id"], f["error"][:300]] for f in failed], headers=["id", "error"]))
