-- `make bench` (a real link): messages per round trip through a delay proxy
-- (tests/support/tcpproxy.py: this kernel has no netem) in front of the C
-- sink, one connection, uncapped and rotating every 5, with Python's smtplib
-- as the peer. Over DATA the floor is one round trip per message (MAIL, RCPT,
-- DATA pipelined behind the previous final dot); with CHUNKING (the sink
-- started as `sink chunking`), a window of BDAT transactions per round trip.
-- Then 4 connections capped at 5 messages a session (the socket ceiling,
-- max_conns = 4, rotate_ahead = 0) over DATA and over BDAT (window 4),
-- against the bound that ceiling allows: 4 sockets x 5 messages per
-- (5 x the time per message on one uncapped connection + the handshake
-- time, from connect to ready, measured in the capped runs), beside the
-- uncapped figure on 4 connections.
-- Usage: lua5.4 bench/link.lua SINK   (LINK_RTT_MS=20, LINK_N=300)
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local peers = require("peers")
local send_loop = dofile("bench/send_loop.lua")

local RTT = (tonumber(os.getenv("LINK_RTT_MS")) or 20) / 1000
local N = tonumber(os.getenv("LINK_N")) or 300
local SIZE = 1024
local SINK = arg[1] or "build/sink"

local dir = peers.tmpdir()
local pid, port = peers.sink(SINK, dir)
local proxy = peers.proxy(port, RTT / 2)
-- the same sink offering CHUNKING, behind its own delay line
local cdir = peers.tmpdir()
local cpid, cport = peers.sink(SINK, cdir, "chunking")
local cproxy = peers.proxy(cport, RTT / 2)

local cases = {
  { "smtplib, 1 connection (peer)", function()
    local out = peers.sh(("/usr/bin/python3 bench/peer_smtplib.py %d %d %d"):format(proxy.port, N, SIZE))
    return assert(tonumber(out), "smtplib: " .. out)
  end },
  { "smtppool, 1 connection", function() return send_loop(smtppool, proxy.port, 1, nil, N, SIZE) end },
  { "smtppool, 1 connection, rotate every 5", function() return send_loop(smtppool, proxy.port, 1, 5, N, SIZE) end },
}
for _, w in ipairs({ 2, 4, 8, 16 }) do
  cases[#cases + 1] = { ("smtppool, BDAT window %d"):format(w), function()
    return send_loop(smtppool, cproxy.port, 1, nil, N, SIZE, { bdat_window = w })
  end }
end
cases[#cases + 1] = { "smtppool, BDAT window 4, rotate every 5", function()
  return send_loop(smtppool, cproxy.port, 1, 5, N, SIZE, { bdat_window = 4 })
end }
-- 4 connections, capped or not; the handshakes (connect to ready) are noted
local handshakes = { data = {}, bdat = {} }
local function four(port, cap, extra, hs)
  local core = require("smtppool.core")
  local opened = {}
  local o = { on_event = function(ev)
    if ev.type == "connect" then opened[ev.conn] = core.now()
    elseif ev.type == "ready" and opened[ev.conn] and hs then hs[#hs + 1] = core.now() - opened[ev.conn] end
  end }
  for k, v in pairs(extra or {}) do o[k] = v end
  return send_loop(smtppool, port, 4, cap, N, SIZE, o)
end
local ceiling = {
  { "DATA, 4 connections", "smtppool, 1 connection", function() return four(proxy.port) end,
    function() return four(proxy.port, 5, nil, handshakes.data) end, handshakes.data },
  { "BDAT window 4, 4 connections", "smtppool, BDAT window 4", function() return four(cproxy.port, nil, { bdat_window = 4 }) end,
    function() return four(cproxy.port, 5, { bdat_window = 4 }, handshakes.bdat) end, handshakes.bdat },
}
for _, c in ipairs(ceiling) do
  cases[#cases + 1] = { c[1] .. ", uncapped", c[3], hidden = true }
  cases[#cases + 1] = { c[1] .. ", capped at 5", c[4], hidden = true }
  -- the same with rotate_ahead (extra sockets past max_conns, opened by time)
  local extra = { rotate_ahead = 5, bdat_window = c[1]:find("BDAT") and 4 or nil }
  local port = c[1]:find("BDAT") and cproxy.port or proxy.port
  cases[#cases + 1] = { c[1] .. ", capped at 5, rotate_ahead", function() return four(port, 5, extra) end,
    hidden = true }
end

local times = {}
for _ = 1, 3 do -- interleaved rounds
  for _, c in ipairs(cases) do
    local t = times[c[1]] or {}
    times[c[1]] = t
    t[#t + 1] = c[2]()
  end
end
proxy:stop()
cproxy:stop()
os.execute("kill " .. pid .. " " .. cpid)
os.execute("rm -rf " .. peers.quote(dir) .. " " .. peers.quote(cdir))

print(("%d messages of ~%d bytes through a link with a %.0f ms round trip (3 interleaved rounds; median and spread)")
  :format(N, SIZE, RTT * 1000))
print(("%-40s %10s %16s %14s"):format("client", "msg/s", "spread msg/s", "msg per RTT"))
local function median(t)
  table.sort(t)
  return t[math.floor((#t + 1) / 2)]
end
for _, c in ipairs(cases) do
  if not c.hidden then
    local t = times[c[1]]
    table.sort(t)
    local med = t[2]
    print(("%-40s %10.1f %7.1f-%-8.1f %14.2f"):format(c[1], N / med, N / t[3], N / t[1], N / med * RTT))
  end
end
print()
print("4 connections capped at 5 messages a session (max_conns = 4: the socket ceiling) against the bound it allows")
print(("%-30s %9s %16s %9s %13s %9s %7s"):format("", "msg/s", "spread msg/s", "uncapped", "handshake ms",
  "bound", "ratio"))
for _, c in ipairs(ceiling) do
  local t = times[c[1] .. ", capped at 5"]
  table.sort(t)
  local per_msg = median(times[c[2]]) / N -- one uncapped connection's time per message
  local hs = median(c[5])
  local bound = 4 * 5 / (5 * per_msg + hs)
  print(("%-30s %9.1f %7.1f-%-8.1f %9.1f %13.1f %9.1f %7.2f"):format(c[1], N / t[2], N / t[3], N / t[1],
    N / median(times[c[1] .. ", uncapped"]), hs * 1000, bound, N / t[2] / bound))
  local a = times[c[1] .. ", capped at 5, rotate_ahead"]
  table.sort(a)
  print(("%-30s %9.1f %7.1f-%-8.1f %9s %13s %9s %7.2f"):format("  the same, rotate_ahead = 5", N / a[2], N / a[3],
    N / a[1], "", "", "", N / a[2] / bound))
end
