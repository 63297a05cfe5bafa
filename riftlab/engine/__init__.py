"""The run engine: one place that keeps runs.

``runner`` (stages, fingerprints, the run directory and its lock file, progress files), ``config``
(every setting of a run and the named profiles), ``pipeline`` (RiFT's stages: ``run_rift`` and the
step commands), ``ablation`` (the paper's Tables 3-4) and ``reproduce`` (Table 1).
"""

from .config import PROFILES, RiftConfig
from .pipeline import RiftRun, run_rift
from .runner import RunDir, Stage, StageMismatch

__all__ = ["RiftConfig", "PROFILES", "RiftRun", "run_rift", "RunDir", "Stage", "StageMismatch"]
