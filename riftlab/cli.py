"""The ``riftlab`` command: each RiFT step alone, the whole pipeline, evaluation, and a CPU demo.

Every command works in a run directory (``--out``). The step commands run the pipeline's stages
(:mod:`riftlab.engine.pipeline`) one prefix at a time, so they chain, and ``rift`` goes on from
wherever they stopped::

    riftlab train-at --dataset cifar10 --out runs/c10
    riftlab mrc --out runs/c10
    riftlab finetune --out runs/c10
    riftlab interpolate --out runs/c10
    riftlab rift --dataset cifar10 --out runs/c10      # reuses the four stages above, then evaluates on test
    riftlab evaluate --checkpoint runs/c10/rift.pt --out runs/c10
    riftlab ablate --out runs/c10                      # the paper's ablations (Tables 3-4), after train-at and mrc

A stage that finished with the same settings is reused, an unfinished one continues with
``--resume``, and one made with other settings is refused, naming the setting (``--overwrite``
redoes it). Several GPUs: ``torchrun --nproc_per_node N -m riftlab rift ...`` (any command; see
:mod:`riftlab.distributed`). Rank 0 prints and writes; the other ranks are silent.

Every option is checked before any data is loaded, any model built or any stage started: the
settings against their rules (:data:`riftlab.engine.config.RULES`: counts and widths >= 1, rates
finite and > 0, a fine-tuning lr of 0 allowed as a control, pixel budgets in [0, 1]...), the
command's own options against :data:`OPTION_RULES`, and ``--out`` for a folder that can be created
and written. A refused value is one line naming the option, the value and what is allowed.

Exit codes: 0 done; 1 a training loss or its weights became NaN or infinite (one line: stage, epoch,
batch, what to change); 2 a bad option or a refusal of the run directory; 3 the GPU ran out of
memory; 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from . import __version__, distributed
from .checkpoint import checkpoint_problem
from .engine.config import PROFILES
from .engine.rules import Custom, Integer, Pattern, Rule, SettingError, Text
from .engine.runner import output_dir_problem
from .zoo import MissingDependencyError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingDependencyError)


# ----------------------------------------------------------------------------------------------
# Option groups: each is added to the commands that need it, under a heading in --help.


def epochs(text: str) -> tuple[int, ...]:
    """``8,11`` -> (8, 11)."""
    try:
        return tuple(int(e) for e in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 8,11, got {text!r}") from None


def sizes(text: str) -> tuple[int, int]:
    """``2000,500`` -> (2000, 500)."""
    try:
        train, test = (int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,TEST image counts such as 2000,500, got {text!r}") from None
    return train, test


def alphas(text: str) -> tuple[float, ...]:
    """``0,0.5,1`` -> (0.0, 0.5, 1.0)."""
    try:
        return tuple(float(a) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated interpolation weights such as 0,0.5,1, got {text!r}") from None


_VAL_SIZE_HELP = "training images held out for validation (default: the profile's or dataset's)"
_PROFILE_HELP = ("preset of all settings: paper (GPU), cpu (small, minutes), demo (synthetic, ~5 min on a 2-core CPU), "
                 "colab (CIFAR-10 from scratch on a Colab T4 in under an hour), book (Fashion-MNIST, the book's chapters 1-5), "
                 "study (the scale study's Fashion-MNIST runs)")


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--profile", choices=list(PROFILES), default=None, help=_PROFILE_HELP)
    g.add_argument("--dataset", help="dataset name (see `riftlab list`)")
    g.add_argument("--model", help="model name (see `riftlab list`)")
    g.add_argument("--width", type=int, help="first-stage channels (ResNet) or widen factor (WRN)")
    g.add_argument("--data-root", help="folder with the dataset files")
    g.add_argument("--download", action="store_true", default=None, help="download missing dataset files (needs internet)")
    g.add_argument("--seed", type=int, help="seed of the weights, the data order and the attacks (default 0)")
    g.add_argument("--train-subset", type=int, help="use this many training images")
    g.add_argument("--val-subset", type=int, help="use this many validation images")
    g.add_argument("--test-subset", type=int, help="use this many test images")
    g.add_argument("--synthetic-sizes", type=sizes, dest="synthetic_sizes", metavar="TRAIN,TEST",
                   help="images a synthetic-* set generates, validation included (default: the real dataset's, "
                        "50000,10000 for 32x32: about 10 s on one core); ignored for real datasets")
    g.add_argument("--val-size", type=int, help=_VAL_SIZE_HELP)


def _run_options(p: argparse.ArgumentParser, out: str = "runs/riftlab") -> None:
    g = p.add_argument_group("run directory and compute")
    g.add_argument("--out", default=out, help="run directory (default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue an unfinished stage in --out (same settings)")
    g.add_argument("--overwrite", action="store_true", help="redo this command's stages in --out, removing their files first")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 autocast on GPUs with native bf16 (A100, H100), fp16 with loss scaling on older "
                        "ones (T4, V100), fp32 on the CPU; or one of fp32, bf16, fp16 everywhere")
    g.add_argument("--compile", action="store_true", default=None, help="train through torch.compile (slow first batches)")
    g.add_argument("--cuda-graphs", action="store_true", default=None,
                   help="on CUDA, run each training batch step, attack and MRC pass as one CUDA graph replay (the same steps)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")


def _attack_options(p: argparse.ArgumentParser, restarts_help: str = "random restarts of the test evaluation, worst case per image (default 3)"
                    ) -> None:
    g = p.add_argument_group("attacks and evaluation")
    g.add_argument("--eps", type=float, help="l_inf budget in pixel units (default: the dataset's, 8/255 for CIFAR)")
    g.add_argument("--step", type=float, help="PGD step in pixel units (default: the dataset's, 2/255 for CIFAR)")
    g.add_argument("--eval-steps", "--steps", type=int, dest="eval_steps", metavar="N", help="PGD steps of every evaluation (default 10)")
    g.add_argument("--eval-restarts", "--restarts", type=int, dest="eval_restarts", metavar="N", help=restarts_help)
    g.add_argument("--val-restarts", type=int, metavar="N", help="random restarts on validation (the interpolation curve; default 1)")
    g.add_argument("--batch-size", type=int, help="training batch size (default 128)")
    g.add_argument("--eval-batch-size", type=int, metavar="N",
                   help="images per batch of every attack and evaluation (default 512; halve it on out-of-memory)")
    g.add_argument("--auto-eval-batch-size", action="store_true", default=None,
                   help="on CUDA, size the evaluation batches from free GPU memory instead (a power of two from 64 to 4096 whose "
                        "attack fits half of it, measured once; the run records the size); elsewhere --eval-batch-size stays")
    g.add_argument("--fold-bn", action="store_true", default=None,
                   help="evaluate on a copy with each BatchNorm folded into the convolution before it: the same network up to "
                        "floating-point rounding, fewer kernels per attack step (off by default: the unfolded model is the reference)")


def _at_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Adversarial training's settings: ``--epochs ...`` on train-at, ``--at-epochs ...`` on rift."""
    g = p.add_argument_group("adversarial training")
    g.add_argument(f"--{prefix}epochs", type=int, dest="at_epochs", help="epochs (default 110)")
    g.add_argument(f"--{prefix}lr", type=float, dest="at_lr", help="learning rate (default 0.1)")
    g.add_argument(f"--{prefix}milestones", type=epochs, dest="at_milestones", metavar="E1,E2",
                   help="epochs after which the lr drops x0.1 (default: the paper's 100,105 of 110, scaled to the epochs)")
    g.add_argument(f"--{prefix}warmup-epochs", type=int, dest="at_warmup_epochs", metavar="W",
                   help="ramp the lr linearly over the first W epochs (default 0; the throughput profile's batch 512 uses 5)")
    g.add_argument(f"--{prefix}attack-steps", type=int, dest="at_attack_steps", metavar="N",
                   help="PGD steps of the training attack (default 10; 0: standard training; 1 with a large step is 'fast AT')")
    g.add_argument(f"--{prefix}attack-step", type=float, dest="at_attack_step", metavar="STEP",
                   help="step of the training attack in pixel units (default: --step)")
    g.add_argument(f"--{prefix}eval-every", type=int, dest="at_eval_every", metavar="K",
                   help="validate every K-th epoch and the last; the best checkpoint is chosen among those (default 1)")
    g.add_argument("--method", dest="at_method", metavar="METHOD", help="objective: pgd (PGD-AT, default), trades or mart")
    g.add_argument("--beta", type=float, dest="at_beta", help="TRADES / MART robustness weight (default 6)")


