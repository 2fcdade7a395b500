"""Pipelines: DAGs of nodes run as ledger records.

The pure core lives here: :mod:`~gathering_tasks.pipelines.definition` (parse and check a
definition), :mod:`~gathering_tasks.pipelines.templates` (``{{ path }}`` references between
nodes), :mod:`~gathering_tasks.pipelines.planner` (what a run does next) and
:mod:`~gathering_tasks.pipelines.evaluate` (what a node computes without I/O).
"""

from __future__ import annotations

from gathering_tasks.pipelines.definition import (
    EdgeSpec,
    NodeError,
    NodeSpec,
    PipelineInvalid,
    PipelineSpec,
    RetrySpec,
    parse_pipeline,
)
from gathering_tasks.pipelines.planner import Advance, NodeState, Ready, advance, node_input
from gathering_tasks.pipelines.templates import TemplateError, TemplateRef

__all__ = [
    "Advance",
    "EdgeSpec",
    "NodeError",
    "NodeSpec",
    "NodeState",
    "PipelineInvalid",
    "PipelineSpec",
    "Ready",
    "RetrySpec",
    "TemplateError",
    "TemplateRef",
    "advance",
    "node_input",
    "parse_pipeline",
]
