-- The sans-IO protocol machine driven from Lua: the same machine the
-- OpenResty driver and the fuzzers feed.
local core = require("smtppool.core")

local function ready_session(ehlo)
  local s = core.session{ helo = "client.test" }
  assert.is_true(s:feed("220 mx.test ESMTP\r\n"))
  assert.equal("EHLO client.test\r\n", s:output())
  s:feed(ehlo or "250-mx.test\r\n250 PIPELINING\r\n")
  assert.equal("ready", s:next_event())
  return s
end

describe("the protocol machine from Lua", function()
  local malformed = {
    { "no code", "hello\r\n", "protocol", "3%-digit" },
    { "bad continuation", "250-a\r\n354 b\r\n", "protocol", "changes the reply code" },
    { "a 100 KB line", "250 " .. ("x"):rep(100 * 1024) .. "\r\n", "protocol", "longer than" },
    { "non-ASCII", "250 \195\169\r\n", "protocol", "non%-ASCII" },
  }
  for _, c in ipairs(malformed) do
    it("turns " .. c[1] .. " into an error value with kind and phase", function()
      local s = ready_session()
      assert.truthy(s:start("a@x.test", { "b@y.test" }, "hi\r\n"))
      s:output()
      assert.is_false(s:feed(c[2]))
      assert.equal("tx", s:next_event())
      assert.equal("error", s:next_event())
      local e = s:error()
      assert.equal(c[3], e.kind)
      assert.equal("mail", e.phase)
      assert.matches(c[4], e.text)
      assert.equal("dead", s:state())
      local t = s:tx()
      assert.is_false(t.ok)
      assert.equal(c[3], t.err.kind)
    end)
  end

  it("reports EOF mid-reply as a lost connection in the phase it happened", function()
    local s = ready_session()
    s:start("a@x.test", { "b@y.test" }, "hi\r\n")
    s:output()
    s:feed("250 ok\r\n250-partial")
    assert.is_false(s:eof())
    assert.equal("tx", s:next_event())
    local e = s:error()
    assert.equal("connection", e.kind)
    assert.equal("rcpt", e.phase)
    assert.matches("middle of a reply", e.text)
  end)

  it("runs a pipelined transaction and returns per-recipient results", function()
    local s = ready_session()
    assert.truthy(s:start("a@x.test", { "b@y.test", "bad@y.test" }, "x"))
    assert.equal("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<bad@y.test>\r\nDATA\r\n", s:output())
    s:feed("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
    assert.equal("body", s:next_event())
    s:body(".hidden\n")
    s:body_end()
    assert.equal("next", s:next_event()) -- PIPELINING: another transaction could follow the dot now
    assert.equal("..hidden\r\n.\r\n", s:output())
    s:feed("250 2.0.0 queued\r\n")
    assert.equal("tx", s:next_event())
    local t = s:tx()
    assert.is_true(t.ok)
    assert.equal("queued", t.text)
    assert.equal(550, t.recipients[2].code)
    assert.equal("5.1.1", t.recipients[2].enhanced)
    assert.equal("unknown", t.recipients[2].text)
    assert.equal("ready", s:next_event())
  end)

  it("parses the server's capabilities", function()
    local s = ready_session("250-mx\r\n250-SIZE 1000\r\n250-AUTH PLAIN LOGIN\r\n250-LIMITS MAILMAX=5\r\n250 CHUNKING\r\n")
    local c = s:caps()
    assert.equal(1000, c.size_max)
    assert.is_true(c.auth_mechs.PLAIN)
    assert.equal(5, c.mailmax)
    assert.is_true(c.chunking)
    assert.is_nil(c.pipelining)
  end)

  it("dot-stuffs and base64-encodes", function()
    assert.equal("..a\r\nb\r\n.\r\n", core.dotstuff(".a\nb"))
    assert.equal("Zm9vYmFy", core.base64_encode("foobar"))
    assert.equal("foobar", core.base64_decode("Zm9vYmFy"))
    assert.is_nil(core.base64_decode("!!"))
  end)
end)

-- The transaction methods a driver written in Lua uses (the OpenResty
-- driver): the session feeds the body itself, and only bytes the driver says
-- were written count as sent, so a write that fails before the final dot has
-- fully left is a connection error (retried), never ambiguous.
describe("the socketless session's transaction methods", function()
  local function to_body(s, data)
    assert.is_true(s:send("a@x.test", { "b@y.test" }, data))
    local cmds = s:pending()
    assert.equal("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n", cmds)
    s:written(#cmds)
    s:feed("250 ok\r\n250 ok\r\n354 go\r\n")
    return s:drain(7) -- the body is fed on the way, the dot queued: "next"
  end

  local function kinds(entry)
    local out = {}
    for i = 1, #(entry or {}), 2 do
      local p = entry[i + 1]
      local kind = type(p) == "table" and (p.kind or p.err and p.err.kind)
      out[#out + 1] = entry[i] .. (kind and (":" .. kind) or "")
    end
    return table.concat(out, " ")
  end

  it("keeps output queued until it is written, and the dot-stuffed body follows the 354", function()
    local s = ready_session()
    assert.same({ conn = 7, "next", false }, to_body(s, { "Subject: x\r\n\r\n", ".dot\r\nend\r\n" }))
    assert.equal("Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n", s:pending())
    assert.equal("Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n", s:pending()) -- still there
    s:written(12)
    assert.equal("\r\n..dot\r\nend\r\n.\r\n", s:pending())
    assert.has_error(function() s:written(1000) end)
  end)

  it("calls a write that failed before the dot left a connection error", function()
    local s = ready_session()
    to_body(s, "Subject: x\r\n\r\nbody\r\n")
    local out = s:pending()
    s:written(#out - 1) -- the last byte of ".\r\n" never left
    s:abort("write: broken pipe")
    local e = s:drain(7)
    assert.equal(7, e.conn)
    -- the transaction's outcome, then the session's end
    assert.equal("tx:connection error:connection", kinds(e))
    assert.matches("write: broken pipe", tostring(e[2].err))
  end)

  it("calls a connection lost after the whole dot left ambiguous", function()
    local s = ready_session()
    to_body(s, "Subject: x\r\n\r\nbody\r\n")
    s:written(#s:pending())
    s:abort("read: connection reset")
    assert.equal("tx:ambiguous error:connection", kinds(s:drain()))
  end)

  it("reports the outcome as a wait entry, and a refused connect in phase connect", function()
    local s = ready_session()
    to_body(s, "Subject: x\r\n\r\nbody\r\n")
    s:written(#s:pending())
    s:feed("250 queued\r\n")
    local e = s:drain(2)
    assert.equal("tx", e[1])
    assert.equal(250, e[2].code)
    local c = core.session{ helo = "client.test" }
    c:abort("connect to 127.0.0.1:1: connection refused", "connect")
    local ce = c:drain()
    assert.equal("connection", ce[2].kind)
    assert.equal("connect", ce[2].phase)
    assert.has_error(function() c:abort("x", "nowhere") end)
  end)
end)
