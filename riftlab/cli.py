"""The ``riftlab`` command: each RiFT step alone, the whole pipeline, and a CPU demo.

Every command writes into ``--out`` (a run directory) and reads the checkpoints it needs from
there by default, so the steps chain::

    riftlab train-at --dataset cifar10 --out runs/c10
    riftlab mrc --out runs/c10
    riftlab finetune --out runs/c10
    riftlab interpolate --out runs/c10
    riftlab evaluate --checkpoint runs/c10/rift.pt --out runs/c10
    riftlab ablate --out runs/c10          # the paper's ablations (Tables 3-4), after train-at and mrc

Several GPUs: ``torchrun --nproc_per_node N -m riftlab rift ...`` (any command; see
:mod:`riftlab.distributed`). Rank 0 prints and writes; the other ranks are silent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__, distributed
from .compute import to_device
from .pipeline import PROFILES
from .zoo import MissingDependencyError

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError, MissingDependencyError)


_VAL_SIZE_HELP = "training images held out for validation (default: the profile's or dataset's)"


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data, model and run")
    g.add_argument("--profile", choices=list(PROFILES), default=None,
                   help="preset of all settings: paper (GPU), cpu (small, minutes), demo (synthetic, ~5 min on a 2-core CPU), "
                        "book (Fashion-MNIST, the book's chapters 1-5)")
    g.add_argument("--dataset", help="dataset name (see `riftlab list`)")
    g.add_argument("--model", help="model name (see `riftlab list`)")
    g.add_argument("--width", type=int, help="first-stage channels (ResNet) or widen factor (WRN)")
    g.add_argument("--data-root", help="folder with the dataset files")
    g.add_argument("--download", action="store_true", default=None, help="download missing dataset files (needs internet)")
    g.add_argument("--out", default="runs/riftlab", help="run directory (default: %(default)s)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--seed", type=int)
    g.add_argument("--train-subset", type=int, help="use this many training images")
    g.add_argument("--val-subset", type=int, help="use this many validation images")
    g.add_argument("--test-subset", type=int, help="use this many test images")
    g.add_argument("--synthetic-sizes", type=sizes, dest="synthetic_sizes", metavar="TRAIN,TEST",
                   help="images a synthetic-* set generates, validation included (default: the real dataset's, "
                        "50000,10000 for 32x32: about 10 s on one core); ignored for real datasets")
    g.add_argument("--val-size", type=int, help=_VAL_SIZE_HELP)
    g.add_argument("--batch-size", type=int, help="training batch size (default 128)")
    g.add_argument("--eval-batch-size", type=int, help="images per batch of every attack and evaluation (default 512; halve it on out-of-memory)")
    g.add_argument("--eps", type=float, help="l_inf budget in pixel units (default: the dataset's, 8/255 for CIFAR)")
    g.add_argument("--step", type=float, help="PGD step in pixel units (default: the dataset's, 2/255 for CIFAR)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 autocast on CUDA, fp32 on the CPU; fp32 or bf16 everywhere")
    g.add_argument("--compile", action="store_true", default=None, help="train through torch.compile (slow first batches)")
    g.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    g.add_argument("--overwrite", action="store_true", help="start over, removing riftlab's files in --out")


def _robustbench(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("RobustBench starting point (pip install 'riftlab[robustbench]')")
    g.add_argument("--robustbench", metavar="NAME", help="start from this RobustBench model (e.g. Sehwag2021Proxy_R18) "
                   "instead of an AT checkpoint; its dataset is --dataset's")
    g.add_argument("--threat-model", dest="threat_model", choices=["Linf", "L2", "corruptions"], help="RobustBench threat model (default Linf)")
    g.add_argument("--model-dir", dest="model_dir", metavar="PATH",
                   help="RobustBench's model folder, read as PATH/<dataset>/<threat model>/<NAME>.pt (default: models)")


def _at_method(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", dest="at_method", metavar="METHOD",
                   help="adversarial-training objective: pgd (PGD-AT, default), trades or mart")
    p.add_argument("--beta", type=float, dest="at_beta", help="TRADES / MART robustness weight (default 6)")


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
    return tuple(float(a) for a in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riftlab", description="Robust Critical Fine-Tuning (RiFT), step by step.")
    parser.add_argument("--version", action="version", version=f"riftlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-at", help="adversarial training (PGD-AT, TRADES or MART); writes at.pt")
    _common(p)
    p.add_argument("--epochs", type=int, dest="at_epochs")
    p.add_argument("--lr", type=float, dest="at_lr")
    p.add_argument("--milestones", type=epochs, dest="at_milestones", metavar="E1,E2",
                   help="epochs after which the lr drops x0.1 (default: the paper's 100,105 of 110, scaled to --epochs)")
    p.add_argument("--attack-steps", type=int, dest="at_attack_steps", help="PGD steps during training (0: standard training)")
    p.add_argument("--eval-every", type=int, dest="at_eval_every", metavar="K",
                   help="validate every K-th epoch and the last; the best checkpoint is chosen among those (default 1)")
    _at_method(p)

    p = sub.add_parser("mrc", help="module robust criticality of every Conv2d/Linear; writes mrc.csv")
    _common(p)
    _robustbench(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt)")
    p.add_argument("--mrc-eps", type=float, dest="mrc_eps", help="relative weight-perturbation radius (default 0.1)")
    p.add_argument("--passes", type=int, dest="mrc_passes", help="gradient-ascent passes over the adversarial set")
    p.add_argument("--examples", type=int, dest="mrc_examples", help="training images in the adversarial set")

    p = sub.add_parser("finetune", help="fine-tune one module's weight on clean data; writes ft.pt")
    _common(p)
    _robustbench(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt)")
    p.add_argument("--module", dest="ft_module", help="exact module name (default: lowest MRC in OUT/mrc.csv)")
    p.add_argument("--epochs", type=int, dest="ft_epochs")
    p.add_argument("--lr", type=float, dest="ft_lr")
    p.add_argument("--update-bn-stats", action="store_true", default=None,
                   help="let every BatchNorm's statistics drift during fine-tuning (the reference code's behaviour)")

    p = sub.add_parser("interpolate", help="interpolate AT and fine-tuned weights, choose alpha on validation; writes rift.pt")
    _common(p)
    _robustbench(p)
    p.add_argument("--at", help="AT model (default: OUT/at.pt)")
    p.add_argument("--ft", help="fine-tuned model (default: OUT/ft.pt)")
    p.add_argument("--threshold", type=float, help="allowed validation robust-accuracy drop in points (default 0.1)")

    p = sub.add_parser("ablate", help="fine-tune other choices of weights (all, last, most, top-k, least, no interpolation); "
                                      "writes ablation.csv")
    _common(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt); the MRC table is OUT/mrc.csv")
    p.add_argument("--variants", default="at,all,last,most,topk,least,no-interp",
                   help="comma-separated variants (default: %(default)s)")
    p.add_argument("--k", type=int, default=3, help="how many least critical modules the topk variant fine-tunes (default 3)")
    p.add_argument("--epochs", type=int, dest="ft_epochs")
    p.add_argument("--lr", type=float, dest="ft_lr")
    p.add_argument("--update-bn-stats", action="store_true", default=None,
                   help="let every BatchNorm's statistics drift during fine-tuning (the reference code's behaviour)")
    p.add_argument("--threshold", type=float, help="allowed validation robust-accuracy drop in points (default 0.1)")
    p.add_argument("--alphas", type=alphas, help="interpolation weights, comma-separated, including 0 (default 0,0.1,...,1)")
    p.add_argument("--steps", type=int, dest="eval_steps", help="PGD steps of every evaluation (default 10)")
    p.add_argument("--restarts", type=int, dest="eval_restarts", help="random restarts of the test evaluation (default 3)")
    p.add_argument("--name", dest="ablation_name", default="ablation", metavar="NAME",
                   help="work folder OUT/NAME and table OUT/NAME.csv (default: %(default)s), so ablations with other settings sit side by side")

    p = sub.add_parser("evaluate", help="clean and PGD robust accuracy on the test split")
    _common(p)
    _robustbench(p)
    p.add_argument("--checkpoint", help="the model to evaluate (or --robustbench NAME)")
    p.add_argument("--autoattack", type=int, metavar="N", help="also run standard AutoAttack (pyautoattack) on the first N images "
                   "of the split and report it next to PGD on the same images; its log goes to OUT/autoattack-<stem>-<split>.log")
    p.add_argument("--sanity", action="store_true", help="run the gradient-masking checks (riftlab.sanity); a failed check prints "
                   "a WARNING line and sets \"flagged\" in the JSON")
    p.add_argument("--sanity-examples", type=int, default=1000, metavar="N",
                   help="images of the split (the first N) the sanity checks attack (default: %(default)s)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--steps", type=int, dest="eval_steps", help="PGD steps (default 10)")
    p.add_argument("--restarts", type=int, dest="eval_restarts", help="random restarts, worst case per example (default 3)")
    p.add_argument("--ood", action="store_true", help="also measure accuracy under common corruptions of the split, made on the fly; "
                   "writes ood-<checkpoint stem>-<split>.csv and the mean into the JSON")
    p.add_argument("--ood-dir", metavar="PATH", help="use a published corrupted test set (CIFAR-10-C, CIFAR-100-C or Tiny-ImageNet-C folder) "
                   "instead of on-the-fly corruptions; implies --ood")
    p.add_argument("--corruptions", dest="ood_corruptions", default="standard", metavar="LIST",
                   help="standard (the 15, default), reference (the reference code's 18), all, or comma-separated names")
    p.add_argument("--severities", dest="ood_severities", default="1,2,3,4,5", metavar="LIST",
                   help="comma-separated severities to average (default 1,2,3,4,5; the reference uses 1 on Tiny-ImageNet-C)")

    p = sub.add_parser("compare", help="two models on the same images and random starts: both accuracies and B - A with "
                                       "95%% paired intervals; writes OUT/compare-<A>-<B>-<split>.json")
    _common(p)
    p.add_argument("--a", dest="model_a", metavar="PATH", help="model A, the reference (default: OUT/at.pt)")
    p.add_argument("--b", dest="model_b", metavar="PATH", help="model B (default: OUT/rift.pt)")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--steps", type=int, dest="eval_steps", help="PGD steps (default 10)")
    p.add_argument("--restarts", type=int, dest="eval_restarts", help="random restarts, worst case per image (default 3)")
    p.add_argument("--autoattack", type=int, metavar="N", help="also standard AutoAttack on the first N images of the split, "
                   "both models, compared image by image")

    p = sub.add_parser("rift", help="the whole pipeline (from an AT checkpoint, a RobustBench model or from scratch)")
    _common(p)
    _robustbench(p)
    p.add_argument("--at-checkpoint", help="start from this AT model instead of training one")
    p.add_argument("--at-epochs", type=int)
    p.add_argument("--at-milestones", type=epochs, metavar="E1,E2", help="epochs after which the AT lr drops x0.1 "
                   "(default: the paper's 100,105 of 110, scaled to --at-epochs)")
    p.add_argument("--at-eval-every", type=int, metavar="K", help="validate every K-th AT epoch and the last (default 1)")
    p.add_argument("--at-lr", type=float, help="adversarial-training learning rate (default 0.1)")
    p.add_argument("--at-attack-steps", type=int, metavar="N", help="PGD steps of the training attack (default 10; 1 with a large "
                   "--at-attack-step is 'fast AT')")
    p.add_argument("--at-attack-step", type=float, metavar="STEP", help="step of the training attack in pixel units (default: --step)")
    g = p.add_argument_group("MRC, fine-tuning and interpolation")
    g.add_argument("--mrc-examples", type=int, metavar="N", help="training images in MRC's adversarial set (default 10000)")
    g.add_argument("--mrc-passes", type=int, metavar="N", help="gradient-ascent passes of MRC over that set (default 10)")
    g.add_argument("--mrc-eps", type=float, help="MRC's weight-perturbation radius, relative to the weight's norm (default 0.1)")
    g.add_argument("--ft-epochs", type=int, help="fine-tuning epochs (default 10; the lr drops x0.1 halfway)")
    g.add_argument("--ft-lr", type=float, help="fine-tuning learning rate (default 0.001)")
    g.add_argument("--module", dest="ft_module", help="fine-tune this module (default: the least robust-critical one)")
    g.add_argument("--update-bn-stats", action="store_true", default=None,
                   help="let every BatchNorm's statistics drift during fine-tuning (the reference code's behaviour)")
    g.add_argument("--alphas", type=alphas, help="interpolation weights, comma-separated, including 0 (default 0,0.1,...,1)")
    g.add_argument("--threshold", type=float, help="allowed validation robust-accuracy drop in points (default 0.1)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-steps", type=int, metavar="N", help="PGD steps of every evaluation (default 10)")
    g.add_argument("--eval-restarts", type=int, metavar="N", help="random restarts of the test evaluation, worst case per image (default 3)")
    g.add_argument("--val-restarts", type=int, metavar="N", help="random restarts on validation (the interpolation curve; default 1)")
    _at_method(p)

    p = sub.add_parser("demo", help="the full pipeline on a synthetic set on CPU in a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.add_argument("--overwrite", action="store_true", help="start over, removing riftlab's files in --out")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out (same settings)")

    p = sub.add_parser("reproduce", help="the paper's Table 1 protocol end to end; writes the row beside the paper's numbers")
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
    p.add_argument("--ood-dir", help="published -C folder (CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C); default: corruptions made on the fly")
    p.add_argument("--ood-examples", type=int, help="OOD on a random subset of this many test images")
    p.add_argument("--autoattack", type=int, metavar="N", help="also standard AutoAttack on the first N test images (beside PGD on them)")
    p.add_argument("--out", default="runs/table1", help="output folder (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--resume", action="store_true", help="continue an unfinished reproduction in --out")
    p.add_argument("--overwrite", action="store_true", help="start over, removing riftlab's files in --out")

    p = sub.add_parser("download", help="download a dataset and verify its checksums")
    p.add_argument("dataset", help="a dataset name, or cifar10-c, cifar100-c, tinyimagenet-c for the published corruption sets")
    p.add_argument("--data-root")

    sub.add_parser("list", help="list models, datasets and profiles")
    return parser


_NOT_CONFIG = {"command", "profile", "out", "checkpoint", "at", "ft", "split", "at_checkpoint", "overwrite", "resume", "variants", "k",
               "ablation_name", "model_a", "model_b", "autoattack"}


def config_from_args(args: argparse.Namespace, meta: dict[str, Any] | None = None):
    """RiftConfig from defaults < profile < checkpoint metadata < explicit command-line options."""
    from .pipeline import PROFILES, RiftConfig

    values: dict[str, Any] = dict(PROFILES[args.profile]) if getattr(args, "profile", None) else {}
    for key in ("dataset", "model", "width", "at_method", "at_beta", "robustbench", "threat_model", "model_dir"):
        if meta and meta.get(key) is not None:
            values[key] = meta[key]
    fields = {f.name for f in dataclasses.fields(RiftConfig)}
    for key, value in vars(args).items():
        if key in _NOT_CONFIG or value is None:
            continue
        if key not in fields:
            raise KeyError(f"internal: option {key} has no configuration field")
        values[key] = value
    return RiftConfig(**values).resolved()


def torch_oom() -> type[BaseException]:
    import torch

    return torch.cuda.OutOfMemoryError


def _stage_dir(out: Path, stage: str, args: argparse.Namespace, check_only: bool = False) -> Path:
    """The checkpoint folder of a step command, refusing to mix with an earlier run unless told.

    ``check_only`` raises the refusal without removing anything: commands call it before loading data."""
    import shutil

    folder = out / stage
    if (folder / "last.pt").is_file():
        if not (args.overwrite or args.resume):
            raise FileExistsError(f"{folder} holds an earlier {stage} run; pass --resume to continue it or --overwrite to start over")
        if args.overwrite and not check_only:
            shutil.rmtree(folder)
    return folder


def _meta_of(path: str | Path) -> dict[str, Any]:
    from .checkpoint import read_checkpoint

    obj = read_checkpoint(path)
    return dict(obj.get("meta", {})) if isinstance(obj, dict) else {}


def _load_model(cfg, splits, path: str | Path, device):
    from .checkpoint import load_checkpoint
    from .pipeline import build_for

    model = build_for(cfg, splits)
    load_checkpoint(model, path)
    return to_device(model, device)


def _starting_model(cfg, splits, path: Path | None, device):
    """The model in the riftlab checkpoint ``path``, or (no path) RobustBench's ``cfg.robustbench`` with its weights."""
    if path is not None:
        return _load_model(cfg, splits, path, device)
    from .zoo import load_robustbench_model, robustbench_dataset

    return to_device(load_robustbench_model(cfg.robustbench, robustbench_dataset(cfg.dataset), cfg.threat_model, cfg.model_dir), device)


