"""Typed settings, read once from the environment (``GATHERING_*``).

Every timing that the guarantees depend on is derived here, in one place:

* The run lease lives ``run_lease_ttl_s`` and is renewed every ``run_lease_ttl_s / 3`` by the
  worker's heartbeat for as long as the task runs (at most ``task_time_limit_s``), so a live
  run never loses it, and a dead worker's run is recoverable ``run_lease_ttl_s`` after death
  instead of a whole time limit later. The sweeper uses the same number as heartbeat timeout.
* ``lock_ttl_s`` = ``task_time_limit_s`` + ``lock_margin_s``: the longest a task may hold
  anything, used to bound the Redis-side leases that are not renewed.
* ``visibility_timeout_s`` (Redis broker) = ``2 * task_time_limit_s`` + ``lock_margin_s``:
  an unacknowledged message is redelivered only after its task could no longer be running.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gathering_tasks.db.engine import DbTimeouts
from gathering_tasks.errors import InvalidInput
from gathering_tasks.skills._validation import check_secret_pattern
from gathering_tasks.skills.allowlist import AllowList


def gathering_home() -> Path:
    """Where the embedded default keeps its files: ``$GATHERING_HOME``, else the user's data
    directory (``$XDG_DATA_HOME/gathering-tasks``, by default ``~/.local/share/gathering-tasks``).
    Absolute, so every process finds the same database from any directory."""
    home = os.environ.get("GATHERING_HOME")
    if home:
        return Path(home).expanduser().resolve()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data).expanduser().resolve() / "gathering-tasks"


def default_database_url() -> str:
    """The embedded default: a SQLite file in :func:`gathering_home`."""
    return f"sqlite:///{gathering_home() / 'gathering.db'}"


# Lists come from the environment as comma-separated text (or a JSON array).
CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """All configuration of gathering-tasks. Secrets are :class:`SecretStr` and never printed."""

    model_config = SettingsConfigDict(env_prefix="GATHERING_", extra="ignore", frozen=True)

    # URLs may carry passwords: keep them out of repr() and logs.
    database_url: str = Field(default_factory=default_database_url, repr=False)
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    broker_url_override: str | None = Field(default=None, alias="GATHERING_BROKER_URL", repr=False)
    key_prefix: str = "gathering"

    # Beat
    beat_tick_s: float = Field(default=1.0, gt=0, le=60)
    beat_batch_size: int = Field(default=1000, ge=1)
    leader_lease_ttl_s: float = Field(default=10.0, gt=1)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    pending_grace_s: float = Field(default=30.0, gt=0)
    # One claim transaction holds at most this many slots: a long outage is caught up in
    # bounded transactions, and the leader re-checks its lease between them.
    beat_slot_budget: int = Field(default=2000, ge=1)
    # Finished runs older than this are pruned by the leader, in bounded batches (0: never).
    retention_days: float = Field(default=30.0, ge=0)
    retention_batch: int = Field(default=1000, ge=1)

    # Tasks
    task_time_limit_s: int = Field(default=300, ge=1)
    run_lease_ttl_s: float = Field(default=30.0, gt=0.5)
    lock_margin_s: int = Field(default=30, ge=1)
    default_queue: str = "gathering"
    worker_prefetch_multiplier: int = Field(default=1, ge=1)
    # How long a worker keeps trying to record an outcome (holding the run's lease and
    # heartbeat) while the database is unreachable, before it gives the run up.
    outcome_retry_s: float = Field(default=300.0, gt=0)

    # Database call bounds (PostgreSQL: connect_timeout, statement_timeout, lock_timeout;
    # SQLite: busy timeout). Each must stay below the run lease TTL; unset, they are derived
    # from it (at most 5 s, 5 s and 2 s).
    db_connect_timeout_s: int | None = Field(default=None, ge=1)
    db_statement_timeout_s: float | None = Field(default=None, gt=0)
    db_lock_timeout_s: float | None = Field(default=None, gt=0)
    run_task_allowlist: CsvList = Field(default_factory=list)
    max_config_bytes: int = Field(default=64 * 1024, ge=1024)
    max_result_bytes: int = Field(default=16 * 1024, ge=256)

    # Pipelines
    pipeline_max_nodes: int = Field(default=1000, ge=1)
    pipeline_max_map_items: int = Field(default=1000, ge=1)

    # HTTP skill (what each setting opens and never opens: docs/security.md). Entries take an
    # optional port or port range: 10.1.2.3:8443, 10.0.0.0/8:80-443, [::1]:8080,
    # api.internal:443; an entry without a port opens every port.
    http_allow_networks: CsvList = Field(default_factory=list)
    http_allow_hosts: CsvList = Field(default_factory=list)
    # Cloud metadata is refused whatever the lists above open; this opens one exact address.
    http_allow_metadata_address_i_know_this_is_dangerous: str | None = None
    http_connect_timeout_s: float = Field(default=5.0, gt=0)
    http_read_timeout_s: float = Field(default=30.0, gt=0)
    http_max_response_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Requests one call may send within one run attempt (the client's own retries). The run's
    # attempts (an action's retry_max_attempts) are the retries by default: a run sends at
    # most retry_max_attempts x http_max_attempts requests (plus redirect hops).
    http_max_attempts: int = Field(default=1, ge=1, le=10)

    # Secrets by reference (token_env, secret_env, env:NAME, ...): only environment variables
    # whose names match one of these fnmatch patterns (HOOK_*,SLACK_*); none by default, and
    # never GATHERING_*.
    secret_env_allow: CsvList = Field(default_factory=list)

    # Notifications (SMTP); webhook secrets are referenced from action configs as env:NAME
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_security: Literal["starttls", "ssl", "none"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "gathering-tasks@localhost"

    # Demo
    demo: bool = False

    @field_validator(
        "run_task_allowlist",
        "http_allow_networks",
        "http_allow_hosts",
        "secret_env_allow",
        mode="before",
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().startswith("["):
            # A JSON array -- or comma-separated text whose first entry is [IPv6]:port.
            try:
                return json.loads(value)
            except ValueError:
                pass
        return [item.strip() for item in value.split(",") if item.strip()]

    @field_validator("secret_env_allow")
    @classmethod
    def _secret_patterns(cls, value: list[str]) -> list[str]:
        return [check_secret_pattern(pattern) for pattern in value]

    @model_validator(mode="after")
    def _http_allowlist_parses(self) -> Settings:
        # Refused at start, not at every run: a typo must not silently open nothing (or more).
        try:
            AllowList.parse(
                self.http_allow_networks,
                self.http_allow_hosts,
                self.http_allow_metadata_address_i_know_this_is_dangerous,
            )
        except InvalidInput as exc:
            raise ValueError(str(exc)) from exc
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def broker_url(self) -> str:
        return self.broker_url_override or self.redis_url

    @computed_field  # type: ignore[prop-decorator]
    @property
    def lock_ttl_s(self) -> int:
        return self.task_time_limit_s + self.lock_margin_s

    @computed_field  # type: ignore[prop-decorator]
    @property
    def visibility_timeout_s(self) -> int:
        return 2 * self.task_time_limit_s + self.lock_margin_s

    @computed_field  # type: ignore[prop-decorator]
    @property
    def heartbeat_interval_s(self) -> float:
        return self.run_lease_ttl_s / 3

    @model_validator(mode="after")
    def _bounded_below_lease(self) -> Settings:
        for name in ("db_statement_timeout_s", "db_lock_timeout_s", "db_connect_timeout_s"):
            value = getattr(self, name)
            if value is not None and value >= self.run_lease_ttl_s:
                raise ValueError(
                    f"{name} must be below run_lease_ttl_s ({self.run_lease_ttl_s}): a "
                    "database call must end before a live run could be presumed dead"
                )
        return self

    @property
    def db_timeouts(self) -> DbTimeouts:
        half_s = self.run_lease_ttl_s / 2
        return DbTimeouts(
            connect_s=self.db_connect_timeout_s or max(1, min(5, int(half_s))),
            statement_s=self.db_statement_timeout_s or min(5.0, half_s),
            lock_s=self.db_lock_timeout_s or min(2.0, half_s / 2),
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    # -- Operators: queues, user modules, metrics ----------------------------------------
    # Workers also consume Celery's default queue ``celery``, so that a plain
    # ``send_task("gathering.trigger_action", ...)`` without ``queue=`` is not lost. Turn it
    # off on a broker shared with another Celery app that uses its default queue.
    consume_celery_queue: bool = True
    # Modules every worker (and beat) imports at start: user handlers and Celery tasks.
    imports: CsvList = Field(default_factory=list)

    # Prometheus metrics (docs/metrics.md): off unless a port is given. Give each process
    # on a host its own port (a worker's pool children share their parent's endpoint).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_address: str = "127.0.0.1"
    # Where a worker's pool processes keep their samples (default: a fresh temporary dir).
    metrics_dir: str | None = None

    @field_validator("imports", mode="before")
    @classmethod
    def _split_imports(cls, value: object) -> object:
        return cls._split_csv(value)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings (read once). Tests call ``get_settings.cache_clear()``."""
    return Settings()
