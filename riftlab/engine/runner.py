"""Run directories: stages declared once, kept by one runner, reused or resumed only when they match.

A :class:`Stage` is a named piece of work: the settings that determine its result (``params``),
the stages whose results it reads (``inputs``) and the files it writes (``outputs``). Its
*fingerprint* hashes its params with its inputs' fingerprints, so a change anywhere upstream
reaches every stage after it. :class:`RunDir` keeps one record per stage in
``<run dir>/riftlab.lock`` (JSON: params, input fingerprints, output hashes, status, seconds): the
idea of DVC's stage file and lock file, small and inside riftlab. For each stage it is asked to run:

* a **finished** stage whose fingerprint matches is skipped; its outputs must still be the files it
  wrote (their SHA-1 is checked);
* an **unfinished** one (killed mid-way) continues from its saved progress when ``resume`` is set
  (``progress/<stage>.pt``, a :class:`FileState` handed to the step through the
  :mod:`riftlab.resume` protocol), and is refused otherwise;
* a record with **another fingerprint** is refused, naming the setting that differs and both values
  (or the input stage that changed); the stages after a redone one no longer match their inputs
  and are refused in turn;
* ``overwrite`` redoes every stage it is asked to run (its files are removed first), except those
  marked ``adopt`` (results of an earlier command that this one only reads);
* a file a stage would write that exists without a record (another program's, or an older
  riftlab's) is refused unless ``overwrite``;
* a stage is recorded as started when it first saves progress or writes a file: one that fails
  before (a checkpoint for another model, say) leaves the run directory as it found it, and the
  corrected command runs without ``--resume``.

A run directory that cannot be created or written is refused before any stage starts.

Files are written atomically (temporary file, fsync, rename) and, under torchrun, by rank 0 only;
every rank computes every stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pandas as pd
import torch

from .. import distributed
from ..checkpoint import read_checkpoint, save_checkpoint
from .rules import SettingError

__all__ = ["Stage", "StageContext", "RunDir", "FileState", "StageMismatch", "UnfinishedStage", "fingerprint", "file_digest",
           "state_digest", "plain", "write_json", "write_csv", "output_dir_problem", "check_output_dir"]

LOCK = "riftlab.lock"


class StageMismatch(ValueError):
    """A stage's saved work was computed with other settings (or from other inputs) than asked for now."""


class UnfinishedStage(FileExistsError):
    """A stage was started and not finished, and the command did not ask to resume it."""


# ----------------------------------------------------------------------------------------------
# Fingerprints


def plain(value: Any) -> Any:
    """``value`` as plain JSON data (tuples become lists, paths strings, numpy/torch scalars numbers)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def fingerprint(obj: Any) -> str:
    """A short SHA-1 of ``obj`` as canonical JSON: equal settings, equal fingerprint."""
    return hashlib.sha1(json.dumps(plain(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-1 of a file's bytes."""
    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A short SHA-1 of a state dict (names, dtypes, shapes and bytes): equal exactly when bit-identical."""
    h = hashlib.sha1()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# The run directory itself: can it be created and written?


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """``None`` when ``path`` is a folder riftlab can write in, or one it can create; else why not, in words.

    Looks without touching anything: nothing is created, not even a test file (a folder refused stays as it was)."""
    try:
        return _output_dir_problem(Path(path))
    except OSError as err:  # an ancestor that cannot be searched
        return f"cannot reach it: {err.strerror}: {err.filename}"


def _output_dir_problem(path: Path) -> str | None:
    if path.exists():
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    if path.is_symlink():
        return f"{path} is a link to {os.readlink(path)}, which does not exist"
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create it: {parent} is not writable"


def check_output_dir(path: str | os.PathLike, name: str = "run directory") -> None:
    """Raise :class:`~riftlab.engine.rules.SettingError` naming ``name`` unless :func:`output_dir_problem` finds none."""
    problem = output_dir_problem(path)
    if problem is not None:
        raise SettingError(name, str(path), "a folder riftlab can create and write", problem)


# ----------------------------------------------------------------------------------------------
# Atomic files


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (rank 0 only under torchrun)."""
    return _atomic(Path(path), lambda fh: fh.write(json.dumps(plain(obj), indent=2, default=str).encode()))


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> Path:
    """Write ``frame`` as CSV (no index) atomically (rank 0 only under torchrun)."""
    return _atomic(Path(path), lambda fh: fh.write(frame.to_csv(index=False).encode()))


