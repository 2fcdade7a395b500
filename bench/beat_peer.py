"""Measure Celery's own ``PersistentScheduler`` (what ``celery beat`` runs by default).

Run by ``bench/beat.py`` as ``python -m bench.beat_peer --n N --config JSON``: N entries in
``beat_schedule`` (half intervals, half crontabs, none due during the run), the sequence of
:func:`bench.beat_child.run`. The schedule lives in the process (and a shelve file): to make K
entries due their ``last_run_at`` is set in memory and the heap rebuilt, as after a restart;
it has no way to take an edit while running, so there is no pick-up. Imports nothing of ours.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from celery.beat import PersistentScheduler

from bench import beat_child
from bench.measure import spread_ids
from bench.peer_common import (
    OVERDUE,
    PeerBase,
    beat_schedule,
    entry_name,
    peer_app,
    start_scheduler,
)


class Persistent(PeerBase):
    name = "PersistentScheduler"

    def __init__(self, n: int, config_json: str) -> None:
        self.config_json = config_json
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-beat-")
        self.app = peer_app(config_json, "bench-persistent")
        super().__init__(n, self.app.conf.broker_url)

    def start(self) -> None:
        self.app.conf.beat_schedule = beat_schedule(self.n)
        self.scheduler = start_scheduler(
            self.app,
            PersistentScheduler,
            schedule_filename=str(Path(self.tmp.name) / "schedule"),
        )
        self.count_sends()
        self.scheduler.tick()

    def make_due(self, k: int) -> None:
        overdue = datetime.now(UTC) - OVERDUE
        schedule = self.scheduler.schedule
        for i in spread_ids(self.n, k):
            schedule[entry_name(i)].last_run_at = overdue
        self.scheduler._heap = None  # rebuilt on the next tick, with the due entries first

    def extra(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.tmp.cleanup()


def main() -> None:
    args = beat_child.parse_args(__doc__)
    beat_child.run(Persistent(args.n, args.config), args)


if __name__ == "__main__":
    main()
