r"""Open every page of the built book in headless Chromium, screenshot it and check it.

    python book/check_pages.py _build/html --screenshots _build/screenshots

A page fails on:

* a missing figure: an ``<img>`` that did not load (``naturalWidth`` 0 once the page has loaded
  and been scrolled through);
* raw error text: a Python traceback, ``SomethingError:`` / ``SomethingException:`` text, a
  line starting with ``Error:``, or Sphinx's own error markup (``system-message``, ``problematic``);
* a broken internal link: every local ``href``/``src`` must name an existing file, and its
  ``#fragment``, if any, an element id (or name) in that file;
* on a notebook page (one built from an ``.ipynb``), a missing Colab launch button: a link to
  ``https://colab.research.google.com/github/<owner>/<repo>/blob/<branch>/<path>.ipynb`` built from
  ``_config.yml``'s ``repository`` (url, branch, path_to_book);
* raw TeX: once MathJax has typeset the page, text outside code that still reads like TeX
  (``$$``, ``\(``, ``\theta``, ``\mathrm``...), or MathJax loaded from anywhere but the book itself
  (the book vendors it, so that formulas render with no network: ``make mathjax``).

The pages are served by a local HTTP server (as a reader would get them). Chromium and its driver
are Debian's ``chromium`` and ``chromium-driver``; selenium drives them (nothing is downloaded).
Exit status 1 when any page fails.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars")
SKIP_PAGES = {"genindex.html", "search.html", "index.html"}  # index.html is a redirect to the intro
RAW_TEX = re.compile(r"\$\$|\\[(\[]|\\(?:mathrm|mathcal|theta|alpha|epsilon|ell|max|min|frac|lVert|rVert|Delta|infty|le|ge|cdot)\b")
ERROR_PATTERNS = [
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r"\b[A-Z]\w*(Error|Exception): "),
    re.compile(r"(^|\n)\s*Error: ", re.MULTILINE),
]


def find_browser() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) paths, or None for whichever is missing."""
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver") or (os.path.exists("/usr/bin/chromedriver") and "/usr/bin/chromedriver") or None
    return browser, driver


def repository(config_path: Path) -> dict[str, str]:
    """``repository`` of _config.yml (url, branch, path_to_book), read without needing PyYAML's schema."""
    import yaml

    repo = (yaml.safe_load(config_path.read_text()) or {}).get("repository", {}) or {}
    return {"url": str(repo.get("url", "")).rstrip("/"), "branch": str(repo.get("branch", "main")),
            "path_to_book": str(repo.get("path_to_book", "") or "").strip("/")}


def colab_url(repo: dict[str, str], source: str) -> str:
    """The launch URL sphinx-book-theme builds for the notebook ``source`` (path inside the book)."""
    owner_repo = urlparse(repo["url"]).path.strip("/")
    path = "/".join(p for p in (repo["path_to_book"], source) if p)
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{repo['branch']}/{path}"


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


@functools.lru_cache(maxsize=None)
def ids_in(path: Path) -> frozenset[str]:
    parser = _Ids()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.ids)


def pages_of(html_root: Path) -> list[Path]:
    pages = []
    for path in sorted(html_root.rglob("*.html")):
        rel = path.relative_to(html_root)
        if rel.parts[0].startswith("_") or str(rel) in SKIP_PAGES:
            continue
        pages.append(rel)
    # the intro first, then the reading order is alphabetical within folders (book/, notebooks/)
    return sorted(pages, key=lambda p: (p.as_posix() != "notebooks/00_intro.html", p.as_posix()))


def source_of(html_root: Path, rel: Path) -> str | None:
    """The notebook a page was built from (``notebooks/x.ipynb``), or None for a markdown page."""
    candidate = rel.with_suffix(".ipynb")
    return candidate.as_posix() if (html_root / "_sources" / candidate).is_file() else None


def check_links(html_root: Path, rel: Path, base_url: str, links: list[str]) -> list[str]:
    problems = []
    page_url = urljoin(base_url, rel.as_posix())
    for link in sorted(set(links)):
        if not link or link.startswith(("mailto:", "javascript:", "data:", "tel:")):
            continue
        absolute = urljoin(page_url, link)
        parsed = urlparse(absolute)
        if not absolute.startswith(base_url):
            continue  # external
        target_path, fragment = urldefrag(absolute)
        local = unquote(urlparse(target_path).path)[len(urlparse(base_url).path):]
        target = html_root / local
        if local == "" or local.endswith("/"):
            target = target / "index.html"
        if not target.exists():
            problems.append(f"broken link {link!r}: {target.relative_to(html_root)} does not exist")
            continue
        if fragment and target.suffix == ".html" and unquote(fragment) not in ids_in(target):
            problems.append(f"broken link {link!r}: no element with id {fragment!r} in {target.relative_to(html_root)}")
        del parsed
    return problems


