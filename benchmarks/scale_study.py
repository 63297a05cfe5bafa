"""The scale study: where does RiFT's gain come from, and does it hold on the test split?

On real Fashion-MNIST (the dataset available offline), RiFT is run as the ``riftlab`` command runs
it, for ResNet-18s of several widths and two training-set sizes, and every AT+RiFT vs AT
difference on the 10000 test images is reported with its paired 95% interval (same images,
same per-image PGD starts; ``riftlab.evaluation.stats``). Variants are labelled: BatchNorm statistics updated
during fine-tuning (the reference code), other fine-tuning learning rates, and the least critical
module among the 3x3 convolutions (a departure from the paper's definition, which ranks every
module). The configuration chosen as the headline (by the rule in :func:`headline`, fixed before
any result was seen) is then repeated for seeds 1 and 2, with the paper's Table 3 variants and
standard AutoAttack on the first 1000 test images beside PGD-10.

    python benchmarks/scale_study.py run --jobs 2          # every job, two at a time, one thread each; resumable
    python benchmarks/scale_study.py status                # what is done, running, waiting
    python benchmarks/scale_study.py summarize             # results/scale_study/study.json and the book's checkpoints

What RiFT's gain is made of (``--decomposition``, opt-in): at the middle configuration, for AT models of each length in
``--at-epochs`` (default 10 and 40 epochs; a run of another length than the profile's is named ``w8-n10k-e40-s0``), the
fine-tuning is run again as labelled `riftlab ablate` folders beside the run (:data:`DECOMPOSITION`): riftlab's default
(frozen BatchNorm), the reference code's protocol at MRC's least critical module and at the paper's ``layer2.1.conv2``,
and BatchNorm recalibration alone (the reference schedule, no weight trained). Every one of them also reports what the
reference code's choice on test (best test epoch, then alpha on the test curve) would print, beside a zero-effect
sign-flip null of that choice. ``summarize --decomposition`` adds them to study.json as ``decomposition``, one block per
configuration and AT length, the middle configuration first (``--decomposition-at 16,10000`` runs it at twice the width;
summarize and export take every configuration that has runs, and keep the carried study's blocks of the others)::

    python benchmarks/scale_study.py run --decomposition --jobs 2
    python benchmarks/scale_study.py run --decomposition --decomposition-at 16,10000 --jobs 2

The width-64 row (``--gpu``: the paper's ResNet-18 on all 55000 training images, PGD-10 AT) needs a GPU. It ran on one
H200 (2026-12-04) through ``benchmarks/gpu_session.sh study OUT`` (its header says how the data travels and how the
result comes back): about 7 minutes of device time in two calls (the first stopped by its time limit during adversarial
training, the second resumed it), adversarial training about 30 s per epoch. Its run files are committed under
``results/scale_study/gpu_runs/``; a new GPU row joins the committed study with ``summarize --big --gpu --root
runs/scale_study_gpu --carry results/scale_study/study.json`` (the CPU rows come from the committed summary), and a
later CPU summary keeps it with ``summarize --big --gpu ... --carry`` too.

Every job is one ``riftlab`` command (``rift``, ``ablate`` or ``compare``) with ``--resume``; its
log is ``<root>/logs/<job>.log`` and its record (command, start, end, wall time, exit code) is in
``<root>/jobs.json``. Kill the runner at any time and start it again: finished jobs are skipped and
an interrupted one continues from its last saved epoch, module, alpha or batch. A job that a stopped runner left
running (its pid is in ``<root>/logs/<job>.pid``) is waited for, never started twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.1  # the selection rule's allowed robust drop, in points (the paper's)

# (width, training images) of the trend grid, smallest first; each with seed 0. The grid fits one 3-hour session of the
# 2-core machine (two jobs side by side, one thread each): a first attempt at widths 8, 16 and 32 (about 3 hours of one
# core per width-16 run, 8 at width 32) was lost with its machine before it finished, so the committed study is the part
# that fits one session, and --big adds the wider rows for a longer one.
GRID = [(4, 10000), (8, 10000)]
LARGER_DATA = [(8, 5000)]  # the data axis at the headline's width (half the training images): after the grid, before the seeds
BIG = [(16, 10000), (32, 10000), (8, 55000)]  # --big: the wider nets and the full training set (hours of one core each)
# CPU results depend on which vector kernels torch picks: the same run on an AVX-512 machine and on an AVX2 one differs
# from the first epoch (measured: width 4 / 10000 seed 0 gave AT test 78.98 / 70.62 on the committed study's machine and
# 78.87 / 69.75 unpinned on an AVX-512 one). Every job therefore runs on the AVX2 kernels on x86 (as the Makefile
# pins them for the notebooks), so a run can be repeated, and checked (`summarize --carry`), on another machine.
KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"} if platform.machine() == "x86_64" else {}
# --gpu: the paper's ResNet-18 (width 64) on all 55000 training images with PGD-10 AT (step eps / 4, the attack the
# study evaluates with), one CUDA job (bf16 autocast: precision auto). It is a row of the trend, not of the grid the
# headline rule reads (the rule was fixed on the CPU grid before any result was seen). Measured on one H200: about
# 7 minutes (adversarial training about 30 s per epoch of 430 batches of 128; MRC 10 s, fine-tuning 24 s, curve 8 s).
GPU = [(64, 55000)]
# --decomposition-at 64,10000 (benchmarks/gpu_session.sh decomposition): the paper's width on a GPU, with PGD-10 AT like GPU
GPU_DECOMPOSITION = [(64, 10000)]
GPU_DEVICE = "cuda"  # --smoke runs the GPU row's jobs on the CPU (the tests have no GPU)
GPU_AT = ["--at-attack-steps", "10", "--at-attack-step", "0.025"]
MIDDLE = (8, 10000)  # the labelled variants run here; the headline when no configuration wins
HEADLINE_SEEDS = (1, 2)

# Fine-tuning is the paper's: 10 epochs at lr 0.001 (x0.1 after epoch 5), whatever the training-set size. Measured
# before the study (width 16, 10000 images, PGD-3 AT at 83.2 / 73.1 on validation): 50 epochs (the paper's number of
# steps, 3900) instead of 10 made the fine-tuned shortcut's validation clean accuracy fall further (83.16 at the start,
# 83.18 after epoch 1, 82.80 after epoch 50), and both runs kept epoch 1.
#
# Fine-tuning variants, each an `riftlab ablate` folder next to the run: (folder, ablate variants, extra options).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "variants": ("least3x3", []),  # the paper's settings, on the least critical 3x3 convolution
    "bn": ("least", ["--update-bn-stats"]),  # the reference code's BatchNorm drift
    "lr0.01": ("least", ["--lr", "0.01"]),  # ten times the paper's learning rate
}
# Only at the middle configuration, after the headline's seeds (each variant costs a fine-tuning, a curve and a test).
# Two ablation folders of about the same cost, so the two jobs run side by side; their rows are one table ("table3").
TABLE3 = {"table3": "at,least,most,no-interp", "table3b": "last,all"}

# --decomposition: what RiFT's gain is made of, at the middle configuration, for AT models of several lengths. Each is
# an `riftlab ablate` folder next to the run (folder: ablate variant, extra options); every one reports, beside its
# validation-selected result, what choosing its epoch and alpha on test would report (riftlab.evaluation.selection).
DECOMPOSITION: dict[str, tuple[str, list[str]]] = {
    "reference": ("least", ["--protocol", "reference"]),  # the reference code's fine-tuning, at MRC's least critical module
    "bn-only": ("least", ["--protocol", "reference", "--bn-recalibration-only"]),  # the same schedule, no weight trained
    "reference-paper": ("module", ["--protocol", "reference", "--module", "layer2.1.conv2"]),  # ... at the paper's module
    "frozen-bn": ("least", ["--report-test-selection"]),  # riftlab's default: BatchNorm frozen, the least critical module
}
# The settings the further seeds (--decomposition-seeds) run: the authors' protocol and its BatchNorm control, the two
# numbers the book's answer gives over seeds (each folder costs about as much as the rift run itself).
DECOMPOSITION_SEEDED = ("reference", "bn-only")
AT_EPOCHS = 10  # the study profile's adversarial training; runs of another length carry it in their name
DECOMPOSITION_AT_EPOCHS = (10, 40)  # the AT lengths the decomposition runs at (--at-epochs)
DECOMPOSITION_AT: tuple[int, int] | None = None  # the configuration `run` runs it at (--decomposition-at); None: the middle one
# Where it runs on the CPU: the middle configuration (the one the book leads with, three seeds at the longer AT) and twice
# its width (seed 0). A width-16 folder costs about three times a width-8 one, and half of a width-8 folder (16 of 31
# minutes) is the report of what choosing on test would print (eleven attacked passes over the test split), so the
# wider configurations' folders skip that report (--no-report-test-selection): the middle configuration's seven reports
# measure it. `summarize` and `export` take every configuration listed here, and of GPU_DECOMPOSITION, that has runs.
DECOMPOSITION_WIDER = [(16, 10000)]


def decomposition_configurations() -> list[tuple[int, int]]:
    """The (width, training images) the decomposition may have run at, the one the book leads with first."""
    return list(dict.fromkeys([MIDDLE, *DECOMPOSITION_WIDER, *GPU_DECOMPOSITION]))


def decomposition_models(lengths: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(width, training images, AT epochs) of every AT model the decomposition may have run, in the order study.json
    keeps its blocks: configuration by configuration (:func:`decomposition_configurations`), then ``lengths``."""
    return [(width, train, length) for width, train in decomposition_configurations() for length in lengths]


