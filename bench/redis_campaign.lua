-- `make bench` (Redis): one campaign, four worker processes, shared through
-- a real redis-server, against exim capped at 5 messages a session; one
-- worker is killed with SIGKILL mid-run. Prints the throughput, and checks
-- in exim's log that every recipient arrived exactly once, except those
-- marked ambiguous (at most the dead worker's connections). Then four
-- processes share an AUTH window through Redis against the fault server:
-- the logins in any window (the server's log) and the throughput against
-- the window's ceiling.
-- Usage: lua5.4 bench/redis_campaign.lua   (REDIS_BENCH_N=20000)
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local peers = require("peers")
local core = require("smtppool.core")
local rcampaign = require("smtppool.campaign.redis")

local N = tonumber(os.getenv("REDIS_BENCH_N")) or 20000
if not os.execute("command -v redis-server >/dev/null 2>&1") then
  print("redis campaign: redis-server is not installed (make deps); skipped")
  return
end

local redis = peers.redis({ persist = true })
local exim = peers.exim({ max_per_conn = 5 })
local dir = peers.tmpdir()
peers.write_list(dir .. "/list.csv", "b", 1, N)

local function worker(i, list)
  return tonumber(peers.sh(("lua5.4 tests/support/rcampaign_child.lua %d %d bench %s 2 30 >%s/w%d 2>&1 & echo $!")
    :format(exim.port, redis.port, list or "-", dir, i)):match("%d+"))
end
local t0 = core.now()
local pids = { worker(1, dir .. "/list.csv") }
peers.wait_for(function()
  local st = rcampaign.status("redis://127.0.0.1:" .. redis.port, "bench")
  return st and st.total == N
end, 120, "the list to be loaded")
for i = 2, 4 do pids[i] = worker(i) end
peers.wait_for(function() return #exim:log_lines("<= news@x%.test") >= N // 3 end, 600, "a third of the campaign")
os.execute("kill -9 " .. pids[2])
local killed_at = #exim:log_lines("<= news@x%.test")
for i = 1, 4 do
  if i ~= 2 then
    peers.wait_for(function() return (peers.read_file(dir .. "/w" .. i) or ""):match("^sent") end, 900, "worker " .. i)
  end
end
local elapsed = core.now() - t0
local st = assert(rcampaign.status("redis://127.0.0.1:" .. redis.port, "bench", 100))
exim:wait_deliveries(st.sent, 300)
local amb = {}
for _, f in ipairs(st.failures) do if f.letter == "A" then amb[f.address] = true end end
local once, missing, doubled, bad = 0, 0, 0, 0
local counts = {}
for addr in exim:mainlog():gmatch("=> %S+ <([^>]+)>") do counts[addr] = (counts[addr] or 0) + 1 end
for i = 1, N do
  local a = ("b%d@y.test"):format(i)
  local c = counts[a] or 0
  if c == 1 then once = once + 1
  elseif c == 0 then missing = missing + 1
  else doubled = doubled + 1 end
  if c ~= 1 and not amb[a] then bad = bad + 1 end
end
print(("redis campaign: %d recipients, 4 workers (2 connections each), exim capped at 5 a session; worker 2 "
  .. "killed with SIGKILL after %d messages"):format(N, killed_at))
print(("  %.1f s, %.0f msg/s; sent %d, ambiguous %d (the dead worker had 2 connections), failed %d"):format(
  elapsed, st.sent / elapsed, st.sent, st.ambiguous, st.failed))
print(("  exim: %d delivered once, %d missing, %d twice or more; outside the ambiguous ones: %d %s"):format(once,
  missing, doubled, bad, bad == 0 and "(exactly once)" or "(WRONG)"))
for _, w in ipairs(st.workers) do print(("  worker %s: %d sent"):format(w.name, w.sent)) end
exim:stop()

-- An AUTH window shared by four processes: the server's log, and throughput against the ceiling.
local f = peers.fault({ xoauth2_tokens = { "good" } })
local LIMIT, PER, EACH = 10, 1, 20
local cmds = {}
for i = 1, 4 do
  cmds[#cmds + 1] = ("lua5.4 -e 'AUTH_WINDOW={%d,%d}' tests/support/redis_child.lua %d %d authbench %d 4 1 a%d >%s/a%d 2>&1 &")
    :format(LIMIT, PER, f.port, redis.port, EACH, i, dir, i)
end
local a0 = core.now()
os.execute(table.concat(cmds, " ") .. " wait")
local took = core.now() - a0
local times = {}
for _, e in ipairs(f:select("auth")) do times[#times + 1] = e.t end
local most = peers.max_in_window(times, PER)
-- the ceiling: LIMIT logins at once, then LIMIT more each PER seconds
local ceiling = #times <= LIMIT and #times or (#times - LIMIT) / LIMIT * PER
print(("auth window {%d, %ds} shared by 4 processes: %d logins in %.2f s, at most %d in any %ds window; "
  .. "throughput %.0f %% of the window's ceiling"):format(LIMIT, PER, #times, took, most, PER,
  ceiling / took * 100))
f:stop()
redis:stop()
os.execute("rm -rf " .. peers.quote(dir))
