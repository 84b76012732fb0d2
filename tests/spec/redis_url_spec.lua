-- Redis as managed services hand it out (issue 23): URLs with an ACL user
-- and percent-escaped passwords, and a refused login that is a config error
-- at once (never a pause until wait_timeout), for the client, a pool's
-- shared limits and a campaign in Redis.
local peers = require("peers")
local smtppool = require("smtppool")
local client = require("smtppool.redis.client")
local core = require("smtppool.core")

describe("Redis URLs", function()
  it("read a user and a password, percent-decoded, a password alone, IPv6 literals and rediss://", function()
    local u = assert(client.parse_url("redis://app:p%40ss%3Aw%2Frd@10.0.0.5:6380/2"))
    assert.same({ host = "10.0.0.5", port = 6380, db = 2, user = "app", password = "p@ss:w/rd" }, u)
    u = assert(client.parse_url("redis://:secret@h"))
    assert.same({ host = "h", port = 6379, db = 0, password = "secret" }, u)
    u = assert(client.parse_url("redis://secret@h:1/0")) -- a password alone, as before
    assert.same({ host = "h", port = 1, db = 0, password = "secret" }, u)
    u = assert(client.parse_url("rediss://default:pw@[::1]:6390/1"))
    assert.same({ host = "::1", port = 6390, db = 1, user = "default", password = "pw", tls = {} }, u)
    u = assert(client.parse_url("rediss://h/0?ca_file=%2Fetc%2Fca.pem&server_name=r.test&insecure_skip_verify=false"))
    assert.same({ ca_file = "/etc/ca.pem", server_name = "r.test", insecure_skip_verify = false }, u.tls)
    assert.is_nil(client.parse_url("redis://h/0?ca_file=/x")) -- TLS parameters without TLS
    assert.is_nil(client.parse_url("rediss://h/0?verify=no"))
    assert.is_true(client.is_url("rediss://h"))
    assert.is_false(client.is_url("http://h"))
  end)

  it("refuse what they cannot read without showing the password", function()
    local u, e = client.parse_url("redis://app:pw%zz-top-secret@h")
    assert.is_nil(u)
    assert.matches("bad %%%-escape", e)
    assert.falsy(e:find("top-secret", 1, true))
    u, e = client.parse_url("redis://app:top-secret@h:port")
    assert.is_nil(u)
    assert.falsy(e:find("top-secret", 1, true))
    assert.matches("app:%*%*%*@", e)
    u, e = client.parse_url("memcache://top-secret@h")
    assert.is_nil(u)
    assert.matches("redis:// or rediss://", e)
    assert.falsy(e:find("top-secret", 1, true))
    -- a password alone (no ':') is hidden whole too
    u, e = client.parse_url("redis://top-secret@h:port")
    assert.is_nil(u)
    assert.falsy(e:find("top-secret", 1, true))
    assert.matches("redis://%*%*%*@h:port", e)
    assert.equal("redis://***@h:1/0", client.redact("redis://top-secret@h:1/0"))
  end)
end)