def _at_checkpoint(args: argparse.Namespace, out: Path) -> Path | None:
    """--checkpoint, else None when --robustbench names the starting model, else OUT/at.pt."""
    if getattr(args, "robustbench", None) and not args.checkpoint:
        return None
    return _checkpoint(args.checkpoint, out, "at.pt", "pass --checkpoint or run `riftlab train-at` first")


def _checkpoint(path: str | None, out: Path, default: str, how: str) -> Path:
    p = Path(path) if path else out / default
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; {how}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")  # under torchrun rank 0 speaks for all; errors still reach stderr
    try:
        code = _dispatch(args)
        distributed.teardown()
        return code
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print(f"riftlab {args.command}: interrupted; finished epochs and stages are saved"
              + (f" in {out}: rerun the same command with --resume to continue" if out else ""), file=sys.stderr)
        return 130
    except torch_oom() as err:
        size = getattr(args, "batch_size", None) or getattr(args, "eval_batch_size", None)
        hint = f"try --batch-size {max(1, size // 2)}" if size else "try a smaller --batch-size (half of the current one)"
        print(f"riftlab {args.command}: error: the GPU ran out of memory ({str(err).splitlines()[0]}); {hint}. "
              "Finished epochs are saved: rerun with --resume.", file=sys.stderr)
        return 3
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"riftlab {args.command}: error: {message}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    import pandas as pd

    from .checkpoint import save_checkpoint
    from .data import Batches, download_dataset, list_datasets
    from .models import list_models
    from .pipeline import PROFILES, RiftConfig, _write_csv, _write_json, prepare, run_rift

    if args.command == "list":
        print("models:   " + ", ".join(list_models()))
        print("datasets: " + ", ".join(list_datasets()))
        print("profiles: " + ", ".join(PROFILES))
        return 0
    if args.command == "reproduce":
        from .reproduce import format_table1, reproduce_table1

        try:
            seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
        overrides = {k: v for k, v in (("width", args.width), ("at_epochs", args.at_epochs), ("val_size", args.val_size), ("data_root", args.data_root),
                                       ("download", args.download), ("device", args.device), ("progress", args.progress)) if v is not None}
        table = reproduce_table1(args.model, args.dataset, args.out, profile=args.profile, seeds=seeds, c_dir=args.ood_dir,
                                 ood_examples=args.ood_examples, autoattack_examples=args.autoattack, resume=args.resume, overwrite=args.overwrite, **overrides)
        print(format_table1(table))
        print(f"wrote {Path(args.out) / 'table1.csv'}")
        return 0
    if args.command == "download":
        if args.dataset.endswith("-c"):
            from .ood import download_corrupted

            folder = download_corrupted(args.dataset[:-2], args.data_root)
        else:
            folder = download_dataset(args.dataset, args.data_root)
        print(f"downloaded {args.dataset} into {folder}")
        return 0
    out = Path(args.out)
    if args.command in ("rift", "demo"):
        if args.command == "demo":
            cfg = RiftConfig(**{**PROFILES["demo"], "device": args.device, "seed": args.seed, "progress": args.progress})
            run_rift(cfg, out, resume=args.resume, overwrite=args.overwrite)
        else:
            meta = _meta_of(args.at_checkpoint) if args.at_checkpoint else None
            run_rift(config_from_args(args, meta), out, at_checkpoint=args.at_checkpoint, resume=args.resume, overwrite=args.overwrite)
        print(f"results in {out / 'results.json'}")
        return 0

    if args.command == "train-at":
        from .pipeline import adversarial_train_step, build_for

        cfg = config_from_args(args)
        _stage_dir(out, "at", args, check_only=True)
        splits, device = prepare(cfg)
        model = to_device(build_for(cfg, splits), device)
        meta = {"riftlab": __version__, "dataset": cfg.dataset, **model.riftlab_config, "at_method": cfg.at_method, "at_beta": cfg.at_beta}
        train = Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device, seed=cfg.seed)
        val = Batches(splits.val, cfg.eval_batch_size, device=device)
        result = adversarial_train_step(cfg, model, train, val, out_dir=_stage_dir(out, "at", args), meta=meta)
        save_checkpoint(out / "at.pt", {"model_state": model.state_dict(), "meta": {**meta, "stage": "at"}})
        _write_csv(out / "at_history.csv", pd.DataFrame(result.history))
        print(f"best epoch {result.best_epoch}: {result.history[result.best_epoch - 1]}\nwrote {out / 'at.pt'}")
        return 0

    if args.command == "mrc":
        from .criticality import adversarial_set, module_robust_criticality

        path = _at_checkpoint(args, out)
        cfg = config_from_args(args, _meta_of(path) if path else None)
        splits, device = prepare(cfg)
        model = _starting_model(cfg, splits, path, device)
        source = Batches(splits.train.subset(cfg.mrc_examples, seed=cfg.seed), cfg.eval_batch_size, device=device)
        adv = adversarial_set(model, source, cfg.eps, cfg.step, cfg.eval_steps, seed=cfg.seed)
        table = module_robust_criticality(model, adv, eps=cfg.mrc_eps, passes=cfg.mrc_passes, step_size=cfg.mrc_step_size, progress=cfg.progress)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "mrc.csv", table)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"wrote {out / 'mrc.csv'}")
        return 0

    if args.command == "finetune":
        from .finetune import finetune_module, get_weight_module

        path = _at_checkpoint(args, out)
        meta = _meta_of(path) if path else {}
        cfg = config_from_args(args, meta)
        module = cfg.ft_module
        if module is None:
            mrc_csv = _checkpoint(None, out, "mrc.csv", "pass --module NAME or run `riftlab mrc` first")
            module = str(pd.read_csv(mrc_csv)["module"].iloc[0])
        splits, device = prepare(cfg)
        model = _starting_model(cfg, splits, path, device)
        if path is None:  # ft.pt must say how to rebuild the architecture and where the AT weights are
            meta = {"riftlab": __version__, "dataset": cfg.dataset, **model.riftlab_config, "model_dir": cfg.model_dir}
        get_weight_module(model, module)  # a misspelt name is the error to report, not an earlier run in ft/
        train = Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device, seed=cfg.seed)
        val = Batches(splits.val, cfg.eval_batch_size, device=device)
        ft = finetune_module(model, module, train, val, epochs=cfg.ft_epochs, lr=cfg.ft_lr, update_bn_stats=cfg.update_bn_stats,
                             milestones=[max(1, cfg.ft_epochs // 2)], out_dir=_stage_dir(out, "ft", args), progress=cfg.progress,
                             compile=cfg.compile)
        save_checkpoint(out / "ft.pt", {"model_state": ft.model.state_dict(), "meta": {**meta, "stage": "finetuned", "module": module}})
        _write_csv(out / "finetune.csv", pd.DataFrame(ft.history))
        print(f"fine-tuned {module}; best epoch {ft.best_epoch} ({ft.history[-1]})\nwrote {out / 'ft.pt'}")
        return 0

    if args.command == "interpolate":
        from .interpolation import interpolate, interpolation_curve, select_alpha

        ft_path = _checkpoint(args.ft, out, "ft.pt", "pass --ft or run `riftlab finetune` first")
        meta = _meta_of(ft_path)
        cfg = config_from_args(args, meta)
        from_robustbench = cfg.robustbench is not None and not args.at and not (out / "at.pt").is_file()
        at_path = None if from_robustbench else _checkpoint(args.at, out, "at.pt", "pass --at or run `riftlab train-at` first")
        splits, device = prepare(cfg)
        model = _starting_model(cfg, splits, at_path, device)
        theta_at = {k: v.clone() for k, v in model.state_dict().items()}
        ft_model = _load_model(cfg, splits, ft_path, device)
        theta_ft = ft_model.state_dict()
        val = Batches(splits.val, cfg.eval_batch_size, device=device)
        curve = interpolation_curve(model, theta_at, theta_ft, val, cfg.eps, cfg.step, cfg.eval_steps, cfg.val_restarts, cfg.alphas,
                                    seed=cfg.seed, progress=cfg.progress)
        choice = select_alpha(curve, cfg.threshold)
        _write_csv(out / "interpolation.csv", curve)
        save_checkpoint(out / "rift.pt", {"model_state": interpolate(theta_at, theta_ft, choice["alpha"]),
                                          "meta": {**meta, "stage": "rift", "alpha": choice["alpha"]}})
        _write_json(out / "alpha.json", choice)
        print(curve.to_string(index=False))
        print(f"chosen alpha {choice['alpha']} (validation clean {choice['clean_gain']:+.2f}, robust {choice['robust_change']:+.2f} points)")
        print(f"wrote {out / 'rift.pt'}")
        return 0

    if args.command == "ablate":
        import shutil

        from .ablation import VARIANTS, ablate, ablation_table, variant_modules

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.ablation_name):
            raise ValueError(f"--name must be a plain folder name (letters, digits, '_', '.', '-'), got {args.ablation_name!r}")
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown or not variants:
            raise ValueError(f"unknown ablation variant {unknown[0] if unknown else args.variants!r}; choices: {', '.join(VARIANTS)}")
        path = _checkpoint(args.checkpoint, out, "at.pt", "pass --checkpoint or run `riftlab train-at` first")
        mrc = pd.read_csv(_checkpoint(None, out, "mrc.csv", "run `riftlab mrc` first"))
        work = out / args.ablation_name
        earlier = work.is_dir() and any(work.iterdir())
        if earlier and not (args.resume or args.overwrite):
            raise FileExistsError(f"{work} holds an earlier ablation; pass --resume to continue it or --overwrite to start over")
        cfg = config_from_args(args, _meta_of(path))
        splits, device = prepare(cfg)
        model = _load_model(cfg, splits, path, device)
        for variant in variants:  # a bad --k or a foreign MRC table is the error to report, before earlier work is removed
            variant_modules(model, mrc, variant, args.k)
        if earlier and args.overwrite:
            shutil.rmtree(work)
        train = Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device, seed=cfg.seed)
        val = Batches(splits.val, cfg.eval_batch_size, device=device)
        test = Batches(splits.test, cfg.eval_batch_size, device=device)
        table = ablate(model, mrc, train, val, test, cfg, variants, k=args.k, out_dir=work, reference_dir=out / "reference")
        _write_csv(out / f"{args.ablation_name}.csv", table)
        print(ablation_table(table))
        print(f"wrote {out / (args.ablation_name + '.csv')}")
        return 0

    if args.command == "compare":
        return _compare(args, out)

    if args.command == "evaluate":
        from .evaluation import evaluate

        ood = {k: vars(args).pop(k) for k in ("ood", "ood_dir", "ood_corruptions", "ood_severities")}  # not RiftConfig fields
        checks = {k: vars(args).pop(k) for k in ("autoattack", "sanity", "sanity_examples")}
        for key in ("autoattack", "sanity_examples"):
            if checks[key] is not None and checks[key] < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be a positive number of images, got {checks[key]}")
        if not args.checkpoint and not args.robustbench:
            raise ValueError("pass --checkpoint PATH, or --robustbench NAME to evaluate a RobustBench model")
        path = Path(args.checkpoint) if args.checkpoint else None
        cfg = config_from_args(args, _meta_of(path) if path else None)
        name = path.stem if path else cfg.robustbench
        if ood["ood"] or ood["ood_dir"]:  # check the OOD options before the (long) robust evaluation
            from .corruptions import resolve_corruptions
            from .ood import check_corrupted_dir, parse_severities

            _, names = resolve_corruptions(ood["ood_corruptions"])
            levels = parse_severities(ood["ood_severities"])
            if ood["ood_dir"]:
                if args.split != "test":
                    raise ValueError("--ood-dir holds corrupted *test* images; use --split test, or --ood without --ood-dir")
                check_corrupted_dir(ood["ood_dir"], names, levels, cfg.dataset)
        splits, device = prepare(cfg)
        model = _starting_model(cfg, splits, path, device)
        data = Batches(getattr(splits, args.split), cfg.eval_batch_size, device=device)
        source = str(path) if path else f"robustbench:{cfg.robustbench} ({cfg.threat_model})"
        result = {"checkpoint": source, "split": args.split, **evaluate(model, data, cfg.eps, cfg.step, cfg.eval_steps, cfg.eval_restarts, seed=cfg.seed)}
        out.mkdir(parents=True, exist_ok=True)
        alerts = _masking_checks(model, getattr(splits, args.split), cfg, device, checks, out / f"autoattack-{name}-{args.split}.log", result)
        if ood["ood"] or ood["ood_dir"]:
            from .data import _resolve_root
            from .ood import ood_accuracy

            info, stem = splits.info, f"ood-{name}-{args.split}"
            resume_file = out / f"{stem}.progress.pt"
            # With --ood-dir, --test-subset picks the same images as load_dataset's test subset (seed 3), as -C keeps the test order.
            shifted = ood_accuracy(model, None if ood["ood_dir"] else getattr(splits, args.split), names, levels,
                                   c_dir=ood["ood_dir"], dataset=info.name if ood["ood_dir"] else None,
                                   wnids=_resolve_root(info, cfg.data_root) if ood["ood_dir"] and info.name == "tinyimagenet" else None,
                                   image_shape=(info.channels, info.image_size, info.image_size),
                                   max_examples=cfg.test_subset if ood["ood_dir"] else None, subset_seed=3, batch_size=cfg.eval_batch_size,
                                   seed=cfg.seed, progress=cfg.progress, checkpoint_path=resume_file)
            _write_csv(out / f"{stem}.csv", shifted.table)
            resume_file.unlink(missing_ok=True)
            result.update({"ood_acc": shifted.mean, "ood": shifted.summary()})
        _write_json(out / f"evaluate-{name}-{args.split}.json", result)
        print(json.dumps(result, indent=2))
        for line in alerts:
            print(line, file=sys.stderr)
        return 0
    raise ValueError(f"unknown command {args.command}")  # argparse prevents this


