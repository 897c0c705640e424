"""Build progress on the terminal, fed by TensorRT's IProgressMonitor.

TensorRT reports nested phases ("Building engine" > "Optimizing graph" > ...), each with a number
of steps. We show the two outermost levels as bars and name the innermost phase on the second
one; deeper levels come and go too fast to be worth a line of their own. Callbacks arrive from
TensorRT's C++ code, where an exception would abort the build, so every callback swallows its own.
"""
from __future__ import annotations

import sys


def make_monitor(base, enabled: bool = True):
    """An instance of a subclass of `base` (the flavour's IProgressMonitor), or None without one."""
    if base is None or not enabled:
        return None
    from tqdm import tqdm

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.depth: dict[str, int] = {}
            self.bars: dict[str, object] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                depth = self.depth[phase_name] = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
                if depth < 2:
                    self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=depth, leave=False,
                                                 file=sys.stderr, unit="step", dynamic_ncols=True,
                                                 disable=None)    # None: no bars when stderr is not a terminal
                elif (bar := self._bar(1)) is not None:
                    bar.set_postfix_str(phase_name, refresh=True)
            except Exception:
                pass

        def _bar(self, depth):
            return next((b for n, b in self.bars.items() if self.depth.get(n) == depth), None)

        def step_complete(self, phase_name, step):
            try:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            except Exception:
                pass
            return True             # never cancel the build

        def phase_finish(self, phase_name):
            try:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()
                self.depth.pop(phase_name, None)
            except Exception:
                pass

        def close(self):
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

    return Monitor()
