-- RFC 2920 across transactions: the next MAIL, RCPT and DATA leave in the
-- same write as the previous final dot, before its reply; outcomes stay in
-- order and the ambiguity bound stays one message per connection.
local peers = require("peers")
local smtppool = require("smtppool")

local function msg(i)
  return { from = "a@x.test", to = { ("p%d@y.test"):format(i) },
           data = ("Message-ID: <p%d@x.test>\r\nSubject: %d\r\n\r\nbody %d\r\n"):format(i, i, i) }
end

local function batch(n)
  local t = {}
  for i = 1, n do t[i] = msg(i) end
  return t
end

describe("pipelining the next transaction", function()
  it("sends each final dot and the next MAIL, RCPT and DATA in one write", function()
    local f = peers.fault({})
    finally(function() f:stop() end)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
    local s = pool:send_batch(batch(20))
    pool:close()
    assert.equal(20, s.sent)
    assert.equal(1, #f:select("connect"))
    local joined = 0
    for _, c in ipairs(f:select("chunk")) do
      if c.data:find("\r\n%.\r\nMAIL FROM:<a@x%.test>[^\n]*\r\nRCPT TO:<[^>]+>[^\n]*\r\nDATA\r\n$") then
        joined = joined + 1
      end
    end
    -- 19 dots have a next transaction behind them; the server's reads may split a few
    assert.is_true(joined >= 15, joined .. " of 19 dots left with the next transaction")
    local msgs = f:select("message")
    assert.equal(20, #msgs)
  end)

  it("keeps a final dot whose mark is due behind the session's gate until the mark is written, "
    .. "whatever the loop waits on meanwhile", function()
    -- A side wait on the loop (here a sleep in on_result; in a campaign or
    -- the outbox a Redis reply, a claim) used to let a dot already queued
    -- leave before its mark was written at the loop's next wait.
    local f = peers.fault({})
    finally(function() f:stop() end)
    local loop = require("smtppool.engine.loop")
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none" })
    local early, marks, results = {}, 0, 0
    local function mark(m)
      marks = marks + 1
      for _, seen in ipairs(f:select("message")) do
        if seen.rcpt[1] == m.to[1] then early[#early + 1] = m.to[1] end
      end
    end
    local s = pool:on_loop(function()
      return pool:send_batch(batch(12), {
        mark_async = mark,
        mark_many = function(list) for _, m in ipairs(list) do mark(m) end end,
        on_result = function()
          results = results + 1
          loop.sleep(0.15) -- the next message's dot is queued by now
        end,
      })
    end)
    pool:close()
    assert.equal(12, s.sent)
    assert.equal(12, results)
    assert.equal(12, marks)
    assert.same({}, early)
    -- each message reached the server once
    assert.equal(12, #f:select("message"))
  end)

  it("keeps outcomes in order and exactly once through exim", function()
    local exim = peers.exim({ max_per_conn = 7 })
    finally(function() exim:stop() end)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none", max_conns = 2 })
    local order, ids = {}, {}
    local s = pool:send_batch(batch(60), { on_result = function(m, res)
      order[#order + 1] = m.to[1]
      if res then ids[#ids + 1] = res.text end
    end })
    pool:close()
    assert.equal(60, s.sent)
    exim:wait_deliveries(60)
    for i = 1, 60 do
      assert.equal(1, #exim:log_lines("=> %S+ <p" .. i .. "@y%.test>"))
    end
    assert.equal("", exim:mainlog():match("synchronization error[^\n]*") or "")
    -- exim's cap (7 a session) was learned or met without losing a message
    assert.equal(60, #order)
  end)

  it("a connection lost with a dot awaiting its reply and the next message behind it: "
    .. "one ambiguous, the other retried", function()
    -- the 3rd final dot is answered by a reset
    local f = peers.fault({ rules = { { on = "DATA_END", nth = 3, ["do"] = "reset" } } })
    finally(function() f:stop() end)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none",
      retry = smtppool.retry.backoff{ attempts = 3, base = 0.01 } })
    local results = {}
    pool:send_batch(batch(6), { on_result = function(m, res, err)
      results[m.to[1]] = res and (res.ambiguous and "sent-ambiguous" or "sent") or err.kind
    end })
    local st = pool:stats()
    pool:close()
    -- only the message whose dot had left can have arrived twice
    assert.equal(1, st.ambiguous)
    local n_amb = 0
    for _, r in pairs(results) do
      if r == "sent-ambiguous" or r == "ambiguous" then n_amb = n_amb + 1 end
    end
    assert.equal(1, n_amb)
    assert.equal("sent", results["p4@y.test"]) -- pipelined behind it: retried, not ambiguous
    for i = 1, 6 do assert.truthy(results["p" .. i .. "@y.test"]) end
  end)
end)

describe("rotation ahead of the cap", function()
  -- sessions in the server's log: first and last MAIL time, connect and close time
  local function sessions(f)
    local by = {}
    for _, e in ipairs(f:events()) do
      local s = e.s and by[e.s] or {}
      if e.s then by[e.s] = s end
      if e.ev == "connect" then s.connect = e.t
      elseif e.ev == "close" then s.close = e.t
      elseif e.ev == "cmd" and e.cmd == "MAIL" then
        s.first = s.first or e.t
        s.last = e.t
        s.mails = (s.mails or 0) + 1
      end
    end
    local out = {}
    for id, s in pairs(by) do s.id = id out[#out + 1] = s end
    table.sort(out, function(a, b) return a.id < b.id end)
    return out
  end

  local function run(opts)
    local f = peers.fault({})
    finally(function() f:stop() end)
    local o = { host = "127.0.0.1", port = f.port, tls = "none", max_conns = 1, max_messages_per_conn = 5 }
    for k, v in pairs(opts) do o[k] = v end
    local pool = assert(smtppool.new(o))
    local s = pool:send_batch(batch(30))
    pool:close()
    assert.equal(30, s.sent)
    return sessions(f)
  end

  it("opens the replacement while the old session sends its last messages, never two sending at once", function()
    local all = run({ rotate_ahead = 2 })
    -- no spare for the last session: what was left fitted in the old one
    local ss = all
    assert.equal(6, #ss)
    local overlapped = 0
    for i = 2, #ss do
      local a, b = ss[i - 1], ss[i]
      assert.equal(5, a.mails)
      -- max_conns = 1 sending connection: the new one's first MAIL after the old one's last
      assert.is_true(b.first > a.last, "sessions " .. a.id .. " and " .. b.id .. " sent at once")
      if b.connect < a.close then overlapped = overlapped + 1 end
    end
    assert.is_true(overlapped >= 3, overlapped .. " of 5 replacements opened ahead")
  end)

  it("with rotate_ahead = 0, never opens a second socket", function()
    local ss = run({ rotate_ahead = 0 })
    for i = 2, #ss do
      assert.is_true(ss[i].connect >= ss[i - 1].close, "two sockets open at once")
    end
  end)
end)