# --smoke: the same jobs on tiny sizes (a minute or two), to check the script itself; tests/test_scale_study.py runs it.
SMOKE: dict[str, list[str]] = {}
_SMOKE = {
    "rift": ["--val-size", "200", "--test-subset", "200", "--at-epochs", "1", "--mrc-examples", "64", "--mrc-passes", "1",
             "--eval-steps", "2", "--alphas", "0,0.5,1", "--eval-batch-size", "100", "--ft-epochs", "1"],
    "ablate": ["--val-size", "200", "--test-subset", "200", "--steps", "2", "--alphas", "0,0.5,1", "--eval-batch-size", "100",
               "--epochs", "1"],
    "compare": ["--val-size", "200", "--test-subset", "200", "--steps", "2", "--eval-batch-size", "100"],
}


def run_name(width: int, train: int, seed: int, at_epochs: int | None = None) -> str:
    """``w8-n10k-s0``; an AT of another length than the study's (:data:`AT_EPOCHS`) is named ``w8-n10k-e40-s0``."""
    length = "" if at_epochs is None or at_epochs == AT_EPOCHS else f"-e{at_epochs}"
    return f"w{width}-n{train // 1000}k{length}-s{seed}"


def config_args(width: int, train: int, seed: int, at: bool = True) -> list[str]:
    """The options every command of one run shares: the study profile, the width, the data, the seed and the device
    (the GPU rows: CUDA and, with ``at`` (the commands that train AT), PGD-10 AT)."""
    gpu = (width, train) in GPU + GPU_DECOMPOSITION
    device = ["--device", GPU_DEVICE, *(GPU_AT if at else [])] if gpu else ["--device", "cpu"]
    return ["--profile", "study", "--width", str(width), "--train-subset", str(train), "--seed", str(seed), *device, "--no-progress"]


@dataclass
class Job:
    name: str
    args: list[str]  # after `python -m riftlab`
    done_file: Path
    deps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.args = [*self.args, *_smoke_extra(self.args)]


def _smoke_extra(args: list[str]) -> list[str]:
    """The --smoke sizes for a command, less those the command sets itself: the AT length of a longer-AT run, and the
    alpha grid that the reference protocol fixes."""
    extra, out = SMOKE.get(args[0], []), []
    mine = {"--at-epochs"} & set(args) | ({"--alphas"} if "reference" in args else set())
    for option, value in zip(extra[::2], extra[1::2]):
        if option not in mine:
            out += [option, value]
    return out


def jobs_for(root: Path, width: int, train: int, seed: int, variants: bool = True, at_epochs: int | None = None,
             folders: dict[str, tuple[str, list[str]]] | None = None) -> list[Job]:
    """The rift run of one configuration and, with ``variants``, its labelled fine-tuning variants (``folders``: those
    of :data:`VARIANTS` this configuration runs, or another such table, e.g. :data:`DECOMPOSITION`)."""
    name = run_name(width, train, seed, at_epochs)
    run = root / name
    common = config_args(width, train, seed)
    later = config_args(width, train, seed, at=False)  # ablate reads AT from the run; it takes no AT options
    # an AT of another length than the study's: the rift command trains it (its lr milestones scale with the length)
    length = ["--at-epochs", str(at_epochs)] if at_epochs is not None and at_epochs != AT_EPOCHS else []
    out = [Job(name, ["rift", *common, *length, "--out", str(run), "--resume"], run / "results.json")]
    if variants:
        table = folders if folders is not None else {folder: VARIANTS[folder] for folder in variant_folders(width, train)}
        for folder, (which, extra) in table.items():
            out.append(Job(f"{name}:{folder}", ["ablate", *later, *extra, "--out", str(run), "--name", folder,
                                                "--variants", which, "--resume"], run / f"{folder}.csv", [name]))
    return out


def decomposition_jobs(root: Path, lengths: tuple[int, ...], seeds: tuple[int, ...] = (0,)) -> list[Job]:
    """The decomposition at the middle configuration for each AT length in ``lengths``: seed 0 runs every
    :data:`DECOMPOSITION` setting, the other ``seeds`` those of :data:`DECOMPOSITION_SEEDED`. Per length, the rift runs
    come first (the long AT chains, so that they overlap the cheaper folders; at the study's own length on a grid
    configuration they are the study's jobs), then the folders, seed by seed."""
    width, train = DECOMPOSITION_AT or MIDDLE
    jobs = []
    for length in lengths:
        rifts, folders = [], []
        for seed in seeds:
            table = DECOMPOSITION if seed == 0 else {k: DECOMPOSITION[k] for k in DECOMPOSITION_SEEDED}
            if (width, train) in DECOMPOSITION_WIDER:  # no test-selection report there (see DECOMPOSITION_WIDER)
                table = {k: (v, [o for o in opts if o != "--report-test-selection"] + ["--no-report-test-selection"])
                         for k, (v, opts) in table.items()}
            rift, *mine = jobs_for(root, width, train, seed, at_epochs=length, folders=table)
            rifts += [rift] if length != AT_EPOCHS or (width, train) not in GRID else []
            folders += mine
        jobs += rifts + folders
    return jobs


def variant_folders(width: int, train: int) -> list[str]:
    """The labelled variants run for a configuration: all of them on the middle configuration, none elsewhere."""
    return list(VARIANTS) if (width, train) == MIDDLE else []


def configurations(big: bool, gpu: bool = False) -> list[tuple[int, int]]:
    """Every (width, training images) of the study, smallest data first; with ``gpu``, the GPU rows last."""
    return GRID + LARGER_DATA + (BIG if big else []) + (GPU if gpu else [])


