"""The issues' targets, checked against one run: PASS/MISS with the numbers behind each."""

from __future__ import annotations

from benchmarks.common import TURN_PAYLOAD, fmt_bytes, growth_exponent
from benchmarks.results import Results

__all__ = ["check_targets"]

KIB = 1024
#: Issue 11: stored / raw payload of the realistic corpus, every state kept.
CORPUS_RATIO = {"sqlite": 0.75, "postgres": 0.70}
#: Issue 11: store-only bytes per synthetic turn (406 B of payload) at N=1000, empty
#: schema included.
APPEND_BYTES_PER_TURN = {"sqlite": 900, "postgres": 1100}
#: Issue 11: cold get_messages at 1000 turns / SQLiteSession's cold get_items (SQLite).
COLD_READ_FACTOR = {"sqlite": 1.0, "postgres": 1.5}


def _target(name: str, ok: bool | None, detail: str) -> dict[str, str]:
    status = "PASS" if ok else "MISS" if ok is not None else "N/A"
    return {"target": name, "status": status, "detail": detail}


def check_targets(res: Results) -> list[dict[str, str]]:
    """Every target, per immagent backend."""
    out: list[dict[str, str]] = []
    backends = sorted({p.backend for p in res.linear if p.system.startswith("immagent")}
                      | {c.backend for c in res.corpus_stored if c.system == "immagent"})
    for backend in backends:
        out.extend(_storage_targets(res, backend))
        out.extend(_baseline_targets(res, backend))
        out.extend(_speed_targets(res, backend))
    return out


def _storage_targets(res: Results, backend: str) -> list[dict[str, str]]:
    """Issue 1-3 targets on the synthetic texts: growth, bytes/turn, forks, vs LangGraph."""
    out: list[dict[str, str]] = []
    n = res.sizes.linear_turns
    tag = _tag(backend)
    lo, hi = res.point("immagent", backend, 100), res.point("immagent", backend, n)
    empty = res.point("immagent", backend, 0)
    if lo and hi and empty:
        k = growth_exponent(lo.turns, lo.stored_bytes, hi.turns, hi.stored_bytes)
        k_net = growth_exponent(lo.turns, lo.stored_bytes - empty.stored_bytes,
                                hi.turns, hi.stored_bytes - empty.stored_bytes)
        out.append(_target(f"{tag} growth exponent N=100..{n} <= 1.05", k <= 1.05,
                           f"k = {k:.3f}; {k_net:.3f} without the empty store's "
                           f"{fmt_bytes(empty.stored_bytes)}"))
        limit = TURN_PAYLOAD + KIB
        net = (hi.stored_bytes - empty.stored_bytes) / hi.turns
        out.append(_target(
            f"{tag} bytes/turn at N={n} <= payload + 1 KiB", hi.bytes_per_turn <= limit,
            f"{hi.bytes_per_turn:.0f} B/turn ({net:.0f} without the empty store) vs limit "
            f"{limit} B ({TURN_PAYLOAD} B payload), through advance (assistant messages "
            "carry token counts and the model)"))
    appended = res.point("immagent-append", backend, n)
    appended_empty = res.point("immagent-append", backend, 0)
    if appended and appended_empty and backend in APPEND_BYTES_PER_TURN:
        limit = APPEND_BYTES_PER_TURN[backend]
        net = (appended.stored_bytes - appended_empty.stored_bytes) / appended.turns
        via_advance = f"; through advance {hi.bytes_per_turn:,.0f}" if hi else ""
        out.append(_target(
            f"{tag} store-only bytes/turn at N={n} <= {limit:,} (empty schema included)",
            appended.bytes_per_turn <= limit,
            f"{appended.bytes_per_turn:,.0f} B/turn ({net:,.0f} without the empty store's "
            f"{fmt_bytes(appended_empty.stored_bytes)}) for {TURN_PAYLOAD} B of payload"
            + via_advance))
    fork = res.fork("immagent", backend)
    if fork:
        limit = fork.fork_turns * (TURN_PAYLOAD + KIB)
        copy = fork.base_turns * TURN_PAYLOAD
        out.append(_target(
            f"{tag} a fork costs only its own messages", fork.bytes_per_fork <= limit,
            f"{fork.bytes_per_fork:.0f} B/fork = {fork.bytes_per_fork / fork.fork_turns:.0f}"
            f" B per own turn of {TURN_PAYLOAD} B payload (limit {limit} B: + 1 KiB per "
            f"turn, as for bytes/turn); a copy of the base would add >= {copy} B"))
    lg = res.point("langgraph", backend, n)
    if hi and lg:
        factor = lg.stored_bytes / hi.stored_bytes
        required = backend == "postgres"
        out.append(_target(
            f"{tag} >= 100x less storage than LangGraph at N={n}"
            + ("" if required else " (informational)"), factor >= 100,
            f"{factor:.0f}x ({fmt_bytes(hi.stored_bytes)} vs {fmt_bytes(lg.stored_bytes)})"))
    corpus = res.stored_corpus("immagent", backend)
    if corpus and backend in CORPUS_RATIO:
        most = CORPUS_RATIO[backend]
        session = res.stored_corpus("openai-agents", "sqlite")
        versus = (f"; SQLiteSession {session.ratio:.2f}x, immagent / SQLiteSession "
                  f"{corpus.stored_bytes / session.stored_bytes:.2f}" if session else "")
        out.append(_target(
            f"{tag} realistic corpus stored <= {most:.2f}x raw payload, every state kept",
            corpus.ratio <= most,
            f"{corpus.ratio:.2f}x ({fmt_bytes(corpus.stored_bytes)} for "
            f"{fmt_bytes(corpus.raw_bytes)} of text; {corpus.net_ratio:.2f}x without the "
            f"empty store)" + versus
            + ("" if corpus.compacted_bytes is None else
               f"; {corpus.compacted_bytes / corpus.raw_bytes:.2f}x after a VACUUM (the "
               "store runs none)")))
    return out


