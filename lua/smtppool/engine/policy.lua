--- The pool's decisions, pure: time and facts in, decisions out.
--
-- Nothing here touches a socket, a clock or the pool's queues: the
-- scheduler asks and applies. That keeps every rule of ARCHITECTURE.md's
-- invariants testable without a server (`tests/spec/policy_spec.lua`).
-- @module smtppool.engine.policy

local errors = require("smtppool.errors")

local unpack = table.unpack or unpack -- luacheck: ignore (LuaJIT)

local M = {}

--- Moves off an exhausted or stale connection a message may take for free.
M.MAX_FREE_MOVES = 3
--- Exhaustion signals at the same count needed to learn a cap. Three let
-- random refusals (a 451 to one MAIL in 19, two connections) teach a false
-- cap in about one run of 2,000 messages in 35; five, one in 22,000.
M.CAP_EVIDENCE = 5
--- No cap below this is ever learned.
M.CAP_FLOOR = 2

--- The session cap in force: the least of the configured, the advertised
-- (`LIMITS MAILMAX`) and the learned one; nil when there is none.
function M.cap_in_force(configured, advertised, learned)
  local cap = configured
  if advertised and (not cap or advertised < cap) then cap = advertised end
  if learned and (not cap or learned < cap) then cap = learned end
  return cap
end

--- Whether err is the configuration's, not the message's: a TLS failure (a
-- mode the server does not speak, a certificate that fails verification),
-- a `config` error (a host name that does not exist, a silent first
-- greeting) or a refused login. Every message would meet it alike: a batch
-- fails its queue once, a campaign stops with the rows still pending.
function M.misconfigured(err)
  local k = err and err.kind
  return k == "tls" or k == "config" or (k == "auth" and err.code ~= nil)
end

--- Whether a failure says the server declared the session exhausted: a 421
-- anywhere, or any 4xx to MAIL, on a connection that had already started
-- `txs - 1` transactions before this one (DESIGN invariant 4; no reply text
-- is ever matched).
function M.exhausted(txs, err)
  if txs <= 1 or not err.code then return false end
  if err.code == 421 then return true end
  return err.phase == "mail" and err.code >= 400 and err.code < 500
end

-- ===== learning a cap =====

local Learner = {}
Learner.__index = Learner

--- A cap learner. A server with a real cap ends every session at the same
-- count; ordinary failures end them at scattered counts while other
-- sessions carry more. So n is learned when the server declared
-- `CAP_EVIDENCE` sessions exhausted after n transactions with no session in
-- between carrying more than n, never below `CAP_FLOOR`; and a learned cap
-- is forgotten after `recover_after` seconds without an exhaustion signal.
-- @tparam number recover_after seconds
function M.learner(recover_after)
  return setmetatable({ cap = nil, seen = {}, signal_at = nil, recover_after = recover_after }, Learner)
end

--- A session ended having carried n messages: evidence against any cap below n.
function Learner:note_session(n)
  for k in pairs(self.seen) do
    if k < n then self.seen[k] = nil end
  end
end

--- The server declared a session exhausted after n transactions at time t.
-- @treturn[opt] number the newly learned cap, when this made one
function Learner:observe(n, t)
  self.signal_at = t
  -- The evidence must be consecutive: a signal at another count (a random
  -- failure in between) starts it over.
  if self.last ~= n then self.seen = {} end
  self.last = n
  if n < M.CAP_FLOOR then return nil end
  self.seen[n] = (self.seen[n] or 0) + 1
  if self.seen[n] >= M.CAP_EVIDENCE and (not self.cap or n < self.cap) then
    self.cap = n
    return n
  end
  return nil
end

--- Forgets the learned cap after a quiet period.
-- @treturn[opt] number the cap forgotten, when one was
function Learner:recover(t)
  if self.cap and t - (self.signal_at or t) >= self.recover_after then
    local old = self.cap
    self.cap, self.seen, self.signal_at = nil, {}, t
    return old
  end
  if not self.signal_at then self.signal_at = t end
  return nil
