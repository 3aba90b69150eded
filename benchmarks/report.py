"""The printed report of one run (tables, targets, notes) and the storage-growth plot."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import (
    REPLY_BYTES,
    TURN_PAYLOAD,
    USER_BYTES,
    fmt_bytes,
    growth_exponent,
    print_table,
)
from benchmarks.corpus import DESCRIBE_HEADER, describe, facts
from benchmarks.results import Breakdown, Results

__all__ = ["plot", "report"]


def report(res: Results) -> None:
    """Print every table and the target checks."""
    print(f"immagent benchmarks ({res.mode} mode); texts: user {USER_BYTES} B, reply "
          f"{REPLY_BYTES} B, {TURN_PAYLOAD} B of payload per turn")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in res.environment.items()))
    _linear(res)
    _breakdowns(res, "linear", "   where immagent's bytes go at N={turns} (linear, advance)")
    _forks_and_prompts(res)
    _speed(res)
    _maintenance_and_langgraph(res)
    _sessions(res)
    _corpus(res)
    if any(p.system == "immagent-saver" for p in res.linear):
        from benchmarks import immagent_saver  # imports LangGraph (the `bench` extra)

        immagent_saver.print_tables(res.linear, res.forks, res.latency)
    print_table("Targets", ["status", "target", "detail"],
                [[t["status"], t["target"], t["detail"]] for t in res.targets])
    for note in res.notes:
        print(f"note: {note}")


def _linear(res: Results) -> None:
    print_table("1. Linear: one conversation advanced N times (immagent-append and "
                "openai-agents: store only)",
                ["system", "backend", "N", "stored", "payload", "bytes/turn", "seconds"],
                [[p.system, p.backend, p.turns, fmt_bytes(p.stored_bytes),
                  fmt_bytes(p.payload_bytes), f"{p.bytes_per_turn:,.0f}" if p.turns else "-",
                  f"{p.seconds:.1f}"] for p in res.linear])
    exponents: list[list[object]] = []
    for system, backend in sorted({(p.system, p.backend) for p in res.linear}):
        pts = sorted((p for p in res.linear if (p.system, p.backend) == (system, backend)),
                     key=lambda p: p.turns)
        lo = next((p for p in pts if p.turns == 100), None)
        empty = next((p for p in pts if p.turns == 0), None)
        if lo and empty and pts[-1].turns > 100:
            hi, before = pts[-1], pts[-2]
            k = growth_exponent(100, lo.stored_bytes, hi.turns, hi.stored_bytes)
            k_net = growth_exponent(100, lo.stored_bytes - empty.stored_bytes,
                                    hi.turns, hi.stored_bytes - empty.stored_bytes)
            marginal = (hi.stored_bytes - before.stored_bytes) / (hi.turns - before.turns)
            exponents.append([system, backend, f"100..{hi.turns}", f"{k:.3f}", f"{k_net:.3f}",
                              f"{marginal:,.0f}", fmt_bytes(empty.stored_bytes)])
    print_table("   growth: stored ~ N**k; net = minus the empty store; marginal = last segment",
                ["system", "backend", "N range", "k", "k net", "marginal B/turn", "empty store"],
                exponents)


def _breakdowns(res: Results, scenario: str, title: str) -> None:
    """Per relation of immagent's stores after ``scenario``, both backends in one table."""
    chosen = [b for b in res.breakdowns if b.scenario == scenario]
    if not chosen:
        return
    rows: list[list[object]] = []
    for b in chosen:
        rows.extend(_breakdown_rows(b))
    print_table(title.format(turns=chosen[0].turns),
                ["backend", "table", "relation", "kind", "rows", "bytes", "bytes/turn"], rows)


def _breakdown_rows(b: Breakdown) -> list[list[object]]:
    rows: list[list[object]] = [
        [b.backend, r.table, r.name, r.kind, f"{r.rows:,}" if r.rows is not None else "-",
         fmt_bytes(r.bytes), f"{r.bytes / b.turns:,.0f}"] for r in b.relations]
    rows.append([b.backend, "(total)", "", "", "-", fmt_bytes(b.total),
                 f"{b.total / b.turns:,.0f}"])
    return rows


