-- Names resolve without blocking the loop (c-ares in the native driver):
-- against a DNS server the spec runs, with answers that come late, never,
-- or as NXDOMAIN.
local peers = require("peers")
local smtppool = require("smtppool")
local core = require("smtppool.core")

local function msg(i)
  return { from = "a@x.test", to = { ("r%d@y.test"):format(i) }, data = ("Subject: %d\r\n\r\nbody\r\n"):format(i) }
end

describe("name resolution", function()
  local dns, srv
  setup(function()
    dns = peers.dns({ names = {
      ["fast.test"] = { a = "127.0.0.1" },
      ["slow.test"] = { a = "127.0.0.1", delay = 1.5 },
      ["never.test"] = { a = "127.0.0.1", delay = 30 },
    } })
    srv = peers.hostile({ quiet = true })
  end)
  teardown(function()
    dns:stop()
    srv:stop()
  end)

  local function pool(host, o)
    local opts = { host = host, port = srv.port, tls = "none", dns_servers = "127.0.0.1:" .. dns.port,
                   retry = smtppool.retry.none() }
    for k, v in pairs(o or {}) do opts[k] = v end
    return assert(smtppool.new(opts))
  end

  it("resolves a name through the given DNS server and sends", function()
    local p = pool("fast.test")
    local res, err = p:send_raw(msg(1))
    p:close()
    assert.is_nil(err)
    assert.equal(250, res.code)
    local asked = {}
    for _, e in ipairs(dns:select("query")) do asked[e.name] = true end
    assert.is_true(asked["fast.test"])
  end)

  it("keeps serving other connections while a name resolves slowly", function()
    -- two relays in one loop: one behind a 1.5 s lookup, one by address
    local g = assert(smtppool.relays({
      { name = "slow", host = "slow.test", port = srv.port, tls = "none", dns_servers = "127.0.0.1:" .. dns.port },
      { name = "fast", host = "127.0.0.1", port = srv.port, tls = "none" },
    }, { spread = true }))
    local list = {}
    for i = 1, 20 do list[i] = msg(i) end
    local t0 = core.now()
    local last = { slow = 0, fast = 0 }
    local first_slow
    local summary = g:send_batch(list, { on_result = function(_, res, err)
      assert.truthy(res, tostring(err))
      local dt = core.now() - t0
      last[res.relay] = math.max(last[res.relay], dt)
      if res.relay == "slow" then first_slow = first_slow or dt end
    end })
    g:close()
    assert.same({ sent = 20, failed = 0, cancelled = 0, total = 20 }, summary)
    assert.is_true(first_slow >= 1.4, "the slow relay sent before its name resolved: " .. first_slow)
    assert.is_true(last.fast < 1.0, "the fast relay waited for the lookup: " .. last.fast)
  end)

  it("fails a lookup that outlasts connect_timeout as a connection error, in time", function()
    local p = pool("never.test", { connect_timeout = 0.5 })
    local t0 = core.now()
    local res, err = p:send_raw(msg(1))
    local dt = core.now() - t0
    p:close()
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("connect", err.phase)
    assert.matches("resolving never.test timed out", err.text)
    assert.is_true(dt >= 0.45 and dt < 3, "took " .. dt)
  end)

  it("fails a name that does not exist with a clear error", function()
    local p = pool("nx.test")
    local res, err = p:send_raw(msg(1))
    p:close()
    assert.is_nil(res)
    assert.equal("config", err.kind) -- NXDOMAIN: trying again cannot help
    assert.matches("cannot resolve nx.test port %d+", err.text)
  end)

  it("finds localhost in /etc/hosts without a DNS server", function()
    local p = assert(smtppool.new{ host = "localhost", port = srv.port, tls = "none" })
    local res, err = p:send_raw(msg(2))
    p:close()
    assert.is_nil(err)
    assert.equal(250, res.code)
  end)

  it("refuses a malformed dns_servers list", function()
    local p = pool("fast.test", { dns_servers = "not an address" })
    local res, err = p:send_raw(msg(3))
    p:close()
    assert.is_nil(res)
    assert.equal("config", err.kind)
    assert.matches("resolver", err.text)
  end)
end)

