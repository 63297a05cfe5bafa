"""pytest settings for ``pytest --nbval notebooks/...`` (see ``make test``).

nbval re-executes each notebook and compares every cell's new outputs with the stored ones. It
compares *all* stream outputs, stderr included, and has no option to leave stderr out; stderr
carries what legitimately differs from run to run or machine to machine: progress bars (tqdm
writes to stderr), library warnings (deprecations, "no GPU" notices) and kernel noise. This hook
drops stderr streams from both sides before nbval compares them, so that:

* stdout, rich outputs (tables as text/html and text/plain, markdown) and errors are still
  compared (an exception fails the cell whatever its stream, and stored errors must re-occur);
* images (image/png) are not compared: nbval skips them itself unless run with ``--nbdime``;
* volatile text (timings, paths, addresses) is masked by ``book/nbval_sanitize.cfg``.
"""

from __future__ import annotations

try:
    from nbval.plugin import IPyNbCell
except ImportError:  # nbval not installed: nothing to configure
    IPyNbCell = None


def _without_stderr(outputs):
    return [out for out in outputs if not (out.get("output_type") == "stream" and out.get("name") == "stderr")]


if IPyNbCell is not None and not getattr(IPyNbCell.compare_outputs, "_riftlab_no_stderr", False):
    _compare_outputs = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        return _compare_outputs(self, _without_stderr(test), _without_stderr(ref), skip_compare)

    compare_outputs._riftlab_no_stderr = True
    IPyNbCell.compare_outputs = compare_outputs
