#!/usr/bin/env python3
"""chatpool's load benchmark: one command, every scenario, numbers you can compare.

For each scenario it starts `chatpool mock-llm` with the scenario's latency and chatpool with its
workers on a fresh temp database (both on free loopback ports), warms up, drives chatpool with wrk
(scripts/load.lua) and samples chatpool's RSS and CPU from /proc. Then a short extra phase counts
chatpool's system calls per request (perf stat on the syscall tracepoints, or strace -c -f where
perf cannot). It prints one row per scenario, then the cost per request, and writes the same as
JSON to target/load/. Standard library only.

    scripts/load.py                       # build release, run every scenario (~3 minutes)
    scripts/load.py littles_law overload  # some scenarios
    scripts/load.py --duration 5 --bin target/release/chatpool overhead
    scripts/load.py --repeat 3            # each phase three times, then a table of medians
    scripts/load.py soak --soak-minutes 60 --bin target/release/chatpool   # RSS over an hour
    scripts/load.py soak --target go:/tmp/cpbench/peers/go/bin/peer-go   # the Go peer, same load
    scripts/load.py relay direct          # the relay, and the same requests straight to the mock
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LUA = os.path.join(ROOT, "scripts", "load.lua")

# What a scenario's requests are: `chat` posts messages to chats; `relay` posts OpenAI chat
# completions to /v1/chat/completions without X-Chat-Id (stateless, nothing stored); `direct`
# sends the relay's requests straight to the mock, with no chatpool: the floor a relay is
# measured against.
Scenario = namedtuple("Scenario", "latency_ms workers connections chats exchanges kind")
SCENARIOS = {
    "overhead": Scenario(0, 16, [64], 10000, 0, "chat"),
    "history": Scenario(0, 16, [64], 128, 100, "chat"),
    "relay": Scenario(0, 16, [64], 0, 0, "relay"),
    "direct": Scenario(0, 16, [64], 0, 0, "direct"),
    "littles_law": Scenario(100, 64, [64, 256], 10000, 0, "chat"),
    "overload": Scenario(200, 8, [512], 10000, 0, "chat"),
    "scale": Scenario(1000, 1024, [1024], 10000, 0, "chat"),
}
QUEUE_CAPACITY = 64
# Streamed replies: the LLM takes STREAM_LATENCY_MS to its first chunk, then STREAM_CHUNKS chunks
# STREAM_GAP_MS apart; STREAM_CLIENTS clients, each one stream after another, on STREAM_WORKERS.
STREAM_LATENCY_MS, STREAM_CHUNKS, STREAM_GAP_MS = 100, 10, 20
STREAM_WORKERS, STREAM_CLIENTS = 16, 24
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def ensure_wrk():
    if shutil.which("wrk"):
        return
    log("load: wrk is missing; installing Debian's package")
    if os.geteuid() != 0:
        sys.exit("load: install wrk first (apt-get install wrk)")
    subprocess.run(["apt-get", "update", "-q"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, stdout=subprocess.DEVNULL)


class Proc:
    """A child in its own process group, its address read from its ready line on stderr.

    `wrap` runs it under another command (perf stat) that execs it as its only child; `pid` is
    then the child's, the process measured and signalled."""

    def __init__(self, args, marker, log_path, wrap=()):
        self.log = open(log_path, "w")
        self.p = subprocess.Popen([*wrap, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addr = None
        deadline = time.time() + 60
        for line in self.p.stderr:
            self.log.write(line)
            if marker in line:
                self.addr = line.split(marker, 1)[1].split()[0].split("/")[0]
                break
            if time.time() > deadline:
                break
        self.pid = self.p.pid
        if wrap and self.addr:
            with open(f"/proc/{self.p.pid}/task/{self.p.pid}/children") as f:
                self.pid = int(f.read().split()[0])
        if not self.addr:
            self.stop()
            sys.exit(f"load: {args[0]} did not start; see {log_path}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.p.stderr:
            self.log.write(line)

    def stop(self):
        if self.p.poll() is None:
            # The measured process first: a wrapper reports once its child has exited.
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


# The system calls counted one by one; the rest are counted together as "other".
SYSCALLS = ["futex", "sched_yield", "setsockopt", "getsockopt", "ioctl", "fcntl", "recvfrom",
            "sendto", "read", "write", "writev", "readv", "pread64", "pwrite64", "fdatasync",
            "fsync", "poll", "ppoll", "epoll_wait", "clock_nanosleep", "mmap", "munmap",
            "mprotect", "madvise", "brk", "close", "shutdown", "socket", "connect", "accept4",
            "clone3", "newfstatat", "lseek", "getrandom"]
TRACING = "/sys/kernel/tracing/events/syscalls"


class SyscallCounter:
    """Counts chatpool's system calls over a phase: with perf stat on the syscall tracepoints
    (chatpool runs under it, counting only between enable and disable, its threads included),
    or else by attaching strace -c -f for the phase, which slows chatpool down a lot but counts
    the same calls."""

    def __init__(self, work):
        self.out = os.path.join(work, "syscalls.txt")
        self.wrap, self.strace = (), None
        events = [f"syscalls:sys_enter_{n}" for n in SYSCALLS
                  if os.path.isdir(os.path.join(TRACING, f"sys_enter_{n}"))]
        if events and perf_works():
            self.ctl, self.ack = os.path.join(work, "perf-ctl"), os.path.join(work, "perf-ack")
            os.mkfifo(self.ctl)
            os.mkfifo(self.ack)
            self.wrap = ("perf", "stat", "-x,", "-o", self.out, "-D", "-1",
                         "--control", f"fifo:{self.ctl},{self.ack}",
                         "-e", ",".join(["raw_syscalls:sys_enter", *events]), "--")
        elif not shutil.which("strace"):
            self.out = None

    def _perf(self, command):
        # perf opens the control fifo for reading and the ack fifo for writing at start.
        with open(self.ctl, "w") as ctl:
            ctl.write(command + "\n")
        with open(self.ack) as ack:
            ack.readline()

    def start(self, pid):
        if self.wrap:
            self._perf("enable")
        elif self.out:
            self.strace = subprocess.Popen(["strace", "-c", "-f", "-q", "-o", self.out, "-p", str(pid)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)

    def stop(self):
        if self.wrap:
            self._perf("disable")
        elif self.strace:
            self.strace.send_signal(signal.SIGINT)
            self.strace.wait(30)

    def counts(self):
        """{syscall: calls} and the total, once the phase and (for perf) chatpool are over."""
        if not self.out or not os.path.exists(self.out):
            return None
        counts = {}
        with open(self.out) as f:
            for line in f:
                fields = line.strip().split(",") if self.wrap else line.split()
                if self.wrap and len(fields) > 2 and fields[0].isdigit():
                    name = fields[2].replace("syscalls:sys_enter_", "")
                    counts["total" if name == "raw_syscalls:sys_enter" else name] = int(fields[0])
                elif not self.wrap and len(fields) >= 5 and fields[3].isdigit():
                    counts[fields[-1]] = int(fields[3])
        return counts or None


def perf_works():
    if not shutil.which("perf"):
        return False
    probe = subprocess.run(["perf", "stat", "-e", "raw_syscalls:sys_enter", "true"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


class Sampler(threading.Thread):
    """Peak RSS and CPU seconds of one process, from /proc, every 100 ms."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_rss, self.running = pid, 0, True
        self.cpu_start = self.cpu()

    def cpu(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss(self):
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def run(self):
        while self.running:
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.1)

    def finish(self):
        self.running = False
        self.join()
        return self.peak_rss, self.cpu() - self.cpu_start


def post(addr, chat, content):
    conn = http.client.HTTPConnection(addr, timeout=30)
    body = json.dumps({"content": content})
    for _ in range(100):
        conn.request("POST", f"/v1/chats/{chat}/messages", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status == 200:
            return
        time.sleep(0.05)
    sys.exit(f"load: prefill of {chat} kept failing with {response.status}")


def prefill(addr, chats, exchanges):
    """Long histories, written through the API: each chat in order, 16 chats at a time."""
    def fill(k):
        for n in range(exchanges):
            post(addr, f"load-{k}", f"Earlier message number {n} of this chat, with some words in it.")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(fill, range(chats)))


def wrk(addr, connections, seconds, chats, kind, out_dir=None):
    env = dict(os.environ, LOAD_CHATS=str(chats), LOAD_THREADS="2", LOAD_MODE=kind)
    if out_dir:
        env["LOAD_OUT"] = out_dir
    args = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", LUA, f"http://{addr}"]
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def latency_dir(connections):
    # The per-request latency log goes to memory when it can: wrk writes a line per response,
    # and on a disk busy with the database's writeback those writes stall wrk itself.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    return tempfile.mkdtemp(prefix=f"chatpool-load-lat-{connections}-", dir=shm)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]


def read_latencies(out_dir):
    """Latencies in ms by status, and the completion times (µs) of the 2xx responses."""
    by_status, done_2xx = {}, []
    for name in os.listdir(out_dir):
        with open(os.path.join(out_dir, name)) as f:
            for line in f:
                status, micros, done = line.split("\t")
                by_status.setdefault(int(status), []).append(int(micros) / 1000)
                if 200 <= int(status) < 300:
                    done_2xx.append(int(done))
    return {s: sorted(v) for s, v in by_status.items()}, sorted(done_2xx)


def steady_rate(done_us, wave):
    """2xx a second once the closed loop is running: the answers between the middle of the
    second wave and the middle of the last whole one, over the time between them.

    Every connection starts at once, and with a fixed upstream latency the answers come in
    waves of `wave` (every busy worker answering once) one cycle apart, each wave some tenths
    of a second wide. Timing from the a-th answer to the b-th, b - a a whole number of waves,
    counts whole waves over whole cycles whatever the waves' width and wherever the run ends.
    (A window with edges at fixed times, 1.5 latencies after the first answer to half a
    latency before the last, did not: its end moved with the width of the last wave and with
    whether a next one had begun, and read 0.91 to 0.997 for runs whose waves came at the
    same pace.)"""
    waves = len(done_us) // wave
    if wave < 2 or waves < 4:
        return None
    a, b = wave + wave // 2, (waves - 1) * wave + wave // 2
    return (b - a) / ((done_us[b] - done_us[a]) / 1e6)


def write_config(work, workers, mock_addr):
    """Writes chatpool's config for a run in `work`, against the mock at `mock_addr`; its path."""
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:0"\nmax_concurrent_requests = {workers}\n'
                f'queue_capacity = {QUEUE_CAPACITY}\nshutdown_grace_secs = 5\n\n'
                f'[storage]\npath = "{os.path.join(work, "chat.db")}"\n\n'
                f'[llm]\nprovider = "openai"\nbase_url = "http://{mock_addr}/v1"\n'
                f'api_key_env = "LOAD_NO_KEY"\nrequest_timeout_ms = 30000\n')
    return config


def run_phase(binary, name, connections, args, work):
    sc = SCENARIOS[name]
    mock = Proc([binary, "mock-llm", "--listen", "127.0.0.1:0", "--latency-ms", str(sc.latency_ms)],
                "listening on http://", os.path.join(work, "mock.log"))
    config = write_config(work, sc.workers, mock.addr)
    kind = "relay" if sc.kind == "direct" else sc.kind
    syscalls = SyscallCounter(work) if args.syscall_seconds and sc.kind != "direct" else None
    server = None
    if sc.kind != "direct":
        server = Proc([binary, "--config", config], "listening on http://",
                      os.path.join(work, "chatpool.log"), wrap=syscalls.wrap if syscalls else ())
    addr = server.addr if server else mock.addr
    out_dir, calls_dir = latency_dir(connections), latency_dir(connections)
    try:
        if sc.exchanges:
            log(f"load: {name}: prefilling {sc.chats} chats with {sc.exchanges} exchanges each")
            prefill(addr, sc.chats, sc.exchanges)
        if args.warmup:
            wrk(addr, min(connections, sc.workers), args.warmup, sc.chats, kind)
            time.sleep(1)
        sampler = Sampler(server.pid if server else mock.pid)
        sampler.start()
        started = time.time()
        wrk(addr, connections, args.duration, sc.chats, kind, out_dir)
        elapsed = time.time() - started
        peak_rss, cpu = sampler.finish()
        if syscalls:
            time.sleep(1)
            syscalls.start(server.pid)
            wrk(addr, connections, args.syscall_seconds, sc.chats, kind, calls_dir)
            syscalls.stop()
    finally:
        if server:
            server.stop()
        mock.stop()
    by_status, done_2xx = read_latencies(out_dir)
    counted = sum(len(v) for v in read_latencies(calls_dir)[0].values())
    for d in (out_dir, calls_dir):
        shutil.rmtree(d, ignore_errors=True)
    ok = sorted(v for s, vals in by_status.items() if 200 <= s < 300 for v in vals)
    total = sum(len(v) for v in by_status.values())
    shed = len(by_status.get(503, []))
    in_flight = min(connections, sc.workers + QUEUE_CAPACITY)
    row = {
        "scenario": name, "kind": sc.kind, "connections": connections, "workers": sc.workers,
        "queue_capacity": QUEUE_CAPACITY, "upstream_latency_ms": sc.latency_ms,
        "duration_s": round(elapsed, 2),
        "rps_2xx": round(len(ok) / elapsed, 1),
        "latency_2xx_ms": {p: percentile(ok, q) for p, q in
                           (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "non_2xx": {str(s): len(v) for s, v in by_status.items() if not 200 <= s < 300},
        "p99_503_ms": percentile(by_status.get(503, []), 99),
        # For `direct`, the mock's own RSS and CPU: there is no chatpool in the path.
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        "rss_kb_per_in_flight": round(peak_rss / 1024 / in_flight, 1),
        "cpu_s_per_1000": round(cpu / total * 1000, 3) if total else None,
        "cpu_us_per_request": round(cpu / total * 1e6, 1) if total else None,
        # The whole phase's CPU over its 503s: an upper bound on what one costs.
        "cpu_us_per_503": round(cpu / shed * 1e6, 1) if shed > total / 2 else None,
    }
    counts = syscalls.counts() if syscalls else None
    if counts and counted:
        row["syscall_requests"] = counted
        row["syscalls_per_request"] = round(counts["total"] / counted, 1)
        row["syscalls_by_name"] = {n: round(c / counted, 2) for n, c in
                                   sorted(counts.items(), key=lambda kv: -kv[1]) if n != "total" and c}
    if sc.latency_ms:
        limit = sc.workers / (sc.latency_ms / 1000)
        row["efficiency"] = round(len(ok) / elapsed / limit, 3)
        steady = steady_rate(done_2xx, min(connections, sc.workers))
        row["efficiency_steady"] = round(steady / limit, 3) if steady else None
    return row


def stream_once(addr, chat):
    """One streamed message: (time to first delta, total, the done event's timings) in ms."""
    conn = http.client.HTTPConnection(addr, timeout=30)
    started = time.perf_counter()
    conn.request("POST", f"/v1/chats/{chat}/messages", json.dumps({"content": "stream", "stream": True}))
    response = conn.getresponse()
    first, done = None, None
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: ") and first is None:
            first = (time.perf_counter() - started) * 1000
        if line.startswith(b"event: done"):
            done = json.loads(response.readline()[6:])
    total = (time.perf_counter() - started) * 1000
    conn.close()
    return first, total, done["timings_ms"] if done else None


def run_streaming(binary, args, work):
    """Time to first byte of streamed replies, and how much of it is queue and upstream."""
    mock = Proc([binary, "mock-llm", "--listen", "127.0.0.1:0", "--latency-ms", str(STREAM_LATENCY_MS),
                 "--chunks", str(STREAM_CHUNKS), "--chunk-gap-ms", str(STREAM_GAP_MS), "--reply-words", "40"],
                "listening on http://", os.path.join(work, "mock.log"))
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:0"\nmax_concurrent_requests = {STREAM_WORKERS}\n\n'
                f'[storage]\npath = "{os.path.join(work, "chat.db")}"\n\n'
                f'[llm]\nprovider = "openai"\nbase_url = "http://{mock.addr}/v1"\napi_key_env = "LOAD_NO_KEY"\n')
    server = Proc([binary, "--config", config], "listening on http://", os.path.join(work, "chatpool.log"))
    samples = []
    deadline = time.time() + args.duration

    def client(k):
        n = 0
        while time.time() < deadline:
            samples.append(stream_once(server.addr, f"stream-{k}-{n}"))
            n += 1
    try:
        with ThreadPoolExecutor(STREAM_CLIENTS) as pool:
            list(pool.map(client, range(STREAM_CLIENTS)))
    finally:
        server.stop()
        mock.stop()
    ok = [s for s in samples if s[0] is not None and s[2]]
    ttfb = sorted(s[0] for s in ok)
    queued = statistics.mean(s[2]["queued"] for s in ok)
    mean_ttfb = statistics.mean(ttfb)
    return {
        "scenario": "streaming", "clients": STREAM_CLIENTS, "workers": STREAM_WORKERS,
        "upstream_first_chunk_ms": STREAM_LATENCY_MS, "chunks": STREAM_CHUNKS, "chunk_gap_ms": STREAM_GAP_MS,
        "streams": len(ok), "failed": len(samples) - len(ok),
        "ttfb_ms": {"p50": percentile(ttfb, 50), "p90": percentile(ttfb, 90), "p99": percentile(ttfb, 99),
                    "mean": round(mean_ttfb, 2)},
        "total_ms_p50": percentile(sorted(s[1] for s in ok), 50),
        "queued_ms_mean": round(queued, 2),
        "queue_share_of_ttfb": round(queued / mean_ttfb, 3),
        "upstream_share_of_ttfb": round(STREAM_LATENCY_MS / mean_ttfb, 3),
    }


# The soak: steady traffic at a fixed rate, RSS sampled, to tell caches filling from a leak.
# SOAK_CHATS chats, so every chat's history passes the 40-message window within minutes and
# reads then take a full window; SOAK_CLIENTS keep-alive client connections; the mock LLM takes
# SOAK_LATENCY_MS and answers SOAK_REPLY_WORDS words, so each request holds a worker a while.
SOAK_CHATS, SOAK_CLIENTS, SOAK_WORKERS = 2000, 16, 16
SOAK_LATENCY_MS, SOAK_REPLY_WORDS = 20, 40
SOAK_CONTENT = "Hello! How does a thread pool decide how many threads it needs, and when to grow?"


def rss_parts(pid):
    """Resident MB: the whole, and its anonymous (heap, stacks), file-backed and shared parts."""
    parts = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"):
                parts[key] = int(value.split()[0])
    mb = {k: round(v / 1024, 2) for k, v in parts.items() if k != "Threads"}
    return mb.get("VmRSS"), mb.get("RssAnon"), mb.get("RssFile"), mb.get("RssShmem"), parts.get("Threads")


def get(addr, path, timeout=5):
    conn = http.client.HTTPConnection(addr, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_healthy(addr, proc, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if get(addr, "/healthz", timeout=2)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class GoPeer(Proc):
    """The Go seed's peer (../shared/peers/go), started with the flags bench/run.py gives it."""

    def __init__(self, path, mock_addr, work):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.addr = f"127.0.0.1:{port}"
        self.log = open(os.path.join(work, "peer-go.log"), "w")
        args = [path, "--listen", self.addr, "--max-concurrent", str(SOAK_WORKERS),
                "--db", os.path.join(work, "chat.db"), "--llm-base-url", f"http://{mock_addr}/v1",
                "--history-max-messages", "40", "--llm-api-key-env", "LOAD_NO_KEY"]
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        if not wait_healthy(self.addr, self.p):
            self.stop()
            sys.exit(f"load: {path} did not start; see {self.log.name}")


def start_target(args, binary, mock, work):
    kind, _, path = args.target.partition(":")
    if kind == "go":
        return GoPeer(os.path.abspath(path), mock.addr, work)
    config = write_config(work, SOAK_WORKERS, mock.addr)
    return Proc([binary, "--config", config], "listening on http://", os.path.join(work, "chatpool.log"))


class SteadyLoad:
    """`rate` POSTs a second for `seconds`, open loop: request i is due at start + i / rate and
    goes out then, or as soon as one of the client connections is free. Bounded in count
    (rate x seconds) and in concurrency (the client connections)."""

    def __init__(self, addr, rate, seconds):
        self.addr, self.rate, self.total = addr, rate, int(rate * seconds)
        self.lock = threading.Lock()
        self.next = 0
        self.in_flight = set()
        self.statuses = {}
        self.latencies = []
        self.start = time.monotonic()

    def take(self):
        with self.lock:
            if self.next >= self.total:
                return None, None
            i = self.next
            self.next += 1
            chat = chat_of_request(i)
            while chat in self.in_flight:
                chat = (chat + 1) % SOAK_CHATS
            self.in_flight.add(chat)
            return i, chat

    def client(self):
        conn = http.client.HTTPConnection(self.addr, timeout=30)
        body = json.dumps({"content": SOAK_CONTENT})
        headers = {"Content-Type": "application/json"}
        while True:
            i, chat = self.take()
            if i is None:
                break
            delay = self.start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.monotonic()
            try:
                conn.request("POST", f"/v1/chats/soak-{chat}/messages", body, headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(self.addr, timeout=30)
                status = 0
            with self.lock:
                self.in_flight.discard(chat)
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.latencies.append((time.monotonic() - sent) * 1000)
        conn.close()

    def snapshot(self):
        """(responses so far by status, latencies since the last snapshot)."""
        with self.lock:
            latencies, self.latencies = self.latencies, []
            return dict(self.statuses), latencies


def chat_of_request(i):
    # A fixed scramble of the request number: every chat gets traffic, in no particular order.
    return (i * 2654435761) % (2**32) % SOAK_CHATS


def sqlite_gauges(addr):
    """SQLite's heap and page-cache bytes from chatpool's /metrics, when it exports them."""
    try:
        status, body = get(addr, "/metrics")
    except OSError:
        return None, None
    if status != 200:
        return None, None
    values = {}
    for line in body.decode().splitlines():
        for name in ("chatpool_sqlite_memory_used_bytes", "chatpool_sqlite_page_cache_used_bytes"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return (values.get("chatpool_sqlite_memory_used_bytes"),
            values.get("chatpool_sqlite_page_cache_used_bytes"))


def slope_mb_per_min(samples):
    """Least-squares slope of RSS against time, in MB a minute."""
    if len(samples) < 2:
        return None
    ts = [s["t_s"] / 60 for s in samples]
    ys = [s["rss_mb"] for s in samples]
    mt, my = statistics.mean(ts), statistics.mean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else None


def run_soak(binary, args, work):
    mock = Proc([binary, "mock-llm", "--listen", "127.0.0.1:0", "--latency-ms", str(SOAK_LATENCY_MS),
                 "--reply-words", str(SOAK_REPLY_WORDS)],
                "listening on http://", os.path.join(work, "mock.log"))
    server = start_target(args, binary, mock, work)
    seconds = args.soak_minutes * 60
    load = SteadyLoad(server.addr, args.rate, seconds)
    samples = []
    try:
        clients = [threading.Thread(target=load.client, daemon=True) for _ in range(SOAK_CLIENTS)]
        for c in clients:
            c.start()
        while True:
            t = time.monotonic() - load.start
            statuses, latencies = load.snapshot()
            memory, page_cache = sqlite_gauges(server.addr) if args.target == "chatpool" else (None, None)
            latencies.sort()
            rss, anon, file, shmem, threads = rss_parts(server.p.pid)
            row = {"t_s": round(t, 1), "rss_mb": rss, "anon_mb": anon, "file_mb": file, "shmem_mb": shmem,
                   "threads": threads,
                   "responses": sum(statuses.values()),
                   "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
                   "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                   "sqlite_mb": memory and round(memory / 2**20, 2),
                   "page_cache_mb": page_cache and round(page_cache / 2**20, 2)}
            samples.append(row)
            log(f"load: soak {args.target}: {soak_line(row)}")
            if not any(c.is_alive() for c in clients):
                break
            time.sleep(max(0.0, min(args.soak_sample_secs, seconds + 30 - t)))
            if time.monotonic() - load.start > seconds + 60:
                log("load: soak: the clients did not finish a minute after the end; stopping")
                break
    finally:
        server.stop()
        mock.stop()
    statuses, _ = load.snapshot()
    last_half = [s for s in samples if s["t_s"] >= seconds / 2]
    return {
        "scenario": "soak", "target": args.target, "rate": args.rate, "minutes": args.soak_minutes,
        "chats": SOAK_CHATS, "clients": SOAK_CLIENTS, "workers": SOAK_WORKERS,
        "upstream_latency_ms": SOAK_LATENCY_MS, "reply_words": SOAK_REPLY_WORDS,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "achieved_rate": round(sum(statuses.values()) / max(samples[-1]["t_s"], 1), 1),
        "rss_start_mb": samples[0]["rss_mb"], "rss_end_mb": samples[-1]["rss_mb"],
        "rss_peak_mb": max(s["rss_mb"] for s in samples),
        "growth_last_half_mb_per_min": slope_mb_per_min(last_half),
        "samples": samples,
    }


def soak_line(row):
    return (f"{row['t_s'] / 60:>6.1f} {row['rss_mb']:>8.2f} {row['anon_mb']:>7.2f} {row['file_mb']:>6.2f} "
            f"{row['shmem_mb']:>6.2f} {row['threads']:>4} {row['responses']:>9} {row['non_2xx']:>7} "
            f"{fmt(row['p50_ms']):>7} {fmt(row['p99_ms']):>7} {fmt(row['sqlite_mb'], 2):>9} "
            f"{fmt(row['page_cache_mb'], 2):>9}")


def print_soak(result):
    print(f"\nsoak: {result['target']}, {result['rate']} requests/s for {result['minutes']} min "
          f"({result['chats']} chats, {result['clients']} client connections, {result['workers']} workers, "
          f"LLM {result['upstream_latency_ms']} ms)")
    head = (f"{'min':>6} {'RSS MB':>8} {'anon':>7} {'file':>6} {'shmem':>6} {'thr':>4} {'responses':>9} "
            f"{'non-2xx':>7} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'sqlite MB':>9} {'cache MB':>9}")
    print(head)
    print("-" * len(head))
    # Every sample is in the JSON; the table keeps about 40 rows, and always the last.
    samples = result["samples"]
    step = max(1, len(samples) // 40)
    for row in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(soak_line(row))
    growth = result["growth_last_half_mb_per_min"]
    print(f"statuses {result['statuses']}, {result['achieved_rate']} responses/s; RSS "
          f"{result['rss_start_mb']:.1f} -> {result['rss_end_mb']:.1f} MB (peak {result['rss_peak_mb']:.1f}); "
          f"growth over the last half: {fmt(growth, 3)} MB/min (least squares)")
    print("anon/file/shmem: the parts of RSS (heap and stacks; the binary and libraries; shared memory, "
          "such as SQLite's WAL index); thr: threads; p50/p99: latency of the responses since the previous "
          "sample; sqlite/cache MB: SQLite's heap and page cache from /metrics (chatpool only)")


def print_streaming(row):
    t = row["ttfb_ms"]
    print(f"\nstreaming: {row['streams']} streams ({row['failed']} failed), {row['clients']} clients on "
          f"{row['workers']} workers; LLM's first chunk after {row['upstream_first_chunk_ms']} ms, then "
          f"{row['chunks']} chunks {row['chunk_gap_ms']} ms apart")
    print(f"  time to first delta: p50 {fmt(t['p50'])} ms, p90 {fmt(t['p90'])} ms, p99 {fmt(t['p99'])} ms, "
          f"mean {fmt(t['mean'])} ms; whole stream p50 {fmt(row['total_ms_p50'])} ms")
    print(f"  of the mean time to first delta: queue {row['queue_share_of_ttfb']:.1%} "
          f"({fmt(row['queued_ms_mean'])} ms), upstream {row['upstream_share_of_ttfb']:.1%}, "
          f"the rest chatpool and the network")


def medians(rows):
    """One row per phase (scenario, connections), each number the median of its runs."""
    phases = {}
    for r in rows:
        phases.setdefault((r["scenario"], r["connections"]), []).append(r)

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out = []
    for runs in phases.values():
        row = dict(runs[0])
        for key in ("rps_2xx", "p99_503_ms", "peak_rss_mb", "cpu_s_per_1000", "efficiency",
                    "efficiency_steady", "rss_kb_per_in_flight", "cpu_us_per_request",
                    "cpu_us_per_503", "syscalls_per_request"):
            row[key] = median([r.get(key) for r in runs])
        row["latency_2xx_ms"] = {k: median([r["latency_2xx_ms"][k] for r in runs])
                                 for k in runs[0]["latency_2xx_ms"]}
        statuses = {s for r in runs for s in r["non_2xx"]}
        row["non_2xx"] = {s: int(median([r["non_2xx"].get(s, 0) for r in runs])) for s in statuses}
        out.append(row)
    return out


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def print_rows(rows):
    head = (f"{'scenario':<12} {'conns':>5} {'2xx/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8} "
            f"{'non-2xx':<18} {'503 p99':>7} {'RSS MB':>6} {'cpu s/1k':>8} {'eff':>6} {'steady':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        lat = r["latency_2xx_ms"]
        non2xx = ",".join(f"{s}:{n}" for s, n in sorted(r["non_2xx"].items())) or "0"
        print(f"{r['scenario']:<12} {r['connections']:>5} {r['rps_2xx']:>8.1f} {fmt(lat['p50']):>7} "
              f"{fmt(lat['p90']):>7} {fmt(lat['p99']):>7} {fmt(lat['max']):>8} {non2xx:<18} "
              f"{fmt(r['p99_503_ms']):>7} {r['peak_rss_mb']:>6.1f} {fmt(r['cpu_s_per_1000'], 3):>8} "
              f"{fmt(r.get('efficiency'), 3):>6} {fmt(r.get('efficiency_steady'), 3):>6}")
    print("latency in ms over 2xx responses; 503 p99: how fast shed requests were answered; "
          "cpu s/1k: chatpool's CPU seconds per 1,000 responses; eff: 2xx/s over workers/latency, "
          "whole run; steady: the same once every connection is running (see steady_rate)")


def print_costs(rows):
    head = (f"{'scenario':<12} {'conns':>5} {'cpu µs/req':>10} {'µs/503':>7} {'KB/in-flight':>12} "
            f"{'calls/req':>9}  system calls per request, most first")
    print(head)
    print("-" * len(head))
    for r in rows:
        by_name = r.get("syscalls_by_name") or {}
        named = sum(by_name.values())
        top = [f"{n} {c:.1f}" for n, c in list(by_name.items())[:8] if c >= 0.05]
        if "syscalls_per_request" in r and r["syscalls_per_request"] - named >= 0.05:
            top.append(f"other {r['syscalls_per_request'] - named:.1f}")
        print(f"{r['scenario']:<12} {r['connections']:>5} {fmt(r.get('cpu_us_per_request')):>10} "
              f"{fmt(r.get('cpu_us_per_503')):>7} {fmt(r.get('rss_kb_per_in_flight')):>12} "
              f"{fmt(r.get('syscalls_per_request')):>9}  {', '.join(top)}")
    print("cpu µs/req: chatpool's CPU over every response of the measured phase (direct: the "
          "mock's); µs/503: the same over the 503s alone, when most answers are 503s; "
          "KB/in-flight: peak RSS over the requests in flight; calls/req: chatpool's system calls "
          "over the responses of a short extra phase (--syscall-seconds)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"any of {', '.join(SCENARIOS)}, streaming, soak (default: all but soak)")
    parser.add_argument("--bin", help="chatpool binary (default: build target/release/chatpool)")
    parser.add_argument("--duration", type=int, default=15, help="seconds per measured phase (15)")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up, 0 for none (3)")
    parser.add_argument("--syscall-seconds", type=int, default=5,
                        help="seconds of the extra phase that counts system calls, 0 for none (5)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each phase; with more than one, also a table of medians (1)")
    parser.add_argument("--soak-minutes", type=float, default=60, help="soak: minutes of traffic (60)")
    parser.add_argument("--rate", type=float, default=200, help="soak: requests a second (200)")
    parser.add_argument("--soak-sample-secs", type=float, default=10, help="soak: seconds between RSS samples (10)")
    parser.add_argument("--target", default="chatpool",
                        help="soak: chatpool (the --bin binary) or go:PATH, the Go seed's peer-go (chatpool)")
    args = parser.parse_args()
    if args.target != "chatpool" and not args.target.startswith("go:"):
        parser.error("--target is chatpool or go:PATH")
    names = args.scenarios or [*SCENARIOS, "streaming"]
    unknown = [n for n in names if n not in SCENARIOS and n not in ("streaming", "soak")]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    ensure_wrk()
    binary = args.bin
    if not binary:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        binary = os.path.join(ROOT, "target", "release", "chatpool")
    binary = os.path.abspath(binary)
    rows = []
    streaming = soak = None
    for name in names:
        if name == "soak":
            with tempfile.TemporaryDirectory(prefix="chatpool-soak-") as work:
                log(f"load: soak, {args.target}, {args.rate} requests/s for {args.soak_minutes} min")
                soak = run_soak(binary, args, work)
            continue
        if name == "streaming":
            with tempfile.TemporaryDirectory(prefix="chatpool-load-") as work:
                log(f"load: streaming, {STREAM_CLIENTS} clients, {args.duration} s")
                streaming = run_streaming(binary, args, work)
            continue
        for connections in SCENARIOS[name].connections:
            for run in range(1, args.repeat + 1):
                with tempfile.TemporaryDirectory(prefix="chatpool-load-") as work:
                    log(f"load: {name}, {connections} connections, {args.duration} s, "
                        f"run {run} of {args.repeat}")
                    rows.append(run_phase(binary, name, connections, args, work))
    if rows:
        print_rows(rows)
        print()
        print_costs(rows)
    if rows and args.repeat > 1:
        print(f"\nmedians of {args.repeat} runs, each column on its own")
        print_rows(medians(rows))
        print()
        print_costs(medians(rows))
    if streaming:
        print_streaming(streaming)
        rows.append(streaming)
    if soak:
        print_soak(soak)
        rows.append(soak)
    out_dir = os.path.join(ROOT, "target", "load")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, time.strftime("%Y%m%d-%H%M%S") + ".json")
    with open(out, "w") as f:
        json.dump({"binary": binary, "rows": rows}, f, indent=1)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
