"""The ``gathering-tasks`` command: database, actions, runs, pipelines, settings and the demo.

Exit codes: 0 ok, 1 other error, 2 invalid input (nothing was written), 3 not found.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import typer
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from sqlalchemy.exc import SQLAlchemyError

from gathering_tasks import __version__, runtime
from gathering_tasks.errors import ConfigError

try:
    # The Celery app reads the settings when it is imported: an invalid one is one line.
    from gathering_tasks.app import app as celery_app
    from gathering_tasks.app import worker_queues
except ConfigError as exc:
    if "--debug" in sys.argv[1:]:
        raise
    sys.stderr.write(f"error: {exc}\n")
    raise SystemExit(2) from None

from gathering_tasks.action_import import ImportInvalid, ImportResult, Phase, load_entries
from gathering_tasks.api import (
    ActionService,
    PipelineService,
    action_service,
    action_view,
    definition_from_view,
    pipeline_service,
)
from gathering_tasks.clock import utcnow
from gathering_tasks.db.migrate import upgrade
from gathering_tasks.demo import (
    DEMO_ACTIONS,
    DEMO_PIPELINE_ACTION,
    DEMO_PIPELINE_NAME,
    DEMO_SINK_PORT,
    demo_pipeline,
    serve_sink,
)
from gathering_tasks.errors import GatheringError, InvalidInput, NotFound, WaitTimedOut
from gathering_tasks.handlers import load_user_modules
from gathering_tasks.settings_doc import effective_settings, reference_markdown
from gathering_tasks.status import Status, collect, since

HELP = """gathering-tasks: scheduled actions and pipelines on Celery.

Exit codes: 0 ok; 1 error (database, broker, or a run that did not succeed with --wait);
2 invalid input, nothing was written; 3 not found; 4 gave up waiting (--wait deadline).
Errors are one line on stderr; --debug shows the traceback.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
actions_app = typer.Typer(help="Scheduled actions.", no_args_is_help=True)
runs_app = typer.Typer(help="Runs of actions.", no_args_is_help=True)
demo_app = typer.Typer(help="Demo actions.", no_args_is_help=True)
pipelines_app = typer.Typer(help="Pipelines: versioned DAGs of nodes.", no_args_is_help=True)
config_app = typer.Typer(
    help="Settings: the reference page and the effective values.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(actions_app, name="actions")
app.add_typer(runs_app, name="runs")
app.add_typer(demo_app, name="demo")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(config_app, name="config")

EXIT_INVALID = 2
EXIT_NOT_FOUND = 3
EXIT_WAIT_TIMED_OUT = 4


class _Options:
    debug = False


def package_version() -> str:
    """The installed distribution's version (the package's own in a bare checkout)."""
    try:
        return metadata.version("gathering-tasks")
    except metadata.PackageNotFoundError:
        return __version__


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"gathering-tasks {package_version()}")
        raise typer.Exit(0)