def serve(html_root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(html_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_driver(browser: str, driver_path: str, profile_dir: str, width: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={width},1000")
    options.page_load_strategy = "normal"
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    return driver


_JS_STATE = """
function articleText() {
    // the page's content, collapsed (hidden) outputs included, scripts and styles left out
    const main = document.querySelector('article') || document.querySelector('main') || document.body;
    const clone = main.cloneNode(true);
    clone.querySelectorAll('script, style, noscript, template').forEach(e => e.remove());
    return clone.textContent;
}
const broken = Array.from(document.images)
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => img.getAttribute('src'));
const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))
    .concat(Array.from(document.querySelectorAll('img[src]')).map(i => i.getAttribute('src')));
const sphinxErrors = Array.from(document.querySelectorAll('.system-message, .problematic')).map(e => e.innerText.slice(0, 200));
const colab = Array.from(document.querySelectorAll('a[href^="https://colab.research.google.com"]')).map(a => a.getAttribute('href'));
function proseText() {
    // what a reader reads as prose: code, outputs' text blocks and typeset formulas left out
    const main = document.querySelector('article') || document.querySelector('main') || document.body;
    const clone = main.cloneNode(true);
    clone.querySelectorAll('script, style, noscript, template, pre, code, mjx-container, .cell_input').forEach(e => e.remove());
    return clone.textContent;
}
const mathjax = Array.from(document.querySelectorAll('script[src]')).map(s => s.src).filter(s => /mathjax|tex-(svg|chtml)/i.test(s));
return {broken: broken, links: links, sphinxErrors: sphinxErrors, colab: colab, images: document.images.length,
        text: articleText() + "\\n" + document.body.innerText, prose: proseText(), mathjax: mathjax,
        formulas: document.querySelectorAll('mjx-container').length, height: document.documentElement.scrollHeight, title: document.title};
"""


def check_page(driver, html_root: Path, base_url: str, rel: Path, repo: dict[str, str], shots: Path | None, width: int) -> dict:
    driver.get(urljoin(base_url, rel.as_posix()))
    # scroll through the page so that lazily loaded images load, then wait for them
    height = driver.execute_script("return document.documentElement.scrollHeight")
    for y in range(0, height + 800, 800):
        driver.execute_script(f"window.scrollTo(0, {y});")
    driver.execute_script("window.scrollTo(0, 0);")
    deadline = time.time() + 10
    while time.time() < deadline and not driver.execute_script(
            "return Array.from(document.images).every(i => i.complete)"):
        time.sleep(0.2)
    driver.set_script_timeout(30)
    driver.execute_async_script("""const done = arguments[arguments.length - 1];
        const p = window.MathJax && window.MathJax.startup && window.MathJax.startup.promise;
        if (p) { p.then(() => done(true)).catch(() => done(false)); } else { done(false); }""")
    state = driver.execute_script(_JS_STATE)
    problems = [f"missing figure: <img src={src!r}> did not load" for src in state["broken"]]
    for match in RAW_TEX.finditer(state["prose"]):
        start = max(0, match.start() - 40)
        problems.append(f"raw TeX (not typeset): ...{state['prose'][start:match.end() + 40]!r}...")
    problems += [f"MathJax loaded from outside the book: {src}" for src in state["mathjax"] if not src.startswith(base_url)]
    for pattern in ERROR_PATTERNS:
        for match in pattern.finditer(state["text"]):
            start = max(0, match.start() - 60)
            problems.append(f"raw error text: ...{state['text'][start:match.end() + 60]!r}...")
    problems += [f"Sphinx error markup: {text!r}" for text in state["sphinxErrors"]]
    problems += check_links(html_root, rel, base_url, state["links"])
    source = source_of(html_root, rel)
    if source is not None:
        expected = colab_url(repo, source)
        if expected not in state["colab"]:
            problems.append(f"no Colab launch button to {expected} (found {state['colab'] or 'none'})")
    shot = None
    if shots is not None:
        shot = shots / (rel.with_suffix("").as_posix().replace("/", "__") + ".png")
        driver.set_window_size(width, min(max(state["height"], 800), 16000))
        time.sleep(0.3)
        driver.save_screenshot(str(shot))
        driver.set_window_size(width, 1000)
    return {"page": rel.as_posix(), "title": state["title"], "notebook": source, "images": state["images"],
            "colab": state["colab"][:1], "formulas": state["formulas"], "screenshot": str(shot) if shot else None, "problems": problems,
            "ok": not problems}


def check_site(html_root: Path, screenshots: Path | None = None, config: Path = ROOT / "_config.yml", width: int = 1280) -> list[dict]:
    html_root = html_root.resolve()
    browser, driver_path = find_browser()
    if browser is None or driver_path is None:
        raise RuntimeError("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    repo = repository(config)
    server, base_url = serve(html_root)
    profile_dir = tempfile.mkdtemp(prefix="riftlab-chromium-")
    driver = make_driver(browser, driver_path, profile_dir, width)
    try:
        return [check_page(driver, html_root, base_url, rel, repo, screenshots, width) for rel in pages_of(html_root)]
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", nargs="?", default=str(ROOT / "_build" / "html"), help="built HTML folder (default _build/html)")
    parser.add_argument("--screenshots", default=None, help="folder for one PNG per page (default: none)")
    parser.add_argument("--config", default=str(ROOT / "_config.yml"), help="the book's _config.yml")
    parser.add_argument("--json", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    html_root = Path(args.html)
    if not (html_root / "index.html").is_file():
        print(f"check_pages: {html_root} has no index.html; build the book first (make book)", file=sys.stderr)
        return 2
    report = check_site(html_root, Path(args.screenshots) if args.screenshots else None, Path(args.config))
    for page in report:
        print(f"{'PASS' if page['ok'] else 'FAIL'} {page['page']} ({page['images']} images"
              f"{', Colab button' if page['colab'] else ''}{', screenshot ' + page['screenshot'] if page['screenshot'] else ''})")
        for problem in page["problems"]:
            print(f"     {problem}")
    failed = [p for p in report if not p["ok"]]
    print(f"{len(report) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
