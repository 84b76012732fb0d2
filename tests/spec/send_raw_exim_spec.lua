-- send_raw against exim, a real MTA: what arrives is what was sent.
local peers = require("peers")
local smtppool = require("smtppool")

local function body_of(stored)
  -- exim stores LF line ends and prepends its own headers
  local _, e = stored:find("\n\n", 1, true)
  return stored:sub(e + 1)
end

describe("send_raw through exim", function()
  local exim
  setup(function() exim = peers.exim() end)
  teardown(function() if exim then exim:stop() end end)

  local function pool()
    return assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none", helo = "client.test" })
  end

  it("delivers a message whose dot lines survive byte for byte", function()
    local body = "First line\n.starts with a dot\n..two dots\n.\nlast . line\n"
    local data = "From: a@x.test\r\nTo: bob@y.test\r\nSubject: dots\r\nMessage-ID: <dots-1@x.test>\r\n\r\n"
      .. body:gsub("\n", "\r\n")
    local p = pool()
    local res, err = p:send_raw{ from = "a@x.test", to = { "bob@y.test" }, data = data }
    p:close()
    assert.is_nil(err)
    assert.equal(250, res.code)
    assert.equal(1, res.attempts)
    exim:wait_deliveries(1)
    assert.equal(1, #exim:log_lines("<= a@x%.test .* for bob@y%.test"))
    assert.equal(1, #exim:log_lines("=> %S+ <bob@y%.test>"))
    local found
    for _, m in ipairs(exim:messages()) do
      if m:find("Message-ID: <dots-1@x.test>", 1, true) then found = m end
    end
    assert.truthy(found, "message not in exim's maildir")
    assert.equal(body, body_of(found))
  end)

  it("sends to the accepted recipients and names the rejected one with its code", function()
    local before = exim:deliveries()
    local p = pool()
    local res, err = p:send_raw{ from = "a@x.test",
      to = { "carol@y.test", "reject-nobody@y.test", "dave@y.test" },
      data = "Subject: partial\r\nMessage-ID: <partial-1@x.test>\r\n\r\nhello\r\n" }
    p:close()
    assert.is_nil(err)
    assert.equal(3, #res.recipients)
    assert.equal(1, #res.rejected)
    local r = res.rejected[1]
    assert.equal("reject-nobody@y.test", r.address)
    assert.equal(550, r.code)
    assert.equal("5.1.1", r.enhanced)
    assert.is_false(r.ok)
    assert.is_true(res.recipients[1].ok)
    assert.is_true(res.recipients[3].ok)
    exim:wait_deliveries(before + 2)
    assert.equal(1, #exim:log_lines("=> %S+ <carol@y%.test>"))
    assert.equal(1, #exim:log_lines("=> %S+ <dave@y%.test>"))
    assert.equal(0, #exim:log_lines("=> .*reject%-nobody"))
  end)

  it("fails with a permanent rcpt error when every recipient is refused", function()
    local p = pool()
    local res, err = p:send_raw{ from = "a@x.test", to = { "reject-a@y.test", "reject-b@y.test" },
      data = "Subject: none\r\n\r\nx\r\n" }
    assert.is_nil(res)
    assert.equal("permanent", err.kind)
    assert.equal("rcpt", err.phase)
    assert.equal(550, err.code)
    assert.equal(2, #err.recipients)
    -- the connection was reset (RSET) and is still good for the next message
    local ok = p:send_raw{ from = "a@x.test", to = "erin@y.test", data = "Subject: after\r\n\r\nx\r\n" }
    assert.truthy(ok)
    assert.equal(1, p:stats().opened)
    p:close()
  end)

  it("passes DSN parameters to a server that offers DSN", function()
    local p = pool()
    local res, err = p:send{ from = "a@x.test", to = "gina@y.test", subject = "dsn", text = "x",
      dsn = { ret = "hdrs", envid = "campaign-7+x", notify = { "failure", "delay" }, orcpt = true } }
    p:close()
    assert.is_nil(err)
    assert.truthy(res)
    local q = pool()
    local r2, e2 = q:send{ from = "a@x.test", to = "b@y.test", dsn = { notify = { "sometimes" } } }
    q:close()
    assert.is_nil(r2)
    assert.equal("invalid", e2.kind)
  end)

  it("reports a 4xx recipient as transient", function()
    local p = pool()
    local res, err = p:send_raw{ from = "a@x.test", to = { "tempfail-x@y.test" }, data = "Subject: t\r\n\r\nx\r\n" }
    p:close()
    assert.is_nil(res)
    assert.equal("transient", err.kind)
    assert.equal(451, err.code)
  end)

  it("reuses one connection for consecutive messages and QUITs on close", function()
    local before = #exim:log_lines("closed by QUIT")
    local p = pool()
    for i = 1, 3 do
      assert.truthy(p:send_raw{ from = "a@x.test", to = "frank@y.test", data = "Subject: " .. i .. "\r\n\r\nx\r\n" })
    end
    local st = p:stats()
    assert.equal(1, st.opened)
    assert.equal(3, st.sent)
    p:close()
    assert.equal(1, p:stats().closed_by_us)
    assert.equal(0, p:stats().open)
    peers.wait_for(function() return #exim:log_lines("closed by QUIT") == before + 1 end, 10, "exim to log the QUIT")
  end)
end)
