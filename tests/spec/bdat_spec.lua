-- CHUNKING (RFC 3030): bodies as BDAT chunks with a window of transactions
-- in flight per connection, against exim (which offers CHUNKING) and the
-- hostile server (which logs every command and can stop answering).
local peers = require("peers")
local smtppool = require("smtppool")

local function body(i)
  -- dot lines (never stuffed in BDAT), bare LF, CRLF, a long run of lines
  return (".dot first %d\n..two dots\r\nplain\n%s\n.\nend\n"):format(i, ("x"):rep(60 + i))
end

describe("BDAT", function()
  it("sends through exim's CHUNKING: every message arrives whole, dots and line ends as over DATA", function()
    local exim = peers.exim({ chunking = true })
    finally(function() exim:stop() end)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none", max_conns = 2 })
    local caps = assert(pool:verify())
    assert.is_true(caps.chunking)
    local list = {}
    for i = 1, 30 do
      list[i] = { from = "a@x.test", to = ("r%d@y.test"):format(i), subject = "n " .. i, text = body(i),
                  headers = { ["X-Test-Id"] = "m" .. i } }
    end
    -- one large message: its body goes in several chunks
    list[31] = { from = "a@x.test", to = "big@y.test", subject = "big", headers = { ["X-Test-Id"] = "big" },
                 text = ("%s\n"):format(("y"):rep(70)):rep(20000) }
    local summary = pool:send_batch(list)
    pool:close()
    assert.same({ sent = 31, failed = 0, cancelled = 0, total = 31 }, summary)
    exim:wait_deliveries(31)
    local seen = 0
    for _, m in ipairs(exim:messages()) do
      local id = m:match("X%-Test%-Id: (%w+)")
      if id == "big" then
        local _, lines = m:gsub(("y"):rep(70) .. "\n", "")
        assert.equal(20000, lines)
      else
        local i = tonumber(id:match("%d+"))
        assert.truthy(m:find(body(i):gsub("\r\n", "\n"), 1, true), "message " .. id .. " altered")
      end
      seen = seen + 1
    end
    assert.equal(31, seen)
  end)

  it("uses BDAT when offered, with the same bytes at the server as over DATA", function()
    local servers = {}
    finally(function() -- one finally per test: it stops both servers
      for _, srv in ipairs(servers) do srv:stop() end
    end)
    local function run(chunking)
      local srv = peers.hostile({ chunking = chunking })
      servers[#servers + 1] = srv
      local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 1 })
      local list = {}
      for i = 1, 10 do list[i] = { from = "a@x.test", to = "r@y.test", data = ("X-Test-Id: m%d\r\n\r\n%s"):format(i, body(i)) } end
      assert.same({ sent = 10, failed = 0, cancelled = 0, total = 10 }, pool:send_batch(list))
      pool:close()
      local verbs, sums = {}, {}
      for _, e in ipairs(srv:select("cmd")) do verbs[e.cmd] = (verbs[e.cmd] or 0) + 1 end
      for _, m in ipairs(srv:select("message")) do sums[m.id] = m.sha256 end
      return verbs, sums
    end
    local bv, bsums = run(true)
    local dv, dsums = run(false)
    assert.equal(10, bv.BDAT)
    assert.is_nil(bv.DATA)
    assert.equal(10, dv.DATA)
    assert.same(dsums, bsums)
  end)

  it("fails only the transaction whose recipient is refused, and the rest of the window goes on", function()
    local srv = peers.hostile({ chunking = true, reject_rcpt = "bad", quiet = true })
    finally(function() srv:stop() end)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 1 })
    local list, outcomes = {}, {}
    for i = 1, 60 do
      list[i] = { from = "a@x.test", to = (i % 3 == 0) and ("bad%d@y.test"):format(i) or ("ok%d@y.test"):format(i),
                  data = ("X-Test-Id: m%d\r\n\r\nbody\r\n"):format(i) }
    end
    local summary = pool:send_batch(list, { on_result = function(m, res, err)
      outcomes[m.to] = res and "sent" or (err.kind .. " " .. tostring(err.code))
      if not res then outcomes[#outcomes + 1] = m.to .. ": " .. tostring(err) end
    end })
    pool:close()
    -- (a failure that stops the window can come after "next" was offered:
    -- the message then waits for a ready connection, it does not fail)
    assert.same({ sent = 40, failed = 20, cancelled = 0, total = 60 }, summary, table.concat(outcomes, "\n"))
    for i = 1, 60 do
      if i % 3 == 0 then
        assert.equal("permanent 550", outcomes[("bad%d@y.test"):format(i)])
      else
        assert.equal("sent", outcomes[("ok%d@y.test"):format(i)])
      end
    end
    assert.equal(40, #srv:select("message", { status = "accepted" }))
  end)

  -- 16 is the documented maximum: a full window's outcomes and the session's
  -- error must all reach the pool (the driver's event queue once held 16 and
  -- dropped the error, which wedged the pool)
  for _, window in ipairs({ 1, 4, 16 }) do
    it(("leaves at most bdat_window (%d) messages ambiguous when the server stops answering"):format(window), function()
      local srv = peers.hostile({ chunking = true, hold_after = 3, quiet = true })
      finally(function() srv:stop() end)
      local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 1,
        bdat_window = window, timeouts = { data_end = 2, mail = 2, rcpt = 2 }, wait_timeout = 10,
        retry = smtppool.retry.backoff{ attempts = 3, base = 0.01 } })
      local list = {}
      for i = 1, window + 8 do list[i] = { from = "a@x.test", to = "r@y.test", data = ("X-Test-Id: m%d\r\n\r\nb\r\n"):format(i) } end
      local ambiguous, sent, waited = {}, {}, 0
      local report = pool:send_batch(list, { on_result = function(m, res, err)
        local id = m.data:match("m%d+")
        if res then sent[id] = true elseif err.kind == "ambiguous" then ambiguous[id] = true end
        if err and tostring(err.text):find("wait_timeout", 1, true) then waited = waited + 1 end
      end })
      -- the pool went on after the loss: a fresh connection carried the rest
      assert.equal(0, waited, "messages waited out wait_timeout: the pool stopped opening connections")
      assert.equal(#list, report.sent + report.failed)
      pool:close()
      -- the server's view: which arrived unanswered, session by session
      local unconfirmed, per_session = {}, {}
      for _, e in ipairs(srv:select("message", { status = "unconfirmed" })) do
        unconfirmed[e.id] = true
        per_session[e.s] = (per_session[e.s] or 0) + 1
      end
      for _, n in pairs(per_session) do assert.is_true(n <= window, n .. " unanswered in one session") end
      -- every message the pool calls ambiguous did arrive unanswered; every one it
      -- calls sent was answered; none is both
      for id in pairs(ambiguous) do
        assert.is_true(unconfirmed[id], id .. " called ambiguous but never arrived")
        assert.is_nil(sent[id])
      end
      for _, e in ipairs(srv:select("message", { status = "accepted" })) do assert.is_nil(ambiguous[e.id]) end
      assert.is_true(next(ambiguous) ~= nil, "nothing was ambiguous: the test did not test")
    end)
  end

  -- A server that answers the cap's 421 and resets: the client may write its
  -- next message before it reads that 421 (here on_result holds the loop
  -- while the reset arrives). The write fails, but the 421 is in the socket's
  -- receive queue: read, it settles the pipelined message it refused, which
  -- is then sent on a fresh connection instead of being called ambiguous.
  it("reads the 421 a reset left behind before a failed write ends the session", function()
    local srv = peers.hostile({ chunking = true, cap = 1, cap_delay = 0.1, cap_reset = true, quiet = true })
    finally(function() srv:stop() end)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 1,
      bdat_window = 2, max_messages_per_conn = 100,
      retry = smtppool.retry.backoff{ attempts = 3, base = 0.01 } })
    local list = {}
    for i = 1, 3 do list[i] = { from = "a@x.test", to = "r@y.test", data = ("X-Test-Id: m%d\r\n\r\nb\r\n"):format(i) } end
    local errs = {}
    local report = pool:send_batch(list, { on_result = function(m, _, err)
      if err then errs[#errs + 1] = m.data:match("m%d+") .. ": " .. tostring(err) end
      if m.data:find("m1", 1, true) then
        local t = require("smtppool.core").now()
        repeat os.execute("sleep 0.05") until require("smtppool.core").now() - t > 0.4
      end
    end })
    pool:close()
    assert.equal(3, report.sent, table.concat(errs, "; "))
    local seen = {}
    for _, e in ipairs(srv:select("message", { status = "accepted" })) do
      assert.is_nil(seen[e.id], e.id .. " accepted twice")
      seen[e.id] = true
    end
    assert.equal(3, #srv:select("message", { status = "accepted" }))
  end)

  it("refuses a bdat_window out of range", function()
    for _, bad in ipairs({ -1, 17, 2.5, 0 / 0 }) do
      assert.has_error(function() smtppool.new{ host = "h", tls = "none", bdat_window = bad } end,
        "smtppool.new: option 'bdat_window' must be an integer from 0 to 16")
    end
    assert.truthy(smtppool.new{ host = "h", tls = "none", bdat_window = 0 })
  end)
end)
