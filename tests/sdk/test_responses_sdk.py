"""chatpool's Responses and Conversations APIs driven by the official `openai` Python package.

Run by .ci/run after `cargo test` (which builds target/debug/chatpool). Each test gets its own
`chatpool mock-llm` and a chatpool in front of it, on free loopback ports, with a temp database
and two tenants (alice, bob). mock-llm's `GET /last-request` shows what chatpool sent upstream.
"""

import hashlib
import json
import os
import sqlite3
import subprocess
import urllib.request

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("CHATPOOL_BIN", os.path.join(ROOT, "target", "debug", "chatpool"))
TOKENS = {"alice": "alice-token-1234", "bob": "bob-token-5678"}
SYSTEM = "You are chatpool's test assistant."


def spawn(args, marker):
    """Starts a chatpool process; returns it and the base URL its log names after `marker`."""
    proc = subprocess.Popen([BINARY, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, RUST_LOG="info"))
    seen = []
    for line in proc.stderr:
        if marker in line:
            return proc, "http://" + line.split(marker, 1)[1].split()[0].removesuffix("/v1")
        seen.append(line)
    proc.kill()
    proc.wait(10)
    raise AssertionError(f"chatpool {' '.join(args)} did not start: {''.join(seen)}")


class Chatpool:
    """A chatpool in front of a mock-llm, which can be restarted on the same database."""

    def __init__(self, tmp_path):
        self.db = tmp_path / "chat.db"
        self.config = tmp_path / "config.toml"
        self.proc = self.mock = None

    def open(self):
        self.mock, self.mock_url = spawn(["mock-llm", "--listen", "127.0.0.1:0"], "listening on http://")
        tokens = ", ".join(
            f'{{ tenant = "{t}", sha256 = "{hashlib.sha256(v.encode()).hexdigest()}" }}'
            for t, v in TOKENS.items())
        self.config.write_text(
            f'[storage]\npath = "{self.db}"\n\n[history]\nsystem_prompt = "{SYSTEM}"\n\n'
            f'[llm]\nprovider = "openai"\nbase_url = "{self.mock_url}/v1"\nmodel = "sdk-model"\n'
            f'max_retries = 0\n\n[auth]\ntokens = [{tokens}]\n')
        self.start()

    def start(self):
        self.proc, url = spawn(["--config", str(self.config), "--listen", "127.0.0.1:0"],
                               "listening on http://")
        self.url = url

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)

    def client(self, tenant="alice"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKENS[tenant], max_retries=0)

    def upstream_saw(self):
        """The (role, content) pairs of the latest request mock-llm received."""
        with urllib.request.urlopen(f"{self.mock_url}/last-request") as response:
            return [(m["role"], m["content"]) for m in json.load(response)["messages"]]

    def chat_messages(self, chat, tenant="alice"):
        request = urllib.request.Request(f"{self.url}/v1/chats/{chat}/messages",
                                         headers={"Authorization": f"Bearer {TOKENS[tenant]}"})
        with urllib.request.urlopen(request) as response:
            return [(m["role"], m["content"]) for m in json.load(response)["messages"]]

    def rows(self, table):
        with sqlite3.connect(self.db) as db:
            return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def close(self):
        if self.proc:
            self.stop()
        if self.mock:
            self.mock.kill()
            self.mock.wait(10)


@pytest.fixture
def pool(tmp_path):
    pool = Chatpool(tmp_path)
    try:
        pool.open()
        yield pool
    finally:
        pool.close()


def test_create_answers_with_output_text(pool):
    response = pool.client().responses.create(model="sdk-model", input="Hello")
    assert response.id.startswith("resp_")
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == "You said: Hello"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens > 0
    assert pool.upstream_saw() == [("system", SYSTEM), ("user", "Hello")]


def test_a_chain_of_three_sends_the_earlier_turns_in_order_and_survives_a_restart(pool):
    sdk = pool.client()
    first = sdk.responses.create(model="sdk-model", input="one", instructions="Answer in French")
    assert pool.upstream_saw() == [("system", "Answer in French"), ("user", "one")]
    second = sdk.responses.create(model="sdk-model", input="two", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # Instructions belong to one response: the chain goes on with the configured prompt.
    assert pool.upstream_saw() == [
        ("system", SYSTEM), ("user", "one"), ("assistant", "You said: one"), ("user", "two")]
    pool.stop()
    pool.start()
    sdk = pool.client()
    third = sdk.responses.create(model="sdk-model", input="three", previous_response_id=second.id)
    assert third.output_text == "You said: three"
    assert pool.upstream_saw() == [
        ("system", SYSTEM), ("user", "one"), ("assistant", "You said: one"),
        ("user", "two"), ("assistant", "You said: two"), ("user", "three")]
    assert sdk.responses.retrieve(first.id).output_text == "You said: one"


def test_the_stream_helper_builds_the_final_response(pool):
    sdk = pool.client()
    with sdk.responses.stream(model="sdk-model", input="Stream this please") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == "You said: Stream this please"
    assert final.output_text == "You said: Stream this please"
    assert sdk.responses.retrieve(final.id).output_text == final.output_text


def test_create_stream_true_sends_the_events_in_order(pool):
    events = list(pool.client().responses.create(model="sdk-model", input="in order please", stream=True))
    kinds = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done",
            "response.output_item.done", "response.completed"]
    deltas = kinds[len(head):-len(tail)]
    assert kinds[:len(head)] == head and kinds[-len(tail):] == tail, kinds
    assert len(deltas) > 1 and set(deltas) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    item_id = events[2].item.id
    for delta in events[len(head):-len(tail)]:
        assert (delta.item_id, delta.output_index, delta.content_index, delta.logprobs) == (item_id, 0, 0, [])
    assert events[-1].response.output_text == "You said: in order please"
    assert events[-1].response.output[0].id == item_id


