"""The paper's Table 1 protocol end to end, written as the paper's row beside the paper's numbers.

One call trains the AT model (or resumes it), runs MRC, fine-tuning and interpolation (alpha
chosen on validation), then measures on the test split what Table 1 reports for AT and AT+RiFT:

* ``std``: clean accuracy;
* ``adv``: PGD-10 robust accuracy, the per-example worst of ``eval_restarts`` random starts
  (3 in the ``paper`` profile);
* ``ood``: mean accuracy over the 15 standard corruptions at 5 severities, from the published
  -C set when its folder is given (``c_dir``), otherwise from corruptions made on the fly.

Several seeds give the mean and the standard deviation, as the paper reports the mean of 3.
Every stage resumes (see :func:`riftlab.pipeline.run_rift`), and so does the OOD sweep.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.nn as nn

from .checkpoint import load_checkpoint
from .compute import to_device
from .data import Batches, ImageSet, dataset_info
from .ood import ood_accuracy
from .paper import DATASETS, MODELS, TABLE1
from .pipeline import PROFILES, RiftConfig, _write_csv, _write_json, build_for, prepare, run_rift

__all__ = ["reproduce_table1", "default_profile", "format_table1"]

_METRICS = ("std", "ood", "adv")


def default_profile(dataset: str) -> str:
    """``paper`` for the paper's datasets (a GPU job), ``cpu`` for the others (offline, minutes)."""
    return "paper" if dataset in DATASETS else "cpu"


def reproduce_table1(
    model: str,
    dataset: str,
    out: str | os.PathLike,
    profile: str | None = None,
    seeds: Sequence[int] = (0,),
    c_dir: str | os.PathLike | None = None,
    corruptions: str = "standard",
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    ood_examples: int | None = None,
    autoattack_examples: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], Any] = print,
    **overrides: Any,
) -> pd.DataFrame:
    """Table 1's row for ``model`` on ``dataset``: AT and AT+RiFT, std / ood / adv in percent.

    Args:
        profile: a :data:`riftlab.pipeline.PROFILES` preset (default: :func:`default_profile`).
        seeds: one run directory ``out/seed-<s>`` per seed; the table gives their mean and std.
        c_dir: the published -C folder (CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C); without it
            the corruptions are made on the fly from the test split.
        ood_examples: evaluate OOD on a random subset of this many test images (all by default).
        autoattack_examples: also run standard AutoAttack on the first this many test images
            (column ``aa``, with ``adv_aa_subset``: PGD on the same images, for comparison).
        overrides: any :class:`~riftlab.pipeline.RiftConfig` field (``width``, ``at_epochs``...).

    Returns:
        One row per (method, source): ``source`` is ``riftlab`` (with ``*_sd`` columns over
        seeds) or ``paper`` (absent when the paper has no number for this model and dataset).
        Also written to ``out/table1.csv`` and, per seed, ``out/seed-<s>/ood-*.csv``.
    """
    profile = profile or default_profile(dataset)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    if not seeds:
        raise ValueError("give at least one seed")
    out = Path(out)
    info = dataset_info(dataset)
    rows = []
    for seed in seeds:
        cfg = RiftConfig(**{**PROFILES[profile], "dataset": dataset, "model": model, "seed": int(seed), **overrides})
        run_dir = out / f"seed-{seed}"
        log(f"seed {seed}: RiFT ({profile} profile) in {run_dir}")
        results = run_rift(cfg, run_dir, resume=resume, overwrite=overwrite, log=log)
        cfg = cfg.resolved()
        splits, device = prepare(cfg)
        ood = {}
        for method, tag in (("AT", "at"), ("AT+RiFT", "rift")):
            net = build_for(cfg, splits)
            load_checkpoint(net, run_dir / f"{tag}.pt")
            net = to_device(net, device)
            result = ood_accuracy(net, None if c_dir else splits.test, corruptions, severities, c_dir=c_dir,
                                  dataset=dataset if c_dir else None, image_shape=(info.channels, info.image_size, info.image_size),
                                  max_examples=ood_examples, subset_seed=cfg.seed, batch_size=cfg.eval_batch_size, seed=cfg.seed,
                                  progress=cfg.progress, checkpoint_path=run_dir / "progress" / f"ood-{tag}.pt")
            _write_csv(run_dir / f"ood-{tag}.csv", result.table)
            ood[method] = result
            test = results["test"][tag]
            row = {"seed": seed, "method": method, "std": test["clean_acc"], "ood": result.mean, "adv": test["robust_acc"],
                   "module": results["module"], "alpha": results["alpha"]}
            if autoattack_examples:
                row.update(_autoattack_row(cfg, net, splits.test, device, run_dir / f"autoattack-{tag}", autoattack_examples))
            rows.append(row)
        summary = {m: ood[m].summary() for m in ood}
        _write_json(run_dir / "ood.json", {"protocol": ood["AT"].protocol, "source": "published" if c_dir else "on-the-fly",
                                           "severities": list(severities), **summary})
    per_seed = pd.DataFrame(rows)
    _write_csv(out / "table1-seeds.csv", per_seed)
    table = _table(per_seed, model, dataset, profile, corruptions, bool(c_dir))
    _write_csv(out / "table1.csv", table)
    _write_json(out / "table1.json", {"model": model, "dataset": dataset, "profile": profile, "seeds": list(seeds),
                                      "ood_source": "published" if c_dir else "on-the-fly", "corruptions": corruptions,
                                      "settings": {**PROFILES[profile], **overrides},
                                      "rows": json.loads(table.to_json(orient="records"))})
    return table


