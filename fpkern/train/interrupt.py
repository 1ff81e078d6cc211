"""A graceful stop on SIGINT (Ctrl-C) and SIGTERM (kill, schedulers, torchrun's agent).

While a ``StopRequest`` is installed, the first of these signals only records itself; the
training loop polls ``agreed()`` between steps, so the step under way finishes, a checkpoint
of it is written and the metrics are closed before the run raises ``TrainingInterrupted``,
a SystemExit with the shell's code for the signal (128 + its number: 130 for SIGINT, 143 for
SIGTERM). ``python -m fpkern.train`` thus exits with that code and no traceback, and
``--resume`` continues exactly where the run stopped. The same signal a second time stops
at once, without a checkpoint (a different one is taken as the same request: under
torchrun Ctrl-C reaches each worker as SIGINT from the terminal and SIGTERM from the agent).

Under torch.distributed ``agreed()`` is a collective: every rank stops after the same step,
the first at which any rank has seen a signal, so the checkpoint's collectives line up.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

__all__ = ["StopRequest", "TrainingInterrupted", "exit_code"]

log = logging.getLogger("fpkern.train")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by signal signum."""
    return 128 + int(signum)


class TrainingInterrupted(SystemExit):
    """The run stopped on a signal; ``code`` is 128 + the signal number.

    A SystemExit so that the command exits with that code without a traceback and so that
    ``except Exception`` does not swallow the user's request to stop. ``step`` is the last
    step taken, ``checkpoint`` the newest checkpoint (None if the run saved none), ``aborted``
    whether it stopped at once, without finishing the step."""

    def __init__(self, signum: int, step: int | None, checkpoint: Path | None, *,
                 aborted: bool = False):
        super().__init__(exit_code(signum))
        self.signum, self.step, self.checkpoint, self.aborted = signum, step, checkpoint, aborted

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.aborted:
            return (f"stopped at once by a second {name}, without a checkpoint of the step "
                    "under way")
        if self.checkpoint is None:
            return f"stopped by {name} after step {self.step}; no checkpoint was written"
        return (f"stopped by {name} after step {self.step}; --resume continues from "
                f"{self.checkpoint}")


class StopRequest:
    """The stop signals' handlers while entered as a context manager (in the main thread
    only: elsewhere Python cannot install handlers and the signals keep their own). The
    previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        else:
            log.debug("not the main thread: SIGINT/SIGTERM keep their handlers")
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            log.warning("%s: stopping after this step with a checkpoint (%s again: at once, "
                        "without one)", name, name)
        elif signum == self.signum:
            stopped = TrainingInterrupted(signum, None, None, aborted=True)
            log.error("%s", stopped)
            raise stopped
        else:
            log.info("%s: already stopping after this step", name)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask for a stop as the first signal would (for callers that are not signals)."""
        if self.signum is None:
            self.signum = int(signum)

    def agreed(self, device: torch.device | str = "cpu") -> int | None:
        """The signal to stop on, None to go on. With several ranks a collective that every
        rank must reach at the same point: the highest signal any rank has seen, which
        every rank then holds as its own."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        seen = int(flag.item())
        if seen and self.signum is None:
            self.signum = seen
        return seen or None
