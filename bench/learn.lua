-- `make bench` (limits it learns): a fault server that limits 2 concurrent
-- sessions (432 at the greeting), 200 MAILs a second (454) and 5 messages
-- a session (421), over BDAT, against a pool told nothing (max_conns = 8)
-- and one told the limits (2 connections, 195 a second, cap 5), side by
-- side in interleaved rounds. Prints throughput (median and spread), what
-- failed, and how often the server refused a connection or throttled MAIL.
-- Usage: lua5.4 bench/learn.lua   (LEARN_N=2000, LEARN_ROUNDS=3)
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local peers = require("peers")

local N = tonumber(os.getenv("LEARN_N")) or 2000
local ROUNDS = tonumber(os.getenv("LEARN_ROUNDS")) or 3
local SCRIPT = { max_sessions = 2, mail_per_sec = 200, max_tx_per_session = 5, chunking = true,
  sessions_reply = "432 4.3.2 Concurrent connections limit exceeded",
  rate_reply = "454 4.7.0 Throttling failure: Maximum sending rate exceeded",
  cap_reply = "421 4.7.0 Maximum message count per session reached" }

local msgs = {}
for i = 1, N do msgs[i] = { from = "a@x.test", to = { ("r%d@y.test"):format(i) }, subject = "s", text = "hi " .. i } end

local function run(opts)
  local f = peers.fault(SCRIPT)
  local o = { host = "127.0.0.1", port = f.port, tls = "none" }
  for k, v in pairs(opts) do o[k] = v end
  local pool = assert(smtppool.new(o))
  local t0 = pool.driver.now()
  local sum = pool:send_batch(msgs)
  local secs = pool.driver.now() - t0
  pool:close()
  local c = { connect = 0, over_sessions = 0, throttle = 0, cap = 0, mail = 0 }
  for _, e in ipairs(f:events()) do
    if c[e.ev] then c[e.ev] = c[e.ev] + 1 end
    if e.ev == "cmd" and e.cmd == "MAIL" then c.mail = c.mail + 1 end
  end
  f:stop()
  return { secs = secs, sent = sum.sent, failed = sum.failed, c = c }
end

local cases = {
  { "untold, max_conns = 8", { max_conns = 8 } },
  { "told: 2 conns, 195/s, cap 5", { max_conns = 2, max_messages_per_conn = 5, rate = { messages_per_sec = 195 } } },
}
local res = {}
for _ = 1, ROUNDS do
  for _, c in ipairs(cases) do
    res[c[1]] = res[c[1]] or {}
    table.insert(res[c[1]], run(c[2]))
  end
end

print(("%d messages, fault server limiting 2 sessions, 200 MAIL/s, 5 a session, over BDAT (%d rounds; median and spread)")
  :format(N, ROUNDS))
print(("%-30s %8s %15s %7s %7s %15s %14s %12s"):format("pool", "msg/s", "spread", "sent", "failed",
  "conns refused", "MAIL throttled", "sessions cap"))
local med = {}
for _, c in ipairs(cases) do
  local r = res[c[1]]
  table.sort(r, function(a, b) return a.secs < b.secs end)
  local m = r[math.floor((#r + 1) / 2)]
  med[c[1]] = N / m.secs
  print(("%-30s %8.1f %7.1f-%-7.1f %7d %7d %7d of %-5d %6d of %-5d %5d of %-4d"):format(c[1], N / m.secs,
    N / r[#r].secs, N / r[1].secs, m.sent, m.failed, m.c.over_sessions, m.c.connect, m.c.throttle, m.c.mail,
    m.c.cap, m.c.connect - m.c.over_sessions))
end
print(("untold / told throughput: %.2f"):format(med[cases[1][1]] / med[cases[2][1]]))