def _forks_and_prompts(res: Results) -> None:
    print_table("2. Forks: base conversation, then forks each advanced a few turns",
                ["system", "backend", "base", "forks x turns", "bytes/fork", "own payload",
                 "bytes/fork / payload"],
                [[f.system, f.backend, f"{f.base_turns} turns = {fmt_bytes(f.base_bytes)}",
                  f"{f.forks} x {f.fork_turns}", f"{f.bytes_per_fork:,.0f}",
                  f"{f.fork_payload_bytes:,}", f"{f.bytes_per_fork / f.fork_payload_bytes:.1f}"]
                 for f in res.forks])
    print_table("3. Shared prompts: agents with one 4 KiB prompt vs a distinct prompt each",
                ["backend", "agents x turns", "shared prompt", "distinct prompts", "saved",
                 "shared / distinct"],
                [[s.backend, f"{s.agents} x {s.turns}", fmt_bytes(s.shared_bytes),
                  fmt_bytes(s.unique_bytes), fmt_bytes(s.saved_bytes), f"{s.ratio:.2f}"]
                 for s in res.shared])


def _speed(res: Results) -> None:
    print_table("4a. Speed: advances per second (offline model, warm cache)",
                ["backend", "history turns", "tasks", "advances", "seconds", "advances/s"],
                [[t.backend, t.history_turns, t.tasks, t.advances, f"{t.seconds:.2f}",
                  f"{t.per_second:,.0f}"] for t in res.throughput])
    print_table("4b. Speed: latency", ["backend", "operation", "history turns", "samples",
                                       "p50 ms", "p99 ms"],
                [[lat.backend, lat.operation, lat.history_turns, len(lat.samples),
                  _ms(lat.p50), _ms(lat.p99)]
                 for lat in res.latency if lat.system == "immagent"])
    rows: list[list[object]] = []
    for o in res.overhead:
        model = _ms(o.p("model_call", 50)) if o.calls else "not via LiteLLM"
        in_store = _ms(o.p("store_calls", 50)) if o.store_call_count else "-"
        rows.append([o.backend, o.history_turns, o.cache, len(o.advance),
                     _ms(o.p("advance", 50)), model, _ms(o.p("overhead", 50)),
                     _ms(o.p("overhead", 99)), in_store,
                     f"{o.p('overhead', 50) / o.p('advance', 50):.0%}"])
    print_table("4c. Per-advance overhead (ms): advance() minus the time inside "
                "litellm.acompletion, echo model; store calls = get_messages, "
                "get_system_prompt, append",
                ["backend", "history turns", "cache", "samples", "advance p50",
                 "LiteLLM call p50", "overhead p50", "overhead p99", "store calls p50",
                 "overhead share"], rows)


def _maintenance_and_langgraph(res: Results) -> None:
    print_table("5. gc and verify throughput",
                ["backend", "operation", "assets", "body MB", "seconds", "assets/s", "MB/s",
                 "result"],
                [[m.backend, m.operation, f"{m.assets:,}", f"{m.body_bytes / 1e6:.1f}",
                  f"{m.seconds:.2f}", f"{m.assets_per_second:,.0f}", f"{m.mb_per_second:.1f}",
                  m.detail] for m in res.maintenance])
    if ratios := res.ratios():
        print_table("6. immagent vs LangGraph checkpointer, same texts, same server",
                    ["backend", "scenario", "immagent", "langgraph", "ours/theirs", "x less"],
                    [[r["backend"], r["scenario"], fmt_bytes(r["immagent_bytes"]),
                      fmt_bytes(r["langgraph_bytes"]), f"{r['ratio']:.4f}",
                      f"{1 / r['ratio']:,.0f}x"] for r in ratios])


