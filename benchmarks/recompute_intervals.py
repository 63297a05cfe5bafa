"""Recompute every committed paired interval with riftlab's current interval, from the stored counts.

The committed results (the scale study's ``results/scale_study/study.json``, the GPU row's run files under
``results/scale_study/gpu_runs/``, the chapter-7 results ``results/*-chapter7.json``) were summarised with the exact
conditional interval riftlab used before (Clopper-Pearson on the discordant images mapped through (m / n)(2p - 1)).
Nothing needs retraining: every interval is a function of (gained, lost, n). Where a result stores the counts they are
read; where it stores only the difference and the old interval (the curve points and the validation differences of the
CPU rows, whose per-image files were not committed), the counts are recovered exactly by inverting the old interval
(the one (gained, lost) with gained - lost = n * diff whose old interval matches the stored ends to 1e-7), and the
script refuses to go on, naming the place, if no pair or more than one matches. Where per-image results are committed
(the GPU row's ``interpolation_correct.pt``) the curve is recomputed from them instead.

    python benchmarks/recompute_intervals.py --check     # what would change, nothing written (files that already hold
                                                         # the new intervals are refused by name: the old ones are gone)
    python benchmarks/recompute_intervals.py             # rewrite the files (atomically), then re-run the tests

Over-seed summaries are recomputed from their values (the Student-t interval is unchanged; a note is added where every
seed agrees exactly).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from interval_coverage import conditional_interval  # noqa: E402
from riftlab.evaluation.stats import CI_METHOD, difference_from_counts, over_seeds, paired_difference  # noqa: E402

OLD_METHODS = ("exact conditional",)


class CountsNotFound(ValueError):
    pass


def recover_counts(diff: float, low: float, high: float, n: int, where: str) -> tuple[int, int]:
    """The (gained, lost) whose old (conditional) interval is [low, high] points, with (gained - lost) / n = diff."""
    k = round(diff * n / 100)
    if abs(100 * k / n - diff) > 1e-6:
        raise CountsNotFound(f"{where}: difference {diff} is not a whole number of images out of {n}")
    if low == 0.0 and high == 0.0 and k == 0:
        return 0, 0
    matches = []
    for m in range(abs(k), n + 1, 2):
        gained, lost = (m + k) // 2, (m - k) // 2
        old = conditional_interval(gained, lost, n)
        if abs(100 * old[0] - low) < 1e-7 and abs(100 * old[1] - high) < 1e-7:
            matches.append((gained, lost))
        elif 100 * old[0] < low - 1:  # the interval only widens with m: past the stored one, stop
            break
    if len(matches) != 1:
        raise CountsNotFound(f"{where}: {len(matches)} count pairs match diff {diff} [{low}, {high}] of {n}")
    return matches[0]


def fix_difference(d: dict[str, Any], where: str, n: int | None = None) -> None:
    """A {diff, ci_low, ci_high[, gained, lost, n, method]} block, in place."""
    n = int(d.get("n", n))
    if "gained" in d:
        gained, lost = int(d["gained"]), int(d["lost"])
    else:
        gained, lost = recover_counts(d["diff"], d["ci_low"], d["ci_high"], n, where)
    new = difference_from_counts(gained, lost, n)
    assert abs(new["diff"] - d["diff"]) < 1e-9, where
    d.update(ci_low=new["ci_low"], ci_high=new["ci_high"])
    if "method" in d or "gained" in d:
        d.update(p_value=new["p_value"], method=CI_METHOD)


def fix_row(row: dict[str, Any], where: str, sizes: dict[str, int]) -> None:
    """A flat variant row: {val,test}_{clean,robust}_{change,ci_low,ci_high,gained,lost}."""
    for split, n in sizes.items():
        for kind in ("clean", "robust"):
            key = f"{split}_{kind}"
            if f"{key}_ci_low" not in row:
                continue
            gained, lost = int(row[f"{key}_gained"]), int(row[f"{key}_lost"])
            new = difference_from_counts(gained, lost, n)
            assert abs(new["diff"] - row[f"{key}_change"]) < 1e-6, (where, key)
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = new["ci_low"], new["ci_high"]


def fix_curve_point(point: dict[str, Any], where: str, n: int, counts: dict[str, tuple[int, int]] | None = None) -> None:
    for kind in ("clean", "robust"):
        if counts is not None:
            gained, lost = counts[kind]
        else:
            gained, lost = recover_counts(point[f"{kind}_change"], point[f"{kind}_change_low"], point[f"{kind}_change_high"], n,
                                          f"{where} {kind}")
        new = difference_from_counts(gained, lost, n)
        assert abs(new["diff"] - point[f"{kind}_change"]) < 1e-6, where
        point[f"{kind}_change_low"], point[f"{kind}_change_high"] = new["ci_low"], new["ci_high"]


def fix_over_seeds(block: dict[str, Any]) -> None:
    again = over_seeds(block["values"], block.get("seeds"), block.get("level", 0.95))
    block.clear()
    block.update(again)


def fix_run(run: dict[str, Any], where: str, val_n: int, test_n: int) -> None:
    """One study run (a trend row or a headline seed)."""
    for kind in ("clean", "robust"):
        fix_difference(run["test"]["difference"][kind], f"{where} test {kind}")
        fix_difference(run["validation"]["difference"][kind], f"{where} validation {kind}")
    for i, point in enumerate(run.get("curve", [])):
        fix_curve_point(point, f"{where} curve[{i}] alpha {point['alpha']}", val_n)
    for i, row in enumerate(run.get("variants", [])):
        fix_row(row, f"{where} variants[{i}]", {"val": val_n, "test": test_n})


def fix_study(study: dict[str, Any], gpu_curve: dict[str, list[dict[str, tuple[int, int]]]]) -> None:
    for row in study["trend"]:
        val_n, test_n = row["validation"]["difference"]["clean"]["n"], row["test"]["difference"]["clean"]["n"]
        if row["name"] in gpu_curve:  # per-image results committed: the curve from them, not from inversion
            for point, counts in zip(row["curve"], gpu_curve[row["name"]], strict=True):
                fix_curve_point(point, row["name"], val_n, counts)
            saved, row["curve"] = row["curve"], []
            fix_run(row, row["name"], val_n, test_n)
            row["curve"] = saved
        else:
            fix_run(row, row["name"], val_n, test_n)
    head = study["headline"]
    for kind in ("clean", "robust"):
        fix_difference(head["pick"][kind], f"headline pick {kind}")
        fix_difference(head["pooled"][kind], f"headline pooled {kind}")
        fix_over_seeds(head["over_seeds"][kind])
        if "pgd_same_run" in head:
            fix_difference(head["pgd_same_run"][kind], f"headline pgd_same_run {kind}")
    fix_difference(head["autoattack"]["robust"], "headline autoattack robust")
    for run in head["runs"]:
        val_n, test_n = run["validation"]["difference"]["clean"]["n"], run["test"]["difference"]["clean"]["n"]
        fix_run(run, f"headline seed {run.get('seed')}", val_n, test_n)
    for c in head.get("confirmations", []):
        for i, row in enumerate(c["rows"]):
            fix_row(row, f"confirmation {c.get('variant')} row {i}", {"val": 5000, "test": 10000})
        for kind in ("clean", "robust"):
            fix_over_seeds(c["over_seeds"][kind])
            fix_difference(c["pooled"][kind], f"confirmation {c.get('variant')} pooled {kind}")
    study["provenance"]["interval"] = CI_METHOD


def gpu_run_counts(run_dir: Path) -> list[dict[str, tuple[int, int]]]:
    """(gained, lost) of every curve point against alpha = 0, from a run's committed per-image validation results."""
    from riftlab.checkpoint import read_checkpoint

    saved = read_checkpoint(run_dir / "interpolation_correct.pt")
    alphas, masks = list(saved["alphas"]), saved["masks"]
    base = masks[alphas.index(0.0)]
    counts = []
    for mask in masks:
        per_kind = {}
        for kind in ("clean", "robust"):
            d = paired_difference(base[kind], mask[kind])
            per_kind[kind] = (d["gained"], d["lost"])
        counts.append(per_kind)
    return counts


