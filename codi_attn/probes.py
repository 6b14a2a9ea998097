"""What the residual stream at each thought holds: linear probes with control tasks (numpy and scikit-learn on
the residuals that codi_attn.hooks.RecordResiduals records; the lens per layer, which needs the model, is
codi_attn.lens).

Positions: p = 0 is BOT (the last prompt position, whose final hidden state gives z1), p = k the position where
thought k is fed.

Probes (Hewitt & Liang 2019). For each target (the value of solution step s, `step s`; the gold final answer
after '####', `answer`, which is not always the last step's value; the operation of step s, `op s`), position and
layer: a standardised ridge classifier (scikit-learn), 5-fold cross-validated over problems (no problem is in its
own training fold); accuracy of the out-of-fold predictions with a 95 % bootstrap interval. Two controls on the
same inputs and folds: the labels permuted across problems (the chance floor), and the control task: a random
label fixed per value of a surface feature of the question (its first number), drawn with the target's label
frequencies, which a probe can only learn by memorising that feature. Selectivity = accuracy - control accuracy.

Choosing a target's best cell among 7 positions x L layers picks cells whose accuracy, and whose control, are off
by chance: on noise residuals, the best cell's selectivity averaged +0.16 and its interval cleared every control
for 1 target in 8. So the problems are also split in two halves (seeded, the same for every cell of a target),
each probed on its own (5-fold cross-validated within the half, so no model sees the other half): each row
carries `selectivity_a` on half A, to choose the cell by, and accuracy, interval, control, permuted and majority
on half B (`*_b`), to judge it by (codi_attn.contents.best_probes). Scoring both halves with the folds of all
problems instead left a bias of +0.03 to +0.05 in the chosen cells' selectivity on B (a model's out-of-fold
predictions on A and on B come from the same fits).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from codi_attn.answers import parse_gold
from codi_attn.conventions import THOUGHTS
from codi_attn.solutions import numbers_in, solution_steps
from codi_attn.validate import drawn_interval

POSITIONS = ("BOT", *(f"z{k}" for k in THOUGHTS))  # p = 0..6
N_FOLDS = 5
MIN_PROBLEMS = 20  # a target is probed where at least this many problems have it
TOO_FEW = f"fewer than {MIN_PROBLEMS} problems have any one target with 2 or more values"  # why nothing is probed


# ---------------------------------------------------------------- targets


def targets(solutions: Sequence[str], max_steps: int = 7) -> dict[str, np.ndarray]:
    """Labels per target over the problems (object arrays, None where a problem does not have it): `step s`
    (the value of step s), `answer` (the gold answer after '####'), `op s` (step s's operation)."""
    steps = [solution_steps(s) for s in solutions]
    out: dict[str, np.ndarray] = {}
    for s in range(1, max_steps + 1):
        out[f"step {s}"] = np.array([st[s - 1].value if len(st) >= s else None for st in steps], dtype=object)
    out["answer"] = np.array([parse_gold(s) for s in solutions], dtype=object)
    for s in range(1, max_steps + 1):
        out[f"op {s}"] = np.array([st[s - 1].operation or None if len(st) >= s else None for st in steps],
                                  dtype=object)
    return out


def surface_feature(questions: Sequence[str]) -> np.ndarray:
    """The control task's surface feature: the first number written in each question (None if none)."""
    return np.array([numbers_in(q)[0][2] if numbers_in(q) else None for q in questions], dtype=object)


def control_labels(labels: np.ndarray, feature: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hewitt & Liang's control task: one random label per value of the surface feature, drawn with the
    labels' own frequencies, so the control has the target's classes but no relation to the model."""
    values, counts = np.unique(labels.astype(str), return_counts=True)
    by_value = {}
    out = []
    for f, label in zip(feature, labels):
        key = str(f)
        if key not in by_value:
            by_value[key] = rng.choice(values, p=counts / counts.sum())
        out.append(by_value[key])
    return np.array(out)


# ---------------------------------------------------------------- probes


def _one_hot(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, [n, classes] one-hot) of string labels."""
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, np.eye(len(classes))[codes]


def cross_validated(x: np.ndarray, label_sets: Sequence[np.ndarray], folds: list[tuple[np.ndarray, np.ndarray]]
                    ) -> list[np.ndarray]:
    """Out-of-fold correctness [n] of a standardised ridge classifier on x [n, d], for each label set [n].

    All label sets are fitted at once: one scikit-learn Ridge on the concatenated one-hot codes, each set's class
    the argmax of its block, which is exactly what RidgeClassifier predicts for that set alone (the ridge
    solution is linear in the targets; a class absent from a training fold is never predicted)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    codes = [_one_hot(y) for y in label_sets]
    y_all = np.concatenate([onehot for _, onehot in codes], axis=1)
    bounds = np.cumsum([0] + [len(classes) for classes, _ in codes])
    correct = [np.zeros(len(x), bool) for _ in label_sets]
    for train, test in folds:
        probe = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe.fit(x[train], y_all[train])
            predicted = probe.predict(x[test])
        for j, ((classes, _), y) in enumerate(zip(codes, label_sets)):
            block = predicted[:, bounds[j]: bounds[j + 1]]
            absent = y_all[train, bounds[j]: bounds[j + 1]].sum(0) == 0
            block = np.where(absent, -np.inf, block)
            correct[j][test] = classes[block.argmax(1)] == y[test]
    return correct


PROBE_COLUMNS = ("target", "position", "layer", "n", "classes", "accuracy", "ci_low", "ci_high", "permuted", "control",
                 "selectivity", "majority", "selectivity_a", "n_b", "accuracy_b", "ci_low_b", "ci_high_b", "permuted_b",
                 "control_b", "majority_b")


def majority(labels: np.ndarray) -> float:
    """The share of the most frequent label (nan for none)."""
    return float(pd.Series(labels).value_counts(normalize=True).iloc[0]) if len(labels) else float("nan")


def run_probes(resid: np.ndarray, solutions: Sequence[str], questions: Sequence[str], n_boot: int = 200,
               seed: int = 0, max_steps: int = 7) -> pd.DataFrame:
    """One row per (target, position, layer): accuracy [CI], permuted-label accuracy, control-task accuracy,
    selectivity, the majority-class rate and n; the selectivity on half A of the problems and the rest on half B
    (module docstring). resid: RecordResiduals.resid [N, 7, L, d]. Targets that the same problems have are fitted
    together (`cross_validated`)."""
    from sklearn.model_selection import KFold

    # one generator per use, so that the control labels and the halves do not move with n_boot or the layers
    relabel, split, draws = (np.random.default_rng(s) for s in (seed, [seed, 1], [seed, 2]))
    feature = surface_feature(questions)
    groups: dict[bytes, list[tuple[str, np.ndarray]]] = {}
    for name, labels in targets(solutions, max_steps).items():
        have = np.array([v is not None for v in labels])
        y = np.array([str(v) for v in labels[have]])
        if have.sum() >= MIN_PROBLEMS and len(np.unique(y)) >= 2:
            groups.setdefault(have.tobytes(), []).append((name, y))
    rows = []
    for key, members in groups.items():
        have = np.frombuffer(key, dtype=bool)
        n = int(have.sum())
        sets = []
        for _, y in members:
            sets += [y, relabel.permutation(y), control_labels(y, feature[have], relabel)]
        half_b = np.zeros(n, bool)
        half_b[split.permutation(n)[: n // 2]] = True
        parts = {"": np.arange(n), "_a": np.flatnonzero(~half_b), "_b": np.flatnonzero(half_b)}
        folds = {part: list(KFold(min(N_FOLDS, len(idx)), shuffle=True, random_state=seed).split(idx))
                 for part, idx in parts.items()}
        x_all = resid[have]
        for p, position in enumerate(POSITIONS):
            for layer in range(resid.shape[2]):
                correct = {part: cross_validated(x_all[idx, p, layer], [y[idx] for y in sets], folds[part])
                           for part, idx in parts.items()}  # all problems; A and B each fitted on its own
                for j, (name, y) in enumerate(members):
                    ok, perm, ctrl = correct[""][3 * j: 3 * j + 3]
                    ok_a, _, ctrl_a = correct["_a"][3 * j: 3 * j + 3]
                    ok_b, perm_b, ctrl_b = correct["_b"][3 * j: 3 * j + 3]
                    lo, hi = drawn_interval(ok.astype(float), n_boot, draws)
                    lo_b, hi_b = drawn_interval(ok_b.astype(float), n_boot, draws)
                    rows.append({"target": name, "position": position, "layer": layer, "n": n,
                                 "classes": len(np.unique(y)), "accuracy": float(ok.mean()), "ci_low": lo,
                                 "ci_high": hi, "permuted": float(perm.mean()), "control": float(ctrl.mean()),
                                 "selectivity": float(ok.mean() - ctrl.mean()), "majority": majority(y),
                                 "selectivity_a": float(ok_a.mean() - ctrl_a.mean()), "n_b": len(ok_b),
                                 "accuracy_b": float(ok_b.mean()), "ci_low_b": lo_b, "ci_high_b": hi_b,
                                 "permuted_b": float(perm_b.mean()), "control_b": float(ctrl_b.mean()),
                                 "majority_b": majority(y[parts["_b"]])})
    if not rows:
        return pd.DataFrame(columns=PROBE_COLUMNS)
    order = {name: i for i, name in enumerate(targets([], max_steps))}
    return pd.DataFrame(rows).sort_values(["target", "position", "layer"], key=lambda c: c.map(order)
                                          if c.name == "target" else c.map({p: i for i, p in enumerate(POSITIONS)})
                                          if c.name == "position" else c, kind="stable").reset_index(drop=True)