def _compare(args: argparse.Namespace, out: Path) -> int:
    """``riftlab compare``: A and B on the same images and random starts (the pipeline's test seed on ``test``)."""
    from .data import Batches, ImageSet
    from .evaluation import compare
    from .pipeline import _write_json, prepare, without_masks
    from .stats import format_difference, paired_difference

    autoattack = vars(args).pop("autoattack")
    if autoattack is not None and autoattack < 1:
        raise ValueError(f"--autoattack must be a positive number of images, got {autoattack}")
    a_path = _checkpoint(args.model_a, out, "at.pt", "pass --a PATH (the reference model)")
    b_path = _checkpoint(args.model_b, out, "rift.pt", "pass --b PATH (the model compared with it)")
    cfg = config_from_args(args, _meta_of(a_path))
    splits, device = prepare(cfg)
    model_a, model_b = _load_model(cfg, splits, a_path, device), _load_model(cfg, splits, b_path, device)
    images = getattr(splits, args.split)
    seed = cfg.seed + 1 if args.split == "test" else cfg.seed  # run_rift's convention: test starts differ from the curve's
    result = compare(model_a, model_b, Batches(images, cfg.eval_batch_size, device=device), cfg.eps, cfg.step, cfg.eval_steps,
                     cfg.eval_restarts, seed=seed)
    report: dict[str, Any] = {"a": str(a_path), "b": str(b_path), "split": args.split, "seed": seed,
                              "a_result": without_masks(result["a"]), "b_result": without_masks(result["b"]),
                              "clean": result["clean"], "robust": result["robust"]}
    if autoattack:
        from .autoattack import autoattack_accuracy

        first = ImageSet(images.images[:autoattack], images.labels[:autoattack])
        x, y = first.float().to(device), first.labels.to(device)
        import torch

        same = all(torch.equal(v, model_b.state_dict()[k]) for k, v in model_a.state_dict().items())
        runs = {}
        for tag, model, path in (("a", model_a, a_path), ("b", model_b, b_path)):
            if tag == "b" and same:  # the same weights (RiFT chose alpha 0): the same seeded attack gives the same result
                runs["b"] = dict(runs["a"], identical_to_a=True)
                continue
            runs[tag] = autoattack_accuracy(model, x, y, cfg.eps, seed=cfg.seed, batch_size=cfg.eval_batch_size, per_image=True,
                                            log_path=out / f"autoattack-{Path(path).stem}-{args.split}.log")
        report["autoattack"] = {"n": len(first), "a": without_masks(runs["a"]), "b": without_masks(runs["b"]),
                                "robust": paired_difference(runs["a"]["robust_correct"], runs["b"]["robust_correct"])}
    name = f"compare-{Path(a_path).stem}-{Path(b_path).stem}-{args.split}.json"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / name, report)
    print(f"{'':8s} {'clean':>8s} {'robust':>8s}   ({args.split}, {result['a']['n']} images, PGD-{cfg.eval_steps}, "
          f"worst of {cfg.eval_restarts}, attack seed {seed})")
    for tag, path in (("a", a_path), ("b", b_path)):
        print(f"{tag.upper()}: {result[tag]['clean_acc']:8.2f} {result[tag]['robust_acc']:8.2f}   {path}")
    for kind in ("clean", "robust"):
        print(f"B - A, {kind}: {format_difference(result[kind])} points (95% paired interval; images +gained/-lost)")
    if autoattack:
        aa = report["autoattack"]
        print(f"AutoAttack (standard) on the first {aa['n']} images: A {aa['a']['robust_acc']:.2f}, B {aa['b']['robust_acc']:.2f}; "
              f"B - A {format_difference(aa['robust'])}")
    print(f"wrote {out / name}")
    return 0