def _mrc_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("module robust criticality")
    g.add_argument("--mrc-examples", "--examples", type=int, dest="mrc_examples", metavar="N",
                   help="training images in MRC's adversarial set (default 10000)")
    g.add_argument("--mrc-passes", "--passes", type=int, dest="mrc_passes", metavar="N",
                   help="gradient-ascent passes over that set (default 10)")
    g.add_argument("--mrc-eps", type=float, help="weight-perturbation radius, relative to the weight's norm (default 0.1)")


def _ft_options(p: argparse.ArgumentParser, prefix: str = "", module: bool = True) -> None:
    """Fine-tuning's settings: ``--epochs ...`` on finetune and ablate, ``--ft-epochs ...`` on rift."""
    g = p.add_argument_group("fine-tuning")
    if module:
        g.add_argument("--module", dest="ft_module", help="exact module name (default: the least robust-critical one)")
    g.add_argument(f"--{prefix}epochs", type=int, dest="ft_epochs", help="epochs (default 10; the lr drops x0.1 halfway)")
    g.add_argument(f"--{prefix}lr", type=float, dest="ft_lr", help="learning rate >= 0 (default 0.001; 0 leaves the weight as it is, a control)")
    g.add_argument("--update-bn-stats", action="store_true", default=None,
                   help="let every BatchNorm's statistics drift during fine-tuning (the reference code's behaviour)")
    g.add_argument("--protocol", dest="ft_protocol", choices=["riftlab", "reference"],
                   help="riftlab (default: frozen BatchNorm, zero-padded crops) or reference: fine-tune as the reference code does "
                        "(train-mode BatchNorm, reflect-padded crops, alpha on the 0.1 grid), still choosing on validation, and "
                        "also report what choosing on test would give")
    g.add_argument("--bn-recalibration-only", action="store_true", default=None,
                   help="the control: the same schedule in train mode with no weight trained, so only BatchNorm's running "
                        "statistics move (needs --update-bn-stats or --protocol reference)")
    g.add_argument("--report-test-selection", action=argparse.BooleanOptionalAction, default=None,
                   help="also report what choosing the fine-tuning epoch and alpha on test (the reference code's way) would give, "
                        "and what that choice gives when there is no effect (about 10 more attacked passes over the test split); "
                        "--protocol reference turns it on, --no-report-test-selection off")


def _interpolation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interpolation")
    g.add_argument("--alphas", type=alphas, help="interpolation weights, comma-separated, including 0 (default 0,0.1,...,1)")
    g.add_argument("--threshold", type=float, help="allowed validation robust-accuracy drop in points, >= 0 (default 0.1)")


def _robustbench_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RobustBench starting point (pip install 'riftlab[robustbench]')")
    g.add_argument("--robustbench", metavar="NAME", help="start from this RobustBench model (e.g. Sehwag2021Proxy_R18) "
                   "instead of an AT checkpoint; its dataset is --dataset's")
    g.add_argument("--threat-model", dest="threat_model", choices=["Linf", "L2", "corruptions"], help="RobustBench threat model (default Linf)")
    g.add_argument("--model-dir", dest="model_dir", metavar="PATH",
                   help="RobustBench's model folder, read as PATH/<dataset>/<threat model>/<NAME>.pt (default: models)")


