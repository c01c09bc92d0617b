-- wrk script of bench/sustained.py: calls at a fixed rate (open loop), each a PBX call.finished event
-- and the call's generic transcript, spread over several portals.
--
-- BENCH_RATE     calls per second over all threads (each call is two requests)
-- BENCH_SECONDS  how long to send; then every connection stops and the answers in flight are awaited
-- BENCH_PORTALS  portal names separated by spaces (`?portal=<name>` of both hooks)
-- BENCH_PREFIX   call ids are "<prefix>-<thread>-<n>"
-- BENCH_NUMBER   a number (< 100) that makes this run's caller numbers differ from other runs'
-- BENCH_BODY_FILE the transcript body; BENCH_TOKEN the bearer token; BENCH_OUT the JSON summary
--
-- The rate is kept by a schedule, not by the answers: each thread owns rate / threads calls per
-- second and hands out send slots at fixed intervals (delay() returns the time to the next free
-- slot). While the service keeps up the rate is exact; when it does not, the connections fall
-- behind the schedule and send as fast as answers come back (the achieved rate tells). Call k's
-- event takes slot 2k and its transcript slot 2k + 1, so the event is usually stored first, as a
-- PBX and a vendor would send them; the service copes with either order. Closed like post.lua: after
-- BENCH_SECONDS each thread waits for its answers, creates BENCH_OUT.drained.<thread>, and the bench
-- ends wrk with SIGINT; done() writes the summary.

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

local token = os.getenv("BENCH_TOKEN") or ""
local prefix = os.getenv("BENCH_PREFIX") or "sustained"
local number = tonumber(os.getenv("BENCH_NUMBER") or "0")
local seconds = tonumber(os.getenv("BENCH_SECONDS") or "10")
local rate = tonumber(os.getenv("BENCH_RATE") or "10")
local thread_total = tonumber(os.getenv("BENCH_THREADS") or "1")
local headers = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
local portals = {}
for name in string.gmatch(os.getenv("BENCH_PORTALS") or "", "%S+") do
  table.insert(portals, name)
end

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

local transcript = nil

local function unanswered()
  -- wrk calls request() once more in the first thread's state to check it (never sent)
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
  sent, ok, bad, late, first_sent, last_answer = 0, 0, 0, 0, 0, 0
  drained = false
  started = now()
  next_slot = started
  -- two requests per call; this thread's share of the calls
  interval = thread_total / (2 * rate)
  verified = tid ~= 1
  local file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
  transcript = file:read("*a")
  file:close()
end

function delay()
  local at = now()
  if at - started >= seconds then
    check_drained()
    return 3600000 -- past the deadline: this connection sends nothing more
  end
  local slot = next_slot
  next_slot = next_slot + interval
  if slot <= at then
    if at - slot > 0.1 then
      late = late + 1 -- more than 100 ms behind the schedule
    end
    return 0
  end
  return math.floor((slot - at) * 1000)
end

function request()
  sent = sent + 1
  if not verified then
    -- wrk's check of the first thread's request(): never sent, so it must not take a call's event
    verified = true
    return wrk.format("GET", "/livez")
  end
  if first_sent == 0 then
    first_sent = now()
  end
  local made = sent - (tid == 1 and 1 or 0) -- requests really sent, this one included
  local call = math.floor((made - 1) / 2)
  local id = prefix .. "-" .. tid .. "-" .. call
  local portal = portals[((call + tid) % #portals) + 1]
  if (made - 1) % 2 == 0 then
    local caller = string.format("+1%02d%02d%06d", number % 100, tid % 100, call % 1000000)
    local body = '{"event": "call.finished", "call_id": "' .. id .. '", "direction": "inbound", '
      .. '"from": "' .. caller .. '", "to": "+15550000000", "extension": "101", '
      .. '"started_at": "2026-11-25T10:20:30+01:00", "duration": 73, "status": "answered"}'
    return wrk.format("POST", "/hooks/pbx/generic?portal=" .. portal, headers, body)
  end
  return wrk.format("POST", "/hooks/stt/generic?pbx=generic&call=" .. id .. "&portal=" .. portal, headers, transcript)
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
    if bad == 1 then -- the first refusal's answer, for the bench to show
      local out = io.open(os.getenv("BENCH_OUT") .. ".refused." .. tid, "w")
      if out then
        out:write(status .. " " .. (body or ""))
        out:close()
      end
    end
  end
  last_answer = now()
  check_drained()
end

function done(summary, latency, requests)
  local total_sent, total_ok, total_bad, total_late, calls = -1, 0, 0, 0, 0
  local window_start, window_end = nil, 0
  for _, thread in ipairs(threads) do
    local made = thread:get("sent") - (thread:get("tid") == 1 and 1 or 0)
    calls = calls + math.floor(made / 2) -- calls whose event and transcript were both sent
    total_sent = total_sent + thread:get("sent")
    total_ok = total_ok + thread:get("ok")
    total_bad = total_bad + thread:get("bad")
    total_late = total_late + thread:get("late")
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
    '{"sent": %d, "ok": %d, "non_2xx": %d, "calls": %d, "late": %d, "window_s": %.6f, "p50_us": %d, "p99_us": %d, '
      .. '"max_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    total_sent, total_ok, total_bad, calls, total_late, (window_end - (window_start or window_end)),
    latency:percentile(50), latency:percentile(99), latency.max,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
  out:close()
end
