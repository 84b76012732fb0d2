-- The durable outbox (issue 24) outside nginx: messages handed over are
-- stored in Redis before their id is given, delivered once by whichever
-- worker claims them (this process, `smtppool worker --outbox`), retries
-- wait in Redis, a killed worker's in-flight messages end ambiguous, and a
-- Redis restarted with AOF loses and doubles nothing.
local peers = require("peers")
local smtppool = require("smtppool")

local function setup(script, redis_opts)
  local redis, f, dir = peers.redis(redis_opts), peers.fault(script or {}), peers.tmpdir()
  finally(function()
    os.execute(peers.CLEAN .. "pkill -9 -f " .. peers.quote("outbox-name " .. dir:match("[^/]+$")) .. " 2>/dev/null")
    redis:stop()
    f:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)
  peers.write_file(dir .. "/relay.lua", ('return { host = "127.0.0.1", port = %d, tls = "none", max_conns = 2 }')
    :format(f.port))
  return redis, f, dir, "redis://127.0.0.1:" .. redis.port
end

local function pool_for(f, url, extra)
  local o = { host = "127.0.0.1", port = f.port, tls = "none", outbox = url, max_conns = 2 }
  for k, v in pairs(extra or {}) do o[k] = v end
  return assert(smtppool.new(o))
end

local function enqueue(pool, n, tag)
  local ids = {}
  for i = 1, n do
    ids[i] = assert(pool:enqueue{ from = "app@x.test", to = ("%s%d@y.test"):format(tag or "r", i),
      subject = "Reset " .. i, text = "Your code is " .. i })
  end
  return ids
end

-- `smtppool worker --outbox` in the background; returns its pid and output file.
local function worker(dir, url, extra)
  local out = dir .. "/worker" .. tostring(math.random(1e9)) .. ".out"
  local pid = tonumber(peers.sh(("lua5.4 bin/smtppool worker --outbox %s --outbox-name %s --config %s/relay.lua "
    .. "%s >%s 2>&1 & echo $!"):format(url, dir:match("[^/]+$"), dir, extra or "", peers.quote(out))):match("%d+"))
  return pid, out
end

