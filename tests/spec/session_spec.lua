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
