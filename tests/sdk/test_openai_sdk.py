"""chatpool's OpenAI front door driven by the official `openai` Python package.

Run by .ci/run after `cargo test` (which builds target/debug/chatpool), in a virtual environment
with `openai` and `pytest`:  pytest tests/sdk
Each test gets its own chatpool (built-in mock LLM) on a free loopback port and a temp database.
"""

import http.server
import json
import os
import subprocess
import threading
import urllib.error
import urllib.request

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("CHATPOOL_BIN", os.path.join(ROOT, "target", "debug", "chatpool"))


def start_chatpool(tmp_path, llm):
    """Starts chatpool with `llm` as its [llm] section; returns the process and its base URL."""
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "chat.db"}"\n\n[llm]\n{llm}')
    proc = subprocess.Popen([BINARY, "--config", str(config), "--listen", "127.0.0.1:0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="info"))
    for line in proc.stderr:
        if "listening on http://" in line:
            return proc, "http://" + line.split("listening on http://", 1)[1].split()[0]
    proc.kill()
    raise AssertionError("chatpool did not start")


@pytest.fixture
def chatpool(tmp_path):
    """A running chatpool; yields its base URL and stops it afterwards."""
    proc, base = start_chatpool(tmp_path, 'model = "sdk-model"\n')
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def piece(text):
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "up",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(chunk)}\n\n"


FAILED = 'data: {"error": {"object": "error", "message": "generation failed", "code": 500}}\n\ndata: [DONE]\n\n'


class ScriptedLlm(http.server.BaseHTTPRequestHandler):
    """An upstream whose stream fails part-way, as vLLM's does: two pieces or none, then an
    error object, then [DONE]. The first word of the user's message says which."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        pieces = piece("Hel") + piece("lo") if body["messages"][-1]["content"] == "after" else ""
        data = (pieces + FAILED).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_llm(tmp_path):
    """A chatpool in front of ScriptedLlm; yields its base URL."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedLlm)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    host, port = upstream.server_address
    proc, base = start_chatpool(
        tmp_path, f'provider = "openai"\nbase_url = "http://{host}:{port}/v1"\nmax_retries = 0\n')
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.shutdown()


def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0)


def history(base, chat):
    with urllib.request.urlopen(f"{base}/v1/chats/{chat}/messages") as response:
        return [(m["role"], m["content"]) for m in json.load(response)["messages"]]


def test_models_lists_the_configured_model(chatpool):
    assert [m.id for m in client(chatpool).models.list()] == ["sdk-model"]


def test_a_plain_stateless_completion(chatpool):
    reply = client(chatpool).chat.completions.create(
        model="sdk-model", messages=[{"role": "user", "content": "Hello"}])
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "You said: Hello"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens > 0
    with urllib.request.urlopen(f"{chatpool}/v1/chats") as response:
        assert json.load(response)["chats"] == []


def test_a_streamed_stateless_completion(chatpool):
    stream = client(chatpool).chat.completions.create(
        model="sdk-model", messages=[{"role": "user", "content": "Stream this please"}],
        stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert len(pieces) > 1
    assert "".join(pieces) == "You said: Stream this please"
    assert usage is not None and usage.total_tokens > 0


def test_x_chat_id_keeps_history_plain_and_streamed(chatpool):
    sdk = client(chatpool)
    headers = {"X-Chat-Id": "sdk-chat"}
    first = sdk.chat.completions.create(
        model="sdk-model", messages=[{"role": "user", "content": "one"}], extra_headers=headers)
    assert first.choices[0].message.content == "You said: one"
    stream = sdk.chat.completions.create(
        model="sdk-model", messages=[{"role": "user", "content": "two"}], stream=True, extra_headers=headers)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "You said: two"
    assert history(chatpool, "sdk-chat") == [
        ("user", "one"), ("assistant", "You said: one"), ("user", "two"), ("assistant", "You said: two")]


def test_errors_reach_the_sdk_as_api_errors(chatpool):
    with pytest.raises(openai.BadRequestError) as raised:
        client(chatpool).chat.completions.create(model="sdk-model", messages=[])
    assert raised.value.status_code == 400
    assert "messages" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client(chatpool).chat.completions.create(
            model="sdk-model", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Chat-Id": "bad id"})


def test_an_error_inside_the_llms_stream_raises_and_stores_nothing(failing_llm):
    sdk = client(failing_llm)
    headers = {"X-Chat-Id": "failing"}
    stream = sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "after"}], stream=True, extra_headers=headers)
    pieces = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            assert chunk.choices[0].finish_reason is None
    assert "".join(pieces) == "Hello"
    # chatpool's own reason reaches the client; the upstream's words stay in the server's log.
    assert "the LLM reported an error" in str(raised.value)
    assert "generation failed" not in str(raised.value)
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "before"}], stream=True, extra_headers=headers)
    assert raised.value.status_code == 502
    with pytest.raises(urllib.error.HTTPError) as missing:
        history(failing_llm, "failing")
    assert missing.value.code == 404
