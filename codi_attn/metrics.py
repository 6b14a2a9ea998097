"""Head metrics for the 6x6 attention between CODI's continuous thoughts, with baselines and intervals.

Inputs (codi-spec section 3)
    attention  [N, L, H, 6, 6]  A[n, l, h, i, j]: problem n, layer l, query head h, weight from query
               thought i to key thought j as a fraction of the query's WHOLE row; j > i is 0.
    mass       [N, L, H, 6, 4]  each thought row split into MASS_PARTS (sum 1), optional.
Array axes are 0-based (i, j = 0..5: thought i + 1, codi_attn.conventions); text and figures say z1..z6.

Bases
    raw     A as captured: row i sums to its thought-block mass m_i < 1.
    renorm  each problem's row divided by its thought-block sum (rows sum to 1; an all-zero row stays 0).
Per head, M is the problem-mean matrix of the basis. DEFAULT_BASIS is "renorm": the raw entries are
dominated by how much of a row reaches the thought block at all (10-15 % in the released models, the
rest goes to the first token and the question), so raw hub and skip scores mostly rank thought-block
mass rather than the pattern inside the block; renorm separates the two (the mass is reported on
its own) and puts every head on the 0-1 scale the design's thresholds assume.

Design scores (the formulas of the original design, the CoT_Exploration attention-flow plan)
    flow          sum_{j<i} M_ij / sum_{j<=i} M_ij     share of thought-block attention to EARLIER thoughts
    hub           Var_j(c_j), c_j = sum_i M_ij          population variance of the column sums
    hub_position  argmax_j c_j
    skip          mean_{j=0,1,2} M_5j                   last thought -> first three thoughts
    composite     0.4 flow + 0.4 minmax(hub) + 0.2 minmax(skip), min-max over the heads of one model
                  (a constant score normalises to 0).
These are biased by causality (codi-spec trap 7): under causal-uniform attention on the renorm basis
flow = 0.59, hub = 0.59, hub_position = 0 (column 0 is seen by six rows, column 5 by one), and on the
trap-1 off-by-one input flow is 1.0 for every head. Hence the baseline and the lifts below.

Causal-uniform baseline U
    U_ij = m_i / (i + 1) for j <= i: the same thought-block mass per row (m_i = 1 on renorm, the head's
    observed mean row mass on raw) spread evenly over the keys each query can see. Every metric is
    reported beside its value on U (`MetricsReport.baseline`, `criteria.baseline`).

Incoming attention, lift and hubs
    incoming_j = mean_{i >= j+2} M_ij: attention to j from later thoughts that are neither j itself
    (the self type) nor its successor (the sequential type). lift_j = incoming_j(M) / incoming_j(U).
    A position is hub-eligible when at least MIN_HUB_ROWS = 3 such rows exist (z1 and z2): with six
    thoughts a column seen by fewer rows cannot be told apart from sequential or skip patterns
    (a pure i -> i-3 head gives z3 a lift of 2.7 from one of its two rows). A model-level hub is claimed only
    where the lower end of the bootstrap interval of its lift reaches LIFT_THRESHOLD = 2.

Functional types (always on renorm: a type says where inside the thought block a head looks)
    seq  = mean_{i=1..5} M_{i,i-1}      self = mean_{i=1..5} M_ii (row 0 is 1 on renorm by construction)
    long = mean over the six pairs i - j >= 3 of M_ij        hub_lift = max over eligible j of lift_j
    entropy = mean over problems and rows 1..5 of H(row) / log(i + 1)  (1 = uniform over visible keys)
    type = "diffuse" if entropy >= DIFFUSE_ENTROPY (0.9); else the largest of the lifts over U of
    seq ("sequential"), self ("self"), hub_lift ("hub"), long ("long-range", named apart from the design's
    skip score) if it reaches LIFT_THRESHOLD;
    else "mixed". Layer band: normalised depth (l + 0.5) / L in thirds (early, middle, late);
    depth profiles use N_DEPTH_BINS quarters of the same depth, so 12- and 16-layer models compare.

Stability: n_boot resamples of the problems (with replacement, seeded); 95 % percentile intervals for
every head's scores and every model-level quantity; for each head the fraction of resamples in which
it is in the top k by composite (k = TOP_K capped at half the heads). mean_std: std across problems
of M's entries (basis), averaged over the causal entries of rows 1..5 and over heads.

High-composite heads: composite > HIGH_COMPOSITE (0.7, the design's threshold, which it called "critical"; in
this tool "critical" means causally critical, codi_attn.heads).
Success criteria: see CRITERIA; each is shown with its measured value, the value causal-uniform
attention would give, and pass/fail. Model comparisons resample the problems of two runs of the same
problems (one sample, same seed and n_boot: `paired`) together, so the difference's interval comes from the
per-problem differences, other runs independently, and call a difference real when its interval excludes 0.
"""
from __future__ import annotations