def _step_command(p: argparse.ArgumentParser, robustbench: bool = True) -> None:
    _data_options(p)
    _run_options(p)
    _attack_options(p)
    if robustbench:
        _robustbench_options(p)


# ----------------------------------------------------------------------------------------------
# From options to settings


# Options that are not RiftConfig fields (each command reads them itself).
_NOT_CONFIG = {"command", "profile", "out", "checkpoint", "at", "ft", "split", "at_checkpoint", "overwrite", "resume", "variants", "k",
               "ablation_name", "model_a", "model_b", "autoattack", "sanity", "sanity_examples", "ood", "ood_dir", "ood_corruptions",
               "ood_severities", "table", "seeds", "ood_examples"}


def config_from_args(args: argparse.Namespace, meta: dict[str, Any] | None = None):
    """RiftConfig from defaults < profile < checkpoint metadata < fine-tuning protocol < explicit command-line options."""
    from .engine.config import RiftConfig, protocol_settings

    values: dict[str, Any] = dict(PROFILES[args.profile]) if getattr(args, "profile", None) else {}
    for key in ("dataset", "model", "width", "at_method", "at_beta", "robustbench", "threat_model", "model_dir"):
        if meta and meta.get(key) is not None:
            values[key] = meta[key]
    if getattr(args, "ft_protocol", None):  # the protocol's settings over the profile's (an explicit option that contradicts it is refused)
        values.update(protocol_settings(args.ft_protocol))
    fields = {f.name for f in dataclasses.fields(RiftConfig)}
    for key, value in vars(args).items():
        if key in _NOT_CONFIG or value is None:
            continue
        if key not in fields:
            raise KeyError(f"internal: option {key} has no configuration field")
        values[key] = value
    from .engine.pipeline import resolve_eval_batch_size

    return resolve_eval_batch_size(RiftConfig(**values).resolved())


def _variants(text: str) -> list[str]:
    """``--variants at,least`` -> ["at", "least"], each checked (:func:`riftlab.engine.ablation.check_variants`)."""
    from .engine.ablation import check_variants

    return check_variants([v.strip() for v in text.split(",") if v.strip()])


def _corruptions(text: str) -> None:
    from .evaluation.corruptions import resolve_corruptions

    resolve_corruptions(text)


def _severities(text: str) -> None:
    from .evaluation.ood import parse_severities

    parse_severities(text)


_CHECKPOINT = Custom(test=checkpoint_problem, optional=True, words="a PyTorch checkpoint file")

