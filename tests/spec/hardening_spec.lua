-- The promises a hostile server or a careless caller could break (issue
-- "Hardening"): one describe per numbered item, each against a real server
-- (tests/support/hostile.py, the fault server, exim).
local peers = require("peers")
local smtppool = require("smtppool")
local core = require("smtppool.core")

local function raw(i, tag)
  local id = ("<%s-%d@hard.test>"):format(tag or "h", i)
  return { from = "a@hard.test", to = { ("r%d@y.test"):format(i) }, id = id,
           data = ("Message-ID: %s\r\nSubject: %d\r\n\r\nbody %d\r\n"):format(id, i, i) }
end

local function pool_for(srv, o)
  local opts = { host = "127.0.0.1", port = srv.port, tls = "none", helo = "client.test",
                 retry = smtppool.retry.backoff{ base = 0.01, max = 0.05 } }
  for k, v in pairs(o or {}) do opts[k] = v end
  return assert(smtppool.new(opts))
end

-- Messages the server accepted, by id.
local function accepted(srv)
  local out, n = {}, 0
  for _, e in ipairs(srv:events()) do
    if e.ev == "message" and e.status == "accepted" then
      out[e.id] = (out[e.id] or 0) + 1
      n = n + 1
    end
  end
  return out, n
end

describe("1. a bad item or a raising callback never leaves messages unreported", function()
  local srv
  before_each(function() srv = peers.hostile({ quiet = true }) end)
  after_each(function() srv:stop() end)

  for _, case in ipairs({ { "NaN", 0 / 0 }, { "-1", -1 }, { "true", true }, { "a table", {} },
                          { "a function", function() end }, { "infinity", math.huge } }) do
    it("makes date = " .. case[1] .. " that item's invalid outcome; the rest are sent", function()
      local pool = pool_for(srv, { max_conns = 3 })
      local list = {}
      for i = 1, 20 do
        list[i] = { from = "a@hard.test", to = "r" .. i .. "@y.test", subject = "n" .. i, text = "t",
                    headers = { ["X-Test-Id"] = "id" .. i } }
      end
      list[7].date = case[2]
      local seen = {}
      local summary = pool:send_batch(list, { on_result = function(m, res, err)
        seen[#seen + 1] = { m = m, res = res, err = err }
      end })
      pool:close()
      assert.equal(20, #seen)
      assert.same({ sent = 19, failed = 1, cancelled = 0, total = 20 }, summary)
      for _, s in ipairs(seen) do
        if s.m == list[7] then
          assert.equal("invalid", s.err.kind)
          assert.matches("date", s.err.text)
        else
          assert.truthy(s.res)
        end
      end
      local got, n = accepted(srv)
      assert.equal(19, n)
      assert.is_nil(got.id7)
    end)
  end

  it("makes a template function that raises that item's invalid outcome", function()
    local pool = pool_for(srv)
    local list = {}
    for i = 1, 5 do list[i] = raw(i) end
    list[3] = { from = "a@hard.test", to = "x@y.test", subject = setmetatable({}, {
      __index = function() error("template exploded") end }) }
    local results = {}
    local summary = pool:send_batch(list, { on_result = function(m, res, err) results[m] = err or res end })
    pool:close()
    assert.equal(4, summary.sent)
    assert.equal("invalid", results[list[3]].kind)
  end)

  it("reports every message taken when on_result raises, then raises", function()
    local pool = pool_for(srv, { max_conns = 4 })
    local list = {}
    for i = 1, 40 do list[i] = raw(i, "cb") end
    local reported = {}
    local ok, err = pcall(pool.send_batch, pool, list, { on_result = function(m)
      reported[m.id] = (reported[m.id] or 0) + 1
      if m.id == list[5].id then error("callback bug") end
    end })
    pool:close()
    assert.is_false(ok)
    assert.matches("on_result raised: .*callback bug", tostring(err))
    -- every message the server accepted was reported, once
    local got = accepted(srv)
    local n = 0
    for id in pairs(got) do
      n = n + 1
      assert.equal(1, reported[id], id .. " reached the server but was not reported")
    end
    for id in pairs(reported) do assert.truthy(got[id], id .. " reported but never sent") end
    assert.is_true(n >= 5 and n < 40, "sent " .. n)
  end)

  it("reports every message taken when the source iterator raises, then raises", function()
    local pool = pool_for(srv, { max_conns = 2 })
    local i = 0
    local reported = 0
    local ok, err = pcall(pool.send_batch, pool, function()
      i = i + 1
      if i == 10 then error("source bug") end
      return raw(i, "src")
    end, { on_result = function(_, res) assert(res) reported = reported + 1 end })
    pool:close()
    assert.is_false(ok)
    assert.matches("message source raised: .*source bug", tostring(err))
    assert.equal(9, reported)
    local _, n = accepted(srv)
    assert.equal(9, n)
  end)

  it("checks every composed field: no value of any field raises", function()
    local bad = { 0 / 0, -1, math.huge, true, false, {}, { {} }, { 1 }, function() end, "\r\nX: y", "\255\254", "" }
    for f in pairs(smtppool.message.FIELDS) do
      for _, v in ipairs(bad) do
        local m = { from = "a@x.test", to = "b@y.test", subject = "s", text = "t" }
        m[f] = v
        local ok, e = pcall(smtppool.message.compose, m)
        assert.is_true(ok, ("compose raised for %s = %s: %s"):format(f, tostring(v), tostring(e)))
      end
    end
  end)
end)

describe("2. no string reaches a command line with CR, LF or other bytes it must not hold", function()
  local function new_err(o)
    local opts = { host = "127.0.0.1", port = 25, tls = "none" }
    for k, v in pairs(o) do opts[k] = v end
    local ok, err = pcall(smtppool.new, opts)
    assert.is_false(ok, "accepted " .. tostring(o.helo))
    return tostring(err)
  end

  it("refuses a helo that is not a domain or an address literal", function()
    for _, h in ipairs({ "x.test\r\nMAIL FROM:<evil@x.test>", "x.test\nRSET", "a b", "x\0y", "", "a..b",
                         "[1.2.3.4", "<x>" }) do
      assert.matches("helo", new_err({ helo = h }))
    end
    for _, h in ipairs({ "mail.example.org", "[192.0.2.1]", "[IPv6:2001:db8::1]", "localhost", "host_1" }) do
      assert.truthy(smtppool.new{ host = "127.0.0.1", tls = "none", helo = h })
    end
  end)

  it("refuses CR, LF and NUL in auth.user and the password, and ^A in an XOAUTH2 token", function()
    local base = { tls = "none", allow_plaintext_auth = true }
    for _, a in ipairs({ { user = "u\r\nQUIT", password = "p" }, { user = "u\0", password = "p" },
                         { user = "u", password = "p\r\nQUIT" }, { user = "u", password = "p\0q" },
                         { user = "u", token = "t\1auth=Bearer x" }, { user = "u\1x", token = "t" } }) do
      base.auth = a
      assert.matches("auth", new_err(base))
    end
  end)

  it("refuses the same in the C core, whatever the Lua layer lets through", function()
    local c, err = core.connect{ host = "127.0.0.1", port = 1, helo = "x.test\r\nMAIL FROM:<a@b>" }
    assert.is_nil(c)
    assert.equal("config", err.kind)
    assert.matches("helo", err.text)
    local s, serr = core.session{ helo = "ok.test", auth = { user = "u", secret = "a\r\nb", mechanism = "PLAIN" } }
    assert.is_nil(s)
    assert.equal("config", serr.kind)
    s, serr = core.session{ auth = { user = "u", secret = "tok\1x", mechanism = "XOAUTH2" } }
    assert.is_nil(s)
    assert.matches("XOAUTH2", serr.text)
  end)

  it("gives a token function's bad token as an auth failure, never on the wire", function()
    local srv = peers.hostile({ auth = { "XOAUTH2" } })
    finally(function() srv:stop() end)
    local pool = pool_for(srv, { allow_plaintext_auth = true,
      auth = { user = "u@x.test", token = function() return "tok\r\nQUIT" end } })
    local res, err = pool:send_raw(raw(1))
    pool:close()
    local auths = srv:select("auth")
    srv:stop()
    assert.is_nil(res)
    assert.equal("auth", err.kind)
    assert.matches("CR, LF", err.text)
    assert.equal(0, #auths)
  end)

  it("sends the EHLO name it was given and nothing else", function()
    local srv = peers.hostile({})
    finally(function() srv:stop() end)
    local pool = pool_for(srv, { helo = "[127.0.0.1]" })
    assert.truthy(pool:send_raw(raw(1)))
    pool:close()
    local cmds = srv:select("cmd")
    srv:stop()
    assert.equal("EHLO", cmds[1].cmd)
    assert.equal("[127.0.0.1]", cmds[1].arg)
    assert.equal("MAIL", cmds[2].cmd)
  end)
end)

describe("3. a timeout bounds a whole reply, not the gap between bytes", function()
  -- Each reply drips a byte every 0.2 s: a timer restarted by every byte
  -- (the old behaviour) would never fire and the message would be sent
  -- after ~7 s; a whole-reply timeout of 1 s ends it in about 1 s.
  local cases = {
    { "greeting", { phase = "greeting", interval = 0.2 }, { greeting = 1 }, "connection", "greeting" },
    { "multi-line EHLO", { phase = "EHLO", interval = 0.05 }, { ehlo = 1 }, "connection", "ehlo" },
    { "the reply to the final dot", { phase = "DATA_END", interval = 0.2 }, { data_end = 1 }, "ambiguous", "data_end" },
  }
  for _, c in ipairs(cases) do
    it("times out a server dripping " .. c[1], function()
      local srv = peers.hostile({ drip = c[2], ehlo_lines = { "X-ONE", "X-TWO", "X-THREE", "X-FOUR", "X-FIVE" } })
      finally(function() srv:stop() end)
      local pool = pool_for(srv, { timeouts = c[3], retry = smtppool.retry.none() })
      local t0 = core.now()
      local res, err = pool:send_raw(raw(1))
      local took = core.now() - t0
      pool:close()
      srv:stop()
      assert.is_nil(res)
      assert.equal(c[4], err.kind)
      assert.equal(c[5], err.phase)
      assert.matches("timed out", err.text)
      assert.is_true(took >= 0.9 and took < 3, ("took %.2fs"):format(took))
    end)
  end

  it("ends a message at message_timeout, retries included", function()
    -- greeting drips (each attempt would take ~5 s); the per-reply timeouts
    -- are the RFC's minutes: only the message deadline ends it
    local srv = peers.hostile({ drip = { phase = "greeting", interval = 0.2 } })
    finally(function() srv:stop() end)
    local pool = pool_for(srv, { message_timeout = 1.2,
      retry = smtppool.retry.backoff{ attempts = 10, base = 0.01, max = 0.01 } })
    local t0 = core.now()
    local res, err = pool:send_raw(raw(1))
    local took = core.now() - t0
    local st = pool:stats()
    pool:close()
    srv:stop()
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.matches("message_timeout", err.text)
    assert.is_true(took >= 1.1 and took < 3, ("took %.2fs"):format(took))
    assert.equal(0, st.open)
  end)

  it("makes a message cut by message_timeout after its final dot ambiguous", function()
    local srv = peers.hostile({ drip = { phase = "DATA_END", interval = 0.3 } })
    finally(function() srv:stop() end)
    local pool = pool_for(srv, { message_timeout = 1 })
    local res, err = pool:send_raw(raw(1))
    pool:close()
    srv:stop()
    assert.is_nil(res)
    assert.equal("ambiguous", err.kind)
    assert.matches("message_timeout", err.text)
  end)
end)

describe("4. ordinary failures do not teach a session cap", function()
  local function run(script, n, opts)
    local srv = peers.hostile(script)
    finally(function() srv:stop() end)
    local learned = {}
    local o = { max_conns = 2, retry = smtppool.retry.backoff{ attempts = 5, base = 0.001, max = 0.01 },
                on_event = function(ev) if ev.type == "learn_cap" then learned[#learned + 1] = ev.cap end end }
    for k, v in pairs(opts or {}) do o[k] = v end
    local pool = pool_for(srv, o)
    local list = {}
    for i = 1, n do list[i] = raw(i, "cap") end
    local summary = pool:send_batch(list)
    local st = pool:stats()
    pool:close()
    local _, delivered = accepted(srv)
    srv:stop()
    return summary, st, learned, delivered
  end

  it("learns nothing from a 451 to one MAIL in 19 on a session left open", function()
    local summary, st, learned, delivered = run({ quiet = true, p_tempfail = 1 / 19, seed = 7 }, 2000)
    assert.equal(2000, summary.sent)
    assert.equal(2000, delivered)
    assert.same({}, learned)
    assert.is_nil(st.learned_cap)
    -- each 451 on a used session retires it (the generic exhaustion rule):
    -- about 2000/19 sessions, not one per message
    assert.is_true(st.opened < 300, "opened " .. st.opened)
  end)

  it("learns nothing from 1% random 421s", function()
    local summary, st, learned = run({ quiet = true, p_421 = 0.01, seed = 11 }, 2000)
    assert.equal(2000, summary.sent)
    assert.same({}, learned)
    assert.is_true(st.opened < 100, "opened " .. st.opened)
  end)

  it("learns a real cap from sessions ended at the same count, and forgets it after a quiet period", function()
    local srv = peers.hostile({ quiet = true, cap = 4, cap_sessions = 5 })
    finally(function() srv:stop() end)
    local events = {}
    local pool = pool_for(srv, { cap_recover_after = 0.5,
      on_event = function(ev) if ev.type:match("cap$") then events[#events + 1] = ev.type .. "=" .. ev.cap end end })
    local list = {}
    for i = 1, 24 do list[i] = raw(i, "a") end
    assert.equal(24, pool:send_batch(list).sent)
    assert.equal(4, pool:stats().learned_cap)
    peers.sleep(0.7)
    list = {}
    for i = 1, 12 do list[i] = raw(i, "b") end
    assert.equal(12, pool:send_batch(list).sent)
    local st = pool:stats()
    pool:close()
    -- the server no longer caps: after forgetting, one session carried all 12
    local per = {}
    for _, e in ipairs(srv:events()) do
      if e.ev == "message" and e.id:match("^<b%-") then per[e.s] = (per[e.s] or 0) + 1 end
    end
    srv:stop()
    assert.same({ "learn_cap=4", "unlearn_cap=4" }, events)
    assert.is_nil(st.learned_cap)
    local most = 0
    for _, n in pairs(per) do most = math.max(most, n) end
    assert.equal(12, most)
  end)

  it("never learns a cap below 2 from a server that refuses the second MAIL", function()
    local summary, st = run({ quiet = true, cap = 1, cap_keep_open = true,
      cap_reply = "452 4.5.3 Too many transactions" }, 12, { max_conns = 1 })
    assert.equal(12, summary.sent)
    assert.is_nil(st.learned_cap)
  end)
end)

describe("5. credentials a server echoes never reach an error or an event", function()
  local USER, PASS, TOKEN = "user@hard.test", "s3cret-Pa55word", "ya29.secret-token-value"
  local function b64(s) return core.base64_encode(s) end

  for _, mech in ipairs({ "PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2" }) do
    it("redacts an echoed " .. mech .. " exchange", function()
      local srv = peers.hostile({ auth = { mech }, echo_auth = true })
      finally(function() srv:stop() end)
      local discarded = {}
      local auth = mech == "XOAUTH2" and { user = USER, token = TOKEN } or { user = USER, password = PASS, mechanism = mech }
      local pool = pool_for(srv, { allow_plaintext_auth = true, auth = auth,
        on_event = function(ev) if ev.type == "discard" then discarded[#discarded + 1] = tostring(ev.err) end end })
      local res, err = pool:send_raw(raw(1))
      pool:close()
      local lines = srv:select("auth")[1].lines
      srv:stop()
      assert.is_nil(res)
      assert.equal("auth", err.kind)
      assert.equal(535, err.code)
      local secret = mech == "XOAUTH2" and TOKEN or PASS
      local forbidden = { secret, b64(secret), b64("\0" .. USER .. "\0" .. PASS),
                          b64("user=" .. USER .. "\1auth=Bearer " .. TOKEN .. "\1\1") }
      for _, l in ipairs(lines) do forbidden[#forbidden + 1] = l end -- what the client sent, as sent
      assert.is_true(#discarded >= 1)
      for _, text in ipairs({ tostring(err), err.text, table.unpack(discarded) }) do
        assert.matches("%[redacted%]", text)
        for _, f in ipairs(forbidden) do
          assert.is_nil(text:find(f, 1, true), mech .. ": the error shows " .. f .. ": " .. text)
        end
      end
    end)
  end
end)

describe("5b. credentials echoed folded, re-encoded or in another case are redacted too", function()
  local USER, PASS = "user@hard.test", "s3cret-Pa55word"
  local function b64(s) return core.base64_encode(s) end
  for _, mode in ipairs({ "fold", "recode", "lower" }) do
    for _, mech in ipairs({ "PLAIN", "LOGIN" }) do
      it(("redacts a %s echo of %s"):format(mode, mech), function()
        local srv = peers.hostile({ auth = { mech }, echo_auth = mode })
        finally(function() srv:stop() end)
        local pool = pool_for(srv, { allow_plaintext_auth = true,
          auth = { user = USER, password = PASS, mechanism = mech } })
        local res, err = pool:send_raw(raw(1))
        pool:close()
        local lines = srv:select("auth")[1].lines
        assert.is_nil(res)
        assert.equal(535, err.code)
        -- compared without line breaks or blanks and in one case, as a reader would see it
        local text = tostring(err):gsub("[%s]", ""):lower()
        local forbidden = { PASS, b64(PASS), b64("\0" .. USER .. "\0" .. PASS) }
        for _, l in ipairs(lines) do forbidden[#forbidden + 1] = l end
        for _, f in ipairs(forbidden) do
          assert.is_nil(text:find(f:lower(), 1, true), mode .. "/" .. mech .. ": the error shows " .. f .. ": "
            .. tostring(err))
        end
        assert.matches("%[redacted%]", err.text)
      end)
    end
  end
end)

describe("6. every number option is finite and in range", function()
  local function refused(o)
    local opts = { host = "127.0.0.1", tls = "none" }
    for k, v in pairs(o) do opts[k] = v end
    return not pcall(smtppool.new, opts)
  end
  local nan, inf = 0 / 0, math.huge

  it("refuses NaN and infinity in every timeout and count", function()
    for _, k in ipairs({ "connect_timeout", "close_timeout", "wait_timeout", "idle_timeout", "max_conn_lifetime",
                         "health_check_after", "message_timeout", "cap_recover_after", "max_conns",
                         "max_messages_per_conn", "port" }) do
      for _, v in ipairs({ nan, inf, -inf }) do
        assert.is_true(refused({ [k] = v }), k .. " = " .. tostring(v) .. " accepted")
      end
    end
    for _, ph in ipairs({ "greeting", "ehlo", "mail", "rcpt", "data", "data_end", "quit" }) do
      assert.is_true(refused({ timeouts = { [ph] = nan } }))
      assert.is_true(refused({ timeouts = { [ph] = inf } }))
    end
    assert.is_true(refused({ max_conns = 1e9 }))
  end)

  it("refuses NaN and infinity in rate limits and retry policies", function()
    for _, r in ipairs({ { messages = { 1, nan } }, { messages = { nan, 1 } }, { messages = { inf, 1 } },
                         { messages = { 1, inf } }, { messages_per_sec = nan }, { connections_per_min = inf } }) do
      assert.is_true(refused({ rate = r }))
    end
    for _, o in ipairs({ { attempts = nan }, { attempts = inf }, { base = nan }, { max = inf }, { jitter = nan },
                         { attempts = 2.5 } }) do
      assert.is_false(pcall(smtppool.retry.backoff, o))
    end
  end)

  it("treats a retry policy that returns NaN or infinity as final", function()
    local srv = peers.hostile({ p_tempfail = 1, quiet = true })
    finally(function() srv:stop() end)
    for _, d in ipairs({ nan, inf }) do
      local pool = pool_for(srv, { retry = function() return d end })
      local t0 = core.now()
      local res, err = pool:send_raw(raw(1))
      pool:close()
      assert.is_nil(res)
      assert.equal("transient", err.kind)
      assert.matches("retry policy returned", err.text)
      assert.is_true(core.now() - t0 < 2)
    end
    srv:stop()
  end)
end)

describe("7. the smaller promises", function()
  it("refuses a custom header with invalid UTF-8", function()
    local data, err = smtppool.message.compose{ from = "a@x.test", to = "b@y.test", headers = { ["X-A"] = "ok \255" } }
    assert.is_nil(data)
    assert.equal("invalid", err.kind)
    assert.matches("UTF%-8", err.text)
  end)

  it("compiles deeply nested templates in linear time and refuses excessive depth", function()
    local t0 = os.clock()
    local n = 100000
    local tpl, err = smtppool.template.compile(("{{#a}}"):rep(n) .. ("{{/a}}"):rep(n))
    assert.is_nil(tpl)
    assert.matches("nest deeper than 100", err)
    local src = ("line\n{{v}}"):rep(50000)
    tpl = assert(smtppool.template.compile(src))
    local _, rerr = tpl:render({})
    assert.matches("line 2", rerr)
    assert.is_true(os.clock() - t0 < 5, "compiling took " .. (os.clock() - t0))
  end)

  it("fails a queue once when the certificate does not verify, like a refused login", function()
    local exim = peers.exim()
    local certs = peers.certs()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "starttls",
      ca_file = certs.other_ca, max_conns = 2 })
    local errs = {}
    local summary = pool:send_batch({ raw(1), raw(2), raw(3), raw(4), raw(5), raw(6), raw(7), raw(8) },
      { on_result = function(_, _, err) errs[#errs + 1] = err end })
    local st = pool:stats()
    pool:close()
    exim:stop()
    assert.equal(8, summary.failed)
    for _, e in ipairs(errs) do assert.equal("tls", e.kind) end
    assert.is_true(st.opened <= 2, "opened " .. st.opened)
  end)

  it("marks a message re-sent after an ambiguous loss as a possible duplicate, in the journal and the report", function()
    local srv = peers.hostile({ p_drop_dot = 0.5, seed = 3, quiet = true })
    finally(function() srv:stop() end)
    local dir = peers.tmpdir()
    local pool = pool_for(srv, { retry = smtppool.retry.backoff{ attempts = 6, base = 0.001, ambiguous = true } })
    local list = {}
    for i = 1, 20 do list[i] = { email = ("r%d@y.test"):format(i), n = i } end
    local c = assert(smtppool.campaign{ pool = pool, recipients = list, journal = dir .. "/j", progress = false,
      message = { from = "a@hard.test", subject = "s {{n}}", text = "t" } })
    local report = assert(c:run())
    pool:close()
    local d = tonumber(peers.sh(("sqlite3 %s \"SELECT count(*) FROM latest WHERE state = 'D'\""):format(
      peers.quote(dir .. "/j"))):match("%d+"))
    os.execute("rm -rf " .. peers.quote(dir))
    local per = {}
    for _, e in ipairs(srv:events()) do
      if e.ev == "message" then per[e.rcpt[1]] = (per[e.rcpt[1]] or 0) + 1 end
    end
    srv:stop()
    assert.is_true(report.possible_duplicates > 0)
    assert.equal(report.possible_duplicates, d)
    -- every recipient the server saw more than once is flagged
    local twice = 0
    for _, n in pairs(per) do if n > 1 then twice = twice + 1 end end
    assert.is_true(twice <= report.possible_duplicates + report.ambiguous)
    assert.matches("possibly twice", smtppool.campaign.summary(report))
  end)

  it("splits a message with more recipients than LIMITS RCPTMAX into several transactions", function()
    local srv = peers.hostile({ rcptmax = 2 })
    finally(function() srv:stop() end)
    local pool = pool_for(srv)
    local to = {}
    for i = 1, 5 do to[i] = ("r%d@y.test"):format(i) end
    local res, err = pool:send_raw{ from = "a@hard.test", to = to, data = "Subject: x\r\n\r\nbody\r\n" }
    pool:close()
    local msgs = srv:select("message")
    srv:stop()
    assert.is_nil(err)
    assert.equal(3, res.transactions)
    assert.equal(5, #res.recipients)
    assert.equal(0, #res.rejected)
    assert.equal(3, #msgs)
    local all = {}
    for _, m in ipairs(msgs) do
      assert.is_true(#m.rcpt <= 2)
      for _, r in ipairs(m.rcpt) do all[#all + 1] = r end
    end
    assert.equal(5, #all)
  end)

  it("keeps each recipient's outcome when one part of a split message fails", function()
    local srv = peers.hostile({ rcptmax = 2 })
    finally(function() srv:stop() end)
    local pool = pool_for(srv, { retry = smtppool.retry.none() })
    local res, err = pool:send_raw{ from = "a@hard.test", to = { "a@y.test", "b@y.test", "bad>@y.test" },
                                    data = "Subject: x\r\n\r\nbody\r\n" }
    pool:close()
    srv:stop()
    -- the third recipient cannot even be written: its part fails invalid,
    -- the first part is sent, and the message's outcome says both
    assert.is_nil(err)
    assert.equal(3, #res.recipients)
    assert.equal(1, #res.rejected)
    assert.equal("bad>@y.test", res.rejected[1].address)
  end)
end)

describe("1. (campaigns) a message function that raises fails its recipient, not the run", function()
  it("records the recipient failed and sends the others", function()
    local srv = peers.hostile({ quiet = true })
    finally(function() srv:stop() end)
    local pool = pool_for(srv)
    local list = {}
    for i = 1, 6 do list[i] = { email = ("r%d@y.test"):format(i), n = i } end
    local c = assert(smtppool.campaign{ pool = pool, recipients = list, progress = false,
      message = function(r)
        if r.n == 4 then error("template bug") end
        return { from = "a@hard.test", to = r.email, subject = "s", text = "t" }
      end })
    local report = assert(c:run())
    pool:close()
    local _, n = accepted(srv)
    srv:stop()
    assert.equal(5, report.sent)
    assert.equal(1, report.failed)
    assert.equal(5, n)
  end)
end)

describe("REQUIRETLS (RFC 8689)", function()
  it("refuses to send a require_tls message over a connection without TLS, sending nothing", function()
    local srv = peers.hostile({ ehlo_lines = { "REQUIRETLS" } })
    finally(function() srv:stop() end)
    local pool = pool_for(srv)
    local res, err = pool:send{ from = "a@hard.test", to = "b@y.test", subject = "s", text = "t", require_tls = true }
    local ok2 = pool:send_raw(raw(2))
    pool:close()
    assert.is_nil(res)
    assert.equal("tls", err.kind)
    assert.matches("REQUIRETLS", err.text)
    assert.truthy(ok2) -- the connection stayed good for the next message
    local mails = srv:select("cmd", { cmd = "MAIL" })
    assert.equal(1, #mails)
    assert.is_nil(mails[1].arg:find("REQUIRETLS", 1, true))
    local _, e2 = smtppool.message.compose{ from = "a@x.test", to = "b@y.test", require_tls = "yes" }
    assert.equal("invalid", e2.kind)
  end)
end)

describe("provider presets and max_recipients_per_message", function()
  it("gives a preset's options with overrides on top, and refuses an unknown name", function()
    local o = smtppool.preset("mailersend", { auth = { user = "u", password = "p" }, rate = { messages_per_sec = 2 } })
    assert.equal("smtp.mailersend.net", o.host)
    assert.equal(5, o.max_messages_per_conn)
    assert.same({ auth_per_min = 120, connections_per_min = 300, messages_per_sec = 2 }, o.rate)
    assert.is_nil(o.source)
    assert.is_nil(o.date)
    assert.truthy(smtppool.presets.mailersend.source)
    assert.equal(120, smtppool.presets.mailersend.rate.auth_per_min) -- the preset itself is untouched
    assert.truthy(smtppool.new(smtppool.preset("ses", { host = "127.0.0.1" })))
    assert.has_error(function() smtppool.preset("nope") end, nil)
  end)

  it("has every preset cite its source and date, and build a pool", function()
    local names = {}
    for name, p in pairs(smtppool.presets) do
      if type(p) == "table" then
        names[#names + 1] = name
        assert.matches("%S", p.source, name)
        assert.matches("^20%d%d%-%d%d$", p.date, name)
        local pool = assert(smtppool.new(smtppool.preset(name, { host = "127.0.0.1",
          auth = { user = "u", password = "p" } })))
        pool:close()
      end
    end
    table.sort(names)
    assert.same({ "google_relay", "mailersend", "microsoft365", "sendgrid", "ses", "ses_sandbox" }, names)
    -- SendGrid's login user comes from the preset; the API key is yours
    local sg = smtppool.preset("sendgrid", { auth = { password = "SG.key" } })
    assert.same({ user = "apikey", password = "SG.key" }, sg.auth)
    assert.equal(10000, smtppool.preset("google_relay").rate.messages_per_day)
    assert.equal(3, smtppool.preset("microsoft365").max_conns)
  end)

  it("splits a message over max_recipients_per_message into transactions", function()
    local srv = peers.hostile({ quiet = true })
    finally(function() srv:stop() end)
    local pool = pool_for(srv, { max_recipients_per_message = 2 })
    local res = assert(pool:send_raw{ from = "a@hard.test", to = { "a@y.test", "b@y.test", "c@y.test" },
                                      data = "Subject: x\r\n\r\nbody\r\n" })
    pool:close()
    assert.equal(2, res.transactions)
    assert.equal(2, #srv:select("message"))
  end)
end)
