"""Pipeline definitions: a DAG of typed nodes, parsed and checked as a whole before it runs.

A definition is JSON or YAML::

    {"nodes": [{"id": "start", "type": "trigger"},
               {"id": "fetch", "type": "action",
                "config": {"action_type": "call_api", "config": {"url": "https://..."}}}],
     "edges": [{"from": "start", "to": "fetch"}],
     "timeout_s": 600, "retry": {"max_attempts": 3}}

:func:`parse_pipeline` reports every problem it finds at once, as one :class:`PipelineInvalid`
listing a :class:`NodeError` per problem, each naming its node. What it returns is a
:class:`PipelineSpec`: frozen, acyclic, every node reachable from a trigger, every config
normalised, every template syntactically valid and naming only nodes upstream of it.

Node types and their config:

* ``trigger`` ``{}``: a root; passes the run's input data on. Every root is a trigger.
* ``action`` ``{"action_type", "config"}``: one of :data:`NODE_ACTION_TYPES`. A config without
  templates is checked now with the kind's own check; a config with templates is checked
  for template syntax and references now, and fully when resolved at run time.
* ``condition`` ``{"expression"}``: a JMESPath expression over the node's input document;
  edges leaving it carry ``"branch": "true"`` or ``"false"``.
* ``parallel`` ``{}``: explicit fan-out. ``join`` ``{"policy": "all"|"any"|"n_of", "n"}``.
* ``map`` ``{"source": "{{ nodes.X.output.list }}", "action": {...}, "max_items"}``: one child
  per item; the action's config may use ``{{ item }}`` and ``{{ index }}``.
* ``delay`` ``{"seconds"}``: at most :data:`MAX_DELAY_S`.

YAML aliases (``*name``) are refused: they let a short text expand into an enormous document.
"""

from __future__ import annotations

import copy
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal, TypeVar, get_args

import jmespath
import yaml
from jmespath.exceptions import JMESPathError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gathering_tasks.actions import NAME_RE, _check_storable
from gathering_tasks.errors import InvalidInput
from gathering_tasks.kinds import ACTION_TYPES, kind, resolve
from gathering_tasks.pipelines import templates
from gathering_tasks.pipelines.templates import TemplateError, TemplateRef

NodeType = Literal["trigger", "action", "condition", "parallel", "join", "map", "delay"]
NODE_TYPES: tuple[str, ...] = get_args(NodeType)
Branch = Literal["true", "false"]
JoinPolicy = Literal["all", "any", "n_of"]
# A pipeline node cannot start a pipeline: runs stay one DAG deep.
NODE_ACTION_TYPES: tuple[str, ...] = tuple(t for t in ACTION_TYPES if t != "execute_pipeline")
MAX_DELAY_S = 86_400.0
TaskAllowed = Callable[[str], bool]
_M = TypeVar("_M", bound=BaseModel)


# -- the parsed pipeline --------------------------------------------------------------------


@dataclass(frozen=True)
class RetrySpec:
    """How often and how patiently a failed node is retried."""

    max_attempts: int = 1
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0
    jitter: float = 0.1


@dataclass(frozen=True)
class NodeSpec:
    """One node; ``config`` is normalised for its type (defaults filled in)."""

    id: str
    type: NodeType
    name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    retry: RetrySpec | None = None
    timeout_s: int | None = None


@dataclass(frozen=True)
class EdgeSpec:
    """``source`` -> ``target``; ``branch`` only on edges leaving a condition."""

    source: str
    target: str
    branch: Branch | None = None


@dataclass(frozen=True)
class _Index:
    nodes: dict[str, NodeSpec]
    into: dict[str, tuple[EdgeSpec, ...]]
    out: dict[str, tuple[EdgeSpec, ...]]
    order: tuple[str, ...]
    ancestors: dict[str, frozenset[str]]  # filled on demand
    reads: dict[str, tuple[frozenset[str], bool]]  # filled on demand


