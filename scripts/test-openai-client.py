"""The official `openai` Python client against `zrag serve`, as a real client would use it.

Usage: python3 scripts/test-openai-client.py ZRAG_BINARY
Indexes samples/corpus into a temporary collection, starts `zrag serve` on a free loopback
port with an API key, and checks models, embeddings (the client's default base64 encoding and
float), chat completions (plain and streamed, with zrag's sources), and the client's error
types for zrag's error responses. Exits non-zero on the first failure.
"""

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    zrag = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        collection = Path(tmp) / "c"
        subprocess.run(
            [zrag, "--collection", str(collection), "index", str(ROOT / "samples" / "corpus")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        port = free_port()
        server = subprocess.Popen(
            [zrag, "--collection", str(collection), "serve", "--addr", f"127.0.0.1:{port}",
             "--api-key", KEY, "--k", "2", "--max-tokens", "16"],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                   max_retries=0, timeout=120)
            wait_until_up(client, server)
            check(client, port)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("openai client: all checks passed")


def wait_until_up(client: "openai.OpenAI", server: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"zrag serve exited: {server.stderr.read()}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(0.2)
    raise SystemExit("zrag serve did not come up within 120 s")


def check(client: "openai.OpenAI", port: int) -> None:
    models = {m.id for m in client.models.list()}
    assert {"zrag-rag-sequence", "zrag-rag-token", "zrag-query"} <= models, models

    # The client asks for base64 by default and decodes it; float must give the same numbers.
    texts = ["What do honey bees make?", "How far away is the Moon?"]
    packed = client.embeddings.create(model="zrag-query", input=texts)
    floats = client.embeddings.create(model="zrag-query", input=texts, encoding_format="float")
    assert len(packed.data) == 2 and packed.usage.prompt_tokens > 0
    for a, b in zip(packed.data, floats.data):
        assert len(a.embedding) == 384, len(a.embedding)
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
        assert abs(math.sqrt(sum(x * x for x in a.embedding)) - 1.0) < 1e-4  # normalised

    question = "What do honey bees make from nectar?"
    for model in ["zrag-rag-sequence", "zrag-rag-token"]:
        completion = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=8)
        choice = completion.choices[0]
        assert choice.message.role == "assistant" and choice.message.content, completion
        assert choice.finish_reason in ("stop", "length"), choice.finish_reason
        sources = completion.model_extra["sources"]
        assert len(sources) == 2, sources
        assert abs(sum(s["posterior"] for s in sources) - 1.0) < 1e-6, sources
        assert completion.usage.total_tokens == (completion.usage.prompt_tokens
                                                 + completion.usage.completion_tokens)

    # Streaming: the client assembles the deltas; zrag's sources ride on the first and last
    # chunks (retrieval probabilities, then posteriors).
    stream = client.chat.completions.create(
        model="zrag-rag-sequence", messages=[{"role": "user", "content": question}],
        max_tokens=8, stream=True, stream_options={"include_usage": True},
        extra_body={"k": 3})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), chunks
    first_sources = chunks[0].model_extra["sources"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(first_sources) == 3 and len(finals) == 1, chunks
    assert abs(sum(s["posterior"] for s in finals[0].model_extra["sources"]) - 1.0) < 1e-6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    # zrag's errors arrive as the client's exception types.
    for call, error in [
        (lambda: client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]), openai.NotFoundError),
        (lambda: client.chat.completions.create(
            model="zrag-rag-sequence", messages=[{"role": "user", "content": "hi"}],
            max_tokens=100000), openai.BadRequestError),
        (lambda: client.embeddings.create(model="zrag-query", input="x", dimensions=7),
         openai.BadRequestError),
        (lambda: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong",
                               max_retries=0).models.list(), openai.AuthenticationError),
    ]:
        try:
            call()
        except error as e:
            assert e.message, e
        else:
            raise AssertionError(f"expected {error.__name__}")


if __name__ == "__main__":
    main()
