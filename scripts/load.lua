-- wrk script for scripts/load.py: each request POSTs a message to a chat (or, with
-- LOAD_MODE=relay, an OpenAI chat completion to /v1/chat/completions, stateless), and each
-- response's status, latency and completion time are appended to LOAD_OUT/lat-<thread>.tsv as
-- "<status>\t<latency µs>\t<CLOCK_MONOTONIC µs at the response>".
--
-- Latency runs from just before wrk writes the request to the response callback, matched by the
-- X-Request-Id that chatpool echoes, so interleaved connections on one thread do not mix up.
-- A thread only picks chats it has no request in flight on, so a 409 chat_busy is never caused
-- by the load generator itself. Environment: LOAD_MODE (chat or relay), LOAD_CHATS (default
-- 10000), LOAD_PREFIX, LOAD_OUT.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } load_timespec_t;
int clock_gettime(int clk_id, load_timespec_t *tp);
]]
local ts = ffi.new("load_timespec_t[1]")
local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts[0].tv_sec) * 1000000 + tonumber(ts[0].tv_nsec) / 1000
end

local next_thread = 0

function setup(thread)
  thread:set("thread_index", next_thread)
  next_thread = next_thread + 1
end

function init(args)
  chats = tonumber(os.getenv("LOAD_CHATS") or "10000")
  prefix = os.getenv("LOAD_PREFIX") or "load-"
  threads = tonumber(os.getenv("LOAD_THREADS") or "2")
  relay = os.getenv("LOAD_MODE") == "relay"
  body = '{"content": "Hello! How does a thread pool decide how many threads it needs?"}'
  relay_body = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": '
    .. '"Hello! How does a thread pool decide how many threads it needs?"}]}'
  sent = 0
  started = {}
  chat_of = {}
  busy = {}
  local out = os.getenv("LOAD_OUT")
  if out then
    file = io.open(out .. "/lat-" .. thread_index .. ".tsv", "w")
    file:setvbuf("line")
  end
  math.randomseed(os.time() + thread_index * 7919)
end

local function pick_chat()
  -- Chats k with k % threads == thread_index belong to this thread: a random one that has no
  -- request in flight, found by walking on from a random start when the first pick is busy.
  local owned = math.floor((chats - 1 - thread_index) / threads) + 1
  local start = math.random(0, owned - 1)
  for step = 0, owned - 1 do
    local k = thread_index + threads * ((start + step) % owned)
    if not busy[k] then return k end
  end
  return thread_index + threads * start
end

function request()
  sent = sent + 1
  local id = "load" .. thread_index .. "-" .. sent
  local headers = { ["Content-Type"] = "application/json", ["X-Request-Id"] = id }
  started[id] = now_us()
  if relay then
    return wrk.format("POST", "/v1/chat/completions", headers, relay_body)
  end
  local chat = pick_chat()
  busy[chat] = true
  chat_of[id] = chat
  return wrk.format("POST", "/v1/chats/" .. prefix .. chat .. "/messages", headers, body)
end

function response(status, headers, _)
  local id = headers["X-Request-Id"] or headers["x-request-id"]
  local t0 = id and started[id]
  if not t0 then return end
  local now = now_us()
  local latency = now - t0
  started[id] = nil
  if chat_of[id] then
    busy[chat_of[id]] = nil
    chat_of[id] = nil
  end
  if file then file:write(status, "\t", math.floor(latency), "\t", math.floor(now), "\n") end
end
