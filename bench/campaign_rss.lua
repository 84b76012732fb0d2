-- `make bench` (campaign memory and cost): the peak RSS and the CPU per row
-- of a campaign process sending a CSV list of 10,000, 100,000 and 1,000,000
-- rows through the C sink, its SQLite journal included, beside the CPU per
-- message of the same messages composed and sent by send_batch (no CSV, no
-- journal) in the same run. The list is streamed, so the peaks should be
-- within a few percent, and the cost per row flat. CAMPAIGN_ROWS changes the
-- sizes. TEXT_JOURNAL_TREE=<a checkout of an earlier smtppool, built> also
-- runs that tree's campaign (its text journal) on the same lists.
-- Usage: lua5.4 bench/campaign_rss.lua SINK            (the parent)
--        lua5.4 bench/campaign_rss.lua --child PORT CSV JOURNAL
--        lua5.4 bench/campaign_rss.lua --batch PORT N
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath

if arg[1] == "--batch" then
  -- the reference: the campaign's messages, composed and sent by send_batch
  local smtppool = require("smtppool")
  local pool = assert(smtppool.new{ host = "127.0.0.1", port = tonumber(arg[2]), tls = "none", max_conns = 4 })
  local n, i = tonumber(arg[3]), 0
  local t0 = os.clock()
  local sum = pool:send_batch(function()
    i = i + 1
    if i > n then return nil end
    return { from = "news@x.test", to = ("user%d@example.net"):format(i), subject = ("Hello Reader %d"):format(i),
             text = ("Dear Reader %d, from City %d."):format(i, i % 97) }
  end)
  pool:close()
  print(sum.sent, 0, os.clock() - t0)
  return
end

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
for n in (os.getenv("CAMPAIGN_ROWS") or "10000,100000,1000000"):gmatch("%d+") do sizes[#sizes + 1] = tonumber(n) end

local dir = peers.sh("mktemp -d /dev/shm/smtppool-bench.XXXXXX 2>/dev/null || mktemp -d"):gsub("%s+$", "")
local pid, port = peers.sink(SINK, dir)
print("campaign memory and cost: one campaign process, CSV streamed, SQLite journal on " .. dir:match("^/[^/]+"))
print("(batch: the same messages composed and sent by send_batch, no CSV, no journal; ratio: row / batch message)")
local OLD = os.getenv("TEXT_JOURNAL_TREE")
print(("%10s %-14s %10s %12s %8s %12s %7s"):format("rows", "run", "sent", "peak RSS KB", "CPU s", "us/row",
  "ratio"))
local peaks = {}
local function child(args, tree)
  local out = peers.sh(("cd %s && lua5.4 %s/bench/campaign_rss.lua %s"):format(peers.quote(tree or "."),
    peers.quote(peers.sh("pwd"):gsub("%s+$", "")), args))
  local sent, hwm, cpu = out:match("(%d+)%s+(%d+)%s+([%d.]+)")
  return sent, tonumber(hwm), tonumber(cpu) or 0
end
for _, n in ipairs(sizes) do
  local csv = dir .. "/list.csv"
  local f = assert(io.open(csv, "wb"))
  f:write("email,name,city\n")
  for i = 1, n do f:write(("user%d@example.net,Reader %d,City %d\n"):format(i, i, i % 97)) end
  f:close()
  local _, _, bcpu = child(("--batch %d %d"):format(port, n))
  local runs = { { "batch", nil, bcpu } }
  for _, which in ipairs(OLD and { "sqlite", "text (earlier)" } or { "sqlite" }) do
    os.remove(dir .. "/j")
    local tree = which ~= "sqlite" and OLD or nil
    local sent, hwm, cpu = child(("--child %d %s %s"):format(port, peers.quote(csv), peers.quote(dir .. "/j")), tree)
    runs[#runs + 1] = { which, sent, cpu, hwm }
    if which == "sqlite" then peaks[#peaks + 1] = hwm end
  end
  for _, r in ipairs(runs) do
    print(("%10d %-14s %10s %12s %8.1f %12.1f %7s"):format(n, r[1], r[2] or n, r[4] or "-", r[3], r[3] * 1e6 / n,
      r[1] == "batch" and "1.00" or ("%.2f"):format(r[3] / bcpu)))
  end
end
if #peaks >= 2 then
  print(("peak RSS, largest list vs smallest: %+.1f %%"):format((peaks[#peaks] - peaks[1]) * 100 / peaks[1]))
end
os.execute("kill " .. pid)
os.execute("rm -rf " .. peers.quote(dir))
