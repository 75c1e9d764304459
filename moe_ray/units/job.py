"""What every analysis contributes to a run: its units, its store group, how to execute them.

`api.run` plans every requested analysis first (all validation happens there, before the store is
touched), then prepares each analysis's store group, executes the pending units and finishes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..distributed.fanout import Unit, run_units
from ..distributed.placement import Demand, Resources
from ..spec import Spec
from ..store import ResultStore


class AnalysisJob(ABC):
    """One analysis of one run: `units.static.StaticJob`, `units.reorder.ReorderJob` (tasks) and
    `units.dynamic.DynamicJob` (shard actors)."""

    name: str

    @abstractmethod
    def units(self) -> list[Unit]:
        """Every unit of this analysis (for resource checks and progress)."""

    @abstractmethod
    def demand(self, spec: Spec, nodes: Sequence[Resources] = ()) -> Demand:
        """What this analysis asks of the cluster (checked against its nodes before anything runs);
        `nodes`, the cluster's nodes where known, for analyses whose needs depend on them."""

    @abstractmethod
    def prepare(self, store: ResultStore, overwrite: bool) -> list[Unit]:
        """Create this analysis's group, coordinates and arrays; return the units not yet done."""

    @abstractmethod
    def execute(self, pending: list[Unit], spec: Spec) -> None:
        """Run the pending units."""

    @abstractmethod
    def finish(self, store: ResultStore) -> str:
        """Cross-unit summaries once every unit is done; returns a one-line summary."""


class TaskJob(AnalysisJob):
    """An analysis whose units are independent Ray tasks (static, reorder)."""

    @abstractmethod
    def unit_function(self):
        """The function a Ray task runs for one unit: fn(*unit.args) -> summary dict."""

    def demand(self, spec: Spec, nodes: Sequence[Resources] = ()) -> Demand:
        """One task per unit, each asking for `cpus_per_task` and its own memory."""
        return Demand(self.name, tuple(
            (u.label, {"CPU": spec.resources.cpus_per_task, "memory": max(1, u.memory_bytes)}) for u in self.units()))

    def execute(self, pending: list[Unit], spec: Spec) -> None:
        run_units(self.unit_function(), pending, what=f"{self.name} units",
                  cpus_per_task=spec.resources.cpus_per_task, progress=spec.progress)
