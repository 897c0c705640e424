"""ardeploy serve as users run it: a real server on 127.0.0.1 (the CLI in a subprocess, or the app on uvicorn
in a thread), queried with the official `openai` client and plain HTTP.

Most tests use `tiny_chat_bundle` (a 2-layer random Llama with SmolLM2's tokenizer and chat template: a
millisecond per token); one checks the real SmolLM2. Every request loop is bounded in count and time.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import one_line_error

pytest.importorskip("fastapi", reason="ardeploy serve needs pip install 'ardeploy[serve]'")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
try:                                       # the openai client's HTTP library (httpx2 since openai 3)
    import httpx2 as httpx
except ImportError:
    import httpx

MODEL = "tiny"
TIMEOUT = 60


# -- servers ----------------------------------------------------------------------------------------
class ServerProcess:
    """`ardeploy serve BUNDLE --port 0 ...` in a subprocess; the port is read from its start line."""

    def __init__(self, bundle, *options, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        command = [sys.executable, "-m", "ardeploy.cli", "serve", str(bundle), "--host", "127.0.0.1", "--port", "0",
                   "--threads", "1", "--model-name", MODEL, *options]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", open(self.log_path).read())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"ardeploy serve exited {self.proc.returncode}: {open(self.log_path).read()}")
            time.sleep(0.05)
        self.stop()
        raise AssertionError("ardeploy serve did not start in time")

    def output(self) -> str:
        return open(self.log_path).read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class ThreadServer:
    """The app on uvicorn in a thread of this process (its scheduler and generator are ours to inspect)."""

    def __init__(self, bundle, max_queue: int = 2, api_key: str | None = None, step_delay: float = 0.0):
        import uvicorn
        from ardeploy.serve.app import create_app
        from ardeploy.serve.engine import build_engine
        from ardeploy.serve.server import listen
        from ardeploy.serve.service import ModelService
        self.generator, self.scheduler = build_engine(bundle, max_queue=max_queue, threads=1)
        if step_delay:                     # a slower model: requests overlap for sure (queue tests)
            backend = self.generator.backend
            for name in ("step", "step_rows"):
                slow = getattr(backend, name)
                setattr(backend, name, lambda *a, _run=slow, **kw: (time.sleep(step_delay), _run(*a, **kw))[1])
        self.service = ModelService(self.generator, self.scheduler, MODEL)
        app = create_app(self.service, api_key=api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "in-thread server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.scheduler.close(drain=False)
        self.generator.close()


@pytest.fixture(scope="module")
def server(tiny_chat_bundle, tmp_path_factory):
    proc = ServerProcess(tiny_chat_bundle, "--max-queue", "32", log_path=tmp_path_factory.mktemp("serve") / "log")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny_chat_bundle):
    """The runtime alone (what `ardeploy generate` runs): greedy token ids of a prompt."""
    from ardeploy.runtime import Generator, SamplingConfig
    gen = Generator.load(tiny_chat_bundle, threads=1)

    def greedy(prompt: str, max_tokens: int, chat: bool = True):
        return gen.generate(prompt, SamplingConfig(greedy=True, max_new_tokens=max_tokens), chat=chat)
    yield greedy
    gen.close()


def chat(client, content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# -- the openai client ------------------------------------------------------------------------------
def test_openai_client_chat_and_completions_match_the_runtime(client, reference):
    assert [m.id for m in client.models.list().data] == [MODEL]
    alone = reference("hello there", 12)
    assert len(set(alone.token_ids)) > 5                 # not one token repeated
    answer = chat(client, "hello there", temperature=0, max_tokens=12)
    choice = answer.choices[0]
    assert choice.message.content == alone.text and choice.model_extra["token_ids"] == alone.token_ids
    assert choice.finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(alone.prompt_ids), 12)

    stream = chat(client, "hello there", temperature=0, max_tokens=12, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == alone.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12

    text = reference("The capital of France is", 10, chat=False)
    done = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=10)
    assert done.choices[0].text == text.text and done.choices[0].model_extra["token_ids"] == text.token_ids
    pieces = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                       max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == text.text
    ids = client.completions.create(model=MODEL, prompt=text.prompt_ids, temperature=0, max_tokens=10)
    assert ids.choices[0].model_extra["token_ids"] == text.token_ids


def test_stop_strings_seed_and_top_p(client, reference):
    alone = reference("Tell me a story.", 16)
    stop = alone.text[len(alone.text) // 2:][:3]
    assert stop.strip(), alone.text
    cut = chat(client, "Tell me a story.", temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == alone.text[:alone.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    drawn = [chat(client, "Tell me a story.", temperature=1.0, top_p=0.9, seed=seed, max_tokens=12)
             .choices[0].model_extra["token_ids"] for seed in (7, 7, 8)]
    assert drawn[0] == drawn[1] != drawn[2]


def test_sixteen_concurrent_greedy_chats_each_match_the_request_alone(client):
    prompts = [f"Question {k}: what comes after {k * 7}?" for k in range(16)]
    ask = lambda prompt: chat(client, prompt, temperature=0, max_tokens=12).choices[0].model_extra["token_ids"]  # noqa: E731
    alone = [ask(prompt) for prompt in prompts]
    assert len({tuple(ids) for ids in alone}) > 8          # the tiny model's answers differ from prompt to prompt
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


# -- structured output ------------------------------------------------------------------------------
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100},
                                                   "y": {"type": "integer", "minimum": -100, "maximum": 100}},
                  "required": ["x", "y"], "additionalProperties": False},
        "label": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["point", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1},
                                      "items": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 4}},
     "required": ["score", "items"], "additionalProperties": False},
]


def test_twenty_json_schema_requests_parse_and_validate(client):
    outputs = []
    for k in range(20):
        schema = SCHEMAS[k % len(SCHEMAS)]
        answer = chat(client, f"Answer in JSON, please ({k}).", temperature=1.0, seed=k, max_tokens=200,
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": f"s{k % len(SCHEMAS)}", "schema": schema}})
        text = answer.choices[0].message.content
        jsonschema.validate(json.loads(text), schema)
        assert answer.choices[0].finish_reason == "stop", text
        outputs.append(text)
    assert len(set(outputs)) > 10                       # sampled, not one fixed answer per schema
    free = chat(client, "Answer in JSON, please (0).", temperature=1.0, seed=0, max_tokens=40)
    with pytest.raises(ValueError):                     # the same request without the grammar: not JSON
        json.loads(free.choices[0].message.content)


@pytest.mark.slow
def test_smollm2_behind_the_server(smollm2_bundle, tmp_path):
    """The real model: chat tokens equal `ardeploy generate --chat --greedy`'s; a schema-constrained answer
    parses and validates."""
    from ardeploy.cli import main
    proc = ServerProcess(smollm2_bundle, log_path=tmp_path / "log")
    try:
        c = openai.OpenAI(base_url=proc.url + "/v1", api_key="-", timeout=TIMEOUT, max_retries=0)
        answer = chat(c, "Name three rivers in Europe.", temperature=0, max_tokens=16)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                   "country": {"type": "string", "maxLength": 40}},
                  "required": ["city", "country"], "additionalProperties": False}
        shaped = chat(c, "Which city is the capital of France? Reply in JSON.", temperature=0, max_tokens=48,
                      response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
        anything = chat(c, 'Give the capital of France as JSON, like {"capital": "..."}.', temperature=0,
                        max_tokens=60, stream=True, response_format={"type": "json_object"})
        anything = "".join(chunk.choices[0].delta.content or "" for chunk in anything)
    finally:
        assert proc.stop() == 0, proc.output()
    assert json.loads(anything) == {"capital": "Paris"}
    capital = json.loads(shaped.choices[0].message.content)
    jsonschema.validate(capital, schema)
    assert "Paris" in capital["city"]
    out = tmp_path / "generate.json"
    with open(out, "w") as f:
        sys_stdout, sys.stdout = sys.stdout, f
        try:
            assert main(["generate", str(smollm2_bundle), "--chat", "--greedy", "--max-new-tokens", "16", "--json",
                         "--threads", "2", "--quiet", "--prompt", "Name three rivers in Europe."]) == 0
        finally:
            sys.stdout = sys_stdout
    assert answer.choices[0].model_extra["token_ids"] == json.loads(out.read_text())["token_ids"]


# -- malformed requests -----------------------------------------------------------------------------
def _msgs(content="hi"):
    return [{"role": "user", "content": content}]


BAD_REQUESTS = [  # (path, body (dict, or raw text), status, param the error names, words in the message)
    ("/v1/chat/completions", '{"model": "tiny", "messages": [', 400, None, "not valid JSON"),
    ("/v1/chat/completions", "[1, 2]", 400, None, "JSON object"),
    ("/v1/chat/completions", {"messages": _msgs()}, 400, "model", "required"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages", "required"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": _msgs()}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"model": 7, "messages": _msgs()}, 400, "model", "string"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages", "array"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", "system"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "max_tokens": -3}, 400, "max_tokens",
     "greater than or equal to 1"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "max_tokens": "12"}, 400, "max_tokens", "integer"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "max_tokens": 100000}, 400, "max_tokens",
     "context length"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "temperature": "hot"}, 400, "temperature", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "temperature": 3}, 400, "temperature", "2"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "seed": -1}, 400, "seed", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "n": 2}, 400, "n", "1"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "stop": [""]}, 400, "stop", "empty"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "at most 4"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "best_of": 3}, 400, "best_of", "Unrecognized"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs("word " * 600)}, 400, "messages",
     "context length"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "response_format": {"type": "yaml"}}, 400,
     "response_format", ""),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "response_format": {"type": "json_schema"}},
     400, "response_format.json_schema", "required"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400,
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "a"}}}}, 400,
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _msgs(), "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, 400,
     "response_format.json_schema.schema", ""),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "required"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 10 ** 9]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "echo": True}, 400, "echo", ""),
    ("/v1/completions", {"model": "tiny", "prompt": {"text": "hi"}}, 400, "prompt", ""),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", "integer"),
]


def test_malformed_requests_get_a_4xx_naming_the_field(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        for path, body, status, param, words in BAD_REQUESTS:
            if isinstance(body, str):
                answer = http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                answer = http.post(path, json=body)
            case = f"{path} {str(body)[:100]} -> {answer.status_code} {answer.text[:300]}"
            assert answer.status_code == status, case
            error = answer.json()["error"]
            assert error["param"] == param and words in error["message"], case
            assert error["type"] in ("invalid_request_error",) and "\n" not in error["message"], case
            if param:
                assert param.split("[")[0].split(".")[0] in error["message"] or status == 404, case
        assert http.get("/v1/nowhere").status_code == 404
        assert http.get("/health").json()["status"] == "ok"            # and the server stays up
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


# -- queue, disconnects, API key --------------------------------------------------------------------
def _sse_lines(lines_of, n: int) -> list[str]:
    """The next n `data:` lines from an iterator of a response's lines (kept open: closing the iterator
    would close the connection, which the server rightly takes as the client leaving)."""
    lines = []
    for line in lines_of:
        if line.startswith("data: "):
            lines.append(line)
            if len(lines) >= n:
                break
    return lines


def test_full_queue_429_disconnects_free_their_row_and_api_key(tiny_chat_bundle):
    """Fill every row and the queue with long streams, then one more gets 429; hang up: all are cancelled, the
    running ones at their next step (well before their 480 tokens), the waiting ones before they start."""
    from contextlib import ExitStack
    server = ThreadServer(tiny_chat_bundle, max_queue=2, api_key="sekret", step_delay=0.005)
    key = {"Authorization": "Bearer sekret"}
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "stream": True}
    held = server.scheduler.stats()["max_batch"] + 2
    try:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
            assert http.post("/v1/completions", json=long).status_code == 401
            wrong = http.post("/v1/completions", json=long, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
            with ExitStack() as stack:
                streams = []
                for _ in range(held):
                    client = stack.enter_context(httpx.Client(base_url=server.url, timeout=TIMEOUT, headers=key))
                    response = stack.enter_context(client.stream("POST", "/v1/completions", json=long))
                    assert response.status_code == 200
                    streams.append(response.iter_lines())      # held: a dropped iterator closes the stream
                assert len(_sse_lines(streams[0], 3)) == 3      # the first one runs
                stats = server.scheduler.stats()
                assert stats["running"] + stats["queued"] == held, stats
                busy = http.post("/v1/completions", json=long, headers=key)
                assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            _wait(lambda: server.scheduler.stats()["running"] == 0 and server.scheduler.stats()["queued"] == 0)
            stats = server.scheduler.stats()
            assert stats["cancelled"] == held, stats
            assert stats["tokens"] < 480, stats
            # a whole (not streamed) request whose client gives up is cancelled too
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json={**long, "stream": False}, headers=key, timeout=0.3)
            _wait(lambda: server.scheduler.stats()["cancelled"] == held + 1)
            done = http.post("/v1/completions", json={**long, "max_tokens": 4, "stream": False}, headers=key)
            assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
            metrics = http.get("/metrics").text
            assert f'ardeploy_requests_total{{endpoint="completions",outcome="cancelled"}} {held + 1}.0' in metrics
            assert 'ardeploy_requests_total{endpoint="completions",outcome="queue_full"} 1.0' in metrics
    finally:
        server.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=2)
    except httpx.TransportError:
        return True
    return False


def _wait(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_metrics_count_requests_tokens_and_latency(server, client):
    chat(client, "Count me.", temperature=0, max_tokens=5)
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['ardeploy_requests_total{endpoint="chat",outcome="ok"}'] >= 1
    assert values["ardeploy_generation_tokens_total"] >= 5 and values["ardeploy_prompt_tokens_total"] > 0
    assert values["ardeploy_time_to_first_token_seconds_count"] >= 1
    assert values["ardeploy_decode_tokens_per_second_count"] >= 1
    for gauge in ("ardeploy_queue_length", "ardeploy_batch_occupancy", "ardeploy_running_requests"):
        assert values[gauge] == 0                        # idle between requests
    assert values["ardeploy_batch_capacity"] >= 1


# -- SIGTERM ----------------------------------------------------------------------------------------
def test_sigterm_finishes_requests_in_flight_then_exits(tiny_chat_bundle, tmp_path, reference):
    proc = ServerProcess(tiny_chat_bundle, log_path=tmp_path / "log")
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", proc.url + "/v1/completions", json=body) as response:
            lines_of = response.iter_lines()
            lines = _sse_lines(lines_of, 2)
            proc.proc.send_signal(signal.SIGTERM)
            lines += _sse_lines(lines_of, 2)
            _wait(lambda: _refused(proc.url), 5)          # draining: new connections refused (or reset)
            lines += _sse_lines(lines_of, 10 ** 6)
    assert proc.proc.wait(TIMEOUT) == 0, proc.output()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    pieces = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert "".join(pieces) == reference("Once upon a time", 400, chat=False).text     # all 400 tokens came
    assert "1 requests finished, 0 cancelled" in proc.output()


# -- the scheduler on its own -----------------------------------------------------------------------
class Spell:
    """A Constraint that allows exactly one token sequence (then is finished)."""

    def __init__(self, ids, vocab):
        self.ids, self.vocab, self.at = list(ids), vocab, 0

    def allowed(self):
        mask = np.zeros(self.vocab, dtype=bool)
        mask[self.ids[self.at]] = True
        return mask

    def advance(self, token):
        assert token == self.ids[self.at]
        self.at += 1

    def is_finished(self):
        return self.at == len(self.ids)


def test_sequential_scheduler_applies_constraints_cancels_and_bounds_its_queue(tiny_chat_bundle):
    from ardeploy.runtime.sampling import SamplingConfig
    from ardeploy.runtime.scheduling import QueueFull, Request
    from ardeploy.runtime import Generator
    from ardeploy.serve.scheduler import SequentialScheduler
    gen = Generator.load(tiny_chat_bundle, threads=1)
    scheduler = SequentialScheduler(gen, max_queue=1)
    try:
        prompt = gen.encode("hello", chat=True)
        wanted = [5, 17, 900, 31000]
        for temperature in (0.0, 1.5):
            handle = scheduler.submit(Request(prompt, SamplingConfig(temperature=temperature, seed=3),
                                              Spell(wanted, gen.bundle.vocab_size)))
            assert [e.token for e in handle.events(timeout=TIMEOUT)] == wanted
            assert handle.result.stop_reason == "constraint" and handle.result.token_ids == wanted
        slow = SamplingConfig(greedy=True, max_new_tokens=400)
        running = scheduler.submit(Request(prompt, slow))
        next(running.events(timeout=TIMEOUT))
        waiting = scheduler.submit(Request(prompt, slow))
        with pytest.raises(QueueFull):
            scheduler.submit(Request(prompt, slow))
        waiting.cancel()
        running.cancel()
        assert running.wait(TIMEOUT) and waiting.wait(TIMEOUT)
        assert running.result.stop_reason == waiting.result.stop_reason == "cancelled"
        assert len(running.result.token_ids) < 400 and waiting.result.token_ids == []
        with pytest.raises(Exception, match="context"):
            scheduler.submit(Request(list(range(3, 3 + gen.bundle.max_seq)), slow))
    finally:
        scheduler.close()
        gen.close()


# -- the command line -------------------------------------------------------------------------------
def test_serve_command_bad_input_is_one_line(tiny_chat_bundle, tmp_path, capsys):
    from ardeploy.cli import main
    one_line_error(main(["serve", str(tmp_path / "missing")]), capsys, "missing")
    one_line_error(main(["serve", str(tiny_chat_bundle), "--port", "70000"]), capsys, "--port")
    one_line_error(main(["serve", str(tiny_chat_bundle), "--max-batch", "9"]), capsys, "--max-batch 9")
    one_line_error(main(["serve", str(tiny_chat_bundle), "--max-queue", "0"]), capsys, "--max-queue")
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        one_line_error(main(["serve", str(tiny_chat_bundle), "--port", port, "--threads", "1"]), capsys,
                       "cannot listen", port)
    assert os.environ.get("ARDEPLOY_API_KEY") is None


def test_a_stream_behind_the_scheduler_catches_up_in_one_write():
    """ModelService.events hands the event loop every event that has arrived since its last write as one
    list (one SSE chunk): a stream that falls behind under load writes once, not once per token; then the
    end, or a failed request's error."""
    import asyncio

    from ardeploy.runtime.scheduling import Handle, Request
    from ardeploy.serve.service import Job, ModelService

    from types import SimpleNamespace
    service = ModelService(SimpleNamespace(tokenizer=None), None, "m")     # events() needs only the job

    async def collect(handle, during=lambda handle, n: None):
        got = []
        try:
            async for events in service.events(Job("x", handle, 1, 0.0)):
                got.append([e.token for e in events])
                during(handle, len(got))
        except RuntimeError as e:
            got.append(str(e))
        return got

    behind = Handle(Request([1]))
    for token in range(5):
        behind._emit(token, "t")
    behind._finish()
    assert asyncio.run(collect(behind)) == [[0, 1, 2, 3, 4]]

    def scheduler(handle, n):          # two more tokens while the stream writes, then a failure
        if n == 1:
            handle._emit(8, "t")
            handle._emit(9, "t")
        else:
            handle._finish(error=RuntimeError("boom"))
    live = Handle(Request([1]))
    live._emit(7, "t")
    assert asyncio.run(collect(live, scheduler)) == [[7], [8, 9], "boom"]
