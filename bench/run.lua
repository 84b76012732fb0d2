-- `make bench`: smtppool against a peer client (Python's smtplib), side by
-- side in one run against the same C sink, so the ratio means something on
-- a shared, noisy machine. Prints a table; nothing is written to the tree.
-- `make bench BASELINE=dir` adds the same sends through an older checkout
-- (built with make) and this tree, interleaved, and prints the difference.
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local peers = require("peers")

local N = tonumber(os.getenv("BENCH_N")) or 5000
local SIZE = tonumber(os.getenv("BENCH_SIZE")) or 2048
local SINK = arg[1] or "build/sink"

local dir = peers.tmpdir()
local pid, port = peers.sink(SINK, dir)

local send_loop = dofile("bench/send_loop.lua")
local function run_smtppool(conns, per_conn)
  return send_loop(smtppool, port, conns, per_conn, N, SIZE)
end

local function run_smtplib()
  local out = peers.sh(("/usr/bin/python3 bench/peer_smtplib.py %d %d %d"):format(port, N, SIZE))
  return assert(tonumber(out), "smtplib: " .. out)
end

local rows = {}
local function row(name, secs, slowest)
  rows[#rows + 1] = { name, secs, slowest }
end
-- interleaved, best of three each, to damp the noise of a shared machine
local best, worst = {}, {}
local cases = {
  { "smtplib, 1 connection (peer)", run_smtplib },
  { "smtppool, 1 connection", function() return run_smtppool(1) end },
  { "smtppool, 4 connections", function() return run_smtppool(4) end },
  { "smtppool, 4 connections, rotate every 5", function() return run_smtppool(4, 5) end },
}
-- BASELINE=dir (an older checkout, built): the same sends through that tree
-- and through this one, each in its own process, interleaved with the rest.
local BASELINE = os.getenv("BASELINE")
if BASELINE == "" then BASELINE = nil end
local function run_tree(tree, conns, per)
  local out = peers.sh(("lua5.4 bench/send_tree.lua %s %d %d %d %d %d"):format(peers.quote(tree), port, conns, per,
    N, SIZE))
  return assert(tonumber(out), tree .. ": " .. out)
end
if BASELINE then
  local here = peers.sh("pwd"):gsub("%s+$", "")
  for _, c in ipairs({ { 1, 0 }, { 4, 0 }, { 4, 5 } }) do
    local what = ("%d connection%s%s"):format(c[1], c[1] > 1 and "s" or "", c[2] > 0 and ", rotate every 5" or "")
    cases[#cases + 1] = { "baseline, " .. what, function() return run_tree(BASELINE, c[1], c[2]) end }
    cases[#cases + 1] = { "this tree, " .. what, function() return run_tree(here, c[1], c[2]) end }
  end
end
for _ = 1, 3 do
  for _, c in ipairs(cases) do
    local s = c[2]()
    best[c[1]] = math.min(best[c[1]] or math.huge, s)
    worst[c[1]] = math.max(worst[c[1]] or 0, s)
  end
end
for _, c in ipairs(cases) do row(c[1], best[c[1]], worst[c[1]]) end
os.execute("kill " .. pid)
os.execute("rm -rf " .. peers.quote(dir))

local base = rows[1][2]
print(("%d messages of %d bytes to a C sink on loopback (3 rounds, interleaved; best, and the spread)"):format(N, SIZE))
print(("%-42s %10s %12s %16s %8s"):format("client", "seconds", "messages/s", "spread msg/s", "vs peer"))
local by_name = {}
for _, r in ipairs(rows) do
  by_name[r[1]] = r
  print(("%-42s %10.3f %12.0f %7.0f-%-8.0f %7.2fx"):format(r[1], r[2], N / r[2], N / r[3], N / r[2], base / r[2]))
end
if BASELINE then
  print(("this tree against the baseline (%s), best against best:"):format(BASELINE))
  for _, r in ipairs(rows) do
    local what = r[1]:match("^this tree, (.*)$")
    if what then
      print(("  %-40s %+6.1f %%"):format(what, (by_name["baseline, " .. what][2] / r[2] - 1) * 100))
    end
  end
end

-- Memory: peak RSS of a process sending one message with a 1 MB and a 20 MB
-- attachment, streamed from disk (path) and loaded into Lua (data).
local d = peers.tmpdir()
local pid2, port2 = peers.sink(SINK, d)
print()
print("peak RSS sending one message with an attachment (KB)")
print(("%-12s %12s %12s"):format("attachment", "path", "data"))
local peak = {}
for _, mb in ipairs({ 1, 20 }) do
  local file = ("%s/blob%d"):format(d, mb)
  os.execute(("head -c %d /dev/urandom > %s"):format(mb * 1024 * 1024, peers.quote(file)))
  local row = {}
  for _, how in ipairs({ "path", "data" }) do
    row[how] = tonumber(peers.sh(("%s bench/send_one.lua %d %s %s"):format(arg[-1] or "lua5.4", port2, file, how)))
  end
  peak[mb] = row
  print(("%-12s %12d %12d"):format(mb .. " MB", row.path, row.data))
end
print(("growth from 1 MB to 20 MB: path %+d KB, data %+d KB"):format(peak[20].path - peak[1].path,
  peak[20].data - peak[1].data))
os.execute("kill " .. pid2)
os.execute("rm -rf " .. peers.quote(d))