@app.callback()
def _main(
    *,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    _Options.debug = debug
    if ctx.invoked_subcommand == "config":
        return  # the settings themselves: readable even when GATHERING_IMPORTS is broken
    with _errors():
        # Users' handlers (GATHERING_IMPORTS) register before any action is checked.
        load_user_modules()


def flower_config_path() -> Path:
    """The Flower config: ``config/`` in a checkout, inside the package in a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (
        package.parent / "config" / "flowerconfig.py",
        package / "_config" / "flowerconfig.py",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("the Flower config is missing from this installation")


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """One clear line on stderr, and an exit code that says what kind of error it was."""
    try:
        yield
    except typer.Exit:
        raise  # an exit code chosen on purpose, not an error
    except Exception as exc:
        if _Options.debug:
            raise
        message, code = _explain(exc)
        _fail(message, code)


# The most specific class first: its message and exit code.
_EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (WaitTimedOut, EXIT_WAIT_TIMED_OUT),
    (InvalidInput, EXIT_INVALID),
    (NotFound, EXIT_NOT_FOUND),
    (GatheringError, 1),
)


def _explain(exc: Exception) -> tuple[str, int]:
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return str(exc), code
    if isinstance(exc, SQLAlchemyError):
        return f"database error: {type(exc).__name__}: {str(exc).splitlines()[0]}", 1
    if isinstance(exc, (RedisError, BrokerError)):
        return f"broker error: {exc}", 1
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first} (--debug shows the traceback)", 1


def _service() -> ActionService:
    return action_service()


def _print(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _json_arg(text: str | None, field: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"is not valid JSON ({exc.msg})", field=field) from exc


def _read_definition(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot be read ({exc.strerror})", field="file") from exc
    data = _json_arg(text, "file")
    if not isinstance(data, dict):
        raise InvalidInput("must hold one JSON object (the action)", field="file")
    return data


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply the migrations (the only way the schema is made)."""
    with _errors():
        upgrade(runtime.settings().database_url, revision)
        typer.echo(f"database at revision {revision}")


JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON array (stable fields).")]


def _schedule_from_flags(
    cron: str | None, timezone: str, every: float | None, at: str | None
) -> dict[str, Any]:
    flags = (("--cron", cron), ("--every", every), ("--at", at))
    given = [flag for flag, value in flags if value is not None]
    if len(given) != 1:
        raise InvalidInput("give exactly one of --cron, --every, --at", field="schedule")
    if cron:
        return {"kind": "cron", "expr": cron, "timezone": timezone}
    if every is not None:
        return {"kind": "interval", "every_s": every}
    return {"kind": "once", "at": at}


@actions_app.command("add")
def actions_add(
    *,
    name: Annotated[str | None, typer.Option(help="Unique action name.")] = None,
    action_type: Annotated[
        str | None, typer.Option("--type", help="run_task | execute_pipeline | ...")
    ] = None,
    config: Annotated[str | None, typer.Option(help="Action config as JSON.")] = None,
    cron: Annotated[str | None, typer.Option(help="5-field cron expression.")] = None,
    timezone: Annotated[str, typer.Option("--tz", help="IANA time zone for --cron.")] = "UTC",
    every: Annotated[float | None, typer.Option(help="Interval in seconds.")] = None,
    at: Annotated[str | None, typer.Option(help="One-shot time, ISO-8601 with offset.")] = None,
    catchup: Annotated[str, typer.Option(help="skip | latest | all")] = "latest",
    max_runs: Annotated[int | None, typer.Option(help="Stop after this many runs.")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            help="Whole definition as JSON (`actions show` output works); flags given "
            "with it override its fields."
        ),
    ] = None,
) -> None:
    """Create an action (from flags, or from a JSON file with every field)."""
    with _errors():
        if file is not None:
            data = definition_from_view(_read_definition(file))
            overrides = {
                "name": name,
                "action_type": action_type,
                "config": _json_arg(config, "config"),
            }
            data.update({k: v for k, v in overrides.items() if v is not None})
        else:
            data = {
                "name": name,
                "action_type": action_type,
                "config": _json_arg(config, "config") or {},
                "schedule": _schedule_from_flags(cron, timezone, every, at),
                "catchup_mode": catchup,
                "max_runs": max_runs,
            }
        _print(action_view(_service().create({k: v for k, v in data.items() if v is not None})))


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[Callable[[Phase, int, int], None]]:
    """A progress bar on stderr, only for a person watching a terminal."""
    labels: dict[Phase, str] = {"checking": "checking", "storing": "storing"}
    bar = Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
    tasks: dict[Phase, TaskID] = {}

    def advance(phase: Phase, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(labels[phase], total=total)
        bar.update(tasks[phase], completed=done)

    with bar:
        yield advance


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _import_report(result: ImportResult) -> str:
    counts = f"{len(result.created)} created, {len(result.updated)} updated"
    total = _plural(len(result.created) + len(result.updated), "action")
    if result.dry_run:
        return f"dry run: {total} valid ({counts}); nothing was stored"
    return f"imported {total} ({counts})"


@actions_app.command("import")
def actions_import(
    file: Path,
    *,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check every entry; store none.")
    ] = False,
    upsert: Annotated[
        bool,
        typer.Option(
            "--upsert", help="Replace the definition of actions that exist (a pause is kept)."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Create many actions from a JSON or YAML list (`actions show` objects), all or none.

    Every entry is checked first and every problem printed (entry number, name, field);
    if any is found, nothing is stored (exit 2).
    """
    with _errors():
        entries = load_entries(_read_text(file))
        enabled = sys.stderr.isatty() and not as_json
        try:
            with _progress_bar(enabled=enabled) as progress:
                result = _service().import_actions(
                    entries, upsert=upsert, dry_run=dry_run, progress=progress
                )
        except ImportInvalid as exc:
            _import_failed(exc, as_json=as_json)
        if as_json:
            _print(result.as_dict())
        else:
            typer.echo(_import_report(result))


def _import_failed(exc: ImportInvalid, *, as_json: bool) -> NoReturn:
    if as_json:
        _print({"stored": False, "errors": [problem.as_dict() for problem in exc.problems]})
    for problem in exc.problems:
        typer.echo(f"error: {problem}", err=True)
    _fail(exc.summary, EXIT_INVALID)


@actions_app.command("list")
def actions_list(
    status: Annotated[str | None, typer.Option(help="active | paused | ... | archived")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List actions."""
    with _errors():
        actions = [action_view(a) for a in _service().list_actions(status)]
        if as_json:
            _print(actions)
            return
        for action in actions:
            typer.echo(
                f"{action['name']:<32} {action['action_type']:<18} {action['status']:<10} "
                f"next={action['next_run_at']}"
            )


@actions_app.command("show")
def actions_show(name: str) -> None:
    """Show one action (JSON that `actions add --file` accepts back)."""
    with _errors():
        _print(action_view(_service().get(name)))


def _assignments(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        path, sep, text = pair.partition("=")
        if not sep or not path:
            raise InvalidInput(f"expected field=value, got {pair!r}", field="--set")
        try:
            out[path] = json.loads(text)
        except json.JSONDecodeError:
            out[path] = text  # a bare word is a string
    return out


@actions_app.command("edit")
def actions_edit(
    name: str,
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="field=value, dotted into objects (config.kwargs.who=ops); the value is JSON, "
            "or else a string. Repeatable.",
        ),
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="Fields to change as a JSON object (`show` output works).")
    ] = None,
) -> None:
    """Change an action; its next slot is recomputed from now."""
    with _errors():
        service = _service()
        if file is not None:
            changes = definition_from_view(_read_definition(file))
            service.update(name, changes)
        if assignments:
            service.edit(name, _assignments(assignments))
        if file is None and not assignments:
            raise InvalidInput("give --set field=value or --file", field="edit")
        _print(action_view(service.get(name)))


@actions_app.command("pause")
def actions_pause(name: str) -> None:
    """Pause an action; beat stops firing it at its next tick."""
    with _errors():
        _print(action_view(_service().pause(name)))


@actions_app.command("resume")
def actions_resume(name: str) -> None:
    """Resume an action from now (slots missed while paused are not run)."""
    with _errors():
        _print(action_view(_service().resume(name)))


@actions_app.command("delete")
def actions_delete(name: str) -> None:
    """Delete an action: it stops for good; its runs stay (queued ones are cancelled)."""
    with _errors():
        _service().delete(name)
        typer.echo(f"deleted {name} (archived; its runs are kept)")


@actions_app.command("trigger")
def actions_trigger(
    name: str,
    key: Annotated[
        str | None, typer.Option(help="Idempotency key: a repeat with it makes no new run.")
    ] = None,
) -> None:
    """Run an action now, outside its schedule."""
    with _errors():
        typer.echo(f"run {_service().trigger(name, key=key)} queued")


def run_view(run: dict[str, Any]) -> dict[str, Any]:
    """A run as `runs list --json` prints it: the record's fields and the action's name."""
    definition = run.get("definition") or {}
    view = {key: value for key, value in run.items() if key != "definition"}
    return {"id": run["id"], "action": definition.get("name"), **view}


@runs_app.command("list")
def runs_list(
    action: Annotated[str | None, typer.Option(help="Only this action's runs.")] = None,
    status: Annotated[str | None, typer.Option(help="pending | running | ... | skipped")] = None,
    limit: int = 50,
    as_json: JsonFlag = False,
) -> None:
    """List recent runs."""
    with _errors():
        runs = [
            run_view(r) for r in _service().list_runs(action=action, status=status, limit=limit)
        ]
        if as_json:
            _print(runs)
            return
        for run in runs:
            typer.echo(
                f"{run['id']:>8} {run['action'] or '-':<32} {run['status']:<10} "
                f"attempt={run['attempt']} slot={run['scheduled_for']} trigger={run['trigger']}"
            )


@runs_app.command("show")
def runs_show(
    run_id: int,
    wait: Annotated[
        bool, typer.Option(help="Wait until the run ends; exit 0 if it succeeded, else 1.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up (exit 4) after s.")] = 600,
) -> None:
    """Show one run."""
    with _errors():
        service = _service()
        run = service.wait_run(run_id, timeout_s=timeout) if wait else service.get_run(run_id)
        _print({"action": (run.get("definition") or {}).get("name"), **run})
    if wait and run["status"] != "succeeded":
        raise typer.Exit(1)


@runs_app.command("cancel")
def runs_cancel(run_id: int) -> None:
    """Cancel a run: a queued one at once; a running one is told to stop."""
    with _errors():
        status = _service().cancel_run(run_id)
        if status == "running":
            typer.echo(f"run {run_id} is running: cancellation requested")
        else:
            typer.echo(f"run {run_id} is {status}")


def _pipelines() -> PipelineService:
    return pipeline_service()


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise InvalidInput(f"cannot be read ({exc.strerror})", field="file") from exc


@pipelines_app.command("validate")
def pipelines_validate(file: Path) -> None:
    """Check a pipeline file (JSON or YAML); print every error, each naming its node."""
    with _errors():
        spec = _pipelines().validate(_read_text(file))
        typer.echo(f"valid: {len(spec.nodes)} nodes, {len(spec.edges)} edges")


@pipelines_app.command("add")
def pipelines_add(name: str, file: Path) -> None:
    """Store a pipeline (version 1) from a JSON or YAML file."""
    with _errors():
        _print(_pipelines().create(name, _read_text(file)))


@pipelines_app.command("update")
def pipelines_update(name: str, file: Path) -> None:
    """Store a new version of a pipeline; runs already started keep theirs."""
    with _errors():
        _print(_pipelines().update(name, _read_text(file)))


@pipelines_app.command("list")
def pipelines_list(as_json: JsonFlag = False) -> None:
    """List pipelines."""
    with _errors():
        rows = _pipelines().list_pipelines()
        if as_json:
            _print(rows)
            return
        for row in rows:
            nodes = len(row["definition"].get("nodes", []))
            typer.echo(f"{row['name']:<32} v{row['version']:<4} {nodes} nodes")


@pipelines_app.command("show")
def pipelines_show(name: str) -> None:
    """Show a pipeline's current version."""
    with _errors():
        _print(_pipelines().get(name))


@pipelines_app.command("versions")
def pipelines_versions(name: str, as_json: JsonFlag = False) -> None:
    """List a pipeline's versions."""
    with _errors():
        versions = _pipelines().versions(name)
        if as_json:
            _print(versions)
            return
        for version in versions:
            typer.echo(f"v{version['version']:<4} {version['created_at']}")


@pipelines_app.command("run")
def pipelines_run(
    name: str,
    data: Annotated[str | None, typer.Option(help="The run's input data as JSON.")] = None,
    key: Annotated[str | None, typer.Option(help="A repeat with this key starts no run.")] = None,
    wait: Annotated[bool, typer.Option(help="Show node progress; exit with the outcome.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after seconds.")] = 600,
) -> None:
    """Start a run of a pipeline."""
    with _errors():
        service = _pipelines()
        run_id = service.run(name, _json_arg(data, "data"), key=key)
        typer.echo(f"pipeline run {run_id} started")
        if wait:
            _wait_for_run(service, run_id, timeout)


def _wait_for_run(service: PipelineService, run_id: int, timeout_s: float) -> None:
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        run = service.get_run(run_id)
        for node in run["nodes"]:
            if seen.get(node["node_id"]) != node["status"]:
                seen[node["node_id"]] = node["status"]
                typer.echo(
                    f"  {node['node_id']:<32} {node['status']:<10} attempt={node['attempt']}"
                )
        if run["status"] != "running":
            typer.echo(
                f"pipeline run {run_id} {run['status']}"
                + (f": {run['error']}" if run["error"] else "")
            )
            raise typer.Exit(0 if run["status"] == "succeeded" else 1)
        if time.monotonic() > deadline:
            _fail(f"pipeline run {run_id} still running after {timeout_s:.0f}s", 1)
        time.sleep(0.2)


@pipelines_app.command("cancel")
def pipelines_cancel(run_id: int) -> None:
    """Cancel a pipeline run: queued nodes end, running ones are told to stop."""
    with _errors():
        typer.echo(f"pipeline run {run_id} {_pipelines().cancel(run_id)}")


@pipelines_app.command("runs")
def pipelines_runs(
    name: Annotated[str | None, typer.Argument()] = None,
    run: Annotated[int | None, typer.Option(help="Show this run with every node.")] = None,
    limit: int = 50,
    as_json: JsonFlag = False,
) -> None:
    """List recent pipeline runs, or show one with its nodes."""
    with _errors():
        if run is not None:
            _print(_pipelines().get_run(run))
            return
        rows = _pipelines().list_runs(name, limit=limit)
        if as_json:
            _print(rows)
            return
        for row in rows:
            typer.echo(
                f"{row['id']:>8} pipeline={row['pipeline_id']} v{row['pipeline_version']} "
                f"{row['status']:<10} started={row['started_at']}"
            )


@app.command(
    "flower",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def flower(ctx: typer.Context) -> None:
    """Run Flower with the bundled config (extra arguments go to ``celery flower``)."""
    conf = flower_config_path()
    argv = [sys.executable, "-m", "celery", "-A", "gathering_tasks", "flower", f"--conf={conf}"]
    os.execv(sys.executable, [*argv, *ctx.args])  # noqa: S606 (our own interpreter)


@app.command("status")
def status(
    as_json: JsonFlag = False,
    ping_timeout: Annotated[float, typer.Option(help="Seconds to wait for workers.")] = 1.0,
) -> None:
    """The beat leader, the workers that answer, queue depths, and runs of the last hour."""
    with _errors():
        snapshot = _status(ping_timeout)
        if as_json:
            _print(snapshot.as_dict())
            return
        _print_status(snapshot)


def _status(ping_timeout_s: float) -> Status:
    settings = runtime.settings()
    service = _service()
    queues = {settings.default_queue, *(q.name for q in worker_queues(settings))}
    queues |= {str(a["queue"]) for a in service.list_actions() if a.get("queue")}
    broker = urlsplit(settings.broker_url).scheme in ("redis", "rediss")
    return collect(
        celery_app=celery_app,
        redis_client=runtime.redis_client(),
        broker_client=runtime.redis_client(settings.broker_url) if broker else None,
        prefix=settings.key_prefix,
        queues=queues,
        runs_by_status=service.runs_by_status(since=since(utcnow())),
        ping_timeout_s=ping_timeout_s,
    )


def _print_status(snapshot: Status) -> None:
    lead = snapshot.leader
    by = f" by {lead['holder']}" if lead.get("holder") else ""
    held = f"held{by} (expires in {lead['expires_in_s']}s)" if lead["held"] else "none"
    typer.echo(f"beat leader: {held}")
    typer.echo(f"workers: {len(snapshot.workers)}" + "".join(f"\n  {w}" for w in snapshot.workers))
    typer.echo("queues:")
    for queue, depth in snapshot.queues.items():
        typer.echo(f"  {queue:<24} {'?' if depth is None else depth}")
    typer.echo("runs in the last hour:")
    for state, count in snapshot.runs_last_hour.items() or {"(none)": 0}.items():
        typer.echo(f"  {state:<24} {count}")


@config_app.command("reference")
def config_reference(
    output: Annotated[
        Path | None, typer.Option(help="Write the page to this file instead of printing it.")
    ] = None,
) -> None:
    """The configuration reference (docs/configuration.md), generated from the settings."""
    with _errors():
        text = reference_markdown()
        if output is None:
            typer.echo(text, nl=False)
            return
        output.write_text(text)
        typer.echo(f"wrote {output}")


def _setting_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(item) for item in value) or "(empty)"
    return str(value)


@config_app.command("show")
def config_show(as_json: JsonFlag = False) -> None:
    """The settings this process runs with, and where each comes from; secrets masked."""
    with _errors():
        values = effective_settings(runtime.settings())
        if as_json:
            _print([value.as_dict() for value in values])
            return
        width = max(len(value.variable) for value in values)
        for value in values:
            typer.echo(f"{value.variable:<{width}}  {_setting_text(value.value)}  ({value.source})")


@demo_app.command("seed")
def demo_seed() -> None:
    """Create the demo actions and the demo pipeline (kept if they exist)."""
    with _errors():
        pipelines = _pipelines()
        if DEMO_PIPELINE_NAME not in {p["name"] for p in pipelines.list_pipelines()}:
            pipelines.create(DEMO_PIPELINE_NAME, demo_pipeline(_demo_port()))
            typer.echo(f"created demo pipeline {DEMO_PIPELINE_NAME}")
        service = _service()
        existing = {a["name"] for a in service.list_actions()}
        for action in [*DEMO_ACTIONS, DEMO_PIPELINE_ACTION]:
            if action["name"] not in existing:
                service.create(action)
                typer.echo(f"created demo action {action['name']}")


def _demo_port() -> int:
    return int(os.environ.get("GATHERING_DEMO_SINK_PORT", DEMO_SINK_PORT))


@demo_app.command("sink")
def demo_sink() -> None:
    """Serve the demo pipeline's HTTP endpoints and webhook on 127.0.0.1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    serve_sink(_demo_port())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