def test_a_conversation_is_a_chat_with_paged_items(pool):
    sdk = pool.client()
    conversation = sdk.conversations.create(
        items=[{"type": "message", "role": "user", "content": "hello"}], metadata={"topic": "sdk"})
    assert conversation.id.startswith("conv_") and conversation.metadata == {"topic": "sdk"}
    added = sdk.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "assistant", "content": "hi there"},
        {"type": "message", "role": "user", "content": "how are you"}])
    assert [item.content[0].text for item in added.data] == ["hi there", "how are you"]
    page = sdk.conversations.items.list(conversation.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["hello", "hi there"] and page.has_more
    rest = sdk.conversations.items.list(conversation.id, limit=2, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["how are you"] and not rest.has_more
    newest = sdk.conversations.items.list(conversation.id, limit=1)
    assert newest.data[0].content[0].text == "how are you"

    reply = sdk.responses.create(model="sdk-model", input="fine thanks", conversation=conversation.id)
    assert reply.conversation.id == conversation.id
    assert pool.upstream_saw() == [
        ("system", SYSTEM), ("user", "hello"), ("assistant", "hi there"),
        ("user", "how are you"), ("user", "fine thanks")]
    every = [i.content[0].text for i in sdk.conversations.items.list(conversation.id, limit=2, order="asc")]
    assert every == ["hello", "hi there", "how are you", "fine thanks", "You said: fine thanks"]
    assert pool.chat_messages(conversation.id) == [
        ("user", "hello"), ("assistant", "hi there"), ("user", "how are you"),
        ("user", "fine thanks"), ("assistant", "You said: fine thanks")]
    assert sdk.conversations.retrieve(conversation.id).id == conversation.id
    assert sdk.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id).role == "assistant"
    assert sdk.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(conversation.id)


def test_retrieve_input_items_and_delete(pool):
    sdk = pool.client()
    response = sdk.responses.create(model="sdk-model", input=[
        {"role": "user", "content": "first part"},
        {"role": "user", "content": [{"type": "input_text", "text": "second part"}]}])
    assert sdk.responses.retrieve(response.id).output_text == "You said: second part"
    items = sdk.responses.input_items.list(response.id)
    assert [i.content[0].text for i in items.data] == ["second part", "first part"]
    oldest_first = sdk.responses.input_items.list(response.id, order="asc", limit=1)
    assert [i.content[0].text for i in oldest_first.data] == ["first part"] and oldest_first.has_more
    assert sdk.responses.delete(response.id) is None
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(model="sdk-model", input="more", previous_response_id=response.id)
    assert raised.value.code == "previous_response_not_found"
    assert raised.value.param == "previous_response_id"
    assert raised.value.body["type"] == "invalid_request" and raised.value.body["request_id"]


def test_store_false_leaves_nothing_in_the_database(pool):
    sdk = pool.client()
    response = sdk.responses.create(model="sdk-model", input="keep this secret", store=False)
    assert response.output_text == "You said: keep this secret"
    streamed = sdk.responses.create(model="sdk-model", input="and this", store=False, stream=True)
    assert list(streamed)[-1].type == "response.completed"
    for table in ["messages", "chats", "responses", "conversations"]:
        assert pool.rows(table) == 0, table
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(model="sdk-model", input="more", previous_response_id=response.id)
    assert raised.value.code == "previous_response_not_found"


def test_another_tenant_can_neither_read_continue_list_nor_delete(pool):
    alice, bob = pool.client("alice"), pool.client("bob")
    response = alice.responses.create(model="sdk-model", input="alice's")
    conversation = alice.conversations.create(items=[{"role": "user", "content": "alice's"}])
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as raised:
        bob.responses.create(model="sdk-model", input="x", previous_response_id=response.id)
    assert raised.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.items.list(conversation.id)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(model="sdk-model", input="x", conversation=conversation.id)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.delete(conversation.id)
    assert alice.responses.retrieve(response.id).output_text == "You said: alice's"
    assert [i.content[0].text for i in alice.conversations.items.list(conversation.id)] == ["alice's"]
