"""A realistic-conversations corpus, generated deterministically to match real chat logs.

No real chat corpus is both installable from a package registry and fit to ship in a
benchmark (see benchmarks/README.md), so the corpus is generated from a seed to match the
statistics of a sample of ShareGPT V3 (17,671 conversations, 129,071 messages), measured
once and written down below:

* **Sizes.** Each conversation's number of turns, each user message's and each assistant
  message's UTF-8 size are drawn from that sample's quantiles (log-linear between them):
  median user message 83 B, median assistant message 1,246 B, a long tail of multi-KB
  answers and of pasted user texts (capped at 32 KiB).
* **Repeats.** 14.3 % of the sample's messages are verbatim copies of an earlier message:
  whole conversations shared twice and shared prefixes of conversations (6.4 % of all
  messages), stock follow-ups such as "continue" (2.6 %) and assistant answers that recur
  elsewhere (5.3 %). The generator reproduces the three with the probabilities below.
* **Text.** English-like, so compression ratios are realistic: a word-bigram Markov chain
  trained on the Python documentation that ships with CPython (``pydoc_data.topics``:
  real English prose with code samples) gives the function words and the sentence shape;
  every other word is replaced, per conversation, by a word of a Zipf-distributed
  pseudo-word lexicon (a conversation keeps its topic words, conversations differ), and
  short runs of a message's own earlier words recur in it, as real answers repeat their
  terms. Tuned so that per-message zlib and zstd ratios and the gain of a trained zstd
  dictionary match the ShareGPT sample (REFERENCE below; README has the comparison).

The training text is whatever ``pydoc_data`` this Python ships: its digest is part of the
corpus summary, so two runs on different Python versions are seen to differ.

Run alone: ``python -m benchmarks.corpus [--conversations N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import itertools
import math
import random
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REFERENCE",
    "Conversation",
    "Corpus",
    "CorpusSummary",
    "generate",
]

# --- the statistics being matched -----------------------------------------------------

#: (percentile, value) of the ShareGPT sample; the 100th percentile is our cap, not theirs
#: (user 394 KB, assistant 83 KB, 63 turns).
USER_BYTES_QUANTILES = ((0, 1), (1, 4), (5, 13), (10, 23), (25, 43), (50, 83), (75, 193),
                        (90, 589), (95, 1460), (99, 5430), (99.9, 14035), (100, 32768))
ASSISTANT_BYTES_QUANTILES = ((0, 1), (1, 13), (5, 114), (10, 250), (25, 671), (50, 1246),
                             (75, 1862), (90, 2626), (95, 3099), (99, 3798), (99.9, 4493),
                             (100, 8192))
TURNS_QUANTILES = ((0, 1), (10, 1), (25, 2), (50, 3), (75, 5), (90, 7), (95, 9), (99, 13),
                   (99.9, 21), (100, 32))

#: Probability that a conversation is an exact copy of an earlier one / starts with a copy
#: of an earlier one's first turns (together: 6.4 % of messages in shared prefixes).
P_COPY_CONVERSATION = 0.05
P_SHARED_PREFIX = 0.035
#: Probability that a follow-up user message (not a first turn) is a stock prompt.
P_STOCK_PROMPT = 0.07
#: Probability that an assistant message repeats an earlier answer of another conversation.
P_REPEATED_ANSWER = 0.125
#: Stock follow-ups, most frequent first (drawn with Zipf weights).
STOCK_PROMPTS = ("continue", "Continue", "Please continue", "more", "Continue writing please",
                 "go on", "please continue", "thank you", "Thanks!", "yes", "ok",
                 "Can you explain that in more detail?", "Rewrite it shorter.",
                 "Give me an example.", "hi", "What else?")

#: Text model: the most frequent training tokens kept as they are (function words, common
#: punctuation-words); the rest become lexicon words.
KEPT_WORDS = 300
#: Size of the pseudo-word lexicon and the exponent of its Zipf distribution.
LEXICON_WORDS = 50_000
LEXICON_EXPONENT = 0.7
#: Probability per word of repeating a short run (3-8 words) of the message's own text.
P_REPEAT_RUN = 0.09

#: What the ShareGPT sample measured (compression: each message compressed alone, a message
#: that does not shrink counted at its size; zstd level 3; dictionary: 110 KiB trained on
#: 5,000 messages, applied to 20,000 others).
REFERENCE: dict[str, float] = {
    "user_p50": 83, "assistant_p50": 1246, "turns_p50": 3,
    "repeated_messages": 0.143, "repeated_bytes": 0.168,
    "zlib_per_message": 0.437, "zstd_per_message": 0.456, "zstd_dict_per_message": 0.360,
    "zlib_whole": 0.342,
}


# --- the corpus -----------------------------------------------------------------------


@dataclass(frozen=True)
class Conversation:
    """One conversation: (user message, assistant message) per turn, oldest first."""

    name: str
    turns: tuple[tuple[str, str], ...]

    @property
    def raw_bytes(self) -> int:
        """Content bytes (UTF-8) of every message: the payload, no roles or framing."""
        return sum(len(u.encode()) + len(a.encode()) for u, a in self.turns)


@dataclass(frozen=True)
class Corpus:
    """A generated set of conversations (see the module docstring)."""

    seed: int
    conversations: tuple[Conversation, ...]
    training_digest: str

    @property
    def turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def raw_bytes(self) -> int:
        """Content bytes of every message of every conversation, repeats included."""
        return sum(c.raw_bytes for c in self.conversations)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the whole corpus (names and texts): proves two processes agree."""
        h = hashlib.sha256()
        for c in self.conversations:
            h.update(c.name.encode() + b"\0")
            for u, a in c.turns:
                h.update(u.encode() + b"\0" + a.encode() + b"\0")
        return h.hexdigest()

    def summary(self) -> CorpusSummary:
        """The distribution to print next to the results."""
        return CorpusSummary.of(self)


