-- Chaos accounting: a seeded hostile server (session cap, drops after the
-- final dot, resets in the middle of DATA, EOF at RCPT, tempfails, random
-- 421s, slow drips of the final reply) and a batch of messages with unique
-- ids. The invariants the README promises are checked against the server's
-- own log:
--   * every message has exactly one outcome;
--   * a message reported sent (and not flagged) reached the server once;
--   * a failure that is not ambiguous never reached the server;
--   * a message that reached the server more than once is flagged.
-- SP_CHAOS_SEEDS="1,2,3" and SP_CHAOS_N=2000 choose the seeds and the size;
-- a failure names its seed, so `SP_CHAOS_SEEDS=<seed> busted tests/spec/chaos_spec.lua`
-- repeats the server's side of it.
local peers = require("peers")
local smtppool = require("smtppool")

local SEEDS = {}
for s in (os.getenv("SP_CHAOS_SEEDS") or "1,2,3"):gmatch("%d+") do SEEDS[#SEEDS + 1] = tonumber(s) end
local N = tonumber(os.getenv("SP_CHAOS_N") or "") or 2000

local FAULTS = { quiet = true, cap = 7, p_drop_dot = 0.01, p_reset_data = 0.01, p_eof_rcpt = 0.01,
                 p_tempfail = 0.02, p_421 = 0.01, p_drip_dot = 0.003, drip_interval = 0.05 }

local function chaos(seed, resend_ambiguous, window, n)
  local script = { seed = seed, chunking = window and true or nil }
  for k, v in pairs(FAULTS) do script[k] = v end
  local srv = peers.hostile(script)
  local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", helo = "chaos.test",
    max_conns = 4, timeouts = { data_end = 0.4 }, wait_timeout = 30, bdat_window = window,
    retry = smtppool.retry.backoff{ attempts = 6, base = 0.005, max = 0.02, ambiguous = resend_ambiguous } })
  local list = {}
  for i = 1, n or N do
    local id = ("s%d-m%d"):format(seed, i)
    list[i] = { from = "chaos@x.test", to = { ("r%d@y.test"):format(i) }, id = id,
                data = ("X-Test-Id: %s\r\nSubject: %d\r\n\r\nline one\r\n.dot line\r\nend %d\r\n"):format(id, i, i) }
  end
  local outcomes, calls = {}, 0
  local summary = pool:send_batch(list, { on_result = function(m, res, err)
    calls = calls + 1
    local o = outcomes[m.id]
    if o then o.count = o.count + 1 else outcomes[m.id] = { count = 1, res = res, err = err } end
  end })
  local st = pool:stats()
  pool:close()
  local delivered, faults = {}, {}
  for _, e in ipairs(srv:events()) do
    if e.ev == "message" and (e.status == "accepted" or e.status == "unconfirmed") then
      delivered[e.id] = (delivered[e.id] or 0) + 1
    elseif e.ev == "fault" then
      faults[e["do"]] = (faults[e["do"]] or 0) + 1
    end
  end
  srv:stop()
  return list, outcomes, calls, summary, delivered, faults, st
end

local function check(seed, resend, window, n)
  local list, outcomes, calls, summary, delivered, faults, st = chaos(seed, resend, window, n)
  local N = n or N -- luacheck: ignore (this run's size)
  local tag = ("seed=%d resend_ambiguous=%s bdat_window=%s: "):format(seed, tostring(resend), tostring(window))
  assert.equal(N, calls, tag .. "outcome count")
  assert.equal(N, summary.total, tag .. "summary total")
  assert.equal(N, summary.sent + summary.failed, tag .. "sent + failed")
  local flagged_dups = 0
  for _, m in ipairs(list) do
    local o = outcomes[m.id]
    local d = delivered[m.id] or 0
    assert.truthy(o, tag .. m.id .. " has no outcome")
    assert.equal(1, o.count, tag .. m.id .. " has " .. o.count .. " outcomes")
    if o.res then
      assert.is_true(d >= 1, tag .. m.id .. " reported sent but the server never got it")
      if not o.res.ambiguous then
        assert.equal(1, d, tag .. m.id .. " sent unflagged but delivered " .. d .. " times")
      else
        flagged_dups = flagged_dups + 1
      end
    else
      local amb = o.err.kind == "ambiguous" or o.err.ambiguous
      if not amb then
        assert.equal(0, d, tag .. m.id .. " failed (" .. tostring(o.err) .. ") but the server got it " .. d .. " times")
      else
        assert.is_true(d <= o.err.attempts, tag .. m.id .. " delivered more often than tried")
        if not resend then assert.is_true(d <= 1, tag .. m.id .. " was resent after an ambiguous loss") end
      end
    end
    if d > 1 then
      assert.is_true((o.res and o.res.ambiguous) or (o.err and (o.err.kind == "ambiguous" or o.err.ambiguous)),
        tag .. m.id .. " delivered " .. d .. " times without a duplicate flag")
    end
  end
  -- the mix really happened (over BDAT, a shorter run, with no DATA phase to
  -- reset in: the cap and at least three other kinds)
  if window then
    local kinds = 0
    for _, f in ipairs({ "drop_dot", "eof_rcpt", "tempfail", "421" }) do
      if (faults[f] or 0) > 0 then kinds = kinds + 1 end
    end
    assert.is_true((faults.cap or 0) > 0 and kinds >= 3, tag .. "too few kinds of fault were injected")
  else
    for _, f in ipairs({ "cap", "drop_dot", "reset_data", "eof_rcpt", "tempfail", "421" }) do
      assert.is_true((faults[f] or 0) > 0, tag .. "no " .. f .. " fault was injected")
    end
  end
  return st, flagged_dups, summary
end

describe("chaos accounting", function()
  for _, seed in ipairs(SEEDS) do
    it(("keeps every promise under seeded faults (seed %d, %d messages)"):format(seed, N), function()
      local st, _, summary = check(seed, false)
      -- most mail gets through the faults; what does not is reported
      assert.is_true(summary.sent > N * 0.9, ("seed=%d: only %d sent"):format(seed, summary.sent))
      assert.is_true(st.moved > 0)
    end)
  end

  -- Over BDAT, every window from 1 to the documented maximum: up to window
  -- transactions per connection await their replies when a fault strikes.
  local NB = tonumber(os.getenv("SP_CHAOS_BDAT_N") or "") or 300
  for window = 1, 16 do
    it(("keeps every promise over BDAT with a window of %d (seed %d, %d messages)"):format(window, SEEDS[1], NB),
      function()
        -- a fault takes a whole window with it (ambiguous, not resent): fewer
        -- get through than over DATA, every one accounted for
        local _, _, summary = check(SEEDS[1] + window, false, window, NB)
        assert.is_true(summary.sent > NB / 2, ("window %d: only %d sent"):format(window, summary.sent))
      end)
  end

  it(("flags every duplicate when ambiguous losses are resent (seed %d)"):format(SEEDS[1] + 100), function()
    local _, flagged = check(SEEDS[1] + 100, true)
    assert.is_true(flagged > 0, "no message was resent after an ambiguous loss")
  end)
end)
