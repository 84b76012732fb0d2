-- The Lua API: misuse raises, bad input returns invalid and sends nothing.
local peers = require("peers")
local smtppool = require("smtppool")

describe("smtppool.new", function()
  it("raises on misuse", function()
    assert.has_error(function() smtppool.new() end, "smtppool.new: options must be a table, got nil")
    assert.has_error(function() smtppool.new{} end, "smtppool.new: option 'host' is required")
    assert.has_error(function() smtppool.new{ host = 1 } end, "smtppool.new: option 'host' must be a string, got number")
    assert.has_error(function() smtppool.new{ host = "h", port = "25" } end, "smtppool.new: option 'port' must be a number, got string")
    assert.has_error(function() smtppool.new{ host = "h", prot = 25 } end, "smtppool.new: unknown option 'prot'")
    assert.has_error(function() smtppool.new{ host = "h", timeouts = { mial = 3 } } end)
    assert.has_error(function() smtppool.new{ host = "h", timeouts = { mail = -1 } } end)
  end)

  it("returns config errors for impossible values", function()
    local p, err = smtppool.new{ host = "h", port = 70000, tls = "none" }
    assert.is_nil(p)
    assert.equal("config", err.kind)
    p, err = smtppool.new{ host = "h", tls = "sometimes" }
    assert.is_nil(p)
    assert.equal("config", err.kind)
  end)

  it("defaults to STARTTLS and refuses credentials in the clear unless allowed by name", function()
    local p = assert(smtppool.new{ host = "h" })
    assert.equal("starttls", p.conn_opts.tls_mode)
    local q, err = smtppool.new{ host = "h", tls = "none", auth = { user = "u", password = "p" } }
    assert.is_nil(q)
    assert.equal("config", err.kind)
    assert.matches("allow_plaintext_auth", err.text)
    assert.truthy(smtppool.new{ host = "h", tls = "none", auth = { user = "u", password = "p" },
      allow_plaintext_auth = true })
    assert.has_error(function() smtppool.new{ host = "h", auth = { user = "u" } } end)
    assert.has_error(function() smtppool.new{ host = "h", auth = { user = "u", password = "p", mechanism = "NTLM" } } end)
    assert.has_error(function() smtppool.new{ host = "h", insecure_skip_verify = "yes" } end)
  end)

  it("reports a CA file that cannot be read as a config error at new", function()
    local p, err = smtppool.new{ host = "h", ca_file = "/nonexistent/ca.pem" }
    assert.is_nil(p)
    assert.equal("config", err.kind)
    assert.matches("/nonexistent/ca.pem", err.text)
  end)

  it("makes error values that print as one line", function()
    local e = smtppool.error("transient", "try later", { phase = "mail", code = 451, enhanced = "4.3.0" })
    assert.is_true(smtppool.is_error(e))
    assert.equal("transient error in mail: 451 4.3.0 try later", tostring(e))
    assert.is_false(smtppool.is_error({ kind = "x" }))
  end)
end)

describe("send_raw input", function()
  local f, pool
  setup(function()
    f = peers.fault({})
    pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
  end)
  teardown(function()
    pool:close()
    f:stop()
  end)

  it("raises on wrong argument types", function()
    assert.has_error(function() pool:send_raw("x") end)
    assert.has_error(function() pool:send_raw{ from = 1, to = "b@y", data = "x" } end)
    assert.has_error(function() pool:send_raw{ from = "a@x", to = { 1 }, data = "x" } end)
    assert.has_error(function() pool:send_raw{ from = "a@x", to = "b@y" } end)
  end)

  local bad = {
    { "CRLF in a recipient (command injection)", { from = "a@x.test", to = { "b@y.test>\r\nRCPT TO:<evil@z.test" }, data = "x\r\n" } },
    { "CRLF in the sender", { from = "a@x.test\r\nRSET", to = { "b@y.test" }, data = "x\r\n" } },
    { "a bare LF in a recipient", { from = "a@x.test", to = { "b@y.test\nDATA" }, data = "x\r\n" } },
    { "a NUL in a recipient", { from = "a@x.test", to = { "b@y.test\0" }, data = "x\r\n" } },
    { "angle brackets in a recipient", { from = "a@x.test", to = { "<b@y.test>" }, data = "x\r\n" } },
    { "a NUL in the message", { from = "a@x.test", to = { "b@y.test" }, data = "a\0b\r\n" } },
    { "a line over 998 octets", { from = "a@x.test", to = { "b@y.test" }, data = "Subject: x\r\n\r\n" .. ("y"):rep(999) .. "\r\n" } },
    { "no recipients", { from = "a@x.test", to = {}, data = "x\r\n" } },
  }
  for _, c in ipairs(bad) do
    it("refuses " .. c[1] .. " with an invalid error and sends nothing", function()
      local res, err = pool:send_raw(c[2])
      assert.is_nil(res)
      assert.equal("invalid", err.kind)
      assert.equal(0, #f:select("cmd", { cmd = "MAIL" }))
    end)
  end

  it("still sends a good message on the same pool afterwards", function()
    local res, err = pool:send_raw{ from = "a@x.test", to = { "b@y.test" }, data = "Subject: ok\r\n\r\nfine\r\n" }
    assert.is_nil(err)
    assert.equal(250, res.code)
    assert.equal(1, #f:select("message"))
    assert.equal(1, pool:stats().opened)
  end)

  it("refuses messages after close", function()
    local p = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
    p:close()
    local res, err = p:send_raw{ from = "a@x.test", to = { "b@y.test" }, data = "x\r\n" }
    assert.is_nil(res)
    assert.equal("config", err.kind)
    assert.is_true(p:close())
  end)
end)

describe("the trace hook", function()
  local peers = require("peers")
  it("reports every protocol state change when trace = true, and nothing when off", function()
    local srv = peers.hostile({ quiet = true })
    for _, on in ipairs({ true, false }) do
      local trace = {}
      local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", helo = "t.test",
        trace = on or nil, on_event = function(ev)
          if ev.type == "trace" then trace[#trace + 1] = ev.from .. ">" .. ev.to .. (ev.code and ("/" .. ev.code) or "") end
        end })
      assert(pool:send_raw{ from = "a@x.test", to = "b@y.test", data = "Subject: t\r\n\r\nx\r\n" })
      pool:close()
      if on then
        assert.same({ "greeting>ehlo/220", "ehlo>ready/250", "ready>tx", "tx>body/354", "body>data_end",
                      "data_end>ready/250", "ready>quit", "quit>closed/221" }, trace)
      else
        assert.same({}, trace)
      end
    end
    srv:stop()
  end)
end)