describe("Redis logins", function()
  local r
  setup(function()
    r = peers.redis({ persist = false, password = "admin-pw" })
    local admin = assert(client.new(("redis://:admin-pw@127.0.0.1:%d"):format(r.port)))
    assert.equal("OK", admin:call("ACL", "SETUSER", "app", "on", ">p@ss:w/rd", "~*", "+@all"))
    admin:close()
  end)
  teardown(function() r:stop() end)

  it("log in as an ACL user with an escaped password", function()
    local c = assert(client.new(("redis://app:p%%40ss%%3Aw%%2Frd@127.0.0.1:%d/0"):format(r.port)))
    assert.is_true(c:connect())
    assert.equal("app", c:call("ACL", "WHOAMI"))
    c:close()
  end)

  it("say a refused login is one, and never show the password", function()
    local c = assert(client.new(("redis://app:wrong-SECRET@127.0.0.1:%d/0"):format(r.port)))
    local ok, e, why = c:connect()
    assert.is_nil(ok)
    assert.equal("login", why)
    assert.matches("^Redis refused the login: redis: WRONGPASS", e)
    assert.falsy(e:find("wrong-SECRET", 1, true))
    local v, e2, why2 = c:call("PING")
    assert.is_nil(v)
    assert.equal("login", why2)
    assert.matches("refused the login", e2)
    c:close()
  end)

  it("fail a pool's queue at once with a config error when the shared limits' login is refused", function()
    local srv = peers.fault({})
    local ok, e = pcall(function()
      local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none",
        rate = { backend = ("redis://app:wrong-SECRET@127.0.0.1:%d/0"):format(r.port), key = "acl1",
                 messages = { 100, 1 } } })
      local t0 = core.now()
      local outs = {}
      p:send_batch({ { from = "a@x.test", to = { "b1@y.test" }, subject = "s", text = "t" },
                     { from = "a@x.test", to = { "b2@y.test" }, subject = "s", text = "t" } },
        { on_result = function(_, res, err) outs[#outs + 1] = err or res end })
      local dt = core.now() - t0
      p:close()
      assert.equal(2, #outs)
      for _, err in ipairs(outs) do
        assert.equal("config", err.kind)
        assert.matches("Redis refused the login", err.text)
        assert.falsy(err.text:find("wrong-SECRET", 1, true))
      end
      assert.is_true(dt < 5, ("took %.1f s (wait_timeout is 60)"):format(dt))
      assert.equal(0, #srv:select("connect"))
    end)
    srv:stop()
    assert(ok, e)
  end)

  it("refuse to open a campaign in Redis at once when the login is refused", function()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = 9, tls = "none" })
    local dir = peers.tmpdir()
    peers.write_file(dir .. "/list.csv", "email\nx@y.test\n")
    local t0 = core.now()
    local rep, err = smtppool.campaign{ pool = pool, recipients = dir .. "/list.csv", name = "acl",
      journal = ("redis://app:wrong-SECRET@127.0.0.1:%d/0"):format(r.port), progress = false,
      message = { from = "a@x.test", subject = "s", text = "t" } }:run()
    pool:close()
    os.execute("rm -rf " .. peers.quote(dir))
    assert.is_nil(rep)
    assert.equal("config", err.kind)
    assert.matches("Redis refused the login", err.text)
    assert.falsy(err.text:find("wrong-SECRET", 1, true))
    assert.is_true(core.now() - t0 < 5)
  end)
end)

describe("rediss://", function()
  local r, certs
  setup(function()
    certs = peers.certs()
    r = peers.redis({ persist = false, password = "tls-pw", tls = certs })
  end)
  teardown(function() r:stop() end)

  local function url(q) return ("rediss://:tls-pw@127.0.0.1:%d/0%s"):format(r.port, q or "") end

  it("speaks TLS with the certificate verified against the URL's CA, and runs scripts over it", function()
    local c = assert(client.new(url("?ca_file=" .. certs.ca)))
    assert.equal("PONG", c:call("PING"))
    assert.equal(3, c:script("bump", "return redis.call('INCRBY', KEYS[1], ARGV[1])", { "n" }, { "3" }))
    assert.same({ "OK", "v" }, c:pipeline({ { "SET", "k", "v" }, { "GET", "k" } }))
    c:close()
  end)

  it("refuses a certificate from an unknown CA or for another name, unless told by name", function()
    for _, q in ipairs({ "?ca_file=" .. certs.other_ca, "", "?ca_file=" .. certs.ca .. "&server_name=other.test" }) do
      local c = assert(client.new(url(q)))
      local ok, e, why = c:connect()
      assert.is_nil(ok, q)
      assert.matches("TLS handshake: certificate verification failed", e)
      assert.falsy(e:find("tls-pw", 1, true))
      -- the configuration's, as a refused login: not an outage to wait out
      assert.equal("tls", why)
      assert.is_true(client.misconfigured(why))
      c:close()
    end
    -- an outbox behind it fails at once as a configuration error
    local t0 = require("smtppool.core").now()
    local p = assert(smtppool.new{ host = "127.0.0.1", port = 25, tls = "none", allow_volatile_redis = true,
      outbox = url("?ca_file=" .. certs.ca .. "&server_name=other.test") })
    local id, perr = p:enqueue{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" }
    p:close()
    assert.is_nil(id)
    assert.equal("config", perr.kind, tostring(perr))
    assert.is_true(require("smtppool.core").now() - t0 < 5)
    local c = assert(client.new(url("?insecure_skip_verify=true")))
    assert.equal("PONG", c:call("PING"))
    c:close()
  end)

  it("carries a pool's shared limits and a campaign in Redis", function()
    local srv = peers.fault({})
    local dir = peers.tmpdir()
    local ok, e = pcall(function()
      local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 2,
        rate = { backend = url("?ca_file=" .. certs.ca), key = "tls1", messages = { 1000, 1 } } })
      peers.write_file(dir .. "/list.csv", "email\nt1@y.test\nt2@y.test\nt3@y.test\n")
      local rep = assert(smtppool.campaign{ pool = p, recipients = dir .. "/list.csv", name = "tlscamp",
        journal = url("?ca_file=" .. certs.ca), progress = false, allow_volatile_redis = true,
        message = { from = "a@x.test", subject = "s", text = "t" } }:run())
      p:close()
      assert.equal(3, rep.sent)
      assert.equal(3, #srv:select("message"))
    end)
    srv:stop()
    os.execute("rm -rf " .. peers.quote(dir))
    assert(ok, e)
  end)
end)