def _topological(ids: Sequence[str], out: Mapping[str, tuple[EdgeSpec, ...]]) -> tuple[str, ...]:
    """Kahn's order, stable with respect to ``ids``; ValueError on a cycle."""
    degree = dict.fromkeys(ids, 0)
    for edges in out.values():
        for edge in edges:
            degree[edge.target] += 1
    queue = deque(node for node in ids if degree[node] == 0)
    order: list[str] = []
    while queue:
        node = queue.popleft()
        order.append(node)
        for edge in out[node]:
            degree[edge.target] -= 1
            if degree[edge.target] == 0:
                queue.append(edge.target)
    if len(order) != len(ids):
        raise ValueError("the pipeline's edges form a cycle")
    return tuple(order)


@dataclass(frozen=True)
class PipelineSpec:
    """A checked pipeline. Build it with :func:`parse_pipeline`."""

    nodes: tuple[NodeSpec, ...]
    edges: tuple[EdgeSpec, ...] = ()
    timeout_s: int | None = None
    retry: RetrySpec | None = None

    @cached_property
    def _index(self) -> _Index:
        ids = [node.id for node in self.nodes]
        into: dict[str, list[EdgeSpec]] = {node_id: [] for node_id in ids}
        out: dict[str, list[EdgeSpec]] = {node_id: [] for node_id in ids}
        for edge in self.edges:
            out[edge.source].append(edge)
            into[edge.target].append(edge)
        frozen_out = {node_id: tuple(edges) for node_id, edges in out.items()}
        return _Index(
            nodes={node.id: node for node in self.nodes},
            into={node_id: tuple(edges) for node_id, edges in into.items()},
            out=frozen_out,
            order=_topological(ids, frozen_out),
            ancestors={},
            reads={},
        )

    def node(self, node_id: str) -> NodeSpec:
        """The node ``node_id``; KeyError for an unknown id."""
        return self._index.nodes[node_id]

    def edges_into(self, node_id: str) -> tuple[EdgeSpec, ...]:
        return self._index.into[node_id]

    def edges_from(self, node_id: str) -> tuple[EdgeSpec, ...]:
        return self._index.out[node_id]

    def predecessors(self, node_id: str) -> tuple[str, ...]:
        return tuple(edge.source for edge in self._index.into[node_id])

    def successors(self, node_id: str) -> tuple[str, ...]:
        return tuple(edge.target for edge in self._index.out[node_id])

    def roots(self) -> tuple[str, ...]:
        """Nodes without predecessors (all of them triggers)."""
        return tuple(node.id for node in self.nodes if not self._index.into[node.id])

    def topological_order(self) -> tuple[str, ...]:
        """Every node id, each after all of its predecessors."""
        return self._index.order

    def ancestors(self, node_id: str) -> frozenset[str]:
        """Every node upstream of ``node_id`` (not ``node_id`` itself)."""
        cache = self._index.ancestors
        if node_id not in cache:
            cache[node_id] = frozenset(_upstream(node_id, self.predecessors))
        return cache[node_id]

    def reads(self, node_id: str) -> frozenset[str]:
        """The nodes whose records the input document of ``node_id`` is built from.

        Its predecessors (``inputs``), the nodes its templates name (``nodes.<id>``), every
        ancestor for a condition (a JMESPath expression may read any of them), and the node
        itself for a map (its children read their item from its record). A record's input
        needs no other state, so a worker reads only these.
        """
        return self._reads(node_id)[0]

    def reads_trigger(self, node_id: str) -> bool:
        """Does the input document of ``node_id`` need the run's input data (``trigger``)?"""
        return self._reads(node_id)[1]

    @cached_property
    def steering(self) -> frozenset[str]:
        """The nodes whose outputs decide what runs next: conditions (the branch taken) and
        maps (the items they fan out over)."""
        return frozenset(node.id for node in self.nodes if node.type in ("condition", "map"))

    def _reads(self, node_id: str) -> tuple[frozenset[str], bool]:
        cache = self._index.reads
        if node_id not in cache:
            node = self.node(node_id)
            refs = templates.references(node.config)
            named = {str(r.path[1]) for r in refs if len(r.path) > 1 and r.path[0] == "nodes"}
            if node.type == "condition":
                named = set(self.ancestors(node_id))
            elif node.type == "map":
                named.add(node_id)
            trigger = node.type in ("trigger", "condition") or any(
                r.path[0] == "trigger" for r in refs
            )
            cache[node_id] = (frozenset({*self.predecessors(node_id), *named}), trigger)
        return cache[node_id]

    def retry_for(self, node_id: str) -> RetrySpec:
        """The node's retry policy, else the pipeline's, else the default (one attempt)."""
        return self.node(node_id).retry or self.retry or RetrySpec()

    def to_json(self) -> dict[str, Any]:
        """The normalised definition; :func:`parse_pipeline` accepts it back unchanged."""
        return {
            "nodes": [_node_json(node) for node in self.nodes],
            "edges": [_edge_json(edge) for edge in self.edges],
            "timeout_s": self.timeout_s,
            "retry": asdict(self.retry) if self.retry else None,
        }


