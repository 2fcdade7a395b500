"""Typed settings, read once from the environment (``GATHERING_*``).

Every timing that the guarantees depend on is derived here, in one place:

* The run lease lives ``run_lease_ttl_s`` and is renewed every ``run_lease_ttl_s / 3`` by the
  worker's heartbeat for as long as the task runs (at most ``task_time_limit_s``), so a live
  run never loses it, and a dead worker's run is recoverable ``run_lease_ttl_s`` after death
  instead of a whole time limit later. The sweeper uses the same number as heartbeat timeout.
* ``lock_ttl_s`` = ``task_time_limit_s`` + ``lock_margin_s``: the longest a task may hold
  anything (informational; no built-in lease is sized from it).
* ``visibility_timeout_s`` (Redis broker) = ``2 * task_time_limit_s`` + ``lock_margin_s``:
  an unacknowledged message is redelivered only after its task could no longer be running.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gathering_tasks.db.engine import DbTimeouts
from gathering_tasks.errors import ConfigError, InvalidInput
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
    """All configuration of gathering-tasks. Secrets are :class:`SecretStr` and never printed.

    Every field has a ``description``: docs/configuration.md is generated from them
    (``gathering-tasks config reference``), and a test keeps the page in sync.
    """

    model_config = SettingsConfigDict(env_prefix="GATHERING_", extra="ignore", frozen=True)

    # URLs may carry passwords: keep them out of repr() and logs.
    database_url: str = Field(
        default_factory=default_database_url,
        repr=False,
        description="SQLAlchemy URL of the database every process shares. PostgreSQL in "
        "production (`postgresql+psycopg2://user:password@host:5432/db`); the embedded "
        "default is a SQLite file, refused until `gathering-tasks db upgrade` made it.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        repr=False,
        description="Redis that holds the run leases and the beat leader lease; also the "
        "broker unless GATHERING_BROKER_URL is set.",
    )
    broker_url_override: str | None = Field(
        default=None,
        alias="GATHERING_BROKER_URL",
        repr=False,
        description="Celery broker URL, when it is not GATHERING_REDIS_URL.",
    )
    key_prefix: str = Field(
        default="gathering",
        description="Prefix of every Redis key (run leases, beat leader lease). Deployments "
        "sharing one Redis need different prefixes.",
    )

    # Beat
    beat_tick_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between beat's looks at the due-time index: the longest a due "
        "slot waits before it is claimed.",
    )
    beat_batch_size: int = Field(
        default=1000,
        ge=1,
        description="Due actions claimed per claim transaction.",
    )
    leader_lease_ttl_s: float = Field(
        default=10.0,
        gt=1,
        description="Seconds the beat leader lease lives unless renewed (every tick): how "
        "long a standby beat waits before it takes over from a dead leader.",
    )
    sweep_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between the leader's sweeps (re-publish lost messages, recover "
        "runs of dead workers, prune old runs).",
    )
    pending_grace_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a queued (`pending`) record may wait before the sweeper "
        "re-publishes its message; again after 2x, 4x ... 64x this while it stays queued.",
    )
    # One claim transaction holds at most this many slots: a long outage is caught up in
    # bounded transactions, and the leader re-checks its lease between them.
    beat_slot_budget: int = Field(
        default=2000,
        ge=1,
        description="Slots (run records) one claim transaction creates at most; the leader "
        "re-checks its lease between transactions.",
    )
    retention_days: float = Field(
        default=30.0,
        ge=0,
        description="Finished run records older than this many days are deleted by the "
        "leader's sweeps; 0 keeps them all.",
    )
    retention_batch: int = Field(
        default=1000,
        ge=1,
        description="Finished records one sweep deletes at most.",
    )

    # Tasks
    task_time_limit_s: int = Field(
        default=300,
        ge=1,
        description="Celery hard time limit of a task in seconds (the soft limit is 5 s "
        "earlier); no action's `timeout_s` may exceed it. Sizes the broker's visibility "
        "timeout.",
    )
    run_lease_ttl_s: float = Field(
        default=30.0,
        gt=0.5,
        description="Seconds a run's Redis lease lives; the worker renews it every third of "
        "that. Also the heartbeat timeout after which the sweeper may recover a run whose "
        "lease is gone.",
    )
    lock_margin_s: int = Field(
        default=30,
        ge=1,
        description="Seconds added to the time limit in the derived visibility timeout and "
        "lock TTL.",
    )
    default_queue: str = Field(
        default="gathering",
        description="Queue that workers consume and that runs go to unless their action "
        "names a `queue`.",
    )
    worker_prefetch_multiplier: int = Field(
        default=1,
        ge=1,
        description="Messages a worker process reserves ahead (Celery's "
        "worker_prefetch_multiplier).",
    )
    # How long a worker keeps trying to record an outcome (holding the run's lease and
    # heartbeat) while the database is unreachable, before it gives the run up.
    outcome_retry_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a worker keeps trying to write a run's outcome while the "
        "database is unreachable (holding the lease) before it gives the run up.",
    )

    # Database call bounds (PostgreSQL: connect_timeout, statement_timeout, lock_timeout;
    # SQLite: busy timeout). Each must stay below the run lease TTL; unset, they are derived
    # from it (at most 5 s, 5 s and 2 s).
    db_connect_timeout_s: int | None = Field(
        default=None,
        ge=1,
        description="Seconds to connect to the database. Unset: half the run lease TTL, "
        "between 1 and 5. Must be below GATHERING_RUN_LEASE_TTL_S.",
    )
    db_statement_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds one statement may take (PostgreSQL statement_timeout; SQLite "
        "busy timeout). Unset: half the run lease TTL, at most 5. Must be below "
        "GATHERING_RUN_LEASE_TTL_S.",
    )
    db_lock_timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Seconds a statement waits for a row lock (PostgreSQL lock_timeout). "
        "Unset: a quarter of the run lease TTL, at most 2. Must be below "
        "GATHERING_RUN_LEASE_TTL_S.",
    )
    run_task_allowlist: CsvList = Field(
        default_factory=list,
        description="Celery task names that `run_task` actions may call besides registered "
        "handlers.",
    )
    max_config_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        description="Largest action config accepted, in bytes of compact JSON.",
    )
    max_result_bytes: int = Field(
        default=16 * 1024,
        ge=256,
        description="Largest result stored with a run, in bytes of JSON; a larger one is "
        "stored as an excerpt. Also bounds a pipeline node's input.",
    )

    # Pipelines
    pipeline_max_nodes: int = Field(
        default=1000, ge=1, description="Most nodes a pipeline definition may have."
    )
    pipeline_max_map_items: int = Field(
        default=1000, ge=1, description="Most items one `map` node may fan out to."
    )
    pipeline_inline_budget_s: float = Field(
        default=5.0,
        ge=0,
        description="A worker that finishes a pipeline node and finds a successor ready runs "
        "that one itself, with no broker round trip, while the task that brought the first "
        "node has run under this many seconds (every other ready node is published). Each "
        "node still is its own ledger record under its own lease. 0 publishes every node.",
    )

    # HTTP skill (what each setting opens and never opens: docs/security.md). Entries take an
    # optional port or port range: 10.1.2.3:8443, 10.0.0.0/8:80-443, [::1]:8080,
    # api.internal:443; an entry without a port opens every port.
    http_allow_networks: CsvList = Field(
        default_factory=list,
        description="Networks or addresses that `call_api` and HTTP notifications may reach "
        "whatever their class (private, loopback, ...): `10.0.0.0/8`, `127.0.0.1:8080`, "
        "`10.0.0.0/8:80-443`. An entry without a port opens every port. Never opens cloud "
        "metadata.",
    )
    http_allow_hosts: CsvList = Field(
        default_factory=list,
        description="Exact host names that may be reached whatever they resolve to "
        "(`api.internal:443`; `localhost` may be listed); an entry without a port opens every "
        "port. Never opens cloud metadata.",
    )
    # Cloud metadata is refused whatever the lists above open; this opens one exact address.
    http_allow_metadata_address_i_know_this_is_dangerous: str | None = Field(
        default=None,
        description="One cloud metadata address to open, on every port (metadata is refused "
        "whatever the lists above open); anything else stops the process at start.",
    )
    http_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds an HTTP request may take to connect."
    )
    http_read_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds an HTTP request may wait for response data."
    )
    http_max_response_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest body of an expected HTTP response, in bytes; a larger one fails "
        "the call.",
    )
    # Requests one call may send within one run attempt (the client's own retries). The run's
    # attempts (an action's retry_max_attempts) are the retries by default: a run sends at
    # most retry_max_attempts x http_max_attempts requests (plus redirect hops).
    http_max_attempts: int = Field(
        default=1,
        ge=1,
        le=10,
        description="Requests one HTTP call may send within one run attempt; a run sends at "
        "most retry_max_attempts x this (plus redirect hops).",
    )

    # Secrets by reference (token_env, secret_env, env:NAME, ...): only environment variables
    # whose names match one of these fnmatch patterns (HOOK_*,SLACK_*); none by default, and
    # never GATHERING_*.
    secret_env_allow: CsvList = Field(
        default_factory=list,
        description="fnmatch patterns (`HOOK_*,SLACK_*`) of environment variables that "
        "action configs may reference as secrets; none by default, never GATHERING_*.",
    )

    # Notifications (SMTP); webhook secrets are referenced from action configs as env:NAME
    smtp_host: str | None = Field(
        default=None, description="SMTP server for email notifications; unset: email is off."
    )
    smtp_port: int = Field(default=587, description="SMTP server port.")
    smtp_security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls", description="How the SMTP connection is secured."
    )
    smtp_username: str | None = Field(
        default=None, description="SMTP login (needs GATHERING_SMTP_PASSWORD); unset: no login."
    )
    smtp_password: SecretStr | None = Field(
        default=None, description="SMTP password (from a secret store; never printed)."
    )
    smtp_from: str = Field(
        default="gathering-tasks@localhost", description="Sender address of notifications."
    )

    # -- Operators: queues, user modules, metrics ----------------------------------------
    # Workers also consume Celery's default queue ``celery``, so that a plain
    # ``send_task("gathering.trigger_action", ...)`` without ``queue=`` is not lost. Turn it
    # off on a broker shared with another Celery app that uses its default queue.
    consume_celery_queue: bool = Field(
        default=True,
        description="Workers also consume Celery's default queue `celery`, so a "
        "`send_task` without `queue=` is not lost. Turn off on a broker shared with another "
        "Celery app.",
    )
    # Modules every worker (and beat) imports at start: user handlers and Celery tasks.
    imports: CsvList = Field(
        default_factory=list,
        description="Modules that workers, beat, the CLI and the API import at start: your "
        "`@handler` functions and Celery tasks (docs/handlers.md).",
    )

    # Prometheus metrics (docs/metrics.md): off unless a port is given. Give each process
    # on a host its own port (a worker's pool children share their parent's endpoint).
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of the Prometheus endpoint of beat and workers; unset: off. One "
        "port per process on a host.",
    )
    metrics_address: str = Field(
        default="127.0.0.1", description="Address the metrics endpoint listens on."
    )
    # Where a worker's pool processes keep their samples (default: a fresh temporary dir).
    metrics_dir: str | None = Field(
        default=None,
        description="Directory where a worker's pool processes write their samples; emptied "
        "at start. Unset: a fresh temporary directory.",
    )

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

    @computed_field(  # type: ignore[prop-decorator]
        description="The Celery broker: GATHERING_BROKER_URL if set, else GATHERING_REDIS_URL."
    )
    @property
    def broker_url(self) -> str:
        return self.broker_url_override or self.redis_url

    @computed_field(  # type: ignore[prop-decorator]
        description="The longest one task may hold anything, in seconds: "
        "GATHERING_TASK_TIME_LIMIT_S + GATHERING_LOCK_MARGIN_S. Informational: no built-in "
        "lease is sized from it."
    )
    @property
    def lock_ttl_s(self) -> int:
        return self.task_time_limit_s + self.lock_margin_s

    @computed_field(  # type: ignore[prop-decorator]
        description="Redis broker visibility timeout, in seconds: 2 x "
        "GATHERING_TASK_TIME_LIMIT_S + GATHERING_LOCK_MARGIN_S, so an unacknowledged message "
        "comes back only after its task could no longer be running."
    )
    @property
    def visibility_timeout_s(self) -> int:
        return 2 * self.task_time_limit_s + self.lock_margin_s

    @computed_field(  # type: ignore[prop-decorator]
        description="Seconds between a running task's lease renewals and database "
        "heartbeats: GATHERING_RUN_LEASE_TTL_S / 3."
    )
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

    @field_validator("imports", mode="before")
    @classmethod
    def _split_imports(cls, value: object) -> object:
        return cls._split_csv(value)


def env_var(name: str) -> str:
    """The environment variable of the setting ``name`` (its alias, if it has one)."""
    field = Settings.model_fields.get(name)
    if field is not None and field.alias:
        return field.alias
    return f"GATHERING_{name.upper()}"


def load_settings() -> Settings:
    """The settings of the environment; :class:`ConfigError` names the first invalid one by
    its variable (``GATHERING_BEAT_TICK_S: Input should be a valid number ...``)."""
    try:
        return Settings()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        where = env_var(str(error["loc"][0])) if error["loc"] else "settings"
        raise ConfigError(message, field=where) from exc


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings (read once). Tests call ``get_settings.cache_clear()``."""
    return load_settings()
