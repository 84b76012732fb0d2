-- The scheduler and the loop driven without sockets: a fake driver
-- (tests/support/fake_driver.lua) models servers at the level of the
-- events the scheduler sees, on a virtual clock, and keeps the server's
-- view to assert on. Fast and exact: what the specs against real servers
-- show with noise, these show for every message.
local smtppool = require("smtppool")
local loop = require("smtppool.engine.loop")
local fake = require("fake_driver")

local function list(n, tag)
  local out = {}
  for i = 1, n do
    out[i] = { from = "a@x.test", to = ("%s%d@y.test"):format(tag or "u", i), subject = "s", text = "hello " .. i }
  end
  return out
end

local function pool_on(net, o)
  local opts = { host = o.host or "mx", tls = "none", max_conns = o.max_conns or 2 }
  for k, v in pairs(o) do if k ~= "host" then opts[k] = v end end
  return assert(smtppool.build(opts, net:driver()))
end

local function outcomes(pool, msgs, opts)
  local got = {}
  opts = opts or {}
  opts.on_result = function(m, res, err) got[#got + 1] = { m = m, res = res, err = err } end
  local sum = pool:send_batch(msgs, opts)
  return sum, got
end

describe("the scheduler over a fake driver", function()
  it("rotates before a configured cap: no session takes more, none is refused", function()
    local net = fake.network()
    local srv = net:server("mx", { cap = 5 })
    local pool = pool_on(net, { max_conns = 3, max_messages_per_conn = 5 })
    local sum = outcomes(pool, list(200))
    assert.equal(200, sum.sent)
    assert.equal(0, srv.over_cap)
    for _, s in ipairs(srv.sessions) do assert.is_true(s.messages <= 5) end
    assert.equal(200, srv.accepted)
    assert.is_true(#srv.sessions >= 40)
    pool:close()
  end)

  it("learns a cap it was not told, and loses nothing while it learns", function()
    local net = fake.network()
    local srv = net:server("mx", { cap = 5 })
    local pool = pool_on(net, { max_conns = 2 })
    local sum, got = outcomes(pool, list(300))
    assert.equal(300, sum.sent)
    assert.equal(0, sum.failed)
    assert.equal(300, #got)
    assert.equal(5, pool:stats().learned_cap)
    -- each 421 costs a move, not an attempt; after the cap is learned they stop
    assert.is_true(srv.over_cap <= 6, "421s: " .. srv.over_cap)
    for _, g in ipairs(got) do assert.equal(1, g.res.attempts) end
    pool:close()
  end)

  it("keeps LIMITS MAILMAX as the cap from the first session", function()
    local net = fake.network()
    local srv = net:server("mx", { cap = 4, mailmax = 4 })
    local pool = pool_on(net, { max_conns = 2 })
    local sum = outcomes(pool, list(100))
    assert.equal(100, sum.sent)
    assert.equal(0, srv.over_cap)
    pool:close()
  end)

  it("retries a transient reply and fails a permanent one at once, one outcome each", function()
    local net = fake.network()
    net:server("mx", { reply = function(_, _, _, to)
      if to[1] == "u7@y.test" then return 550, "5.1.1 no such user" end
      if to[1] == "u3@y.test" and not net.retried then
        net.retried = true
        return 451, "4.3.0 try later"
      end
    end })
    local pool = pool_on(net, { max_conns = 2, retry = smtppool.retry.backoff{ base = 0.5, attempts = 3 } })
    local sum, got = outcomes(pool, list(10))
    assert.equal(9, sum.sent)
    assert.equal(1, sum.failed)
    local by = {}
    for _, g in ipairs(got) do by[g.m.to] = g end
    assert.equal("permanent", by["u7@y.test"].err.kind)
    assert.equal(1, by["u7@y.test"].err.attempts)
    assert.equal(2, by["u3@y.test"].res.attempts)
    assert.is_true(net.t >= 0.25) -- the retry waited its delay (0.5 s, jitter half) on the virtual clock
    pool:close()
  end)

  it("never opens more sockets than max_conns when rotating ahead is off", function()
    local net = fake.network()
    local srv = net:server("mx", { cap = 5 })
    local pool = pool_on(net, { max_conns = 3, max_messages_per_conn = 5, rotate_ahead = 0 })
    assert.equal(150, (outcomes(pool, list(150))).sent)
    assert.is_true(srv.max_open <= 3, "sockets at once: " .. srv.max_open)
    pool:close()
  end)

  it("rotates ahead by time: a replacement opens one handshake before the old session's end, not earlier", function()
    -- a handshake takes 2 round trips here, and each message 2: the
    -- replacement is due when one unanswered message is left, though
    -- rotate_ahead = 3 would let it open three transactions early
    for _, ahead in ipairs({ 3, 1 }) do
      local net = fake.network()
      local srv = net:server("mx", { cap = 5, rtt = 0.01 })
      local pool = pool_on(net, { max_conns = 1, max_messages_per_conn = 5, rotate_ahead = ahead })
      local sum = outcomes(pool, list(60))
      assert.equal(60, sum.sent)
      assert.equal(0, srv.over_cap)
      assert.equal(12, #srv.sessions)
      assert.equal(2, srv.max_open) -- one replacement at a time past max_conns
      for i = 3, #srv.sessions - 1 do -- the pool has measured both by then
        local old, new = srv.sessions[i], srv.sessions[i + 1]
        local lead = old.closed - new.opened
        assert.is_true(lead >= 0, ("session %d opened %.3f s after the old one closed"):format(i + 1, -lead))
        assert.is_true(lead <= 0.02 + 1e-9, ("session %d opened %.3f s ahead; a handshake is 0.02"):format(i + 1, lead))
      end
      pool:close()
    end
  end)

  it("learns a concurrency limit it was not told, moving refused messages without spending an attempt", function()
    local net = fake.network()
    local srv = net:server("mx", { max_sessions = 2, cap = 5 })
    local events = {}
    local pool = pool_on(net, { max_conns = 6, max_messages_per_conn = 5, limit_probe_after = 5,
      on_event = function(e) if e.type == "learn_limit" then events[#events + 1] = e end end })
    local sum, got = outcomes(pool, list(300))
    assert.equal(300, sum.sent)
    for _, g in ipairs(got) do assert.equal(1, g.res.attempts) end
    local least = math.huge
    for _, e in ipairs(events) do
      assert.equal("conns", e.limit)
      if e.value < least then least = e.value end
    end
    assert.equal(2, least)
    -- the first burst, then one refusal per probe at most
    assert.is_true(srv.refused <= 4 + net.t / 5, srv.refused .. " refused in " .. net.t .. " s")
    pool:close()
  end)

  it("fails what waits past wait_timeout when the server refuses every connection", function()
    local net = fake.network()
    net:server("mx", { max_sessions = 0 })
    local pool = pool_on(net, { max_conns = 2, wait_timeout = 5,
      retry = smtppool.retry.backoff{ base = 0.2, attempts = 2 } })
    local sum, got = outcomes(pool, list(4))
    assert.equal(0, sum.sent)
    assert.equal(4, #got)
    for _, g in ipairs(got) do assert.truthy(g.err) end
    pool:close()
  end)
end)

describe("the loop", function()
  it("runs two pools' batches as tasks over one wait, each to its end", function()
    local net = fake.network()
    local a = net:server("a", { rtt = 0.01 })
    local b = net:server("b", { rtt = 0.05 })
    local pa, pb = pool_on(net, { host = "a" }), pool_on(net, { host = "b" })
    -- one driver for the loop: the network's (both pools' handles are its)
    local l = loop.new(net:driver())
    local sa, sb
    l:spawn(function() sa = pa:send_batch(list(50, "a")) end)
    l:spawn(function() sb = pb:send_batch(list(50, "b")) end)
    assert.is_nil(l:run())
    assert.equal(50, sa.sent)
    assert.equal(50, sb.sent)
    assert.equal(50, a.accepted)
    assert.equal(50, b.accepted)
    -- the slow server set the pace, the fast one did not wait for it
    assert.is_true(net.t < 50 * 4 * 0.05, "virtual seconds: " .. net.t)
    pa:close(); pb:close()
  end)

  it("keeps a task's events through a sleep after a wait aside (a Redis outage's retry)", function()
    -- What a Redis call does on a loop when Redis is restarting: a wait
    -- aside (its reply), then a sleep before trying again. Events of the
    -- task's connections that came meanwhile belong to its next wait on
    -- them, not to the sleep: handed to it, they were lost and a message
    -- stayed in flight for ever.
    local net = fake.network()
    net:server("a", { rtt = 0.05, pipelining = false })
    local pa = pool_on(net, { host = "a", max_conns = 2 })
    local l = loop.new(net:driver())
    local sa, slept = nil, 0
    l:spawn(function()
      sa = pa:send_batch(list(6), { mark_async = function()
        if slept < 3 then
          slept = slept + 1
          loop.wait_fd(99, 0.2, net:driver())
          loop.sleep(0.3, net:driver())
        end
      end })
    end)
    assert.is_nil(l:run())
    assert.equal(6, sa.sent)
    assert.equal(3, slept)
    pa:close()
  end)

  it("returns a task's error after the others end, and sleeps without a driver wait of its own", function()
    local net = fake.network()
    net:server("a")
    local pa = pool_on(net, { host = "a" })
    local l = loop.new(net:driver())
    local sa, woke
    l:spawn(function() error("task failed", 0) end)
    l:spawn(function() sa = pa:send_batch(list(20)) end)
    l:spawn(function()
      loop.sleep(3, net:driver())
      woke = net.t
    end)
    assert.equal("task failed", l:run())
    assert.equal(20, sa.sent)
    assert.is_true(woke >= 3)
    assert.has_error(function() loop.new({}) end, "loop.new: a driver with wait and now is needed")
    pa:close()
  end)
end)

describe("a campaign over the fake driver", function()
  it("renders every templated field for each row, List-Unsubscribe included", function()
    local net = fake.network()
    local srv = net:server("mx")
    local pool = pool_on(net, { max_conns = 2 })
    local rows = {}
    for i = 1, 20 do rows[i] = { email = ("r%d@y.test"):format(i), name = "N" .. i, id = "id" .. i } end
    local report = assert(smtppool.campaign{ pool = pool, recipients = rows, progress = false,
      message = { from = "news@x.test", subject = "Hi {{name}}", text = "Dear {{name}}",
                  list_unsubscribe = "<https://x.test/u?id={{id}}>", list_unsubscribe_post = true } }:run())
    assert.equal(20, report.sent)
    assert.equal(20, #srv.received)
    for _, m in ipairs(srv.received) do
      local i = m.to[1]:match("^r(%d+)@")
      assert.truthy(m.data:find("Subject: Hi N" .. i .. "\r\n", 1, true), m.data)
      assert.truthy(m.data:find("List-Unsubscribe: <https://x.test/u?id=id" .. i .. ">\r\n", 1, true), m.data)
      assert.falsy(m.data:find("{{", 1, true))
    end
    pool:close()
  end)
end)

describe("relays as routes of one scheduler, over the fake driver", function()
  local function group(net, names, opts)
    local list = {}
    for i, n in ipairs(names) do
      list[i] = { name = n, weight = opts.weights and opts.weights[i] or nil,
                  pool = pool_on(net, { host = n, max_conns = 2, retry = smtppool.retry.none() }) }
    end
    local o = { now = function() return net.t end }
    for k, v in pairs(opts) do if k ~= "weights" then o[k] = v end end
    return assert(smtppool.relays(list, o))
  end

  it("spreads by weight over the routes at once; a route that cannot connect hands its share on", function()
    local net = fake.network()
    local a, b = net:server("a", { rtt = 0.01 }), net:server("b", { rtt = 0.01 })
    -- "dead" has no server: every connect fails
    local g = group(net, { "a", "dead", "b" }, { spread = true, weights = { 2, 1, 1 } })
    local by, seen = {}, {}
    local sum = g:send_batch(list(300), { on_result = function(m, res, err)
      assert.truthy(res, tostring(err))
      assert.is_nil(seen[m], "two outcomes for one message")
      seen[m] = true
      by[res.relay] = (by[res.relay] or 0) + 1
    end })
    assert.same({ sent = 300, failed = 0, cancelled = 0, total = 300 }, sum)
    assert.is_nil(by.dead)
    assert.equal(300, a.accepted + b.accepted)
    assert.equal(by.a, a.accepted)
    -- after the dead route stopped, a and b kept their 2 to 1 share (within one message per pick)
    assert.is_true(math.abs(by.a - 2 * by.b) <= 4, ("a %d, b %d"):format(by.a, by.b))
    -- one loop served both: their sessions overlapped in time
    local a0, b0 = a.sessions[1].opened, b.sessions[1].opened
    assert.is_true(math.abs(a0 - b0) < 0.05, "the routes did not run at once")
    local st = g:status()
    assert.is_true(st[1].up)
    assert.is_false(st[2].up)
    assert.is_true(st[3].up)
    -- the route that went down is skipped while down: a single send goes by weight to a or b
    local res = assert(g:send(list(1, "single")[1]))
    assert.is_true(res.relay == "a" or res.relay == "b")
    g:close()
  end)

  it("fails over in order, and ends a message no route could carry with the last route's error", function()
    local net = fake.network()
    local b = net:server("b")
    local g = group(net, { "dead1", "b", "dead2" }, {})
    local by = {}
    local sum = g:send_batch(list(50), { on_result = function(_, res, err)
      assert.truthy(res, tostring(err))
      by[res.relay] = (by[res.relay] or 0) + 1
    end })
    assert.equal(50, sum.sent)
    assert.same({ b = 50 }, by)
    assert.equal(50, b.accepted)
    g:close()
    local net2 = fake.network()
    local g2 = group(net2, { "dead1", "dead2" }, {})
    local errs = {}
    local sum2 = g2:send_batch(list(5), { on_result = function(_, res, err)
      assert.is_nil(res)
      errs[#errs + 1] = err
    end })
    assert.same({ sent = 0, failed = 5, cancelled = 0, total = 5 }, sum2)
    for _, e in ipairs(errs) do
      assert.equal("connection", e.kind)
      assert.equal("dead2", e.relay)
    end
    g2:close()
  end)

  it("carries a campaign: each recipient once, journalled, a dead route's share moved", function()
    local net = fake.network()
    local a, b = net:server("a"), net:server("b")
    local g = group(net, { "a", "dead", "b" }, { spread = true })
    local rows = {}
    for i = 1, 60 do rows[i] = { email = ("r%d@y.test"):format(i), name = "N" .. i } end
    local journal = os.tmpname()
    os.remove(journal)
    local report = assert(smtppool.campaign{ pool = g, recipients = rows, progress = false, journal = journal,
      message = { from = "news@x.test", subject = "Hi {{name}}", text = "Dear {{name}}" } }:run())
    assert.equal(60, report.sent)
    assert.equal(0, report.failed)
    assert.equal(60, a.accepted + b.accepted)
    local seen = {}
    for _, srv in ipairs({ a, b }) do
      for _, m in ipairs(srv.received) do
        assert.is_nil(seen[m.to[1]], "sent twice: " .. m.to[1])
        seen[m.to[1]] = true
      end
    end
    -- resumed, the journal sends nothing again
    local again = assert(smtppool.campaign{ pool = g, recipients = rows, progress = false, journal = journal,
      message = { from = "news@x.test", subject = "Hi {{name}}", text = "Dear {{name}}" } }:run())
    assert.equal(0, again.sent)
    assert.equal(60, again.skipped)
    g:close()
    os.remove(journal)
    os.remove(journal .. "-wal")
    os.remove(journal .. "-shm")
  end)

  it("refuses relays that sign otherwise: a message is signed once, before its route is chosen", function()
    local key = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n"
    local function relay(name, selector)
      return { name = name, host = "127.0.0.1", tls = "none",
               dkim = selector and { domain = "x.test", selector = selector, key = key, algorithm = "ed25519-sha256" } }
    end
    assert.has_error(function() smtppool.relays({ relay("a", "s1"), relay("b", "s2") }) end,
      "smtppool.relays: relay 'b' signs otherwise than relay 'a': a message is signed once, before a relay is "
      .. "chosen; give every relay the same dkim (or none)")
    assert.has_error(function() smtppool.relays({ relay("a", "s1"), relay("b") }) end)
    local g = assert(smtppool.relays({ relay("a", "s1"), relay("b", "s1") }))
    g:close()
  end)
end)
