-- pool:verify() (connect, TLS, AUTH, QUIT: what the server offers) and
-- pool:metrics() (Prometheus text), against exim and dead or hostile servers.
local peers = require("peers")
local smtppool = require("smtppool")

describe("pool:verify", function()
  local exim, certs
  setup(function()
    exim = peers.exim({})
    certs = peers.certs()
  end)
  teardown(function() exim:stop() end)

  local function pool(o)
    local opts = { host = "127.0.0.1", port = exim.port, ca_file = certs.ca, server_name = "localhost" }
    for k, v in pairs(o or {}) do opts[k] = v end
    return assert(smtppool.new(opts))
  end

  it("reports TLS, the AUTH mechanism and what the server offers, and sends nothing", function()
    local p = pool({ auth = { user = "alice", password = "s3cret" } })
    local before = exim:deliveries()
    local r = assert(p:verify())
    local st = p:stats()
    p:close()
    assert.is_true(r.tls)
    assert.equal("CRAM-MD5", r.auth)
    assert.is_true(r.pipelining)
    assert.is_boolean(r.chunking)
    assert.is_true(r.caps.auth) -- the caps after STARTTLS (RFC 3207 5: EHLO again)
    assert.same({ "CRAM-MD5", "LOGIN", "PLAIN" }, r.auth_mechanisms)
    assert.is_true(r.elapsed > 0)
    assert.equal(0, st.open)
    assert.equal(1, st.opened)
    assert.equal(before, exim:deliveries())
    -- the session ended with QUIT, not a dropped connection
    assert.equal(0, st.closed_by_server)
  end)

  it("gives the error a message would have met: a wrong password, a bad certificate, a dead port", function()
    local _, e = pool({ auth = { user = "alice", password = "nope-nope" } }):verify()
    assert.equal("auth", e.kind)
    assert.equal(535, e.code)
    _, e = pool({ ca_file = certs.other_ca }):verify()
    assert.equal("tls", e.kind)
    _, e = assert(smtppool.new{ host = "127.0.0.1", port = peers.free_port(), tls = "none" }):verify()
    assert.equal("connection", e.kind)
    assert.equal("connect", e.phase)
  end)

  it("times out a server that never finishes its greeting", function()
    local srv = peers.hostile({ drip = { phase = "greeting", interval = 0.5 } })
    finally(function() srv:stop() end)
    local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", timeouts = { greeting = 1 } })
    local t0 = require("smtppool.core").now()
    local r, e = p:verify()
    assert.is_nil(r)
    assert.equal("connection", e.kind)
    assert.is_true(require("smtppool.core").now() - t0 < 3)
  end)
end)

describe("pool:metrics", function()
  it("writes the counters in the Prometheus text format with constant labels", function()
    local srv = peers.hostile({ quiet = true })
    finally(function() srv:stop() end)
    local p = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none" })
    assert(p:send_raw{ from = "a@x.test", to = "b@y.test", data = "Subject: m\r\n\r\nx\r\n" })
    local text = p:metrics("sp_", { relay = 'main "1"' })
    p:close()
    assert.matches('# TYPE sp_messages_sent_total counter\nsp_messages_sent_total{relay="main \\"1\\""} 1\n', text, 1, true)
    assert.matches("# TYPE sp_connections_open gauge", text, 1, true)
    for line in text:gmatch("[^\n]+") do
      assert.is_truthy(line:match("^# HELP ") or line:match("^# TYPE ") or line:match("^sp_[%w_]+{.-} [%d.]+$"), line)
    end
    assert.has_error(function() p:metrics("bad prefix") end)
  end)
end)
