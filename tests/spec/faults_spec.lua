-- The fault server: malformed replies, dropped connections, pipelining
-- seen from the server's side.
local peers = require("peers")
local smtppool = require("smtppool")

local MSG = { from = "a@x.test", to = { "b@y.test", "c@y.test" }, data = "Subject: t\r\n\r\nbody\r\n" }

-- Runs one send_raw against a fault server with the given script.
local function run(script, opts)
  local f = peers.fault(script)
  local o = { host = "127.0.0.1", port = f.port, tls = "none", helo = "client.test", retry = smtppool.retry.none() }
  for k, v in pairs(opts or {}) do o[k] = v end
  local pool = assert(smtppool.new(o))
  local res, err = pool:send_raw(MSG)
  local stats = pool:stats()
  pool:close()
  local events = f:events()
  f:stop()
  return res, err, events, stats
end

local function pick(events, ev, field, value)
  local out = {}
  for _, e in ipairs(events) do
    if e.ev == ev and (not field or e[field] == value) then out[#out + 1] = e end
  end
  return out
end

describe("malformed replies", function()
  local cases = {
    { "no code", { on = "greeting", ["do"] = "raw", bytes = "hello there\r\n" }, "protocol", "greeting", "3%-digit code" },
    { "bad continuation", { on = "MAIL", ["do"] = "raw", bytes = "250-ok\r\n251 changed\r\n" }, "protocol", "mail", "changes the reply code" },
    { "a 100 KB line", { on = "EHLO", ["do"] = "raw", bytes = "250-", repeat_ = true }, "protocol", "ehlo", "longer than" },
    { "EOF mid-reply", { on = "RCPT", ["do"] = "raw", bytes = "250-first line\r\n250 unfinished", close = true }, "connection", "rcpt", "middle of a reply" },
    { "non-ASCII", { on = "DATA", ["do"] = "raw", bytes = "354 d\195\169j\195\160 vu\r\n" }, "protocol", "data", "non%-ASCII" },
  }
  for _, c in ipairs(cases) do
    it("gives an error value for " .. c[1], function()
      local rule = c[2]
      if rule.repeat_ then
        rule.repeat_ = nil
        rule.bytes = "250 " .. string.rep("x", 100 * 1024) .. "\r\n"
      end
      local res, err, events, stats = run({ rules = { rule } })
      assert.is_nil(res)
      assert.equal(c[3], err.kind)
      assert.equal(c[4], err.phase)
      assert.matches(c[5], err.text)
      assert.equal(1, err.attempts)
      assert.matches("^" .. c[3] .. " error in " .. c[4] .. ":", tostring(err))
      -- the connection was thrown away, not reused
      assert.equal(1, stats.closed_by_server)
      assert.equal(0, stats.open)
      assert.equal(0, #pick(events, "message"))
    end)
  end
end)

describe("connection faults", function()
  it("421 at MAIL is a connection error and the connection is discarded", function()
    local res, err, events, stats = run({ rules = { { on = "MAIL", ["do"] = "reply", text = "421 4.7.0 Maximum message count per session reached" } } })
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("mail", err.phase)
    assert.equal(421, err.code)
    assert.equal("4.7.0", err.enhanced)
    assert.equal(0, stats.open)
    assert.equal(0, #pick(events, "cmd", "cmd", "QUIT"))
  end)

  it("EOF after the final dot is ambiguous", function()
    local res, err, events = run({ rules = { { on = "DATA_END", ["do"] = "eof" } } })
    assert.is_nil(res)
    assert.equal("ambiguous", err.kind)
    assert.equal("data_end", err.phase)
    -- the server did receive it: exactly the case ambiguity exists for
    assert.equal(1, #pick(events, "message"))
  end)

  it("a reset at RCPT is a connection error", function()
    local res, err = run({ rules = { { on = "RCPT", ["do"] = "reset" } } })
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("rcpt", err.phase)
  end)

  it("a stalled greeting times out within the configured reply timeout", function()
    local t0 = os.time()
    local res, err = run({ rules = { { on = "greeting", ["do"] = "stall", seconds = 30 } } },
      { timeouts = { greeting = 0.5 } })
    assert.is_nil(res)
    -- not one byte from a server this pool never met: the TLS mode's, most
    -- likely (misconfig_spec), so the configuration's, and said so
    assert.equal("config", err.kind)
    assert.equal("greeting", err.phase)
    assert.matches('no greeting within 0%.5s, and not one byte.*tls = "implicit"', err.text)
    assert.is_true(os.time() - t0 <= 10)
  end)

  it("a dead server is a connection error in the connect phase", function()
    local port = peers.free_port()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none", retry = smtppool.retry.none() })
    local res, err = pool:send_raw(MSG)
    pool:close()
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("connect", err.phase)
    assert.matches("refused", err.text)
  end)

  it("a host the resolver cannot answer for is a connection error (a name that does not exist: dns_spec)", function()
    -- no DNS server listens there: the lookup fails, and may work next time
    local pool = assert(smtppool.new{ host = "no-such-host.test", port = 25, tls = "none", retry = smtppool.retry.none(),
      dns_servers = "127.0.0.1:" .. peers.free_port(), connect_timeout = 3 })
    local res, err = pool:send_raw(MSG)
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("connect", err.phase)
    pool:close()
  end)
end)

describe("protocol features", function()
  it("pipelines MAIL, every RCPT and DATA in one write when PIPELINING is offered", function()
    local res, err, events = run({ pipelining = true })
    assert.is_nil(err)
    assert.equal(250, res.code)
    local group
    for _, e in ipairs(pick(events, "chunk")) do
      if e.data:find("MAIL FROM", 1, true) then group = e.data end
    end
    assert.equal("MAIL FROM:<a@x.test> SIZE=20\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n", group)
  end)

  it("waits for each reply when PIPELINING is not offered", function()
    local res, err, events = run({ pipelining = false })
    assert.is_nil(err)
    assert.truthy(res)
    local commands = 0
    for _, e in ipairs(pick(events, "chunk")) do
      if e.data:find("^MAIL FROM") or e.data:find("^RCPT TO") then
        commands = commands + 1
        assert.equal(1, select(2, e.data:gsub("\r\n", "")), "more than one command in one write: " .. e.data)
      end
    end
    assert.equal(3, commands)
  end)

  it("falls back to HELO when EHLO is refused", function()
    local res, err, events = run({ ehlo = "refuse" })
    assert.is_nil(err)
    assert.truthy(res)
    assert.equal(1, #pick(events, "cmd", "cmd", "HELO"))
    assert.equal(1, #pick(events, "message"))
  end)

  it("sends bodies in 8-bit only with BODY=8BITMIME", function()
    local f = peers.fault({})
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
    local res, err = pool:send_raw{ from = "a@x.test", to = "b@y.test", data = "Subject: caf\195\169\r\n\r\ncaf\195\169\r\n" }
    pool:close()
    local mail = f:select("cmd", { cmd = "MAIL" })
    f:stop()
    assert.is_nil(err)
    assert.truthy(res)
    assert.matches("BODY=8BITMIME", mail[1].arg)
  end)
end)