def phase1(root: Path, big: bool, gpu: bool = False, decomposition: tuple[int, ...] = (),
           seeds: tuple[int, ...] = (0,)) -> tuple[list[Job], list[Job]]:
    """The seed-0 grid: (core, extra). Core: the grid's RiFT runs (what :func:`headline` reads), the middle
    configuration first; extra: the other data sizes' runs (and the GPU rows), then the labelled variants (after the
    headline's seeds), then the decomposition for the AT lengths ``decomposition`` (none by default) and ``seeds``."""
    order = sorted(GRID, key=lambda wn: wn != MIDDLE)
    rifts = [jobs_for(root, w, n, 0, variants=False)[0] for w, n in order]
    others = [jobs_for(root, w, n, 0, variants=False)[0] for w, n in configurations(big, gpu) if (w, n) not in GRID]
    variants = [j for w, n in configurations(big) for j in jobs_for(root, w, n, 0)[1:]]
    planned = {j.name for j in rifts + others}  # a wider configuration's own run is --big's job when --big is given
    return rifts, others + variants + [j for j in decomposition_jobs(root, decomposition, seeds) if j.name not in planned]


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _variant_rows(run: Path) -> list[dict[str, Any]]:
    """Every finished ablation row of a run, labelled with its folder (the fine-tuning setting)."""
    import csv

    rows = []
    confirm = sorted(p.stem for p in run.glob("confirm-*.csv"))
    for folder in [*VARIANTS, *TABLE3, *confirm]:
        path = run / f"{folder}.csv"
        if path.is_file():
            with open(path) as fh:
                for row in csv.DictReader(fh):
                    rows.append({"setting": "table3" if folder in TABLE3 else folder, **{k: _number(v) for k, v in row.items()}})
    return rows


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def candidates(root: Path, big: bool) -> list[dict[str, Any]]:
    """Seed-0 results in the grid's order (smallest first): RiFT as defined, then each labelled variant."""
    out = []
    for width, train in configurations(big):
        run = root / run_name(width, train, 0)
        results = _read(run / "results.json")
        if results is None:
            continue
        diff = results["test"]["difference"]
        out.append({"width": width, "train": train, "setting": "rift", "variant": "least",
                    "clean": diff["clean"], "robust": diff["robust"]})
        for row in _variant_rows(run):
            if row["variant"] in ("at", "no-interp") or row["setting"] == "table3" or row["setting"].startswith("confirm-"):
                continue
            out.append({"width": width, "train": train, "setting": row["setting"], "variant": row["variant"], **_test_change(row)})
    return out


def wins(c: dict[str, Any]) -> bool:
    """The study's criterion: a test clean gain whose 95% interval excludes 0, robust change within the threshold."""
    return c["clean"]["ci_low"] > 0 and c["robust"]["diff"] >= -THRESHOLD - 1e-9


def headline(root: Path, big: bool) -> dict[str, Any] | None:
    """The configuration to repeat with more seeds, fixed before seeing any result:

    1. the smallest configuration (width, then training images) where RiFT as defined (the paper's
       settings) wins on test (:func:`wins`);
    2. else the smallest configuration where a labelled variant that has finished wins (the variants run after
       the headline's seeds, so in a run from scratch this rule finds none);
    3. else the middle configuration (:data:`MIDDLE`), with RiFT as defined: the study then reports the trend, and
       the three seeds, the variants, Table 3 and AutoAttack there.

    None until phase 1's core jobs (:func:`phase1`: the grid's RiFT runs) are done. The runner keeps the first
    headline it finds (the ledger's ``_headline``): runs that finish later cannot move it.
    """
    core, _ = phase1(root, big)
    if not all(job.done_file.is_file() for job in core):
        return None
    found = sorted(candidates(root, big), key=lambda c: (c["train"], c["width"]))
    for pick in ([c for c in found if c["setting"] == "rift" and wins(c)], [c for c in found if wins(c)]):
        if pick:
            return {**pick[0], "rule": "smallest winning configuration" + ("" if pick[0]["setting"] == "rift" else " (a labelled variant)")}
    width, train = MIDDLE
    middle = [c for c in found if c["width"] == width and c["train"] == train and c["setting"] == "rift"][0]
    return {**middle, "rule": "no configuration wins: the middle one, where every variant was measured"}


def phase2(root: Path, pick: dict[str, Any]) -> list[Job]:
    """Seeds 1 and 2 of the headline (with its setting), Table 3 and AutoAttack on seed 0."""
    width, train = pick["width"], pick["train"]
    base = run_name(width, train, 0)
    run0 = root / base
    common = config_args(width, train, 0)
    jobs = [*(Job(f"{base}:{folder}", ["ablate", *common, "--out", str(run0), "--name", folder, "--variants", which, "--resume"],
                  run0 / f"{folder}.csv", [base]) for folder, which in TABLE3.items()),
            Job(f"{base}:autoattack", ["compare", *common, "--out", str(run0), "--a", str(run0 / "at.pt"), "--b", str(run0 / "rift.pt"),
                                       "--autoattack", "20" if SMOKE else "1000"], run0 / "compare-at-rift-test.json", [base])]
    for seed in HEADLINE_SEEDS:
        rift, *_ = jobs_for(root, width, train, seed, variants=False)
        jobs.append(rift)
        if pick["setting"] != "rift":
            which, extra = VARIANTS[pick["setting"]]
            name = run_name(width, train, seed)
            jobs.append(Job(f"{name}:{pick['setting']}", ["ablate", *config_args(width, train, seed, at=False), *extra, "--out", str(root / name),
                                                           "--name", pick["setting"], "--variants", which, "--resume"],
                            root / name / f"{pick['setting']}.csv", [name]))
    return jobs + confirmations(root, pick)