@dataclass(frozen=True)
class CorpusSummary:
    """Sizes, repeats and compressibility of a corpus, with the reference values."""

    conversations: int
    turns: int
    messages: int
    raw_bytes: int
    percentiles: dict[str, dict[str, float]]  # "user"/"assistant"/"turns" -> stat -> value
    repeated_messages: float
    repeated_bytes: float
    zlib_per_message: float
    zlib_whole: float
    zstd_per_message: float | None  # None without the zstandard package
    zstd_dict_per_message: float | None
    zipf_exponent: float
    seed: int
    digest: str
    training_digest: str

    @classmethod
    def of(cls, corpus: Corpus) -> CorpusSummary:
        users = [u.encode() for c in corpus.conversations for u, _ in c.turns]
        answers = [a.encode() for c in corpus.conversations for _, a in c.turns]
        messages = users + answers
        seen: set[bytes] = set()
        repeats = repeat_bytes = 0
        for c in corpus.conversations:
            for u, a in c.turns:
                for text in (u.encode(), a.encode()):
                    if text in seen:
                        repeats += 1
                        repeat_bytes += len(text)
                    seen.add(text)
        raw = sum(map(len, messages))
        # Every 4th message keeps the summary cheap; the sample is still thousands long.
        sample = messages[::4]
        sample_raw = sum(map(len, sample))
        packed = sum(min(len(zlib.compress(m, 6)), len(m)) for m in sample)
        whole = b"".join(sample[:4000])
        return cls(
            conversations=len(corpus.conversations), turns=corpus.turns,
            messages=len(messages), raw_bytes=raw,
            percentiles={"user": _stats([len(m) for m in users]),
                         "assistant": _stats([len(m) for m in answers]),
                         "turns": _stats([len(c.turns) for c in corpus.conversations])},
            repeated_messages=repeats / len(messages), repeated_bytes=repeat_bytes / raw,
            zlib_per_message=packed / sample_raw,
            zlib_whole=len(zlib.compress(whole, 6)) / len(whole),
            **_zstd_ratios(messages),
            zipf_exponent=_zipf_exponent(sample), seed=corpus.seed, digest=corpus.digest,
            training_digest=corpus.training_digest)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "reference": REFERENCE}