describe("the Redis host's name", function()
  local client = require("smtppool.redis.client")
  local loop = require("smtppool.engine.loop")
  local dns, r
  setup(function()
    dns = peers.dns({ names = {
      ["redis.test"] = { a = "127.0.0.1" },
      ["slow-redis.test"] = { a = "127.0.0.1", delay = 1.0 },
      ["never.test"] = { a = "127.0.0.1", delay = 30 },
    } })
    r = peers.redis({ persist = false })
  end)
  teardown(function()
    dns:stop()
    r:stop()
  end)

  local function new(host, timeout)
    return client.new(("redis://%s:%d/0"):format(host, r.port),
      { dns_servers = "127.0.0.1:" .. dns.port, timeout = timeout or 3 })
  end

  it("resolves on the loop while the loop's other tasks go on", function()
    local c = new("slow-redis.test")
    local l = loop.new(require("smtppool.driver.native"))
    local pong, err, took, ticks, done
    l:spawn(function()
      local t0 = core.now()
      pong, err = c:call("PING")
      took = core.now() - t0
      done = true
    end)
    l:spawn(function()
      -- another task of the loop: it must keep running during the lookup
      ticks = 0
      local deadline = core.now() + 5
      while not done and core.now() < deadline do
        loop.sleep(0.05)
        ticks = ticks + 1
      end
    end)
    assert.is_nil(l:run())
    c:close()
    assert.equal("PONG", pong, tostring(err))
    assert.is_true(took >= 0.9, "answered before the name resolved: " .. took)
    assert.is_true(ticks >= 10, "the loop was held during the lookup: " .. ticks .. " ticks in " .. took .. " s")
  end)

  it("resolves outside a loop too, and a name that never answers times out within the client's timeout", function()
    local c = new("redis.test")
    assert.equal("PONG", (c:call("PING")))
    c:close()
    local slow = new("never.test", 0.5)
    local t0 = core.now()
    local v, err = slow:call("PING")
    local dt = core.now() - t0
    slow:close()
    assert.is_nil(v)
    assert.matches("resolving never.test timed out", err)
    assert.is_true(dt >= 0.45 and dt < 3, "took " .. dt)
  end)

  it("fails a name that does not exist with a clear error", function()
    local c = new("nx.test")
    local v, err = c:call("PING")
    c:close()
    assert.is_nil(v)
    assert.matches("cannot resolve nx.test port %d+", err)
  end)

  it("reaches a pool's shared limits by a name, through the pool's dns_servers", function()
    local srv = peers.hostile({ quiet = true })
    local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", dns_servers = "127.0.0.1:" .. dns.port,
      rate = { backend = ("redis://redis.test:%d/0"):format(r.port), key = "dns-spec", messages_per_sec = 100 } })
    local res, err = p:send_raw(msg(1))
    p:close()
    srv:stop()
    assert.is_nil(err)
    assert.equal(250, res.code)
    local direct = client.new(("redis://127.0.0.1:%d/0"):format(r.port))
    local keys = assert(direct:call("KEYS", "smtppool:dns-spec:*"))
    direct:close()
    assert.is_true(#keys > 0, "nothing was written to Redis")
  end)

  it("reaches a campaign's Redis journal by a name, through the pool's dns_servers", function()
    local srv = peers.hostile({ quiet = true })
    local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", dns_servers = "127.0.0.1:" .. dns.port })
    local report, err = smtppool.campaign{ pool = p, name = "dns-spec-campaign", allow_volatile_redis = true,
      journal = ("redis://redis.test:%d/0"):format(r.port), progress = false,
      recipients = { { email = "a@x.test" }, { email = "b@x.test" } },
      message = { from = "n@x.test", subject = "s", text = "t" } }:run()
    p:close()
    srv:stop()
    assert.is_nil(err)
    assert.equal(2, report.sent)
    assert(smtppool.campaign.purge(("redis://127.0.0.1:%d/0"):format(r.port), "dns-spec-campaign", true))
  end)
end)
