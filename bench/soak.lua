-- `make bench` (soak): does a long run leak? A million messages rotated
-- every 5 through the C sink, then a thousand over STARTTLS to exim, rotated
-- every 5 so most handshakes resume. Prints this process's RSS, Lua heap and
-- open descriptors after a warm-up and at the end, and the TLS counters.
-- SOAK_N and SOAK_TLS_N change the sizes. Nothing is written to the tree.
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local core = require("smtppool.core")
local peers = require("peers")

local N = tonumber(os.getenv("SOAK_N")) or 1000000
local TLS_N = tonumber(os.getenv("SOAK_TLS_N")) or 1000
local WARMUP = math.min(20000, N // 10)
local SINK = arg[1] or "build/sink"

local mypid = peers.read_file("/proc/self/stat"):match("^(%d+)")
local function rss_kb() return tonumber(peers.read_file("/proc/self/status"):match("VmRSS:%s*(%d+)")) end
local function fds()
  local n = 0
  for _ in peers.sh("ls /proc/" .. mypid .. "/fd"):gmatch("[^\n]+") do n = n + 1 end
  return n - 1 -- the pipe of this very listing
end
local function sample()
  collectgarbage()
  return { rss = rss_kb(), heap = math.floor(collectgarbage("count")), fds = fds() }
end

local function report(name, n, secs, a, b, extra)
  print(("%-34s %9d msgs %8.1fs %8.0f msg/s"):format(name, n, secs, n / secs))
  print(("  after warm-up: RSS %6d KB, Lua heap %6d KB, %d fds"):format(a.rss, a.heap, a.fds))
  print(("  at the end:    RSS %6d KB, Lua heap %6d KB, %d fds  (RSS %+d KB, fds %+d)"):format(
    b.rss, b.heap, b.fds, b.rss - a.rss, b.fds - a.fds))
  if extra then print("  " .. extra) end
end

local function soak(pool, n, data)
  local i, first = 0, nil
  local t0 = core.now()
  local summary = pool:send_batch(function()
    if i == n then return nil end
    i = i + 1
    if i == WARMUP + 1 or (n <= WARMUP and i == 1) then first = sample() end
    return { from = "soak@x.test", to = { "r@y.test" }, data = data .. i .. "\r\n" }
  end)
  local secs = core.now() - t0
  assert(summary.sent == n, ("sent %d of %d"):format(summary.sent, n))
  return secs, first
end

local body = "From: soak@x.test\r\nTo: r@y.test\r\nSubject: soak\r\n\r\n" .. ("x"):rep(900) .. "\r\n"

-- 1. the sink, rotated every 5
local dir = peers.tmpdir()
local pid, port = peers.sink(SINK, dir)
local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none", max_conns = 4,
  max_messages_per_conn = 5 })
local secs, a = soak(pool, N, body)
local st = pool:stats()
pool:close()
local b = sample()
os.execute("kill " .. pid)
os.execute("rm -rf " .. peers.quote(dir))
print(("soak: ~1 KB messages, 4 connections, rotated every 5 (warm-up %d messages)"):format(WARMUP))
report("sink, plaintext", N, secs, a, b, ("%d connections opened, %d rotated"):format(st.opened, st.rotated))

-- 2. exim over STARTTLS, rotated every 5: resumption keeps handshakes short
local exim = peers.exim()
local certs = peers.certs()
WARMUP = 100
pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "starttls", server_name = "localhost",
  ca_file = certs.ca, max_conns = 4, max_messages_per_conn = 5 })
secs, a = soak(pool, TLS_N, body)
st = pool:stats()
pool:close()
b = sample()
exim:stop()
report("exim, STARTTLS", TLS_N, secs, a, b, ("%d TLS handshakes, %d resumed"):format(st.tls_handshakes,
  st.tls_resumed))