end

-- ===== the server's limit signals =====

--- Seconds within which MAIL refusals on different connections are taken
-- for one rate limit rather than for sessions that each ran out.
M.SIGNAL_WINDOW = 1
--- A rate signal needs MAIL refusals dense enough to be one: at least this
-- share of the MAILs of the last `SIGNAL_WINDOW` (a server's sparse
-- tempfails are not a rate), and at least `RATE_MIN_SAMPLE` MAILs. A
-- refusal the server marks as policy (enhanced status 4.7.x, RFC 3463: SES
-- throttling answers `454 4.7.0`) needs no density: a pool a few percent
-- over a rate limit is refused a few percent of its MAILs, and those
-- refusals would otherwise spend the messages' attempts.
M.RATE_DENSITY = 0.2
M.RATE_MIN_SAMPLE = 10

--- Whether a failure carries a policy enhanced status (4.7.x, RFC 3463).
function M.policy_status(err)
  local e = err.enhanced
  return type(e) == "string" and e:match("^4%.7%.%d+$") ~= nil
end
--- Moves by limit signals a message may take while the pool delivers
-- nothing: past them, a "limit" that never lets anything through is an
-- ordinary transient failure, and the retry policy decides.
M.MAX_LIMIT_MOVES = 5

--- Whether a failure is MAIL refused for now with the session kept: a
-- 4xx other than 421 (the refusals a rate limit gives).
function M.mail_refusal(err)
  local code = err.code
  return err.phase == "mail" and code ~= nil and code >= 400 and code < 500 and code ~= 421
end

--- Classifies a failure as one of the server's limit signals, by reply
-- code, phase and correlation, never by reply text (DESIGN invariant 4):
--
-- * `"concurrency"`: a 4xx at connect or greeting (421, 432...) while
--   other connections of the account are open.
-- * `"auth_rate"`: a 4xx to AUTH (454...).
-- * `"rate"`: a 4xx other than 421 to MAIL correlated with others
--   (`ctx.correlated`: such refusals on two connections or more within
--   `SIGNAL_WINDOW`, at least `RATE_DENSITY` of its MAILs unless they are
--   policy refusals (4.7.x), or one while a
--   learned rate is being probed upward) and not explained by a session
--   count.
-- * `"session"`: the session is exhausted (`exhausted`).
--
-- Any other failure is none of them (nil): transient, permanent... as its
-- kind says.
-- @tparam table err the failure
-- @tparam table ctx `txs` (transactions the connection started, this one
--   included; nil when it died before carrying one), `others` (other
--   connections of the account open), `correlated` (a MAIL refusal on
--   another connection within `SIGNAL_WINDOW`)
-- @treturn[opt] string the signal
function M.signal(err, ctx)
  local code, phase = err.code, err.phase
  if not code or code < 400 or code >= 500 then return nil end
  if phase == "connect" or phase == "greeting" then
    return (ctx.others or 0) > 0 and "concurrency" or nil
  end
  if phase == "auth" then return "auth_rate" end
  if ctx.correlated and M.mail_refusal(err) then return "rate" end
  if ctx.txs and M.exhausted(ctx.txs, err) then return "session" end
  return nil
end

-- ===== learning concurrency =====

--- The additive half of a learner (its `limit`, `level`, `signal_at`,
-- `probe_at`, `probe_after`, `recover_after`): after `recover_after`
-- seconds without a signal the limit is forgotten; after each quiet
-- `probe_after` it rises by `step`, and is forgotten on reaching `ceiling`.
-- @treturn[opt] string `"probe"` or `"forget"`
-- @treturn[opt] number the limit now
function M.probe_tick(l, t, step, ceiling)
  if not l.limit then return nil end
  if t - l.signal_at >= l.recover_after then
    l.limit, l.level = nil, nil
    return "forget"
  end
  if t - l.probe_at < l.probe_after then return nil end
  l.probe_at = t
  l.limit = l.limit + step
  if ceiling and l.limit >= ceiling then
    l.limit, l.level = nil, nil
    return "forget"
  end
  return "probe", l.limit