def _test_change(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An ablation row's test changes against AT, as :func:`wins` and the summary read them."""
    return {k: {"diff": row[f"test_{k}_change"], "ci_low": row[f"test_{k}_ci_low"], "ci_high": row[f"test_{k}_ci_high"]}
            for k in ("clean", "robust")}


def table3_winners(rows: list[dict[str, Any]]) -> list[str]:
    """Among a run's variant rows (:func:`_variant_rows`), the Table 3 variants that fine-tune other weights than RiFT's
    (most critical module, last layer, all layers) and win on the test split (:func:`wins`)."""
    return [row["variant"] for row in rows
            if row["setting"] == "table3" and row["variant"] in ("most", "last", "all") and wins(_test_change(row))]


def confirmations(root: Path, pick: dict[str, Any]) -> list[Job]:
    """A Table 3 variant that wins on seed 0 is run again on the headline's other seeds.

    Table 3 and the labelled variants make several comparisons on one seed, so one of them can clear its 95% interval by
    chance; the rule that decides what such a win means is fixed here, before the other seeds are seen: the variant,
    unchanged, on seeds 1 and 2 (each seed's AT model, from its own run), reported per seed, over the seeds and pooled.
    """
    width, train = pick["width"], pick["train"]
    jobs = []
    for variant in table3_winners(_variant_rows(root / run_name(width, train, 0))):
        for seed in HEADLINE_SEEDS:
            name = run_name(width, train, seed)
            jobs.append(Job(f"{name}:confirm-{variant}", ["ablate", *config_args(width, train, seed, at=False), "--out", str(root / name),
                                                          "--name", f"confirm-{variant}", "--variants", variant, "--resume"],
                            root / name / f"confirm-{variant}.csv", [name]))
    return jobs


def _confirmation(root: Path, width: int, train: int, variant: str, seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One confirmed Table 3 variant: its test changes per seed (seed 0 from Table 3, the others from their confirmation
    folders), the mean over seeds with a Student-t interval, and the paired interval over the pooled images."""
    import torch

    from riftlab.checkpoint import read_checkpoint
    from riftlab.evaluation.stats import over_seeds, paired_difference

    rows, pooled = [], {"at": {"clean": [], "robust": []}, "tuned": {"clean": [], "robust": []}}
    for s in seeds:
        run = root / s["name"]
        setting = "table3" if s["seed"] == 0 else f"confirm-{variant}"  # seed 0's row is its Table 3 row
        match = [r for r in s["variants"] if r["variant"] == variant and r["setting"] == setting]
        folders = [*TABLE3] if setting == "table3" else [setting]
        folder = next((f for f in folders if (run / f / variant / "correct.pt").is_file()), None)
        if not match or folder is None:  # not run for this seed, or a carried seed whose per-image results are not here
            continue
        saved = read_checkpoint(run / folder / variant / "correct.pt")["test"]
        reference = read_checkpoint(run / "test_correct.pt")["at"]
        for kind in ("clean", "robust"):
            pooled["at"][kind].append(reference[kind])
            pooled["tuned"][kind].append(saved[kind])
        rows.append({"seed": s["seed"], **{k: match[0][k] for k in match[0] if k != "setting"}})
    out: dict[str, Any] = {"variant": variant, "rows": rows, "seeds": [r["seed"] for r in rows]}
    if len(rows) >= 2:
        out["over_seeds"] = {k: over_seeds([r[f"test_{k}_change"] for r in rows], out["seeds"]) for k in ("clean", "robust")}
        out["pooled"] = {k: paired_difference(torch.cat(pooled["at"][k]), torch.cat(pooled["tuned"][k])) for k in ("clean", "robust")}
    return out


# ----------------------------------------------------------------------------------------------
# The runner


def selected(jobs: list[Job], only: list[str]) -> list[Job]:
    """The jobs named in ``only``, in its order: the runner starts the ready ones first to last, so that ``--only``
    also says which of the named jobs a slot takes first (a job whose inputs are not done yet waits its turn)."""
    return sorted([j for j in jobs if j.name in only], key=lambda j: only.index(j.name))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def run(root: Path, parallel: int, threads: int, big: bool, phase: str, only: list[str] | None = None, gpu: bool = False,
        decomposition: tuple[int, ...] = (), seeds: tuple[int, ...] = (0,)) -> int:
    """Run the study's jobs, ``parallel`` at a time; ``only``: just the jobs of these names, in that order
    (:func:`selected`; their inputs must be among them or already done), e.g. to continue the committed study on a machine whose runs were lost;
    ``decomposition``: also the decomposition's jobs for these AT lengths and ``seeds`` (:func:`decomposition_jobs`)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    ledger_path = root / "jobs.json"
    ledger: dict[str, Any] = _read(ledger_path) or {}
    env = {**os.environ, **KERNEL_PINS, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    running: dict[str, tuple[subprocess.Popen, Job, float]] = {}
    failed: set[str] = set()
    adopted: dict[str, float] = {}  # jobs an earlier runner started that still run: name -> when they started
    while True:
        core, extra = phase1(root, big, gpu, decomposition, seeds)
        # once chosen the headline stays (variants that finish later cannot move it)
        pick = (ledger.get("_headline") or headline(root, big)) if phase in ("2", "all") else None
        if pick is not None and ledger.get("_headline") != pick:
            ledger["_headline"] = pick
            _write_json(ledger_path, ledger)
        later = phase2(root, pick) if pick is not None else []
        # the headline's seeds first, then the other data sizes and the variants, then Table 3 and AutoAttack
        seed_runs, last = [j for j in later if ":" not in j.name], [j for j in later if ":" in j.name]
        grid, others = (core, extra) if phase in ("1", "all") else ([], [])
        jobs = grid + seed_runs + others + last
        done = {j.name for j in jobs if j.done_file.is_file()}  # before --only: a selected job's finished inputs count
        if only is not None:
            jobs = selected(jobs, only)
        for name, (proc, job, started) in list(running.items()):
            if proc.poll() is None:
                continue
            wall = time.time() - started
            _record(ledger, ledger_path, job, started, proc.returncode)
            print(f"{time.strftime('%H:%M:%S')} {name}: exit {proc.returncode} after {wall / 60:.1f} min", flush=True)
            if proc.returncode != 0:
                failed.add(name)
            _pid_file(root, job).unlink(missing_ok=True)
            del running[name]
        elsewhere = {j.name for j in jobs if j.name not in running and _alive(_pid_file(root, j))}  # an earlier runner's child
        for job in [j for j in jobs if j.name in adopted and j.name not in elsewhere]:  # it ended: record it as the runner would
            started = adopted.pop(job.name)
            wall = time.time() - started
            _record(ledger, ledger_path, job, started, 0 if job.done_file.is_file() else None,
                    note="started by an earlier runner; wall time from its pid file to when this runner saw it end")
            _pid_file(root, job).unlink(missing_ok=True)
            print(f"{time.strftime('%H:%M:%S')} {job.name}: ended (started by an earlier runner) after {wall / 60:.1f} min", flush=True)
        for name in elsewhere - adopted.keys():
            adopted[name] = _pid_file(root, next(j for j in jobs if j.name == name)).stat().st_mtime
        waiting = [j for j in jobs if j.name not in done and j.name not in running and j.name not in failed and j.name not in elsewhere]
        ready = [j for j in waiting if all(d in done for d in j.deps)]
        while ready and len(running) + len(elsewhere) < parallel:
            job = ready.pop(0)
            log = open(root / "logs" / f"{job.name.replace(':', '_')}.log", "a")
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} riftlab {' '.join(job.args)}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, "-m", "riftlab", *job.args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[job.name] = (proc, job, time.time())
            _pid_file(root, job).write_text(str(proc.pid))
            print(f"{time.strftime('%H:%M:%S')} {job.name}: started", flush=True)
        if not running and elsewhere:  # the runner was restarted while a job it started still runs: wait for it
            time.sleep(5)
            continue
        if not running:
            blocked = [j.name for j in waiting]
            if failed:
                print(f"failed: {', '.join(sorted(failed))} (see {root / 'logs'}); not started: {', '.join(blocked) or 'none'}")
                return 1
            if blocked:
                print(f"cannot start {', '.join(blocked)}: their inputs are missing")
                return 1
            unplanned = sorted(set(only) - {j.name for j in jobs}) if only is not None else []
            if phase in ("2", "all") and pick is None and (only is None or unplanned):
                print(f"phase 1 is unfinished: the headline cannot be chosen yet{' for ' + ', '.join(unplanned) if unplanned else ''}")
                return 1
            print("all jobs done")
            return 0
        time.sleep(5)


def _all_jobs(root: Path, big: bool, gpu: bool = False, decomposition: tuple[int, ...] = (),
              seeds: tuple[int, ...] = (0,)) -> list[Job]:
    """Every job the study can run: phase 1's and phase 2's for the middle configuration (the headline when none
    wins) or for the headline already chosen in the ledger."""
    core, extra = phase1(root, big, gpu, decomposition, seeds)
    ledger = _read(root / "jobs.json") or {}
    pick = ledger.get("_headline") or headline(root, big) or {"width": MIDDLE[0], "train": MIDDLE[1], "setting": "rift"}
    return core + extra + phase2(root, pick)


def _record(ledger: dict[str, Any], path: Path, job: Job, started: float, returncode: int | None, **extra: str) -> None:
    """A finished job's ledger entry (command, start, wall time, exit code; resumed jobs add up), written at once."""
    wall = time.time() - started
    ledger[job.name] = {"command": ["riftlab", *job.args], "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                        "wall_s": round(wall, 1), "returncode": returncode,
                        "wall_s_total": round(ledger.get(job.name, {}).get("wall_s_total", 0.0) + wall, 1), **extra}
    _write_json(path, ledger)


def _pid_file(root: Path, job: Job) -> Path:
    return root / "logs" / f"{job.name.replace(':', '_')}.pid"


def _alive(pid_file: Path) -> bool:
    """Whether the process a pid file names still runs (a job left running by a runner that was stopped)."""
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}/cmdline").is_file() and b"riftlab" in Path(f"/proc/{pid}/cmdline").read_bytes()


def status(root: Path, big: bool, gpu: bool = False, decomposition: tuple[int, ...] = (), seeds: tuple[int, ...] = (0,)) -> None:
    ledger = _read(root / "jobs.json") or {}
    core, extra = phase1(root, big, gpu, decomposition, seeds)
    jobs = list(core)
    pick = ledger.get("_headline") or headline(root, big)
    if pick is not None:
        jobs += phase2(root, pick)
        print(f"headline: w{pick['width']} n{pick['train']} ({pick['setting']} / {pick['variant']}): {pick['rule']}")
    def state(job: Job) -> str:
        if job.done_file.is_file():
            return "done"
        if _alive(_pid_file(root, job)):
            return "running"
        return "started" if job.name in ledger else "waiting"  # started: it ran, and stopped before the end

    for job in jobs:
        wall = ledger.get(job.name, {}).get("wall_s_total")
        print(f"{job.name:28s} {state(job):8s} {'' if wall is None else f'{wall / 60:6.1f} min'}")
    for job in extra:
        print(f"{job.name:28s} {state(job):8s} (extra)")


# ----------------------------------------------------------------------------------------------
# The summary the book reads


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda} if torch.cuda.is_available() else {}
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, **gpu}