def fix_gpu_run(run_dir: Path, counts: list[dict[str, tuple[int, int]]], changed: list[Path]) -> None:
    """The run's own files: interpolation.csv, alpha.json, test.json, results.json (and their digests in riftlab.lock)."""
    from riftlab.engine.runner import file_digest

    results = json.loads((run_dir / "results.json").read_text())
    val_n = results["validation"]["difference"]["clean"]["n"]
    with open(run_dir / "interpolation.csv") as f:
        rows = list(csv.DictReader(f))
    for row, per_kind in zip(rows, counts, strict=True):
        for kind in ("clean", "robust"):
            new = difference_from_counts(*per_kind[kind], val_n)
            assert abs(new["diff"] - float(row[f"{kind}_change"])) < 1e-6, (run_dir, row["alpha"])
            row[f"{kind}_change_low"], row[f"{kind}_change_high"] = repr(new["ci_low"]), repr(new["ci_high"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "interpolation.csv", text.getvalue(), changed)
    chosen = json.loads((run_dir / "alpha.json").read_text())
    index = [float(r["alpha"]) for r in rows].index(chosen["alpha"])
    for kind in ("clean", "robust"):
        new = difference_from_counts(*counts[index][kind], val_n)
        chosen[f"{kind}_ci"] = [new["ci_low"], new["ci_high"]]
        fix_difference(results["validation"]["difference"][kind], f"{run_dir.name} validation {kind}", val_n)
        fix_difference(results["test"]["difference"][kind], f"{run_dir.name} test {kind}")
    write_text(run_dir / "alpha.json", json.dumps(chosen, indent=2), changed)
    test = json.loads((run_dir / "test.json").read_text())
    test["difference"] = results["test"]["difference"]
    write_text(run_dir / "test.json", json.dumps(test, indent=2), changed)
    write_text(run_dir / "results.json", json.dumps(results, indent=2), changed)
    lock_path = run_dir / "riftlab.lock"
    lock = json.loads(lock_path.read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outputs") or {}:
            if (run_dir / out) in changed:
                stage["outputs"][out] = file_digest(run_dir / out)
    write_text(lock_path, json.dumps(lock, indent=2), changed)


def fix_chapter7(result: dict[str, Any], where: str) -> None:
    sizes = result["sizes"]
    for split, n in (("validation", sizes["val"]), ("test", sizes["test"])):
        for kind in ("clean", "robust"):
            fix_difference(result["difference"][split][kind], f"{where} {split} {kind}", n)


def write_text(path: Path, text: str, changed: list[Path] | None = None) -> None:
    """Atomic: a temporary file in the same folder, then a rename; records the path when its bytes change."""
    if path.read_text() == text:
        return
    if changed is not None:
        changed.append(path)
    if CHECK_ONLY:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


CHECK_ONLY = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="print what would change; write nothing")
    args = parser.parse_args(argv)
    global CHECK_ONLY
    CHECK_ONLY = args.check
    changed: list[Path] = []
    gpu_root = REPO / "results" / "scale_study" / "gpu_runs"
    gpu_counts = {d.name: gpu_run_counts(d) for d in sorted(gpu_root.iterdir()) if (d / "interpolation_correct.pt").exists()}
    for name, counts in gpu_counts.items():
        fix_gpu_run(gpu_root / name, counts, changed)
    study_path = REPO / "results" / "scale_study" / "study.json"
    study = json.loads(study_path.read_text())
    old_head = {k: dict(study["headline"]["pooled"][k]) for k in ("clean", "robust")}
    fix_study(study, gpu_counts)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    study["provenance"]["intervals_recomputed"] = {
        "command": "python benchmarks/recompute_intervals.py", "from_commit": commit, "method": CI_METHOD,
        "note": "every interval recomputed from its stored counts (inverted from the old interval where only it was "
                "stored); no run repeated"}
    write_text(study_path, json.dumps(study, indent=2), changed)
    for path in sorted((REPO / "results").glob("*-chapter7.json")):
        result = json.loads(path.read_text())
        fix_chapter7(result, path.name)
        write_text(path, json.dumps(result, indent=2) + "\n", changed)
    for kind in ("clean", "robust"):
        new = study["headline"]["pooled"][kind]
        print(f"headline pooled {kind}: {old_head[kind]['diff']:+.2f} [{old_head[kind]['ci_low']:+.3f}, {old_head[kind]['ci_high']:+.3f}]"
              f" -> [{new['ci_low']:+.3f}, {new['ci_high']:+.3f}] (+{new['gained']}/-{new['lost']} of {new['n']})")
    print(("would change" if args.check else "changed") + f" {len(changed)} files:")
    for path in changed:
        print("  " + str(path.relative_to(REPO)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
