"""codi_attn.figures: every figure builds and draws, with axes, titles and the thought labels."""
from __future__ import annotations

import io

import pytest
from matplotlib.figure import Figure

from codi_attn import metrics as M
from codi_attn.figures import metrics as P
from test_metrics import patterned, random_attention


@pytest.fixture(autouse=True)
def small_images(monkeypatch):
    monkeypatch.setattr(P, "DPI", 30)  # the same figures, fewer pixels: keeps the suite fast


@pytest.fixture(scope="module")
def reports():
    a = M.analyze(patterned(["hub0", "sequential", "skip", "uniform"], n=12, layers=3, noise=0.3),
                  n_boot=20, name="A")
    b = M.analyze(random_attention(n=12, layers=4, heads=6, seed=2), n_boot=20, name="B")
    return a, b


def _check(fig: Figure, *texts: str) -> None:
    assert isinstance(fig, Figure) and fig.axes
    assert fig._suptitle is not None and fig._suptitle.get_text()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.tell() > 2_000
    drawn = " ".join(t.get_text() for ax in fig.axes for t in ax.texts + ax.get_xticklabels() + ax.get_yticklabels()
                     + [ax.title, ax.xaxis.label, ax.yaxis.label])
    for text in texts:
        assert text in drawn


def test_model_figures(reports):
    r = reports[0]
    _check(P.top_heads_heatmaps(r, k=4), "key thought j", "query thought i", "z6", r.ranked_heads["label"][0])
    _check(P.layer_head_maps(r), "composite", "head", "layer")
    _check(P.type_map(r), "early")
    _check(P.hub_analysis(r), "z1", "lift")
    _check(P.top_heads_overview(r), r.ranked_heads["label"][0])
    _check(P.head_detail(r, r.ranked_heads["label"].iloc[-1]), "std across problems", "z1")


def test_raw_basis_figures():
    r = M.analyze(random_attention(n=6, layers=2, heads=2), basis="raw", n_boot=0)
    _check(P.top_heads_heatmaps(r, k=2), "key thought j")
    _check(P.head_detail(r, "L0H0"), "key thought j")


def test_comparison_figures(reports):
    a, b = reports
    df = M.compare_reports(a, b, ("gpt2", "llama"))
    _check(P.compare_hubs(df), "z1")
    _check(P.compare_profiles(df), "normalised layer depth", "flow")
    _check(P.compare_high_composite(df), "all heads")
    _check(P.compare_head_maps(a, b, ("gpt2", "llama")), "normalised layer depth")
    assert "gpt2" in P.compare_head_maps(a, b, ("gpt2", "llama")).axes[0].get_title()