def _run_summary(root: Path, width: int, train: int, seed: int, ledger: dict[str, Any]) -> dict[str, Any] | None:
    import csv

    from riftlab.engine.runner import RunDir

    name = run_name(width, train, seed)
    run = root / name
    results = _read(run / "results.json")
    if results is None:
        return None
    with open(run / "mrc.csv") as fh:
        mrc = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    with open(run / "interpolation.csv") as fh:
        curve = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    least = mrc[0]
    convs3 = None
    for row in _variant_rows(run):
        if row["variant"] == "least3x3":
            convs3 = row["modules"]
    jobs = {k: v for k, v in ledger.items() if k == name or k.startswith(name + ":")}
    for job, record in jobs.items():  # a runner restart resumes a job: its log's first header is when it first started
        log = root / "logs" / f"{job.replace(':', '_')}.log"
        starts = [line[2:21] for line in log.read_text().splitlines() if line.startswith("# 20")] if log.is_file() else []
        if starts:
            record["first_started"] = starts[0]
            record["starts"] = len(starts)
    cfg = results["config"]
    # the precision AT computed in (bf16 on a GPU with native bf16, fp32 on the CPU), as the run's lock recorded it
    at_params = (RunDir(run).record("at") or {}).get("params") or {}
    at = {"method": cfg["at_method"], "attack_steps": cfg["at_attack_steps"], "attack_step": cfg["at_attack_step"],
          "epochs": cfg["at_epochs"], "device": cfg["device"], "precision": at_params.get("precision", cfg["precision"])}
    return {"name": name, "width": width, "train": train, "seed": seed, "at": at, "module": results["module"], "alpha": results["alpha"],
            "finetune_best_epoch": results["finetune_best_epoch"], "finetune_relative_change": results["finetune_relative_change"],
            "validation": results["validation"], "test": results["test"],
            "mrc": {"least": least["module"], "least_mrc": least["mrc"], "least_params": least["params"],
                    "most": mrc[-1]["module"], "most_mrc": mrc[-1]["mrc"], "spread": mrc[-1]["mrc"] / max(least["mrc"], 1e-12),
                    "least3x3": convs3, "table": mrc},
            "curve": curve, "variants": _variant_rows(run), "seconds": results["seconds"],
            "commands": {k: v["command"] for k, v in jobs.items()}, "wall_s": {k: v.get("wall_s_total") for k, v in jobs.items()},
            **({"notes": notes} if (notes := {k: v["note"] for k, v in jobs.items() if v.get("note")}) else {})}


# What a re-run must reproduce exactly for a carried summary to be merged with it (the timings may differ).
_SAME = ("module", "alpha", "finetune_best_epoch", "finetune_relative_change", "validation", "test", "mrc", "curve")


def _carry(name: str, fresh: dict[str, Any] | None, carried: dict[str, list[dict[str, Any]]], source: dict[str, Any]) -> dict[str, Any] | None:
    """One run's summary: the fresh one (checked against the carried one of the same name, if any), else the carried one.

    A run present in both must agree on every result in :data:`_SAME`; otherwise the merge is refused by name, since a
    study whose rows came from different code or data would be mislabelled. Variant rows, commands and wall times are
    merged (the fresh run's win for a setting both have); a carried row says where it came from.
    """
    def same(key: str, value: Any) -> Any:  # least3x3 comes from the variants run, which a continuation may not redo
        return {k: v for k, v in value.items() if k != "least3x3"} if key == "mrc" else value

    records = carried.get(name, [])  # a run can be both in the trend and among the headline's seeds: all must agree
    for other in [*records[1:], *([fresh] if fresh is not None else [])]:
        for key in _SAME:
            if records and not _agree(same(key, other[key]), same(key, records[0][key])):
                what = "does not reproduce" if other is fresh else "has two disagreeing records of"
                raise SystemExit(f"--carry: run {name} {what} the carried summary's {key!r} "
                                 f"(carried: {json.dumps(records[0][key])[:200]}; other: {json.dumps(other[key])[:200]}); "
                                 f"summarize without --carry, or rerun every job of the study")
    old = records[0] if records else None
    if fresh is None:
        return None if old is None else {**old, "carried_from": source}
    if old is None:
        return fresh
    settings = {row["setting"] for row in fresh["variants"]}
    return {**fresh, "mrc": {**fresh["mrc"], "least3x3": fresh["mrc"]["least3x3"] or old["mrc"]["least3x3"]},
            "variants": [row for row in old["variants"] if row["setting"] not in settings] + fresh["variants"],
            "commands": {**old["commands"], **fresh["commands"]}, "wall_s": {**old["wall_s"], **fresh["wall_s"]},
            "reproduces": source}


def _agree(a: Any, b: Any) -> bool:
    """Whether two summaries hold the same results: equal, except that floats may differ in their last bits (an
    accuracy computed as 83.54 by one version of the statistics and as acc_a + 100 * (gained - lost) / n, 83.53999999999999,
    by another is the same result; 83.55 is not)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_agree(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_agree(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b


def _sessions(carried: list[dict[str, Any]], here: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runner's sessions behind the summary: the carried ones, then this root's that are not among them (a summary
    carried from one made from this same root already holds them)."""
    return [*carried, *(s for s in here if s not in carried)]


def summarize(root: Path, out: Path, big: bool, tie_images: int, carry: Path | None = None, gpu: bool = False,
              decomposition: tuple[int, ...] = (), seeds: tuple[int, ...] = (0,)) -> None:
    """``out/study.json`` from the runs under ``root``; with ``carry`` (a committed study.json), runs missing from
    ``root`` are taken from it, and runs present in both must reproduce it exactly (:func:`_carry`); with
    ``decomposition`` (AT lengths), the decomposition's rows (:func:`_decomposition_summary`), else the carried ones."""
    from riftlab.evaluation.stats import CI_METHOD

    from riftlab.evaluation.stats import over_seeds

    ledger = _read(root / "jobs.json") or {}
    before: dict[str, Any] = (_read(carry) or {}) if carry is not None else {}
    if carry is not None and not before:
        raise SystemExit(f"--carry: {carry} is not a study.json")
    source = {"file": str(carry), **{k: before.get("provenance", {}).get(k) for k in ("summarized_at_commit", "summarized")}}
    old_runs: dict[str, list[dict[str, Any]]] = {}
    for r in [*before.get("trend", []), *((before.get("headline") or {}).get("runs", []))]:
        old_runs.setdefault(r["name"], []).append(r)
    runs = [s for w, n in configurations(big, gpu)
            if (s := _carry(run_name(w, n, 0), _run_summary(root, w, n, 0, ledger), old_runs, source)) is not None]
    pick = ledger.get("_headline") or headline(root, big)
    old_pick = (before.get("headline") or {}).get("pick")
    if old_pick is not None:
        if pick is not None and any(pick[k] != old_pick[k] for k in ("width", "train", "setting", "variant")):
            raise SystemExit(f"--carry: the headline chosen now ({pick['width']}/{pick['train']}/{pick['setting']}) is not the "
                             f"carried one ({old_pick['width']}/{old_pick['train']}/{old_pick['setting']})")
        pick = pick or old_pick
    summary: dict[str, Any] = {
        "what": "RiFT on real Fashion-MNIST: AT vs AT+RiFT on the 10000 test images, paired 95% intervals",
        "provenance": {"script": "benchmarks/scale_study.py", "runs": _sessions(before.get("provenance", {}).get("runs", []), ledger.get("_sessions", [])),
                       "summarized_at_commit": _git("rev-parse", "HEAD"), "machine": _machine(),
                       "threads_per_job": ledger.get("_threads") or before.get("provenance", {}).get("threads_per_job"),
                       "summarized": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "threshold": THRESHOLD, "interval": CI_METHOD,
                       **({"carried": source} if carry is not None else {})},
        "trend": runs, "headline": None}
    if decomposition:
        summary["decomposition"] = _with_carried_blocks(_decomposition_summary(root, decomposition, ledger, seeds),
                                                        before.get("decomposition") or [])
    elif "decomposition" in before:
        summary["decomposition"] = before["decomposition"]
    if pick is not None:
        width, train = pick["width"], pick["train"]
        seeds = [s for seed in (0, *HEADLINE_SEEDS)
                 if (s := _carry(run_name(width, train, seed), _run_summary(root, width, train, seed, ledger), old_runs, source)) is not None]
        block: dict[str, Any] = {"pick": pick, "runs": seeds, "considered": [list(wn) for wn in GRID],  # what the rule read
                                 "seeds_planned": [0, *HEADLINE_SEEDS], "seeds_missing": [
                                     seed for seed in (0, *HEADLINE_SEEDS) if seed not in {s["seed"] for s in seeds}]}
        if len(seeds) >= 2:  # over the seeds that finished (a Student-t interval: wide with two)
            diffs = _headline_diffs(seeds, pick)
            block["over_seeds"] = {kind: over_seeds([d[kind]["diff"] for d in diffs], [s["seed"] for s in seeds]) for kind in ("clean", "robust")}
            if any("carried_from" in s for s in seeds):  # the per-image results of a carried seed are not here: its pool is
                old_block = before["headline"]
                if old_block.get("pooled") is None or sorted(r["seed"] for r in old_block["runs"]) != [s["seed"] for s in seeds]:
                    raise SystemExit("--carry: the carried study has no pooled result over these seeds; rerun the missing seeds")
                block["pooled"] = old_block["pooled"]
            else:
                block["pooled"] = {kind: _pooled(root, width, train, pick, kind, [s["seed"] for s in seeds]) for kind in ("clean", "robust")}
        compare = _read(root / run_name(width, train, 0) / "compare-at-rift-test.json")
        if compare is None and "autoattack" in (before.get("headline") or {}):
            block["autoattack"], block["pgd_same_run"] = before["headline"]["autoattack"], before["headline"]["pgd_same_run"]
        if compare is not None:
            block["autoattack"] = compare.get("autoattack")
            block["pgd_same_run"] = {"clean": compare["clean"], "robust": compare["robust"]}
            if block["autoattack"]:
                block["autoattack"]["pgd_same_images"] = _pgd_on_autoattack_images(root / run_name(width, train, 0), block["autoattack"])
        # from seed 0's summary rows (carried ones included), so a carried seed 0 keeps its confirmations
        winners = table3_winners(seeds[0]["variants"]) if seeds and seeds[0]["seed"] == 0 else []
        carried_confirmations = {c["variant"]: c for c in (before.get("headline") or {}).get("confirmations", [])}
        block["confirmations"] = [carried_confirmations[v] if v in carried_confirmations and any("carried_from" in s for s in seeds)
                                  else _confirmation(root, width, train, v, seeds) for v in winners]
        summary["headline"] = block
        if not (root / run_name(width, train, 0) / "results.json").is_file():  # carried: its committed checkpoints stay
            summary["checkpoints"] = before["checkpoints"]
        else:
            _copy_checkpoints(root / run_name(width, train, 0), out / "checkpoints", run_name(width, train, 0), tie_images, summary)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "study.json", summary)
    print(f"wrote {out / 'study.json'}")


