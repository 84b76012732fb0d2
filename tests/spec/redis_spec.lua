-- Limits shared through Redis (a real redis-server on a free port): the
-- windows, the sockets open and the learned cap hold across processes, and
-- an unreachable Redis pauses sending instead of falling back.
local peers = require("peers")
local smtppool = require("smtppool")
local core = require("smtppool.core")

local max_in_window = peers.max_in_window

-- Runs children at once; returns their outputs.
local function children(list)
  local dir = peers.tmpdir()
  local cmds = {}
  for i, args in ipairs(list) do
    cmds[#cmds + 1] = ("lua5.4 tests/support/redis_child.lua %s >%s/%d.out 2>&1 &"):format(args, dir, i)
  end
  os.execute(table.concat(cmds, " ") .. " wait")
  local outs = {}
  for i = 1, #list do outs[i] = peers.read_file(dir .. "/" .. i .. ".out") or "" end
  os.execute("rm -rf " .. peers.quote(dir))
  return outs
end

describe("RESP through hiredis", function()
  it("reads replies fed in pieces, errors as values, and refuses malformed bytes", function()
    local r = core.resp_reader()
    r:feed("*3\r\n$3\r\nfoo\r\n:4")
    assert.is_nil(r:next())
    r:feed("2\r\n$-1\r\n-ERR wrong\r\n+OK\r\n")
    local ok, v = r:next()
    assert.is_true(ok)
    assert.same({ "foo", 42, false }, v)
    assert.same({ true, { err = "ERR wrong" } }, { r:next() })
    assert.same({ true, "OK" }, { r:next() })
    local bad = core.resp_reader()
    bad:feed("?what\r\n")
    local v2, err = bad:next()
    assert.is_nil(v2)
    assert.matches("malformed reply from redis", err)
    assert.equal("*2\r\n$3\r\nGET\r\n$2\r\nk\n\r\n", core.resp_command("GET", "k\n"))
  end)
end)

describe("limits in Redis", function()
  local redis
  setup(function() redis = peers.redis() end)
  teardown(function() redis:stop() end)

  it("holds a connection window across two processes", function()
    local f = peers.fault({})
    finally(function() f:stop() end)
    local outs = children({
      ("%d %d win1 9 1 1 a"):format(f.port, redis.port),
      ("%d %d win1 9 1 1 b"):format(f.port, redis.port),
    })
    for _, o in ipairs(outs) do assert.matches("^sent 9 ", o) end
    local times = {}
    for _, e in ipairs(f:select("connect")) do times[#times + 1] = e.t end
    assert.equal(18, #times) -- one connection per message
    -- {3, 1}: 3 in any second, counted by the server (a hair of slack for its own scheduling)
    assert.is_true(max_in_window(times, 0.95) <= 3, "the shared window was exceeded")
  end)

  it("counts max_conns as sockets across processes", function()
    local f = peers.fault({})
    local proxy = peers.proxy(f.port)
    finally(function() proxy:stop() f:stop() end)
    local outs = children({
      ("%d %d conns1 12 1 3 c"):format(proxy.port, redis.port),
      ("%d %d conns1 12 1 3 d"):format(proxy.port, redis.port),
    })
    for _, o in ipairs(outs) do assert.matches("^sent 12 ", o) end
    assert.equal(1, (proxy:most_open()))
    assert.equal(24, #f:select("message"))
  end)

  it("shares a learned cap between pools of one key", function()
    local f = peers.fault({ max_tx_per_session = 3, cap_close = true })
    finally(function() f:stop() end)
    local function new()
      return assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none",
        rate = { backend = "redis://127.0.0.1:" .. redis.port, key = "cap1" } })
    end
    local a = new()
    for i = 1, 18 do
      assert.truthy(a:send_raw{ from = "a@x.test", to = "c" .. i .. "@y.test", data = "Subject: c\r\n\r\nx\r\n" })
    end
    assert.equal(3, a:stats().learned_cap)
    a:close()
    local b = new()
    assert.equal(3, b:stats().learned_cap) -- never sent a message
    b:close()
  end)

  it("pauses while Redis is unreachable, says so, and goes on when it is back", function()
    local f = peers.fault({})
    local r2 -- started by the hook, on the port the pool was given
    local port = peers.free_port()
    finally(function() f:stop() if r2 then r2:stop() end end)
    local events = {}
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none",
      rate = { backend = "redis://127.0.0.1:" .. port, key = "down1", connections = { 5, 1 } },
      on_event = function(ev)
        if ev.type == "limits_unavailable" then
          events[#events + 1] = ev.type
          assert.equal(0, #f:select("connect")) -- nothing opened without the shared limits
          r2 = peers.redis({ port = port })
        elseif ev.type == "limits_available" then
          events[#events + 1] = ev.type
        end
      end })
    local res, err = pool:send_raw{ from = "a@x.test", to = "d@y.test", data = "Subject: d\r\n\r\nx\r\n" }
    pool:close()
    assert.truthy(res, tostring(err))
    assert.same({ "limits_unavailable", "limits_available" }, events)
    assert.equal(1, #f:select("message"))
  end)

  it("keeps serving its SMTP connections while Redis hangs for 5 s, then sends the rest once", function()
    -- Redis stopped (SIGSTOP: connections hang, no refusal) while messages
    -- are on the wire: the pool's wait for a Redis reply is a task's wait
    -- on the loop, so the messages in flight reach the server at once
    -- instead of when the Redis call gives up; nothing is lost or doubled.
    local r = peers.redis()
    local f = peers.fault({})
    finally(function()
      os.execute("kill -CONT " .. r.pid .. " 2>/dev/null")
      f:stop()
      r:stop()
    end)
    local function wall() return tonumber((peers.sh("date +%s.%N"):gsub("%s+$", ""))) end
    local discards, t_stop = 0, nil
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 2,
      rate = { backend = "redis://127.0.0.1:" .. r.port, key = "hang1", messages = { 100000, 1 } },
      on_event = function(ev) if ev.type == "discard" then discards = discards + 1 end end })
    local n, i = 60, 0
    local outcomes = {}
    local sum = pool:send_batch(function()
      i = i + 1
      if i > n then return nil end
      if i == 25 then
        os.execute(("kill -STOP %d; (sleep 5; kill -CONT %d) >/dev/null 2>&1 &"):format(r.pid, r.pid))
        t_stop = wall()
      end
      return { from = "a@x.test", to = ("h%d@y.test"):format(i), subject = "s", text = "m" .. i }
    end, { on_result = function(m, res, e) outcomes[#outcomes + 1] = { m.to, res ~= nil, e } end })
    pool:close()
    assert.equal(n, sum.sent)
    assert.equal(0, discards) -- no session was lost to the pause
    local seen, during, before = {}, 0, 0
    for _, e in ipairs(f:select("message")) do
      for _, rc in ipairs(e.rcpt) do seen[rc] = (seen[rc] or 0) + 1 end
      if e.t > t_stop and e.t < t_stop + 1.5 then during = during + 1 end
      if e.t <= t_stop then before = before + 1 end
    end
    assert.equal(n, #f:select("message"))
    for k = 1, n do assert.equal(1, seen[("h%d@y.test"):format(k)]) end
    -- messages that were on the wire when Redis stopped arrived during the
    -- pause (a blocking client would have held them for its 2 s timeout)
    assert.is_true(during >= 1, ("arrived before the stop %d, in the 1.5 s after it %d"):format(before, during))
    for _, o in ipairs(outcomes) do assert.is_true(o[2], tostring(o[3])) end
  end)

  it("runs a Redis campaign's round trips on the pool's loop: a 5 s hang loses no session and no recipient", function()
    -- the claims, L marks and outcomes of a campaign in Redis wait aside
    -- on the loop, so the connections are served during the pause (no
    -- session is lost) and the messages whose marks were written reach
    -- the server; every recipient arrives once
    local r = peers.redis()
    local f = peers.fault({})
    finally(function()
      os.execute("kill -CONT " .. r.pid .. " 2>/dev/null")
      f:stop()
      r:stop()
    end)
    local function wall() return tonumber((peers.sh("date +%s.%N"):gsub("%s+$", ""))) end
    local discards, t_stop = 0, nil
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 4,
      on_event = function(ev) if ev.type == "discard" then discards = discards + 1 end end })
    local n, rows = 60, {}
    for i = 1, n do rows[i] = { email = ("c%d@y.test"):format(i), n = i } end
    local big = ("x"):rep(76) .. "\n"
    big = big:rep(3000) -- about 230 KB: a message is on the wire a while
    local report = assert(smtppool.campaign{ pool = pool, recipients = rows, progress = false,
      journal = "redis://127.0.0.1:" .. r.port, name = "hang", allow_volatile_redis = true,
      message = function(row)
        if row.n == 25 then
          os.execute(("kill -STOP %d; (sleep 5; kill -CONT %d) >/dev/null 2>&1 &"):format(r.pid, r.pid))
          t_stop = wall()
        end
        return { from = "a@x.test", to = row.email, subject = "s", text = big }
      end }:run())
    pool:close()
    assert.equal(n, report.sent, require("dkjson").encode(report))
    assert.equal(0, discards) -- no session was lost to the pause
    local seen = {}
    for _, e in ipairs(f:select("message")) do
      for _, rc in ipairs(e.rcpt) do seen[rc] = (seen[rc] or 0) + 1 end
    end
    for k = 1, n do assert.equal(1, seen[("c%d@y.test"):format(k)]) end
    -- How many arrive during the pause is timing: the messages whose marks
    -- were written before the loop's task waited on Redis (measured 0 to
    -- 3). A final dot whose mark could not be written waits behind its
    -- session's gate until Redis is back; 5 to 7 arrived when such dots
    -- left with no mark written, which a worker killed then would have
    -- sent again (pipelining_spec and ngx_spec check the gate itself).
    assert.truthy(t_stop)
  end)

  -- A Redis that cannot be reached (its SYNs unanswered) or does not speak
  -- (a TLS handshake that never gets its ServerHello): the connect waits on
  -- the loop, within the client's timeout, while the loop's SMTP sends go on.
  for _, case in ipairs({ { "backlog", "redis://127.0.0.1:%d" },
                          { "accept", "rediss://127.0.0.1:%d?insecure_skip_verify=true" } }) do
    it(("makes its Redis connection on the loop: a %s that hangs holds no SMTP send"):format(
      case[1] == "backlog" and "connect" or "TLS handshake"), function()
      local loop = require("smtppool.engine.loop")
      local s = peers.silent(case[1])
      local f = peers.fault({})
      finally(function()
        s:stop()
        f:stop()
      end)
      local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 1 })
      -- (a timeout long enough for the sends on a loaded machine: a blocking
      -- connect holds the loop for all of it, whatever it is)
      local client = assert(require("smtppool.redis.client").new(case[2]:format(s.port), { timeout = 3 }))
      local t0 = core.now()
      local v, e, t_fail
      local sent_at = {}
      local l = loop.new(require("smtppool.driver.native"))
      l:spawn(function()
        v, e = client:call("PING")
        t_fail = core.now() - t0
      end)
      l:spawn(function()
        for i = 1, 6 do
          assert(pool:send{ from = "a@x.test", to = ("s%d@y.test"):format(i), subject = "s", text = "t" })
          sent_at[i] = core.now() - t0
          loop.sleep(0.05)
        end
      end)
      assert.is_nil(l:run())
      pool:close()
      client:close()
      assert.is_nil(v)
      assert.matches("timed out", tostring(e))
      assert.is_true(t_fail >= 2.9 and t_fail < 6, "failed after " .. t_fail .. " s")
      -- every send finished while the connect waited (a blocking connect
      -- held the loop its 3 s first)
      assert.equal(6, #f:arrived())
      assert.is_true(sent_at[6] < t_fail, ("the last send at %.2f s, the connect failed at %.2f s"):format(
        sent_at[6], t_fail))
    end)
  end

  it("refuses a bad backend or key at new with a config error", function()
    local _, e1 = smtppool.new{ host = "h", tls = "none", rate = { backend = "http://x", key = "k" } }
    assert.equal("config", e1.kind)
    local _, e2 = smtppool.new{ host = "h", tls = "none", rate = { backend = "redis://127.0.0.1", key = "a b" } }
    assert.equal("config", e2.kind)
  end)
end)

-- One worker of a campaign in Redis, as a shell command.
local function worker_cmd(exim, redis, name, csvpath, conns, lease, out)
  return ("lua5.4 tests/support/rcampaign_child.lua %d %d %s %s %d %d >%s 2>&1"):format(exim.port, redis.port,
    name, csvpath or "-", conns, lease, out)
end

-- 600 recipients; a worker loads and starts, a second joins, the first is
-- killed with -9: everything is sent once, except at most o.bound
-- ambiguous ones, which alone may be missing or doubled.
local function kill_run(o)
  local exim, redis, dir = o.exim, o.redis, o.dir
  local csvpath = dir .. "/" .. o.name .. ".csv"
  peers.write_list(csvpath, "r", o.from, o.from + 599)
  local base_in, base_out = #exim:log_lines("<= news@x%.test"), exim:deliveries()
  local victim = tonumber(peers.sh(worker_cmd(exim, redis, o.name, csvpath, 2, 2, dir .. "/v") .. " & echo $!")
    :match("%d+"))
  peers.wait_for(function() return #exim:log_lines("<= news@x%.test") > base_in + 40 end, 30, "the victim to be sending")
  os.execute(worker_cmd(exim, redis, o.name, nil, 2, 2, dir .. "/k2") .. " & echo $! > " .. dir .. "/k2.pid")
  peers.sleep(0.3)
  os.execute("kill -9 " .. victim)
  peers.wait_for(function() return (peers.read_file(dir .. "/k2") or ""):match("^sent") end, 60, "the survivor")
  local st = assert(require("smtppool.campaign.redis").status("redis://127.0.0.1:" .. redis.port, o.name))
  assert.equal(600, st.total)
  assert.equal(0, st.pending + st.claimed)
  assert.is_true(st.ambiguous <= o.bound, st.ambiguous .. " ambiguous (" .. o.why .. ")")
  assert.equal(600, st.sent + st.ambiguous)
  exim:wait_deliveries(base_out + st.sent)
  local f = {}
  for _, x in ipairs(st.failures) do f[x.address] = x.letter end
  for i = o.from, o.from + 599 do
    local n = #exim:log_lines("=> %S+ <r" .. i .. "@y%.test>")
    if n ~= 1 then -- only an ambiguous recipient may be missing or doubled
      assert.equal("A", f["r" .. i .. "@y.test"], ("r%d@y.test delivered %d times"):format(i, n))
    end
  end
end

describe("a campaign shared through Redis", function()
  local redis, exim, dir
  setup(function()
    redis = peers.redis()
    exim = peers.exim({ max_per_conn = 5 })
    dir = peers.tmpdir()
  end)
  teardown(function()
    redis:stop()
    exim:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)

  local function worker(...) return worker_cmd(exim, redis, ...) end

  it("sends each recipient once across two workers; loading again adds nothing", function()
    local csvpath = dir .. "/a.csv"
    peers.write_list(csvpath, "r", 1, 120, "R5@Y.test,Duplicate\n")
    os.execute(worker("two", csvpath, 2, 30, dir .. "/w1") .. " & " .. worker("two", csvpath, 2, 30, dir .. "/w2")
      .. " & wait")
    local o1, o2 = peers.read_file(dir .. "/w1"), peers.read_file(dir .. "/w2")
    local s1, s2 = tonumber(o1:match("sent (%d+)")), tonumber(o2:match("sent (%d+)"))
    assert.truthy(s1 and s2, o1 .. o2)
    assert.equal(120, s1 + s2)
    -- each loaded the same list: 120 rows went in once, everything else was a duplicate
    local l1, l2 = tonumber(o1:match("loaded (%d+)")), tonumber(o2:match("loaded (%d+)"))
    assert.equal(120, l1 + l2)
    exim:wait_deliveries(120)
    for i = 1, 120 do assert.equal(1, #exim:log_lines("=> %S+ <r" .. i .. "@y%.test>")) end
    -- a third run (the list again) sends nothing and loads nothing
    os.execute(worker("two", csvpath, 1, 30, dir .. "/w3"))
    assert.matches("^sent 0 ambiguous 0 loaded 0 duplicates 121", peers.read_file(dir .. "/w3"))
    local st = assert(require("smtppool.campaign.redis").status("redis://127.0.0.1:" .. redis.port, "two"))
    assert.equal(120, st.total)
    assert.equal(120, st.sent)
    assert.equal(0, st.pending + st.claimed)
    assert.equal(3, #st.workers)
  end)

  -- In Redis, L is recorded as the pipelined group behind a dot leaves (the
  -- loop writes it itself): two per connection over pipelined DATA, the dot
  -- awaiting its reply and the message behind it
  it("survives a worker's kill -9: the rest is sent once, ambiguous at most two per connection", function()
    kill_run({ exim = exim, redis = redis, dir = dir, name = "kill", from = 1001, bound = 4,
               why = "the victim had 2 connections, each with a dot awaiting its reply and a group behind it" })
  end)
end)

describe("a campaign shared through Redis over BDAT", function()
  it("survives a worker's kill -9: ambiguous at most its connections times bdat_window", function()
    local redis, exim, dir = peers.redis(), peers.exim({ max_per_conn = 5, chunking = true }), peers.tmpdir()
    finally(function()
      redis:stop()
      exim:stop()
      os.execute("rm -rf " .. peers.quote(dir))
    end)
    kill_run({ exim = exim, redis = redis, dir = dir, name = "bkill", from = 3001, bound = 8,
               why = "the victim had 2 connections, each with a window of 4" })
  end)
end)

-- A redis-server, a fault server and a folder, all gone when the test ends.
local function redis_fault_dir(redis_opts)
  local redis, f, dir = peers.redis(redis_opts), peers.fault({}), peers.tmpdir()
  finally(function()
    redis:stop()
    f:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)
  return redis, f, dir
end

describe("a campaign in Redis across a Redis restart", function()
  it("loses and doubles nothing when redis-server restarts mid-run (persistence on)", function()
    local redis, f, dir = redis_fault_dir({ persist = true })
    peers.write_list(dir .. "/list.csv", "z", 1, 400)
    local cmd = ("lua5.4 tests/support/rcampaign_child.lua %d %d restart %s 2 30 >%s 2>&1 & echo $!"):format(f.port,
      redis.port, dir .. "/list.csv", dir .. "/out")
    peers.sh(cmd)
    peers.wait_for(function() return #f:select("message") >= 50 end, 30, "the worker to be sending")
    redis:kill() -- SIGTERM: the append-only file is complete
    peers.sleep(0.5)
    redis:start()
    peers.wait_for(function() return (peers.read_file(dir .. "/out") or ""):match("^sent") end, 120, "the worker")
    local seen = {}
    for _, m in ipairs(f:select("message")) do seen[m.rcpt[1]] = (seen[m.rcpt[1]] or 0) + 1 end
    for i = 1, 400 do
      assert.equal(1, seen["z" .. i .. "@y.test"], "z" .. i .. "@y.test")
    end
    local st = assert(require("smtppool.campaign.redis").status("redis://127.0.0.1:" .. redis.port, "restart"))
    assert.equal(400, st.sent)
    assert.equal(0, st.ambiguous)
  end)
end)

describe("the command line with a campaign in Redis", function()
  it("sends as a worker, joins without the list, and shows the status", function()
    local redis, f, dir = redis_fault_dir()
    peers.write_file(dir .. "/cfg.lua", ('return { host = "127.0.0.1", port = %d, tls = "none", from = "n@x.test" }')
      :format(f.port))
    peers.write_list(dir .. "/list.csv", "c", 1, 30)
    peers.write_file(dir .. "/body.txt", "Dear {{name}}\n")
    local url = "redis://127.0.0.1:" .. redis.port
    local base = ("lua5.4 bin/smtppool send --config %s/cfg.lua --journal %s --name cli --subject 'Hi {{name}}' "
      .. "--text %s/body.txt --quiet"):format(dir, url, dir)
    local out = peers.sh(base .. " --to " .. dir .. "/list.csv 2>&1; echo exit=$?")
    assert.matches("exit=0", out)
    -- a second worker, without the list: nothing left, exits 0 at once
    assert.matches("exit=0", peers.sh(base:gsub(" send ", " worker ", 1) .. " 2>&1; echo exit=$?"))
    assert.matches("worker needs %-%-journal redis", peers.sh(("lua5.4 bin/smtppool worker --config %s/cfg.lua "
      .. "--subject x --text %s/body.txt 2>&1"):format(dir, dir)))
    local st = peers.sh(("lua5.4 bin/smtppool status --journal %s --name cli 2>&1; echo exit=$?"):format(url))
    assert.matches("campaign cli: 30 recipients, 30 sent, 0 failed %(0 retryable%), 0 ambiguous, 0 pending, 0 claimed",
      st)
    assert.matches("exit=0", st)
    assert.equal(30, #f:select("message"))
    local missing = peers.sh(("lua5.4 bin/smtppool status --journal %s --name nope 2>&1; echo exit=$?"):format(url))
    assert.matches("no campaign 'nope'", missing)
    assert.matches("exit=2", missing)
  end)
end)

describe("a campaign's state in Redis cannot vanish unnoticed", function()
  local CLI = "lua5.4 bin/smtppool"
  local function run_cli(args)
    local out = peers.sh(CLI .. " " .. args .. " 2>&1; echo \"exit=$?\"")
    return out, tonumber(out:match("exit=(%d+)%s*$"))
  end

  it("refuses a Redis that keeps nothing on disk unless told so by name", function()
    local redis, srv, dir = peers.redis({ persist = false }), peers.hostile({ quiet = true }), peers.tmpdir()
    finally(function() redis:stop() srv:stop() os.execute("rm -rf " .. peers.quote(dir)) end)
    peers.write_list(dir .. "/l.csv", "v", 1, 5)
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test' }")
      :format(srv.port))
    local args = ("send --config %s/pool.lua --to %s/l.csv --subject s --text %s/l.csv --quiet --name vol "
      .. "--journal redis://127.0.0.1:%d"):format(dir, dir, dir, redis.port)
    local out, code = run_cli(args)
    assert.equal(2, code, out)
    assert.matches("keeps nothing on disk", out)
    assert.matches("%-%-allow%-volatile%-redis", out)
    assert.equal(0, #srv:select("message"))
    out, code = run_cli(args .. " --allow-volatile-redis")
    assert.equal(0, code, out)
    assert.equal(5, #srv:select("message"))
  end)

  it("stops with exit 3 and says what happened when the campaign's state is gone mid-run", function()
    local redis, dir = peers.redis({ persist = false }), peers.tmpdir()
    local srv = peers.hostile({ quiet = true, drip = { phase = "DATA_END", interval = 0.005 } })
    finally(function() redis:stop() srv:stop() os.execute("rm -rf " .. peers.quote(dir)) end)
    peers.write_list(dir .. "/l.csv", "g", 1, 400)
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test', "
      .. "max_conns = 2 }"):format(srv.port))
    local args = ("send --config %s/pool.lua --to %s/l.csv --subject s --text %s/l.csv --quiet --name gone "
      .. "--journal redis://127.0.0.1:%d --allow-volatile-redis"):format(dir, dir, dir, redis.port)
    os.execute(("(%s %s >%s 2>&1; echo \"exit=$?\" >>%s) &"):format(CLI, args, peers.quote(dir .. "/out"),
      peers.quote(dir .. "/out")))
    peers.wait_for(function() return #srv:select("message") >= 10 end, 30, "the campaign to be sending")
    -- what a restart without persistence does: everything is gone
    assert.matches("OK", peers.sh(("redis-cli -p %d FLUSHALL"):format(redis.port)))
    peers.wait_for(function() return (peers.read_file(dir .. "/out") or ""):match("exit=%d+") end, 60,
      "the worker to stop")
    local out = peers.read_file(dir .. "/out")
    assert.equal("3", out:match("exit=(%d+)"), out)
    assert.matches("the campaign 'gone' is gone from redis://", out)
    assert.matches("send again every recipient whose outcome was lost", out)
    assert.is_nil(out:find("traceback", 1, true))
    assert.is_true(#srv:select("message") < 400)
  end)
end)
