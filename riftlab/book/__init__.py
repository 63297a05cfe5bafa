"""Helpers for the book's notebooks: configuration, reproducible setup, glue, load-or-compute.

The notebooks call these so that each chapter is short, runs alone (recomputing what an earlier
chapter would have saved) and gives the same outputs on every run of its default parameters. They
are used as ``from riftlab import book; book.glue(...)``; each name lives in one submodule:

* :mod:`~riftlab.book.notebook`: where a notebook runs and how (:func:`on_colab`, :func:`run_root`,
  :func:`environment`, :func:`setup`) and its numbers into the prose (:func:`glue`,
  :func:`round_floats`, :func:`direction`);
* :mod:`~riftlab.book.artifacts`: the artifacts folder and its keys (:func:`load_or_compute`,
  :func:`code_version`, :func:`state_hash`);
* :mod:`~riftlab.book.chapters`: a chapter's configuration and data, and the expensive steps cached
  (:func:`trained_models`, :func:`mrc_table`, :func:`finetuned`, :func:`evaluation`, :func:`rift`, ...);
* :mod:`~riftlab.book.figures`: figures not tied to one study (:func:`plot_attacks`);
* :mod:`~riftlab.book.study`: the scale study's committed results as tables, figures and sentences;
* :mod:`~riftlab.book.decomposition`: the study's decomposition of RiFT's gain (the authors' protocol,
  its parts one by one, the number choosing on test prints).

Nothing here re-implements the method: every step calls the riftlab function that does it.
"""

from __future__ import annotations

from .artifacts import artifact_dir, artifact_path, code_version, load_or_compute, state_hash
from .chapters import (ALL_LAYERS, chapter_config, class_names, comparison, config_summary, evaluation, finetuned, load_data, loaders,
                       mrc_table, rift, trained_models)
from .decomposition import (SETTING_LABELS, decomposition_across_widths, decomposition_answer, decomposition_blocks, decomposition_end_points,
                            decomposition_over_seeds, decomposition_widths,
                            decomposition_regime_sentence, decomposition_regimes, decomposition_selection_sentence, decomposition_table,
                            plot_decomposition)
from .figures import plot_attacks
from .notebook import direction, environment, glue, on_colab, round_floats, run_root, setup
from .study import (TABLE3_LABELS, VARIANT_LABELS, interval_text, plot_study_mrc, plot_study_trend, study_confirmation_sentence,
                    study_confirmations, study_curve, study_curve_sentence, study_headline, study_machines, study_models, study_results,
                    study_summary_sentence, study_table3, study_tie_check, study_trend, study_variants, study_width_note)

__all__ = [
    # notebook
    "on_colab", "run_root", "environment", "setup", "glue", "round_floats", "direction",
    # artifacts
    "artifact_dir", "artifact_path", "load_or_compute", "code_version", "state_hash",
    # chapters
    "ALL_LAYERS", "chapter_config", "config_summary", "load_data", "loaders", "class_names",
    "trained_models", "evaluation", "mrc_table", "finetuned", "rift", "comparison",
    # figures
    "plot_attacks",
    # study
    "study_results", "interval_text", "study_machines", "study_curve", "study_curve_sentence", "study_width_note",
    "study_models", "study_trend", "VARIANT_LABELS", "study_variants", "study_headline", "study_summary_sentence", "plot_study_trend",
    "plot_study_mrc", "study_table3", "TABLE3_LABELS", "study_confirmations", "study_confirmation_sentence", "study_tie_check",
    # decomposition
    "SETTING_LABELS", "decomposition_widths", "decomposition_blocks", "decomposition_across_widths", "decomposition_regimes", "decomposition_regime_sentence", "decomposition_table",
    "decomposition_end_points", "decomposition_over_seeds", "plot_decomposition", "decomposition_selection_sentence",
    "decomposition_answer",
]