describe("the outbox outside nginx", function()
  it("stores each message before giving its id, and two workers and this process deliver each once", function()
    local _, f, dir, url = setup()
    local name = dir:match("[^/]+$")
    local pool = pool_for(f, url, { outbox_name = name })
    local ids = enqueue(pool, 120)
    assert.equal(120, #ids)
    -- pending until delivered; an id nobody gave is an invalid error
    assert.is_nil((pool:outcome(ids[1])))
    assert.is_nil(select(2, pool:outcome(ids[1])))
    local none, nerr = pool:outcome("0123456789abcdef01234567")
    assert.is_nil(none)
    assert.equal("invalid", nerr.kind)
    local st = assert(pool.outbox:stats())
    assert.equal(120, st.depth)
    assert.truthy(st.oldest and st.oldest >= 0)
    -- two CLI workers and this process drain it together
    local p1, o1 = worker(dir, url, "--until-empty")
    local p2, o2 = worker(dir, url, "--until-empty")
    local s = assert(pool:deliver{ until_empty = true })
    peers.wait_for(function()
      return (peers.read_file(o1) or ""):find("outbox") and (peers.read_file(o2) or ""):find("outbox")
    end, 60, "both workers to end")
    local per, total = f:per_recipient()
    assert.equal(120, total)
    for i = 1, 120 do assert.equal(1, per[("r%d@y.test"):format(i)], i) end
    for _, id in ipairs(ids) do
      local o = assert(pool:outcome(id))
      assert.equal("sent", o.status)
      assert.equal(250, o.code)
      assert.equal(1, o.attempts)
    end
    -- this process took part (it cannot be told how much: the claims race)
    assert.truthy(s.sent >= 0)
    st = assert(pool.outbox:stats())
    assert.same({ 0, 120, 120, 0 }, { st.depth, st.enqueued, st.sent, st.failed })
    assert.is_nil(st.oldest)
    local text = pool:metrics()
    assert.matches("\nsmtppool_outbox_depth 0\n", text)
    assert.matches("\nsmtppool_outbox_sent_total 120\n", text)
    assert.matches("\nsmtppool_outbox_enqueued_total 120\n", text)
    pool:close()
    assert.truthy(p1 and p2)
  end)

  it("answers invalid, busy and configuration errors at once, storing nothing", function()
    local redis, f, _, url = setup(nil, { persist = false })
    -- a Redis that keeps nothing on disk is refused unless told by name
    local pool = pool_for(f, url)
    local id, err = pool:enqueue{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" }
    assert.is_nil(id)
    assert.equal("config", err.kind)
    assert.matches("keeps nothing on disk.*allow_volatile_redis", tostring(err))
    pool:close()
    pool = pool_for(f, url, { allow_volatile_redis = true, outbox_max = 3 })
    -- a message that cannot be composed: invalid, nothing stored
    id, err = pool:enqueue{ from = "a@x.test", to = "b@y.test\r\nBcc: c@z.test", subject = "s", text = "t" }
    assert.is_nil(id)
    assert.equal("invalid", err.kind)
    assert.equal(0, pool.outbox:stats().depth)
    enqueue(pool, 3)
    id, err = pool:enqueue{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" }
    assert.is_nil(id)
    assert.equal("busy", err.kind)
    assert.matches("outbox_max 3", tostring(err))
    assert.equal(3, pool.outbox:stats().depth)
    pool:close()
    -- a Redis that is down: a connection error within the timeout, not a hang
    redis:kill()
    pool = pool_for(f, url, { allow_volatile_redis = true, outbox_timeout = 0.5 })
    local t0 = os.time()
    id, err = pool:enqueue{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" }
    assert.is_nil(id)
    assert.equal("connection", err.kind)
    assert.truthy(os.time() - t0 <= 3)
    pool:close()
    -- misuse raises
    assert.has_error(function() pool_for(f, url, { outbox_max = -1 }) end)
    assert.has_error(function() smtppool.new{ host = "h", outbox_keep = 5 } end)
    local plain = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
    assert.has_error(function() plain:enqueue{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" } end)
    plain:close()
  end)

  it("keeps a long retry in Redis: a later worker sends it when it is due, attempts counted across both", function()
    local _, f, dir, url = setup({ rules = { { on = "MAIL", ["do"] = "reply", text = "451 4.3.0 try later",
      times = 1 } } })
    local name = dir:match("[^/]+$")
    local pool = pool_for(f, url, { outbox_name = name,
      retry = smtppool.retry.backoff{ attempts = 3, base = 6, jitter = 0 } })
    local ids = enqueue(pool, 1)
    local s = assert(pool:deliver{ until_empty = false, should_stop = function()
      return pool.outbox:stats().delayed == 1
    end })
    assert.equal(1, s.later)
    assert.equal(0, s.sent)
    pool:close()
    -- nothing holds it in memory now: a new worker process finds it due
    local st = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", outbox = url,
      outbox_name = name }).outbox:stats()
    assert.same({ 1, 1, 0 }, { st.depth, st.delayed, st.claimed })
    local _, out = worker(dir, url, "--until-empty")
    peers.wait_for(function() return (peers.read_file(out) or ""):find("outbox") end, 30, "the worker to end")
    assert.matches("1 sent", peers.read_file(out))
    local check = pool_for(f, url, { outbox_name = name })
    local o = assert(check:outcome(ids[1]))
    assert.equal("sent", o.status)
    assert.equal(2, o.attempts)
    assert.equal(1, #f:arrived())
    check:close()
  end)

  it("gives back a claimed message marked L to the queue, never out of every list", function()
    -- a message whose attempt was marked L and then failed before its
    -- final dot left, stopped before its retry (cancelled, or a refused
    -- configuration), is given back with its mark void; one given back
    -- with an L it did not write keeps it for the next claimer. Either way
    -- it is queued: it was left out of every list, never to get an outcome.
    local _, f, dir, url = setup()
    local name = dir:match("[^/]+$")
    local pool = pool_for(f, url, { outbox_name = name })
    local ids = enqueue(pool, 2)
    local admin = assert(require("smtppool.redis.client").new(url))
    local state = "smtppool:outbox:" .. name .. ":state"
    local got = assert(pool.outbox.q:claim(2))
    assert.equal(2, #got)
    for _, id in ipairs(ids) do assert.equal(1, admin:call("HSET", state, id, "L")) end
    assert.is_truthy(pool.outbox:unclaim({ ids[1] }, true))
    assert.is_truthy(pool.outbox:unclaim({ ids[2] }))
    local st = assert(pool.outbox:stats())
    assert.same({ 2, 2, 0 }, { st.depth, st.queued, st.claimed })
    assert.same({ ids[2], "L" }, admin:call("HGETALL", state))
    -- delivered: the void one once; the other too (resend_in_flight off only
    -- acts on a lease that ran out), and no mark outlives them
    local s = assert(pool:deliver{ until_empty = true })
    assert.equal(2, s.sent)
    for _, id in ipairs(ids) do assert.equal("sent", assert(pool:outcome(id)).status) end
    assert.equal(2, #f:arrived())
    assert.equal(0, admin:call("HLEN", state))
    pool:close()
    admin:close()
  end)

  it("a killed worker's in-flight messages end ambiguous, never sent twice; every other once", function()
    -- a slow server: each final dot waits a second for its reply
    local _, f, dir, url = setup({ rules = { { on = "DATA_END", ["do"] = "stall", seconds = 1, times = -1 } } })
    local name = dir:match("[^/]+$")
    local pool = pool_for(f, url, { outbox_name = name, outbox_lease = 2 })
    local ids = enqueue(pool, 30)
    local pid = worker(dir, url, "")
    -- kill it while it has dots on the wire
    peers.wait_for(function() return #f:arrived() >= 3 end, 30, "the worker to send a few")
    os.execute("kill -9 " .. pid)
    local before = #f:arrived()
    -- this process takes over once the leases run out
    local s = assert(pool:deliver{ until_empty = true })
    local per, total = f:per_recipient()
    local counts = { sent = 0, ambiguous = 0 }
    for _, id in ipairs(ids) do
      local o = assert(pool:outcome(id))
      counts[o.status] = (counts[o.status] or 0) + 1
    end
    -- at most its connections (2, no window over DATA) were in flight
    assert.truthy(counts.ambiguous >= 1 and counts.ambiguous <= 2, counts.ambiguous)
    assert.equal(30, counts.sent + counts.ambiguous)
    for addr, n in pairs(per) do assert.equal(1, n, addr) end
    -- every message reached the server at most once; the unambiguous ones exactly once
    assert.truthy(total >= 30 - counts.ambiguous and total <= 30)
    assert.truthy(before >= 3)
    assert.truthy(s.sent >= 30 - before - 2) -- this process sent what the killed one left
    pool:close()
  end)

  it("records every outcome when Redis forgets its scripts mid-delivery (written behind, then again)", function()
    local redis, f, dir, url = setup()
    local name = dir:match("[^/]+$")
    local pool = pool_for(f, url, { outbox_name = name })
    local ids = enqueue(pool, 80)
    local admin = assert(require("smtppool.redis.client").new(url))
    local n, flushed = 0, 0
    local s = assert(pool:deliver{ until_empty = true, on_result = function()
      n = n + 1
      -- outcomes, marks and claims are in flight unread: each flush makes
      -- them meet NOSCRIPT, and they go again
      if os.getenv("NOFLUSH") == nil and n % 20 == 5 then
        assert.equal("OK", admin:call("SCRIPT", "FLUSH"))
        flushed = flushed + 1
      end
    end })
    assert.equal(os.getenv("NOFLUSH") and 0 or 4, flushed)
    assert.equal(80, s.sent)
    local per, total = f:per_recipient()
    assert.equal(80, total)
    for i = 1, 80 do assert.equal(1, per[("r%d@y.test"):format(i)], i) end
    for _, id in ipairs(ids) do assert.equal("sent", assert(pool:outcome(id)).status) end
    local st = assert(pool.outbox:stats())
    assert.same({ 0, 80, 0 }, { st.depth, st.sent, st.claimed })
    -- no mark outlives its message
    local left = admin:call("HGETALL", "smtppool:outbox:" .. name .. ":state")
    assert.same({}, left)
    admin:close()
    pool:close()
    assert.truthy(redis)
  end)

  it("loses and doubles nothing when Redis restarts with AOF mid-delivery", function()
    local redis, f, dir, url = setup({ rules = { { on = "DATA_END", ["do"] = "stall", seconds = 0.05, times = -1 } } })
    local name = dir:match("[^/]+$")
    local pool = pool_for(f, url, { outbox_name = name })
    local ids = enqueue(pool, 200)
    local _, out = worker(dir, url, "--until-empty")
    peers.wait_for(function() return #f:arrived() >= 20 end, 30, "delivery to start")
    redis:kill()
    peers.sleep(1)
    redis:start()
    local ok_end = pcall(peers.wait_for, function() return (peers.read_file(out) or ""):find("outbox") end, 120, "")
    if not ok_end then
      local st = pool.outbox:stats() or {}
      error(("the worker did not end: %s; arrived %d; outbox depth %s queued %s delayed %s claimed %s sent %s")
        :format(tostring(peers.read_file(out)), #f:arrived(), tostring(st.depth), tostring(st.queued),
        tostring(st.delayed), tostring(st.claimed), tostring(st.sent)))
    end
    local per, total = f:per_recipient()
    assert.equal(200, total)
    for i = 1, 200 do assert.equal(1, per[("r%d@y.test"):format(i)], i) end
    for _, id in ipairs(ids) do assert.equal("sent", assert(pool:outcome(id)).status) end
    pool:close()
  end)
end)
