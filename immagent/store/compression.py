"""A store's compression: the dictionaries it holds, the one new bodies are written with,
and when it trains one from its own bodies.

Bodies are compressed above the backend (a backend stores ``StoredAsset.codec`` as data and
returns rows exactly as written), so every backend gets the same bytes and the one
verify-on-read (``assets.load_row``) decompresses before it re-hashes.

Dictionaries. zstd on one chat message alone finds little to reuse (measured: 0.81 of the
raw size on the benchmarks' synthetic turns, 0.47 on the realistic corpus); a dictionary
trained on the store's own bodies gets 0.43 and 0.39 after 32 KiB of samples (trained on a
store's first 32 KiB, compressing the rest). So a store writes plain zstd until this process
has written ``GENERATIONS[0]`` bytes of compressible bodies, then trains a small dictionary
from them, adopts it if it beats what it replaces by 10 % on held-out samples, and writes it
as a DICTIONARY asset plus a COMPRESSION state (stream ``STREAM``) whose refs list every
dictionary: the state is the root that keeps them from gc and the index by which other
processes find them (one index probe). A second, larger dictionary follows after 1 MiB.
Two processes training at once both expect the stream's head: one commits, the other
adopts the winner's dictionaries. Dictionaries are never retired: a row keeps the one it
was written with, so the state keeps all of them (a store holds at most two).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from immagent import codec
from immagent.assets import Dictionary, Digest, Kind
from immagent.chains import NodeRow
from immagent.exceptions import ImmAgentError, IntegrityError
from immagent.ids import uuid7
from immagent.records import StateRow, load_state, stream_digest
from immagent.rows import StoredAsset, load_row, stored
from immagent.store.backend import Head, LogBackend

__all__ = ["GENERATIONS", "STREAM", "Compression"]

log = logging.getLogger("immagent")

#: The stream of the store's COMPRESSION states.
STREAM = "dictionaries"
#: (bytes of samples collected, dictionary size) for the first and the second dictionary.
GENERATIONS = ((32 << 10, 8 << 10), (1 << 20, 32 << 10))
#: A new dictionary is adopted if it makes held-out samples at most this fraction as big.
ADOPT = 0.9


class Compression:
    """One store's codec state (the Store holds one; safe on one event loop)."""

    def __init__(self, backend: LogBackend) -> None:
        self._backend = backend
        self.dictionaries = codec.NO_DICTIONARIES
        self._head: StateRow | None = None
        self._loaded = False
        self._samples: list[bytes] = []
        self._sampled = 0
        self._train_at = GENERATIONS[0][0]
        self._training = False
        self._broken = False  # the COMPRESSION state fails its check: no training

    async def load(self) -> codec.Dictionaries:
        """Re-read the store's dictionaries (one probe, plus the dictionaries if new).

        Damage stops only what needs the damaged part: a dictionary that is missing,
        damaged or not a dictionary is left out (logged; ``verify`` lists it, reads of the
        rows compressed with it fail, new bodies are written with another codec), and a
        damaged COMPRESSION state keeps the dictionaries known so far and stops training
        (nothing can be appended to a line whose head fails its check)."""
        rows = await self._backend.stream_states(int(Kind.COMPRESSION), STREAM, limit=1)
        try:
            head = load_state(rows[0]) if rows else None
        except IntegrityError as e:
            if not self._broken:
                log.warning("compression: the store's compression state is damaged (%s); "
                            "new bodies use the dictionaries known so far", e)
            self._broken = True
            self._loaded = True
            return self.dictionaries
        self._broken = False
        if head is not None and (self._head is None or head.refs != self._head.refs):
            self.dictionaries = await self._dictionaries(head.refs)
        self._head = head
        self._loaded = True
        if len(self._head.refs if self._head else ()) >= len(GENERATIONS):
            self._samples.clear()
        return self.dictionaries

    async def _dictionaries(self, digests: Sequence[Digest]) -> codec.Dictionaries:
        """The sound dictionaries among ``digests`` (a COMPRESSION state's refs)."""
        known = {d.data: d for d in self.dictionaries.values()}
        found = await self._backend.get_assets(list(digests))
        loaded: list[codec.ZstdDictionary] = []
        for digest in digests:
            try:
                if digest not in found:
                    raise IntegrityError("it is missing")
                asset = load_row(found[digest])
                if not isinstance(asset, Dictionary):
                    raise IntegrityError("it is not a dictionary")
            except IntegrityError as e:
                log.warning("compression: dictionary %s named by the store's compression "
                            "state cannot be used (%s); run store.verify()", digest.hex(), e)
                continue
            dictionary = known.get(asset.data) or codec.ZstdDictionary(asset.data)
            if any(d.id == dictionary.id for d in loaded):
                log.warning("compression: two dictionaries have id %d; neither is used",
                            dictionary.id)
                loaded = [d for d in loaded if d.id != dictionary.id]
                continue
            loaded.append(dictionary)
        return codec.Dictionaries(loaded)

    async def ready(self, rows: Iterable[StoredAsset | NodeRow]) -> codec.Dictionaries:
        """The dictionaries, re-read first if one of ``rows`` names one not known yet (written
        by another process since)."""
        if any(r.codec >= codec.FIRST_DICTIONARY and r.codec not in self.dictionaries
               for r in rows):
            await self.load()
        return self.dictionaries

    async def encode(self, rows: Sequence[StoredAsset]) -> list[StoredAsset]:
        """The rows to write for canonical ``rows``: bodies compressed where that pays."""
        if not self._loaded:
            await self.load()
        writer = self.dictionaries.newest()
        sampling = len(self.dictionaries) < len(GENERATIONS)
        out: list[StoredAsset] = []
        for row in rows:
            if row.codec != codec.RAW or row.kind == Kind.DICTIONARY:
                out.append(row)
                continue
            chosen, body = codec.encode(row.kind, row.refs, row.body, writer)
            if sampling and not row.refs and len(row.body) >= codec.MIN_COMPRESSED:
                self._sample(row.body)
            out.append(row if chosen == codec.RAW else
                       StoredAsset(row.digest, row.kind, row.refs, body, chosen))
        return out

    async def encode_records(self, records: Sequence[bytes]) -> list[tuple[int, bytes]]:
        """(codec, stored bytes) of chain node records (``immagent.chains``): compressed
        like asset bodies, and sampled for the dictionaries (a record holds its elements'
        bodies, so it is what the store compresses most)."""
        if not self._loaded:
            await self.load()
        writer = self.dictionaries.newest()
        sampling = len(self.dictionaries) < len(GENERATIONS)
        out: list[tuple[int, bytes]] = []
        for data in records:
            out.append(codec.encode(int(Kind.NODE), (), data, writer))
            if sampling and len(data) >= codec.MIN_COMPRESSED:
                self._sample(data)
        return out

    def _sample(self, body: bytes) -> None:
        # Up to the point of the next training (a retry after a dictionary that did not pay
        # waits for 4x the samples of its generation): never more, so memory stays bounded,
        # and never less, or a retry past the last generation's size would never come.
        if self._sampled < self._train_at:
            self._samples.append(body)
            self._sampled += len(body)

    async def after_write(self) -> None:
        """Train a dictionary if enough samples were written (after a committed write; a
        failure here is logged, never raised into the write that succeeded)."""
        if self._training or self._sampled < self._train_at:
            return
        self._training = True
        try:
            await self._train()
        except (ImmAgentError, OSError) as e:
            log.warning("training a compression dictionary failed: %s", e)
            self._train_at = self._sampled * 4
        finally:
            self._training = False

    async def _train(self) -> None:
        await self.load()  # another process may have trained meanwhile
        # Generations count what the state lists, damaged dictionaries included, and a
        # new id follows every id that may be in use: one id never names two dictionaries.
        listed = len(self._head.refs) if self._head is not None else 0
        generation = listed
        if self._broken or generation >= len(GENERATIONS):
            return
        if self._sampled < GENERATIONS[generation][0]:
            self._train_at = GENERATIONS[generation][0]
            return
        samples, self._samples, self._sampled = self._samples, [], 0
        held_out, training = samples[3::4], [s for i, s in enumerate(samples) if i % 4 != 3]
        size = GENERATIONS[generation][1]
        number = max(max(self.dictionaries, default=0), codec.FIRST_DICTIONARY - 1 + listed) + 1
        data = await asyncio.to_thread(codec.train, training, number, size)
        if data is None or not held_out:
            self._train_at = GENERATIONS[generation][0] * 4
            return
        new = codec.ZstdDictionary(data)
        if _size(held_out, new) > ADOPT * _size(held_out, self.dictionaries.newest()):
            log.info("a trained dictionary did not pay; trying again later")
            self._train_at = GENERATIONS[generation][0] * 4
            return
        await self._adopt(new)
        self._train_at = (GENERATIONS[generation + 1][0] if generation + 1 < len(GENERATIONS)
                          else 1 << 62)

    async def _adopt(self, new: codec.ZstdDictionary) -> None:
        """Write ``new`` and the state listing it; if another process wrote one first, use
        theirs."""
        asset = Dictionary(data=new.data)
        head = self._head
        refs = (*head.refs, asset.digest) if head is not None else (asset.digest,)
        kind = int(Kind.COMPRESSION)
        state = load_state(StateRow(
            id=uuid7(), parent_id=None if head is None else head.id, kind=kind, stream=STREAM,
            refs=refs, body=b"", digest=stream_digest(kind, STREAM, refs, b""),
            created_at=datetime.now(UTC)))
        result = await self._backend.write(
            [stored(asset)], [state], require=() if head is None else head.refs,
            heads=[Head(kind, STREAM, None if head is None else head.id)])
        if result.stale or result.missing:
            await self.load()
            return
        self.dictionaries = self.dictionaries.with_(new)
        self._head = state
        log.info("compression: adopted dictionary %d (%d bytes)", new.id, len(new.data))


def _size(samples: Sequence[bytes], dictionary: codec.ZstdDictionary | None) -> int:
    return sum(len(codec.encode(int(Kind.MESSAGE), (), s, dictionary)[1]) for s in samples)