end

local Conc = {}
Conc.__index = Conc

--- A concurrency learner, as Postfix's queue manager learns a destination's:
-- refusals with n other connections open cut the limit to n (never below
-- 1), each quiet `probe_after` seconds raise it by one, and it is
-- forgotten on reaching `ceiling` (the configured `max_conns`) or after
-- `recover_after` seconds without a signal. One refusal alone cuts only a
-- probe back to the level that held: a cut below it takes two within
-- `SIGNAL_WINDOW` (a server's odd 421 at the greeting must not ratchet the
-- pool down).
function M.concurrency_learner(ceiling, probe_after, recover_after)
  return setmetatable({ ceiling = ceiling, probe_after = probe_after, recover_after = recover_after,
                        recent = {} }, Conc)
end

--- A connection was refused for concurrency at time t with `others` open.
-- @treturn[opt] number the new limit, when this cut it
function Conc:observe(t, others)
  self.signal_at, self.probe_at = t, t
  if self.limit and self.level and self.limit > self.level then
    self.limit = self.level -- the probe was refused
    return self.limit
  end
  local recent = {}
  for _, x in ipairs(self.recent) do
    if t - x < M.SIGNAL_WINDOW then recent[#recent + 1] = x end
  end
  recent[#recent + 1] = t
  self.recent = recent
  if #recent < 2 then return nil end
  local n = math.max(1, others)
  if n >= self.ceiling or (self.limit and n >= self.limit) then return nil end
  self.limit, self.level = n, n
  return n
end

--- Probes upward after a quiet period, or forgets.
-- @treturn[opt] string `"probe"` or `"forget"`
-- @treturn[opt] number the limit now (nil when forgotten)
function Conc:tick(t) return M.probe_tick(self, t, 1, self.ceiling) end

-- ===== learning a rate =====

local Rate = {}
Rate.__index = Rate

--- A rate learner for events (messages started, logins) counted over `per`
-- seconds. It keeps the times of the recent events; a signal sets the
-- limit to 90 % of the events in the last `per` (what the server let
-- through, so a cut at most once per `per`), each quiet `probe_after`
-- seconds raise it by 5 % (at least one), a signal after a probe takes
-- the limit back to the level that held (no cut below it), and it is
-- forgotten after `recover_after` seconds without a signal. `wait(t)` paces to the limit
-- over the same history (so a new limit applies to what was just sent).
function M.rate_learner(per, probe_after, recover_after)
  return setmetatable({ per = per, probe_after = probe_after, recover_after = recover_after,
                        times = {}, head = 1, tail = 0 }, Rate)
end

-- Drops the events older than the window (with the pacing margin).
-- times[head..tail] are the events kept, oldest first.
function Rate:_trim(t)
  local times, head = self.times, self.head
  local from = t - self.per - math.max(0.02, self.per * 0.01)
  while head <= self.tail and times[head] < from do
    times[head] = nil
    head = head + 1
  end
  if head > self.tail then head, self.tail = 1, 0 end
  self.head = head
end

--- One event at time t.
function Rate:note(t)
  self:_trim(t)
  self.tail = self.tail + 1
  self.times[self.tail] = t
end

--- Takes back the newest event (one the server refused does not count).
function Rate:unnote()
  if self.tail >= self.head then
    self.times[self.tail] = nil
    self.tail = self.tail - 1
  end
end

-- Events in the last `per` seconds.
function Rate:count(t)
  self:_trim(t)
  local n = 0
  for i = self.head, self.tail do
    if self.times[i] > t - self.per then n = n + 1 end
  end
  return n
end

--- The server refused an event for its rate at time t.
-- @treturn[opt] number the new limit, when this cut it
function Rate:observe(t)
  self.signal_at, self.probe_at = t, t
  if self:probing() then
    self.limit = self.level -- the probe was refused
    return self.limit
  end
  if self.cut_at and t - self.cut_at < self.per then return nil end
  local n = math.max(1, math.floor(self:count(t) * 0.9))
  if self.limit and n >= self.limit then n = math.max(1, math.floor(self.limit * 0.9)) end
  self.limit, self.level, self.cut_at = n, n, t
  return n
end

--- Whether the limit was probed above the level that last held.
function Rate:probing()
  return self.limit ~= nil and self.level ~= nil and self.limit > self.level
end

--- Seconds until one more event keeps to the learned limit (0: now).
function Rate:wait(t)
  if not self.limit then return 0 end
  self:_trim(t)
  local n = self.tail - self.head + 1
  if n < self.limit then return 0 end
  local per = self.per + math.max(0.02, self.per * 0.01)
  local w = self.times[self.head + n - self.limit] + per - t
  return w > 0 and w or 0
end

--- Probes upward after a quiet period, or forgets.
-- @treturn[opt] string `"probe"` or `"forget"`
-- @treturn[opt] number the limit now
function Rate:tick(t) return M.probe_tick(self, t, math.max(1, math.floor((self.limit or 0) * 0.05))) end

-- ===== after a failed attempt =====

--- Decides what happens to a message after a failed attempt.
-- @tparam table job `attempts`, `free_moves`, `deadline`, `msg`
-- @tparam table err the attempt's error
-- @tparam[opt] number txs transactions the connection had started (this one
--   included); nil when the connection died before carrying the message
-- @tparam number t now
-- @tparam function retry the retry policy `(err, attempt, msg) -> delay | false`
-- @tparam[opt] boolean limit_move the failure is a limit signal (see
--   `signal`) the message may move on for free (the scheduler bounds it by
--   `MAX_LIMIT_MOVES` without progress)
-- @treturn table `{action = "move"}` (a fresh connection, no attempt spent),
--   or `{action = "retry", delay = s, attempts = n, err = e}`, or
--   `{action = "final", attempts = n, err = e}`; `ambiguous = true` when
--   this attempt may have been delivered
function M.after_failure(job, err, txs, t, retry, limit_move)
  local expired = job.deadline and t >= job.deadline
  if limit_move and not expired then
    -- A limit of the server's (concurrency, rate, logins): the message waits
    -- its turn, it did nothing wrong.
    return { action = "move", limit = true }
  end
  if txs and not expired and job.free_moves < M.MAX_FREE_MOVES and
      (M.exhausted(txs, err) or (txs > 1 and err.kind == "connection" and not err.code)) then
    -- An exhausted or stale reused connection: not the message's fault.
    return { action = "move" }
  end
  local attempts = job.attempts + 1
  local d = { attempts = attempts, ambiguous = err.kind == "ambiguous" or nil }
  local ok, delay = pcall(retry, err, attempts, job.msg)
  if not ok then
    err = errors.annotate(err, "retry policy failed: " .. tostring(delay))
    delay = false
  end
  if type(delay) == "number" and not (delay >= 0 and delay < math.huge) then
    err = errors.annotate(err, "retry policy returned " .. tostring(delay))
    delay = false
  end
  if type(delay) == "number" and job.deadline and t + delay >= job.deadline then
    err = errors.annotate(err, ("message_timeout %gs reached"):format(job.timeout or 0))
    delay = false
  end
  d.err = err
  if type(delay) == "number" then
    d.action, d.delay = "retry", delay
  else
    d.action = "final"
  end
  return d
end

-- ===== outcomes =====

--- A transaction's table (from the C core) as the result or error users get.
function M.outcome(tx)
  local rejected = {}
  for _, r in ipairs(tx.recipients) do
    if not r.ok then rejected[#rejected + 1] = r end
  end
  if tx.ok then
    return { code = tx.code, enhanced = tx.enhanced, text = tx.text, recipients = tx.recipients,
             rejected = rejected }
  end
  local e = tx.err
  if #tx.recipients > 0 and tx.recipients[1].code then e.recipients = tx.recipients end
  return nil, e
end

--- RFC 9422 LIMITS RCPTMAX: the parts of a message with more recipients than
-- the server takes in one transaction, each with at most `max`.
-- @treturn table the parts (jobs sharing one `group`; the first is part 1)
function M.split(job, max)
  local group = { job = job, parts = {}, pending = 0 }
  local parts = {}
  for i = 1, #job.to, max do
    local to = { unpack(job.to, i, math.min(i + max - 1, #job.to)) }
    local part = { msg = job.msg, to = to, attempts = job.attempts, free_moves = 0, queued_at = job.queued_at,
                   user_msg = job.user_msg, deadline = job.deadline, timeout = job.timeout, group = group }
    parts[#parts + 1] = part
    part.part = #parts
  end
  group.pending = #parts
  return parts
end

--- The one outcome of a message sent as several transactions: sent when any
-- recipient was accepted (the others listed as rejected, with the reason of
-- their part), else the failure of the first part, ambiguous when any part
-- may have been delivered. Attempts are the most any part took.
-- @treturn[1] table result, with `transactions`
-- @return[2] nil
-- @treturn[2] table error, with every recipient's reply
-- @treturn number attempts
-- @treturn boolean whether any part was ambiguous
function M.merge_parts(group)
  local recipients, rejected, first_ok, first_err, ambiguous_err = {}, {}, nil, nil, nil
  local attempts, ambiguous = 0, false
  for _, p in ipairs(group.parts) do
    attempts = math.max(attempts, p.job.attempts)
    if p.job.ambiguous then ambiguous = true end
    if p.res then
      first_ok = first_ok or p.res
      for _, r in ipairs(p.res.recipients) do recipients[#recipients + 1] = r end
    else
      local e = p.err
      first_err = first_err or e
      if e.kind == "ambiguous" or e.ambiguous then ambiguous_err = ambiguous_err or e end
      local answered = {}
      for _, r in ipairs(e.recipients or {}) do answered[r.address] = r end
      for _, a in ipairs(p.job.to) do
        recipients[#recipients + 1] = answered[a] or { address = a, ok = false, code = e.code,
          enhanced = e.enhanced, text = e.text }
      end
    end
  end
  for _, r in ipairs(recipients) do
    if not r.ok then rejected[#rejected + 1] = r end
  end
  if first_ok then
    local res = { code = first_ok.code, enhanced = first_ok.enhanced, text = first_ok.text,
                  recipients = recipients, rejected = rejected, transactions = #group.parts }
    if ambiguous_err then res.ambiguous = true end
    return res, nil, attempts, ambiguous
  end
  local out = errors.new((ambiguous_err or first_err).kind, (ambiguous_err or first_err).text,
    ambiguous_err or first_err)
  out.recipients = recipients
  return nil, out, attempts, ambiguous
end

--- A batch's summary, and the function that counts one outcome into it and
-- passes it on to `on_result`.
-- @tparam[opt] function on_result called with `(msg, res, err)` after counting
-- @treturn table `{sent, failed, cancelled, total}`, kept up to date
-- @treturn function `account(msg, res, err)`
function M.summary(on_result)
  local s = { sent = 0, failed = 0, cancelled = 0, total = 0 }
  return s, function(msg, res, err)
    s.total = s.total + 1
    if res then s.sent = s.sent + 1
    elseif err.kind == "cancelled" then s.cancelled = s.cancelled + 1
    else s.failed = s.failed + 1 end
    if on_result then on_result(msg, res, err) end
  end
end

return M
