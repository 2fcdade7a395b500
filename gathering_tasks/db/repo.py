"""The SQL layer in one handle: each consumer's store over one session factory.

All SQL of gathering-tasks lives in ``gathering_tasks.db``, split by who uses it:

* :class:`~gathering_tasks.db.actions.ActionStore` -- the API's and CLI's action definitions;
* :class:`~gathering_tasks.db.claims.SlotClaims` -- beat's claims of due slots, and triggers;
* :class:`~gathering_tasks.db.ledger.SqlLedger` -- the worker's side of the execution guard,
  and reads of runs;
* :class:`~gathering_tasks.db.sweeps.Sweeps` -- recovery and retention;
* :class:`~gathering_tasks.db.pipelines.PipelineStore` -- pipeline definitions and runs.
"""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from gathering_tasks.db.actions import ActionStore
from gathering_tasks.db.claims import SlotClaims
from gathering_tasks.db.ledger import SqlLedger
from gathering_tasks.db.pipelines import PipelineStore
from gathering_tasks.db.sweeps import Sweeps


class Repository:
    """The stores of one database. A node's final outcome moves its pipeline on."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory
        self.dialect: str = factory.kw["bind"].dialect.name
        self.actions = ActionStore(factory)
        self.claims = SlotClaims(factory)
        self.pipelines = PipelineStore(factory)
        self.ledger = SqlLedger(factory, progress=self.pipelines)
        self.sweeps = Sweeps(factory, progress=self.pipelines)
