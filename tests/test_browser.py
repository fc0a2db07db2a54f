"""The rendered book as a reader sees it, in headless Chromium: every page of the table of contents at
1280 px is checked for tables, printed outputs and display equations wider than the text column, raw LaTeX left over after MathJax, walls of
stderr, and a second search box; a screenshot of its top, its first table and its first figure goes to
``_build/screenshots/``.

Needs Debian's ``chromium`` (``make chromium`` installs it where apt exists) and Playwright for Python
(in requirements.txt; it drives the installed Chromium, it downloads no browser). The book is built
from the committed notebooks into a temporary folder, with warnings as errors, and served over HTTP.
"""
from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# as the machine's closed network needs: no background requests, no GPU, no sandbox (root in a container)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
MAX_STDERR_LINES = 40  # as tests/test_book.py allows a committed notebook: a few bar states per training loop

pytestmark = pytest.mark.browser


def pages() -> list[str]:
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"], *(c["file"] for c in toc["chapters"])]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The book built from this checkout into a temporary folder and served on localhost: its base URL."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed: `make chromium` (or `apt-get install chromium`)")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -r requirements.txt")
    src = tmp_path_factory.mktemp("book")
    for name in ("book", "_config.yml", "_toc.yml", "references.bib"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    jb = Path(sys.executable).parent / "jupyter-book"
    out = subprocess.run([str(jb), "build", str(src), "-W", "-n", "--keep-going"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"the book does not build without warnings:\n{(out.stdout + out.stderr)[-4000:]}"
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no line per request in the test's output
            pass

    handler = functools.partial(Quiet, directory=str(src / "_build" / "html"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


OVERFLOW_JS = """() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const column = article.getBoundingClientRect();
  const bad = [];
  for (const el of article.querySelectorAll('table, div.cell_output pre, mjx-container[display="true"]')) {
    let box = el.parentElement;  // the nearest box that clips or scrolls it
    while (box && box !== article && getComputedStyle(box).overflowX === 'visible') box = box.parentElement;
    const width = (box || article).clientWidth;
    const right = el.getBoundingClientRect().right;
    if (el.scrollWidth > width + 2 || right > column.right + 2)
      bad.push(`${el.tagName.toLowerCase()} ${el.scrollWidth}px in ${width}px: ` + el.innerText.slice(0, 80));
  }
  return {bad, page: document.documentElement.scrollWidth, window: window.innerWidth};
}"""

LATEX_JS = """() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const copy = article.cloneNode(true);
  copy.querySelectorAll('pre, code, mjx-container, script, style, .cell_input').forEach(e => e.remove());
  return {text: copy.innerText, math: article.querySelectorAll('.math').length,
          typeset: article.querySelectorAll('mjx-container').length};
}"""

STDERR_JS = """() => Array.from(document.querySelectorAll('div.cell_output .stderr'))
  .map(e => e.innerText.split('\\n').filter(l => l.trim()).length).reduce((a, b) => a + b, 0)"""

SEARCH_JS = """() => Array.from(document.querySelectorAll(
    'input[type=search], form.bd-search, .search-button-field, button.search-button'))
  .filter(e => { const r = e.getBoundingClientRect(); return r.width > 0 && r.height > 0 && r.top < 200; })
  .map(e => `${e.tagName.toLowerCase()}.${e.className} ${Math.round(e.getBoundingClientRect().width)}px`)"""


@pytest.mark.parametrize("page", pages())
def test_page_reads_well_at_1280_px(site, browser, page):
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        tab.goto(f"{site}/{page}.html", wait_until="load")
        tab.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
        name = Path(page).name
        SHOTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(SHOTS / f"{name}-top.png"))
        for what, selector in (("table", "article table"), ("figure", "article figure img")):
            first = tab.locator(selector).first
            if first.count():
                first.scroll_into_view_if_needed()
                tab.screenshot(path=str(SHOTS / f"{name}-{what}.png"))

        wide = tab.evaluate(OVERFLOW_JS)
        assert not wide["bad"], f"{page}: wider than the text column:\n" + "\n".join(wide["bad"])
        assert wide["page"] <= wide["window"], f"{page}: the page scrolls sideways ({wide['page']} px)"

        latex = tab.evaluate(LATEX_JS)
        left = [tok for tok in ("$$", "\\begin{", "\\frac", "\\mathrm", "\\mathcal", "\\mathbb") if tok in latex["text"]]
        assert not left, f"{page}: raw LaTeX in the rendered text: {left}"
        if latex["math"]:
            assert latex["typeset"] >= latex["math"], f"{page}: MathJax typeset {latex['typeset']} of {latex['math']}"

        lines = tab.evaluate(STDERR_JS)
        assert lines <= MAX_STDERR_LINES, f"{page}: {lines} lines of stderr"

        search = tab.evaluate(SEARCH_JS)
        assert len(search) <= 1, f"{page}: more than one search field in the header: {search}"
    finally:
        tab.close()
