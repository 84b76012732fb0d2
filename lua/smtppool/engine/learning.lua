--- The scheduler's limit learning: what the pool learns from the
-- server's refusals (session caps, concurrent connections, message and
-- login rates) and the ceilings that follow. Methods mixed into the pool
-- with the scheduler's (`smtppool.engine.scheduler`); the rules are
-- `smtppool.engine.policy`'s (`signal`, the learners).
-- @module smtppool.engine.learning

local policy = require("smtppool.engine.policy")

local S = {}

-- The learned cap in force: this pool's, or a smaller one another process
-- sharing the limits learned.
function S:_learned_cap()
  local mine, theirs = self.learner.cap, self.limits:cap()
  if mine and theirs then return math.min(mine, theirs) end
  return mine or theirs
end

-- How long a server may go on counting a socket the pool has closed.
local CLOSE_GRACE = 0.25

-- Other connections of the account open, as the server may count them now:
-- the pool's own (every process's with shared limits), and one more when
-- a session ended a moment ago.
function S:_others_open(t)
  local n = #self.conns
  if self.limits.open_total then n = math.max(n, self.limits:open_total() or 0) end
  if self.closed_ready_at and t - self.closed_ready_at < CLOSE_GRACE then n = n + 1 end
  return n
end

local LEARNED_NAMES = { conns = "conns", rate = "rate", auth = "auth_per_min" }
-- The learner each limit signal (policy.signal) teaches.
local SIGNAL_LEARNER = { concurrency = "conns", rate = "rate", auth_rate = "auth" }

-- Applies a limit signal to what the pool has learned.
function S:_learn_limit(sig, t, others)
  local name = SIGNAL_LEARNER[sig]
  if not name then return end
  local n = self.learned[name]:observe(t, others)
  if n then
    if name == "conns" then self.limits:publish_learned("conns", n, self.cfg.cap_recover_after) end
    self:_emit({ type = "learn_limit", limit = LEARNED_NAMES[name], value = n, reason = "signal" })
  end
end

-- Probes learned limits upward after quiet periods, or forgets them.
function S:_tick_limits(t)
  for name, l in pairs(self.learned) do
    local what, n = l:tick(t)
    if what and name == "conns" then self.limits:publish_learned("conns", n, self.cfg.cap_recover_after) end
    if what == "probe" then
      self:_emit({ type = "learn_limit", limit = LEARNED_NAMES[name], value = n, reason = "probe" })
    elseif what == "forget" then
      self:_emit({ type = "unlearn_limit", limit = LEARNED_NAMES[name] })
    end
  end
end

-- The sockets the pool may have open: max_conns, or less while a
-- concurrency limit is learned (here or by another process sharing the
-- limits).
function S:_ceiling()
  local l, shared = self.learned.conns.limit, self.limits:learned("conns")
  if shared and (not l or shared < l) then l = shared end
  if l and l < self.cfg.max_conns then return l, true end
  return self.cfg.max_conns, false
end

-- Whether a failure that is a limit signal moves its message for free: a
-- few times while the pool delivers nothing, any number while it does.
function S:_limit_move(job, sig, t)
  if not sig or sig == "session" then return false end
  if job.limit_moved_at and (self.progress_at or -1) > job.limit_moved_at then job.limit_moves = 0 end
  if (job.limit_moves or 0) >= policy.MAX_LIMIT_MOVES then return false end
  job.limit_moves = (job.limit_moves or 0) + 1
  job.limit_moved_at = t
  return true
end

