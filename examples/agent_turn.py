"""A simulated agent turn on the asyncstore runtime: copy this into your backend.

It opens the runtime from settings, subscribes a live client to the session's stream,
runs a turn (session lock, token deltas, a tool call guarded by a synchronous webhook,
batched webhooks for the rest), then runs a second turn that a user cancels halfway.
Webhooks go to a local receiver the example starts itself (``hooks.toml`` beside this
file). Runs on SQLite with no arguments, or ``--url postgresql://user@host/db``.

    python examples/agent_turn.py [--url URL]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

import asyncstore

HOOKS = Path(__file__).with_name("hooks.toml")
ANSWER = ["The ", "weather ", "in ", "Paris ", "is ", "sunny, ", "22", "°C."]


async def client(rt: asyncstore.Runtime, session_id: str, done: anyio.Event) -> None:
    """A live subscriber (an SSE / WebSocket handler in a real service)."""
    async with rt.subscribe(session_id, after=(0, 0)) as events:
        async for item in events:
            if isinstance(item, asyncstore.StreamReset):
                print(f"  client: reset ({item.reason}), reload up to seq {item.seq}")
                continue
            assert isinstance(item, asyncstore.StreamEvent)
            print(f"  client: {item.epoch}/{item.seq} {item.kind} {item.payload}")
            if item.kind in ("turn_completed", "cancelled"):
                break
    done.set()


async def agent(turn: asyncstore.Turn, *, slow: bool = False) -> None:
    """The turn's work: store the question, stream tokens, call a tool, store the answer.

    ``turn.append_messages`` writes the chat history under the turn's session lease: a
    turn whose lease was lost (another instance took the session over) cannot append.
    """
    [question] = await turn.append_messages(
        [asyncstore.NewMessage("user", {"text": "What is the weather in Paris?"})]
    )
    print(f"  stored message {question.seq} ({question.role})")
    await turn.emit("delta", {"text": "Let me check. "})
    decision = await turn.fire("pre_tool", {"tool": "weather", "args": {"city": "Paris"}})
    if decision is not None and decision.denied:
        await turn.emit("error", {"message": "; ".join(decision.deny_messages)})
        return
    await turn.emit("tool_call", {"tool": "weather", "args": {"city": "Paris"}})
    await anyio.sleep(0.01)  # the tool runs
    await turn.emit("tool_result", {"tool": "weather", "result": {"sky": "sunny", "c": 22}})
    await turn.fire("post_tool", {"tool": "weather"}, result={"sky": "sunny"})
    for token in ANSWER:
        await turn.emit("delta", {"text": token})
        await anyio.sleep(0.2 if slow else 0.005)  # the model streams
    [answer] = await turn.append_messages(
        [asyncstore.NewMessage("assistant", {"text": "".join(ANSWER)})]
    )
    print(f"  stored message {answer.seq} ({answer.role})")
    await turn.emit("turn_completed", {"text": "".join(ANSWER)})


async def run(url: str | None) -> int:
    overrides: dict[str, Any] = {"migrate_on_start": True}
    if url is not None:
        overrides["storage"] = {"url": url}
    settings = asyncstore.load_settings(**overrides)
    async with asyncstore.open_test_receiver() as receiver:
        hooks = asyncstore.load_hooks(HOOKS, environ={"AGENT_TURN_RECEIVER": receiver.url})
        async with asyncstore.open_runtime(settings, hooks=hooks) as rt:
            print(f"runtime on {rt.storage.dialect}, flags {rt.flags.model_dump()}")

            session = f"chat-{uuid.uuid4().hex[:8]}"
            print(f"turn 1 of {session}")
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(client, rt, session, done)
                async with rt.turn(session) as turn:
                    print(f"  lease token (stream epoch) {turn.lease.token}")
                    await agent(turn)
                await done.wait()

            session = f"chat-{uuid.uuid4().hex[:8]}"
            print(f"turn 2 of {session} (the user presses stop)")
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(client, rt, session, done)
                async with rt.turn(session) as turn:
                    # Another request handler (any instance) cancels the session.
                    tg.start_soon(_stop_after, rt, session, 0.3)
                    await agent(turn, slow=True)
                print(f"  turn 2 cancelled: {turn.cancelled} ({turn.token.reason})")
                await done.wait()
            if rt.webhooks is not None:
                await rt.webhooks.flush()  # the batched ones: delivered before we count
        report = rt.report
        events = [e.get("event") for e in receiver.events() if isinstance(e, dict)]
    print(f"webhooks: {len(receiver.requests)} requests, batched events {events}")
    print(f"drained: {report}")
    return 0 if report is not None and report.complete else 1


async def _stop_after(rt: asyncstore.Runtime, session_id: str, delay_s: float) -> None:
    await anyio.sleep(delay_s)
    await rt.request_cancel(session_id, "user pressed stop")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="postgresql://... (default: a SQLite file in a temp dir)")
    args = parser.parse_args(argv)
    if args.url is not None:
        return anyio.run(run, args.url)
    with tempfile.TemporaryDirectory() as tmp:
        return anyio.run(run, f"sqlite:///{Path(tmp) / 'agent_turn.db'}")


if __name__ == "__main__":
    sys.exit(main())
