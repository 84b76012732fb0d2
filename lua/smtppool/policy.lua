--- The pool's decisions, pure: time and facts in, decisions out.
--
-- Nothing here touches a socket, a clock or the pool's queues: the
-- scheduler asks and applies. That keeps every rule of ARCHITECTURE.md's
-- invariants testable without a server (`tests/spec/policy_spec.lua`).
-- @module smtppool.policy

local errors = require("smtppool.errors")

local unpack = table.unpack or unpack -- luacheck: ignore (LuaJIT)

local M = {}

--- Moves off an exhausted or stale connection a message may take for free.
M.MAX_FREE_MOVES = 3
--- Exhaustion signals at the same count needed to learn a cap.
M.CAP_EVIDENCE = 3
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

-- ===== after a failed attempt =====

--- Decides what happens to a message after a failed attempt.
-- @tparam table job `attempts`, `free_moves`, `deadline`, `msg`
-- @tparam table err the attempt's error
-- @tparam[opt] number txs transactions the connection had started (this one
--   included); nil when the connection died before carrying the message
-- @tparam number t now
-- @tparam function retry the retry policy `(err, attempt, msg) -> delay | false`
-- @treturn table `{action = "move"}` (a fresh connection, no attempt spent),
--   or `{action = "retry", delay = s, attempts = n, err = e}`, or
--   `{action = "final", attempts = n, err = e}`; `ambiguous = true` when
--   this attempt may have been delivered
function M.after_failure(job, err, txs, t, retry)
  local expired = job.deadline and t >= job.deadline
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