def _masking_checks(model, images, cfg, device, options: dict[str, Any], log_path: Path, result: dict[str, Any]) -> list[str]:
    """``evaluate --autoattack N`` and ``--sanity``: add their results to ``result``; return the WARNING lines.

    AutoAttack and PGD (the evaluation's settings) attack the same first N images of the split;
    the sanity checks attack the first ``--sanity-examples`` images.
    """
    from .data import Batches, ImageSet
    from .evaluation import evaluate

    warnings: list[str] = []
    if options["autoattack"]:
        from .autoattack import autoattack_accuracy

        first = ImageSet(images.images[:options["autoattack"]], images.labels[:options["autoattack"]])
        x, y = first.float().to(device), first.labels.to(device)
        if cfg.progress:
            print(f"standard AutoAttack on {len(first)} images (eps {cfg.eps:.4f}); progress in {log_path}", file=sys.stderr)
        aa = autoattack_accuracy(model, x, y, cfg.eps, version="standard", seed=cfg.seed, log_path=log_path, batch_size=cfg.eval_batch_size)
        pgd_same = evaluate(model, Batches(first, cfg.eval_batch_size, device=device), cfg.eps, cfg.step, cfg.eval_steps,
                            cfg.eval_restarts, seed=cfg.seed)
        result["autoattack"] = {**aa, "pgd_robust_acc": pgd_same["robust_acc"], "pgd_steps": cfg.eval_steps,
                                "pgd_restarts": cfg.eval_restarts, "log": str(log_path)}
        warnings += [f"WARNING: AutoAttack's own check: {message}" for message in aa["warnings"]]
    if options["sanity"]:
        from .sanity import gradient_masking_checks, is_flagged, warning_lines

        first = ImageSet(images.images[:options["sanity_examples"]], images.labels[:options["sanity_examples"]])
        checks = gradient_masking_checks(model, Batches(first, cfg.eval_batch_size, device=device), cfg.eps, cfg.step, cfg.eval_steps,
                                         restarts=max(2, cfg.eval_restarts), autoattack=result.get("autoattack"), seed=cfg.seed)
        result["sanity"] = [c.to_dict() for c in checks]
        result["sanity_examples"] = len(first)
        result["flagged"] = is_flagged(checks)
        warnings += warning_lines(checks)
    return warnings


if __name__ == "__main__":
    sys.exit(main())
