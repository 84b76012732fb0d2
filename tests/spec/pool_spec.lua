-- The pool's invariants (ARCHITECTURE.md), shown against real peers.
local peers = require("peers")
local smtppool = require("smtppool")
local core = require("smtppool.core")

local function msg(i, tag)
  local id = ("<%s-%d@pool.test>"):format(tag or "m", i)
  return {
    from = "sender@pool.test",
    to = { ("rcpt%d@y.test"):format(i) },
    data = ("Message-ID: %s\r\nSubject: message %d\r\n\r\nbody of %d\r\n"):format(id, i, i),
    id = id,
  }
end

local function messages(n, tag)
  local out = {}
  for i = 1, n do out[i] = msg(i, tag) end
  return out
end

-- Sends a batch; returns results by message id and the event list.
local function batch(pool, list)
  local results, events = {}, {}
  local calls = 0
  local summary = pool:send_batch(list, { on_result = function(m, res, err)
    calls = calls + 1
    assert.is_nil(results[m.id], "two outcomes for " .. m.id)
    results[m.id] = { res = res, err = err }
  end })
  assert.equal(#list, calls)
  return results, summary, events
end

local function id_of(data)
  return data:match("Message%-ID: (<[^>]+>)")
end

describe("the pool against exim with a session cap of 5", function()
  local exim
  before_each(function() exim = peers.exim({ max_per_conn = 5 }) end)
  after_each(function() if exim then exim:stop() end end)

  local function delivered_ids()
    local ids, dups = {}, 0
    for _, m in ipairs(exim:messages()) do
      local id = id_of(m)
      if ids[id] then dups = dups + 1 end
      ids[id] = (ids[id] or 0) + 1
    end
    return ids, dups
  end

  it("delivers 200 messages with no cap configured, learns 5 and rotates before the 421", function()
    local events = {}
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none", max_conns = 4,
      on_event = function(ev) events[#events + 1] = ev end })
    local list = messages(200, "learn")
    local results, summary = batch(pool, list)
    local st = pool:stats()
    pool:close()
    assert.equal(200, summary.sent)
    for _, m in ipairs(list) do
      local r = results[m.id]
      assert.truthy(r.res, m.id .. ": " .. tostring(r.err))
      assert.equal(1, r.res.attempts) -- moves off exhausted sessions cost no attempt
    end
    exim:wait_deliveries(200, 60)
    local ids, dups = delivered_ids()
    assert.equal(0, dups)
    for _, m in ipairs(list) do assert.equal(1, ids[m.id], m.id) end
    assert.equal(200, exim:deliveries())
    assert.equal(5, st.learned_cap)
    assert.is_true(st.rotated > 0)
    -- connections opened after the pool learned the cap never meet the 421
    local learned_at, later = nil, {}
    for i, ev in ipairs(events) do
      if ev.type == "learn_cap" then learned_at = learned_at or i end
      if learned_at and ev.type == "connect" then later[ev.conn] = true end
    end
    assert.truthy(learned_at)
    local later_421 = 0
    for _, ev in ipairs(events) do
      if ev.type == "discard" and later[ev.conn] then later_421 = later_421 + 1 end
    end
    assert.equal(0, later_421)
    assert.is_true(next(later) ~= nil)
    -- exim's own count of refused MAIL commands stays small: only the lessons
    local refused = #exim:log_lines("too many messages in one connection")
    assert.is_true(refused >= 2 and refused <= 8, "exim refused " .. refused .. " MAIL commands")
  end)

  it("delivers 200 messages with max_messages_per_conn = 5 and never sees a 421", function()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none", max_conns = 4,
      max_messages_per_conn = 5 })
    local list = messages(200, "cap")
    local _, summary = batch(pool, list)
    local st = pool:stats()
    pool:close()
    assert.equal(200, summary.sent)
    exim:wait_deliveries(200, 60)
    local ids, dups = delivered_ids()
    assert.equal(0, dups)
    assert.equal(200, exim:deliveries())
    for _, m in ipairs(list) do assert.equal(1, ids[m.id]) end
    assert.equal(0, #exim:log_lines("too many messages"))
    assert.equal(0, st.closed_by_server)
    -- 40 sessions of 5, give or take the last ones: when the list runs out,
    -- a connection opened for the tail may share it with one that just freed up
    assert.is_true(st.opened >= 40 and st.opened <= 43, "opened " .. st.opened)
  end)
end)

-- Bytes the client wrote on a session after the server faulted it. (Commands
-- pipelined before the fault arrive in the same read and are not reuse.)
local function reused_after_fault(f)
  local faulted, reused = {}, {}
  for _, e in ipairs(f:events()) do
    if e.ev == "fault" then faulted[e.s] = true
    elseif e.ev == "chunk" and faulted[e.s] then reused[#reused + 1] = e.s .. ":" .. e.data end
  end
  return reused
end

-- How the server saw each message: id -> {accepted = n, unconfirmed = n}
local function server_view(f)
  local view = {}
  for _, e in ipairs(f:select("message")) do
    local id = id_of(e.data)
    view[id] = view[id] or { accepted = 0, unconfirmed = 0, rejected = 0 }
    view[id][e.status] = view[id][e.status] + 1
  end
  return view
end

describe("faults at every phase", function()
  local phases = { "greeting", "MAIL", "RCPT", "DATA", "DATA_END" }
  local faults = {
    { "421", { ["do"] = "reply", text = "421 4.3.2 going away" } },
    { "EOF", { ["do"] = "eof" } },
    { "reset", { ["do"] = "reset" } },
  }
  for _, phase in ipairs(phases) do
    for _, fault in ipairs(faults) do
      it(("%s at %s: one outcome each, nothing lost, no dead connection reused"):format(fault[1], phase), function()
        local rules = {}
        for _, nth in ipairs({ 2, 5 }) do
          local r = { on = phase, nth = nth }
          for k, v in pairs(fault[2]) do r[k] = v end
          rules[#rules + 1] = r
        end
        local f = peers.fault({ rules = rules })
        -- (a 421 at the greeting with another connection open is a
        -- concurrency signal: probing back at once keeps both connections,
        -- so the fifth greeting, and its fault, still comes)
        local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 2,
          max_messages_per_conn = 4, retry = smtppool.retry.backoff{ attempts = 4, base = 0.01, max = 0.05 },
          limit_probe_after = 0.001 })
        -- 16 at 4 a session: at least 4 carrying sessions plus the faulted
        -- one, so a fifth greeting comes however the messages spread (12
        -- could end in 3 full sessions and 4 greetings under load)
        local list = messages(16, phase .. fault[1])
        local results = batch(pool, list)
        pool:close()
        local st = pool:stats()
        local view = server_view(f)
        local reused = reused_after_fault(f)
        local fired = #f:select("fault")
        f:stop()
        assert.equal(2, fired)
        assert.same({}, reused)
        for _, m in ipairs(list) do
          local r, v = results[m.id], view[m.id] or { accepted = 0, unconfirmed = 0 }
          local arrived = v.accepted + v.unconfirmed
          if r.res then
            assert.is_true(v.accepted >= 1, m.id .. " reported sent but the server never accepted it")
          else
            -- the default policy gives up only on an ambiguous loss here
            assert.equal("ambiguous", r.err.kind, m.id .. ": " .. tostring(r.err))
            assert.equal(1, arrived)
          end
          if arrived > 1 then
            assert.is_true((r.res and r.res.ambiguous) or (r.err and r.err.kind == "ambiguous"),
              m.id .. " arrived twice without being reported ambiguous")
          end
        end
        if phase == "DATA_END" and fault[1] ~= "421" then
          assert.equal(2, st.ambiguous)
        end
        assert.equal(0, st.open)
      end)
    end
  end
end)

describe("pool behaviour", function()
  local function with_fault(script, opts, fn)
    local f = peers.fault(script)
    local o = { host = "127.0.0.1", port = f.port, tls = "none" }
    for k, v in pairs(opts or {}) do o[k] = v end
    local pool = assert(smtppool.new(o))
    local ok, err = pcall(fn, pool, f)
    pool:close()
    f:stop()
    if not ok then error(err, 0) end
  end

  it("honours LIMITS MAILMAX advertised by the server", function()
    with_fault({ extensions = { "LIMITS MAILMAX=3" } }, { max_conns = 2 }, function(pool, f)
      local _, summary = batch(pool, messages(10))
      assert.equal(10, summary.sent)
      local per = {}
      for _, e in ipairs(f:select("cmd", { cmd = "MAIL" })) do per[e.s] = (per[e.s] or 0) + 1 end
      for s, n in pairs(per) do assert.is_true(n <= 3, "session " .. s .. " carried " .. n) end
    end)
  end)

  it("moves messages off a session answered 452 4.5.3 without spending an attempt, and learns the cap", function()
    with_fault({ max_tx_per_session = 3, cap_reply = "452 4.5.3 Too many transactions", cap_close = false },
      { max_conns = 1 }, function(pool, f)
        local results, summary = batch(pool, messages(18))
        assert.equal(18, summary.sent)
        for _, r in pairs(results) do assert.equal(1, r.res.attempts) end
        assert.equal(3, pool:stats().learned_cap)
        -- the exhausted sessions were RSET and QUIT, never given another MAIL
        -- (RCPT and DATA pipelined with the refused MAIL came before the answer)
        assert.equal(5, #f:select("cap")) -- five sessions ended at 3 before the pool believed it
        local after_cap, quits = {}, 0
        for _, e in ipairs(f:events()) do
          if e.ev == "cap" then after_cap[e.s] = true
          elseif e.ev == "cmd" and after_cap[e.s] then
            assert.is_true(e.cmd ~= "MAIL", "session " .. e.s .. " got another MAIL")
            if e.cmd == "QUIT" then quits = quits + 1 end
          end
        end
        assert.equal(5, quits)
      end)
  end)

  it("retries a 451 at MAIL on a fresh connection and counts the attempt", function()
    with_fault({ rules = { { on = "MAIL", nth = 1, ["do"] = "reply", text = "451 4.3.0 try later" } } },
      { retry = smtppool.retry.backoff{ base = 0.01 } }, function(pool)
        local res, err = pool:send_raw(msg(1))
        assert.is_nil(err)
        assert.equal(2, res.attempts)
        assert.equal(1, pool:stats().retried)
      end)
  end)

  it("takes a batch's own retry policy and event hook, leaving the pool's as they were", function()
    local pool_events, batch_events = {}, {}
    local no_retry = function() return false end
    with_fault({ rules = { { on = "MAIL", nth = 1, ["do"] = "reply", text = "451 4.3.0 try later" } } },
      { retry = no_retry, on_event = function(ev) pool_events[#pool_events + 1] = ev.type end },
      function(pool)
        local outcomes = {}
        pool:send_batch({ msg(1) }, { retry = smtppool.retry.backoff{ base = 0.01 },
          on_event = function(ev) batch_events[#batch_events + 1] = ev.type end,
          on_result = function(_, res, err) outcomes[#outcomes + 1] = { res, err } end })
        assert.truthy(outcomes[1][1], tostring(outcomes[1][2]))
        assert.equal(2, outcomes[1][1].attempts)
        assert.same(pool_events, batch_events) -- both hooks saw every event of the batch
        assert.truthy(table.concat(batch_events, " "):find("retry", 1, true))
        -- afterwards the pool's own policy is back, and the batch hook is gone
        assert.equal(no_retry, pool.retry)
        local n = #batch_events
        assert.truthy(pool:send_raw(msg(2)))
        assert.equal(n, #batch_events)
        assert.has_error(function() pool:send_batch({}, { retry = 3 }) end, "send_batch: retry must be a function")
      end)
  end)

  it("never retries a permanent error", function()
    with_fault({ rules = { { on = "MAIL", ["do"] = "reply", text = "550 5.7.1 no" } } }, {}, function(pool)
      local res, err = pool:send_raw(msg(1))
      assert.is_nil(res)
      assert.equal("permanent", err.kind)
      assert.equal(1, err.attempts)
    end)
  end)

  it("resends an ambiguous message only when the policy says so, and says it may be doubled", function()
    with_fault({ rules = { { on = "DATA_END", nth = 1, ["do"] = "eof" } } },
      { retry = smtppool.retry.backoff{ base = 0.01, ambiguous = true } }, function(pool, f)
        local res, err = pool:send_raw(msg(1))
        assert.is_nil(err)
        assert.is_true(res.ambiguous)
        assert.equal(2, res.attempts)
        assert.equal(2, #f:select("message"))
      end)
  end)

  it("gives up on a dead server after the policy's attempts", function()
    local port = peers.free_port()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none",
      retry = smtppool.retry.backoff{ attempts = 3, base = 0.01 } })
    local res, err = pool:send_raw(msg(1))
    pool:close()
    assert.is_nil(res)
    assert.equal("connection", err.kind)
    assert.equal("connect", err.phase)
    assert.equal(3, err.attempts)
  end)

  it("checks a connection idle past health_check_after with NOOP before reuse", function()
    with_fault({}, { health_check_after = 0.2 }, function(pool, f)
      assert.truthy(pool:send_raw(msg(1)))
      peers.sleep(0.3)
      assert.truthy(pool:send_raw(msg(2)))
      assert.equal(1, #f:select("cmd", { cmd = "NOOP" }))
      assert.equal(1, pool:stats().opened)
    end)
  end)

  it("closes connections idle past idle_timeout instead of reusing them", function()
    with_fault({}, { idle_timeout = 0.2 }, function(pool, f)
      assert.truthy(pool:send_raw(msg(1)))
      peers.sleep(0.3)
      assert.truthy(pool:send_raw(msg(2)))
      assert.equal(2, pool:stats().opened)
      assert.equal(1, #f:select("cmd", { cmd = "QUIT" }))
    end)
  end)

  it("rotates connections older than max_conn_lifetime", function()
    with_fault({}, { max_conn_lifetime = 0.2 }, function(pool)
      assert.truthy(pool:send_raw(msg(1)))
      peers.sleep(0.3)
      assert.truthy(pool:send_raw(msg(2)))
      assert.equal(2, pool:stats().opened)
      assert.equal(1, pool:stats().rotated)
    end)
  end)

  it("pulls an iterator lazily", function()
    with_fault({}, { max_conns = 2 }, function(pool)
      local pulled, done, ahead = 0, 0, 0
      local n = 0
      local function source()
        if n == 50 then return nil end
        n = n + 1
        pulled = pulled + 1
        ahead = math.max(ahead, pulled - done)
        return msg(n, "lazy")
      end
      local summary = pool:send_batch(source, { on_result = function() done = done + 1 end })
      assert.equal(50, summary.sent)
      -- at most the look-ahead queue (2 + rotate_ahead per connection) plus two in
      -- flight per connection (one awaiting its final reply, the next right behind its dot)
      assert.is_true(ahead <= 12, "pulled " .. ahead .. " messages ahead")
    end)
  end)

  it("reports malformed batch items as invalid and sends the rest", function()
    with_fault({}, {}, function(pool)
      local list = { msg(1), { from = "a@x.test", to = { 7 }, data = "x" }, msg(3) }
      local errs = 0
      local summary = pool:send_batch(list, { on_result = function(_, _, err)
        if err then
          errs = errs + 1
          assert.equal("invalid", err.kind)
        end
      end })
      assert.equal(2, summary.sent)
      assert.equal(1, errs)
    end)
  end)
end)

describe("rate limits", function()
  -- Largest number of events in any window of `per` seconds (with a small
  -- allowance for loopback jitter between the client's clock and the log).
  local function max_in_window(times, per) return peers.max_in_window(times, per - 0.02) end

  it("never opens more connections than the window allows, and still completes", function()
    local f = peers.fault({})
    local waits, opened = 0, {}
    -- rotate_ahead = 0: no replacement opened ahead, so exactly one connection per 2 messages
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 2,
      max_messages_per_conn = 2, rate = { connections = { 3, 1 } }, rotate_ahead = 0,
      on_event = function(ev)
        if ev.type == "rate_wait" then waits = waits + 1 end
        if ev.type == "connect" then opened[#opened + 1] = core.now() end
      end })
    local _, summary = batch(pool, messages(16))
    pool:close()
    local times = {}
    for _, e in ipairs(f:select("connect")) do times[#times + 1] = e.t end
    f:stop()
    assert.equal(16, summary.sent)
    assert.equal(8, #times)
    -- exact as the pool opened them; as the server logged them, with room for
    -- a loaded machine's delay between a connect and the server's accept
    assert.is_true(peers.max_in_window(opened, 1) <= 3)
    assert.is_true(peers.max_in_window(times, 1 - 0.25) <= 3, "server-side")
    assert.is_true(waits > 0)
  end)

  it("counts a login when its AUTH leaves: the server never sees more than the AUTH window", function()
    local f = peers.fault({ xoauth2_tokens = { "good" } })
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 3,
      max_messages_per_conn = 1, auth = { user = "alice", token = "good" }, allow_plaintext_auth = true,
      rate = { auth = { 3, 1 } } })
    local _, summary = batch(pool, messages(12))
    pool:close()
    local times = {}
    for _, e in ipairs(f:select("auth")) do times[#times + 1] = e.t end
    f:stop()
    assert.equal(12, summary.sent)
    assert.equal(12, #times)
    assert.is_true(max_in_window(times, 1) <= 3, "the server saw more than 3 logins in a second")
  end)

  it("keeps the connection window with replacements opened ahead of the cap", function()
    local f = peers.fault({})
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 2,
      max_messages_per_conn = 3, rate = { connections = { 3, 1 } }, rotate_ahead = 2 })
    local _, summary = batch(pool, messages(18))
    pool:close()
    local times = {}
    for _, e in ipairs(f:select("connect")) do times[#times + 1] = e.t end
    f:stop()
    assert.equal(18, summary.sent)
    assert.is_true(#times >= 6 and #times <= 8, #times .. " connections for 18 messages, 3 a session")
    assert.is_true(max_in_window(times, 1) <= 3)
  end)

  it("never starts more messages than messages_per_sec allows", function()
    local f = peers.fault({})
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 3,
      rate = { messages = { 4, 0.5 } } })
    local _, summary = batch(pool, messages(14))
    pool:close()
    local times = {}
    for _, e in ipairs(f:select("cmd", { cmd = "MAIL" })) do times[#times + 1] = e.t end
    f:stop()
    assert.equal(14, summary.sent)
    assert.is_true(max_in_window(times, 0.5) <= 4)
  end)
end)

describe("resources", function()
  it("returns to its starting descriptor count after 1,000 messages with faults", function()
    local f = peers.fault({ rules = {
      { on = "MAIL", every = 37, times = -1, ["do"] = "eof" },
      { on = "RCPT", every = 53, times = -1, ["do"] = "reset" },
      { on = "DATA", every = 41, times = -1, ["do"] = "reply", text = "421 4.3.2 bye" },
    } })
    -- earlier specs' pools and servers collected first: their sockets must
    -- not close during this one and make the count look lower after
    collectgarbage()
    collectgarbage()
    local before = peers.fd_count()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", max_conns = 4,
      max_messages_per_conn = 20, retry = smtppool.retry.backoff{ attempts = 5, base = 0.001, max = 0.01 } })
    local _, summary = batch(pool, messages(1000, "fd"))
    local during = pool:stats()
    pool:close()
    collectgarbage()
    collectgarbage()
    -- a leaked descriptor stays; one still closing as the count is taken
    -- (CI met a seventh, gone by the next listing) is given up to 2 s
    local after
    for _ = 1, 40 do
      after = peers.fd_count()
      if after == before then break end
      peers.sleep(0.05)
    end
    f:stop()
    assert.equal(1000, summary.sent)
    assert.is_true(during.closed_by_server > 10)
    assert.equal(before, after)
  end)
end)