def _atomic(path: Path, write: Callable[[Any], Any]) -> Path:
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Progress in files: the resume protocol's implementation


class FileState:
    """:class:`riftlab.resume.StepState` kept in ``path`` (a torch file, written atomically by rank 0).

    ``settings``, when given, are stored beside the progress, and progress saved under other
    settings is refused by name (for direct use; inside a run directory the stage's fingerprint
    already guarantees it). Children live in ``<path stem>/<name>.pt``. ``min_interval`` (seconds)
    skips saves that come sooner than that after the previous one: for per-batch progress on slow
    disks (a resumed call then redoes at most that much work, with the same result).
    """

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any] | None = None, min_interval: float = 0.0):
        self.path = Path(path)
        self.settings = plain(dict(settings)) if settings is not None else None
        self.min_interval = min_interval
        self._last_save = -math.inf

    @property
    def where(self) -> str:
        return str(self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        saved = read_checkpoint(self.path)
        if self.settings is not None and saved.get("settings") != self.settings:
            old = saved.get("settings") or {}
            diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
            first = diff[0] if diff else "?"
            raise StageMismatch(f"{self.path} holds progress made with {first}={old.get(first)!r}, not {first}={self.settings.get(first)!r}"
                                + (f" (and {', '.join(diff[1:])})" if len(diff) > 1 else "")
                                + "; resume with the same settings, or delete the file")
        return dict(saved["progress"])

    def save(self, progress: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self._last_save < self.min_interval:
            return
        self._last_save = now
        save_checkpoint(self.path, {"settings": self.settings, "progress": progress})

    def child(self, name: str) -> "FileState":
        return FileState(self.path.with_suffix("") / f"{name}.pt", None, self.min_interval)

    def clear(self) -> None:
        if distributed.is_main():
            self.path.unlink(missing_ok=True)
            folder = self.path.with_suffix("")
            if folder.is_dir():
                shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------
# Stages and the run directory


@dataclass
class Stage:
    """One stage of a run directory (see the module docstring).

    ``compute(ctx)`` does the work, writes the ``outputs`` through ``ctx`` and returns a small
    JSON-able summary, kept in the lock file (``RunDir.summary(name)``). ``adopt=True``: a finished
    record is reused whatever its params (a command that only reads an earlier command's result,
    e.g. ``riftlab finetune`` reading the AT model that ``riftlab train-at`` wrote).
    """

    name: str
    params: Mapping[str, Any]
    compute: Callable[["StageContext"], Mapping[str, Any] | None]
    inputs: Sequence[str] = ()
    outputs: Sequence[str] = ()
    adopt: bool = False


@dataclass
class StageContext:
    """What a stage's ``compute`` gets: where to write, its progress, and its inputs' summaries."""

    run: "RunDir"
    stage: Stage
    state: FileState
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """Where the stage writes ``name`` (asking is writing: the stage is recorded as started, if it is not yet)."""
        if self.before_write is not None:
            self.before_write()
        return self.run.path / name

    before_write: Callable[[], Any] | None = None  # called before the stage first writes into the run directory

    def save_checkpoint(self, name: str, payload: Mapping[str, Any]) -> Path:
        self._check_output(name)
        return save_checkpoint(self.path(name), payload)

    def write_json(self, name: str, obj: Any) -> Path:
        self._check_output(name)
        return write_json(self.path(name), obj)

    def write_csv(self, name: str, frame: pd.DataFrame) -> Path:
        self._check_output(name)
        return write_csv(self.path(name), frame)

    def _check_output(self, name: str) -> None:
        if name not in self.stage.outputs:
            raise RuntimeError(f"internal: stage {self.stage.name} writes {name}, which it does not declare")


class RunDir:
    """A run directory and its lock file: runs stages, skipping, resuming or refusing them (module docstring).

    ``log`` receives one line per stage that is reused (``None``: quiet).
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                 log: Callable[[str], Any] | None = None, batch_save_interval: float = 0.0):
        check_output_dir(path)  # a folder that cannot be written is refused before any stage starts
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.log = log
        self.batch_save_interval = batch_save_interval
        self._redone: set[str] = set()  # stages this RunDir redid under overwrite (never redone twice)

    # -- the lock file ---------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    def records(self) -> dict[str, dict[str, Any]]:
        if not self.lock_path.is_file():
            return {}
        try:
            return dict(json.loads(self.lock_path.read_text()).get("stages", {}))
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.lock_path} is not valid JSON ({err}); it is riftlab's record of the stages in {self.path}: "
                             "restore it, or start over with --overwrite") from None

    def record(self, name: str) -> dict[str, Any] | None:
        return self.records().get(name)

    def summary(self, name: str) -> dict[str, Any]:
        rec = self.record(name)
        if rec is None or rec.get("status") != "done":
            raise KeyError(f"stage {name} has not finished in {self.path}")
        return dict(rec.get("summary") or {})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / f".{LOCK}.flock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _update(self, name: str, record: dict[str, Any] | None) -> None:
        if not distributed.is_main():
            return
        with self._locked():
            stages = self.records()
            if record is None:
                stages.pop(name, None)
            else:
                stages[name] = record
            write_json(self.lock_path, {"riftlab_lock": 1, "stages": stages})

    # -- deciding -------------------------------------------------------------------------------

    def fingerprint_of(self, stage: Stage) -> str:
        return fingerprint({"params": stage.params, "inputs": self._input_fingerprints(stage)})

    def _input_fingerprints(self, stage: Stage) -> dict[str, str]:
        out = {}
        for name in stage.inputs:
            rec = self.record(name)
            if rec is None or rec.get("status") != "done":
                raise RuntimeError(f"internal: stage {stage.name} needs stage {name}, which has not finished in {self.path}")
            out[name] = rec["fingerprint"]
        return out

    def check(self, stage: Stage) -> str:
        """What :meth:`run` would do with ``stage`` ("skip", "resume", "run", "redo"), raising the refusal it would
        raise, touching nothing. Inputs that have not finished yet are not compared (call it before loading data)."""
        rec = self.record(stage.name)
        if rec is None:
            self._refuse_foreign_files(stage)
            return "run"
        if stage.adopt and rec.get("status") == "done":
            return "skip"
        if self.overwrite:
            return "redo"
        params = plain(dict(stage.params))
        if rec.get("params") != params:
            raise StageMismatch(self._params_message(stage.name, rec.get("params") or {}, params))
        if all((self.record(n) or {}).get("status") == "done" for n in stage.inputs):
            now = self._input_fingerprints(stage)
            changed = [n for n in stage.inputs if (rec.get("inputs") or {}).get(n) != now[n]]
            if changed:
                raise StageMismatch(f"cannot reuse stage {stage.name} of {self.path}: it was computed from an earlier result of stage "
                                    f"{', '.join(changed)}, which has been redone since. Pass --overwrite to redo it, or choose another --out")
        if rec.get("status") == "done":
            self._check_outputs(stage.name, rec)
            return "skip"
        if not self.resume:
            raise UnfinishedStage(f"{self.path} holds an unfinished stage {stage.name} (started {rec.get('started', '?')}); "
                                  "pass --resume to continue it or --overwrite to start over")
        return "resume"

    def _params_message(self, name: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        shown = "; ".join(f"{k}: {old.get(k, '(not set)')!r} there, {new.get(k, '(not set)')!r} now" for k in diff[:3])
        more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
        return (f"cannot reuse stage {name} of {self.path}: it was run with other settings ({shown}{more}). "
                "Use the same settings, pass --overwrite to redo it (and what follows from it), or choose another --out")

    def _check_outputs(self, name: str, rec: Mapping[str, Any]) -> None:
        for out, digest in (rec.get("outputs") or {}).items():
            path = self.path / out
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing, but stage {name} of {self.path} wrote it; "
                                        "pass --overwrite to redo the stage, or restore the file")
            if digest is not None and file_digest(path) != digest:
                raise StageMismatch(f"{path} has changed since stage {name} wrote it; pass --overwrite to redo the stage, "
                                    "or restore the file")

    def _refuse_foreign_files(self, stage: Stage) -> None:
        if self.overwrite:
            return
        for out in stage.outputs:
            if (self.path / out).exists():
                raise FileExistsError(f"{self.path / out} exists, but {self.lock_path} has no record of the stage {stage.name} that "
                                      "writes it (an older riftlab's or another program's file): pass --overwrite to replace it, "
                                      "or choose another --out")

    # -- running --------------------------------------------------------------------------------

    def state_of(self, stage_name: str, before_save: Callable[[], Any] | None = None) -> FileState:
        """Stage ``stage_name``'s progress file; ``before_save`` is called before it or a child first saves."""
        return _StageState(self.path / "progress" / f"{stage_name}.pt", self.batch_save_interval, before_save)

    def run(self, stage: Stage) -> dict[str, Any]:
        """Run ``stage`` (or reuse or resume it, see the module docstring) and return its summary."""
        action = self.check(stage)
        distributed.barrier()  # every rank has read the lock before rank 0 writes it
        if action == "redo" and stage.name in self._redone:
            action = "skip"
        if action == "skip":
            if self.log is not None:
                self.log(f"{stage.name}: done earlier, reusing it ({self.path / LOCK})")
            return self.summary(stage.name)
        if action == "redo":
            self._discard(stage)
            self._redone.add(stage.name)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        previous = self.record(stage.name) if action == "resume" else None
        spent = float((previous or {}).get("seconds", 0.0))
        marked: list[bool] = []
        record = {"status": "started", "started": started, "params": plain(dict(stage.params)),
                  "inputs": self._input_fingerprints(stage), "seconds": spent}

        def mark_started() -> None:
            # The record is written when the stage first saves progress or writes a file, not before: a stage that fails
            # before it has computed anything (a checkpoint of another model, say) leaves the run directory as it was.
            if not marked:
                marked.append(True)
                self._update(stage.name, record)

        state = self.state_of(stage.name, mark_started)
        t0 = time.perf_counter()
        ctx = StageContext(self, stage, state, {n: self.summary(n) for n in stage.inputs}, before_write=mark_started)
        try:
            summary = dict(stage.compute(ctx) or {})
        except FloatingPointError as err:  # a loss that diverged: say in which stage, on one line
            raise FloatingPointError(f"stage {stage.name}: {err}") from None
        distributed.barrier()  # rank 0 has written every output
        seconds = spent + time.perf_counter() - t0
        outputs = {out: file_digest(self.path / out) if distributed.is_main() else None for out in stage.outputs}
        self._update(stage.name, {"status": "done", "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "params": plain(dict(stage.params)), "inputs": self._input_fingerprints(stage),
                                  "fingerprint": self.fingerprint_of(stage), "outputs": outputs, "seconds": round(seconds, 3),
                                  "summary": plain(summary)})
        state.clear()
        distributed.barrier()
        return plain(summary)

    def _discard(self, stage: Stage) -> None:
        if distributed.is_main():
            for out in stage.outputs:
                (self.path / out).unlink(missing_ok=True)
            self.state_of(stage.name).clear()
            self._update(stage.name, None)
        distributed.barrier()


class _StageState(FileState):
    """A stage's progress file; its children (per-batch progress inside the stage) save at most every ``interval`` seconds.
    ``before_save`` is called before any of them saves (the runner records the stage as started then)."""

    def __init__(self, path: Path, interval: float, before_save: Callable[[], Any] | None = None, min_interval: float = 0.0):
        super().__init__(path, min_interval=min_interval)
        self._interval = interval
        self._before_save = before_save

    def save(self, progress: dict[str, Any]) -> None:
        if self._before_save is not None:
            self._before_save()
        super().save(progress)

    def child(self, name: str) -> FileState:
        return _StageState(self.path.with_suffix("") / f"{name}.pt", self._interval, self._before_save, self._interval)
