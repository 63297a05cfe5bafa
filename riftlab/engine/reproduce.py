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
import torch.nn as nn

from ..data import ImageSet, dataset_info
from ..evaluation.ood import ood_accuracy
from ..paper import DATASETS, MODELS, TABLE1
from .config import PROFILES, RiftConfig, data_params
from .pipeline import AtSource, RiftRun, eval_batches, evaluate_split
from .runner import Stage, StageContext, state_digest, write_csv, write_json

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
    dataset_info(dataset)  # an unknown dataset is the error to report, before any run
    configs = {seed: RiftConfig(**{**PROFILES[profile], "dataset": dataset, "model": model, "seed": int(seed), **overrides})
               for seed in seeds}
    for cfg in configs.values():
        cfg.resolved()  # every seed's settings checked before the first run starts
    rows = []
    for seed in seeds:
        cfg = configs[seed]
        run_dir = out / f"seed-{seed}"
        log(f"seed {seed}: RiFT ({profile} profile) in {run_dir}")
        run = RiftRun(cfg, run_dir, at=AtSource("train"), resume=resume, overwrite=overwrite, log=log)
        results = run.run("test")["results"]
        cfg = run.cfg
        ood = {}
        for method, tag in (("AT", "at"), ("AT+RiFT", "rift")):
            net = run.load_model(f"{tag}.pt")
            ood[method] = _ood_stage(run, net, tag, c_dir, corruptions, severities, ood_examples)
            test = results["test"][tag]
            row = {"seed": seed, "method": method, "std": test["clean_acc"], "ood": ood[method]["mean"], "adv": test["robust_acc"],
                   "module": results["module"], "alpha": results["alpha"]}
            if autoattack_examples:
                row.update(_autoattack_stage(run, net, tag, autoattack_examples))
            rows.append(row)
        diff = results["test"]["difference"]
        for row in rows[-2:]:
            row.update({f"{kind}_diff": diff[kind]["diff"] for kind in ("clean", "robust")})
            row.update({f"{kind}_diff_{end}": diff[kind][f"ci_{end}"] for kind in ("clean", "robust") for end in ("low", "high")})
        write_json(run_dir / "ood.json", {"protocol": ood["AT"]["protocol"], "source": "published" if c_dir else "on-the-fly",
                                          "severities": list(severities), **{m: ood[m] for m in ood}})
    per_seed = pd.DataFrame(rows)
    write_csv(out / "table1-seeds.csv", per_seed)
    table = _table(per_seed, model, dataset, profile, corruptions, bool(c_dir))
    write_csv(out / "table1.csv", table)
    write_json(out / "table1.json", {"model": model, "dataset": dataset, "profile": profile, "seeds": list(seeds),
                                      "ood_source": "published" if c_dir else "on-the-fly", "corruptions": corruptions,
                                      "settings": {**PROFILES[profile], **overrides},
                                      "rows": json.loads(table.to_json(orient="records"))})
    return table


def _ood_stage(run: RiftRun, net: nn.Module, tag: str, c_dir: str | os.PathLike | None, corruptions: str, severities: Sequence[int],
               ood_examples: int | None) -> dict[str, Any]:
    """OOD accuracy of ``tag``'s model as the stage ``ood/<tag>`` of the seed's run directory (fingerprinted by the model's weights)."""
    cfg = run.cfg
    splits, _ = run.data()
    info = splits.info
    params = {"model": state_digest(net.state_dict()), "source": str(c_dir) if c_dir else "on-the-fly", "corruptions": corruptions,
              "severities": list(severities), "ood_examples": ood_examples, "subset_seed": cfg.seed, "seed": cfg.seed,
              "batch_size": cfg.eval_batch_size, **data_params(cfg)}

    def compute(ctx: StageContext) -> dict[str, Any]:
        result = ood_accuracy(net, None if c_dir else splits.test, corruptions, severities, c_dir=c_dir, dataset=cfg.dataset if c_dir else None,
                              image_shape=(info.channels, info.image_size, info.image_size), max_examples=ood_examples,
                              subset_seed=cfg.seed, batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=cfg.progress, state=ctx.state)
        ctx.write_csv(f"ood-{tag}.csv", result.table)
        return {**result.summary(), "mean": result.mean}

    return run.dir.run(Stage(f"ood/{tag}", params, compute, inputs=("test",), outputs=(f"ood-{tag}.csv",)))


