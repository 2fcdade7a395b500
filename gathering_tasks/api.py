"""The Python API for actions: create, read, update, pause, resume, delete, trigger.

Every change lands in the database and takes effect at beat's next tick; no restart.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError

from gathering_tasks import runtime
from gathering_tasks.action_import import (
    Checked,
    EntryProblem,
    ImportInvalid,
    ImportResult,
    PlannedEntry,
    Progress,
    plan_import,
)
from gathering_tasks.actions import NAME_RE, ActionSpec, validate_action
from gathering_tasks.app import app as celery_app
from gathering_tasks.clock import utcnow
from gathering_tasks.db.actions import Change, Insert, Replace
from gathering_tasks.db.ledger import FINAL, Dispatch, trigger_key
from gathering_tasks.db.models import ACTION_STATUSES, RUN_STATUSES
from gathering_tasks.db.repo import Repository
from gathering_tasks.errors import InvalidInput, NotFound, WaitTimedOut
from gathering_tasks.pipelines.definition import PipelineSpec, parse_pipeline
from gathering_tasks.publish import publish
from gathering_tasks.schedules import OnceSchedule, Schedule, first_slot, schedule_to_spec
from gathering_tasks.settings import Settings
from gathering_tasks.work import task_allowed

log = logging.getLogger(__name__)


def action_service() -> ActionService:
    """The service wired to the configured database and broker: ``action_service().pause(n)``."""
    settings = runtime.settings()

    def publish_one(dispatch: Dispatch) -> None:
        publish(celery_app, [dispatch], default_queue=settings.default_queue)

    return ActionService(
        runtime.repository(), settings, task_allowed=task_allowed, publish=publish_one
    )


def wait_until(
    read: Callable[[], dict[str, Any] | None],
    *,
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float,
    poll_s: float = 0.5,
    what: str = "the run",
) -> dict[str, Any]:
    """Poll ``read`` until what it returns is ``done``; :class:`WaitTimedOut` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if value is not None and done(value):
            return value
        if time.monotonic() >= deadline:
            state = f"still {value['status']}" if value is not None else "not created yet"
            raise WaitTimedOut(f"{what} is {state} after {timeout_s:g}s")
        time.sleep(poll_s)


def run_is_final(run: Mapping[str, Any]) -> bool:
    """Has an action run (a ledger record) ended?"""
    return str(run["status"]) in FINAL


def pipeline_run_is_final(run: Mapping[str, Any]) -> bool:
    return str(run["status"]) != "running"


def initial_slot(spec: ActionSpec, schedule: Schedule, now: datetime) -> datetime | None:
    """The first slot an action runs: at or after now and its start, not past its end."""
    not_before = max(now, spec.start_at) if spec.start_at else now
    slot = first_slot(schedule, not_before=not_before)
    if slot is None or (spec.end_at is not None and slot > spec.end_at):
        return None
    return slot


def _columns(spec: ActionSpec, schedule: Schedule) -> dict[str, Any]:
    values = spec.model_dump(exclude={"config"})
    values["action_config"] = spec.config
    # Stored normalised (UTC times, the default interval anchor made explicit), so every
    # later parse gives the same slots.
    values["schedule"] = schedule_to_spec(schedule)
    return values


# What ``actions show`` prints besides the definition: state, never accepted as input.
READ_ONLY_FIELDS = frozenset(
    {"id", "status", "run_count", "next_run_at", "last_run_at", "skipped_slots", "archived_at"}
)


def action_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """An action as ``actions show`` prints it: the definition (``config``), then its state.

    ``actions add --file`` accepts exactly this back (see :func:`definition_from_view`)."""
    view = {key: value for key, value in row.items() if key != "action_config"}
    view["config"] = row.get("action_config")
    return view


def definition_from_view(data: Mapping[str, Any]) -> dict[str, Any]:
    """A definition from what a user wrote, or from ``actions show`` output: state fields are
    dropped, ``action_config`` is read as ``config``, and unset (null) fields are left out."""
    out = {k: v for k, v in data.items() if k not in READ_ONLY_FIELDS and v is not None}
    if "action_config" in out:
        legacy = out.pop("action_config")
        out.setdefault("config", legacy)
    return out