PERCENTILES = (10, 25, 50, 75, 90, 95, 99)


def _zstd_ratios(messages: Sequence[bytes]) -> dict[str, float | None]:
    """zstd level 3 on each message alone, without and with a 110 KiB dictionary trained
    on other messages (every other one, at most 5,000), as REFERENCE was measured."""
    try:
        import zstandard
    except ImportError:  # a transitive dependency of the bench extra, not declared by us
        return {"zstd_per_message": None, "zstd_dict_per_message": None}
    train: list[bytes | bytearray | memoryview] = list(messages[0::2][:5000])
    test = list(messages[1::2][:20000])
    raw = sum(map(len, test))
    plain = zstandard.ZstdCompressor(level=3)
    trained = zstandard.ZstdCompressor(
        level=3, dict_data=zstandard.train_dictionary(112_640, train))
    return {"zstd_per_message": sum(min(len(plain.compress(m)), len(m)) for m in test) / raw,
            "zstd_dict_per_message":
                sum(min(len(trained.compress(m)), len(m)) for m in test) / raw}


def _stats(values: Sequence[int]) -> dict[str, float]:
    ordered = sorted(values)
    out: dict[str, float] = {f"p{q}": ordered[round((len(ordered) - 1) * q / 100)]
                             for q in PERCENTILES}
    out["max"] = ordered[-1]
    out["mean"] = sum(ordered) / len(ordered)
    return out


def _zipf_exponent(messages: Sequence[bytes]) -> float:
    """-slope of log(frequency) against log(rank) over the 1,000 most frequent words."""
    counts = Counter(w.lower() for m in messages for w in m.split())
    freqs = [n for _, n in counts.most_common(1000)]
    xs = [math.log(rank) for rank in range(1, len(freqs) + 1)]
    ys = [math.log(f) for f in freqs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
             / sum((x - mx) ** 2 for x in xs))
    return -slope


# --- the text model -------------------------------------------------------------------