def _autoattack_stage(run: RiftRun, net: nn.Module, tag: str, n: int) -> dict[str, Any]:
    """AutoAttack and PGD (the ``adv`` column's settings) on the first ``n`` test images: the stage ``autoattack/<tag>``."""
    from ..evaluation.autoattack import autoattack_accuracy

    cfg = run.cfg
    splits, device = run.data()
    params = {"model": state_digest(net.state_dict()), "n": n, "eps": cfg.eps, "seed": cfg.seed, "batch_size": cfg.eval_batch_size,
              "eval_steps": cfg.eval_steps, "eval_restarts": cfg.eval_restarts, **data_params(cfg)}

    def compute(ctx: StageContext) -> dict[str, Any]:
        first = ImageSet(splits.test.images[:n], splits.test.labels[:n])
        aa = autoattack_accuracy(net, first.float().to(device), first.labels.to(device), cfg.eps, seed=cfg.seed,
                                 log_path=ctx.path(f"autoattack-{tag}.log"), batch_size=cfg.eval_batch_size)
        pgd = evaluate_split(cfg, net, eval_batches(cfg, first, device), "test")
        return {"aa": aa["robust_acc"], "adv_aa_subset": pgd["robust_acc"], "aa_examples": len(first)}

    return run.dir.run(Stage(f"autoattack/{tag}", params, compute, inputs=("test",)))


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
    gains = _gains(per_seed)
    for col, value in gains.items():  # RiFT's gain over AT, with its interval, on the AT+RiFT row
        table.loc[table["method"] == "AT+RiFT", col] = value
    table = pd.concat([table, pd.DataFrame(paper_rows)], ignore_index=True) if paper_rows else table
    table.insert(0, "dataset", DATASETS.get(dataset, dataset))
    table.insert(0, "model", MODELS.get(model, model))
    table["ood_protocol"] = f"{corruptions} ({'published -C set' if published else 'on the fly'})"
    return table


def _gains(per_seed: pd.DataFrame) -> dict[str, Any]:
    """AT+RiFT - AT in points for Std and Adv with a 95% interval: the paired interval on the test images with one
    seed, the Student-t interval of the per-seed differences with several (``*_gain``, ``*_gain_low``, ``*_gain_high``)."""
    from ..evaluation.stats import over_seeds

    rift = per_seed[per_seed["method"] == "AT+RiFT"]
    out: dict[str, Any] = {}
    for metric, kind in (("std", "clean"), ("adv", "robust")):
        if len(rift) == 1:
            r = rift.iloc[0]
            out.update({f"{metric}_gain": r[f"{kind}_diff"], f"{metric}_gain_low": r[f"{kind}_diff_low"],
                        f"{metric}_gain_high": r[f"{kind}_diff_high"]})
        else:
            summary = over_seeds(list(rift[f"{kind}_diff"]), list(rift["seed"]))
            out.update({f"{metric}_gain": summary["mean"], f"{metric}_gain_low": summary["ci_low"], f"{metric}_gain_high": summary["ci_high"]})
    out["gain_interval"] = "paired, test images (1 seed)" if len(rift) == 1 else f"Student-t over {len(rift)} seeds"
    return out


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
    ours = table[(table["method"] == "AT+RiFT") & ~table["source"].str.startswith("paper")]
    if len(ours) and "std_gain" in ours:
        r = ours.iloc[0]
        lines.append(f"AT+RiFT - AT: Std {r['std_gain']:+.2f} [{r['std_gain_low']:+.2f}, {r['std_gain_high']:+.2f}], "
                     f"Adv {r['adv_gain']:+.2f} [{r['adv_gain_low']:+.2f}, {r['adv_gain_high']:+.2f}] points "
                     f"(95% interval: {r['gain_interval']})")
    lines.append(f"OOD: {table['ood_protocol'].iloc[0]}")
    if "aa" in table:
        for _, r in table[table["aa"].notna()].iterrows():
            lines.append(f"{r['method']}: AutoAttack {r['aa']:.2f} vs PGD {r['adv_aa_subset']:.2f} on the first "
                         f"{int(r['aa_examples'])} test images")
    return "\n".join(lines)