def _at_regime(run: Path) -> dict[str, Any]:
    """How converged an AT model is, from its history: the last epoch's training robust accuracy (the training attack,
    averaged over the epoch as it trained) against its validation robust accuracy (the evaluation attack, at the end),
    and their gap, the sign of robust overfitting."""
    import csv

    with open(run / "at_history.csv") as fh:
        last = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)][-1]
    return {"epochs": last["epoch"], "train_robust": last["train_robust_acc"], "val_clean": last["val_clean_acc"],
            "val_robust": last["val_robust_acc"], "gap": round(last["train_robust_acc"] - last["val_robust_acc"], 2)}


def _curve(curve_csv: Path) -> list[dict[str, Any]]:
    """A validation interpolation curve (interpolation.csv) as rows; empty when there is none."""
    import csv

    if not curve_csv.is_file():
        return []
    with open(curve_csv) as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _end_point(curve_csv: Path) -> dict[str, Any] | None:
    """The fine-tuned model itself (alpha 1) on the validation curve: its clean and robust change against AT, with the
    curve's paired intervals; None when the curve stops short of 1."""
    end = [r for r in _curve(curve_csv) if r["alpha"] == 1.0]
    if not end:
        return None
    return {k: {"diff": end[0][f"{k}_change"], "ci_low": end[0][f"{k}_change_low"], "ci_high": end[0][f"{k}_change_high"]}
            for k in ("clean", "robust")}


