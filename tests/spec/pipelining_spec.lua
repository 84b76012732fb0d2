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
