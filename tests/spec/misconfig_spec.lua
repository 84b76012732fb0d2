-- The commonest misconfigurations fail fast, once, and say what to change
-- (issue 23): STARTTLS asked of an implicit-TLS port, implicit TLS asked of
-- a plaintext one, a host name that does not exist. A configuration-class
-- failure fails the call's queue once instead of once per message per retry.
local peers = require("peers")
local smtppool = require("smtppool")
local options = require("smtppool.options")
local core = require("smtppool.core")

local function list(n, tag)
  local l = {}
  for i = 1, n do
    l[i] = { from = "a@x.test", to = { ("%s%d@y.test"):format(tag, i) },
             data = ("Subject: %s %d\r\n\r\nbody\r\n"):format(tag, i) }
  end
  return l
end

-- Sends n raw messages as one batch; every outcome, the pool's stats and the time taken.
local function batch(p, n, tag)
  local outs = {}
  local t0 = core.now()
  p:send_batch(list(n, tag), { on_result = function(m, res, err) outs[#outs + 1] = { res = res, err = err } end })
  local dt = core.now() - t0
  local st = p:stats()
  p:close()
  return outs, st, dt
end

describe("a misconfigured TLS mode", function()
  local exim, certs
  setup(function()
    certs = peers.certs()
    exim = peers.exim({})
  end)
  teardown(function() if exim then exim:stop() end end)

  local function pool(o)
    local opts = { host = "127.0.0.1", ca_file = certs.ca, server_name = "localhost", max_conns = 2 }
    for k, v in pairs(o) do opts[k] = v end
    return assert(smtppool.new(opts))
  end

  it("STARTTLS (the default) at an implicit-TLS port: a config error naming tls = \"implicit\", no retries", function()
    -- the default greeting timeout is 30 s (core.default_timeouts); 2 s here
    -- keeps the spec short, the rule is the same
    local p = pool({ port = exim.tls_port, timeouts = { greeting = 2 } })
    local outs, st, dt = batch(p, 5, "silent")
    assert.equal(5, #outs)
    for _, o in ipairs(outs) do
      assert.is_nil(o.res)
      assert.equal("config", o.err.kind)
      assert.equal("greeting", o.err.phase)
      assert.matches('not one byte from the server.*set tls = "implicit"', o.err.text)
      assert.equal(1, o.err.attempts)
    end
    assert.equal(0, st.retried)
    assert.is_true(st.opened <= 2, "opened " .. st.opened) -- the first connections only
    assert.is_true(dt < 6, ("took %.1f s"):format(dt))   -- one greeting timeout, not three plus backoff
  end)

  it("implicit TLS at a plaintext port: a tls error naming tls = \"starttls\", at once, no retries", function()
    local p = pool({ port = exim.port, tls = "implicit" })
    local outs, st, dt = batch(p, 5, "plain")
    assert.equal(5, #outs)
    for _, o in ipairs(outs) do
      assert.equal("tls", o.err.kind)
      assert.matches('answered in plaintext.*tls = "starttls"', o.err.text)
      assert.equal(1, o.err.attempts)
    end
    assert.equal(0, st.retried)
    assert.is_true(dt < 5, ("took %.1f s"):format(dt))
  end)

  it("port 465 with no mode given is implicit TLS; a mode given by name wins", function()
    assert.equal("implicit", assert(options.resolve({ host = "h", port = 465 })).tls)
    assert.equal("starttls", assert(options.resolve({ host = "h", port = 465, tls = "starttls" })).tls)
    assert.equal("starttls", assert(options.resolve({ host = "h", port = 587 })).tls)
    assert.equal(465, assert(options.resolve({ host = "h", tls = "implicit" })).port)
  end)

  it("waits 30 s for a greeting by default, 5 minutes for the other commands", function()
    assert.equal(30, core.default_timeouts.greeting)
    assert.equal(300, core.default_timeouts.mail)
    assert.equal(600, core.default_timeouts.data_end)
  end)
end)

describe("a silent greeting after the server has greeted before", function()
  it("is a slow server, not a TLS mode: retried on a fresh connection, and the message goes", function()
    -- session 1 greets; session 2 says nothing for 3 s (greeting timeout 1 s)
    local srv = peers.fault({ rules = { { on = "greeting", session = 2, ["do"] = "stall", seconds = 3 } } })
    local ok, e = pcall(function()
      local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 1,
        max_messages_per_conn = 1, timeouts = { greeting = 1 },
        retry = smtppool.retry.backoff{ attempts = 3, base = 0.1 } })
      local outs, st = batch(p, 2, "slow")
      assert.equal(2, #outs)
      for _, o in ipairs(outs) do assert.truthy(o.res, o.err and tostring(o.err)) end
      assert.equal(1, st.retried)
      assert.equal(2, #srv:select("message"))
    end)
    srv:stop()
    assert(ok, e)
  end)
end)

describe("a host name that does not exist", function()
  it("fails the queue once with a config error, no retries", function()
    local dns = peers.dns({ names = { ["known.test"] = { a = "127.0.0.1" } } })
    local ok, e = pcall(function()
      local p = assert(smtppool.new{ host = "nx.test", port = 25, tls = "none", max_conns = 2,
        dns_servers = "127.0.0.1:" .. dns.port })
      local outs, st, dt = batch(p, 4, "nx")
      assert.equal(4, #outs)
      for _, o in ipairs(outs) do
        assert.equal("config", o.err.kind)
        assert.matches("cannot resolve nx%.test", o.err.text)
        assert.equal(1, o.err.attempts)
      end
      assert.equal(0, st.retried)
      assert.is_true(dt < 5, ("took %.1f s"):format(dt))
    end)
    dns:stop()
    assert(ok, e)
  end)
end)

describe("a campaign with a misconfigured TLS mode", function()
  it("stops at once with every row still pending, and a resume with the mode fixed sends each once", function()
    local exim = peers.exim({})
    local dir = peers.tmpdir()
    local ok, e = pcall(function()
      local f = assert(io.open(dir .. "/list.csv", "wb"))
      f:write("email,name\n")
      for i = 1, 30 do f:write(("m%d@y.test,User %d\n"):format(i, i)) end
      f:close()
      local function run(tls)
        local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = tls, max_conns = 2,
          ca_file = peers.certs().ca, server_name = "localhost" })
        local report = assert(smtppool.campaign{ pool = pool, recipients = dir .. "/list.csv", journal = dir .. "/j",
          progress = false,
          message = { from = "news@x.test", subject = "Hi {{name}}", text = "Dear {{name}}" } }:run())
        pool:close()
        return report
      end
      local r = run("implicit") -- exim's plaintext port
      assert.equal("config", r.stopped)
      assert.matches('tls = "starttls"', r.config_error)
      assert.equal(0, r.failed)
      assert.equal(0, r.sent)
      assert.equal(30, r.pending)
      assert.matches("stopped: .*fix the configuration and run again with %-%-resume", smtppool.campaign.summary(r))
      r = run("starttls")
      assert.is_nil(r.stopped)
      assert.equal(30, r.sent)
      exim:wait_deliveries(30, 30)
      assert.equal(30, exim:deliveries())
    end)
    exim:stop()
    os.execute("rm -rf " .. peers.quote(dir))
    assert(ok, e)
  end)
end)
