"""The lens per layer (codi_attn.lens): residuals through the final norm are the model's hidden states (BOT's,
projected, z1), and lens ranks equal ranking the LM head's logits over the number tokens directly."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from codi_attn.hooks import RecordResiduals
from codi_attn.lens import final_norm, lens_ranks, lens_table, number_token_values
from codi_attn.runner import Runner
from reference import QUESTIONS


def test_residuals_and_lens_ranks_equal_a_direct_computation(gpt2_model):
    """RecordResiduals' last layer at thought k, through the final norm, is the thought's final hidden state, and
    at BOT, through the final norm and the projection, z1; the lens rank equals ranking the LM head's logits over
    the number tokens directly."""
    from codi_attn.hooks import RecordThoughts

    m = gpt2_model
    resid, thoughts = RecordResiduals(m, 2), RecordThoughts(2)
    Runner(m, max_new_tokens=1).run(QUESTIONS[:2], [resid, thoughts])
    with torch.no_grad():
        last = final_norm(m)(torch.as_tensor(resid.resid[:, 1:, -1])).numpy()
    np.testing.assert_allclose(last, thoughts.hidden, atol=1e-5)
    with torch.no_grad():  # BOT (position 0): its final hidden state, projected, is the first fed thought z1
        z1 = m.prj(final_norm(m)(torch.as_tensor(resid.resid[:, 0, -1]))).numpy()
    np.testing.assert_allclose(z1, thoughts.z[:, 0], atol=1e-5)
    ids, values = number_token_values(m)
    value = values[3]
    ranks = lens_ranks(m, resid.resid, np.array([value, None], dtype=object))
    assert np.isnan(ranks[1]).all()
    head = m.lm.get_output_embeddings().weight.detach()
    with torch.no_grad():
        logits = (final_norm(m)(torch.as_tensor(resid.resid[0])) @ head[torch.as_tensor(ids)].T).numpy()
    scores = pd.DataFrame(logits.reshape(-1, len(ids)).T).groupby(values).max()  # a value: its best token
    direct = 1 + (scores.to_numpy() > scores.loc[value].to_numpy()).sum(0)
    np.testing.assert_array_equal(ranks[0].ravel(), direct)


def test_lens_table_shares_and_its_permuted_floor(gpt2_model):
    """Each cell's top-1 / top-5 shares and median rank are those of lens_ranks over the problems ranked; the
    permuted floor equals top-1 where every problem has the same target (a permutation changes nothing) and is a
    share elsewhere."""
    from codi_attn.probes import targets

    m = gpt2_model
    resid = RecordResiduals(m, 4)
    Runner(m, max_new_tokens=1).run(QUESTIONS, [resid])
    solutions = ["<<12*4=48>>\n<<48+2=50>>\n#### 50", "<<12*4=48>>\n<<48+24=72>>\n#### 72",
                 "<<12*4=48>>\n<<48-46=2>>\n#### 2", "<<12*4=48>>\n<<48/2=24>>\n#### 24"]
    table = lens_table(m, resid.resid, solutions).set_index(["target", "position", "layer"])
    labels = targets(solutions, 7)
    for name in ("step 1", "step 2"):
        ranks = lens_ranks(m, resid.resid, labels[name])
        ranked = ~np.isnan(ranks[:, 0, 0])
        cell = table.loc[(name, "z3", 1)]
        r = ranks[ranked, 3, 1]
        assert cell["n"] == ranked.sum() and cell["top1"] == (r == 1).mean() and cell["top5"] == (r <= 5).mean()
        assert cell["median_rank"] == np.median(r)
    one = table.loc["step 1"]  # 48 for every problem
    np.testing.assert_array_equal(one["permuted_top1"], one["top1"])
    rng = np.random.default_rng(0)  # the docstring's draws, one per target in order: the other problems' targets
    for name in (t for t in labels if not t.startswith("op")):
        ranked = ~np.isnan(lens_ranks(m, resid.resid, labels[name])[:, 0, 0])
        if not ranked.any():
            continue
        shuffled, idx = np.array(labels[name], dtype=object), np.flatnonzero(ranked)
        shuffled[idx] = shuffled[rng.permutation(idx)]
        by_hand = (lens_ranks(m, resid.resid, shuffled)[ranked] == 1).mean(0)  # [7, L]
        got = table.loc[name]["permuted_top1"].to_numpy().reshape(by_hand.shape)
        np.testing.assert_array_equal(got, by_hand)
        if name == "step 2":  # distinct values: another problem's target is a real control
            assert (shuffled[idx] != np.array(labels[name], dtype=object)[idx]).any()


def test_lens_ranks_do_not_depend_on_the_batch(gpt2_model):
    """Problems ranked in batches of 1, 3 or all at once get the same ranks, each its own (distinct targets, one
    unranked)."""
    m = gpt2_model
    resid = RecordResiduals(m, 4)
    Runner(m, max_new_tokens=1).run(QUESTIONS, [resid])
    _, values = number_token_values(m)
    targets = np.array([values[3], values[5], None, values[7]], dtype=object)
    whole = lens_ranks(m, resid.resid, targets)
    assert np.isnan(whole[2]).all() and not np.isnan(whole[[0, 1, 3]]).any()
    for batch in (1, 3):
        np.testing.assert_array_equal(lens_ranks(m, resid.resid, targets, batch=batch), whole)
    for n in (0, 1, 3):  # each problem alone: its own residuals and target
        np.testing.assert_array_equal(lens_ranks(m, resid.resid[n: n + 1], targets[n: n + 1])[0], whole[n])


def test_lens_table_shares_count_rank_five_in_the_top_five(monkeypatch):
    """With scripted ranks (1, 5 and 6 for the three ranked problems, the fourth has no step 1): top1 1/3, top5 2/3
    (rank 5 is in the top five), median 5, n 3; the permuted floor is the top-1 share of the permuted run's
    ranks over the same problems."""
    import codi_attn.lens as lens

    scripted = {6.0: 1.0, 8.0: 5.0, 10.0: 6.0}

    def fake_ranks(model, resid, values, batch=64):
        per = [scripted.get(float(v), 7.0) if v is not None and not pd.isna(v) else np.nan for v in values]
        return np.broadcast_to(np.array(per)[:, None, None], resid.shape[:3]).copy()

    monkeypatch.setattr(lens, "lens_ranks", fake_ranks)
    resid = np.zeros((4, 7, 2, 3), np.float32)
    solutions = ["<<2*3=6>>\n#### 6", "<<2*4=8>>\n#### 8", "<<2*5=10>>\n#### 10", "#### 5"]
    table = lens.lens_table(None, resid, solutions).set_index(["target", "position", "layer"])
    step = table.loc["step 1"]
    assert len(step) == 14 and (step["n"] == 3).all()
    np.testing.assert_allclose(step["top1"], 1 / 3)
    np.testing.assert_allclose(step["top5"], 2 / 3)
    np.testing.assert_allclose(step["median_rank"], 5.0)
    np.testing.assert_allclose(step["permuted_top1"], 1 / 3)  # the three targets permuted: one is still rank 1