_TOKEN = re.compile(r"\S+|\n")
_SYLLABLES = (*(c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"),
              "th", "er", "an", "in", "on", "st")
_SUFFIXES = ("", "", "", "s", "ed", "ing", "ion", "er")


class TextModel:
    """The word-bigram chain and the pseudo-word lexicon (built once per process)."""

    def __init__(self) -> None:
        import pydoc_data.topics

        topics: dict[str, str] = pydoc_data.topics.topics
        text = "\n\n".join(topics[key] for key in sorted(topics))
        self.training_digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        tokens = _tokens(text)
        kept = {w for w, _ in Counter(tokens).most_common(KEPT_WORDS)}
        self.kept = frozenset(kept)
        successors: dict[str, list[str]] = {}
        for a, b in itertools.pairwise(tokens):
            successors.setdefault(a, []).append(b)
        self.successors = successors
        self.starts = sorted(w for w in successors if w[:1].isupper())
        self.cumulative = list(itertools.accumulate(
            1 / rank ** LEXICON_EXPONENT for rank in range(1, LEXICON_WORDS + 1)))
        self._lexicon: dict[int, str] = {}

    def lexicon_word(self, rng: random.Random) -> str:
        """A pseudo-word drawn with Zipf weights; frequent ranks are short words."""
        rank = bisect.bisect(self.cumulative, rng.random() * self.cumulative[-1])
        word = self._lexicon.get(rank)
        if word is None:
            made = random.Random(rank)
            syllables = 1 + min(3, int(math.log10(rank + 10)))
            word = "".join(made.choice(_SYLLABLES) for _ in range(syllables))
            word += made.choice(_SUFFIXES)
            self._lexicon[rank] = word
        return word

    def text(self, rng: random.Random, size: int, topic: dict[str, str]) -> str:
        """English-like text of about ``size`` UTF-8 bytes (never blank, never longer).

        ``topic`` maps training words to the lexicon words of this conversation; it grows.
        """
        words: list[str] = []
        length = 0
        state = rng.choice(self.starts)
        while length < size:
            if len(words) > 20 and rng.random() < P_REPEAT_RUN:
                start = rng.randrange(len(words) - 8)
                run = words[start:start + rng.randint(3, 8)]
                words.extend(run)
                length += sum(len(w) + 1 for w in run)
                continue
            nxt = self.successors.get(state)
            state = rng.choice(nxt) if nxt else rng.choice(self.starts)
            word = state
            if word not in self.kept and word != "\n":
                mapped = topic.get(word)
                if mapped is None:
                    mapped = topic[word] = self.lexicon_word(rng)
                word = mapped
            words.append(word)
            length += len(word) + 1
        text = re.sub(r" ?\n ?", "\n", " ".join(words))
        text = text.encode()[:size].decode("utf-8", "ignore").strip()
        return text or "ok"


def _tokens(text: str) -> list[str]:
    """Words and line breaks of the training text, with its reST furniture dropped and
    hard-wrapped prose joined into one line per paragraph (code keeps its lines)."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line for line in paragraph.splitlines()
                 if line.strip() and not set(line.strip()) <= set("+-=*|~^ ")
                 and not line.lstrip().startswith("|")]
        if not lines:
            continue
        code = all(line.startswith(" ") for line in lines)
        for line in lines:
            out.extend(_TOKEN.findall(line))
            if code:
                out.append("\n")
        out.append("\n")
    return out


@functools.cache
def text_model() -> TextModel:
    """The process's text model (building it takes a fraction of a second)."""
    return TextModel()


# --- generation -----------------------------------------------------------------------


def _quantile_draw(rng: random.Random, table: Sequence[tuple[float, float]]) -> float:
    """A value drawn from a distribution given by (percentile, value) points,
    interpolating log-linearly between them."""
    u = rng.random() * 100
    for (p0, v0), (p1, v1) in itertools.pairwise(table):
        if u <= p1:
            f = (u - p0) / (p1 - p0) if p1 > p0 else 0.0
            return math.exp(math.log(v0) + (math.log(v1) - math.log(v0)) * f)
    return table[-1][1]


def generate(conversations: int, seed: int = 11) -> Corpus:
    """``conversations`` conversations drawn from ``seed``: the same arguments give the
    same corpus in every process (on the same Python, see the module docstring)."""
    model = text_model()
    rng = random.Random(seed)
    stock_weights = list(itertools.accumulate(1 / r for r in range(1, len(STOCK_PROMPTS) + 1)))
    made: list[Conversation] = []
    answers: list[str] = []
    for index in range(conversations):
        name = f"conv{index:05d}"
        turns_wanted = round(_quantile_draw(rng, TURNS_QUANTILES))
        turns: list[tuple[str, str]] = []
        roll = rng.random()
        if made and roll < P_COPY_CONVERSATION:
            made.append(Conversation(name, rng.choice(made).turns))
            continue
        if made and roll < P_COPY_CONVERSATION + P_SHARED_PREFIX:
            earlier = rng.choice(made).turns
            turns.extend(earlier[:rng.randint(1, max(1, len(earlier) - 1))])
            turns_wanted = max(turns_wanted, len(turns) + 1)
        topic: dict[str, str] = {}
        while len(turns) < turns_wanted:
            if turns and rng.random() < P_STOCK_PROMPT:
                pick = bisect.bisect(stock_weights, rng.random() * stock_weights[-1])
                user = STOCK_PROMPTS[pick]
            else:
                user = model.text(rng, round(_quantile_draw(rng, USER_BYTES_QUANTILES)), topic)
            if answers and rng.random() < P_REPEATED_ANSWER:
                answer = rng.choice(answers)
            else:
                answer = model.text(rng, round(_quantile_draw(rng, ASSISTANT_BYTES_QUANTILES)),
                                    topic)
                answers.append(answer)
            turns.append((user, answer))
        made.append(Conversation(name, tuple(turns)))
    return Corpus(seed, tuple(made), model.training_digest)


# --- printing -------------------------------------------------------------------------


def describe(summary: CorpusSummary) -> list[list[object]]:
    """Rows of the distribution table: per role, the size percentiles (bytes)."""
    rows: list[list[object]] = []
    for what, label in (("user", "user message B"), ("assistant", "assistant message B"),
                        ("turns", "turns / conversation")):
        stats = summary.percentiles[what]
        rows.append([label, *(f"{stats[f'p{q}']:,.0f}" for q in PERCENTILES),
                     f"{stats['max']:,.0f}", f"{stats['mean']:,.1f}"])
    return rows


DESCRIBE_HEADER = ["", *(f"p{q}" for q in PERCENTILES), "max", "mean"]


def facts(summary: CorpusSummary) -> list[list[object]]:
    """Rows of the repeats-and-compressibility table, each next to the ShareGPT sample."""
    rows: list[list[object]] = [
        ["median user message", f"{summary.percentiles['user']['p50']:,.0f} B",
         f"{REFERENCE['user_p50']:,.0f} B"],
        ["median assistant message", f"{summary.percentiles['assistant']['p50']:,.0f} B",
         f"{REFERENCE['assistant_p50']:,.0f} B"],
        ["messages repeating an earlier one", f"{summary.repeated_messages:.1%}",
         f"{REFERENCE['repeated_messages']:.1%}"],
        ["bytes in those repeats", f"{summary.repeated_bytes:.1%}",
         f"{REFERENCE['repeated_bytes']:.1%}"],
        ["zlib-6, each message alone", f"{summary.zlib_per_message:.3f}",
         f"{REFERENCE['zlib_per_message']:.3f}"],
        ["zlib-6, 4,000 messages together", f"{summary.zlib_whole:.3f}",
         f"{REFERENCE['zlib_whole']:.3f}"],
    ]
    if summary.zstd_per_message is not None and summary.zstd_dict_per_message is not None:
        rows.append(["zstd-3, each message alone", f"{summary.zstd_per_message:.3f}",
                     f"{REFERENCE['zstd_per_message']:.3f}"])
        rows.append(["zstd-3 + 110 KiB trained dictionary",
                     f"{summary.zstd_dict_per_message:.3f}",
                     f"{REFERENCE['zstd_dict_per_message']:.3f}"])
    rows.append(["Zipf exponent, top 1,000 words", f"{summary.zipf_exponent:.2f}",
                 "~1 (English)"])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Generate a corpus and print its distribution."""
    from benchmarks.common import fmt_bytes, print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--show", type=int, default=0, help="print the first N conversations")
    args = parser.parse_args(argv)
    corpus = generate(args.conversations, args.seed)
    s = corpus.summary()
    print(f"{s.conversations} conversations, {s.turns} turns, {s.messages} messages, "
          f"{fmt_bytes(s.raw_bytes)} of content; seed {s.seed}, corpus {s.digest[:16]}, "
          f"training text {s.training_digest}")
    print_table("sizes", DESCRIBE_HEADER, describe(s))
    print_table("repeats and compressibility", ["", "this corpus", "ShareGPT sample"], facts(s))
    for conversation in corpus.conversations[: args.show]:
        print(f"\n--- {conversation.name}")
        for user, answer in conversation.turns:
            print(f"[user]\n{user}\n[assistant]\n{answer}\n")


if __name__ == "__main__":
    main()
