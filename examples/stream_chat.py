"""Streamed turns, offline: ``python examples/stream_chat.py [database.db]``.

The reply is printed as it arrives and the state saved when the turn completes; a second
turn is cut short on purpose and kept with ``keep_partial=True``. Set
``IMMAGENT_ECHO_DELAY=0.1`` to watch the echo model type.
"""

from __future__ import annotations

import asyncio
import sys

from immagent import Message, Model, Store, TextDelta, TurnDone


async def main(database: str = "stream.db") -> Message:
    """Stream one whole turn and one interrupted turn; return the message cut short."""
    async with await Store.connect(database) as store:
        await store.init_schema()
        agent = await store.create_agent("Streamer", "You are helpful.", Model.ECHO)

        async with agent.stream("Tell me something, token by token") as s:
            async for event in s:
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, TurnDone):
                    print(f"\nsaved: {event.usage.input_tokens} tokens in, "
                          f"{event.usage.output_tokens} out")
        new = s.agent
        print(new.parent_id == agent.id, await new.last_response())

        async with new.stream("This reply will be cut short", keep_partial=True) as s:
            async for event in s:
                if isinstance(event, TextDelta) and event.text == " will":
                    break  # stop listening: the partial turn is kept
        cut = (await s.agent.get_messages())[-1]
        print(f"kept {cut.content!r}, interrupted={cut.interrupted}")
        return cut


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
