-- `make bench` (campaign memory): the peak RSS of a campaign process sending
-- a CSV list of 100,000 and of 1,000,000 rows through the C sink, journal
-- included. The list is streamed, so the two peaks should be within a few
-- percent. CAMPAIGN_ROWS="100000,1000000" changes the sizes.
-- Usage: lua5.4 bench/campaign_rss.lua SINK            (the parent)
--        lua5.4 bench/campaign_rss.lua --child PORT CSV JOURNAL
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "lua/?.so;" .. package.cpath

if arg[1] == "--child" then
  local smtppool = require("smtppool")
  local pool = assert(smtppool.new{ host = "127.0.0.1", port = tonumber(arg[2]), tls = "none", max_conns = 4 })
  local t0 = os.clock()
  local report = assert(smtppool.campaign{ pool = pool, recipients = arg[3], journal = arg[4], progress = false,
    message = { from = "news@x.test", subject = "Hello {{name}}", text = "Dear {{name}}, from {{city}}." } }:run())
  pool:close()
  local hwm = tonumber(io.open("/proc/self/status"):read("a"):match("VmHWM:%s*(%d+)"))
  print(report.sent, hwm, os.clock() - t0)
  return
end

local peers = require("peers")
local SINK = arg[1] or "build/sink"
local sizes = {}
for n in (os.getenv("CAMPAIGN_ROWS") or "100000,1000000"):gmatch("%d+") do sizes[#sizes + 1] = tonumber(n) end

local dir = peers.sh("mktemp -d /dev/shm/smtppool-bench.XXXXXX 2>/dev/null || mktemp -d"):gsub("%s+$", "")
local pid, port = peers.sink(SINK, dir)
print("campaign memory: peak RSS of one campaign process, CSV streamed, journal on " .. dir:match("^/[^/]+"))
print(("%12s %12s %14s %12s"):format("rows", "sent", "peak RSS KB", "CPU s"))
local peaks = {}
for _, n in ipairs(sizes) do
  local csv = dir .. "/list.csv"
  local f = assert(io.open(csv, "wb"))
  f:write("email,name,city\n")
  for i = 1, n do f:write(("user%d@example.net,Reader %d,City %d\n"):format(i, i, i % 97)) end
  f:close()
  os.remove(dir .. "/j")
  local out = peers.sh(("lua5.4 bench/campaign_rss.lua --child %d %s %s"):format(port, peers.quote(csv),
    peers.quote(dir .. "/j")))
  local sent, hwm, cpu = out:match("(%d+)%s+(%d+)%s+([%d.]+)")
  peaks[#peaks + 1] = tonumber(hwm)
  print(("%12d %12s %14s %12.1f"):format(n, sent or "?", hwm or "?", tonumber(cpu) or 0))
end
if #peaks >= 2 then
  print(("peak RSS, largest list vs smallest: %+.1f %%"):format((peaks[#peaks] - peaks[1]) * 100 / peaks[1]))
end
os.execute("kill " .. pid)
os.execute("rm -rf " .. peers.quote(dir))
