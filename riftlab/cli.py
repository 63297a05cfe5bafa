"""The ``riftlab`` command: each RiFT step alone, the whole pipeline, and a CPU demo.

Every command writes into ``--out`` (a run directory) and reads the checkpoints it needs from
there by default, so the steps chain::

    riftlab train-at --dataset cifar10 --out runs/c10
    riftlab mrc --out runs/c10
    riftlab finetune --out runs/c10
    riftlab interpolate --out runs/c10
    riftlab evaluate --checkpoint runs/c10/rift.pt --out runs/c10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data, model and run")
    g.add_argument("--profile", choices=["paper", "cpu", "demo"], default=None,
                   help="preset of all settings: paper (GPU), cpu (small, minutes), demo (synthetic, ~2 min)")
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
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eps", type=float, help="l_inf budget in pixel units (default: the dataset's, 8/255 for CIFAR)")
    g.add_argument("--step", type=float, help="PGD step in pixel units (default: the dataset's, 2/255 for CIFAR)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    g.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    g.add_argument("--overwrite", action="store_true", help="start over, removing riftlab's files in --out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riftlab", description="Robust Critical Fine-Tuning (RiFT), step by step.")
    parser.add_argument("--version", action="version", version=f"riftlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-at", help="adversarial training (PGD-AT); writes at.pt")
    _common(p)
    p.add_argument("--epochs", type=int, dest="at_epochs")
    p.add_argument("--lr", type=float, dest="at_lr")
    p.add_argument("--attack-steps", type=int, dest="at_attack_steps", help="PGD steps during training (0: standard training)")

    p = sub.add_parser("mrc", help="module robust criticality of every Conv2d/Linear; writes mrc.csv")
    _common(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt)")
    p.add_argument("--mrc-eps", type=float, dest="mrc_eps", help="relative weight-perturbation radius (default 0.1)")
    p.add_argument("--passes", type=int, dest="mrc_passes", help="gradient-ascent passes over the adversarial set")
    p.add_argument("--examples", type=int, dest="mrc_examples", help="training images in the adversarial set")

    p = sub.add_parser("finetune", help="fine-tune one module's weight on clean data; writes ft.pt")
    _common(p)
    p.add_argument("--checkpoint", help="AT model (default: OUT/at.pt)")
    p.add_argument("--module", dest="ft_module", help="exact module name (default: lowest MRC in OUT/mrc.csv)")
    p.add_argument("--epochs", type=int, dest="ft_epochs")
    p.add_argument("--lr", type=float, dest="ft_lr")
    p.add_argument("--update-bn-stats", action="store_true", default=None,
                   help="let every BatchNorm's statistics drift during fine-tuning (the reference code's behaviour)")

    p = sub.add_parser("interpolate", help="interpolate AT and fine-tuned weights, choose alpha on validation; writes rift.pt")
    _common(p)
    p.add_argument("--at", help="AT model (default: OUT/at.pt)")
    p.add_argument("--ft", help="fine-tuned model (default: OUT/ft.pt)")
    p.add_argument("--threshold", type=float, help="allowed validation robust-accuracy drop in points (default 0.1)")

    p = sub.add_parser("evaluate", help="clean and PGD robust accuracy on the test split")
    _common(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--steps", type=int, dest="eval_steps", help="PGD steps (default 10)")
    p.add_argument("--restarts", type=int, dest="eval_restarts", help="random restarts, worst case per example (default 3)")

    p = sub.add_parser("rift", help="the whole pipeline (from an AT checkpoint or from scratch)")
    _common(p)
    p.add_argument("--at-checkpoint", help="start from this AT model instead of training one")
    p.add_argument("--at-epochs", type=int)
    p.add_argument("--ft-epochs", type=int)
    p.add_argument("--ft-lr", type=float)
    p.add_argument("--module", dest="ft_module")
    p.add_argument("--threshold", type=float)

    p = sub.add_parser("demo", help="the full pipeline on a synthetic set on CPU in a few minutes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.add_argument("--overwrite", action="store_true", help="start over, removing riftlab's files in --out")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out (same settings)")

    p = sub.add_parser("download", help="download a dataset and verify its checksums")
    p.add_argument("dataset")
    p.add_argument("--data-root")

    sub.add_parser("list", help="list models, datasets and profiles")
    return parser


_NOT_CONFIG = {"command", "profile", "out", "checkpoint", "at", "ft", "split", "at_checkpoint", "overwrite", "resume"}


def config_from_args(args: argparse.Namespace, meta: dict[str, Any] | None = None):
    """RiftConfig from defaults < profile < checkpoint metadata < explicit command-line options."""
    from .pipeline import PROFILES, RiftConfig

    values: dict[str, Any] = dict(PROFILES[args.profile]) if getattr(args, "profile", None) else {}
    for key in ("dataset", "model", "width"):
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


def _stage_dir(out: Path, stage: str, args: argparse.Namespace) -> Path:
    """The checkpoint folder of a step command, refusing to mix with an earlier run unless told."""
    import shutil

    folder = out / stage
    if (folder / "last.pt").is_file():
        if args.overwrite:
            shutil.rmtree(folder)
        elif not args.resume:
            raise FileExistsError(f"{folder} holds an earlier {stage} run; pass --resume to continue it or --overwrite to start over")
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
    return model.to(device)


def _checkpoint(path: str | None, out: Path, default: str, how: str) -> Path:
    p = Path(path) if path else out / default
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; {how}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; finished stages and epoch checkpoints in the run directory are kept", file=sys.stderr)
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
    from .pipeline import PROFILES, RiftConfig, _write_csv, _write_json, prepare, results_table, run_rift

    if args.command == "list":
        print("models:   " + ", ".join(list_models()))
        print("datasets: " + ", ".join(list_datasets()))
        print("profiles: " + ", ".join(PROFILES))
        return 0
    if args.command == "download":
        print(f"downloaded {args.dataset} into {download_dataset(args.dataset, args.data_root)}")
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
        from .pipeline import build_for
        from .training import adversarial_train

        cfg = config_from_args(args)
        splits, device = prepare(cfg)
        model = build_for(cfg, splits).to(device)
        meta = {"riftlab": __version__, "dataset": cfg.dataset, **model.riftlab_config}
        train = Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device, seed=cfg.seed)
        val = Batches(splits.val, cfg.eval_batch_size, device=device)
        result = adversarial_train(model, train, val, epochs=cfg.at_epochs, lr=cfg.at_lr, eps=cfg.eps, step=cfg.at_attack_step,
                                   attack_steps=cfg.at_attack_steps, eval_steps=cfg.eval_steps, seed=cfg.seed,
                                   out_dir=_stage_dir(out, "at", args), meta=meta, progress=cfg.progress)
        save_checkpoint(out / "at.pt", {"model_state": model.state_dict(), "meta": {**meta, "stage": "at"}})
        _write_csv(out / "at_history.csv", pd.DataFrame(result.history))
        print(f"best epoch {result.best_epoch}: {result.history[result.best_epoch - 1]}\nwrote {out / 'at.pt'}")
        return 0

    if args.command == "mrc":
        from .criticality import adversarial_set, module_robust_criticality

        path = _checkpoint(args.checkpoint, out, "at.pt", "pass --checkpoint or run `riftlab train-at` first")
        cfg = config_from_args(args, _meta_of(path))
        splits, device = prepare(cfg)
        model = _load_model(cfg, splits, path, device)
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

        path = _checkpoint(args.checkpoint, out, "at.pt", "pass --checkpoint or run `riftlab train-at` first")
        meta = _meta_of(path)
        cfg = config_from_args(args, meta)
        module = cfg.ft_module
        if module is None:
            mrc_csv = _checkpoint(None, out, "mrc.csv", "pass --module NAME or run `riftlab mrc` first")
            module = str(pd.read_csv(mrc_csv)["module"].iloc[0])
        splits, device = prepare(cfg)
        model = _load_model(cfg, splits, path, device)
        get_weight_module(model, module)  # a misspelt name is the error to report, not an earlier run in ft/
        train = Batches(splits.train, cfg.batch_size, shuffle=True, augment=True, crop_padding=splits.info.crop_padding, device=device, seed=cfg.seed)
        val = Batches(splits.val, cfg.eval_batch_size, device=device)
        ft = finetune_module(model, module, train, val, epochs=cfg.ft_epochs, lr=cfg.ft_lr, update_bn_stats=cfg.update_bn_stats,
                             milestones=[max(1, cfg.ft_epochs // 2)], out_dir=_stage_dir(out, "ft", args), progress=cfg.progress)
        save_checkpoint(out / "ft.pt", {"model_state": ft.model.state_dict(), "meta": {**meta, "stage": "finetuned", "module": module}})
        _write_csv(out / "finetune.csv", pd.DataFrame(ft.history))
        print(f"fine-tuned {module}; best epoch {ft.best_epoch} ({ft.history[-1]})\nwrote {out / 'ft.pt'}")
        return 0

    if args.command == "interpolate":
        from .checkpoint import extract_state_dict, read_checkpoint
        from .interpolation import interpolate, interpolation_curve, select_alpha

        at_path = _checkpoint(args.at, out, "at.pt", "pass --at or run `riftlab train-at` first")
        ft_path = _checkpoint(args.ft, out, "ft.pt", "pass --ft or run `riftlab finetune` first")
        meta = _meta_of(ft_path)
        cfg = config_from_args(args, meta)
        splits, device = prepare(cfg)
        model = _load_model(cfg, splits, at_path, device)
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

    if args.command == "evaluate":
        from .evaluation import evaluate

        path = Path(args.checkpoint)
        cfg = config_from_args(args, _meta_of(path))
        splits, device = prepare(cfg)
        model = _load_model(cfg, splits, path, device)
        data = Batches(getattr(splits, args.split), cfg.eval_batch_size, device=device)
        result = {"checkpoint": str(path), "split": args.split, **evaluate(model, data, cfg.eps, cfg.step, cfg.eval_steps, cfg.eval_restarts, seed=cfg.seed)}
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / f"evaluate-{path.stem}-{args.split}.json", result)
        print(json.dumps(result, indent=2))
        return 0
    raise ValueError(f"unknown command {args.command}")  # argparse prevents this


if __name__ == "__main__":
    sys.exit(main())
