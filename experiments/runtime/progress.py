"""Progress bars (on process 0, quiet elsewhere) and the metrics they show."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from theorax.experiments.runtime.processes import is_main_process


class _Quiet:
    """Stands in for a progress bar on processes other than 0."""

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...
    def __iter__(self):
        return iter(())


def progress(total: int, *, desc: str, initial: int = 0):
    """A tqdm bar with ETA on process 0 (quieter, one line every 10 s, when stderr is not a terminal)."""
    if not is_main_process():
        return _Quiet()
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.5 if tty else 10.0,
        leave=True,
        file=sys.stderr,
    )


def format_metrics(metrics: Mapping[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items()}