def _node_json(node: NodeSpec) -> dict[str, Any]:
    return {
        "id": node.id,
        "type": node.type,
        "name": node.name,
        "config": copy.deepcopy(node.config),
        "retry": asdict(node.retry) if node.retry else None,
        "timeout_s": node.timeout_s,
    }


def _edge_json(edge: EdgeSpec) -> dict[str, Any]:
    data: dict[str, Any] = {"from": edge.source, "to": edge.target}
    if edge.branch is not None:
        data["branch"] = edge.branch
    return data


def _upstream(node_id: str, predecessors: Callable[[str], Iterable[str]]) -> set[str]:
    seen: set[str] = set()
    stack = [node_id]
    while stack:
        for pred in predecessors(stack.pop()):
            if pred not in seen:
                seen.add(pred)
                stack.append(pred)
    seen.discard(node_id)  # only on a cycle, which parse_pipeline reports on its own
    return seen


# -- errors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeError:
    """One problem: the node it belongs to (None for the pipeline itself), the field (a
    dotted path inside the node, or inside the definition when there is no node) and why."""

    node: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"node {self.node!r}: " if self.node is not None else ""
        return f"{where}{self.field}: {self.message}" if self.field else where + self.message


class PipelineInvalid(InvalidInput):
    """The pipeline definition is invalid."""

    def __init__(self, errors: Sequence[NodeError]) -> None:
        self.errors: list[NodeError] = list(errors)
        super().__init__("\n".join(str(error) for error in self.errors) or None)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _pydantic_errors(exc: ValidationError, node: str | None, prefix: str) -> list[NodeError]:
    found = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        found.append(NodeError(node, _join(prefix, loc), _one_line(message)))
    return found


# -- shapes of the raw definition -----------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Retry(_Strict):
    max_attempts: int = Field(default=1, ge=1, le=20)
    backoff_s: float = Field(default=5.0, ge=0, le=3600)
    backoff_max_s: float = Field(default=300.0, ge=0, le=3600)
    jitter: float = Field(default=0.1, ge=0, le=1)

    def spec(self) -> RetrySpec:
        return RetrySpec(**self.model_dump())


class _RunSettings(_Strict):
    timeout_s: int | None = Field(default=None, ge=1)
    retry: _Retry | None = None


def _valid_id(value: object) -> bool:
    return isinstance(value, str) and NAME_RE.match(value) is not None


