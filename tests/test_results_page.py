"""The "Reproduction status" page: its inventory of the papers' tables and figures, and how claims map to them."""
import csv
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
from reproduction import PAPER_CHAPTERS, PROFILE_WORDS, cited_items  # noqa: E402

PAPERS = ROOT.parent / "shared" / "papers"
PAPER_FILE = {"adtr": "adtr", "memmc_mae": "memmc-mae", "qfae": "qfae", "anomem": "anomem", "mdd_net": "mdd-net"}


def inventory():
    with open(ROOT / "book" / "paper_items.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_inventory_rows_are_well_formed():
    rows = inventory()
    assert rows and {r["chapter"] for r in rows} == set(PAPER_CHAPTERS)
    for r in rows:
        assert re.fullmatch(r"(Table|Figure) \d+(\([a-z]\))?", r["item"]), r
        assert r["profile"] in PROFILE_WORDS, r
        assert r["what"], r
        if r["profile"] in ("no", "partial"):
            assert r["note"], f"say why {r['chapter']} {r['item']} is {r['profile']}"
    keys = [(r["chapter"], r["item"]) for r in rows]
    assert len(keys) == len(set(keys)), "an item listed twice"


@pytest.mark.skipif(not PAPERS.is_dir(), reason=f"the papers' text is not here ({PAPERS})")
@pytest.mark.parametrize("chapter", PAPER_CHAPTERS)
def test_every_numbered_table_and_figure_of_the_paper_is_listed(chapter):
    text = (PAPERS / f"{PAPER_FILE[chapter]}.txt").read_text(errors="replace")
    # a caption starts a line, perhaps in bold or as a list item: "Table 3." / "**Fig. 2:" / "• Figure 4:"
    named = {f"{'Table' if k.lower().startswith('tab') else 'Figure'} {n}"
             for k, n in re.findall(r"(?m)^[\s•*]*(Table|TABLE|Fig\.|Figure|FIGURE)\s*(\d+)[.:]", text)}
    listed = {re.sub(r"\(.\)$", "", r["item"]) for r in inventory() if r["chapter"] == chapter}
    assert named <= listed, f"not in book/paper_items.csv: {sorted(named - listed)}"


def test_a_claim_cites_the_items_its_text_starts_with():
    assert cited_items("Table 1/2a: the perceptual loss beats the MAE loss") == {"Table 1", "Table 2"}
    assert cited_items("Table 4: ADTR beats (a) CNN, pixel AUROC") == {"Table 4"}
    assert cited_items("Fig. 5: the difference vectors separate") == {"Figure 5"}
    assert cited_items("ADTR beats the kNN baseline: mean image AUROC") == set()