# The commands' own options (not RiftConfig fields, whose rules are RULES): a Rule, or a function that raises a
# ValueError with its own one-line message. Options argparse checks itself (choices, flags) need none.
OPTION_RULES: dict[str, Rule | Callable[[Any], Any]] = {
    "out": Custom(test=output_dir_problem, words="a folder riftlab can create and write"),
    "checkpoint": _CHECKPOINT,
    "at": _CHECKPOINT,
    "ft": _CHECKPOINT,
    "at_checkpoint": _CHECKPOINT,
    "model_a": _CHECKPOINT,
    "model_b": _CHECKPOINT,
    "autoattack": Integer(low=1, optional=True, note="images"),
    "sanity_examples": Integer(low=1, note="images"),
    "ood_examples": Integer(low=1, optional=True, note="images"),
    "k": Integer(low=1, note="modules"),
    "ablation_name": Pattern(regex=r"[A-Za-z0-9][A-Za-z0-9_.-]*", words="a plain folder name (letters, digits, '_', '.', '-')"),
    "variants": _variants,
    "seeds": Pattern(regex=r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", words="comma-separated seeds >= 0 such as 0,1,2"),
    "ood_dir": Text(optional=True),
    "ood_corruptions": _corruptions,
    "ood_severities": _severities,
}
# Commands without RiftConfig settings (download's positional dataset may be a -C set's name).
_NO_SETTINGS = {"download", "list"}


def check_options(args: argparse.Namespace) -> None:
    """Every option given to ``args.command`` against its rule, in one pass, before anything is read, loaded or
    written: RiftConfig's settings (:data:`riftlab.engine.config.RULES`) and the command's own (:data:`OPTION_RULES`).
    Raises :class:`~riftlab.engine.rules.SettingError` (or the check's ValueError) for the first bad value. Settings
    that depend on each other or on a checkpoint's metadata are checked when the configuration is built, still before
    any data."""
    from .engine.config import RULES

    if args.command in _NO_SETTINGS:
        return
    for dest, value in vars(args).items():
        rule = OPTION_RULES.get(dest, RULES.get(dest))
        if value is None or rule is None:
            continue
        if isinstance(rule, Rule):
            rule.check(dest, value)
        else:
            rule(value)


def _meta_of(path: str | Path) -> dict[str, Any]:
    from .checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    return dict(obj.get("meta", {})) if isinstance(obj, dict) else {}


def _existing(path: str | None, out: Path, default: str, how: str) -> Path:
    p = Path(path) if path else out / default
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; {how}")
    return p


def _at_source(args: argparse.Namespace, out: Path):
    """Where a step command's AT model comes from: --checkpoint, --robustbench, or the run's own ``at`` stage."""
    from .engine.pipeline import AtSource

    path = getattr(args, "checkpoint", None) or getattr(args, "at", None)
    if path:
        return AtSource("checkpoint", str(path)), _meta_of(_existing(path, out, "", "pass the AT model's file"))
    if getattr(args, "robustbench", None):
        return AtSource("robustbench"), None
    at = _existing(None, out, "at.pt", "pass --checkpoint or run `riftlab train-at` first")
    return AtSource("existing"), _meta_of(at)


def _run(args: argparse.Namespace, cfg, at, **kwargs):
    from .engine.pipeline import RiftRun

    return RiftRun(cfg, args.out, at=at, resume=args.resume, overwrite=args.overwrite, **kwargs)


# ----------------------------------------------------------------------------------------------
# The commands


def cmd_train_at(args: argparse.Namespace) -> int:
    from .engine.pipeline import AtSource

    run = _run(args, config_from_args(args), AtSource("train"))
    summary = run.run("at")["at"]
    print(f"best epoch {summary['best_epoch']}: {summary['best']}\nwrote {run.out / 'at.pt'}")
    return 0


def cmd_mrc(args: argparse.Namespace) -> int:
    import pandas as pd

    at, meta = _at_source(args, Path(args.out))
    run = _run(args, config_from_args(args, meta), at)
    run.run("mrc")
    table = pd.read_csv(run.out / "mrc.csv")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {run.out / 'mrc.csv'}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    at, meta = _at_source(args, Path(args.out))
    cfg = config_from_args(args, meta)
    run = _run(args, cfg, at, module=cfg.ft_module, adopt=("mrc",))
    summary = run.run("finetune")["finetune"]
    print(f"fine-tuned {summary['module']}; best epoch {summary['best_epoch']}\nwrote {run.out / 'ft.pt'}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    import pandas as pd

    out = Path(args.out)
    ft = str(_existing(args.ft, out, "", "pass the fine-tuned model's file")) if args.ft else "existing"
    if ft == "existing":
        _existing(None, out, "ft.pt", "pass --ft or run `riftlab finetune` first")
    at, meta = _at_source(args, out)
    run = _run(args, config_from_args(args, meta), at, ft_from=ft)
    choice = run.run("interpolate")["interpolate"]["choice"]
    print(pd.read_csv(run.out / "interpolation.csv").to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"chosen alpha {choice['alpha']} (validation clean {choice['clean_gain']:+.2f}, robust {choice['robust_change']:+.2f} points)")
    print(f"wrote {run.out / 'rift.pt'}")
    return 0


def cmd_rift(args: argparse.Namespace) -> int:
    from .engine.pipeline import AtSource

    if args.at_checkpoint:
        at, meta = AtSource("checkpoint", args.at_checkpoint), _meta_of(_existing(args.at_checkpoint, Path(args.out), "", "pass the AT model's file"))
    else:
        at, meta = (AtSource("robustbench") if args.robustbench else AtSource("train")), None
    cfg = config_from_args(args, meta)
    run = _run(args, cfg, at, module=cfg.ft_module)
    run.run("test")
    print(f"results in {run.out / 'results.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.config import RiftConfig
    from .engine.pipeline import AtSource

    cfg = RiftConfig(**{**PROFILES["demo"], "device": args.device, "seed": args.seed, "progress": args.progress})
    run = _run(args, cfg, AtSource("train"))
    run.run("test")
    print(f"results in {run.out / 'results.json'}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    import pandas as pd

    from .engine.ablation import ablate, ablation_table, variant_modules
    from .engine.pipeline import eval_batches, finetune_batches, prepare
    from .engine.runner import write_csv

    variants = _variants(args.variants)  # --name and --variants were checked with every other option (check_options)
    out = Path(args.out)
    path = _existing(args.checkpoint, out, "at.pt", "pass --checkpoint or run `riftlab train-at` first")
    mrc = pd.read_csv(_existing(None, out, "mrc.csv", "run `riftlab mrc` first"))
    cfg = config_from_args(args, _meta_of(path))
    splits, device = prepare(cfg)
    model = _load_model(cfg, splits, path, device)
    for variant in variants:  # a bad --k or --module, or a foreign MRC table, is the error to report, before any work
        variant_modules(model, mrc, variant, args.k, cfg.ft_module)
    table = ablate(model, mrc, finetune_batches(cfg, splits, device), eval_batches(cfg, splits.val, device),
                   eval_batches(cfg, splits.test, device), cfg, variants, k=args.k, out_dir=out, name=args.ablation_name,
                   resume=args.resume, overwrite=args.overwrite)
    write_csv(out / f"{args.ablation_name}.csv", table)
    print(ablation_table(table))
    print(f"wrote {out / (args.ablation_name + '.csv')}")
    return 0


def _load_model(cfg, splits, path: str | Path, device):
    from .checkpoint import load_checkpoint
    from .compute import to_device
    from .engine.pipeline import build_for

    model = build_for(cfg, splits)
    load_checkpoint(model, path)
    return to_device(model, device).eval()


def _model_source(args: argparse.Namespace, cfg) -> tuple[str, str, Callable[[Any, Any], Any]]:
    """The evaluated model: (name for file names, digest for the stage's fingerprint, loader(splits, device))."""
    from .compute import to_device
    from .engine.runner import file_digest

    if args.checkpoint:
        path = Path(args.checkpoint)
        return path.stem, file_digest(path), lambda splits, device: _load_model(cfg, splits, path, device)

    def robustbench(splits, device):
        from .zoo import load_robustbench_model, robustbench_dataset

        return to_device(load_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model, cfg.model_dir), device)

    return cfg.robustbench, f"robustbench:{cfg.robustbench}:{cfg.threat_model}", robustbench


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine.config import attack_seed, data_params, precision_params
    from .engine.pipeline import fold_params, prepare
    from .engine.runner import RunDir, Stage, write_json

    if not args.checkpoint and not args.robustbench:
        raise ValueError("pass --checkpoint PATH, or --robustbench NAME to evaluate a RobustBench model")
    cfg = config_from_args(args, _meta_of(args.checkpoint) if args.checkpoint else None)
    name, digest, load = _model_source(args, cfg)
    ood = args.ood or bool(args.ood_dir)
    if ood:  # check the OOD options before the (long) robust evaluation
        from .evaluation.corruptions import resolve_corruptions
        from .evaluation.ood import check_corrupted_dir, parse_severities

        _, names = resolve_corruptions(args.ood_corruptions)
        levels = parse_severities(args.ood_severities)
        if args.ood_dir:
            if args.split != "test":
                raise ValueError("--ood-dir holds corrupted *test* images; use --split test, or --ood without --ood-dir")
            check_corrupted_dir(args.ood_dir, names, levels, cfg.dataset)
    loaded: dict[str, Any] = {}

    def data() -> tuple[Any, Any, Any]:
        """Splits, device and model, loaded once and only when a stage has work to do."""
        if not loaded:
            loaded["splits"], loaded["device"] = prepare(cfg)
            loaded["model"] = load(loaded["splits"], loaded["device"])
        return loaded["splits"], loaded["device"], loaded["model"]

    # The model's own digest is in both fingerprints: results of another model are never reused or resumed.
    common = {"model": digest, "split": args.split, **data_params(cfg), **precision_params(cfg, _device_type(cfg))}
    params = {**common, "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps, "eval_restarts": cfg.eval_restarts,
              "seed": attack_seed(cfg, args.split), "eval_batch_size": cfg.eval_batch_size, "autoattack": args.autoattack,
              "sanity": args.sanity, "sanity_examples": args.sanity_examples if args.sanity else None, **fold_params(cfg)}
    evaluation = Stage(f"evaluate/{name}-{args.split}", params, lambda ctx: _evaluate(ctx, args, cfg, *data()))
    ood_stage = Stage(f"ood/{name}-{args.split}", {**common, "corruptions": args.ood_corruptions, "severities": args.ood_severities,
                                                   "source": str(args.ood_dir) if args.ood_dir else "on-the-fly", "seed": cfg.seed,
                                                   "batch_size": cfg.eval_batch_size},
                      lambda ctx: _ood(ctx, args, cfg, *data()), outputs=(f"ood-{name}-{args.split}.csv",))
    run = RunDir(Path(args.out), resume=args.resume, overwrite=args.overwrite, log=print, batch_save_interval=2.0)
    run.check(evaluation)  # refusals before the data load
    if ood:
        run.check(ood_stage)
    result = run.run(evaluation)
    if ood:
        result.update(run.run(ood_stage))
    # The report: the stages' results together (written after them, like run_rift's results.json).
    write_json(run.path / f"evaluate-{name}-{args.split}.json", result)
    print(json.dumps(result, indent=2))
    for line in result.get("warnings", []):
        print(line, file=sys.stderr)
    return 0


def _device_type(cfg) -> str:
    from .compute import resolve_device

    return resolve_device(cfg.device).type


def _evaluate(ctx, args: argparse.Namespace, cfg, splits, device, model) -> dict[str, Any]:
    """``riftlab evaluate``'s stage: PGD on the split (the pipeline's seed), AutoAttack and the sanity checks if asked."""
    from .engine.pipeline import eval_batches, evaluate_split, without_masks

    images = getattr(splits, args.split)
    source = str(args.checkpoint) if args.checkpoint else f"robustbench:{cfg.robustbench} ({cfg.threat_model})"
    result = {"checkpoint": source, "split": args.split,
              **without_masks(evaluate_split(cfg, model, eval_batches(cfg, images, device), args.split, state=ctx.state.child("pgd")))}
    name = Path(args.checkpoint).stem if args.checkpoint else cfg.robustbench
    result["warnings"] = _masking_checks(model, images, cfg, device, args, ctx.path(f"autoattack-{name}-{args.split}.log"), result)
    return result


def _ood(ctx, args: argparse.Namespace, cfg, splits, device, model) -> dict[str, Any]:
    from .data import _resolve_root
    from .evaluation.ood import ood_accuracy

    info = splits.info
    # With --ood-dir, --test-subset picks the same images as load_dataset's test subset (seed 3), as -C keeps the test order.
    shifted = ood_accuracy(model, None if args.ood_dir else getattr(splits, args.split), args.ood_corruptions, args.ood_severities,
                           c_dir=args.ood_dir, dataset=info.name if args.ood_dir else None,
                           wnids=_resolve_root(info, cfg.data_root) if args.ood_dir and info.name == "tinyimagenet" else None,
                           image_shape=(info.channels, info.image_size, info.image_size),
                           max_examples=cfg.test_subset if args.ood_dir else None, subset_seed=3, batch_size=cfg.eval_batch_size,
                           seed=cfg.seed, progress=cfg.progress, state=ctx.state)
    ctx.write_csv(ctx.stage.outputs[0], shifted.table)
    return {"ood_acc": shifted.mean, "ood": shifted.summary()}


def _masking_checks(model, images, cfg, device, args: argparse.Namespace, log_path: Path, result: dict[str, Any]) -> list[str]:
    """``evaluate --autoattack N`` and ``--sanity``: add their results to ``result``; return the WARNING lines.

    AutoAttack and PGD (the evaluation's settings) attack the same first N images of the split;
    the sanity checks attack the first ``--sanity-examples`` images.
    """
    from .data import ImageSet
    from .engine.config import attack_seed
    from .engine.pipeline import eval_batches, evaluate_split

    warnings: list[str] = []
    if args.autoattack:
        from .evaluation.autoattack import autoattack_accuracy

        first = ImageSet(images.images[:args.autoattack], images.labels[:args.autoattack])
        x, y = first.float().to(device), first.labels.to(device)
        if cfg.progress:
            print(f"standard AutoAttack on {len(first)} images (eps {cfg.eps:.4f}); progress in {log_path}", file=sys.stderr)
        aa = autoattack_accuracy(model, x, y, cfg.eps, version="standard", seed=cfg.seed, log_path=log_path, batch_size=cfg.eval_batch_size)
        pgd_same = evaluate_split(cfg, model, eval_batches(cfg, first, device), args.split, restarts=cfg.eval_restarts)
        result["autoattack"] = {**aa, "pgd_robust_acc": pgd_same["robust_acc"], "pgd_steps": cfg.eval_steps,
                                "pgd_restarts": cfg.eval_restarts, "log": str(log_path)}
        warnings += [f"WARNING: AutoAttack's own check: {message}" for message in aa["warnings"]]
    if args.sanity:
        from .evaluation.sanity import gradient_masking_checks, is_flagged, warning_lines

        first = ImageSet(images.images[:args.sanity_examples], images.labels[:args.sanity_examples])
        checks = gradient_masking_checks(model, eval_batches(cfg, first, device), cfg.eps, cfg.step, cfg.eval_steps,
                                         restarts=max(2, cfg.eval_restarts), autoattack=result.get("autoattack"),
                                         seed=attack_seed(cfg, args.split))
        result["sanity"] = [c.to_dict() for c in checks]
        result["sanity_examples"] = len(first)
        result["flagged"] = is_flagged(checks)
        warnings += warning_lines(checks)
    return warnings


def cmd_compare(args: argparse.Namespace) -> int:
    """A and B on the same images and random starts (the pipeline's seed for the split)."""
    from .data import ImageSet
    from .engine.config import attack_seed, data_params, precision_params
    from .engine.pipeline import compare_split, eval_batches, fold_params, prepare, without_masks
    from .engine.runner import RunDir, Stage, file_digest
    from .evaluation.stats import format_difference, paired_difference

    out = Path(args.out)
    a_path = _existing(args.model_a, out, "at.pt", "pass --a PATH (the reference model)")
    b_path = _existing(args.model_b, out, "rift.pt", "pass --b PATH (the model compared with it)")
    cfg = config_from_args(args, _meta_of(a_path))
    seed = attack_seed(cfg, args.split)
    name = f"compare-{a_path.stem}-{b_path.stem}-{args.split}.json"
    params = {"a": file_digest(a_path), "b": file_digest(b_path), "split": args.split, **data_params(cfg),
              **precision_params(cfg, _device_type(cfg)), "eps": cfg.eps, "step": cfg.step, "eval_steps": cfg.eval_steps,
              "eval_restarts": cfg.eval_restarts, "seed": seed, "eval_batch_size": cfg.eval_batch_size, "autoattack": args.autoattack,
              **fold_params(cfg)}

    def compute(ctx) -> dict[str, Any]:
        splits, device = prepare(cfg)
        model_a, model_b = _load_model(cfg, splits, a_path, device), _load_model(cfg, splits, b_path, device)
        images = getattr(splits, args.split)
        result = compare_split(cfg, model_a, model_b, eval_batches(cfg, images, device), args.split, state=ctx.state.child("pgd"))
        report: dict[str, Any] = {"a": str(a_path), "b": str(b_path), "split": args.split, "seed": seed,
                                  "a_result": without_masks(result["a"]), "b_result": without_masks(result["b"]),
                                  "clean": result["clean"], "robust": result["robust"]}
        if args.autoattack:
            from .evaluation.autoattack import autoattack_accuracy

            first = ImageSet(images.images[:args.autoattack], images.labels[:args.autoattack])
            x, y = first.float().to(device), first.labels.to(device)
            import torch

            same = all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
            runs = {}
            for tag, model, path in (("a", model_a, a_path), ("b", model_b, b_path)):
                if tag == "b" and same:  # the same weights (RiFT chose alpha 0): the same seeded attack gives the same result
                    runs["b"] = dict(runs["a"], identical_to_a=True)
                    continue
                runs[tag] = autoattack_accuracy(model, x, y, cfg.eps, seed=cfg.seed, batch_size=cfg.eval_batch_size, per_image=True,
                                                log_path=ctx.path(f"autoattack-{Path(path).stem}-{args.split}.log"))
            # PGD on the same first N images, from the masks above (same starts): AutoAttack's gap to it is the masking check
            pgd_same = paired_difference(result["a"]["robust_correct"][:len(first)], result["b"]["robust_correct"][:len(first)])
            report["autoattack"] = {"n": len(first), "a": without_masks(runs["a"]), "b": without_masks(runs["b"]),
                                    "robust": paired_difference(runs["a"]["robust_correct"], runs["b"]["robust_correct"]),
                                    "pgd_robust_acc": {"a": pgd_same["acc_a"], "b": pgd_same["acc_b"]}}
        ctx.write_json(name, report)
        return report

    run = RunDir(out, resume=args.resume, overwrite=args.overwrite, log=print, batch_save_interval=2.0)
    report = run.run(Stage(f"compare/{a_path.stem}-{b_path.stem}-{args.split}", params, compute, outputs=(name,)))
    a, b = report["a_result"], report["b_result"]
    print(f"{'':8s} {'clean':>8s} {'robust':>8s}   ({args.split}, {a['n']} images, PGD-{cfg.eval_steps}, "
          f"worst of {cfg.eval_restarts}, attack seed {seed})")
    for tag, res, path in (("A", a, a_path), ("B", b, b_path)):
        print(f"{tag}: {res['clean_acc']:8.2f} {res['robust_acc']:8.2f}   {path}")
    for kind in ("clean", "robust"):
        print(f"B - A, {kind}: {format_difference(report[kind])} points (95% paired interval; images +gained/-lost)")
    if args.autoattack:
        aa = report["autoattack"]
        pgd_same = aa.get("pgd_robust_acc")  # absent from a report an earlier riftlab wrote
        beside = f" (PGD-{cfg.eval_steps} on them: A {pgd_same['a']:.2f}, B {pgd_same['b']:.2f})" if pgd_same else ""
        print(f"AutoAttack (standard) on the first {aa['n']} images: A {aa['a']['robust_acc']:.2f}, B {aa['b']['robust_acc']:.2f}; "
              f"B - A {format_difference(aa['robust'])}{beside}")
    print(f"wrote {out / name}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .engine.reproduce import format_table1, reproduce_table1

    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]  # their form was checked with every other option
    overrides = {k: v for k, v in (("width", args.width), ("at_epochs", args.at_epochs), ("val_size", args.val_size),
                                   ("data_root", args.data_root), ("download", args.download), ("device", args.device),
                                   ("progress", args.progress), ("eval_batch_size", args.eval_batch_size)) if v is not None}
    table = reproduce_table1(args.model, args.dataset, args.out, profile=args.profile, seeds=seeds, c_dir=args.ood_dir,
                             ood_examples=args.ood_examples, autoattack_examples=args.autoattack, resume=args.resume,
                             overwrite=args.overwrite, **overrides)
    print(format_table1(table))
    print(f"wrote {Path(args.out) / 'table1.csv'}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .data import download_dataset

    if args.dataset.endswith("-c"):
        from .evaluation.ood import download_corrupted

        folder = download_corrupted(args.dataset[:-2], args.data_root)
    else:
        folder = download_dataset(args.dataset, args.data_root)
    print(f"downloaded {args.dataset} into {folder}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .data import list_datasets
    from .models import list_models

    print("models:   " + ", ".join(list_models()))
    print("datasets: " + ", ".join(list_datasets()))
    print("profiles: " + ", ".join(PROFILES))
    return 0


# ----------------------------------------------------------------------------------------------
# The parser: one entry per command


def _train_at_parser(p):
    _step_command(p, robustbench=False)
    _at_options(p)


def _mrc_parser(p):
    _step_command(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt)")
    _mrc_options(p)


def _finetune_parser(p):
    _step_command(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt)")
    _ft_options(p)


def _interpolate_parser(p):
    _step_command(p)
    p.add_argument("--at", help="AT model (default: OUT/at.pt)")
    p.add_argument("--ft", help="fine-tuned model (default: OUT/ft.pt)")
    _interpolation_options(p)


def _ablate_parser(p):
    _step_command(p, robustbench=False)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt); the MRC table is OUT/mrc.csv")
    g = p.add_argument_group("ablation")
    g.add_argument("--variants", default="at,all,last,most,topk,least,no-interp", help="comma-separated variants (default: %(default)s)")
    g.add_argument("--k", type=int, default=3, help="how many least critical modules the topk variant fine-tunes (default 3)")
    g.add_argument("--name", dest="ablation_name", default="ablation", metavar="NAME",
                   help="work folder OUT/NAME and table OUT/NAME.csv (default: %(default)s), so ablations with other settings sit side by side")
    g.add_argument("--module", dest="ft_module", metavar="NAME",
                   help="the exact module the 'module' variant fine-tunes (e.g. the paper's ResNet-18 choice layer2.1.conv2)")
    _ft_options(p, module=False)
    _interpolation_options(p)


def _evaluate_parser(p):
    _step_command(p)
    p.add_argument("--checkpoint", help="the model to evaluate (or --robustbench NAME)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    g = p.add_argument_group("stronger attacks and checks")
    g.add_argument("--autoattack", type=int, metavar="N", help="also run standard AutoAttack (pyautoattack) on the first N images "
                   "of the split and report it next to PGD on the same images; its log goes to OUT/autoattack-<stem>-<split>.log")
    g.add_argument("--sanity", action="store_true", help="run the gradient-masking checks (riftlab.sanity); a failed check prints "
                   "a WARNING line and sets \"flagged\" in the JSON")
    g.add_argument("--sanity-examples", type=int, default=1000, metavar="N",
                   help="images of the split (the first N) the sanity checks attack (default: %(default)s)")
    g = p.add_argument_group("out-of-distribution")
    g.add_argument("--ood", action="store_true", help="also measure accuracy under common corruptions of the split, made on the fly; "
                   "writes ood-<checkpoint stem>-<split>.csv and the mean into the JSON")
    g.add_argument("--ood-dir", metavar="PATH", help="use a published corrupted test set (CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C folder) "
                   "instead of on-the-fly corruptions; implies --ood")
    g.add_argument("--corruptions", dest="ood_corruptions", default="standard", metavar="LIST",
                   help="standard (the 15, default), reference (the reference code's 18), all, or comma-separated names")
    g.add_argument("--severities", dest="ood_severities", default="1,2,3,4,5", metavar="LIST",
                   help="comma-separated severities to average (default 1,2,3,4,5; the reference uses 1 on Tiny-ImageNet-C)")


def _compare_parser(p):
    _step_command(p, robustbench=False)
    p.add_argument("--a", dest="model_a", metavar="PATH", help="model A, the reference (default: OUT/at.pt)")
    p.add_argument("--b", dest="model_b", metavar="PATH", help="model B (default: OUT/rift.pt)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--autoattack", type=int, metavar="N", help="also standard AutoAttack on the first N images of the split, "
                   "both models, compared image by image")


def _rift_parser(p):
    _step_command(p)
    p.add_argument("--at-checkpoint", help="start from this AT model instead of training one")
    _at_options(p, prefix="at-")
    _mrc_options(p)
    _ft_options(p, prefix="ft-")
    _interpolation_options(p)


def _demo_parser(p):
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.add_argument("--overwrite", action="store_true", help="redo every stage, removing riftlab's files in --out first")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out (same settings)")


def _reproduce_parser(p):
    p.add_argument("--table", type=int, choices=[1], default=1, help="the paper's table (Table 1: Std / OOD / Adv, AT vs AT+RiFT)")
    p.add_argument("--model", default="resnet18", help="model name (see `riftlab list`)")
    p.add_argument("--dataset", default="cifar10", help="dataset name (see `riftlab list`)")
    p.add_argument("--profile", choices=list(PROFILES), default=None,
                   help="settings preset (default: paper for cifar10/cifar100/tinyimagenet, cpu otherwise)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the table gives mean and std (the paper: 3 seeds)")
    p.add_argument("--width", type=int)
    p.add_argument("--at-epochs", type=int)
    p.add_argument("--val-size", type=int, help=_VAL_SIZE_HELP)
    p.add_argument("--data-root")
    p.add_argument("--download", action="store_true", default=None)
    p.add_argument("--device")
    p.add_argument("--eval-batch-size", type=int, metavar="N", help="images per batch of every attack and evaluation")
    p.add_argument("--ood-dir", help="published -C folder (CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C); default: corruptions made on the fly")
    p.add_argument("--ood-examples", type=int, help="OOD on a random subset of this many test images")
    p.add_argument("--autoattack", type=int, metavar="N", help="also standard AutoAttack on the first N test images (beside PGD on them)")
    p.add_argument("--out", default="runs/table1", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--resume", action="store_true", help="continue an unfinished reproduction in --out")
    p.add_argument("--overwrite", action="store_true", help="redo every stage, removing riftlab's files in --out first")


def _download_parser(p):
    p.add_argument("dataset", help="a dataset name, or cifar10-c, cifar100-c, tinyimagenet-c for the published corruption sets")
    p.add_argument("--data-root")


@dataclass(frozen=True)
class Command:
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "train-at": Command("adversarial training (PGD-AT, TRADES or MART); writes at.pt", _train_at_parser, cmd_train_at),
    "mrc": Command("module robust criticality of every Conv2d/Linear; writes mrc.csv", _mrc_parser, cmd_mrc),
    "finetune": Command("fine-tune one module's weight on clean data; writes ft.pt", _finetune_parser, cmd_finetune),
    "interpolate": Command("interpolate AT and fine-tuned weights, choose alpha on validation; writes rift.pt", _interpolate_parser,
                           cmd_interpolate),
    "ablate": Command("fine-tune other choices of weights (all, last, most, top-k, least, least 3x3, no interpolation); "
                      "writes ablation.csv", _ablate_parser, cmd_ablate),
    "evaluate": Command("clean and PGD robust accuracy on the test split (AutoAttack, sanity checks, OOD on request)",
                        _evaluate_parser, cmd_evaluate),
    "compare": Command("two models on the same images and random starts: both accuracies and B - A with 95%% paired "
                       "intervals; writes OUT/compare-<A>-<B>-<split>.json", _compare_parser, cmd_compare),
    "rift": Command("the whole pipeline (from an AT checkpoint, a RobustBench model or from scratch)", _rift_parser, cmd_rift),
    "demo": Command("the full pipeline on a synthetic set on CPU in a few minutes", _demo_parser, cmd_demo),
    "reproduce": Command("the paper's Table 1 protocol end to end; writes the row beside the paper's numbers", _reproduce_parser,
                         cmd_reproduce),
    "download": Command("download a dataset and verify its checksums", _download_parser, cmd_download),
    "list": Command("list models, datasets and profiles", lambda p: None, cmd_list),
}


class Parser(argparse.ArgumentParser):
    """argparse's parser with a one-line error (``riftlab train-at: error: ...``, exit 2) in place of the usage block,
    and the option that sets each setting (to name it in errors)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def option_names(self, command: str) -> dict[str, str]:
        """``command``'s options by destination: ``{"at_lr": "--lr", ...}`` (the first spelling of each)."""
        commands = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction)).choices
        return {a.dest: a.option_strings[0] for a in commands[command]._actions if a.option_strings}


def build_parser() -> Parser:
    parser = Parser(prog="riftlab", description="Robust Critical Fine-Tuning (RiFT), step by step.",
                    epilog="Every option is checked before any data is loaded or anything is written: a bad value stops the "
                           "command with one line naming the option, the value and what is allowed (exit 2). Exit 1: a "
                           "training loss became NaN or infinite (nothing non-finite is saved); 3: out of GPU memory; "
                           "130: interrupted.")
    parser.add_argument("--version", action="version", version=f"riftlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.options(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def torch_oom() -> type[BaseException]:
    import torch

    return torch.cuda.OutOfMemoryError


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # under torchrun rank 0 speaks for all; errors still reach stderr
    try:
        check_options(args)  # every option, before anything is read, loaded or written
        if distributed.launched():  # join the process group first: the run directory's checks wait for every rank
            distributed.setup(getattr(args, "device", None) or "auto")
        code = COMMANDS[args.command].run(args)
        distributed.teardown()
        return code
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print(f"riftlab {args.command}: interrupted; finished epochs and stages are saved"
              + (f" in {out}: rerun the same command with --resume to continue" if out else ""), file=sys.stderr)
        return 130
    except torch_oom() as err:
        size = getattr(args, "eval_batch_size", None) or getattr(args, "batch_size", None)
        hint = (f"try --eval-batch-size {max(1, size // 2)} (attacks and evaluation) or a smaller --batch-size (training)" if size
                else "try a smaller --eval-batch-size (attacks and evaluation) or --batch-size (training): half of the current one")
        print(f"riftlab {args.command}: error: the GPU ran out of memory ({str(err).splitlines()[0]}); {hint}. "
              "Finished epochs are saved: rerun with --resume.", file=sys.stderr)
        return 3
    except FloatingPointError as err:  # training diverged (riftlab.steps._loop.check_finite): nothing non-finite was saved
        print(f"riftlab {args.command}: error: {err}", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        if isinstance(err, SettingError):  # name the option the user typed (--lr), not the field (at_lr)
            err = err.renamed(parser.option_names(args.command).get(err.name, err.name))
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"riftlab {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
