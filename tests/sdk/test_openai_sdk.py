"""chatpool's OpenAI front door driven by the official `openai` Python package.

Run by .ci/run after `cargo test` (which builds target/debug/chatpool), in a virtual environment
with `openai` and `pytest`:  pytest tests/sdk
Each test gets its own chatpool (built-in mock LLM) on a free loopback port and a temp database.
"""

import json
import os
import subprocess
import urllib.request

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("CHATPOOL_BIN", os.path.join(ROOT, "target", "debug", "chatpool"))


@pytest.fixture
def chatpool(tmp_path):
    """A running chatpool; yields its base URL and stops it afterwards."""
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "chat.db"}"\n\n[llm]\nmodel = "sdk-model"\n')
    proc = subprocess.Popen([BINARY, "--config", str(config), "--listen", "127.0.0.1:0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="info"))
    try:
        addr = None
        for line in proc.stderr:
            if "listening on http://" in line:
                addr = line.split("listening on http://", 1)[1].split()[0]
                break
        assert addr, "chatpool did not start"
        yield f"http://{addr}"
    finally:
        proc.terminate()
        proc.wait(10)


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