def _baseline_targets(res: Results, backend: str) -> list[dict[str, str]]:
    """Issue 11's read target against SQLiteSession on the same conversation."""
    n = res.sizes.linear_turns
    ours = res.latency_of("immagent-append", backend, "get_messages (cold)", n)
    theirs = res.latency_of("openai-agents", "sqlite", "get_items (new session)", n)
    if not (ours and theirs and backend in COLD_READ_FACTOR):
        return []
    factor = COLD_READ_FACTOR[backend]
    limit = "<=" if factor == 1 else f"within {factor}x of"
    return [_target(
        f"{_tag(backend)} cold get_messages at {n} turns {limit} SQLiteSession.get_items()",
        ours.p50 <= factor * theirs.p50,
        f"p50 {ours.p50 * 1e3:.2f} ms vs {theirs.p50 * 1e3:.2f} ms "
        f"({ours.p50 / theirs.p50:.2f}x; p99 {ours.p99 * 1e3:.2f} vs {theirs.p99 * 1e3:.2f} ms)"
    )]


def _tag(backend: str) -> str:
    return f"[{backend}]"


def _speed_targets(res: Results, backend: str) -> list[dict[str, str]]:
    """Throughput against history length and the cold-read time (issue 1-3 targets)."""
    out: list[dict[str, str]] = []
    n = res.sizes.linear_turns
    tag = _tag(backend)
    commits = {lat.history_turns: lat.p50 for lat in res.latency
               if (lat.system, lat.backend) == ("immagent", backend)
               and lat.operation.startswith("commit")}
    store_share = (f"; store-only commit p50 {commits[10] * 1e3:.2f} ms at N=10, "
                   f"{commits[n] * 1e3:.2f} ms at N={n}" if {10, n} <= commits.keys() else "")
    for tasks in (1, 8):
        short = _rate(res, backend, 10, tasks)
        long = _rate(res, backend, n, tasks)
        if short and long:
            out.append(_target(
                f"{tag} advance throughput at N={n} within 20% of N=10, {tasks} task(s)",
                long >= 0.8 * short,
                f"{long:.0f}/s vs {short:.0f}/s ({long / short - 1:+.0%}); the model call "
                f"(LiteLLM + offline model) handles the whole history" + store_share))
    reads = res.latency_of("immagent", backend, "get_messages (cold)")
    if reads:
        out.append(_target(
            f"{tag} get_messages on {reads.history_turns} turns < 10 ms cold (p50)",
            reads.p50 < 0.010, f"p50 {reads.p50 * 1e3:.2f} ms, p99 {reads.p99 * 1e3:.2f} ms"))
    return out


def _rate(res: Results, backend: str, turns: int, tasks: int) -> float | None:
    return next((t.per_second for t in res.throughput
                 if (t.backend, t.history_turns, t.tasks) == (backend, turns, tasks)), None)
