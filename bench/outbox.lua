-- `make bench` (outbox): the durable outbox inside nginx (one worker)
-- against loopback Redis (AOF) and the C sink.
-- 1. enqueue latency: rounds of 200 concurrent requests, each timing its
--    own pool:enqueue (compose, then one script in Redis): median and p99;
-- 2. delivery throughput from the outbox against the in-memory enqueue of
--    the same pool (max_conns 2), side by side, alternated, each outcome
--    logged by on_result in both: the ratio and its spread.
--    First to the sink directly, then through a delay line (5 ms round trip).
-- Usage: lua5.4 bench/outbox.lua build/sink   (OUTBOX_BENCH_N=6000, OUTBOX_BENCH_N_LINK=600,
--        OUTBOX_BENCH_ROUNDS=5)
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local peers = require("peers")
local core = require("smtppool.core")
local smtppool = require("smtppool")

local SINK = arg[1] or "build/sink"
local N = tonumber(os.getenv("OUTBOX_BENCH_N")) or 6000
local ROUNDS = tonumber(os.getenv("OUTBOX_BENCH_ROUNDS")) or 5
local N_LINK = tonumber(os.getenv("OUTBOX_BENCH_N_LINK")) or 600
local LINK_RTT = 0.005
if not os.execute("command -v redis-server >/dev/null 2>&1 && command -v nginx >/dev/null 2>&1") then
  print("outbox: redis-server or nginx is not installed (make deps); skipped")
  return
end
os.execute("make -s build/luajit/smtppool/core.so >/dev/null")

local redis = peers.redis({ persist = true })
local dir = peers.tmpdir()
local sink_pid, sink_port = peers.sink(SINK, dir)
local ngx = peers.nginx(1)
local url = "redis://127.0.0.1:" .. redis.port
local function q(cfg, name, port)
  return ("cfg=%s&port=%d&rport=%d&name=%s"):format(cfg, port or sink_port, redis.port, name or "")
end
local function box(name)
  return assert(smtppool.new{ host = "127.0.0.1", port = sink_port, tls = "none", outbox = url, outbox_name = name })
end
local function pct(t, p) return t[math.max(1, math.ceil(#t * p))] end

-- 1. enqueue latency: one request at a time (what enqueue costs), then
-- rounds of 200 at once (what a burst waits: the worker's processor is
-- shared by all 200, so this is mostly queueing)
local one = {}
for i = 1, 200 do
  local t = tonumber(ngx.get(("oenqueue?%s&to=s%d@y.test"):format(q("outbox", "lat"), i)):match("^id %x+ ([%d.e-]+)"))
  if t then one[#one + 1] = t * 1000 end
end
table.sort(one)
print(("outbox: enqueue in nginx (1 worker), loopback Redis with AOF; %d requests one at a time:"):format(#one))
print(("  enqueue: median %.2f ms, p99 %.2f ms, max %.2f ms (aim: p99 under 5 ms)"):format(pct(one, 0.5),
  pct(one, 0.99), one[#one]))
-- rounds of 200 requests at once, path(r, i) each; the milliseconds each
-- line matching pattern reports, sorted
local function bursts(path, pattern)
  local ms = {}
  for r = 1, ROUNDS do
    local paths = {}
    for i = 1, 200 do paths[i] = path(r, i) end
    for _, l in ipairs(ngx.parallel(paths, 60)) do
      local t = tonumber(l:match(pattern))
      if t then ms[#ms + 1] = t * 1000 end
    end
  end
  table.sort(ms)
  return ms
end
local lat = bursts(function(r, i) return ("oenqueue?%s&to=l%d-%d@y.test"):format(q("outbox", "lat"), r, i) end,
  "^id %x+ ([%d.e-]+)$")
print(("  %d requests in rounds of 200 at once (curl --parallel on the same 2 processors):"):format(#lat))
print(("  enqueue: median %.2f ms, p99 %.2f ms, max %.2f ms "):format(pct(lat, 0.5),
  pct(lat, 0.99), lat[#lat]))
-- the floor of that figure on this machine: the same bursts, each request
-- timing one bare Redis PING on a kept-alive cosocket (no smtppool code)
local floor = bursts(function(r, i) return ("rping?rport=%d&r=%d&i=%d"):format(redis.port, r, i) end,
  "^pong ([%d.e-]+)$")
print(("  floor, a bare Redis PING timed the same way (%d requests, rounds of 200): median %.2f ms, p99 %.2f ms, max %.2f ms")
  :format(#floor, pct(floor, 0.5), pct(floor, 0.99), floor[#floor]))
local lb = box("lat")
peers.wait_for(function() return lb.outbox:stats().depth == 0 end, 120, "the latency messages to leave")
lb:close()

-- 2. delivery throughput, in memory and from the outbox, alternated: to
-- the sink directly, then through a delay line (a relay a few milliseconds
-- away, as real ones are)
local function logged(pattern)
  local n = 0
  for _ in ngx.log():gmatch(pattern) do n = n + 1 end
  return n
end
local function compare(port, n, tag)
  local mem, out = {}, {}
  for r = 1, 3 do
    local before = logged("OUTCOME sent")
    local t0 = core.now()
    assert(ngx.get(("burst?%s&n=%d&qs=%d"):format(q("bmem", tag .. "m" .. r, port),
      n, n + 1)):match("queued " .. n))
    peers.wait_for(function() return logged("OUTCOME sent") >= before + n end, 300, "the in-memory queue")
    mem[r] = n / (core.now() - t0)
    -- the outbox filled first (its pool not yet made), then drained by the agent
    local name = tag .. "thr" .. r
    local b = box(name)
    for i = 1, n do assert(b:enqueue{ from = "a@x.test", to = ("t%d@y.test"):format(i), subject = "outbox",
      text = "o" }) end
    t0 = core.now()
    ngx.get("outcome?" .. q("outbox", name, port) .. "&id=00") -- makes the pool
    peers.wait_for(function() return (b.outbox:stats().sent or 0) >= n end, 300, "the outbox")
    out[r] = n / (core.now() - t0)
    b:close()
  end
  local ratios = {}
  for r = 1, 3 do ratios[r] = out[r] / mem[r] end
  table.sort(ratios)
  local function three(t) return ("%.0f/%.0f/%.0f"):format(t[1], t[2], t[3]) end
  print(("    in memory %s msg/s; from the outbox %s msg/s"):format(three(mem), three(out)))
  print(("    outbox / in memory: median %.2f (spread %.2f-%.2f; aim: at least 0.9)"):format(ratios[2], ratios[1],
    ratios[3]))
end
print(("  delivery, %d messages a run, 3 runs alternated, max_conns 2, the C sink:"):format(N))
compare(sink_port, N, "s")
local link = peers.proxy(sink_port, LINK_RTT / 2)
print(("  delivery, %d messages a run, 3 runs alternated, max_conns 2, the sink behind a %g ms round trip:"):format(
  N_LINK, LINK_RTT * 1000))
compare(link.port, N_LINK, "l")
link:stop()
ngx.cleanup()
os.execute("kill " .. sink_pid)
redis:stop()
os.execute("rm -rf " .. peers.quote(dir))