def _pooled_counts(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Seeds' test changes pooled over their images (each seed its own AT model and test attack): the paired interval
    of all their gained and lost images together."""
    from riftlab.evaluation.stats import difference_from_counts

    return difference_from_counts(sum(int(r[kind]["gained"]) for r in rows), sum(int(r[kind]["lost"]) for r in rows),
                                  sum(int(r[kind]["n"]) for r in rows))


def _decomposition_summary(root: Path, lengths: tuple[int, ...], ledger: dict[str, Any],
                           seeds: tuple[int, ...] = (0,)) -> list[dict[str, Any]]:
    """Per configuration (:func:`decomposition_configurations`, those with runs) and AT length, one block (naming its
    width and training images) of the runs of every seed in ``seeds`` that finished: each AT model's test
    accuracies and regime (:func:`_at_regime`), RiFT as the study runs it, and each :data:`DECOMPOSITION` folder's row:
    its validation-selected test change against AT (paired 95% intervals), the fine-tuned end point (alpha 1,
    validation), and what the reference code's choice on test reports with its zero-effect null. ``over_seeds``: for
    each setting run on two or more seeds, its test change over them (the seeds' mean with a t interval, and their
    images pooled)."""
    import csv

    from riftlab.evaluation.stats import over_seeds

    out = []
    for width, train, length in decomposition_models(lengths):
        runs = []
        for seed in seeds:
            name = run_name(width, train, seed, length)
            run = root / name
            results = _read(run / "results.json")
            if results is None:
                continue
            settings = []
            for folder in DECOMPOSITION:
                if not (run / f"{folder}.csv").is_file():
                    continue
                with open(run / f"{folder}.csv") as fh:
                    rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
                for row in rows:
                    if row["variant"] == "at":
                        continue
                    chosen = _read(run / folder / row["variant"] / "test_selection.json")
                    settings.append({"setting": folder, "variant": row["variant"], "modules": row["modules"], "params": row["params"],
                                     "alpha": row["alpha"], "validation_selected": _test_change(row),
                                     "counts": {k: {"gained": row[f"test_{k}_gained"], "lost": row[f"test_{k}_lost"],
                                                   "n": results["test"]["difference"][k]["n"]} for k in ("clean", "robust")},
                                     "end_point": _end_point(run / folder / row["variant"] / "interpolation.csv"),
                                     "curve": _curve(run / folder / row["variant"] / "interpolation.csv"),
                                     "test_selected": chosen, "command": (ledger.get(f"{name}:{folder}") or {}).get("command"),
                                     "wall_s": (ledger.get(f"{name}:{folder}") or {}).get("wall_s_total")})
            runs.append({"name": name, "seed": seed, "at_epochs": results["config"]["at_epochs"], "regime": _at_regime(run),
                         "module": results["module"], "alpha": results["alpha"],
                         "at": {k: results["test"]["at"][f"{k}_acc"] for k in ("clean", "robust")},
                         "rift": {k: results["test"]["difference"][k] for k in ("clean", "robust")},
                         "end_point": _end_point(run / "interpolation.csv"), "settings": settings,
                         "command": (ledger.get(name) or {}).get("command"), "wall_s": (ledger.get(name) or {}).get("wall_s_total")})
        if not runs:
            continue
        pooled = []
        for folder in DECOMPOSITION:
            mine = [(r["seed"], s) for r in runs for s in r["settings"] if s["setting"] == folder]
            if len(mine) < 2:
                continue
            rows = [s["counts"] for _, s in mine]
            pooled.append({"setting": folder, "seeds": [seed for seed, _ in mine],
                           **{k: {"over_seeds": over_seeds([s["validation_selected"][k]["diff"] for _, s in mine], [seed for seed, _ in mine]),
                                  "pooled": _pooled_counts(rows, k)} for k in ("clean", "robust")},
                           "test_selected_clean": over_seeds([s["test_selected"]["clean_gain"] for _, s in mine if s["test_selected"]],
                                                             [seed for seed, s in mine if s["test_selected"]])
                           if all(s["test_selected"] for _, s in mine) else None})
        if len(runs) >= 2:
            rows = [r["rift"] for r in runs]
            pooled.insert(0, {"setting": "rift", "seeds": [r["seed"] for r in runs],
                              **{k: {"over_seeds": over_seeds([r["rift"][k]["diff"] for r in runs], [r["seed"] for r in runs]),
                                     "pooled": _pooled_counts(rows, k)} for k in ("clean", "robust")}})
        first = runs[0]
        # seed 0's fields at the top level, as before the seeds: one AT length, one block
        out.append({"name": first["name"], "width": width, "train": train, "at_epochs": first["at_epochs"], "module": first["module"], "alpha": first["alpha"],
                    "at": first["at"], "rift": first["rift"], "settings": first["settings"], "regime": first["regime"],
                    "runs": runs, "over_seeds": pooled})
    return out


def _with_carried_blocks(fresh: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``fresh`` blocks, and those of ``before`` (the carried study's) of a configuration and AT length that ``fresh``
    lacks (runs kept under another root, e.g. the GPU's), in :func:`decomposition_configurations` order."""
    key = lambda b: (b.get("width"), b.get("train"), b["at_epochs"])  # noqa: E731
    have = {key(b) for b in fresh}
    blocks = fresh + [b for b in before if b.get("width") is not None and key(b) not in have]
    order = decomposition_configurations()
    rank = lambda b: order.index((b["width"], b["train"])) if (b["width"], b["train"]) in order else len(order)  # noqa: E731
    return sorted(blocks, key=rank)  # stable: each configuration's AT lengths keep their order


# What `export --decomposition` commits of each run: what the summary reads, the AT weights and per-image results (small
# at these widths), and the logs; not the fine-tuned weights (they are rebuilt from the commands).
_EXPORT_RUN = ("results.json", "test.json", "alpha.json", "at_history.csv", "finetune.csv", "mrc.csv", "interpolation.csv",
               "riftlab.lock", "at.pt", "test_correct.pt", "interpolation_correct.pt")
_EXPORT_FOLDER = ("interpolation.csv", "test_selection.json")


def export_decomposition(root: Path, dest: Path, lengths: tuple[int, ...], seeds: tuple[int, ...]) -> list[str]:
    """Copy the decomposition's finished runs from ``root`` to ``dest`` (one folder per run, :data:`_EXPORT_RUN` and
    each setting's rows, curves, test-selection reports and fine-tuning histories), with the runner's ledger entries
    for them and its sessions merged into ``dest/jobs.json``, so that the summary can be rebuilt from ``dest`` alone.
    Every configuration of :func:`decomposition_configurations` with runs in ``root`` is copied. Writes each file
    atomically; returns the runs copied."""
    import shutil

    ledger = _read(root / "jobs.json") or {}
    # merged into what dest already holds (another root's runs, e.g. the GPU's, stay); a job run with another number
    # of threads per job than dest's first runs says so in its own entry
    entries = _read(dest / "jobs.json") or {}
    threads = entries.setdefault("_threads", ledger.get("_threads"))
    sessions = entries.setdefault("_sessions", [])
    sessions += [s for s in ledger.get("_sessions", []) if s not in sessions]
    copied = []
    for width, train, length in decomposition_models(lengths):
        for seed in seeds:
            name = run_name(width, train, seed, length)
            run = root / name
            if not (run / "results.json").is_file():
                continue
            files = [run / f for f in _EXPORT_RUN if (run / f).is_file()]
            for folder in DECOMPOSITION:
                if (run / f"{folder}.csv").is_file():
                    files.append(run / f"{folder}.csv")
                    files += sorted(f for f in (run / folder).rglob("*") if f.name in _EXPORT_FOLDER or f.name == "finetune.csv")
            files += sorted((root / "logs").glob(f"{name}.log")) + sorted((root / "logs").glob(f"{name}_*.log"))
            for f in files:
                target = dest / name / (f.relative_to(run) if f.is_relative_to(run) else Path("logs") / f.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(f, tmp)
                tmp.replace(target)
            entries.update({k: v if ledger.get("_threads") == threads else {**v, "threads": ledger.get("_threads")}
                            for k, v in ledger.items() if k == name or k.startswith(name + ":")})
            copied.append(name)
    _write_json(dest / "jobs.json", entries)
    return copied


def _headline_diffs(seeds: list[dict[str, Any]], pick: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed, the headline's test differences (RiFT as defined, or the chosen variant's row)."""
    out = []
    for s in seeds:
        if pick["setting"] == "rift":
            out.append(s["test"]["difference"])
            continue
        row = [r for r in s["variants"] if r["setting"] == pick["setting"] and r["variant"] == pick["variant"]][0]
        out.append({k: {"diff": row[f"test_{k}_change"]} for k in ("clean", "robust")})
    return out


def _pgd_on_autoattack_images(run: Path, aa: dict[str, Any]) -> dict[str, Any]:
    """PGD-10 on the images AutoAttack attacked (the first ``n`` of test), from the run's per-image test results (the
    same attack seed as ``compare``), and the masking checks on them. Refused when those images' clean accuracy is not
    AutoAttack's: then they are not the same images."""
    from riftlab.checkpoint import read_checkpoint
    from riftlab.evaluation.sanity import autoattack_checks
    from riftlab.evaluation.stats import paired_difference

    saved, n, out = read_checkpoint(run / "test_correct.pt"), aa["n"], {"n": aa["n"]}
    clean, pgd = (paired_difference(saved["at"][kind][:n], saved["rift"][kind][:n]) for kind in ("clean", "robust"))
    for tag, model in (("a", "at"), ("b", "rift")):
        clean_acc, pgd_acc = clean[f"acc_{tag}"], pgd[f"acc_{tag}"]
        if abs(clean_acc - aa[tag]["clean_acc"]) > 0.5 * 100.0 / n:  # counted accuracies: apart by whole images
            raise SystemExit(f"{run}: clean accuracy of {model} on the first {n} test images is {clean_acc:.2f} in test_correct.pt but "
                             f"{aa[tag]['clean_acc']:.2f} in AutoAttack's report: not the same images or model; rerun the autoattack job")
        reported = (aa.get("pgd_robust_acc") or {}).get(tag)  # riftlab compare's own figure, where it wrote one
        if reported is not None and abs(reported - pgd_acc) > 0.5 * 100.0 / n:
            raise SystemExit(f"{run}: PGD on the first {n} test images of {model}: {pgd_acc} from test_correct.pt, {reported} from compare")
        out[tag] = {"pgd_robust_acc": pgd_acc, "checks": [c.to_dict() for c in autoattack_checks(pgd_acc, aa[tag]["robust_acc"], n)]}
    return out


def _pooled(root: Path, width: int, train: int, pick: dict[str, Any], kind: str, seeds: list[int]) -> dict[str, Any] | None:
    """The seeds' images pooled (N x seeds pairs), for RiFT as defined (the runs' saved per-image results)."""
    import torch

    from riftlab.checkpoint import read_checkpoint
    from riftlab.evaluation.stats import paired_difference

    if pick["setting"] != "rift":
        return None
    at, rift = [], []
    for seed in seeds:
        saved = read_checkpoint(root / run_name(width, train, seed) / "test_correct.pt")
        at.append(saved["at"][kind])
        rift.append(saved["rift"][kind])
    return paired_difference(torch.cat(at), torch.cat(rift))


def _copy_checkpoints(run: Path, dest: Path, name: str, tie_images: int, summary: dict[str, Any]) -> None:
    """The headline's AT and fine-tuned weights as fp16 state dicts, with their numbers on the first test images.

    The numbers are measured here on the fp16 weights (so the test that re-evaluates the committed
    files compares like with like); the study's reported numbers are those of the full-precision run.
    """
    import torch

    from riftlab import Batches, ImageSet, build_model, compare, evaluate, load_dataset
    from riftlab.checkpoint import read_checkpoint, save_checkpoint
    from riftlab.steps.interpolation import interpolate

    results = _read(run / "results.json")
    cfg = results["config"]
    dest.mkdir(parents=True, exist_ok=True)
    states = {}
    for tag in ("at", "ft"):
        saved = read_checkpoint(run / f"{tag}.pt")
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in saved["model_state"].items()}
        save_checkpoint(dest / f"{name}-{tag}.pt", {"model_state": state, "meta": saved["meta"]})
        states[tag] = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    splits = load_dataset(cfg["dataset"], val_size=cfg["val_size"], train_subset=cfg["train_subset"])
    info = splits.info

    def model(state):
        net = build_model(cfg["model"], info.num_classes, info.channels, info.image_size, cfg["width"], info.mean, info.std)
        net.load_state_dict(state)
        return net.eval()

    first = ImageSet(splits.test.images[:tie_images], splits.test.labels[:tie_images])
    torch.set_num_threads(1)
    result = compare(model(states["at"]), model(interpolate(states["at"], states["ft"], results["alpha"])), Batches(first, 256),
                     cfg["eps"], cfg["step"], cfg["eval_steps"], 1, seed=12345)
    # the fine-tuned weights themselves, tied to the code even where the chosen alpha is 0; one seed gives
    # every image the same random start in `evaluate` as in `compare`, so AT need not be attacked again
    tuned = evaluate(model(states["ft"]), Batches(first, 256), cfg["eps"], cfg["step"], cfg["eval_steps"], 1, seed=12345)
    summary["checkpoints"] = {"files": {"at": f"checkpoints/{name}-at.pt", "ft": f"checkpoints/{name}-ft.pt"}, "alpha": results["alpha"],
                              "module": results["module"], "config": {k: cfg[k] for k in ("dataset", "model", "width", "val_size", "train_subset",
                                                                                          "eps", "step", "eval_steps")},
                              "tie_check": {"images": tie_images, "restarts": 1, "seed": 12345, "batch": 256,
                                            "at": {k: result["a"][k] for k in ("clean_acc", "robust_acc")},
                                            "rift": {k: result["b"][k] for k in ("clean_acc", "robust_acc")},
                                            "ft": {k: tuned[k] for k in ("clean_acc", "robust_acc")}}}


