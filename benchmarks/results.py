"""What one benchmark run measured: the scenario sizes and every result (``--json``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks import immagent_scenarios as ours
from benchmarks.common import (
    REPLY_BYTES,
    TURN_PAYLOAD,
    USER_BYTES,
    Backend,
    CorpusStored,
    ForkResult,
    Latency,
    LinearPoint,
)
from benchmarks.corpus import CorpusSummary
from benchmarks.layout import Relation

__all__ = ["Breakdown", "Results", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    """Scenario sizes; quick mode keeps ``make bench`` to a few minutes on 2 cores."""

    linear_turns: int = 1000
    langgraph_sqlite_turns: int = 300
    base_turns: int = 100
    forks: int = 50
    fork_turns: int = 5
    prompt_agents: int = 100
    speed_advances: int = 40
    commit_samples: int = 50
    read_samples: int = 20
    overhead_samples: int = 20
    corpus_lineages: int = 4
    #: Conversations of the realistic corpus (about 3.7 turns and 6.3 KiB each).
    conversations: int = 300

    @classmethod
    def full(cls) -> Sizes:
        return cls(langgraph_sqlite_turns=1000, prompt_agents=1000, speed_advances=200,
                   commit_samples=300, read_samples=100, overhead_samples=100,
                   corpus_lineages=20, conversations=3000)


@dataclass(frozen=True)
class Breakdown:
    """Every relation of one immagent store after a scenario, and the turns it holds."""

    scenario: str
    backend: Backend
    turns: int
    relations: tuple[Relation, ...]

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.relations)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "backend": self.backend, "turns": self.turns,
                "total_bytes": self.total, "relations": [r.as_dict() for r in self.relations]}


@dataclass
class Results:
    """Everything one run measured (what ``--json`` writes)."""

    mode: str
    sizes: Sizes
    environment: dict[str, str]
    linear: list[LinearPoint] = field(default_factory=list)
    forks: list[ForkResult] = field(default_factory=list)
    shared: list[ours.SharedPrompts] = field(default_factory=list)
    throughput: list[ours.Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    overhead: list[ours.Overhead] = field(default_factory=list)
    maintenance: list[ours.Maintenance] = field(default_factory=list)
    breakdowns: list[Breakdown] = field(default_factory=list)
    corpus: CorpusSummary | None = None
    corpus_stored: list[CorpusStored] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: list[dict[str, str]] = field(default_factory=list)

    def point(self, system: str, backend: str, turns: int) -> LinearPoint | None:
        """The linear point of ``system`` on ``backend`` at ``turns``, if measured."""
        return next((p for p in self.linear
                     if (p.system, p.backend, p.turns) == (system, backend, turns)), None)

    def fork(self, system: str, backend: str) -> ForkResult | None:
        return next((f for f in self.forks if (f.system, f.backend) == (system, backend)), None)

    def latency_of(self, system: str, backend: str, operation: str,
                   turns: int | None = None) -> Latency | None:
        """The latency of ``operation`` (a prefix of its name), if measured."""
        return next((lat for lat in self.latency
                     if (lat.system, lat.backend) == (system, backend)
                     and lat.operation.startswith(operation)
                     and (turns is None or lat.history_turns == turns)), None)

    def stored_corpus(self, system: str, backend: str) -> CorpusStored | None:
        return next((c for c in self.corpus_stored
                     if (c.system, c.backend) == (system, backend)), None)

    def ratios(self) -> list[dict[str, Any]]:
        """immagent / LangGraph stored bytes for every comparable measurement."""
        rows: list[dict[str, Any]] = []
        for p in self.linear:
            other = self.point("langgraph", p.backend, p.turns)
            if p.system == "immagent" and p.turns and other is not None:
                rows.append(_ratio(p.backend, f"linear N={p.turns}", p.stored_bytes,
                                   other.stored_bytes))
        for f in self.forks:
            other_fork = self.fork("langgraph", f.backend)
            if f.system == "immagent" and other_fork is not None:
                rows.append(_ratio(f.backend, "bytes per fork", f.bytes_per_fork,
                                   other_fork.bytes_per_fork))
        for c in self.corpus_stored:
            other_corpus = self.stored_corpus("langgraph", c.backend)
            if c.system == "immagent" and other_corpus is not None:
                rows.append(_ratio(c.backend, "realistic corpus", c.stored_bytes,
                                   other_corpus.stored_bytes))
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "sizes": asdict(self.sizes),
            "environment": self.environment,
            "text_bytes": {"user": USER_BYTES, "reply": REPLY_BYTES, "turn": TURN_PAYLOAD},
            "linear": [p.as_dict() for p in self.linear],
            "forks": [f.as_dict() for f in self.forks],
            "shared_prompts": [s.as_dict() for s in self.shared],
            "throughput": [t.as_dict() for t in self.throughput],
            "latency": [lat.as_dict() for lat in self.latency],
            "advance_overhead": [o.as_dict() for o in self.overhead],
            "maintenance": [m.as_dict() for m in self.maintenance],
            "breakdowns": [b.as_dict() for b in self.breakdowns],
            "corpus": self.corpus.as_dict() if self.corpus else None,
            "corpus_stored": [c.as_dict() for c in self.corpus_stored],
            "ratios": self.ratios(),
            "targets": self.targets,
            "notes": self.notes,
        }


def _ratio(backend: str, scenario: str, ours: float, theirs: float) -> dict[str, Any]:
    """One row of ``Results.ratios``."""
    return {"backend": backend, "scenario": scenario, "immagent_bytes": ours,
            "langgraph_bytes": theirs, "ratio": ours / theirs}
