"""How the engine hands its events to the asyncio side: a step's tokens for every streaming
sequence arrive in one wakeup of the event loop (not one per token and sequence), in order."""

from __future__ import annotations

import asyncio

from edgedistill.serve.engine import Engine, GenParams

from tests.serve_fakes import FakeRunner

REPLY = "Hello from the student."


def test_a_steps_events_for_every_stream_arrive_in_one_wakeup_in_order():
    runner = FakeRunner(n_slots=4)
    engine = Engine(runner)
    calls = 0

    async def go():
        nonlocal calls
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            nonlocal calls
            calls += 1
            return real(cb, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        ids = runner.tokenize("user: hi\n<|assistant|>", special=True, add_bos=False)
        handle = engine.submit([ids] * 4, [GenParams(max_tokens=64, temperature=0, stream=True)] * 4, loop)
        text, done = ["", "", "", ""], 0
        while done < 4:
            kind, i, payload = await handle.queue.get()
            assert kind in ("delta", "done")
            if kind == "delta":
                text[i] += payload[0]
            else:
                assert payload.text == text[i]  # every delta came before its done
                done += 1
        return text

    try:
        text = asyncio.run(go())
    finally:
        engine.close()
    assert text == [REPLY] * 4
    # 4 streams x (23 characters + done): 96 events, one wakeup per decode step instead
    assert engine.steps <= len(REPLY) + 2 and calls <= engine.steps
