"""How fast the command line answers: ``immagent chat "Hello"`` with the offline echo model
against ``immagent agents`` on the same SQLite store (issue 11 target: chat <= 3x agents).

    uv run python -m benchmarks.cli_latency [--runs N] [--litellm] [--json FILE]

Each run is a fresh process of the installed console script, as a user starts it; the two
commands alternate so machine load hits both alike. ``--litellm`` also times a bare
``import litellm`` (what a provider model's first turn waits for, overlapped by the CLI
with opening the store).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TARGET_RATIO = 3.0
SCRIPT = Path(sys.executable).with_name("immagent")


def timed(argv: Sequence[str], env: dict[str, str]) -> float:
    """Wall seconds of one run (which must succeed)."""
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(runs: int, with_litellm: bool) -> dict[str, object]:
    """Times of ``agents`` and ``chat "Hello"`` (seconds), and the medians' ratio."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY",
                        "IMMAGENT_MODEL", "IMMAGENT_DB", "IMMAGENT_ECHO_DELAY")}
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.db")
        timed([str(SCRIPT), "--db", db, "chat", "warm up"], env)  # the store exists
        times: dict[str, list[float]] = {"agents": [], "chat": []}
        for _ in range(runs):
            times["agents"].append(timed([str(SCRIPT), "--db", db, "agents"], env))
            times["chat"].append(timed([str(SCRIPT), "--db", db, "chat", "Hello"], env))
    result: dict[str, object] = {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "runs": t}
        for name, t in times.items()}
    ratio = statistics.median(times["chat"]) / statistics.median(times["agents"])
    result["ratio"] = ratio
    result["target"] = "PASS" if ratio <= TARGET_RATIO else "MISS"
    if with_litellm:
        result["import_litellm"] = timed(
            [sys.executable, "-c", "import litellm"],
            {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    return result


def report(result: dict[str, object]) -> None:
    """Print the table and the target line."""
    print(f"{'command':<28}{'median':>10}{'min':>10}{'max':>10}")
    for name, label in (("agents", "immagent agents"), ("chat", 'immagent chat "Hello"')):
        row = result[name]
        assert isinstance(row, dict)
        print(f"{label:<28}{row['median'] * 1000:>8.0f}ms{row['min'] * 1000:>8.0f}ms"
              f"{row['max'] * 1000:>8.0f}ms")
    if "import_litellm" in result:
        print(f"{'python -c import litellm':<28}{result['import_litellm']:>9.1f}s  (one run)")
    print(f"chat / agents = {result['ratio']:.2f}x (target <= {TARGET_RATIO:.0f}x): "
          f"{result['target']}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command")
    parser.add_argument("--litellm", action="store_true", help="also time import litellm")
    parser.add_argument("--json", metavar="FILE", help="write the numbers as JSON")
    args = parser.parse_args(argv)
    result = measure(args.runs, args.litellm)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
