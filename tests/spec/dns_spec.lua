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