def _autoattack_row(cfg: RiftConfig, net: nn.Module, test: ImageSet, device: torch.device, stem: Path, n: int) -> dict[str, float]:
    """AutoAttack and PGD (same settings as ``adv``) on the first ``n`` test images; cached in ``stem-<n>.json``."""
    from .autoattack import autoattack_accuracy
    from .pipeline import evaluate_on_test

    cached = stem.with_name(f"{stem.name}-{n}.json")
    if cached.is_file():
        return json.loads(cached.read_text())
    first = ImageSet(test.images[:n], test.labels[:n])
    aa = autoattack_accuracy(net, first.float().to(device), first.labels.to(device), cfg.eps, seed=cfg.seed,
                             log_path=stem.with_suffix(".log"), batch_size=cfg.eval_batch_size)
    pgd = evaluate_on_test(cfg, net, Batches(first, cfg.eval_batch_size, device=device))
    row = {"aa": aa["robust_acc"], "adv_aa_subset": pgd["robust_acc"], "aa_examples": len(first)}
    _write_json(cached, row)
    return row


def _table(per_seed: pd.DataFrame, model: str, dataset: str, profile: str, corruptions: str, published: bool) -> pd.DataFrame:
    grouped = per_seed.groupby("method", sort=False)
    metrics = [m for m in (*_METRICS, "aa", "adv_aa_subset") if m in per_seed]
    ours = grouped[metrics].mean()
    spread = grouped[metrics].std(ddof=1).fillna(0.0).add_suffix("_sd")
    table = pd.concat([ours, spread], axis=1).reset_index()
    if "aa_examples" in per_seed:
        table["aa_examples"] = int(per_seed["aa_examples"].iloc[0])
    table.insert(1, "source", f"riftlab ({profile}, {len(per_seed) // 2} seed{'s' if len(per_seed) > 2 else ''})")
    table["seeds"] = len(per_seed) // 2
    paper_rows = []
    for method in ("AT", "AT+RiFT"):
        numbers = TABLE1.get((model, method), {}).get(dataset)
        if numbers is not None:
            paper_rows.append({"method": method, "source": "paper (3 seeds)", **dict(zip(_METRICS, numbers)), "seeds": 3})
    table = pd.concat([table, pd.DataFrame(paper_rows)], ignore_index=True) if paper_rows else table
    table.insert(0, "dataset", DATASETS.get(dataset, dataset))
    table.insert(0, "model", MODELS.get(model, model))
    table["ood_protocol"] = f"{corruptions} ({'published -C set' if published else 'on the fly'})"
    return table


def format_table1(table: pd.DataFrame) -> str:
    """The rows as text, in the paper's order: Std / OOD / Adv."""
    lines = [f"{'method':9s} {'source':28s} {'Std':>13s} {'OOD':>13s} {'Adv':>13s}"]
    for _, r in table.iterrows():
        cells = []
        for m in _METRICS:
            sd = r.get(f"{m}_sd")
            several = r.get("seeds", 1) > 1 and not r["source"].startswith("paper")  # no spread from one seed
            cells.append(f"{r[m]:6.2f} ± {sd:4.2f}" if several and isinstance(sd, float) and sd == sd else f"{r[m]:13.2f}")
        lines.append(f"{r['method']:9s} {r['source']:28s} " + " ".join(f"{c:>13s}" for c in cells))
    if not any(table["source"].str.startswith("paper")):
        lines.append(f"(the paper has no {table['model'].iloc[0]} row on {table['dataset'].iloc[0]})")
    lines.append(f"OOD: {table['ood_protocol'].iloc[0]}")
    if "aa" in table:
        for _, r in table[table["aa"].notna()].iterrows():
            lines.append(f"{r['method']}: AutoAttack {r['aa']:.2f} vs PGD {r['adv_aa_subset']:.2f} on the first "
                         f"{int(r['aa_examples'])} test images")
    return "\n".join(lines)
