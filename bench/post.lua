-- wrk script of bench/ingest.py: POSTs with the bearer token, a distinct call id per request.
--
-- BENCH_KIND=pbx  POST /hooks/pbx/generic, a small call.finished event, call_id "<prefix>-<thread>-<n>"
-- BENCH_KIND=stt  POST /hooks/stt/generic?b24_call_id=<prefix>-<thread>-<n>, body from BENCH_BODY_FILE
--
-- Closed at a deadline, not cut off: after BENCH_SECONDS no connection sends another request
-- (delay() parks it) and the requests in flight are still answered. When a thread has every
-- answer it creates BENCH_OUT.drained.<thread>; bench/ingest.py then sends wrk SIGINT, which ends
-- it at once (its -d is only an upper bound). So every request sent is answered and counted, and
-- the database can be checked to hold exactly as many events as there were 2xx answers. done()
-- writes one JSON object to BENCH_OUT.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local timespec = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(1, timespec) -- CLOCK_MONOTONIC
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local kind = os.getenv("BENCH_KIND") or "pbx"
local token = os.getenv("BENCH_TOKEN") or ""
local prefix = os.getenv("BENCH_PREFIX") or "bench"
local seconds = tonumber(os.getenv("BENCH_SECONDS") or "10")
local headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }

-- main state: one entry per thread, read back in done()
local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

local body_template = nil

-- wrk calls request() once more in the first thread's state, before it connects, to check the
-- request it builds (script_verify_request); that one is never sent.
local function unanswered()
  return sent - ok - bad - (tid == 1 and 1 or 0)
end

local function check_drained()
  if not drained and unanswered() == 0 and now() - started >= seconds then
    drained = true
    local marker = io.open(os.getenv("BENCH_OUT") .. ".drained." .. tid, "w")
    if marker then
      marker:close()
    end
  end
end

function init(args)
  sent, ok, bad, first_sent, last_answer = 0, 0, 0, 0, 0
  drained = false
  started = now()
  if kind == "stt" then
    local file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
    body_template = file:read("*a")
    file:close()
  end
end

function delay()
  if now() - started >= seconds then
    check_drained()
    return 3600000 -- past the deadline: this connection sends nothing more
  end
  return 0
end

function request()
  sent = sent + 1
  if first_sent == 0 then
    first_sent = now()
  end
  local id = prefix .. "-" .. tid .. "-" .. sent
  if kind == "pbx" then
    local body = '{"event": "call.finished", "call_id": "' .. id .. '", "direction": "inbound", '
      .. '"from": "+15551234567", "to": "+15550000000", "extension": "101", '
      .. '"started_at": "2026-11-25T10:20:30+01:00", "duration": 73, "status": "answered"}'
    return wrk.format("POST", "/hooks/pbx/generic", headers, body)
  end
  return wrk.format("POST", "/hooks/stt/generic?b24_call_id=" .. id, headers, body_template)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
  end
  last_answer = now()
  check_drained()
end

function done(summary, latency, requests)
  local total_sent, total_ok, total_bad = -1, 0, 0 -- -1: the verification call (see unanswered())
  local window_start, window_end = nil, 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    total_ok = total_ok + thread:get("ok")
    total_bad = total_bad + thread:get("bad")
    local first = thread:get("first_sent")
    if first > 0 and (window_start == nil or first < window_start) then
      window_start = first
    end
    if thread:get("last_answer") > window_end then
      window_end = thread:get("last_answer")
    end
  end
  local errors = summary.errors
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  out:write(string.format(
    '{"sent": %d, "ok": %d, "non_2xx": %d, "window_s": %.6f, "wrk_requests": %d, "wrk_duration_us": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    total_sent, total_ok, total_bad, (window_end - (window_start or window_end)), summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, errors.connect, errors.read, errors.write, errors.status, errors.timeout))
  out:close()
end
