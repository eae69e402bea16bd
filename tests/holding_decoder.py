"""A decoder that holds the first sample it is given until its worker is killed, so a test can kill a worker
that is known to hold a task (imported by the spawned DALI workers, hence its own module)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dali_arb.loader.decoders import OpenCVDecoder

HOLD_LIMIT_S = 60.0


class HoldingDecoder(OpenCVDecoder):
    def __init__(self, meeting: str) -> None:
        self.meeting = meeting

    def prepare(self, data, geometry):
        try:  # the first worker to get here claims the hold; a restarted pipeline's workers never do
            os.close(os.open(Path(self.meeting, "claimed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return super().prepare(data, geometry)
        Path(self.meeting, "pid.partial").write_text(str(os.getpid()))
        os.replace(Path(self.meeting, "pid.partial"), Path(self.meeting, "pid"))
        deadline = time.monotonic() + HOLD_LIMIT_S  # bounded: the test kills this process long before
        while time.monotonic() < deadline:
            time.sleep(0.05)
        return super().prepare(data, geometry)
