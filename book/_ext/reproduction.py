"""The book's "Reproduction status": every table and figure of the five papers, and what this book's
committed runs measured, generated when the book is built.

Two directives, read by Sphinx from the committed chapters (no notebook is executed):

* ``{reproduction-summary}``: one row per chapter: paper items reproduced (both profiles / the paper
  profile only / partly / not), the claims' verdicts, the smoke run's time;
* ``{reproduction-status} <chapter>``: one row per table and figure of that chapter's paper (from
  ``book/paper_items.csv``): what it shows, whether and where the chapter reproduces it, and the verdicts
  of the claims that cite it (the paper's numbers and this run's interval), then the chapter's other claims.

The measured side comes from the records each chapter writes with ``uadkit.repro.record``: in a notebook
every record is also an output of its cell (``RECORD_MIME``), so the committed chapter carries them.
A chapter without records is a warning (the build fails on warnings): its committed outputs predate them.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

RECORD_MIME = "application/vnd.uadkit.record+json"  # uadkit.repro.RECORD_MIME (not imported: the build needs no torch)
PAPER_CHAPTERS = ["adtr", "memmc_mae", "qfae", "anomem", "mdd_net"]
TITLES = {"adtr": "ADTR", "memmc_mae": "MemMC-MAE", "qfae": "QFAE", "anomem": "AnoMem", "mdd_net": "MDD-Net",
          "baseline": "The kNN baseline"}
PROFILE_WORDS = {"smoke+paper": "yes, both profiles", "paper": "paper profile only", "partial": "partly", "no": "no"}
ITEM = re.compile(r"\b(Table|Figure|Fig\.)\s*(\d+)")
log = logging.getLogger(__name__)


def book_dir(app) -> Path:
    return Path(app.srcdir) / "book"


_CACHE: dict[tuple[str, float], dict] = {}


def records(directive: SphinxDirective, chapter: str) -> dict[str, dict]:
    """``{table name: record}`` of the committed ``book/<chapter>.ipynb`` (empty if none); the page is
    rebuilt when the notebook changes."""
    path = book_dir(directive.env.app) / f"{chapter}.ipynb"
    directive.env.note_dependency(str(path))
    key = (str(path), path.stat().st_mtime)
    if key not in _CACHE:
        found = {}
        for cell in json.loads(path.read_text())["cells"]:
            for out in cell.get("outputs", []):
                payload = out.get("data", {}).get(RECORD_MIME)
                if payload:
                    found[payload["table"]] = payload
        _CACHE[key] = found
    return _CACHE[key]


def items(directive: SphinxDirective) -> list[dict]:
    path = book_dir(directive.env.app) / "paper_items.csv"
    directive.env.note_dependency(str(path))
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cited_items(claim: str) -> set[str]:
    """The paper items a claim's text names at its start ("Table 1/2a: ..." -> Table 1, Table 2)."""
    head = claim.split(":", 1)[0]
    found = set()
    for kind, number in ITEM.findall(head):
        found.add(f"{'Figure' if kind.startswith('Fig') else kind} {number}")
    for extra in re.findall(r"/(\d+)", head):  # "Table 1/2a"
        found.add(f"{'Figure' if 'Fig' in head else 'Table'} {extra}")
    return found


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def claim_text(row: dict) -> str:
    paper = row.get("paper", "")
    paper = f"paper {paper}; " if paper and not paper.startswith("(") else ""
    claim = row["claim"].split(": ", 1)[-1] if cited_items(row["claim"]) else row["claim"]  # "Table 4: ..." in its row
    return f"**{row['verdict']}**: {claim} ({paper}this run {row['this run (difference, interval)']})"


class _Markdown(SphinxDirective):
    def render(self, lines: list[str]) -> list[nodes.Node]:
        container = nodes.container(classes=["uadkit-reproduction"])
        self.state.nested_parse(StringList(lines, source="reproduction"), self.content_offset, container)
        return [container]


class ReproductionSummary(_Markdown):
    """One row per chapter."""

    def run(self):
        rows = ["| chapter | paper tables and figures reproduced | claims (committed run) | time of that smoke run |",
                "|---|---|---|---|"]
        inventory = items(self)
        for ch in ["baseline", *PAPER_CHAPTERS]:
            rec = records(self, ch)
            if not rec:
                log.warning(f"reproduction status: book/{ch}.ipynb holds no recorded results; re-execute it",
                            location=self.get_location())
            mine = [i for i in inventory if i["chapter"] == ch]
            count = {k: sum(i["profile"] == k for i in mine) for k in PROFILE_WORDS}
            reproduced = (f"{count['smoke+paper']} in both profiles, {count['paper']} paper only, "
                          f"{count['partial']} partly, {count['no']} not (of {len(mine)})" if mine else "—")
            claims = rec.get("claims", {}).get("rows", [])
            verdicts = {v: sum(r["verdict"] == v for r in claims) for v in ("holds", "contradicted", "inconclusive")}
            said = ", ".join(f"{n} {v}" for v, n in verdicts.items() if n) or "—"
            wall = max((r.get("wall_time_s", 0) for r in rec.values()), default=0)
            rows.append(f"| {{doc}}`{TITLES[ch]} <{ch}>` | {reproduced} | {said} | {wall:.0f} s |")
        return self.render(rows)


class ReproductionStatus(_Markdown):
    """One row per table and figure of a chapter's paper, then its other claims."""

    required_arguments = 1

    def run(self):
        ch = self.arguments[0]
        rec = records(self, ch)
        if not rec:
            log.warning(f"reproduction status: book/{ch}.ipynb holds no recorded results; re-execute it",
                        location=self.get_location())
        claims = rec.get("claims", {}).get("rows", [])
        used = set()
        lines = ["| item | what it shows | reproduced | where | claims that cite it |", "|---|---|---|---|---|"]
        for it in (i for i in items(self) if i["chapter"] == ch):
            cites = [k for k, r in enumerate(claims) if it["item"] in cited_items(r["claim"])]
            used.update(cites)
            reproduced = PROFILE_WORDS.get(it["profile"], it["profile"])
            if it.get("note"):
                reproduced += f" ({it['note']})"
            said = "; ".join(claim_text(claims[k]) for k in cites) or "—"
            lines.append(f"| {cell(it['item'])} | {cell(it['what'])} | {cell(reproduced)} | "
                         f"{cell(it.get('section') or '—')} | {cell(said)} |")
        rest = [claims[k] for k in range(len(claims)) if k not in used]
        if rest:
            lines += ["", "Other claims of the chapter:", ""] + [f"- {claim_text(r)}" for r in rest]
        if claims:
            first = rec["claims"]
            lines += ["", f"Measured in the {first['profile']} profile on {first['dataset'].replace(',', ', ')} "
                          f"(committed run of {first['timestamp'][:10]}, seed {first['seed']}, {first['device']})."]
        return self.render(lines)


def setup(app):
    app.add_directive("reproduction-summary", ReproductionSummary)
    app.add_directive("reproduction-status", ReproductionStatus)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
