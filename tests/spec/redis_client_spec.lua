-- smtppool.redis.client against a real redis-server: values, pipelines,
-- scripts that survive a SCRIPT FLUSH, AUTH and SELECT with the password
-- never in an error, a server that goes away and comes back, and misuse.
local peers = require("peers")
local client = require("smtppool.redis.client")

describe("the Redis client", function()
  local r
  before_each(function() r = peers.redis({ persist = false, password = "pw-s3cret" }) end)
  after_each(function() r:stop() end)
  local function url(db, pw) return ("redis://:%s@127.0.0.1:%d/%d"):format(pw or "pw-s3cret", r.port, db or 0) end

  it("calls, pipelines and tells an error reply from an unreachable server", function()
    local c = assert(client.new(url()))
    assert.is_true(c:connect())
    assert.equal("OK", c:call("SET", "k", "v"))
    assert.equal("v", c:call("GET", "k"))
    assert.equal(false, c:call("GET", "missing"))
    assert.equal(3, c:call("INCRBY", "n", 3))
    local v, e, answered = c:call("INCR", "k")
    assert.is_nil(v)
    assert.truthy(e:find("^redis: ERR"))
    assert.is_true(answered)
    assert.equal("v", c:call("GET", "k")) -- an error reply keeps the connection
    local out = assert(c:pipeline({ { "GET", "k" }, { "INCR", "n" }, { "INCR", "k" }, { "LRANGE", "nope", 0, -1 } }))
    assert.equal("v", out[1])
    assert.equal(4, out[2])
    assert.truthy(out[3].err:find("^ERR"))
    assert.same({}, out[4])
    assert.same({}, c:pipeline({}))
    c:close()
  end)

  it("selects the database and never shows the password in an error", function()
    local a = assert(client.new(url(3)))
    assert.equal("OK", a:call("SET", "only3", "x"))
    local b = assert(client.new(url(0)))
    assert.equal(false, b:call("GET", "only3"))
    assert.equal("x", b:pipeline({ { "SELECT", "3" }, { "GET", "only3" } })[2])
    local bad = assert(client.new(url(0, "wrong-pw-XYZ")))
    local ok, e = bad:connect()
    assert.is_nil(ok)
    assert.falsy(e:find("wrong-pw-XYZ", 1, true))
    assert.truthy(e:find("***", 1, true) or e:find("WRONGPASS", 1, true) or e:find("invalid", 1, true))
    a:close(); b:close(); bad:close()
  end)

  it("runs scripts by SHA and loads them again after the server forgets them", function()
    local c = assert(client.new(url()))
    local body = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    assert.equal(2, c:script("bump", body, { "s" }, { "2" }))
    assert.equal("OK", c:call("SCRIPT", "FLUSH"))
    assert.equal(4, c:script("bump", body, { "s" }, { "2" })) -- NOSCRIPT: loaded again, once
    local v, e, answered = c:script("bad", "return redis.call('NOPE')", {}, {})
    assert.is_nil(v)
    assert.truthy(e:find("^redis: "))
    assert.is_true(answered)
    c:close()
  end)

  it("reconnects after the server went away, with nil and why meanwhile", function()
    local c = assert(client.new(url(), { timeout = 0.5 }))
    assert.equal("OK", c:call("SET", "a", "1"))
    r:kill()
    local v, e, answered = c:call("GET", "a")
    assert.is_nil(v)
    assert.truthy(e)
    assert.is_nil(answered)
    v, e = c:pipeline({ { "PING" } })
    assert.is_nil(v)
    assert.truthy(e:find("redis", 1, true))
    r:start()
    assert.equal("PONG", c:call("PING"))
    c:close()
  end)

  it("writes behind: posts leave at once and their replies are read, in order, before the next call", function()
    local c = assert(client.new(url(), { timeout = 0.5 }))
    local got = {}
    local function note(tag)
      return function(v, e) got[#got + 1] = { tag, v, e } end
    end
    assert.is_true(c:post({ { "SET", "w", "1" }, { "INCR", "w" } }, note("a")))
    assert.is_true(c:post({ { "SET", "s", "abc" }, { "INCR", "s" } }, note("b")))
    assert.equal(2, c:unsettled())
    assert.same({}, got) -- nothing read yet
    -- a second client sees them applied: they left at once
    local other = assert(client.new(url()))
    peers.wait_for(function() return other:call("GET", "s") == "abc" end, 5, "the posts to arrive")
    assert.equal("2", other:call("GET", "w"))
    -- the next call reads the replies first, each post's in order
    assert.equal("2", c:call("GET", "w"))
    assert.equal(0, c:unsettled())
    assert.equal(2, #got)
    assert.same({ "a", { "OK", 2 } }, { got[1][1], got[1][2] })
    assert.equal("b", got[2][1])
    assert.equal("OK", got[2][2][1])
    assert.truthy(got[2][2][2].err:find("^ERR")) -- an error reply is a value in its place
    -- settle reads them without another call
    assert.is_true(c:post({ { "INCR", "w" } }, note("c")))
    assert.is_true(c:settle())
    assert.same({ 3 }, got[3][2])
    assert.is_true(c:settle()) -- nothing waits: at once
    -- take_ready reads what has arrived and never waits: the server holds
    -- this reply back until another client pushes
    assert.is_true(c:reads_ready()) -- a native connection
    assert.is_true(c:post({ { "BLPOP", "later", "5" }, { "PING" } }, note("r")))
    assert.equal(1, c:take_ready())
    assert.equal(3, #got)
    local pusher = assert(client.new(url()))
    assert.equal(1, pusher:call("RPUSH", "later", "v"))
    peers.wait_for(function() return c:take_ready() == 0 end, 5, "the reply to arrive")
    assert.same({ { "later", "v" }, "PONG" }, got[4][2])
    -- a reply read in part by take_ready is finished by settle
    assert.is_true(c:post({ { "PING" }, { "BLPOP", "later", "5" } }, note("s")))
    peers.wait_for(function()
      c:take_ready()
      return c.posted[1] and c.posted[1].got and #c.posted[1].got == 1
    end, 5, "the first reply")
    assert.equal(1, pusher:call("RPUSH", "later", "w"))
    assert.is_true(c:settle())
    assert.same({ "PONG", { "later", "w" } }, got[5][2])
    pusher:close()
    table.remove(got, 5)
    table.remove(got, 4)
    -- the connection cut before the replies came (the server holds this
    -- one back): the post gets nil and why
    assert.is_true(c:post({ { "BLPOP", "nothing-here", "5" } }, note("d")))
    r:kill()
    local ok, e = c:settle()
    assert.is_nil(ok)
    assert.truthy(e)
    assert.equal("d", got[4][1])
    assert.is_nil(got[4][2])
    assert.truthy(got[4][3])
    assert.equal(0, c:unsettled())
    -- while the server is away a post is not sent (nil and why, no call of on_reply)
    local v, pe = c:post({ { "PING" } }, note("e"))
    assert.is_nil(v)
    assert.truthy(pe)
    assert.equal(4, #got)
    r:start()
    assert.equal("PONG", c:call("PING"))
    -- misuse raises
    assert.has_error(function() c:post({}, note("x")) end)
    assert.has_error(function() c:post({ { "PING" } }) end)
    assert.has_error(function() c:post({ { "SET", "k", {} } }, note("x")) end)
    other:close()
    c:close()
  end)

  it("gives a pool's loop its socket to wake on when a reply comes, not at the poll", function()
    -- what the outbox does with a claim posted ahead: the source says
    -- "nothing now", before_wait hands the loop the Redis socket, and the
    -- reply ends the wait (the poll here is 10 s)
    local core = require("smtppool.core")
    local f = peers.fault({})
    -- (the reply comes when redis-cli pushes, from another process)
    local pool = assert(require("smtppool").new{ host = "127.0.0.1", port = f.port, tls = "none" })
    local c = assert(client.new(url()))
    finally(function()
      pool:close()
      c:close()
      f:stop()
    end)
    assert.is_true(c:connect())
    local got, posted_at, fd_given
    local s = pool:send_batch(function()
      if not posted_at then
        -- a reply that comes in 0.3 s, when another client pushes
        assert.is_true(c:post({ { "BLPOP", "wake", "5" } }, function(v) got = v end))
        posted_at = core.now()
        os.execute(("(sleep 0.3; redis-cli -p %d -a pw-s3cret --no-auth-warning RPUSH wake now >/dev/null) &")
          :format(r.port))
        return false
      end
      c:take_ready()
      if got then return nil end
      return false
    end, { poll = 10, before_wait = function()
      if got then return end
      fd_given = c:ready_fd()
      return nil, { fd_given }
    end, on_event = function() end })
    assert.equal(0, s.total)
    assert.truthy(fd_given)
    assert.same({ { "wake", "now" } }, got)
    assert.truthy(core.now() - posted_at < 3, core.now() - posted_at)
  end)

  it("raises on misuse: a call after close, a bad command, a bad timeout", function()
    local c = assert(client.new(url()))
    assert.has_error(function() c:call() end, "redis client: a command needs a name")
    assert.has_error(function() c:call("SET", "k", {}) end)
    assert.has_error(function() c:pipeline("PING") end)
    assert.has_error(function() c:pipeline({ "PING" }) end)
    assert.has_error(function() client.new(url(), { timeout = -1 }) end)
    c:close()
    assert.has_error(function() c:call("PING") end, "redis client: used after close()")
    local n, e = client.new("http://x")
    assert.is_nil(n)
    assert.truthy(e:find("redis://", 1, true))
  end)
end)