import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from codi_attn.conventions import MASS_PARTS, N_THOUGHTS, head_label, thought_name
BASES = ("renorm", "raw")
DEFAULT_BASIS = "renorm"
WEIGHTS = {"flow": 0.4, "hub": 0.4, "skip": 0.2}
LIFT_THRESHOLD = 2.0
MIN_HUB_ROWS = 3
DIFFUSE_ENTROPY = 0.9
HIGH_COMPOSITE = 0.7
RENAMED = {"critical heads": "high-composite heads", "critical fraction": "high-composite fraction"}  # older runs'
STRONG_ENTRY = 0.4
TOP_K = 10
BOTTOM_K = 50
BANDS = ("early", "middle", "late")
N_DEPTH_BINS = 4
CI_LEVEL = 0.95
SPECIFIC_TYPES = ("sequential", "self", "hub", "long-range")

_ROW, _COL = np.indices((N_THOUGHTS, N_THOUGHTS))
_CAUSAL = _ROW >= _COL
_EARLIER = _ROW > _COL
_LONG = _ROW - _COL >= 3
_NON_ADJACENT = _ROW - _COL >= 2  # rows counted as incoming attention to column j
_INCOMING_ROWS = _NON_ADJACENT.sum(0)  # [6]: 4, 3, 2, 1, 0, 0
HUB_ELIGIBLE = _INCOMING_ROWS >= MIN_HUB_ROWS  # z1, z2
_STD_ENTRIES = _CAUSAL & (_ROW >= 1)

# key, phase, criterion text, threshold, comparison
CRITERIA = (
    ("strong_heads", "Phase 1", "share of heads with an entry > 0.4 (rows z2..z6)", 0.10, ">="),
    ("mean_std", "Phase 1", "mean std across problems", 0.2, "<"),
    ("max_hub", "Phase 1", "max hub variance", 0.2, ">"),
    ("top_composite", "Phase 2", "top composite", 0.6, ">"),
    ("top_bottom_ratio", "Phase 2", "top-{top} mean / bottom-{bottom} mean composite", 2.0, ">"),
    ("top_types", "Phase 2", "functional types (specific) in the top {top}", 1, ">"),
)