class _Node(_Strict):
    id: str
    type: NodeType
    name: str | None = Field(default=None, max_length=200)
    config: dict[str, Any] = Field(default_factory=dict)
    retry: _Retry | None = None
    timeout_s: int | None = Field(default=None, ge=1)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _valid_id(value):
            raise ValueError(
                "must be 1-200 characters of letters, digits, '_', '.', ':' or '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in NODE_TYPES:
            raise ValueError(f"unknown type {value!r} (known: {', '.join(NODE_TYPES)})")
        return value

    @field_validator("config", mode="before")
    @classmethod
    def _config(cls, value: Any) -> Any:
        return {} if value is None else value  # YAML's bare "config:"


class _Edge(_Strict):
    source: str = Field(alias="from")
    target: str = Field(alias="to")
    branch: Any = None  # checked with the edge's source, so a bad one keeps the edge


def _branch(value: Any) -> Branch | None:
    # YAML reads a bare true/false as a boolean.
    if value is True or value == "true":
        return "true"
    if value is False or value == "false":
        return "false"
    return None


class _Empty(_Strict):
    pass


class _Delay(_Strict):
    seconds: float = Field(gt=0, le=MAX_DELAY_S)


class _Join(_Strict):
    policy: JoinPolicy = "all"
    n: int | None = Field(default=None, ge=1)


class _Condition(_Strict):
    expression: str = Field(min_length=1, max_length=4000)


class _Circuit(_Strict):
    """The per-node circuit breaker: fail fast for ``cooldown_s`` after ``failures``
    consecutive failed runs of this node."""

    failures: int = Field(ge=1, le=1000)
    cooldown_s: float = Field(default=60.0, gt=0, le=86400)


class _Call(_Strict):
    action_type: str
    config: dict[str, Any] = Field(default_factory=dict)
    circuit: _Circuit | None = None


class _Map(_Strict):
    source: str
    action: dict[str, Any]
    max_items: int | None = Field(default=None, ge=1)


# -- checking -------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A node while it is being checked."""

    position: int
    id: str
    type: str | None  # None: not a known type
    parsed: _Node | None = None  # None: its fields are invalid
    config: dict[str, Any] | None = None  # normalised; None: invalid
    refs: list[tuple[TemplateRef, bool]] = field(default_factory=list)  # (ref, item allowed)
    source: TemplateRef | None = None  # a map's source


_TOP_KEYS = ("nodes", "edges", "timeout_s", "retry")
_ITEM_ROOTS = ("item", "index")


class _Checker:
    """Collects every error of one definition."""

    def __init__(self, *, max_nodes: int, max_map_items: int, task_allowed: TaskAllowed) -> None:
        self.max_nodes = max_nodes
        self.max_map_items = max_map_items
        self.task_allowed = task_allowed
        self.errors: list[NodeError] = []
        self.drafts: dict[str, _Draft] = {}
        self.bad_ids: set[str] = set()  # ids already reported as malformed
        self.edges: list[EdgeSpec] = []
        self.preds: dict[str, list[str]] = {}
        self.succs: dict[str, list[str]] = {}

    def add(self, node: str | None, where: str, message: str) -> None:
        self.errors.append(NodeError(node, where, _one_line(message)))

    def fail_if_any(self) -> None:
        if self.errors:
            raise PipelineInvalid(self.errors)

    # -- top level --

    def top_level(self, document: Mapping[str, Any]) -> tuple[list[Any], list[Any], _RunSettings]:
        for key in document:
            if key not in _TOP_KEYS:
                self.add(None, str(key), "unknown key")
        nodes = self._list(document, "nodes")
        edges = self._list(document, "edges") or []
        if nodes is None:
            nodes = []
        elif not nodes:
            self.add(None, "nodes", "the pipeline is empty: it needs at least one trigger node")
        if len(nodes) > self.max_nodes:
            self.add(None, "nodes", f"has {len(nodes)} nodes; the limit is {self.max_nodes}")
            self.fail_if_any()  # not worth checking further, and bounded work for hostile input
        settings = {key: document[key] for key in ("timeout_s", "retry") if key in document}
        try:
            return nodes, edges, _RunSettings.model_validate(settings)
        except ValidationError as exc:
            self.errors.extend(_pydantic_errors(exc, None, ""))
            return nodes, edges, _RunSettings()

    def _list(self, document: Mapping[str, Any], key: str) -> list[Any] | None:
        """The list under ``key`` (missing or null: empty); None when it is not a list."""
        value = document.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(None, key, f"must be a list, not {type(value).__name__}")
            return None
        return value

    # -- nodes --

    def nodes(self, raw_nodes: list[Any]) -> None:
        for position, raw in enumerate(raw_nodes):
            draft = self._node(position, raw)
            if draft is None:
                continue
            first = self.drafts.get(draft.id)
            if first is not None:
                self.add(draft.id, "id", f"duplicate id (nodes {first.position} and {position})")
                continue
            self.drafts[draft.id] = draft

    def _node(self, position: int, raw: Any) -> _Draft | None:
        if not isinstance(raw, Mapping):
            self.add(None, f"nodes.{position}", "must be an object")
            return None
        label = raw["id"] if _valid_id(raw.get("id")) else None
        if label is None and isinstance(raw.get("id"), str):
            self.bad_ids.add(raw["id"])
        before = len(self.errors)
        self._storable(raw, label, "" if label else f"nodes.{position}")
        try:
            parsed = _Node.model_validate(dict(raw))
        except ValidationError as exc:
            self.errors.extend(_pydantic_errors(exc, label, "" if label else f"nodes.{position}"))
            raw_type = raw.get("type")
            return (
                _Draft(position, label, raw_type if raw_type in NODE_TYPES else None)
                if label
                else None
            )
        draft = _Draft(position, parsed.id, parsed.type, parsed)
        if len(self.errors) == before:
            draft.config = self._config(draft, parsed.config)
        return draft

    def _storable(self, raw: Mapping[str, Any], label: str | None, prefix: str) -> None:
        for key in ("name", "config"):
            try:
                _check_storable(raw.get(key), _join(prefix, key), json_only=True)
            except InvalidInput as exc:
                self.add(label, exc.field or key, exc.reason)

    def _config(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        checks: dict[str, Callable[[_Draft, dict[str, Any]], dict[str, Any] | None]] = {
            "trigger": self._empty,
            "parallel": self._empty,
            "delay": self._delay,
            "join": self._join,
            "condition": self._condition,
            "action": self._action,
            "map": self._map,
        }
        return checks[str(draft.type)](draft, config)

    def _model(self, model: type[_M], draft: _Draft, data: Any, prefix: str) -> _M | None:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            self.errors.extend(_pydantic_errors(exc, draft.id, prefix))
            return None

    def _empty(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        return {} if self._model(_Empty, draft, config, "config") else None

    def _delay(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        parsed = self._model(_Delay, draft, config, "config")
        return {"seconds": float(parsed.seconds)} if parsed else None

    def _join(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        parsed = self._model(_Join, draft, config, "config")
        if parsed is None:
            return None
        if parsed.policy == "n_of" and parsed.n is None:
            self.add(draft.id, "config.n", "is required with policy 'n_of'")
            return None
        if parsed.policy != "n_of" and parsed.n is not None:
            self.add(
                draft.id, "config.n", f"is only used with policy 'n_of', not {parsed.policy!r}"
            )
            return None
        return parsed.model_dump(exclude_none=True)

    def _condition(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        parsed = self._model(_Condition, draft, config, "config")
        if parsed is None:
            return None
        try:
            jmespath.compile(parsed.expression)
        except JMESPathError as exc:
            self.add(draft.id, "config.expression", f"is not a valid JMESPath expression: {exc}")
            return None
        return {"expression": parsed.expression}

    def _action(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        return self._call(draft, config, "config", in_map=False)

    def _map(self, draft: _Draft, config: dict[str, Any]) -> dict[str, Any] | None:
        parsed = self._model(_Map, draft, config, "config")
        if parsed is None:
            return None
        ok = self._map_source(draft, parsed.source)
        max_items = parsed.max_items or self.max_map_items
        if max_items > self.max_map_items:
            self.add(draft.id, "config.max_items", f"must be at most {self.max_map_items}")
            ok = False
        action = self._call(draft, parsed.action, "config.action", in_map=True)
        if not ok or action is None:
            return None
        return {"source": parsed.source, "action": action, "max_items": max_items}

    def _map_source(self, draft: _Draft, source: str) -> bool:
        try:
            draft.source = templates.single(source, "config.source")
        except TemplateError as exc:
            self.add(draft.id, exc.path_in_config, exc.reason)
            return False
        if draft.source is None:
            self.add(
                draft.id,
                "config.source",
                "must be exactly one template naming a list, such as "
                "'{{ nodes.fetch.output.items }}'",
            )
            return False
        return True

    def _call(
        self, draft: _Draft, data: Mapping[str, Any], prefix: str, *, in_map: bool
    ) -> dict[str, Any] | None:
        parsed = self._model(_Call, draft, data, prefix)
        if parsed is None or not self._action_type(draft, parsed.action_type, prefix):
            return None
        where = f"{prefix}.config"
        if templates.has_templates(parsed.config):
            try:
                refs = templates.references(parsed.config, where)
            except TemplateError as exc:
                self.add(draft.id, exc.path_in_config, exc.reason)
                return None
            draft.refs.extend((ref, in_map) for ref in refs)
        elif not self._kind_check(draft, parsed.action_type, parsed.config, where):
            return None
        call = {"action_type": parsed.action_type, "config": copy.deepcopy(parsed.config)}
        if parsed.circuit is not None:
            call["circuit"] = parsed.circuit.model_dump()
        return call

    def _action_type(self, draft: _Draft, action_type: str, prefix: str) -> bool:
        if action_type in NODE_ACTION_TYPES:
            return True
        if action_type == "execute_pipeline":
            message = "a pipeline node cannot start a pipeline (no nested pipelines)"
        else:
            message = f"unknown action type {action_type!r} (known: {', '.join(NODE_ACTION_TYPES)})"
        self.add(draft.id, f"{prefix}.action_type", message)
        return False

    def _kind_check(
        self, draft: _Draft, action_type: str, config: dict[str, Any], where: str
    ) -> bool:
        check = resolve(str(kind(action_type).config_check))
        try:
            check(config, self.task_allowed)
        except ValidationError as exc:
            self.errors.extend(_pydantic_errors(exc, draft.id, where))
            return False
        except InvalidInput as exc:
            # The kind's check names fields from its own config ("url" or "config.url").
            inner = (exc.field or "").removeprefix("config").removeprefix(".")
            self.add(draft.id, _join(where, inner), exc.reason)
            return False
        return True

    # -- edges --

    def edge_list(self, raw_edges: list[Any]) -> None:
        seen: set[tuple[str, str]] = set()
        self.preds = {node_id: [] for node_id in self.drafts}
        self.succs = {node_id: [] for node_id in self.drafts}
        for position, raw in enumerate(raw_edges):
            found = self._edge(position, raw)
            if found is None:
                continue
            edge, written_branch = found
            if (edge.source, edge.target) in seen:
                self.add(
                    edge.source,
                    f"edges.{position}",
                    f"duplicate edge {edge.source} -> {edge.target}",
                )
                continue
            seen.add((edge.source, edge.target))
            self._branch_rule(position, edge, written_branch)
            self.edges.append(edge)
            self.preds[edge.target].append(edge.source)
            self.succs[edge.source].append(edge.target)

    def _edge(self, position: int, raw: Any) -> tuple[EdgeSpec, Any] | None:
        """The edge and its branch as written; None when it cannot join two known nodes."""
        where = f"edges.{position}"
        if not isinstance(raw, Mapping):
            self.add(None, where, "must be an object with 'from' and 'to'")
            return None
        source = raw.get("from")
        label = source if isinstance(source, str) and source in self.drafts else None
        try:
            parsed = _Edge.model_validate(dict(raw))
        except ValidationError as exc:
            self.errors.extend(_pydantic_errors(exc, label, where))
            return None
        known = True
        for end, node_id in (("from", parsed.source), ("to", parsed.target)):
            if node_id not in self.drafts:
                if node_id not in self.bad_ids:  # else reported with its node already
                    self.add(label, f"{where}.{end}", f"unknown node {node_id!r}")
                known = False
        if not known:
            return None
        return EdgeSpec(parsed.source, parsed.target, _branch(parsed.branch)), parsed.branch

    def _branch_rule(self, position: int, edge: EdgeSpec, written: Any) -> None:
        source_type = self.drafts[edge.source].type
        where = f"edges.{position}.branch"
        if written is not None and edge.branch is None:
            self.add(edge.source, where, f'must be "true" or "false", not {written!r}')
        elif source_type == "condition" and edge.branch is None:
            self.add(edge.source, where, 'an edge leaving a condition needs "true" or "false"')
        elif source_type not in (None, "condition") and edge.branch is not None:
            self.add(edge.source, where, "only edges leaving a condition node have a branch")

    # -- the graph --

    def graph(self) -> None:
        roots = [node_id for node_id, preds in self.preds.items() if not preds]
        for node_id, draft in self.drafts.items():
            if draft.type == "trigger" and self.preds[node_id]:
                self.add(
                    node_id, "", "a trigger starts the pipeline; it cannot have incoming edges"
                )
            elif draft.type not in (None, "trigger") and not self.preds[node_id]:
                self.add(node_id, "", "has no incoming edge but is not a trigger")
        if self.drafts and not any(d.type == "trigger" for d in self.drafts.values()):
            self.add(None, "nodes", "the pipeline needs at least one trigger node")
        starts = [node_id for node_id in roots if self.drafts[node_id].type == "trigger"]
        reached = _reachable(starts, self.succs)
        for node_id in self.drafts:
            if node_id not in reached and node_id not in roots:
                self.add(node_id, "", "is unreachable: no path leads to it from a trigger")
        for cycle in _cycles(list(self.drafts), self.succs, self.preds):
            self.add(cycle[0], "edges", f"is on a cycle: {' -> '.join(cycle)}")

    # -- what needs the graph: references, join bounds --

    def references(self) -> None:
        for draft in self.drafts.values():
            if draft.type == "join" and draft.config is not None:
                self._join_bound(draft)
            if not draft.refs and draft.source is None:
                continue
            upstream = _upstream(draft.id, self.preds.__getitem__)
            if draft.source is not None:
                self._source_ref(draft, draft.source, upstream)
            for ref, in_map in draft.refs:
                self._ref(draft, ref, upstream, in_map=in_map)

    def _join_bound(self, draft: _Draft) -> None:
        n = (draft.config or {}).get("n")
        incoming = len(self.preds[draft.id])
        if n is not None and n > incoming:
            self.add(draft.id, "config.n", f"is {n}, but the join has {incoming} incoming edges")

    def _source_ref(self, draft: _Draft, ref: TemplateRef, upstream: set[str]) -> None:
        if ref.path[0] != "nodes":
            self.add(
                draft.id,
                ref.location,
                f"{ref.text}: must read an upstream node's output, such as "
                "'{{ nodes.fetch.output.items }}'",
            )
            return
        self._node_ref(draft, ref, upstream)

    def _ref(self, draft: _Draft, ref: TemplateRef, upstream: set[str], *, in_map: bool) -> None:
        head = ref.path[0]
        allowed = ("trigger", "nodes", *(_ITEM_ROOTS if in_map else ()))
        if head == "nodes":
            self._node_ref(draft, ref, upstream)
        elif head not in allowed:
            hint = (
                "; 'item' and 'index' exist only in a map's action" if head in _ITEM_ROOTS else ""
            )
            known = ", ".join(allowed)
            self.add(
                draft.id, ref.location, f"{ref.text}: unknown name {head!r} (known: {known}){hint}"
            )

    def _node_ref(self, draft: _Draft, ref: TemplateRef, upstream: set[str]) -> None:
        if len(ref.path) < 2:
            self.add(draft.id, ref.location, f"{ref.text}: name a node: nodes.<id>.output")
            return
        target = str(ref.path[1])
        if target not in self.drafts:
            message = f"unknown node {target!r}"
        elif target not in upstream:
            message = f"node {target!r} is not upstream of {draft.id!r}; only earlier nodes"
            message += " can be read"
        elif len(ref.path) > 2 and ref.path[2] not in ("output", "status"):
            message = f"a node has 'output' and 'status', not {ref.path[2]!r}"
        else:
            return
        self.add(draft.id, ref.location, f"{ref.text}: {message}")

    # -- the result --

    def spec(self, settings: _RunSettings) -> PipelineSpec:
        nodes = tuple(_node_spec(draft) for draft in self.drafts.values())
        return PipelineSpec(
            nodes=nodes,
            edges=tuple(self.edges),
            timeout_s=settings.timeout_s,
            retry=settings.retry.spec() if settings.retry else None,
        )


def _node_spec(draft: _Draft) -> NodeSpec:
    parsed = draft.parsed
    assert parsed is not None and draft.config is not None  # no errors: every draft is whole
    return NodeSpec(
        id=parsed.id,
        type=parsed.type,
        name=parsed.name,
        config=draft.config,
        retry=parsed.retry.spec() if parsed.retry else None,
        timeout_s=parsed.timeout_s,
    )


def _reachable(starts: Iterable[str], succs: Mapping[str, list[str]]) -> set[str]:
    seen = set(starts)
    stack = list(seen)
    while stack:
        for nxt in succs[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _finish_order(ids: Sequence[str], succs: Mapping[str, list[str]]) -> list[str]:
    """Depth-first finishing order (iterative: a long chain must not hit the recursion limit)."""
    seen: set[str] = set()
    order: list[str] = []
    for start in ids:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(succs[start]))]
        while stack:
            node, pending = stack[-1]
            nxt = next((s for s in pending if s not in seen), None)
            if nxt is None:
                stack.pop()
                order.append(node)
            else:
                seen.add(nxt)
                stack.append((nxt, iter(succs[nxt])))
    return order


def _components(
    ids: Sequence[str], succs: Mapping[str, list[str]], preds: Mapping[str, list[str]]
) -> list[set[str]]:
    """Strongly connected components (Kosaraju)."""
    seen: set[str] = set()
    found: list[set[str]] = []
    for start in reversed(_finish_order(ids, succs)):
        if start in seen:
            continue
        seen.add(start)
        component = {start}
        stack = [start]
        while stack:
            for pred in preds[stack.pop()]:
                if pred not in seen:
                    seen.add(pred)
                    component.add(pred)
                    stack.append(pred)
        found.append(component)
    return found


def _cycles(
    ids: Sequence[str], succs: Mapping[str, list[str]], preds: Mapping[str, list[str]]
) -> list[list[str]]:
    """One cycle (``[a, b, a]``) per strongly connected component that has one."""
    position = {node_id: i for i, node_id in enumerate(ids)}
    cycles = []
    for component in _components(ids, succs, preds):
        start = min(component, key=position.__getitem__)
        if len(component) > 1 or start in succs[start]:
            cycles.append(_walk_cycle(start, component, succs))
    cycles.sort(key=lambda cycle: position[cycle[0]])
    return cycles


def _walk_cycle(start: str, component: set[str], succs: Mapping[str, list[str]]) -> list[str]:
    # Inside a cyclic component every node has a successor in it, so the walk closes a loop.
    path: list[str] = []
    index: dict[str, int] = {}
    node = start
    while node not in index:
        index[node] = len(path)
        path.append(node)
        node = next(s for s in succs[node] if s in component)
    return [*path[index[node] :], node]


# -- loading --------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            peek: Callable[[], Any] = self.peek_event  # untyped in the stubs
            mark = peek().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted in a pipeline", mark
            )
        return super().compose_node(parent, index)


def _load_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        message = f"is not JSON or YAML: {_one_line(str(exc))}"
        raise PipelineInvalid([NodeError(None, "", message)]) from exc
    finally:
        loader.dispose()


def _load(data: Mapping[str, Any] | str) -> Mapping[str, Any]:
    document = _load_text(data) if isinstance(data, str) else data
    if not isinstance(document, Mapping):
        raise PipelineInvalid(
            [NodeError(None, "", "a pipeline must be an object with 'nodes' and 'edges'")]
        )
    return document


def parse_pipeline(
    data: Mapping[str, Any] | str,
    *,
    max_nodes: int = 1000,
    max_map_items: int = 1000,
    task_allowed: TaskAllowed = lambda _n: True,
) -> PipelineSpec:
    """Check a whole pipeline definition (an object, or JSON or YAML text).

    :class:`PipelineInvalid` lists every problem found, each naming its node.
    ``task_allowed`` answers for ``run_task`` actions whether a task may be called.
    """
    checker = _Checker(max_nodes=max_nodes, max_map_items=max_map_items, task_allowed=task_allowed)
    raw_nodes, raw_edges, settings = checker.top_level(_load(data))
    checker.nodes(raw_nodes)
    checker.edge_list(raw_edges)
    checker.graph()
    checker.references()
    checker.fail_if_any()
    return checker.spec(settings)
