"""cards.metrics_card and cards.compare_card: components build, criteria and warnings show."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from metaflow.cards import Image, Markdown, Table

from cards.compare_card import basis_md, compare_card, differences_frame, no_comparison_card
from cards.common import cell
from cards.metrics_card import _criteria_md, _hub_md, criteria_frame, metrics_card
from codi_attn import metrics as M
from codi_attn.figures import metrics as P
from test_metrics import patterned, random_attention


@pytest.fixture(autouse=True)
def small_images(monkeypatch):
    monkeypatch.setattr(P, "DPI", 30)  # the same figures, fewer pixels: keeps the suite fast


def _texts(components) -> str:
    out = []
    for c in components:
        r = c.render()
        out.append(r.get("source", "") + " ".join(map(str, r.get("columns", []))) + str(r.get("data", "")))
    return "\n".join(out)


@pytest.fixture(scope="module")
def report():
    return M.analyze(patterned(["hub0", "hub0", "hub0", "sequential"], n=10, layers=2, noise=0.3),
                     n_boot=10, name="demo")


def test_metrics_card_shows_trap1_warning_and_criteria():
    good = random_attention(n=6, layers=2, heads=2)
    bad = np.zeros_like(good)
    bad[..., 1:, :] = good[..., :-1, :]
    parts = metrics_card(M.analyze(bad, n_boot=5, name="shifted"))
    assert all(isinstance(p, (Markdown, Table, Image)) for p in parts)
    images = [p.render() for p in parts if isinstance(p, Image)]
    assert len(images) >= 6 and all(i["src"].startswith("data:image/png") for i in images)
    text = _texts(parts)
    assert "**Warning:**" in text and "codi-spec trap 1" in text
    assert "> **Warning:** only 6 problems: percentile-bootstrap 95% intervals" in text  # before the criteria
    assert "Success criteria" in text and "top composite" in text and "criteria pass" in text


def test_hub_claim_and_failed_criteria_text(report):
    assert _hub_md(report).startswith("Hub claimed at **z1**")
    uniform = M.analyze(patterned(["uniform"] * 4, n=6), n_boot=0)
    assert _hub_md(uniform).startswith("**No hub claimed**")
    shown = criteria_frame(uniform.criteria)
    assert (shown["result"] == "FAIL").any() and {"measured", "threshold", "causal-uniform"} <= set(shown.columns)
    assert "no evidence of structure" in _criteria_md(uniform.criteria)


def test_compare_card_from_reports_and_frame(report):
    other = M.analyze(random_attention(n=10, layers=3, heads=3), n_boot=10, name="other")
    text = _texts(compare_card((report, other)))
    assert "demo vs other" in text and "Hubs claimed:** demo: z1; other: none" in text
    assert "Success criteria, both models" in text
    df = M.compare_reports(report, other, ("x", "y"))
    parts = compare_card(df)
    assert "x vs y" in _texts(parts) and sum(isinstance(p, Image) for p in parts) == 4
    shown = differences_frame(df)
    assert list(shown.columns[3:6]) == ["x", "y", "x - y"] and len(shown) == len(df)
    assert "each run resampled independently" in text
    assert f"would show about {0.05 * df['real'].notna().sum():.1f} such differences by chance" in text
    ids = [f"p{i}" for i in range(10)]
    a, b = (M.analyze(random_attention(n=10, seed=s), n_boot=10, problem_ids=ids) for s in (1, 2))
    assert "paired by problem" in _texts(compare_card((a, b), ("a", "b"), M.compare_reports(a, b)))


@pytest.mark.parametrize("value, text", [(np.nan, "—"), (pd.NA, "—"), (True, "yes"), (np.float64(0.12345), "0.123"),
                                         (np.inf, "inf"), ("z1", "z1"), (3, "3")])
def test_cell(value, text):
    assert cell(value) == text


def test_no_comparison_card_gives_one_runnable_command_per_other_model():
    """Each line of the code block is one command of the flow, for one released model, on this run's sample."""
    flow = (Path(__file__).resolve().parents[1] / "flows" / "attention_flow.py").read_text()
    parameters = set(re.findall(r'Parameter\(\s*"(\w+)"', flow))
    text = _texts(no_comparison_card("llama", "my data/gsm8k.jsonl", "test", 100, 7, "347090137565abcdef"))
    assert "(dataset fingerprint 347090137565)" in text and "llama with other models" in text
    lines = re.search(r"```\n(.*?)\n```", text, flags=re.S).group(1).splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:3] == ["python", "flows/attention_flow.py", "run"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options == {"--model": "gpt2", "--dataset": "my data/gsm8k.jsonl", "--split": "test",
                       "--n_problems": "100", "--seed": "7"}
    assert {flag[2:] for flag in options} <= parameters
    demo = re.search(r"```\n(.*?)\n```", _texts(no_comparison_card("demo", "synthetic", "test", 100, 42, "ab")),
                     flags=re.S).group(1).splitlines()
    assert [shlex.split(line)[4] for line in demo] == ["gpt2", "llama"]


def test_basis_md_marks_a_different_sample_in_bold():
    basis = {"same_sample": False, "fingerprints": ("a" * 64, "b" * 64), "sampled": (6, 8), "extracted": (6, 7),
             "in_both": 4, "shapes": ((2, 4), (3, 8)), "differences": ["--n_problems 6 here, 8 there"]}
    text = basis_md("AttentionFlow/7", basis)._text
    assert "same sample" not in text
    assert ("- Sample: **different samples** (dataset fingerprint aaaaaaaaaaaa here, bbbbbbbbbbbb there): the "
            "differences below mix models and problems; extracted 6 of 6 here, 7 of 8 there, 4 in both") in text
    assert text.endswith("- Model shape: 2 layers x 4 heads here, 3 x 8 there.\n"
                         "- Settings that differ besides the model: --n_problems 6 here, 8 there.")
