"""The Jupyter Book around riftlab: configuration, notebooks, install cell, runner, page check.

The notebooks' outputs themselves are checked by ``pytest --nbval`` (``make test-notebooks``);
these tests check the book's structure and the tools that build it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TEMPLATE = NOTEBOOKS / "06_rift_end_to_end.ipynb"
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run_notebooks = _load("run_notebooks", ROOT / "book" / "run_notebooks.py")
check_pages = _load("check_pages", ROOT / "book" / "check_pages.py")

SETUP_PATTERN = re.compile(
    r"""\A# Setup \(hidden in the rendered book\): on Colab this installs riftlab and says which GPU the runtime has;
# locally it uses the installed package\.
import os, sys
try:
    import riftlab
except ImportError:
    %pip install -q "(?P<spec>\{os\.environ\.get\('RIFTLAB_PIP_SOURCE', '(?P<default>[^']+)'\)\}|(?P<literal>[^"]+))"
    import riftlab
import riftlab\.book
if riftlab\.book\.on_colab\(\):
    print\(riftlab\.book\.environment\(\)\)\s*\Z""")
GIT_SPEC = re.compile(r"\Ariftlab @ git\+(?P<url>https://[^@\s]+?)(?:\.git)?@(?P<branch>[\w./-]+)\Z")


def toc_files() -> list[str]:
    files = [TOC["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in TOC.get("parts", []):
        walk(part.get("chapters"))
    walk(TOC.get("chapters"))
    return files


def all_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def setup_cell(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    assert nb.cells and nb.cells[0].cell_type == "code", f"{path.name}: the first cell must be the setup code cell"
    return nb.cells[0].source


# --------------------------------------------------------------------------------------------
# configuration


def test_config_sets_the_repository_once_and_turns_execution_off():
    assert CONFIG["execute"]["execute_notebooks"] == "off"
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    repo = CONFIG["repository"]
    assert repo["url"].startswith("https://github.com/") and repo["branch"] and repo["path_to_book"] == ""
    for pattern in ("_build", ".venv", "artifacts", "runs", "README.md"):
        assert pattern in CONFIG["exclude_patterns"]
    # the URL appears in no other configuration file: one place to change it
    others = [p for p in (ROOT / "_toc.yml", ROOT / "Makefile") if repo["url"] in p.read_text()]
    assert not others, f"the repository URL is repeated in {others}"


def test_toc_lists_existing_pages_in_reading_order():
    files = toc_files()
    assert files[:8] == [f"notebooks/{name}" for name in run_notebooks.CHAPTERS]  # the intro, chapters 1-5, RiFT at scale, its decomposition
    assert [f"notebooks/{name}" for name in run_notebooks.CHAPTER7] == [f for f in files if f.startswith("notebooks/rift_")]
    assert files[-1] == "notebooks/07_results"
    for f in files:
        assert (ROOT / f"{f}.md").is_file() or (ROOT / f"{f}.ipynb").is_file(), f"{f} is in _toc.yml but missing"
    assert "06_rift_end_to_end" not in " ".join(files), "the template is not a page; its executed copies are"


# --------------------------------------------------------------------------------------------
# notebooks


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.name)
def test_every_notebook_starts_with_the_setup_cell_and_has_parameters(path):
    source = setup_cell(path)
    match = SETUP_PATTERN.match(source)
    assert match, f"{path.name}: first cell does not follow the setup pattern:\n{source}"
    spec = match["default"] or match["literal"]
    git = GIT_SPEC.match(spec)
    assert git, f"{path.name}: pip spec {spec!r} is not 'riftlab @ git+<url>@<branch>'"
    assert git["url"] == CONFIG["repository"]["url"], f"{path.name}: install URL differs from _config.yml's repository.url"
    assert git["branch"] == CONFIG["repository"]["branch"], f"{path.name}: install branch differs from _config.yml's repository.branch"
    nb = nbformat.read(path, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no cell tagged 'parameters'"
    # the rendered page opens with its title, not with install code
    assert "remove-cell" in nb.cells[0].metadata.get("tags", []), f"{path.name}: the setup cell is not hidden (tag remove-cell)"
    assert nb.cells[1].cell_type == "markdown" and nb.cells[1].source.startswith("# "), f"{path.name}: no title after the setup cell"


def test_template_is_clean_and_its_parameters_are_the_documented_ones():
    nb = nbformat.read(TEMPLATE, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the template without outputs"
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = re.findall(r"^(\w+) = ", params.source, re.MULTILINE)
    assert names == ["profile", "dataset", "model_name", "width", "train_subset", "val_subset", "test_subset", "epochs", "mrc_examples",
                     "at_checkpoint", "robustbench", "model_dir", "device", "seed", "data_root", "download", "run_root", "out_dir",
                     "results_dir"]
    assert 'device = "auto"' in params.source and 'profile = "auto"' in params.source and 'robustbench = "auto"' in params.source


@pytest.mark.parametrize("name", list(run_notebooks.CHAPTER7))
def test_executed_chapter7_copies_come_from_the_template_and_say_which_data(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    if not path.is_file():
        pytest.skip(f"{path.name} not executed yet (make book)")
    nb = nbformat.read(path, as_version=4)
    template = nbformat.read(TEMPLATE, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    assert code == [c.source for c in template.cells if c.cell_type == "code"], f"{name} is stale: re-run make book"
    title, params = run_notebooks.CHAPTER7[name]
    assert nb.metadata["papermill"]["parameters"] == params
    assert nb.cells[1].source.startswith(f"# {title}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(str(o.get("data", {}).get("text/markdown", "")) + str(o.get("text", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    if params["dataset"].startswith("synthetic-"):
        assert "This run uses generated data, not" in text
        assert "generated data" in title
    results = ROOT / "results" / f"{params['dataset']}-{params['profile']}.json"
    assert results.is_file(), f"{results} missing"
    saved = json.loads(results.read_text())
    assert saved["dataset"] == params["dataset"] and saved["synthetic"] is params["dataset"].startswith("synthetic-")
    assert "seconds" not in saved, "results files hold no timings, so that re-runs rewrite them unchanged"


def test_results_page_marks_generated_rows_and_rows_not_run():
    path = NOTEBOOKS / "07_results.ipynb"
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    if not outputs:
        pytest.skip("results page not executed yet (make book)")
    text = "\n".join(json.dumps(o.get("data", {})) + str(o.get("text", "")) for o in outputs)
    assert "not run: needs a GPU and the real dataset" in text
    if list((ROOT / "results").glob("synthetic-*.json")):
        assert "used generated data, not the real datasets" in text and "GENERATED" in text


def test_intro_table_is_the_papers_table1():
    from riftlab import paper

    intro = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / "00_intro.ipynb", as_version=4).cells if c.cell_type == "markdown")
    rows = re.findall(r"^\| (ResNet18|ResNet34|WRN34-10) \| (AT|AT\+RiFT) \|(.*)\|$", intro, re.MULTILINE)
    assert len(rows) == 6
    names = {v: k for k, v in paper.MODELS.items()}
    for model, method, numbers in rows:
        values = [float(x) for x in numbers.split("|")]
        expected = [v for ds in ("cifar10", "cifar100", "tinyimagenet") for v in paper.TABLE1[(names[model], method)][ds]]
        assert values == expected, f"the intro's {model} {method} row differs from riftlab.paper.TABLE1"


def test_paper_tables_as_data():
    from riftlab import paper

    t = paper.table1()
    assert len(t) == 18 and set(t["dataset"]) == set(paper.DATASETS)
    wide = paper.table1_wide()
    assert wide.loc[("ResNet18", "AT+RiFT"), ("CIFAR10", "std")] == 83.44
    assert wide.loc[("WRN34-10", "AT"), ("Tiny-ImageNet", "adv")] == 26.07
    assert paper.least_critical_modules().loc["ResNet34", "Tiny-ImageNet"] == "layer3.5.conv2"
    # RiFT never costs more than 0.02 points of robustness in Table 1, and always gains clean accuracy
    for model in paper.MODELS:
        for ds in paper.DATASETS:
            at, rift = paper.TABLE1[(model, "AT")][ds], paper.TABLE1[(model, "AT+RiFT")][ds]
            assert rift[0] > at[0] and rift[2] >= at[2] - 0.021


# --------------------------------------------------------------------------------------------
# the runner and nbval settings


def test_runner_plan_covers_the_book_in_order():
    plan = run_notebooks.plan()
    targets = [job[2].relative_to(ROOT).with_suffix("").as_posix() for job in plan]
    assert targets == [f for f in toc_files() if f.startswith("notebooks/")]  # every notebook page, in the book's order
    for name, source, target, params, title in plan:
        if name.startswith("rift_"):
            assert source == TEMPLATE and params["dataset"].startswith("synthetic-") and "generated" in title


def test_runner_strips_timestamps_and_sets_titles():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1"), nbformat.v4.new_markdown_cell("# Old\n\ntext")])
    nb.metadata["papermill"] = {"start_time": "x", "end_time": "y", "duration": 1.0, "parameters": {"a": 1},
                                "input_path": str(ROOT / "notebooks" / "a.ipynb")}
    nb.cells[0].metadata["papermill"] = {"start_time": "x", "end_time": "y", "duration": 1.0, "status": "completed", "exception": False}
    nb.cells[0].metadata["execution"] = {"iopub.status.busy": "x"}
    run_notebooks.clean_metadata(nb)
    run_notebooks.set_title(nb, "New")
    assert nb.metadata["papermill"] == {"parameters": {"a": 1}, "input_path": "notebooks/a.ipynb"}
    assert "papermill" not in nb.cells[0].metadata and "execution" not in nb.cells[0].metadata
    assert nb.cells[1].source == "# New\n\ntext"


def test_a_rerun_with_the_same_results_leaves_the_notebook_byte_for_byte_unchanged(tmp_path, monkeypatch):
    """`make book` on a fresh clone must leave `git status` clean: a papermill run of a parameterised notebook that
    shows a pandas Styler (whose plain-text fallback names a memory address) writes the same bytes twice."""
    pytest.importorskip("papermill")
    template = tmp_path / "template.ipynb"
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    styled = nbformat.v4.new_code_cell("import pandas as pd\npd.DataFrame({'a': [n, 2]}).style.format('{:.1f}').set_uuid('t')")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T"), params, styled],
                                            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), template)
    monkeypatch.setattr(run_notebooks, "ROOT", tmp_path)
    monkeypatch.setattr(run_notebooks, "NOTEBOOKS", tmp_path)
    target = tmp_path / "copy.ipynb"
    outputs = []
    for _ in range(2):
        run_notebooks.run_one("copy", template, target, {"n": 3}, "Copy", kernel="python3", timeout=120)
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1]
    nb = nbformat.read(target, as_version=4)
    plain = "".join(nb.cells[-1].outputs[0]["data"]["text/plain"])
    assert "Styler" in plain and "0x" not in plain
    assert any(c.get("id") == run_notebooks._PARAMETERS_ID for c in nb.cells)


def test_runner_reports_the_failing_notebook_and_cell(tmp_path, monkeypatch, capsys):
    pytest.importorskip("papermill")
    bad = tmp_path / "bad.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("1 / 0")],
                                            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}), bad)
    monkeypatch.setattr(run_notebooks, "ROOT", tmp_path)
    monkeypatch.setattr(run_notebooks, "NOTEBOOKS", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_notebooks.run_one("bad", bad, bad, {}, None, kernel="python3", timeout=120)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "FAILED: bad.ipynb, cell 2" in err and "ZeroDivisionError" in err


def test_nbval_sanitize_masks_only_volatile_text():
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns((ROOT / "book" / "nbval_sanitize.cfg").read_text())
    assert len(patterns) >= 6

    def sanitize(s: str) -> str:
        for regex, replace in patterns:
            s = re.sub(regex, replace, s)
        return s

    assert sanitize("took 12.5 s, 3 seconds, 250 ms") == sanitize("took 99.1 s, 7 seconds, 10 ms")
    assert sanitize("<Foo at 0x7f3a2b1c9d00>") == sanitize("<Foo at 0x7f0000000001>")
    assert sanitize("<Foo at 0x7f3a2b1c9d00>") == sanitize("<Foo>")  # the runner stores fallbacks without the address
    assert sanitize("wrote /work/main/runs/x.pt") == sanitize("wrote /tmp/pytest-1/runs/x.pt")
    assert sanitize("100%|####| 10/10 [00:03<00:00,  3.10it/s]") == sanitize("100%|####| 10/10 [00:05<00:00,  1.95it/s]")
    # accuracies, module names and alphas are compared as they are
    assert sanitize("AT 61.60 34.00 module layer2.0.conv1, alpha 0.3") == "AT 61.60 34.00 module layer2.0.conv1, alpha 0.3"
    assert sanitize("PGD-10 x 1 restart(s), 500 test examples") == "PGD-10 x 1 restart(s), 500 test examples"


def test_nbval_conftest_leaves_stderr_out_of_the_comparison():
    pytest.importorskip("nbval")
    conftest = _load("notebooks_conftest", NOTEBOOKS / "conftest.py")
    outs = [nbformat.v4.new_output("stream", name="stdout", text="a"), nbformat.v4.new_output("stream", name="stderr", text="warn"),
            nbformat.v4.new_output("execute_result", data={"text/plain": "1"}, execution_count=1)]
    kept = conftest._without_stderr(outs)
    assert [o.get("name") for o in kept] == ["stdout", None]
    from nbval.plugin import IPyNbCell

    assert getattr(IPyNbCell.compare_outputs, "_riftlab_no_stderr", False)


# --------------------------------------------------------------------------------------------
# the install cell in a clean environment


def _filtered_site_packages(target: Path) -> Path:
    """A folder of links to the project environment's packages, riftlab's own entries left out."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        if "riftlab" in entry.name.lower() or entry.suffix == ".pth":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def test_install_cell_installs_riftlab_into_a_clean_environment(tmp_path):
    """Run the notebooks' setup cell where riftlab is not installed, and check that it installs it.

    The environment: ``python -m venv --without-pip`` (system site-packages disabled, the default),
    so nothing of this machine's Python is visible in it. Its dependencies (torch, IPython, pip,
    ...) must not be downloaded again (5 GB), so a ``.pth`` file adds ONE folder to its path: links
    to each package of the project's environment, with every riftlab entry (the editable install's
    ``.pth`` hook and finder, the ``dist-info``) and every ``.pth`` left out. The test first checks
    that ``import riftlab`` fails there. Then IPython runs the setup cell with ``RIFTLAB_PIP_SOURCE``
    pointing at a wheel of this checkout, built beforehand without dependencies or network, and
    ``PIP_NO_DEPS=1``: ``%pip install`` installs riftlab into the clean environment's own
    site-packages, exactly as on Colab, where the default source is the git URL of ``_config.yml``.
    Finally ``import riftlab`` works, comes from the clean environment, and has this checkout's version.
    """
    import riftlab

    env_dir = tmp_path / "clean-env"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env_site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (env_site / "_project_deps.pth").write_text(str(_filtered_site_packages(tmp_path / "deps")) + "\n")

    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_", "RIFTLAB"))}
    clean_env["PATH"] = f"{env_dir / 'bin'}:{clean_env.get('PATH', '')}"
    before = subprocess.run([python, "-c", "import riftlab"], cwd=tmp_path, env=clean_env, capture_output=True, text=True)
    assert before.returncode != 0 and "No module named 'riftlab'" in before.stderr, "riftlab must not be importable before the cell runs"

    # a wheel of this checkout (copied, so that the build leaves nothing in the repository)
    src = tmp_path / "src"
    shutil.copytree(ROOT / "riftlab", src / "riftlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(src)],
                   check=True, cwd=tmp_path, env={**os.environ, "PIP_NO_INDEX": "1"})
    wheel = next((tmp_path / "wheels").glob("riftlab-*.whl"))

    cell = setup_cell(TEMPLATE)
    script = tmp_path / "run_cell.py"
    script.write_text(
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        f"result = shell.run_cell({cell!r})\n"
        "if not result.success:\n"
        "    sys.exit(f'setup cell failed: {result.error_in_exec or result.error_before_exec!r}')\n"
        "import riftlab\n"
        "print(riftlab.__version__)\n"
        "print(riftlab.__file__)\n")
    run_env = {**clean_env, "RIFTLAB_PIP_SOURCE": f"riftlab @ {wheel.as_uri()}", "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1",
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    after = subprocess.run([python, str(script)], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=600)
    assert after.returncode == 0, after.stdout + after.stderr
    version, location = after.stdout.strip().splitlines()[-2:]
    assert version == riftlab.__version__, f"installed riftlab {version}, checkout has {riftlab.__version__}"
    assert Path(location).resolve().is_relative_to(env_dir.resolve()), f"riftlab imported from {location}, not the clean environment"
    print(f"setup cell installed riftlab {version} into {env_dir}")


# --------------------------------------------------------------------------------------------
# the built pages


def test_built_pages_have_figures_links_no_errors_and_colab_buttons(tmp_path):
    html = ROOT / "_build" / "html"
    if not (html / "index.html").is_file():
        pytest.skip("no built book in _build/html (make book)")
    browser, driver = check_pages.find_browser()
    if browser is None or driver is None:
        pytest.skip("chromium / chromedriver not installed (make check-pages installs them)")
    pytest.importorskip("selenium")
    report = check_pages.check_site(html, tmp_path / "screenshots")
    assert {p["page"] for p in report} >= {"notebooks/00_intro.html", "notebooks/rift_cifar10.html", "notebooks/07_results.html"}
    assert any(p["formulas"] > 0 for p in report)  # MathJax (vendored) typeset the formulas
    failed = {p["page"]: p["problems"] for p in report if not p["ok"]}
    assert not failed, json.dumps(failed, indent=2)
    for page in report:
        assert Path(page["screenshot"]).stat().st_size > 10_000


def test_page_check_catches_broken_pages(tmp_path):
    html = ROOT / "_build" / "html"
    page = html / "notebooks" / "rift_cifar10.html"
    if not page.is_file():
        pytest.skip("no built book in _build/html (make book)")
    browser, driver = check_pages.find_browser()
    if browser is None or driver is None:
        pytest.skip("chromium / chromedriver not installed (make check-pages installs them)")
    pytest.importorskip("selenium")
    bad = tmp_path / "html"
    shutil.copytree(html, bad)
    target = bad / "notebooks" / "rift_cifar10.html"
    text = target.read_text().replace("https://colab.research.google.com/github", "https://example.org/github")
    text = text.replace("<section id=\"what-data-this-run-uses\">", "<section id=\"what-data-this-run-uses\"><pre>NameError: name 'x' is not defined</pre>"
                        "<img src='../_images/nope.png'><a href='07_results.html#no-such-anchor'>a</a><a href='gone.html'>b</a>"
                        "<p>where \\(\\theta_{\\mathrm{AT}}\\) stays raw</p>", 1)
    text = re.sub(r'src="[^"]*mathjax/tex-svg\.js[^"]*"', 'src="https://cdn.example.org/mathjax/tex-svg.js"', text)  # from outside
    target.write_text(text)
    report = {p["page"]: p for p in check_pages.check_site(bad)}
    problems = "\n".join(report["notebooks/rift_cifar10.html"]["problems"])
    for expected in ("missing figure", "raw error text", "no-such-anchor", "gone.html", "no Colab launch button", "raw TeX",
                     "MathJax loaded from outside the book"):
        assert expected in problems
    assert report["notebooks/rift_cifar100.html"]["ok"]


# --------------------------------------------------------------------------------------------
# prose that states a direction follows the numbers

DIRECTION_WORDS = re.compile(r"\b(rises?|rose|rising|falls?|fell|falling|dropped|increases|increased|decreases|decreased|"
                             r"improves?|improved|worsens?|worsened|grows?|shrinks?|climbs?)\b", re.IGNORECASE)


def _glued(path: Path) -> dict[str, str]:
    nb = nbformat.read(path, as_version=4)
    values = {}
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                data = out.get("data", {})
                values[name] = str(data.get("application/papermill.record/text/plain", data.get("text/plain", ""))).strip("'\"")
    return values


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.name)
def test_prose_next_to_glued_numbers_states_no_direction_of_its_own(path):
    """A sentence that quotes computed numbers must not assert which way they moved in words of its own: the verb is glued
    too (riftlab.book.direction), so that it follows the numbers (chapter 4 once said clean accuracy 'rises towards 77.0%'
    where its own numbers fell from 77.4)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for sentence in re.split(r"(?<=[.!?:])\s+", cell.source.replace("\n", " ")):
            if "{glue:" not in sentence:
                continue
            prose = re.sub(r"\{glue:[a-z]+\}`[^`]*`", " ", sentence)
            word = DIRECTION_WORDS.search(prose)
            assert word is None, f"{path.name}: {word.group(0)!r} is stated, not glued, in: {sentence.strip()!r}"


@pytest.mark.parametrize("notebook, verb, before, after", [("04_interpolation", "clean_walk", "at_val_clean", "ft_val_clean"),
                                                          ("04_interpolation", "robust_walk", "at_val_robust", "ft_val_robust"),
                                                          ("05_out_of_distribution", "severity_walk", "sev1_at", "sev5_at")])
def test_glued_directions_agree_with_the_glued_numbers(notebook, verb, before, after):
    glued = _glued(NOTEBOOKS / f"{notebook}.ipynb")
    if verb not in glued:
        pytest.skip(f"{notebook} has no stored outputs yet (make book)")
    a, b = float(glued[before]), float(glued[after])
    expected = "rises" if b > a else "falls" if b < a else ("stays level" if notebook == "04_interpolation" else "stays")
    assert glued[verb] == expected, f"{notebook}: the prose says {glued[verb]!r} for {a} -> {b}"