def _sessions(res: Results) -> None:
    """Section 7: store-only immagent beside the OpenAI Agents SDK's SQLiteSession."""
    n = res.sizes.linear_turns
    session = res.point("openai-agents", "sqlite", n)
    systems = [("openai-agents", "sqlite"), *sorted(
        {(p.system, p.backend) for p in res.linear if p.system == "immagent-append"})]
    bytes_rows: list[list[object]] = []
    for system, backend in systems:
        hi, empty = res.point(system, backend, n), res.point(system, backend, 0)
        if hi and empty:
            net = (hi.stored_bytes - empty.stored_bytes) / n
            bytes_rows.append([system, backend, fmt_bytes(hi.stored_bytes),
                               f"{hi.bytes_per_turn:,.0f}", f"{net:,.0f}",
                               fmt_bytes(empty.stored_bytes),
                               f"{hi.stored_bytes / session.stored_bytes:.2f}"
                               if session else "-"])
    if not bytes_rows:
        return
    print_table(f"7a. Store only, beside OpenAI Agents SQLiteSession: {n} turns of the "
                "synthetic texts (immagent keeps every state)",
                ["system", "backend", "stored", "bytes/turn", "net bytes/turn", "empty store",
                 "/ SQLiteSession"], bytes_rows)
    wanted = (("openai-agents", "add_items"), ("immagent", "commit"),
              ("openai-agents", "get_items"), ("immagent-append", "get_messages"))
    rows = [[*_operation(lat.system, lat.operation), lat.backend, lat.history_turns,
             len(lat.samples), _ms(lat.p50), _ms(lat.p99)]
            for system, prefix in wanted for lat in res.latency
            if lat.system == system and lat.operation.startswith(prefix)]
    print_table("7b. Store only, latency (one turn = one user + one assistant message)",
                ["system", "operation", "backend", "history turns", "samples", "p50 ms",
                 "p99 ms"], rows)


def _operation(system: str, operation: str) -> tuple[str, str]:
    """(system, operation) as 7b shows them: the store-only commit of scenario 4 (measured
    on clones of the advance agents) is the same call as immagent-append's."""
    if system == "immagent" and operation.startswith("commit"):
        return "immagent-append", "Store.append, one turn"
    return system, operation


def _corpus(res: Results) -> None:
    """Section 8: the realistic corpus, its distribution and what each system stored."""
    s = res.corpus
    if s is None:
        return
    print(f"\n8. Realistic conversations: {s.conversations:,} conversations, {s.turns:,} turns, "
          f"{s.messages:,} messages, {fmt_bytes(s.raw_bytes)} of text "
          f"(generated: benchmarks/corpus.py, seed {s.seed}, corpus {s.digest[:12]}, "
          f"training text {s.training_digest[:12]})")
    print_table("   message sizes (bytes) and conversation lengths", DESCRIBE_HEADER, describe(s))
    print_table("   repeats and compressibility", ["", "this corpus", "ShareGPT sample"],
                facts(s))
    session = res.stored_corpus("openai-agents", "sqlite")
    print_table("   stored bytes vs raw payload (content bytes only); immagent and LangGraph "
                "keep every state, SQLiteSession the latest",
                ["system", "backend", "raw payload", "stored", "stored / raw", "net / raw",
                 "/ SQLiteSession", "after VACUUM", "seconds"],
                [[c.system, c.backend, fmt_bytes(c.raw_bytes), fmt_bytes(c.stored_bytes),
                  f"{c.ratio:.2f}x", f"{c.net_ratio:.2f}x",
                  f"{c.stored_bytes / session.stored_bytes:.2f}" if session else "-",
                  "-" if c.compacted_bytes is None
                  else f"{c.compacted_bytes / c.raw_bytes:.2f}x",
                  f"{c.seconds:.1f}"] for c in res.corpus_stored])
    print("   after VACUUM: the SQLite file compacted into a copy, for information (the"
          " store never runs VACUUM; targets use 'stored')")
    _breakdowns(res, "corpus", "   where immagent's bytes go, realistic corpus ({turns} turns)")


def _ms(seconds: float) -> str:
    """Milliseconds, with a third decimal for sub-0.1 ms values (warm cache hits)."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 0.1 else f"{ms:.3f}"


def plot(res: Results, path: Path) -> None:
    """Stored bytes against N, log-log, one curve per system and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for system, backend in sorted({(p.system, p.backend) for p in res.linear}):
        pts = sorted((p for p in res.linear if (p.system, p.backend) == (system, backend)),
                     key=lambda p: p.turns)
        pts = [p for p in pts if p.turns]  # log axis: the empty store is not drawn
        style = {"langgraph": "--", "openai-agents": ":", "immagent-append": "-."}.get(system, "-")
        ax.plot([p.turns for p in pts], [p.stored_bytes for p in pts], marker="o",
                linestyle=style, label=f"{system} / {backend}")
    turns = sorted({p.turns for p in res.linear if p.turns})
    ax.plot(turns, [t * TURN_PAYLOAD for t in turns], color="grey", linestyle=":",
            label="logical payload")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("turns (N)")
    ax.set_ylabel("stored bytes")
    ax.set_title("Storage growth of one conversation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
