"""What every card is built from: table cells, DataFrames as tables, figures as images, warnings."""
from __future__ import annotations

import numpy as np
import pandas as pd
from metaflow.cards import Image, Markdown, Table

from codi_attn.settings import few_problems_note


def cell(v, digits: int = 3) -> str:
    """One table cell as text: floats rounded, missing as a dash, booleans as yes/no."""
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "inf" if np.isinf(v) else (f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.{digits}g}")
    return str(v)


def table(df: pd.DataFrame, digits: int = 3) -> Table:
    """A DataFrame as a card table (no index column), cells through `cell`."""
    return Table([[cell(v, digits) for v in row] for row in df.itertuples(index=False)],
                 headers=[str(c) for c in df.columns])


def image(fig) -> Image:
    """A Figure as a card image; the figure is cleared afterwards to free its memory."""
    img = Image.from_matplotlib(fig)
    fig.clear()
    return img


def with_ci(v: float, lo: float, hi: float, digits: int = 3) -> str:
    """'v [lo, hi]', or just v without an interval."""
    return cell(v, digits) if pd.isna(lo) else f"{cell(v, digits)} [{cell(lo, digits)}, {cell(hi, digits)}]"


def few_problems(n_problems: int, what: str = "") -> list[str]:
    """[the warning] where a card's verdicts rest on too few problems (codi_attn.settings.few_problems_note), else
    []: one of a card's warnings (warnings_md)."""
    note = few_problems_note(n_problems, what)
    return [note] if note else []


def few_problems_bullets(n_problems: int, what: str = "") -> list[str]:
    """few_problems as a verdict's bold bullets."""
    return [f"**Warning: {w}.**" for w in few_problems(n_problems, what)]


def warnings_md(warnings: list[str], who: str = "") -> list:
    return [Markdown(f"> **Warning{' (' + who + ')' if who else ''}:** {w}") for w in warnings]
