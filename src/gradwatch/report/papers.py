"""The report of a paper preset: our numbers beside the published ones.

A lab run of a paper preset (:mod:`gradwatch.lab.papers`) writes, in ``lab.json``,
``paper.citation`` and ``paper.table``: one row per published number with our mean ±
std over seeds (:meth:`gradwatch.lab.presets.PaperRow.to_dict`). :func:`paper_html`
renders that as the report's "Beside the paper" section; the claims' verdicts are the
report's "What the lab checked" table. Everything comes from ``lab.json``: the report
never re-runs a preset's metrics.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

__all__ = ["paper_rows", "paper_html"]

_HEAD = ("metric", "our configuration", "ours: mean ± std", "seeds", "paper's row", "published",
         "source")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def paper_rows(lab: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The rows of ``lab.json``'s ``paper.table`` (dicts), or none for a lab without a paper."""
    paper = lab.get("paper") if isinstance(lab, Mapping) else None
    table = paper.get("table") if isinstance(paper, Mapping) else None
    return [row for row in table if isinstance(row, Mapping)] if isinstance(table, list) else []


def paper_html(lab: Mapping[str, Any] | None) -> str:
    """The "Beside the paper" section (escaped HTML), or "" when the lab has no paper table."""
    rows = paper_rows(lab)
    paper = lab.get("paper") if isinstance(lab, Mapping) else None
    citation = str(paper.get("citation", "")) if isinstance(paper, Mapping) else ""
    if not rows:
        return ""
    body = []
    for row in rows:
        ours = row.get("ours", "-")
        cells = [
            (_e(row.get("metric", "")), False),
            (_e(row.get("label") or "(reference only)"), False),
            (_e(ours), True),
            (_e(row.get("n", 0)), True),
            (_e(row.get("published_label", "")), False),
            (_e(row.get("published", "")), True),
            (_e(row.get("source", "")), False),
        ]
        body.append("<tr>" + "".join(f"<td class='num'>{c}</td>" if num else f"<td>{c}</td>"
                                     for c, num in cells) + "</tr>")
    head = "".join(f"<th scope='col'>{h}</th>" for h in _HEAD)
    lead = (f"<p>{_e(citation)}</p>" if citation else "") + (
        "<p class='note'>Our mean ± sample standard deviation over seeds beside the number the paper "
        "published. Our runs are scaled down to a few minutes on two cores (the preset's description "
        "says how), so expect the ordering, not the values, to match; the claims below say which "
        "orderings held.</p>"
    )
    return (f"<section id='paper'><h2>Beside the paper</h2>{lead}<div class='table-wrap'><table>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>")