-- Whether a MAIL refused (4xx, not 421) after n transactions on rec is
-- one rate limit with others (policy.signal's `correlated`): refusals on
-- two connections or more within the signal window, dense among its MAILs
-- (policy refusals, 4.7.x, need not be), or one while a learned rate is
-- probed upward. Never when a session count
-- explains it (a cap learned or last seen at n), nor on a connection
-- refused more times in a row than one window of transactions could be:
-- that session is exhausted, whatever the others are.
function S:_correlated(rec, n, t, err)
  if n == self.learner.cap or n == self.learner.last then return false end
  if (rec.mail_refusals or 0) > math.max(1, self.cfg.bdat_window) + 1 then return false end
  local r = self.learned.rate
  if r:probing() then return true end
  local recent, conns, k = {}, {}, 0
  for _, m in ipairs(self.mail_refused or {}) do
    if t - m.t < policy.SIGNAL_WINDOW then
      recent[#recent + 1] = m
      if not conns[m.conn] then conns[m.conn] = true k = k + 1 end
    end
  end
  self.mail_refused = recent
  local mails = r:count(t) + #recent
  local density = policy.policy_status(err) and 0 or policy.RATE_DENSITY
  return k >= 2 and mails >= policy.RATE_MIN_SAMPLE and #recent >= mails * density
end

function S:_cap(rec)
  return policy.cap_in_force(self.cfg.max_messages_per_conn, rec.caps and rec.caps.mailmax, self:_learned_cap())
end

-- A transaction delivered on rec: a session that has carried n is
-- evidence against any cap below n (a real cap never lets one get there),
-- as soon as it does.
function S:_tx_sent(rec, t)
  self.learner:note_session(rec.sent)
  self.progress_at = t
  rec.mail_refusals = nil
end

-- A transaction on rec failed with err: notes a refused MAIL, asks the
-- policy which limit (if any) the failure is a signal of, teaches it, and
-- returns the signal.
function S:_tx_failed(rec, job, err, t)
  local refused = policy.mail_refusal(err)
  if refused then
    local l = self.mail_refused or {}
    l[#l + 1] = { conn = rec.id, t = t }
    self.mail_refused = l
    rec.mail_refusals = (rec.mail_refusals or 0) + 1
    self.learned.rate:unnote() -- a refused start is not one the server let through
  end
  local sig = policy.signal(err, { txs = job.seq, correlated = refused and self:_correlated(rec, job.seq - 1, t, err) })
  self:_learn_limit(sig, t)
  if sig == "session" and not rec.exhaust_noted then
    -- Once per session: the transactions behind it in a pipeline or BDAT
    -- window fail with it, at higher counts.
    rec.exhaust_noted = true
    -- Sessions still open that carried more than this one are evidence
    -- against a cap at its count (a real cap never lets one).
    for _, other in ipairs(self.conns) do
      if other ~= rec and other.sent > job.seq - 1 then self.learner:note_session(other.sent) end
    end
    local learned = self.learner:observe(job.seq - 1, t)
    if learned then
      self.limits:publish_cap(learned, self.cfg.cap_recover_after)
      self:_emit({ type = "learn_cap", cap = learned })
    end
  end
  return sig
end

-- A connection failed with e before it carried a message: refused at
-- connect or greeting while others are open is a concurrency signal, at
-- AUTH one of the login rate. Returns the signal.
function S:_conn_failed(e, t)
  local others = self:_others_open(t)
  local sig = policy.signal(e, { others = others })
  self:_learn_limit(sig, t, others)
  return sig
end

-- ===== rotation ahead by time =====
-- What a replacement connection costs and what a session's messages take,
-- measured on this pool's connections as moving averages: the handshake
-- (open to ready: connect, greeting, EHLO, TLS, AUTH) and the interval
-- between a session's answers.

local function average(old, x) return old and old + (x - old) / 8 or x end

-- rec's session became ready at t.
function S:_note_ready(rec, t)
  self.handshake_time = average(self.handshake_time, t - rec.born)
  rec.ready_at = t
end

-- A transaction on rec was answered at t (sent or not).
function S:_note_answer(rec, t)
  if rec.answered_at then self.answer_time = average(self.answer_time, t - rec.answered_at) end
  rec.answered_at = t
  rec.answered = (rec.answered or 0) + 1
end

-- When rec's replacement should open, rec's session ending after cap
-- transactions: once the time its unanswered messages still take falls to
-- the handshake time, so the replacement is ready as the old one leaves.
-- nil until both are measured (the caller rotates ahead by count then).
function S:_replace_at(rec, cap)
  local hs, per = self.handshake_time, self.answer_time
  local since = rec.answered_at or rec.ready_at
  if not (hs and per and since) then return nil end
  return since + math.max(0, cap - (rec.answered or 0)) * per - hs
end

return S
