"""The driver's progress bar: jobs finished (here or anywhere in a Ray cluster), images/min, ETA."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} jobs [{elapsed}<{remaining}{postfix}]"


class Progress:
    def __init__(self, total: int, before: int, *, failed: int = 0, enabled: bool = True):
        """`before`: jobs finished by earlier runs; `failed`: failed already (bad job lines)."""
        self.before, self.done, self.failed = before, 0, failed
        self._t0 = time.perf_counter()
        # smoothing=0: the ETA from the average rate of this run (jobs vary; the last one says little)
        self._bar = tqdm(total=total, initial=before + failed, unit="job", smoothing=0, bar_format=BAR_FORMAT,
                         disable=not enabled, file=sys.stderr, dynamic_ncols=True, desc="fastsd.batch ")
        self._enabled = enabled

    def finished(self, ok: bool) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        post = f"{rate:.1f} img/min" + (f", {self.failed} failed" if self.failed else "")
        self._bar.set_postfix_str(post, refresh=False)
        self._bar.update(1)

    def log(self, msg: str) -> None:
        """A line above the bar (tqdm.write keeps the bar intact)."""
        if self._enabled:
            tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def counts(self) -> dict:
        return {"done": self.done, "failed": self.failed, "before": self.before}

    def close(self) -> None:
        self._bar.close()
