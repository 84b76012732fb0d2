-- Limits shared through Redis (a real redis-server on a free port): the
-- windows, the sockets open and the learned cap hold across processes, and
-- an unreachable Redis pauses sending instead of falling back.
local peers = require("peers")
local smtppool = require("smtppool")
local core = require("smtppool.core")

local function max_in_window(times, per)
  table.sort(times)
  local best, j = 0, 1
  for i = 1, #times do
    while times[i] - times[j] >= per do j = j + 1 end
    best = math.max(best, i - j + 1)
  end
  return best
end

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
    local most = 0
    for _, e in ipairs(proxy:select("open")) do most = math.max(most, e.open) end
    assert.equal(1, most)
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
    for i = 1, 15 do
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

  it("refuses a bad backend or key at new with a config error", function()
    local _, e1 = smtppool.new{ host = "h", tls = "none", rate = { backend = "http://x", key = "k" } }
    assert.equal("config", e1.kind)
    local _, e2 = smtppool.new{ host = "h", tls = "none", rate = { backend = "redis://127.0.0.1", key = "a b" } }
    assert.equal("config", e2.kind)
  end)
end)