def assign_paths(spec: Mapping[str, Any], assignments: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with each dotted ``path`` set to its value (nested objects made as needed)."""
    out: dict[str, Any] = json.loads(json.dumps(spec, default=str))
    for path, value in assignments.items():
        head, *rest = path.split(".")
        if head not in ActionSpec.model_fields or head in READ_ONLY_FIELDS:
            raise InvalidInput("is not a field of an action definition", field=path)
        target = out
        for part in [head, *rest][:-1]:
            child = target.get(part)
            if not isinstance(child, dict):
                child = target[part] = {}
            target = child
        target[[head, *rest][-1]] = value
    return out


def _known(value: str | None, allowed: tuple[str, ...], field: str) -> None:
    if value is not None and value not in allowed:
        raise InvalidInput(f"must be one of {', '.join(allowed)}", field=field)


def _status_after_change(current_status: str, slot: datetime | None) -> str:
    """A changed definition keeps a pause (or a disable); otherwise its next slot decides."""
    if current_status in ("paused", "disabled"):
        return current_status
    return "active" if slot else "completed"


def _spec_data(current: Mapping[str, Any]) -> dict[str, Any]:
    """An action row as the definition a user would write (``config``, not ``action_config``)."""
    data = {
        key: current[key]
        for key in ActionSpec.model_fields
        if key in current and current[key] is not None
    }
    data["config"] = current["action_config"]
    return data


class ActionService:
    """Actions as a user sees them. Dependencies are passed in; nothing global."""

    def __init__(
        self,
        repo: Repository,
        settings: Settings,
        *,
        task_allowed: Callable[[str], bool],
        publish: Callable[[Dispatch], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self._task_allowed = task_allowed
        self._publish = publish
        self._clock = clock

    def _validate(self, data: Mapping[str, Any], now: datetime) -> tuple[ActionSpec, Schedule]:
        return validate_action(
            data,
            now=now,
            max_config_bytes=self.settings.max_config_bytes,
            max_timeout_s=self.settings.task_time_limit_s,
            task_allowed=self._task_allowed,
            settings=self.settings,
        )

    def create(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and store a new action. Nothing is written if anything is invalid."""
        now = self._clock()
        spec, schedule = self._validate(data, now)
        first = initial_slot(spec, schedule, now)
        if first is None:
            # An action that could never run is a mistake worth saying, not a silent no-op.
            field = "schedule.at" if isinstance(schedule, OnceSchedule) else "end_at"
            raise InvalidInput(
                "leaves no slot at or after now: the action would never run", field=field
            )
        return self.repo.actions.create(_columns(spec, schedule), next_run_at=first, now=now)

    def update(self, name: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change an action's definition; its next slot is recomputed from now.

        Read, validation and write happen under the action's row lock, so a concurrent
        pause or resume is never lost.
        """
        return self._change(name, lambda spec: {**spec, **changes})

    def edit(self, name: str, assignments: Mapping[str, Any]) -> dict[str, Any]:
        """Set fields by dotted path (``{"config.kwargs.who": "ops", "timeout_s": 30}``),
        applied to the definition read under the row lock, then validated as a whole."""
        return self._change(name, lambda spec: assign_paths(spec, assignments))

    def _change(
        self, name: str, edit: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        now = self._clock()

        def change(current: dict[str, Any]) -> dict[str, Any]:
            merged = edit(_spec_data(current))
            if merged.get("name") != name:
                raise InvalidInput("cannot be changed; create a new action instead", field="name")
            spec, schedule = self._validate(merged, now)
            slot = initial_slot(spec, schedule, now)
            status = _status_after_change(current["status"], slot)
            return {**_columns(spec, schedule), "next_run_at": slot, "status": status}

        return self.repo.actions.mutate(name, change, now=now)

    def import_actions(
        self,
        entries: Sequence[object],
        *,
        upsert: bool = False,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> ImportResult:
        """Create (``upsert``: or replace) many actions, all or none.

        Every entry is checked first (:class:`ImportInvalid` lists every problem, naming
        entry, name and field); then all are stored in one transaction. A name already live
        is a problem unless ``upsert``, which replaces that action's definition as
        :meth:`update` does (a pause is kept). ``dry_run`` checks and stores nothing.
        """
        now = self._clock()
        existing = {str(action["name"]) for action in self.repo.actions.list_actions()}
        planned = plan_import(
            entries,
            check=lambda data: self._check_entry(data, now),
            existing=existing,
            upsert=upsert,
            progress=progress,
        )
        result = ImportResult(
            created=[p.name for p in planned if not p.replace],
            updated=[p.name for p in planned if p.replace],
            dry_run=dry_run,
        )
        if not dry_run:
            self._store_planned(planned, now, progress)
        return result

    def _check_entry(self, data: Mapping[str, Any], now: datetime) -> Checked:
        spec, schedule = self._validate(definition_from_view(data), now)
        return Checked(spec, schedule, initial_slot(spec, schedule, now))

    def _store_planned(
        self, planned: list[PlannedEntry], now: datetime, progress: Progress | None
    ) -> None:
        writes = [_write_of(entry) for entry in planned]
        written = 0

        def stored(done: int) -> None:
            nonlocal written
            written = done
            if progress is not None:
                progress("storing", done, len(writes))

        try:
            self.repo.actions.write_all(writes, now=now, on_write=stored)
        except (InvalidInput, NotFound) as exc:
            # The write after the last one stored failed: its action was created, or
            # archived, by someone else between the checks and the transaction.
            failed = planned[written]
            reason = exc.reason if isinstance(exc, InvalidInput) else str(exc)
            problem = EntryProblem(
                failed.entry, failed.name, "name", f"{reason} (changed meanwhile)"
            )
            raise ImportInvalid([problem], len(planned)) from exc

    def get(self, name: str) -> dict[str, Any]:
        return self.repo.actions.get(name)

    def list_actions(self, status: str | None = None) -> list[dict[str, Any]]:
        """Live actions, or those with ``status`` (one of ``ACTION_STATUSES``)."""
        _known(status, ACTION_STATUSES, "status")
        return self.repo.actions.list_actions(status)

    def pause(self, name: str) -> dict[str, Any]:
        return self.repo.actions.mutate(name, lambda _c: {"status": "paused"}, now=self._clock())

    def resume(self, name: str) -> dict[str, Any]:
        """Resume from now: slots missed while paused are not run."""
        now = self._clock()

        def change(current: dict[str, Any]) -> dict[str, Any]:
            spec, schedule = self._validate(_spec_data(current), now)
            slot = initial_slot(spec, schedule, now)
            return {"status": "active" if slot else "completed", "next_run_at": slot}

        return self.repo.actions.mutate(name, change, now=now)

    def delete(self, name: str) -> dict[str, Any]:
        """Archive the action: it never runs again, its history stays, its name is free.

        Queued runs are cancelled; a run in flight finishes and is recorded."""
        return self.repo.actions.archive(name, now=self._clock())

    def trigger(self, name: str, *, trigger: str = "manual", key: str | None = None) -> int:
        """Run an action now, outside its schedule. Returns the run id.

        With ``key``, a repeated call with the same key returns the first run instead of
        making another."""
        dispatch, status = self.repo.claims.trigger(
            name, now=self._clock(), trigger=trigger, key=key
        )
        if self._publish is not None and status == "pending":
            try:
                self._publish(dispatch)
            except (BrokerError, RedisError, OSError) as exc:
                # The run is recorded; the beat leader's sweeper publishes it later.
                log.warning(
                    "run %d recorded; publishing failed (%s), the sweeper will retry",
                    dispatch.record_id,
                    exc,
                    extra={"run_id": dispatch.record_id},
                )
        return dispatch.record_id

    def cancel_run(self, run_id: int) -> str:
        """Cancel a run: a queued one at once; a running one is told to stop (its worker
        aborts the work and records ``cancelled``). Returns the run's status."""
        return self.repo.ledger.cancel(run_id)

    def get_run(self, run_id: int) -> dict[str, Any]:
        return self.repo.ledger.get(run_id)

    def wait_run(self, run_id: int, *, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
        """The run once it has ended (succeeded, failed, timed out, cancelled or skipped)."""
        return wait_until(
            lambda: self.get_run(run_id),
            done=run_is_final,
            timeout_s=timeout_s,
            poll_s=poll_s,
            what=f"run {run_id}",
        )

    def find_trigger(self, name: str, key: str) -> dict[str, Any] | None:
        """The run a trigger of ``name`` with ``key`` made (for a ``gathering.trigger_action``
        message without a key, its message id), or None while it is not recorded yet."""
        action_id = int(self.repo.actions.get(name)["id"])
        return self.repo.ledger.find(trigger_key(action_id, key))

    def list_runs(
        self, *, action: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recent runs; an unknown ``status`` is InvalidInput, an unknown ``action`` NotFound."""
        _known(status, RUN_STATUSES, "status")
        runs = self.repo.ledger.list_runs(action=action, status=status, limit=limit)
        if action and not runs and not self._ever_existed(action):
            raise NotFound(f"no action named {action!r}")
        return runs

    def _ever_existed(self, name: str) -> bool:
        try:
            self.repo.actions.get(name)
        except NotFound:
            return any(a["name"] == name for a in self.repo.actions.list_actions("archived"))
        return True

    def runs_by_status(self, *, since: datetime) -> dict[str, int]:
        """Records (actions' runs and pipeline nodes) changed since ``since``, by status."""
        return self.repo.ledger.count_runs(since=since)


def _write_of(entry: PlannedEntry) -> Insert | Replace:
    checked = entry.checked
    values = _columns(checked.spec, checked.schedule)
    if not entry.replace:
        return Insert(values, checked.first_slot)

    def change(current: dict[str, Any]) -> dict[str, Any]:
        status = _status_after_change(current["status"], checked.first_slot)
        return {**values, "next_run_at": checked.first_slot, "status": status}

    replace: Change = change
    return Replace(entry.name, replace)


def pipeline_service() -> PipelineService:
    """Pipelines wired to the configured database and broker."""
    settings = runtime.settings()

    def publish_all(dispatches: list[Dispatch]) -> None:
        publish(celery_app, dispatches, default_queue=settings.default_queue)

    return PipelineService(
        runtime.repository(), settings, task_allowed=task_allowed, publish=publish_all
    )


class PipelineService:
    """Pipelines as a user sees them: versioned definitions, runs, cancellation."""

    def __init__(
        self,
        repo: Repository,
        settings: Settings,
        *,
        task_allowed: Callable[[str], bool],
        publish: Callable[[list[Dispatch]], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.repo = repo
        self.settings = settings
        self._task_allowed = task_allowed
        self._publish = publish
        self._clock = clock

    def validate(self, definition: Mapping[str, Any] | str) -> PipelineSpec:
        """Parse and check a definition (JSON or YAML); every error at once."""
        return parse_pipeline(
            definition,
            max_nodes=self.settings.pipeline_max_nodes,
            max_map_items=self.settings.pipeline_max_map_items,
            task_allowed=self._task_allowed,
        )

    def create(self, name: str, definition: Mapping[str, Any] | str) -> dict[str, Any]:
        if not NAME_RE.match(name):
            raise InvalidInput("must be 1-200 letters, digits, '_', '.', ':' or '-'", field="name")
        return self.repo.pipelines.create(name, self.validate(definition), now=self._clock())

    def update(self, name: str, definition: Mapping[str, Any] | str) -> dict[str, Any]:
        """A new version; runs already started keep theirs."""
        return self.repo.pipelines.new_version(name, self.validate(definition), now=self._clock())

    def get(self, name: str) -> dict[str, Any]:
        return self.repo.pipelines.get(name)

    def list_pipelines(self) -> list[dict[str, Any]]:
        return self.repo.pipelines.list_pipelines()

    def versions(self, name: str) -> list[dict[str, Any]]:
        return self.repo.pipelines.versions(name)

    def run(
        self, name: str, data: Mapping[str, Any] | None = None, *, key: str | None = None
    ) -> int:
        """Start a run of the pipeline's current version. Returns the pipeline run id.

        With ``key``, a repeated call returns the first run instead of starting another."""
        if data is not None and not isinstance(data, Mapping):
            raise InvalidInput("must be a JSON object", field="data")
        started = self.repo.pipelines.start_run(
            name,
            data=dict(data or {}),
            dedupe_key=f"api:{key or uuid.uuid4().hex}",
            now=self._clock(),
        )
        if self._publish is not None and started.dispatches:
            try:
                self._publish(started.dispatches)
            except (BrokerError, RedisError, OSError) as exc:
                log.warning("pipeline run %d recorded; publishing failed (%s)", started.run_id, exc)
        return started.run_id

    def cancel(self, run_id: int) -> str:
        """Cancel a run: queued nodes end, running ones are told to stop."""
        return self.repo.pipelines.cancel_run(run_id, now=self._clock())

    def find_run(self, key: str) -> dict[str, Any] | None:
        """The run started with ``key`` (for a ``gathering.run_pipeline`` message without a
        key, its message id), or None while it is not recorded yet."""
        return self.repo.pipelines.find_run(f"api:{key}")

    def get_run(self, run_id: int) -> dict[str, Any]:
        """A run with every node record (status, attempt, input, output, error, timings)."""
        return self.repo.pipelines.get_run(run_id)

    def list_runs(self, name: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
        return self.repo.pipelines.list_runs(name, limit=limit)
