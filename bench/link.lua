-- `make bench` (a real link): messages per round trip through a delay proxy
-- (tests/support/tcpproxy.py: this kernel has no netem) in front of the C
-- sink, one connection, uncapped and rotating every 5, with Python's smtplib
-- as the peer. Over DATA the floor is one round trip per message (MAIL, RCPT,
-- DATA pipelined behind the previous final dot); with CHUNKING (the sink
-- started as `sink chunking`), a window of BDAT transactions per round trip.
-- Usage: lua5.4 bench/link.lua SINK   (LINK_RTT_MS=21, LINK_N=300)
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local peers = require("peers")
local send_loop = dofile("bench/send_loop.lua")

local RTT = (tonumber(os.getenv("LINK_RTT_MS")) or 21) / 1000
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
for _, c in ipairs(cases) do
  local t = times[c[1]]
  table.sort(t)
  local med = t[2]
  print(("%-40s %10.1f %7.1f-%-8.1f %14.2f"):format(c[1], N / med, N / t[3], N / t[1], N / med * RTT))
end
