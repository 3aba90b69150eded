"""How an asset body is stored: as is, or zstd-compressed, optionally with a dictionary.

A digest is always the blake3 of the canonical (uncompressed) bytes, so an id never depends
on how its body is stored; the codec is a per-row fact (``StoredAsset.codec``):

* ``RAW`` (0): the body is the canonical bytes;
* ``ZSTD`` (1): a zstd frame without a dictionary;
* ``n >= 2``: a zstd frame made with the dictionary whose zstd dictionary id is ``n`` (a
  DICTIONARY asset of the same store; the id is inside the dictionary's hashed bytes, so
  a number can never be re-pointed at other content).

Frames are stored without the 4-byte zstd magic number, the dictionary id and the
checksum (the row's codec says it is zstd and which dictionary, and the digest check after
decompression is stronger than zstd's checksum); they keep the content size. A body that
does not shrink is stored raw, and so is every row with refs (nodes: their bodies are a few
bytes of counters, and gc checks them without any dictionary).

**What a frame may make us allocate** is bounded before zstd runs, since a frame's content
size is untrusted until the digest is checked (eight tampered 8 KB rows declaring 256 MiB
each once took a read to 2.85 GB): a body is stored compressed only if its frame is at
least 1/``MAX_RATIO`` of it (more than that is degenerate content, stored raw), so a frame
may declare at most ``MAX_RATIO`` times its own size, and never more than ``MAX_BODY``; a
frame declaring more is refused unread. A batch of rows is decompressed and checked in
parts of at most ``MAX_UNCHECKED`` declared bytes (``assets.load_rows``), and every other
reader checks each body before decompressing the next: however many damaged rows a read
meets, what is allocated before their digests are checked stays bounded store-wide.

Library: ``zstandard``. The other candidate, 3.14's ``compression.zstd`` (``backports.zstd``
before 3.14), would need no dependency from 3.14 on, but its decompressor decodes one frame
and is spent, so each body pays a new decompression context: measured here, 6.7 us per
200-byte body against zstandard's 0.9 us with one reused context, i.e. 13 ms against 2 ms
for the 2,000 bodies of a 1,000-turn conversation, the whole cold-read budget.
zstandard is imported on first use, so commands that never touch a compressed body (e.g.
``immagent agents``) do not pay its import.
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import zstandard

__all__ = [
    "FIRST_DICTIONARY",
    "LAST_DICTIONARY",
    "MAX_BODY",
    "MAX_RATIO",
    "MAX_UNCHECKED",
    "NO_DICTIONARIES",
    "RAW",
    "SMALL_FRAME_MAX",
    "ZSTD",
    "CodecError",
    "Dictionaries",
    "ZstdDictionary",
    "check_declared",
    "declared_sizes",
    "decode",
    "decode_many",
    "decoded_size",
    "dictionary_id",
    "encode",
    "small_frames",
    "train",
]

RAW = 0
ZSTD = 1
#: Dictionary ids (and so codec values) a store assigns; the last fits PostgreSQL's smallint.
FIRST_DICTIONARY = 2
LAST_DICTIONARY = 32767
#: Largest body a frame may declare: a damaged content size must not allocate more.
MAX_BODY = 1 << 30
#: Most a body may outgrow its frame: a body compressing further is stored raw, so a frame
#: declaring more than this many times its own size is damaged (a chat message reaches
#: 2-20x; only runs of one byte pass 1,000x).
MAX_RATIO = 1024
#: Most bytes one batch decompresses before their digests are checked (load_rows checks a
#: long batch in parts: a small frame declares at most 64 KiB, so 1,024 of them a part).
MAX_UNCHECKED = 64 << 20
#: What a frame whose first byte is below 0x80 may declare at most (a 0- to 2-byte
#: content size field): such frames need no look at their header before decompressing.
SMALL_FRAME_MAX = 65_791
#: Bodies shorter than this are stored raw (a frame's header alone is 5-7 bytes).
MIN_COMPRESSED = 16
#: zstd level for new frames. Level 19 was measured within 2 % of level 3 on chat messages.
LEVEL = 3

_DICT_MAGIC = b"\x37\xa4\x30\xec"


class CodecError(ValueError):
    """A stored body cannot be decoded with its codec (damaged, or an unknown dictionary)."""


_module: Any = None


def _zstd() -> Any:
    global _module
    if _module is None:
        import zstandard

        _module = zstandard
    return _module


def dictionary_id(data: bytes) -> int:
    """The zstd dictionary id stored in a dictionary's header (ValueError if ``data`` is not
    a zstd dictionary with an id a store may use)."""
    if len(data) < 8 or data[:4] != _DICT_MAGIC:
        raise ValueError("not a zstd dictionary (bad magic number)")
    number = int.from_bytes(data[4:8], "little")
    if not FIRST_DICTIONARY <= number <= LAST_DICTIONARY:
        raise ValueError(f"zstd dictionary id {number} is outside "
                         f"{FIRST_DICTIONARY}..{LAST_DICTIONARY}")
    return number


class ZstdDictionary:
    """A loaded dictionary: its id, its bytes, and (per thread: zstandard's contexts are not
    thread-safe) one compressor and one decompressor reused for every body."""

    def __init__(self, data: bytes) -> None:
        self.id = dictionary_id(data)
        self.data = data
        self._local = threading.local()
        self._loaded: zstandard.ZstdCompressionDict | None = None

    def _dict(self) -> zstandard.ZstdCompressionDict:
        if self._loaded is None:
            self._loaded = _zstd().ZstdCompressionDict(self.data)
        return self._loaded

    def decompressor(self) -> Any:
        d = getattr(self._local, "d", None)
        if d is None:
            z = _zstd()
            d = self._local.d = z.ZstdDecompressor(dict_data=self._dict(),
                                                   format=z.FORMAT_ZSTD1_MAGICLESS)
        return d

    def compressor(self) -> Any:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = _compressor(self._dict())
        return c


def _compressor(dictionary: zstandard.ZstdCompressionDict | None) -> Any:
    z = _zstd()
    params = z.ZstdCompressionParameters.from_level(
        LEVEL, format=z.FORMAT_ZSTD1_MAGICLESS, write_content_size=1, write_checksum=0,
        write_dict_id=0)
    return z.ZstdCompressor(dict_data=dictionary, compression_params=params)


_plain = threading.local()


def _plain_decompressor() -> Any:
    d = getattr(_plain, "d", None)
    if d is None:
        z = _zstd()
        d = _plain.d = z.ZstdDecompressor(format=z.FORMAT_ZSTD1_MAGICLESS)
    return d


def _plain_compressor() -> Any:
    c = getattr(_plain, "c", None)
    if c is None:
        c = _plain.c = _compressor(None)
    return c


class Dictionaries(dict[int, ZstdDictionary]):
    """The dictionaries a store's rows may use, by id. A dict (lookups on the read path stay
    in C); treated as immutable: ``with_`` makes a new one."""

    def __init__(self, dictionaries: Iterable[ZstdDictionary] = ()) -> None:
        super().__init__()
        for d in dictionaries:
            if d.id in self and self[d.id].data != d.data:
                raise ValueError(f"two different dictionaries have id {d.id}")
            self[d.id] = d

    def newest(self) -> ZstdDictionary | None:
        """The dictionary new bodies are written with (the highest id), if any."""
        return self[max(self)] if self else None

    def with_(self, dictionary: ZstdDictionary) -> Dictionaries:
        """These dictionaries and ``dictionary``."""
        return Dictionaries([*self.values(), dictionary])


NO_DICTIONARIES = Dictionaries()


def _content_size(frame: bytes) -> int:
    """The content size a magicless frame header declares (CodecError if it has none)."""
    if not frame:
        raise CodecError("an empty zstd frame")
    fhd = frame[0]
    single = (fhd >> 5) & 1
    size_bytes = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    if not size_bytes:
        raise CodecError("a zstd frame without its content size")
    start = 1 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    field = frame[start:start + size_bytes]
    if len(field) < size_bytes:
        raise CodecError("a truncated zstd frame header")
    return int.from_bytes(field, "little") + (256 if size_bytes == 2 else 0)


def check_declared(stored: bytes) -> int:
    """The content size a frame declares, if a frame of its size may hold it; CodecError
    otherwise (more than MAX_RATIO times the frame, more than MAX_BODY, no size): the
    rule, checked before anything is allocated."""
    size = _content_size(stored)
    if size > MAX_BODY or size > len(stored) * MAX_RATIO:
        raise CodecError(f"the frame ({len(stored)} bytes) declares {size} bytes, more than "
                         f"a stored frame may hold (at most {MAX_RATIO}x its size, "
                         f"MAX_BODY = {MAX_BODY} in all)")
    return size
def _header(fhd: int) -> tuple[int, int, int] | None:
    """(start, end, addend) of the content size field a frame header descriptor gives."""
    single = (fhd >> 5) & 1
    size_bytes = (1 if single else 0, 2, 4, 8)[fhd >> 6]
    if not size_bytes:
        return None
    start = 1 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    return start, start + size_bytes, 256 if size_bytes == 2 else 0


_HEADERS = tuple(map(_header, range(256)))


def declared_sizes(codecs: Sequence[int], stored: Sequence[bytes]) -> list[int] | None:
    """``check_declared`` of each compressed body of a batch (0 for a raw one) in one loop,
    not two calls a frame; None if a frame breaks the rule (``check_declared`` on each then
    says which and why)."""
    sizes: list[int] = []
    append = sizes.append
    for codec, frame in zip(codecs, stored, strict=True):
        if codec == RAW:
            append(0)
            continue
        header = _HEADERS[frame[0]] if frame else None
        if header is None or header[1] > len(frame):
            return None
        size = int.from_bytes(frame[header[0]:header[1]], "little") + header[2]
        if size > MAX_BODY or size > len(frame) * MAX_RATIO:
            return None
        append(size)
    return sizes


def decoded_size(codec: int, stored: bytes,
                 dictionaries: Mapping[int, ZstdDictionary]) -> int:
    """How many canonical bytes a stored body holds (what its digest covers; the unit of
    every content size): its own length when stored as is, else the content size its
    frame header declares (decoding checks it), or, without one, the decoded length."""
    if codec == RAW:
        return len(stored)
    try:
        return _content_size(stored)
    except CodecError:
        return len(decode(codec, stored, dictionaries))


def decode(codec: int, stored: bytes, dictionaries: Mapping[int, ZstdDictionary]) -> bytes:
    """The canonical bytes of a stored body (CodecError if it cannot be decoded, or if its
    frame declares more than it may hold: refused before zstd allocates it)."""
    if codec == RAW:
        return stored
    if codec == ZSTD:
        d = _plain_decompressor()
    else:
        dictionary = dictionaries.get(codec)
        if dictionary is None:
            raise CodecError(f"compressed with dictionary {codec}, which this store does not "
                             "hold" if codec >= FIRST_DICTIONARY else f"unknown codec {codec}")
        d = dictionary.decompressor()
    check_declared(stored)
    try:
        out: bytes = d.decompress(stored, allow_extra_data=False)
    except _zstd().ZstdError as e:
        raise CodecError(f"zstd: {e}") from None
    return out


def decode_many(codecs: Sequence[int], stored: Sequence[bytes],
                dictionaries: Mapping[int, ZstdDictionary]) -> list[bytes]:
    """``decode`` of each (codec, stored body) pair, for a batch of rows: one C call per
    frame, not a Python one (a cold read decodes thousands). CodecError as ``decode``."""
    calls: dict[int, Any] = {RAW: _as_is}
    for c in set(codecs):
        if c == ZSTD:
            calls[c] = _plain_decompressor().decompress
        elif c != RAW and c in dictionaries:
            calls[c] = dictionaries[c].decompressor().decompress
        elif c != RAW:
            return [decode(c, b, dictionaries) for c, b in zip(codecs, stored, strict=True)]
    if not small_frames(codecs, stored):
        return [decode(c, b, dictionaries) for c, b in zip(codecs, stored, strict=True)]
    count = len(stored)
    try:
        # Positional (max_output_size, read_across_frames, allow_extra_data=False): keywords
        # cost a third of each call.
        return list(map(operator.call, map(calls.__getitem__, codecs), stored,
                        repeat(0, count), repeat(False, count), repeat(False, count)))
    except _zstd().ZstdError as e:
        raise CodecError(f"zstd: {e}") from None


def small_frames(codecs: Sequence[int], stored: Sequence[bytes]) -> bool:
    """Whether every compressed body of a batch is a non-empty frame declaring at most
    SMALL_FRAME_MAX bytes (its first byte is below 0x80: a 0- to 2-byte content size),
    found in C. Other frames are checked one by one before they are decompressed."""
    try:
        # compress: the bodies whose codec is not RAW, i.e. not 0.
        return max(map(_first_byte, compress(stored, codecs)), default=0) < 0x80
    except IndexError:  # an empty body
        return False


def _as_is(body: bytes, *_: object) -> bytes:
    return body


_first_byte = operator.itemgetter(0)


def encode(kind: int, refs: Sequence[bytes], body: bytes,
           dictionary: ZstdDictionary | None) -> tuple[int, bytes]:
    """(codec, stored bytes) for a canonical body: compressed when that makes it smaller,
    raw otherwise and always for rows with refs."""
    if refs or len(body) < MIN_COMPRESSED or len(body) > MAX_BODY:
        return RAW, body
    if dictionary is None:
        frame: bytes = _plain_compressor().compress(body)
        codec = ZSTD
    else:
        frame = dictionary.compressor().compress(body)
        codec = dictionary.id
    # A reader refuses a frame declaring more than MAX_RATIO times its size (see above).
    fits = len(frame) < len(body) <= len(frame) * MAX_RATIO
    return (codec, frame) if fits else (RAW, body)


def train(samples: Sequence[bytes], dict_id: int, size: int) -> bytes | None:
    """A zstd dictionary of about ``size`` bytes with id ``dict_id`` trained on ``samples``,
    or None when zstd cannot train one from them (too few or too alike)."""
    z = _zstd()
    try:
        trained = z.train_dictionary(size, list(samples), dict_id=dict_id, level=LEVEL)
    except z.ZstdError:
        return None
    data: bytes = trained.as_bytes()
    return data

