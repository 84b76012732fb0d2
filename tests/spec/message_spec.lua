-- Composition, read back with a real parser (Python's email package, default
-- policy), and injection attempts refused before a byte is sent.
local peers = require("peers")
local smtppool = require("smtppool")
local json = require("dkjson")
local message = smtppool.message

local function sha256(data)
  local d = peers.tmpdir()
  peers.write_file(d .. "/x", data)
  local out = peers.sh("sha256sum " .. peers.quote(d .. "/x")):match("^(%x+)")
  os.execute("rm -rf " .. peers.quote(d))
  return out
end

-- Composes msg and parses the result with Python.
local function parsed(msg)
  local data, env = message.compose(msg)
  assert.truthy(data, env and tostring(env))
  data = message.flatten(data)
  local d = peers.tmpdir()
  peers.write_file(d .. "/m.eml", data)
  local out = peers.sh("env -u LD_PRELOAD /usr/bin/python3 " .. peers.quote("tests/support/parse_mail.py")
    .. " " .. peers.quote(d .. "/m.eml"))
  os.execute("rm -rf " .. peers.quote(d))
  local p = json.decode(out)
  assert.truthy(p, "parser output: " .. out)
  return p, data, env
end

describe("composition read back by Python's email parser", function()
  local base = { from = "Sender <s@x.test>", to = "Bob <bob@y.test>", subject = "Hello" }
  local function with(t)
    local m = {}
    for k, v in pairs(base) do m[k] = v end
    for k, v in pairs(t) do m[k] = v end
    return m
  end

  local cases = {
    { "text only", { text = "plain\n.dot line\n" }, "text/plain" },
    { "html only", { html = "<p>hi</p>" }, "text/html" },
    { "alternative", { text = "plain", html = "<p>hi</p>" }, "multipart/alternative(text/plain,text/html)" },
    { "related", { html = '<img src="cid:logo">', attachments = { { data = "\137PNG", filename = "logo.png", inline = true, cid = "logo" } } },
      "multipart/related(text/html,image/png)" },
    { "mixed", { text = "see attached", attachments = { { data = "a,b\n1,2\n", filename = "t.csv" } } },
      "multipart/mixed(text/plain,text/csv)" },
    { "everything", { text = "t", html = '<img src="cid:i">', attachments = {
        { data = "GIF89a", filename = "i.gif", inline = true, cid = "i" }, { data = "%PDF", filename = "d.pdf" } } },
      "multipart/mixed(multipart/related(multipart/alternative(text/plain,text/html),image/gif),application/pdf)" },
  }
  for _, c in ipairs(cases) do
    it("composes " .. c[1] .. " with no defects", function()
      local p = parsed(with(c[2]))
      assert.same({}, p.defects)
      assert.equal(c[3], p.structure)
      assert.is_true(p.max_line <= 78)
    end)
  end

  it("keeps text whose lines start with dots, and long or 8-bit text, intact", function()
    local text = ".one\n..two\nna\195\175ve caf\195\169 " .. ("long "):rep(100) .. "\nend"
    local p = parsed(with({ text = text }))
    assert.same({}, p.defects)
    assert.equal(text:gsub("\n", "\n") .. "\n", p.leaves[1].text)
    assert.is_true(p.max_line <= 78)
  end)

  it("decodes non-ASCII subjects and names back to the original text", function()
    local subject = "Grüße aus Köln — ünïcödé everywhere, a long subject that must fold over several lines 日本語のテキスト"
    local p = parsed(with({ subject = subject, from = '"Jörg Müller" <j@x.test>', to = { "Zoë Ąćę <z@y.test>", '"Doe, John" <d@y.test>' } }))
    assert.same({}, p.defects)
    assert.equal(subject, p.subject)
    assert.equal("Jörg Müller", p.from_name)
    assert.same({ "Zoë Ąćę", "Doe, John" }, p.to_names)
    assert.same({ "z@y.test", "d@y.test" }, p.to)
    assert.is_true(p.max_line <= 78)
  end)

  it("round-trips attachments byte for byte, a 5 MB binary and dotted lines included", function()
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local all = table.concat(bytes)
    local big = all:rep(5 * 1024 * 1024 / 256)
    local dotted = ".first\r\n..second\r\n.\r\nlast"
    local d = peers.tmpdir()
    peers.write_file(d .. "/big.bin", big)
    local p = parsed(with({ text = "x", attachments = { { path = d .. "/big.bin" }, { data = dotted, filename = "dots.txt" } } }))
    os.execute("rm -rf " .. peers.quote(d))
    assert.same({}, p.defects)
    assert.equal("big.bin", p.leaves[2].filename)
    assert.equal(#big, p.leaves[2].size)
    assert.equal(sha256(big), p.leaves[2].sha256)
    assert.equal(sha256(dotted), p.leaves[3].sha256)
  end)

  it("never writes Bcc into the headers but puts it in the envelope", function()
    local p, _, env = parsed(with({ bcc = "hidden@z.test", cc = "c@y.test" }))
    for _, h in ipairs(p.header_names) do assert.is_not.equal("bcc", h:lower()) end
    assert.same({ "bob@y.test", "c@y.test", "hidden@z.test" }, env.to)
  end)

  it("adds one-click unsubscribe headers (RFC 8058)", function()
    local _, data = parsed(with({ list_unsubscribe = "<https://x.test/u/1>, <mailto:u@x.test>", list_unsubscribe_post = true }))
    assert.truthy(data:find("List-Unsubscribe: <https://x.test/u/1>, <mailto:u@x.test>\r\n", 1, true))
    assert.truthy(data:find("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", 1, true))
  end)

  it("parses and refuses mailboxes", function()
    assert.same({ name = "Doe, John", address = "d@y.test" }, message.parse_mailbox('"Doe, John" <d@y.test>'))
    assert.same({ address = "a@b.test" }, message.parse_mailbox("a@b.test"))
    assert.is_nil(message.parse_mailbox("undisclosed-recipients:;"))
    assert.is_nil(message.parse_mailbox("no-at-sign"))
    assert.is_nil(message.parse_mailbox("a@@b"))
    assert.is_nil(message.parse_mailbox("a@-bad-.test"))
    assert.is_nil(message.parse_mailbox('"unbalanced <a@b.test>'))
  end)
end)

describe("injection attempts", function()
  local f, pool
  setup(function()
    f = peers.fault({})
    pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
  end)
  teardown(function()
    pool:close()
    f:stop()
  end)

  local attempts = {
    { "CRLF in the subject", { subject = "hi\r\nBcc: victim@z.test" } },
    { "LF in the subject", { subject = "hi\nBcc: victim@z.test" } },
    { "CRLF in a display name", { to = "Bob\r\nBcc: v@z.test <bob@y.test>" } },
    { "CRLF in an address", { to = "bob@y.test\r\nRCPT TO:<v@z.test>" } },
    { "CRLF in a custom header", { headers = { ["X-Campaign"] = "1\r\nBcc: v@z.test" } } },
    { "a bad custom header name", { headers = { ["X Bad:"] = "v" } } },
    { "a custom header that overrides From", { headers = { From = "evil@z.test" } } },
    { "NUL in the subject", { subject = "a\0b" } },
    { "CRLF in an attachment name", { attachments = { { data = "x", filename = "a.txt\r\nX: y" } } } },
    { "CRLF in mail_from", { mail_from = "a@x.test\r\nRSET" } },
  }
  for _, c in ipairs(attempts) do
    it("refuses " .. c[1] .. " with invalid and sends nothing", function()
      local m = { from = "a@x.test", to = "bob@y.test", subject = "s", text = "t" }
      for k, v in pairs(c[2]) do m[k] = v end
      local res, err = pool:send(m)
      assert.is_nil(res)
      assert.equal("invalid", err.kind)
      assert.equal(0, #f:select("cmd", { cmd = "MAIL" }))
    end)
  end

  it("drops the connection before the dot when a streamed attachment cannot be read", function()
    local d = peers.tmpdir() -- a directory opens, then fails to read: EISDIR mid-body
    local res, err = pool:send{ from = "a@x.test", to = "bob@y.test", subject = "s", text = "t",
      attachments = { { path = d, filename = "x.bin" } } }
    os.execute("rm -rf " .. peers.quote(d))
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
    assert.matches("read", err.text)
    for _, m in ipairs(f:select("message")) do assert.is_not.equal("accepted", m.status) end
  end)

  it("sends a composed message through the pool", function()
    local res, err = pool:send{ from = "Ann <a@x.test>", to = "bob@y.test", subject = "Grüße", text = "hi", html = "<b>hi</b>" }
    assert.is_nil(err)
    assert.equal(250, res.code)
    local msgs = f:select("message")
    assert.equal(1, #msgs)
    assert.truthy(msgs[1].data:find("Subject: =?UTF-8?B?", 1, true))
    assert.equal("a@x.test", msgs[1].mail_from)
  end)
end)

describe("Message-IDs and boundaries", function()
  it("draws them from OpenSSL's generator: hex of the asked length, never the same twice", function()
    local core = require("smtppool.core")
    local seen = {}
    for _ = 1, 2000 do
      local h = core.random_hex(16)
      assert.matches("^%x+$", h)
      assert.equal(32, #h)
      assert.is_nil(seen[h])
      seen[h] = true
    end
    assert.has_error(function() core.random_hex(0) end)
    assert.has_error(function() core.random_hex(65) end)
    local a = assert(smtppool.message.compose{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" })
    local b = assert(smtppool.message.compose{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" })
    assert.matches("Message%-ID: <%x+@x%.test>", a)
    assert.are_not.equal(a:match("Message%-ID: ([^\r]+)"), b:match("Message%-ID: ([^\r]+)"))
  end)
end)

describe("text parts", function()
  it("go as 7bit with CRLF lines when they can, else quoted-printable", function()
    local core = require("smtppool.core")
    assert.same({ "a\r\nb\r\n", false }, { core.text_7bit("a\nb") })
    assert.same({ "a\r\nb\r\n", false }, { core.text_7bit("a\r\nb\n") })
    assert.same({ "a\r\nb", true }, { core.text_7bit("a\r\nb") }) -- the same string; the CRLF is a segment
    assert.same({ "", false }, { core.text_7bit("") })
    assert.same({ ("x"):rep(998), true }, { core.text_7bit(("x"):rep(998)) })
    for _, t in ipairs({ "x\r", "a\rb", "a\r\r\n", "caf\195\169", "nul\0", ("x"):rep(999) }) do
      assert.is_nil(core.text_7bit(t), ("%q"):format(t))
    end
    local function cte(text)
      local d = assert(smtppool.message.compose{ from = "a@x.test", to = "b@y.test", text = text })
      return d:match("Content%-Transfer%-Encoding: (%S+)"), d
    end
    assert.equal("7bit", cte("plain\nlines\n"))
    local enc, d = cte("a bare\rCR")
    assert.equal("quoted-printable", enc)
    assert.is_nil(d:find("bare\rCR", 1, true))
    assert.equal("quoted-printable", cte(("y"):rep(1200)))
  end)
end)
