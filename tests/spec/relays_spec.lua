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
