"""Greedy decoding steered to a chosen text, for tests that need answers the tiny random-weight fixtures never
give on their own (their decoding parses to no number)."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def steered(model, steer):
    """Greedy decoding steered by `steer(logits_row, last_token_id)`, applied in place to every LM-head output
    row, keyed on the last token fed to the model."""
    last = {}

    def remember(module, args):
        last["ids"] = args[0] if args[0].ndim == 1 else args[0][:, -1]

    def push(module, args, logits):
        for row, i in enumerate(last["ids"].tolist()):
            steer(logits[row], i)
        return logits

    hooks = [model.lm.get_input_embeddings().register_forward_pre_hook(remember),
             model.lm.get_output_embeddings().register_forward_hook(push)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def forced_answer(model, text: str):
    """Make greedy decoding spell `text` then stop: a bigram script keyed on the last token fed to the model."""
    script = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(set(script)) == len(script), "the script needs distinct tokens"
    after = dict(zip([model.eot_id, *script], [*script, model.stop_ids[0]]))

    def steer(logits, last_id):
        if last_id in after:
            logits[after[last_id]] += 1e4

    return steered(model, steer)