def top_k(n_heads: int) -> int:
    """How many heads count as 'top': TOP_K, capped at half the heads (at least 1)."""
    return min(TOP_K, max(1, n_heads // 2))


def current_names(stats: pd.DataFrame) -> pd.DataFrame:
    """Model stats (or a comparison of them) with the names older runs used (RENAMED) in today's; attrs kept."""
    out = stats.replace({"section": RENAMED, "quantity": RENAMED})
    out.attrs = dict(stats.attrs)
    return out


def high_composite(ranked: pd.DataFrame) -> pd.DataFrame:
    """The ranked heads with composite > HIGH_COMPOSITE (the design's "critical"), best first."""
    return ranked[ranked["composite"] > HIGH_COMPOSITE]


def layer_band(layer: int, n_layers: int) -> str:
    """early / middle / late: thirds of the normalised depth (layer + 0.5) / n_layers."""
    return BANDS[min(int(3 * (layer + 0.5) / n_layers), 2)]


def depth_bin(layer: int, n_layers: int, n_bins: int = N_DEPTH_BINS) -> str:
    """Label of the normalised-depth bin of a layer, e.g. '25-50%'."""
    b = min(int(n_bins * (layer + 0.5) / n_layers), n_bins - 1)
    return f"{100 * b // n_bins}-{100 * (b + 1) // n_bins}%"


# ---------------------------------------------------------------- matrices [..., 6, 6] -> scores


def renormalise(a: np.ndarray) -> np.ndarray:
    """Rows divided by their thought-block sum [..., 6, 6]; all-zero rows stay zero."""
    s = a.sum(-1, keepdims=True)
    return np.divide(a, s, out=np.zeros_like(a), where=s > 0)


def causal_uniform(row_mass: np.ndarray) -> np.ndarray:
    """[..., 6] row masses -> [..., 6, 6] with row i's mass spread evenly over keys 0..i."""
    return row_mass[..., :, None] * _CAUSAL / (np.arange(N_THOUGHTS) + 1.0)[:, None]


def baseline_of(m: np.ndarray, basis: str) -> np.ndarray:
    """Causal-uniform counterpart U of the matrices m [..., 6, 6] on a basis."""
    rows = np.ones(m.shape[:-1]) if basis == "renorm" else m.sum(-1)
    return causal_uniform(rows)


def flow_score(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [...]: share of thought-block attention that goes to earlier thoughts."""
    total = (m * _CAUSAL).sum((-2, -1))
    return np.divide((m * _EARLIER).sum((-2, -1)), total, out=np.zeros_like(total), where=total > 0)


def hub_score(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., 6, 6] -> (variance of the column sums, argmax column) each [...]."""
    c = m.sum(-2)
    return c.var(-1), c.argmax(-1)


def skip_score(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [...]: mean attention from z6 to z1..z3."""
    return m[..., 5, :3].mean(-1)


def _minmax(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """x scaled by the min and max of ref over the last two (layer, head) axes; 0 where ref is constant."""
    lo = ref.min((-2, -1), keepdims=True)
    span = ref.max((-2, -1), keepdims=True) - lo
    return np.divide(x - lo, span, out=np.zeros(np.broadcast_shapes(x.shape, span.shape)), where=span > 0)


def composite_score(flow: np.ndarray, hub: np.ndarray, skip: np.ndarray,
                    ref_hub: np.ndarray | None = None, ref_skip: np.ndarray | None = None) -> np.ndarray:
    """[..., L, H] composite; hub and skip are min-max scaled over the model's heads (ref_*: the heads
    that set the scale, default the scored heads themselves, e.g. to place a baseline among them)."""
    ref_hub = hub if ref_hub is None else ref_hub
    ref_skip = skip if ref_skip is None else ref_skip
    return (WEIGHTS["flow"] * flow + WEIGHTS["hub"] * _minmax(hub, ref_hub)
            + WEIGHTS["skip"] * _minmax(skip, ref_skip))


def incoming(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [..., 6]: mean attention to j from rows i >= j + 2; nan where no such row."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (m * _NON_ADJACENT).sum(-2) / np.where(_INCOMING_ROWS > 0, _INCOMING_ROWS, np.nan)


def seq_share(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [...]: mean of M[i, i-1] over i = 1..5."""
    return np.diagonal(m, -1, -2, -1).mean(-1)


def self_share(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [...]: mean of M[i, i] over i = 1..5."""
    return np.diagonal(m, 0, -2, -1)[..., 1:].mean(-1)


def long_share(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [...]: mean of M[i, j] over the six pairs i - j >= 3."""
    return m[..., _LONG].mean(-1)


def row_entropy(r: np.ndarray) -> np.ndarray:
    """Renormalised rows [..., 6, 6] -> [...]: mean over rows 1..5 with mass of H(row) / log(i + 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(r > 0, r * np.log(r), 0.0).sum(-1)[..., 1:] / np.log(np.arange(2, N_THOUGHTS + 1))
    has = r.sum(-1)[..., 1:] > 0
    return np.divide((h * has).sum(-1), has.sum(-1), out=np.zeros(h.shape[:-1]), where=has.sum(-1) > 0)


def max_entry(m: np.ndarray) -> np.ndarray:
    """[..., 6, 6] -> [...]: largest entry in rows 1..5 (row 0 is 1 on renorm by construction)."""
    return m[..., 1:, :].max((-2, -1))


def _design(m: np.ndarray) -> dict[str, np.ndarray]:
    """The design scores of matrices [..., L, H, 6, 6], each [..., L, H]."""
    flow, skip = flow_score(m), skip_score(m)
    hub, pos = hub_score(m)
    return {"flow": flow, "hub": hub, "hub_position": pos, "skip": skip,
            "composite": composite_score(flow, hub, skip)}


# ---------------------------------------------------------------- inputs


def _checked(attention: np.ndarray) -> np.ndarray:
    a = np.asarray(attention)
    if a.ndim != 5 or a.shape[-2:] != (N_THOUGHTS, N_THOUGHTS) or a.shape[0] < 1:
        raise ValueError(f"attention must be [N, L, H, 6, 6] with N >= 1, got {a.shape}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("attention contains NaN or inf")
    return a


def on_basis(attention: np.ndarray, basis: str) -> np.ndarray:
    """Per-problem matrices [N, L, H, 6, 6] of a basis (float32)."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    return renormalise(attention) if basis == "renorm" else attention


def _frame_index(n_layers: int, n_heads: int) -> pd.DataFrame:
    """One row per head in (layer, head) order: layer, head, label, depth, band."""
    layer, head = (x.ravel() for x in np.indices((n_layers, n_heads)))
    return pd.DataFrame({
        "layer": layer, "head": head,
        "label": [head_label(l, h) for l, h in zip(layer, head)],
        "depth": (layer + 0.5) / n_layers,
        "band": [layer_band(l, n_layers) for l in layer],
    })


def _by_composite(df: pd.DataFrame, column: str = "composite") -> pd.DataFrame:
    out = df.sort_values([column, "layer", "head"], ascending=[False, True, True], kind="stable")
    return out.reset_index(drop=True)


def _scores_frame(m: np.ndarray) -> pd.DataFrame:
    """Design scores of problem-mean matrices [L, H, 6, 6], sorted by composite."""
    df = _frame_index(*m.shape[:2])
    for k, v in _design(m).items():
        df[k] = v.ravel()
    return _by_composite(df)


def head_scores(attention: np.ndarray, basis: str = DEFAULT_BASIS) -> pd.DataFrame:
    """[N, L, H, 6, 6] -> one row per head (layer, head, label, depth, band, flow, hub, hub_position,
    skip, composite), sorted by composite descending: the design's ranked_heads."""
    return _scores_frame(on_basis(_checked(attention), basis).mean(0, dtype=np.float64))


# ---------------------------------------------------------------- sanity checks


def input_warnings(attention: np.ndarray, mass: np.ndarray | None = None) -> list[str]:
    """Plain-language warnings about inputs that look wrong (trap 1 above all); [] when clean."""
    a = _checked(attention)
    tol = 2e-3  # float16 storage
    out = []
    row0_empty = np.abs(a[..., 0, :]).max() < 1e-6
    diag_zero = np.abs(np.diagonal(a, 0, -2, -1)[..., 1:]).max() < 1e-6
    if row0_empty or diag_zero:
        seen = " and ".join(s for s, bad in (("row 0 (z1's query) is empty", row0_empty),
                                             ("the diagonal (self-attention) is zero", diag_zero)) if bad)
        out.append(f"Looks off by one (codi-spec trap 1): {seen} in every head. Softmax attention "
                   "is never exactly 0 on a visible key; this is the signature of rows labelled one "
                   "step late (self-attention read as i -> i-1). The flow score is then 1.0 for every "
                   "head; treat every number below as invalid.")
    if np.abs(a * ~_CAUSAL).max() > 1e-6:
        out.append("Entries above the diagonal (j > i) are non-zero: not causal. Is the matrix transposed?")
    rows = a.sum(-1)
    if rows.max() > 1 + tol:
        out.append(f"Latent-block rows sum to up to {rows.max():.3f} > 1: not fractions of a softmax row.")
    elif np.abs(rows[..., 1:] - 1).max() < tol:
        out.append("Every thought-block row sums to 1: the input looks renormalised already, so the raw "
                   "basis equals the renorm basis and the thought-block mass reads as 1.")
    zero_rows = int((rows[..., 1:] <= 0).sum())
    if zero_rows and not row0_empty:
        out.append(f"{zero_rows} thought rows (z2..z6) have no thought-block mass; they stay 0 on renorm.")
    if mass is not None:
        m = np.asarray(mass, dtype=np.float32)
        if m.shape != a.shape[:-1] + (len(MASS_PARTS),):
            raise ValueError(f"mass must be {a.shape[:-1] + (len(MASS_PARTS),)}, got {m.shape}")
        if np.abs(m.sum(-1) - 1).max() > tol:
            out.append(f"Mass parts {MASS_PARTS} do not sum to 1 (max error {np.abs(m.sum(-1) - 1).max():.3g}).")
        if np.abs(m[..., -1] - rows).max() > tol:
            out.append("The mass split's latent part disagrees with the 6x6 row sums "
                       f"(max difference {np.abs(m[..., -1] - rows).max():.3g}).")
    if a.shape[0] < 2:
        out.append("Only one problem: no bootstrap intervals, no std across problems.")
    return out


# ---------------------------------------------------------------- criteria


def criteria_table(measured: dict[str, float], baseline: dict[str, float] | None = None,
                   n_heads: int | None = None) -> pd.DataFrame:
    """The design's success criteria as rows (phase, criterion, measured, threshold, baseline,
    passed, baseline_passes); `measured`/`baseline` map CRITERIA keys to values (missing or nan:
    not measurable, not passed). n_heads sets the top/bottom sizes shown in the texts."""
    top = top_k(n_heads) if n_heads else TOP_K
    bottom = min(BOTTOM_K, n_heads - top) if n_heads else BOTTOM_K
    ops = {">": np.greater, ">=": np.greater_equal, "<": np.less}
    baseline = baseline or {}
    rows = []
    for key, phase, text, threshold, op in CRITERIA:
        value = float(measured.get(key, np.nan))
        base = float(baseline.get(key, np.nan))
        rows.append({
            "phase": phase, "criterion": text.format(top=top, bottom=bottom), "key": key,
            "measured": value, "threshold": f"{op} {threshold:g}", "baseline": base,
            "passed": False if np.isnan(value) else bool(ops[op](value, threshold)),
            "baseline_passes": bool(ops[op](base, threshold)) if np.isfinite(base) else pd.NA,
        })
    df = pd.DataFrame(rows)
    df["baseline_passes"] = df["baseline_passes"].astype("boolean")
    return df


def _top_bottom_ratio(composite_sorted: np.ndarray) -> float:
    n = len(composite_sorted)
    top = top_k(n)
    bottom = min(BOTTOM_K, n - top)
    if bottom < 1:
        return np.nan
    lo = composite_sorted[-bottom:].mean()
    return float(composite_sorted[:top].mean() / lo) if lo > 0 else np.inf


# ---------------------------------------------------------------- report


@dataclass
class MetricsReport:
    """Everything the metrics step produces for one model (picklable; DataFrames and arrays)."""

    name: str
    basis: str
    shape: tuple[int, int, int]  # N problems, L layers, H heads
    n_boot: int
    seed: int
    means: dict[str, np.ndarray]  # basis -> [L, H, 6, 6] problem-mean matrices
    std: np.ndarray  # [L, H, 6, 6] std across problems on the ranking basis
    scores: dict[str, pd.DataFrame]  # basis -> head_scores on that basis
    ranked_heads: pd.DataFrame  # ranking-basis scores + types + intervals + retention, by composite
    rankings: dict[str, pd.DataFrame]  # heads_ranked_by_{flow,hub,skip,composite}
    baseline: pd.DataFrame  # metric, observed (mean over heads), baseline (causal-uniform), ratio
    position_lift: pd.DataFrame  # per key position: incoming vs baseline, lift with interval, is_hub,
    #                              hub_heads (share of heads typed hub at that position)
    stability: pd.DataFrame  # per head: score intervals, top-k retention, mean std
    mean_std: float
    types: pd.DataFrame  # per head: shares, lifts over U, entropy, hub lift, type, band
    criteria: pd.DataFrame
    model_stats: pd.DataFrame  # section, quantity, group, value, lo, hi
    draws: np.ndarray  # [n_boot, len(model_stats)] bootstrap draws of model_stats.value
    mass_profile: pd.DataFrame  # per query thought: mean share of the row per MASS_PARTS
    basis_agreement: pd.DataFrame  # per score: Spearman rho raw vs renorm, top-k overlap
    warnings: list[str] = field(default_factory=list)
    problem_ids: tuple[str, ...] = ()  # [N] the problem of each attention row (empty: not given)
    fingerprint: str = ""  # the dataset fingerprint of the sample the ids are positions in (codi_attn.data)

    @property
    def n_heads(self) -> int:
        return self.shape[1] * self.shape[2]

    @property
    def high_composite_heads(self) -> pd.DataFrame:
        """Heads with composite > HIGH_COMPOSITE, best first."""
        return high_composite(self.ranked_heads)

    def detail_heads(self, n: int = 3) -> list[str]:
        """The labels of the heads shown in detail (metrics card, export): the first n high-composite heads, or
        the first n by composite where none is."""
        high = self.high_composite_heads
        return (high if len(high) else self.ranked_heads).head(n)["label"].tolist()

    @property
    def hubs(self) -> list[int]:
        """Claimed hub positions (0-based)."""
        return [int(p) for p in self.position_lift.loc[self.position_lift["is_hub"], "position"]]

    def matrix(self, label: str, basis: str | None = None) -> np.ndarray:
        """Problem-mean 6x6 matrix of one head, e.g. matrix('L4H5')."""
        row = self.ranked_heads.set_index("label").loc[label]
        return self.means[basis or self.basis][int(row["layer"]), int(row["head"])]


def _interval(draws: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the bootstrap axis; nan when there are no draws."""
    if draws.shape[axis] == 0:
        shape = np.delete(np.array(draws.shape), axis)
        return np.full(shape, np.nan), np.full(shape, np.nan)
    q = 100 * (1 - CI_LEVEL) / 2
    with _warnings.catch_warnings():  # positions without incoming rows are nan in every draw
        _warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(draws, [q, 100 - q], axis=axis)
    return lo, hi


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] multinomial resampling weights that sum to 1 per row."""
    if n < 2 or n_boot < 1:
        return np.zeros((0, n), np.float32)
    rng = np.random.default_rng(seed)
    return (rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot) / n).astype(np.float32)


def _types_frame(r_mean: np.ndarray, entropy: np.ndarray) -> pd.DataFrame:
    """Functional type of each head from renorm means [L, H, 6, 6] and entropies [L, H]."""
    u = baseline_of(r_mean[:1, :1], "renorm")[0, 0]
    df = _frame_index(*r_mean.shape[:2])
    lifts = {}
    for name, share in (("sequential", seq_share), ("self", self_share), ("long-range", long_share)):
        df[name] = share(r_mean).ravel()
        lifts[name] = df[name] / share(u)
    lift_j = incoming(r_mean)[..., HUB_ELIGIBLE] / incoming(u)[HUB_ELIGIBLE]
    df["hub_lift_position"] = np.flatnonzero(HUB_ELIGIBLE)[lift_j.argmax(-1)].ravel()
    lifts["hub"] = pd.Series(lift_j.max(-1).ravel())
    df["entropy"] = entropy.ravel()
    for name, lift in lifts.items():
        df[f"{name.replace('-', '_')}_lift"] = lift
    lift_df = pd.DataFrame(lifts)
    best = lift_df.idxmax(axis=1)
    df["type"] = np.where(df["entropy"] >= DIFFUSE_ENTROPY, "diffuse",
                          np.where(lift_df.max(axis=1) >= LIFT_THRESHOLD, best, "mixed"))
    return df


def _stability(m: np.ndarray, mb: np.ndarray, std: np.ndarray) -> pd.DataFrame:
    """Per head: design scores of m [L, H, 6, 6] with 95% intervals from the draws mb [B, L, H, 6, 6],
    top-k retention by composite and mean std across problems, sorted by composite."""
    n_boot, n_layers, n_heads = mb.shape[:3]
    k = top_k(n_layers * n_heads)
    point, db = _design(m), _design(mb)
    df = _frame_index(n_layers, n_heads)
    for key in ("flow", "hub", "skip", "composite"):
        df[key] = point[key].ravel()
        df[f"{key}_lo"], df[f"{key}_hi"] = _interval(db[key].reshape(n_boot, n_layers * n_heads))
    cb = db["composite"].reshape(n_boot, n_layers * n_heads)
    kth = -np.sort(-cb, axis=1)[:, k - 1:k]
    df[f"top{k}_retention"] = (cb >= kth).mean(0) if n_boot else np.nan
    df["mean_std"] = (std * _STD_ENTRIES).sum((-2, -1)).ravel() / _STD_ENTRIES.sum()
    return _by_composite(df)


def _position_lift(m: np.ndarray, mb: np.ndarray, basis: str, types: pd.DataFrame
                   ) -> tuple[pd.DataFrame, np.ndarray]:
    """Per key position: design column sums and incoming attention against causal-uniform, the lift with
    its interval, hub eligibility and claim, share of heads typed hub there; and the lift draws [B, 6]."""
    u = baseline_of(m, basis)
    obs, base = incoming(m).mean((0, 1)), incoming(u).mean((0, 1))
    obs_b = incoming(mb).mean((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        lift_b = obs_b / incoming(baseline_of(mb, basis)).mean((1, 2))
        lift = obs / base
    obs_lo, obs_hi = _interval(obs_b)
    lift_lo, lift_hi = _interval(lift_b)
    claim = lift_lo if len(mb) else lift
    df = pd.DataFrame({
        "position": np.arange(N_THOUGHTS), "thought": [thought_name(j + 1) for j in range(N_THOUGHTS)],
        "rows": _INCOMING_ROWS, "colsum": m.sum(-2).mean((0, 1)), "colsum_baseline": u.sum(-2).mean((0, 1)),
        "observed": obs, "observed_lo": obs_lo, "observed_hi": obs_hi, "baseline": base,
        "lift": lift, "lift_lo": lift_lo, "lift_hi": lift_hi, "eligible": HUB_ELIGIBLE,
        "is_hub": HUB_ELIGIBLE & (np.nan_to_num(claim) >= LIFT_THRESHOLD),
        "hub_heads": [float(((types["type"] == "hub") & (types["hub_lift_position"] == j)).mean())
                      for j in range(N_THOUGHTS)],
    })
    return df, lift_b


def _baselines(m: np.ndarray, basis: str, mean_entropy: float) -> tuple[pd.DataFrame, dict[str, float]]:
    """Every metric, mean over heads, beside its causal-uniform value; and the criteria's baseline values."""
    u = baseline_of(m, basis)
    point, du = _design(m), _design(u)
    u_comp = composite_score(du["flow"], du["hub"], du["skip"], point["hub"], point["skip"])
    fns = {"flow": flow_score, "hub": lambda v: hub_score(v)[0], "skip": skip_score, "seq": seq_share,
           "self": self_share, "long": long_share, "max entry (z2..z6)": max_entry}
    rows = [(k, f(m).mean(), f(u).mean()) for k, f in fns.items()]
    rows += [("composite", point["composite"].mean(), u_comp.mean()), ("row entropy", mean_entropy, 1.0)]
    df = pd.DataFrame(rows, columns=["metric", "observed", "baseline"])
    df["ratio"] = df["observed"] / df["baseline"]
    criteria = {"strong_heads": float((max_entry(u) > STRONG_ENTRY).mean()),
                "max_hub": float(du["hub"].max()), "top_composite": float(u_comp.max())}
    return df, criteria


def _measured(m: np.ndarray, ranked: pd.DataFrame, mean_std: float) -> dict[str, float]:
    """The criteria's measured values from the mean matrices [L, H, 6, 6] and the ranked heads."""
    composite = ranked["composite"].to_numpy()
    top = ranked["type"].head(top_k(len(ranked)))
    return {
        "strong_heads": float((max_entry(m) > STRONG_ENTRY).mean()),
        "mean_std": mean_std,
        "max_hub": float(ranked["hub"].max()),
        "top_composite": float(composite[0]),
        "top_bottom_ratio": _top_bottom_ratio(composite),
        "top_types": float(top[top.isin(SPECIFIC_TYPES)].nunique()),
    }


def _model_stats(a: np.ndarray, mass: np.ndarray | None, m: np.ndarray, mb: np.ndarray, w: np.ndarray,
                 entropy: np.ndarray, lift: tuple[np.ndarray, np.ndarray]) -> tuple[pd.DataFrame, np.ndarray]:
    """Model-level quantities (section, quantity, group, value, lo, hi) and their draws [B, K]: hub lifts,
    high-composite heads, row entropy, thought-block mass (and the mass split), normalised-depth profiles.
    Head-level ones are recomputed on each resampled mean mb; per-problem ones are resampled with w."""
    n_layers = a.shape[1]
    stats: list[tuple[str, str, str, float, np.ndarray]] = []
    for j in np.flatnonzero(_INCOMING_ROWS > 0):
        stats.append(("hubs", "incoming lift", thought_name(j + 1), float(lift[0][j]), lift[1][:, j]))
    high, high_b = _design(m)["composite"] > HIGH_COMPOSITE, _design(mb)["composite"] > HIGH_COMPOSITE
    stats.append(("high-composite heads", "count", "all", float(high.sum()), high_b.sum((1, 2)).astype(float)))
    stats.append(("high-composite heads", "fraction", "all", float(high.mean()), high_b.mean((1, 2))))
    row_mass = a.sum(-1).mean(-1)  # [N, L, H]
    per_problem = {("concentration", "row entropy", "all"): entropy.mean((1, 2)),
                   ("mass", "thought-block mass", "all"): row_mass.mean((1, 2))}
    if mass is not None:
        parts = np.asarray(mass, np.float64).mean((1, 2, 3))
        for p, part in enumerate(MASS_PARTS[:-1]):
            per_problem[("mass", f"{part} mass", "all")] = parts[:, p]
    bins = np.array([depth_bin(l, n_layers) for l in range(n_layers)])
    for label in dict.fromkeys(bins):
        sel = bins == label
        per_problem[("depth profile", "row entropy", label)] = entropy[:, sel].mean((1, 2))
        per_problem[("depth profile", "thought-block mass", label)] = row_mass[:, sel].mean((1, 2))
        for q, fn in (("flow", flow_score), ("seq", seq_share), ("skip", skip_score)):
            stats.append(("depth profile", q, label, float(fn(m[sel]).mean()), fn(mb[:, sel]).mean((1, 2))))
        stats.append(("depth profile", "high-composite fraction", label, float(high[sel].mean()),
                      high_b[:, sel].mean((1, 2))))
    for key, v in per_problem.items():
        stats.append((*key, float(v.mean()), w.astype(np.float64) @ v))
    df = pd.DataFrame([s[:4] for s in stats], columns=["section", "quantity", "group", "value"])
    draws = np.stack([s[4] for s in stats], axis=1)
    df["lo"], df["hi"] = _interval(draws)
    order = {"hubs": 0, "high-composite heads": 1, "concentration": 2, "mass": 3, "depth profile": 4}
    idx = df.sort_values(["section", "quantity", "group"], kind="stable",
                         key=lambda s: s.map(order) if s.name == "section" else s).index
    return df.loc[idx].reset_index(drop=True), draws[:, idx]


def _basis_agreement(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per score: Spearman rho between the bases and the overlap of their top-k heads."""
    rows = []
    for s in ("flow", "hub", "skip", "composite"):
        x, y = (scores[b].set_index("label")[s] for b in BASES)
        y = y.loc[x.index]
        k = top_k(len(x))
        rows.append({"score": s, "spearman": x.rank().corr(y.rank()),
                     f"top{k}_overlap": len(set(x.nlargest(k).index) & set(y.nlargest(k).index)) / k})
    return pd.DataFrame(rows)


def _mass_profile(a: np.ndarray, mass: np.ndarray | None) -> pd.DataFrame:
    """Per query thought: mean share of the whole row per MASS_PARTS (the thoughts part only, without mass)."""
    parts = (np.asarray(mass, np.float64).mean((0, 1, 2)) if mass is not None else
             np.column_stack([np.full(N_THOUGHTS, np.nan)] * (len(MASS_PARTS) - 1) + [a.sum(-1).mean((0, 1, 2))]))
    df = pd.DataFrame(parts, columns=list(MASS_PARTS))
    df.insert(0, "thought", [thought_name(i + 1) for i in range(N_THOUGHTS)])
    return df


def analyze(attention: np.ndarray, mass: np.ndarray | None = None, basis: str = DEFAULT_BASIS,
            n_boot: int = 200, seed: int = 0, name: str = "", problem_ids: Sequence[str] = (),
            fingerprint: str = "") -> MetricsReport:
    """All metrics of one model's attention [N, L, H, 6, 6] (mass [N, L, H, 6, 4] optional):
    scores on both bases, rankings on `basis`, causal-uniform baselines, hub lifts, bootstrap
    intervals over problems (n_boot resamples, seeded), types, criteria and warnings. problem_ids [N] (optional)
    names each row's problem and `fingerprint` the sample they are drawn from, which lets compare_reports pair
    two runs of the same problems (ids such as test_17 are positions in a dataset: the fingerprint tells whose)."""
    a = _checked(attention)
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if len(problem_ids) not in (0, len(a)):
        raise ValueError(f"problem_ids: {len(problem_ids)} ids for {len(a)} problems of attention")
    warnings = input_warnings(a, mass)
    n, n_layers, n_heads = a.shape[:3]
    per_basis = {"renorm": renormalise(a), "raw": a}
    x = per_basis[basis]
    means = {b: v.mean(0, dtype=np.float64) for b, v in per_basis.items()}
    m = means[basis]
    std = x.std(0, dtype=np.float64)
    scores = {b: _scores_frame(v) for b, v in means.items()}
    entropy = row_entropy(per_basis["renorm"])  # [N, L, H]
    types = _types_frame(means["renorm"], entropy.mean(0))

    w = _resample_weights(n, n_boot, seed)  # bootstrap over problems: resampled means [B, L, H, 6, 6]
    mb = (w @ x.reshape(n, -1)).reshape(len(w), n_layers, n_heads, N_THOUGHTS, N_THOUGHTS).astype(np.float64)

    stability = _stability(m, mb, std)
    mean_std = float(stability["mean_std"].mean())
    extra = [c for c in stability.columns if c.endswith(("_lo", "_hi", "_retention"))] + ["mean_std"]
    ranked = _by_composite(scores[basis].merge(types[["label", "type", "hub_lift", "hub_lift_position", "entropy"]],
                                               on="label").merge(stability[["label"] + extra], on="label"))
    position_lift, lift_b = _position_lift(m, mb, basis, types)
    baseline, criteria_baseline = _baselines(m, basis, float(entropy.mean()))
    criteria = criteria_table(_measured(m, ranked, mean_std if n > 1 else np.nan), criteria_baseline,
                              n_layers * n_heads)
    model_stats, draws = _model_stats(a, mass, m, mb, w, entropy, (position_lift["lift"].to_numpy(), lift_b))
    return MetricsReport(
        name=name, basis=basis, shape=(n, n_layers, n_heads), n_boot=len(w), seed=seed, means=means, std=std,
        scores=scores, ranked_heads=ranked,
        rankings={f"heads_ranked_by_{s}": _by_composite(ranked, s) for s in ("flow", "hub", "skip", "composite")},
        baseline=baseline, position_lift=position_lift, stability=stability, mean_std=mean_std, types=types,
        criteria=criteria, model_stats=model_stats, draws=draws, mass_profile=_mass_profile(a, mass),
        basis_agreement=_basis_agreement(scores), warnings=warnings, problem_ids=tuple(map(str, problem_ids)),
        fingerprint=fingerprint)


# ---------------------------------------------------------------- comparison


def paired(a: MetricsReport, b: MetricsReport) -> bool:
    """Whether two reports' bootstrap draws are paired by problem: the same problems (problem_ids of one sample
    fingerprint) in the same order, resampled with the same weights (the same seed and n_boot), so draw k of both
    reweights each problem alike."""
    return (bool(a.problem_ids) and (a.problem_ids, a.fingerprint) == (b.problem_ids, b.fingerprint)
            and (a.seed, a.n_boot) == (b.seed, b.n_boot))


def compare_reports(a: MetricsReport, b: MetricsReport, names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Model-level quantities of two runs side by side (any L x H): section, quantity, group, value
    and interval of each, diff = a - b with its bootstrap interval, and `real` (the interval excludes 0; NA
    without draws). The interval is paired where both runs resampled the same problems alike (`paired`: the
    difference of draw k of each, a bootstrap of the per-problem difference); otherwise the runs are resampled
    independently (b's draws taken in a shuffled order, since two runs of the same size and seed drew the same
    weights for different problems). Column suffixes are the names; df.attrs holds names, basis and paired."""
    if a.basis != b.basis:
        raise ValueError(f"compare reports on one basis, got {a.basis!r} and {b.basis!r}")
    na, nb = names
    key = ["section", "quantity", "group"]
    left, right = (current_names(r.model_stats) for r in (a, b))
    left, right = left.assign(_ia=np.arange(len(left))), right.assign(_ib=np.arange(len(right)))
    df = left.merge(right, on=key, how="outer", suffixes=(f"_{na}", f"_{nb}"), sort=False)
    order = {s: i for i, s in enumerate(dict.fromkeys(list(left["section"]) + list(right["section"])))}
    df = df.sort_values(key, key=lambda s: s.map(order) if s.name == "section" else s, kind="stable")
    df["diff"] = df[f"value_{na}"] - df[f"value_{nb}"]
    by_problem = paired(a, b)
    n_draws = min(len(a.draws), len(b.draws))
    lo, hi = np.full(len(df), np.nan), np.full(len(df), np.nan)
    both = df["_ia"].notna() & df["_ib"].notna()
    if n_draws:
        order_b = (np.arange(n_draws) if by_problem else
                   np.random.default_rng([a.seed, b.seed, len(b.draws)]).permutation(len(b.draws))[:n_draws])
        d = a.draws[:n_draws, df.loc[both, "_ia"].astype(int)] - b.draws[order_b][:, df.loc[both, "_ib"].astype(int)]
        lo[both.to_numpy()], hi[both.to_numpy()] = _interval(d)
    df["diff_lo"], df["diff_hi"] = lo, hi
    real = pd.array([pd.NA if np.isnan(l) else bool(l > 0 or h < 0) for l, h in zip(lo, hi)], dtype="boolean")
    df["real"] = real
    df = df.drop(columns=["_ia", "_ib"]).reset_index(drop=True)
    df.attrs.update(names=tuple(names), basis=a.basis, paired=by_problem)
    return df
