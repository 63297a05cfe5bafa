"""Execute the book's notebooks with papermill, in the order the book reads them.

    python book/run_notebooks.py                 # everything: chapters 1-5, chapter 7, results page
    python book/run_notebooks.py --only rift_cifar10 07_results
    python book/run_notebooks.py --list

* Chapters 1-5 (``notebooks/0[1-5]_*.ipynb``) run in place.
* ``notebooks/06_rift_end_to_end.ipynb`` is a papermill template: it runs once per entry of
  ``CHAPTER7`` into its own committed copy (``notebooks/rift_<name>.ipynb``), with the parameters
  given there. Offline these are the generated sets with the real datasets' shapes.
* ``notebooks/07_results.ipynb`` runs last, in place: it reads the results the runs wrote.

Every notebook runs with its own folder (``notebooks/``) as working directory, as in Jupyter.
Timestamps and durations that papermill and nbclient write into the metadata are removed, so a
re-run with the same outputs leaves the files unchanged. The first notebook that fails stops the
run: the message names the notebook and the cell, the failed notebook is saved with the error
shown, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TEMPLATE = NOTEBOOKS / "06_rift_end_to_end.ipynb"
RESULTS_PAGE = NOTEBOOKS / "07_results.ipynb"
CHAPTERS = ("00_intro", "01_adversarial_training", "02_module_robust_criticality", "03_finetuning", "04_interpolation", "05_out_of_distribution",
            "08_at_scale", "09_gain_decomposition")

# Chapter 7: executed copy -> (page title, papermill parameters). The profile is the template's small
# CPU profile; give `-p profile paper -p dataset cifar10` (and a GPU, and the data) for the real thing.
CHAPTER7 = {
    "rift_cifar10": ("RiFT end to end: CIFAR10 shape (generated data)", {"dataset": "synthetic-cifar10", "profile": "chapter7"}),
    "rift_cifar100": ("RiFT end to end: CIFAR100 shape (generated data)", {"dataset": "synthetic-cifar100", "profile": "chapter7"}),
    "rift_tinyimagenet": ("RiFT end to end: Tiny-ImageNet shape (generated data)", {"dataset": "synthetic-tinyimagenet", "profile": "chapter7"}),
}

_VOLATILE_NB = ("start_time", "end_time", "duration", "exception")
_VOLATILE_CELL = ("start_time", "end_time", "duration", "exception", "status")
# A rich object's plain-text fallback names its memory address (a pandas Styler shows as HTML, but its text/plain is
# "<pandas.io.formats.style.Styler at 0x7f...>"): a new address on every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")
# papermill inserts the parameters cell with a random id: give it a fixed one.
_PARAMETERS_ID = "injected-parameters"


def plan() -> list[tuple[str, Path, Path, dict, str | None]]:
    """(name, input, output, parameters, title) for every notebook, in order."""
    jobs = [(name, NOTEBOOKS / f"{name}.ipynb", NOTEBOOKS / f"{name}.ipynb", {}, None) for name in CHAPTERS]
    jobs += [(name, TEMPLATE, NOTEBOOKS / f"{name}.ipynb", params, title) for name, (title, params) in CHAPTER7.items()]
    jobs.append((RESULTS_PAGE.stem, RESULTS_PAGE, RESULTS_PAGE, {}, None))
    return jobs


def set_title(nb: nbformat.NotebookNode, title: str) -> None:
    """Replace the first markdown cell's level-1 heading with ``title`` (the page title in the book)."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            lines = cell.source.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("# "):
                    lines[i] = f"# {title}"
                    cell.source = "\n".join(lines)
                    return
            cell.source = f"# {title}\n\n{cell.source}"
            return
    raise ValueError("the notebook has no markdown cell to hold its title")


def clean_metadata(nb: nbformat.NotebookNode) -> None:
    """Drop what changes on every run although the notebook's results do not: papermill's and nbclient's timestamps
    and durations, memory addresses in plain-text fallbacks, the random id of papermill's parameters cell. A re-run
    with the same results leaves the file byte for byte as it was."""
    pm = nb.metadata.get("papermill", {})
    for key in _VOLATILE_NB:
        pm.pop(key, None)
    for key in ("input_path", "output_path"):  # relative to the repository: no machine-specific paths
        if pm.get(key) and Path(pm[key]).is_absolute() and Path(pm[key]).is_relative_to(ROOT):
            pm[key] = str(Path(pm[key]).relative_to(ROOT))
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = _PARAMETERS_ID
        for output in cell.get("outputs", []):
            plain = output.get("data", {}).get("text/plain")
            if isinstance(plain, str):
                output["data"]["text/plain"] = _ADDRESS.sub(">", plain)
            elif isinstance(plain, list):
                output["data"]["text/plain"] = [_ADDRESS.sub(">", line) for line in plain]
        cell.metadata.pop("execution", None)
        cpm = cell.metadata.get("papermill")
        if cpm is not None:
            for key in _VOLATILE_CELL:
                cpm.pop(key, None)
            if not cpm:
                cell.metadata.pop("papermill")


def run_one(name: str, source: Path, target: Path, params: dict, title: str | None, kernel: str, timeout: int) -> float:
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    if not source.is_file():
        raise SystemExit(f"run_notebooks: {source.relative_to(ROOT)} does not exist")
    start = time.perf_counter()
    rel = target.relative_to(ROOT)
    print(f"--- {rel}" + (f" (from {source.name}, {params})" if source != target else ""), flush=True)
    try:
        pm.execute_notebook(str(source), str(target), parameters=params or None, kernel_name=kernel, cwd=str(NOTEBOOKS),
                            progress_bar=False, log_output=False, execution_timeout=timeout)
    except PapermillExecutionError as err:
        # papermill numbers cells from 1 in execution order; the saved notebook shows the error.
        print(f"\nFAILED: {rel}, cell {err.exec_count} (cell index {err.cell_index}): {err.ename}: {err.evalue}\n"
              f"The executed notebook with the traceback was saved to {rel}.", file=sys.stderr, flush=True)
        raise SystemExit(1)
    nb = nbformat.read(target, as_version=4)
    if title:
        set_title(nb, title)
    clean_metadata(nb)
    nbformat.write(nb, target)
    seconds = time.perf_counter() - start
    print(f"    {rel}: {seconds:.1f} s", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these notebooks (names without .ipynb)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    jobs = plan()
    if args.only:
        unknown = set(args.only) - {j[0] for j in jobs}
        if unknown:
            parser.error(f"unknown notebook(s) {sorted(unknown)}; choose from {[j[0] for j in jobs]}")
        jobs = [j for j in jobs if j[0] in args.only]
    if args.list:
        for name, source, target, params, _ in jobs:
            print(f"{target.relative_to(ROOT)} <- {source.relative_to(ROOT)} {params or ''}")
        return 0
    total = {}
    for job in jobs:
        total[job[0]] = run_one(*job, kernel=args.kernel, timeout=args.timeout)
    print("papermill times: " + ", ".join(f"{k} {v:.0f} s" for k, v in total.items()) + f"; total {sum(total.values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