def main() -> int:
    global GRID, LARGER_DATA, MIDDLE, GPU_DEVICE, AT_EPOCHS, DECOMPOSITION_AT_EPOCHS, DECOMPOSITION_AT  # --smoke shrinks them
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "status", "summarize", "export"],
                        help="export: copy the decomposition's finished runs to --out/decomposition_runs (with --decomposition)")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "scale_study", help="where the runs live (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scale_study", help="summarize: where study.json goes")
    parser.add_argument("--jobs", type=int, default=2, help="run: jobs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="run: torch threads per job (default 1)")
    parser.add_argument("--phase", choices=["1", "2", "all"], default="all", help="run: the seed-0 grid, the headline's seeds, or both")
    parser.add_argument("--carry", type=Path, default=None,
                        help="summarize: a committed study.json whose runs are not under --root (lost with a machine); runs in both must agree")
    parser.add_argument("--only", default=None, help="run: comma-separated job names (see `status`), started in the order given as their inputs "
                        "allow; the others are left alone")
    parser.add_argument("--big", action="store_true", help=f"also the largest configuration(s) {BIG}")
    parser.add_argument("--gpu", action="store_true", help=f"also the GPU row(s) {GPU} (CUDA, PGD-10 AT; not read by the headline rule)")
    parser.add_argument("--tie-images", type=int, default=500, help="summarize: test images of the committed checkpoints' tie check")
    parser.add_argument("--decomposition", action="store_true",
                        help="also what RiFT's gain is made of (DECOMPOSITION), at the middle configuration, for each --at-epochs")
    parser.add_argument("--at-epochs", default=None, metavar="E1,E2",
                        help=f"--decomposition: the AT lengths in epochs (default: {','.join(map(str, DECOMPOSITION_AT_EPOCHS))}); "
                             f"a run of another length than {AT_EPOCHS} is named like w8-n10k-e40-s0")
    parser.add_argument("--decomposition-seeds", default="0", metavar="0,1,2",
                        help=f"--decomposition: the seeds (default 0); seeds other than 0 run {', '.join(DECOMPOSITION_SEEDED)}")
    parser.add_argument("--decomposition-at", default=None, metavar="W,N",
                        help=f"--decomposition: its configuration, width and training images (default {MIDDLE[0]},{MIDDLE[1]}); "
                             f"{', '.join(f'{w},{n}' for w, n in GPU_DECOMPOSITION)} runs on the GPU with PGD-10 AT")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and widths 4 and 8 on 1000 images: checks the script, not RiFT")
    args = parser.parse_args()
    if args.smoke:
        SMOKE.update(_SMOKE)
        GRID, LARGER_DATA, MIDDLE = [(4, 1000), (8, 1000)], [], (8, 1000)
        AT_EPOCHS, DECOMPOSITION_AT_EPOCHS = 1, (1, 2)  # the smoke's AT is one epoch; its longer one, two
        GPU[:], GPU_DEVICE = [(16, 1000)], "cpu"  # in place: the --gpu help above already read the list
        GPU_DECOMPOSITION[:] = [(16, 1000)]
    try:
        lengths = tuple(int(e) for e in args.at_epochs.split(",")) if args.at_epochs else DECOMPOSITION_AT_EPOCHS
    except ValueError:
        raise SystemExit(f"--at-epochs: expected comma-separated epochs such as 10,40, got {args.at_epochs!r}") from None
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise SystemExit(f"--at-epochs: expected distinct epochs >= 1, got {args.at_epochs!r}")
    decomposition = lengths if args.decomposition else ()
    if args.decomposition_at is not None:
        try:
            DECOMPOSITION_AT = tuple(int(v) for v in args.decomposition_at.split(","))
        except ValueError:
            DECOMPOSITION_AT = ()
        if len(DECOMPOSITION_AT) != 2 or min(DECOMPOSITION_AT) < 1:
            raise SystemExit(f"--decomposition-at: expected a width and a number of training images such as 64,10000, "
                             f"got {args.decomposition_at!r}")
        if DECOMPOSITION_AT not in decomposition_configurations():
            DECOMPOSITION_WIDER.append(DECOMPOSITION_AT)  # summarize and export take it too
    try:
        seeds = tuple(int(s) for s in args.decomposition_seeds.split(","))
    except ValueError:
        raise SystemExit(f"--decomposition-seeds: expected comma-separated seeds such as 0,1,2, got {args.decomposition_seeds!r}") from None
    if seeds[0] != 0 or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--decomposition-seeds: expected distinct seeds >= 0 starting with 0 (seed 0 runs every setting), "
                         f"got {args.decomposition_seeds!r}")
    if args.action == "run":
        ledger = _read(args.root / "jobs.json") or {}
        if ledger.get("_threads", args.threads) != args.threads:
            raise SystemExit(f"{args.root} was run with {ledger['_threads']} threads per job; CPU results depend on it: "
                             f"pass --threads {ledger['_threads']} or use another --root")
        args.root.mkdir(parents=True, exist_ok=True)
        provenance = {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
                      "machine": _machine(), "command": " ".join(["python", *sys.argv]), "kernel_pins": KERNEL_PINS,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        sessions = [*ledger.get("_sessions", []), provenance]  # one entry per start of the runner (resumes included)
        _write_json(args.root / "jobs.json", {**ledger, "_threads": args.threads, "_sessions": sessions})
        only = None
        if args.only is not None:
            only = list(dict.fromkeys(name.strip() for name in args.only.split(",") if name.strip()))
            known = {j.name for j in _all_jobs(args.root, args.big, args.gpu, decomposition, seeds)}
            if unknown := sorted(set(only) - known):
                raise SystemExit(f"--only: no job named {', '.join(unknown)}; the study's jobs are: {', '.join(sorted(known))}")
        return run(args.root, args.jobs, args.threads, args.big, args.phase, only, args.gpu, decomposition, seeds)
    if args.action == "status":
        status(args.root, args.big, args.gpu, decomposition, seeds)
        return 0
    if args.action == "export":
        if not decomposition:
            raise SystemExit("export copies the decomposition's runs: pass --decomposition (and its --at-epochs, --decomposition-seeds)")
        copied = export_decomposition(args.root, args.out / "decomposition_runs", decomposition, seeds)
        print(f"copied {', '.join(copied) or 'nothing'} to {args.out / 'decomposition_runs'}")
        return 0
    summarize(args.root, args.out, args.big, args.tie_images, args.carry, args.gpu, decomposition, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
