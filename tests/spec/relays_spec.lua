-- Several relays with failover: a relay that refuses connections, then one
-- that refuses the login, then one that answers; outcomes name their relay.
local peers = require("peers")
local smtppool = require("smtppool")

local function msg(i)
  return { from = "a@x.test", to = { ("r%d@y.test"):format(i) }, data = ("Subject: %d\r\n\r\nbody\r\n"):format(i) }
end

describe("smtppool.relays", function()
  local dead_port, refusing, good
  before_each(function()
    dead_port = peers.free_port()
    refusing = peers.fault({ xoauth2_tokens = { "right" } })
    good = peers.hostile({ quiet = true })
  end)
  after_each(function()
    refusing:stop()
    good:stop()
  end)

  local function group(o)
    local fast = smtppool.retry.backoff{ attempts = 2, base = 0.01 }
    return assert(smtppool.relays({
      { name = "dead", host = "127.0.0.1", port = dead_port, tls = "none", retry = fast },
      { name = "badlogin", host = "127.0.0.1", port = refusing.port, tls = "none", allow_plaintext_auth = true,
        auth = { user = "u@x.test", token = "wrong" }, retry = fast },
      { name = "good", host = "127.0.0.1", port = good.port, tls = "none", retry = fast },
    }, o))
  end

  it("fails over past a dead relay and a refused login, and says which relay carried the message", function()
    local g = group()
    local res, err = g:send_raw(msg(1))
    assert.is_nil(err)
    assert.equal("good", res.relay)
    local st = g:status()
    assert.is_false(st[1].up)
    assert.is_false(st[2].up)
    assert.is_true(st[3].up)
    -- the next message goes straight to the relay that is up
    local opened = st[1].stats.opened
    assert.equal("good", assert(g:send_raw(msg(2))).relay)
    assert.equal(opened, g:status()[1].stats.opened)
    g:close()
    assert.equal(2, #good:select("message"))
  end)

  it("moves a batch's messages on when their relay is down, one outcome each", function()
    local g = group()
    local list, outcomes = {}, {}
    for i = 1, 10 do list[i] = msg(i) end
    local summary = g:send_batch(list, { on_result = function(m, res, err)
      outcomes[#outcomes + 1] = (res or err).relay
      assert.truthy(res, tostring(err))
    end })
    g:close()
    assert.same({ sent = 10, failed = 0, cancelled = 0, total = 10 }, summary)
    for _, r in ipairs(outcomes) do assert.equal("good", r) end
    assert.equal(10, #good:select("message"))
  end)

  it("does not move a message the relay refused for its own reasons", function()
    local g = assert(smtppool.relays({
      { name = "first", host = "127.0.0.1", port = good.port, tls = "none" },
      { name = "second", host = "127.0.0.1", port = good.port, tls = "none" },
    }))
    local res, err = g:send_raw{ from = "a@x.test", to = { "bad>@y.test" }, data = "Subject: x\r\n\r\ny\r\n" }
    g:close()
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.equal("first", err.relay)
  end)

  it("gives the last relay's error when every relay is down", function()
    local g = assert(smtppool.relays({
      { name = "a", host = "127.0.0.1", port = dead_port, tls = "none", retry = smtppool.retry.none() },
      { name = "b", host = "127.0.0.1", port = dead_port, tls = "none", retry = smtppool.retry.none() },
    }))
    local res, err = g:send_raw(msg(1))
    g:close()
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("b", err.relay)
  end)
end)

describe("smtppool.relays with spread", function()
  local a, b
  before_each(function()
    a = peers.hostile({ quiet = true })
    b = peers.hostile({ quiet = true })
  end)
  after_each(function()
    a:stop()
    b:stop()
  end)

  local function pair(wa, wb, port_b, o)
    local fast = smtppool.retry.backoff{ attempts = 2, base = 0.01 }
    return assert(smtppool.relays({
      { name = "a", host = "127.0.0.1", port = a.port, tls = "none", weight = wa, max_conns = 2, retry = fast },
      { name = "b", host = "127.0.0.1", port = port_b or b.port, tls = "none", weight = wb, max_conns = 2,
        retry = fast },
    }, o or { spread = true }))
  end

  it("shares single sends and a batch by weight, both relays sending at once", function()
    local g = pair(3, 1)
    local single = { a = 0, b = 0 }
    for i = 1, 16 do
      local r = assert(g:send_raw(msg(i)))
      single[r.relay] = single[r.relay] + 1
    end
    assert.same({ a = 12, b = 4 }, single) -- 3 to 1
    assert.equal(12, #a:select("message"))
    assert.equal(4, #b:select("message"))
    local list = {}
    for i = 1, 400 do list[i] = msg(i) end
    local seen, by = {}, { a = 0, b = 0 }
    local summary = g:send_batch(list, { on_result = function(m, res, err)
      assert.truthy(res, tostring(err))
      assert.is_nil(seen[m])
      seen[m] = true
      by[res.relay] = by[res.relay] + 1
    end })
    local st = g:status()
    g:close()
    assert.same({ sent = 400, failed = 0, cancelled = 0, total = 400 }, summary)
    assert.same({ a = 300, b = 100 }, by)
    assert.equal(312, #a:select("message"))
    assert.equal(104, #b:select("message"))
    -- both relays were connected during the batch: the shares ran side by side
    assert.is_true(st[1].up and st[2].up)
    local function span(srv, before)
      local ms = srv:select("message")
      return ms[before + 1].t, ms[#ms].t
    end
    local a0, a1 = span(a, 12)
    local b0, b1 = span(b, 4)
    assert.is_true(a0 < b1 and b0 < a1, "the relays' sends did not overlap")
  end)

  it("moves a down relay's share to the others, each message once", function()
    local g = pair(1, 1, peers.free_port())
    local list = {}
    for i = 1, 100 do list[i] = msg(i) end
    local count = 0
    local summary = g:send_batch(list, { on_result = function(_, res, err)
      assert.truthy(res, tostring(err))
      assert.equal("a", res.relay)
      count = count + 1
    end })
    local st = g:status()
    g:close()
    assert.same({ sent = 100, failed = 0, cancelled = 0, total = 100 }, summary)
    assert.equal(100, count)
    assert.equal(100, #a:select("message"))
    assert.is_false(st[2].up)
  end)

  it("fails with the last relay's error when no relay can carry a message", function()
    local g = assert(smtppool.relays({
      { name = "x", host = "127.0.0.1", port = peers.free_port(), tls = "none", retry = smtppool.retry.none() },
      { name = "y", host = "127.0.0.1", port = peers.free_port(), tls = "none", retry = smtppool.retry.none() },
    }, { spread = true }))
    local errs = {}
    local summary = g:send_batch({ msg(1), msg(2), msg(3) }, { on_result = function(_, res, err)
      assert.is_nil(res)
      errs[#errs + 1] = err
    end })
    g:close()
    assert.same({ sent = 0, failed = 3, cancelled = 0, total = 3 }, summary)
    for _, e in ipairs(errs) do assert.equal("connection", e.kind) end
  end)

  it("refuses a weight that is not a positive number", function()
    assert.has_error(function()
      smtppool.relays({ { host = "127.0.0.1", weight = 0 } }, { spread = true })
    end, "smtppool.relays: relay 'relay1': weight must be a positive number")
    assert.has_error(function() smtppool.relays({ { host = "127.0.0.1" } }, { spread = "yes" }) end,
      "smtppool.relays: spread must be a boolean")
  end)
end)

-- Two quiet hostile servers, stopped when the test ends, and a spread group
-- over them (weights wa and wb, default 1).
local function two_servers(wa, wb)
  local a, b = peers.hostile({ quiet = true }), peers.hostile({ quiet = true })
  finally(function()
    a:stop()
    b:stop()
  end)
  local g = assert(smtppool.relays({
    { name = "a", host = "127.0.0.1", port = a.port, tls = "none", weight = wa },
    { name = "b", host = "127.0.0.1", port = b.port, tls = "none", weight = wb },
  }, { spread = true }))
  return a, b, g
end

describe("a spread batch that is stopped", function()
  it("gives every message taken from the source one outcome, cancelled when no relay took it", function()
    local a, b, g = two_servers(1, 3)
    local pulled, results, seen = 0, 0, {}
    local summary = g:send_batch(function()
      if pulled == 500 then return nil end
      pulled = pulled + 1
      return msg(pulled)
    end, {
      on_result = function(m, res, err)
        assert.is_nil(seen[m])
        seen[m] = true
        results = results + 1
        if not res then assert.equal("cancelled", err.kind) end
      end,
      should_stop = function() return results >= 20 end,
    })
    g:close()
    assert.equal(pulled, summary.total)
    assert.equal(pulled, results)
    assert.is_true(summary.cancelled > 0)
    assert.equal(summary.sent, #a:select("message") + #b:select("message"))
  end)
end)

describe("a spread batch whose callback raises", function()
  it("takes nothing new, reports every message taken, then raises", function()
    local _, _, g = two_servers()
    local pulled, results = 0, 0
    local ok, err = pcall(g.send_batch, g, function()
      if pulled == 500 then return nil end
      pulled = pulled + 1
      return msg(pulled)
    end, { on_result = function()
      results = results + 1
      if results == 10 then error("callback bug") end
    end })
    g:close()
    assert.is_false(ok)
    assert.matches("callback bug", tostring(err))
    assert.equal(pulled, results)
    assert.is_true(pulled < 500, "the batch kept taking messages: " .. pulled)
  end)
end)

describe("a spread batch whose source raises", function()
  it("takes nothing more on any relay, reports every message taken, then raises", function()
    local _, _, g = two_servers()
    local pulled, results = 0, 0
    local ok, err = pcall(g.send_batch, g, function()
      if pulled == 30 then error("source bug") end
      pulled = pulled + 1
      return msg(pulled)
    end, { on_result = function() results = results + 1 end })
    g:close()
    assert.is_false(ok)
    assert.matches("source bug", tostring(err))
    assert.equal(30, pulled)
    assert.equal(pulled, results)
  end)
end)
