-- `make bench` (campaign memory and cost): the peak RSS and the CPU per row
-- of a campaign process sending a CSV list of 10,000, 100,000 and 1,000,000
-- rows through the C sink, its SQLite journal included, beside the CPU per
-- message of the same messages composed and sent by send_batch (no CSV, no
-- journal) in the same run. The list is streamed, so the peaks should be
-- within a few percent, and the cost per row flat (also printed as the
-- ratio to the batch message, largest list against smallest, which a shared
-- machine's drift between sizes leaves alone). CAMPAIGN_ROWS changes the
-- sizes, CAMPAIGN_ROUNDS the rounds a size is run (alternating the batch and
-- the campaign; by default about 300,000 rows' worth, from 2 to 9 rounds:
-- 9 at 10,000 rows, whose runs last a second, 3 at 100,000, 2 at a
-- million, where one round moved by 0.2 between runs): the medians and the
-- ratio's spread are printed, and the ratio
-- of the least CPU of each (the host of this virtual machine only ever adds
-- time: the least of several rounds is the figure it disturbed least).
-- TEXT_JOURNAL_TREE=<a checkout of an earlier smtppool, built> also
-- runs that tree's campaign (its text journal) on the same lists;
-- CAMPAIGN_NO_JOURNAL=1 also runs the campaign without a journal (its
-- rows deduplicated in a temporary database, nothing written to the disk):
-- what the journal's durability costs.
-- Usage: lua5.4 bench/campaign_rss.lua SINK            (the parent)
--        lua5.4 bench/campaign_rss.lua --child PORT CSV JOURNAL   (JOURNAL "-": none)
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
  local journal = arg[4] ~= "-" and arg[4] or nil
  local report = assert(smtppool.campaign{ pool = pool, recipients = arg[3], journal = journal, progress = false,
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
print("(each size in rounds alternating the two, about 300,000 rows' worth, 2 to 9 rounds, CAMPAIGN_ROUNDS to change:")
print(" medians, and the ratio's spread over the rounds)")
print(("%10s %-14s %10s %12s %8s %12s %7s"):format("rows", "run", "sent", "peak RSS KB", "CPU s", "us/row",
  "ratio"))
local peaks = {}
local function child(args, tree)
  local out = peers.sh(("cd %s && lua5.4 %s/bench/campaign_rss.lua %s"):format(peers.quote(tree or "."),
    peers.quote(peers.sh("pwd"):gsub("%s+$", "")), args))
  local sent, hwm, cpu = out:match("(%d+)%s+(%d+)%s+([%d.]+)")
  return sent, tonumber(hwm), tonumber(cpu) or 0
end
local function median(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  local n = #c
  if n % 2 == 0 then return (c[n // 2] + c[n // 2 + 1]) / 2 end -- of two rounds, their mean, not the lower
  return c[(n + 1) // 2]
end
local per_row, row_ratio, least_ratio = {}, {}, {}
for _, n in ipairs(sizes) do
  local csv = dir .. "/list.csv"
  local f = assert(io.open(csv, "wb"))
  f:write("email,name,city\n")
  for i = 1, n do f:write(("user%d@example.net,Reader %d,City %d\n"):format(i, i, i % 97)) end
  f:close()
  -- rounds alternate the batch and the campaign, so a slow spell of a shared
  -- machine falls on both; each ratio is a round's own
  local rounds = tonumber(os.getenv("CAMPAIGN_ROUNDS")) or math.max(2, math.min(9, 300000 // n))
  local kinds = OLD and { "sqlite", "text (earlier)" } or { "sqlite" }
  if os.getenv("CAMPAIGN_NO_JOURNAL") == "1" then kinds[#kinds + 1] = "no journal" end
  local cpu, ratios, sent, hwm = { batch = {} }, {}, {}, {}
  for _, which in ipairs(kinds) do cpu[which], ratios[which] = {}, {} end
  for _ = 1, rounds do
    local _, _, bcpu = child(("--batch %d %d"):format(port, n))
    table.insert(cpu.batch, bcpu)
    for _, which in ipairs(kinds) do
      os.remove(dir .. "/j")
      local tree = which ~= "sqlite" and OLD or nil
      local j = which == "no journal" and "-" or peers.quote(dir .. "/j")
      local s1, h, c = child(("--child %d %s %s"):format(port, peers.quote(csv), j), tree)
      table.insert(cpu[which], c)
      table.insert(ratios[which], c / bcpu)
      sent[which] = s1
      hwm[which] = math.max(hwm[which] or 0, h or 0)
    end
  end
  peaks[#peaks + 1] = hwm.sqlite
  per_row[#per_row + 1] = median(cpu.sqlite) * 1e6 / n
  row_ratio[#row_ratio + 1] = median(ratios.sqlite)
  -- the least CPU of a kind over the rounds, against the batch's
  local function least(which) return math.min(table.unpack(cpu[which])) / math.min(table.unpack(cpu.batch)) end
  least_ratio[#least_ratio + 1] = least("sqlite")
  print(("%10d %-14s %10s %12s %8.1f %12.1f %7s"):format(n, "batch", n, "-", median(cpu.batch),
    median(cpu.batch) * 1e6 / n, "1.00"))
  for _, which in ipairs(kinds) do
    local r = ratios[which]
    local lo, hi = math.min(table.unpack(r)), math.max(table.unpack(r))
    print(("%10d %-14s %10s %12s %8.1f %12.1f %7.2f%s"):format(n, which, sent[which] or "?", hwm[which] or "-",
      median(cpu[which]), median(cpu[which]) * 1e6 / n, median(r),
      #r > 1 and ("  (%d rounds, %.2f-%.2f; least CPU / least CPU: %.2f)"):format(#r, lo, hi, least(which)) or ""))
  end
end
if #peaks >= 2 then
  print(("peak RSS, largest list vs smallest: %+.1f %%"):format((peaks[#peaks] - peaks[1]) * 100 / peaks[1]))
  print(("campaign CPU per row, largest list vs smallest: %+.1f %%"):format(
    (per_row[#per_row] - per_row[1]) * 100 / per_row[1]))
  -- the batch's own cost per message drifts between sizes on a shared
  -- machine (it has no list and no journal): the ratio takes that out
  print(("campaign row / batch message, largest list vs smallest: %+.1f %% (medians), %+.1f %% (least CPU)"):format(
    (row_ratio[#row_ratio] - row_ratio[1]) * 100 / row_ratio[1],
    (least_ratio[#least_ratio] - least_ratio[1]) * 100 / least_ratio[1]))
end
os.execute("kill " .. pid)
os.execute("rm -rf " .. peers.quote(dir))
