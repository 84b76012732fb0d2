--- The scheduler: runs a queue of messages over a driver's connections.
--
-- These are the pool's internal methods (`init.lua` mixes them into the
-- pool object). They keep ARCHITECTURE.md's invariants; every decision is
-- asked of `smtppool.engine.policy`, every byte moved by the driver
-- (`self.driver`: `open`, `wait`, handle methods; see
-- `smtppool.driver.native`).
--
-- A job is one message (or one part of a message split for RCPTMAX) on its
-- way: queued, deferred for a retry, bound to a connection that is still
-- opening, or in flight on a busy one. Never in two places.
--
-- Connection record states:
--   connecting  opened, greeting/EHLO not done yet (rec.job may be bound to it)
--   idle        ready for a transaction
--   busy        a transaction in flight (rec.job; rec.fly: earlier ones, oldest
--               first, whose final dot's (or last BDAT chunk's) reply is still
--               awaited: one with DATA (RFC 2920), up to bdat_window - 1 with BDAT)
--   pipelining  busy, and its final dot is queued: the next transaction may
--               start now, before that dot's reply (the server offers PIPELINING)
--   settling    transaction reported, READY not yet back (RSET in flight)
--   checking    NOOP health check in flight
--   quitting    QUIT sent
--   gone        closed and removed
-- @module smtppool.engine.scheduler

local errors = require("smtppool.errors")
local options = require("smtppool.options")
local policy = require("smtppool.engine.policy")

local unpack = table.unpack or unpack -- luacheck: ignore (LuaJIT)

local S = {}

-- How often a pool denied a connection slot by a shared backend looks again.
local SLOT_POLL = 0.05

-- The pool's on_event, and a batch's own (send_batch's opts.on_event).
local function call_hook(self, hook, ev)
  local ok, e = pcall(hook, ev)
  if not ok and not self._hook_warned then
    -- A broken hook must not break delivery; report it once on stderr.
    self._hook_warned = true
    io.stderr:write("smtppool: on_event hook failed: ", tostring(e), "\n")
  end
end

function S:_emit(ev)
  if self.batch_on_event then call_hook(self, self.batch_on_event, ev) end
  if self.on_event then call_hook(self, self.on_event, ev) end
end

-- ===== connections =====

function S:_remove(rec)
  if rec.state ~= "gone" then self.learner:note_session(rec.sent) end
  if rec.caps and rec.state ~= "gone" then self.closed_ready_at = self.driver.now() end
  for i, r in ipairs(self.conns) do
    if r == rec then table.remove(self.conns, i) break end
  end
  -- the socket closes before its slot is given back: another process (an
  -- nginx worker, a machine sharing Redis) may open one the moment it is
  rec.c:close()
  rec.state = "gone"
  if rec.slot then
    rec.slot = nil
    self.limits:conn_release()
  end
end

-- QUITs a connection; reason "cap", "lifetime" or "exhausted" makes it a
-- rotation, "idle" an idle close.
function S:_quit(rec, reason)
  rec.c:quit()
  rec.state = "quitting"
  if reason == "idle" then
    self:_emit({ type = "idle_close", conn = rec.id, messages = rec.sent })
  elseif reason then
    self.counters.rotated = self.counters.rotated + 1
    self:_emit({ type = "rotate", conn = rec.id, messages = rec.sent, reason = reason })
  end
end

-- The credentials for one new connection (a token function is asked each time).
function S:_credentials()
  local a = self.auth
  local secret, mech = a.password, a.mechanism
  if a.token ~= nil then
    secret = a.token
    if type(secret) == "function" then
      local ok, tok = pcall(secret)
      if not ok or type(tok) ~= "string" then
        return nil, errors.new("auth", "the auth.token function did not return a token: "
          .. (ok and type(tok) or tostring(tok)), { phase = "auth" })
      end
      local bad = options.bad_secret(tok)
      if bad then return nil, errors.new("auth", "the token from auth.token" .. bad, { phase = "auth" }) end
      secret = tok
    end
    mech = mech or "XOAUTH2"
  end
  return { user = a.user, secret = secret, mechanism = mech, allow_plaintext = self.opts.allow_plaintext_auth }
end

-- Connections carrying messages (or ready to): neither spares opened ahead
-- of a rotation nor connections already QUITting.
function S:_senders()
  local n = 0
  for _, rec in ipairs(self.conns) do
    if not rec.spare and rec.state ~= "quitting" then n = n + 1 end
  end
  return n
end

-- The windows a new connection spends from.
local CONNECT, CONNECT_AUTH, MESSAGE, AUTH = { "connections" }, { "connections", "auth" }, { "messages" },
  { "auth" }

-- With an AUTH window, a login is counted when its AUTH command leaves
-- (the session waits at "auth" for the pool), not when its connection
-- opens: the server sees logins a handshake after the connect, and
-- handshakes vary, so counting at connect could let the server see more
-- than the window in some stretch.
function S:_connect_windows()
  return (self.auth and not self.auth_gate) and CONNECT_AUTH or CONNECT
end

-- Spends the AUTH window for a connection waiting at "auth" and lets it
-- go; returns 0, or the seconds until the window allows it.
function S:_auth_go(rec, t)
  local w = self.limits:take(AUTH, t)
  if w > 0 then return w end
  rec.auth_wait = nil
  rec.c:auth_go()
  return 0
end

-- Opens a connection. The caller has taken its slot (conn_acquire) and its
-- windows (connections, auth); the slot is released when the record goes.
function S:_open(t, job)
  self.conn_opts.auth = nil
  if self.auth then
    local cred, e = self:_credentials()
    if not cred then return nil, e end
    self.conn_opts.auth = cred
  end
  self.conn_opts.auth_gate = self.auth_gate or nil
  local c, e = self.driver.open(self.conn_opts)
  self.conn_opts.auth = nil
  if not c then return nil, e end
  self.next_id = self.next_id + 1
  local rec = { c = c, id = self.next_id, state = "connecting", txs = 0, sent = 0, born = t, last_used = t,
                job = job, slot = true }
  self.conns[#self.conns + 1] = rec
  self.counters.opened = self.counters.opened + 1
  self:_emit({ type = "connect", conn = rec.id, host = self.conn_opts.host, port = self.conn_opts.port })
  return rec
end

-- ===== jobs =====

-- user code is called through events.lua's guard (one definition for the loop and its wait)
local guarded = require("smtppool.engine.events")._guarded

-- (lane: the route's share of the run, see S:run; lane.batch the run's
-- shared state)
function S:_finish(lane, job, res, err)
  local batch = lane.batch
  -- A failure of the route rather than the message (several routes): the
  -- message moves to another route, as if new there.
  if not res and not job.group and batch.router then
    local moved, ended = batch.router:reroute(lane, job, err, self.driver.now())
    -- what the route held and no other can take ends here, untried
    for _, e in ipairs(ended or {}) do self:_finish(lane, e[1], nil, e[2]) end
    if moved then return end
  end
  local group = job.group
  if group then
    -- One transaction of a split message: the message's outcome waits for all.
    group.parts[job.part] = { res = res, err = err, job = job }
    group.pending = group.pending - 1
    if group.pending > 0 then return end
    local attempts, ambiguous
    res, err, attempts, ambiguous = policy.merge_parts(group)
    job = group.job
    job.attempts, job.ambiguous = attempts, ambiguous or nil
  end
  batch.inflight = batch.inflight - 1
  batch.done = batch.done + 1
  if res then
    res.attempts = job.attempts
    if job.ambiguous then res.ambiguous = true end
    self.counters.sent = self.counters.sent + 1
  else
    err.attempts = job.attempts
    if job.ambiguous and err.kind ~= "ambiguous" then err.ambiguous = true end
    self.counters.failed = self.counters.failed + 1
  end
  guarded(batch, "on_result", batch.on_result, job.user_msg or job.msg, res, err, job)
end

-- Applies the policy's decision after a failed attempt. rec: the connection
-- that carried it, nil when it died before it could.
function S:_after_failure(lane, job, err, rec, t, sig)
  -- A stopping run neither retries nor moves: the attempt's outcome stands.
  local d = lane.batch.stopping and { action = "final", attempts = job.attempts + 1, err = err,
                               ambiguous = err.kind == "ambiguous" or nil }
    or policy.after_failure(job, err, rec and job.seq, t, self.batch_retry or self.retry,
      self:_limit_move(job, sig, t))
  if d.action == "move" then
    if d.limit then
      self.counters.limited = self.counters.limited + 1
    else
      job.free_moves = job.free_moves + 1
      self.counters.moved = self.counters.moved + 1
    end
    table.insert(lane.queue, 1, job)
    job.queued_at = t
    return
  end
  job.attempts = d.attempts
  if d.ambiguous then
    job.ambiguous = true
    self.counters.ambiguous = self.counters.ambiguous + 1
  end
  if d.action == "retry" then
    self.counters.retried = self.counters.retried + 1
    self:_emit({ type = "retry", attempt = job.attempts, delay = d.delay, err = d.err })
    job.not_before = t + d.delay
    lane.deferred[#lane.deferred + 1] = job
    return
  end
  self:_finish(lane, job, nil, d.err)
end

function S:_start(lane, rec, job, t)
  local batch = lane.batch
  -- Recipients per transaction: the least of the configured and the
  -- server's LIMITS RCPTMAX.
  local rmax = rec.caps and rec.caps.rcptmax
  local conf = self.cfg.max_recipients_per_message
  if conf and (not rmax or conf < rmax) then rmax = conf end
  if rmax and #job.to > rmax and not job.group then
    local parts = policy.split(job, rmax)
    for i = #parts, 2, -1 do table.insert(lane.queue, 1, parts[i]) end
    job = parts[1]
  end
  local journal, line
  if batch.mark then journal, line = batch.mark(job.user_msg or job.msg) end
  local cap = self:_cap(rec)
  -- The session's last transaction under the cap: the session lets QUIT
  -- leave with its final dot when it can (PIPELINING) and says so in the
  -- outcome (quit); when it cannot, the idle connection is QUIT at the cap.
  local last = cap ~= nil and rec.txs + 1 >= cap
  local gate = false
  if batch.mark_async then
    -- A mark the loop writes itself (in Redis): when the server pipelines
    -- over DATA, the session withholds the final dot behind its gate
    -- (closed when the dot is queued, in both drivers, whatever the loop
    -- waits on meanwhile) until the loop has written the mark, at its next
    -- wait after "next"; else now, before the first byte (more cautious: a
    -- cut then counts as ambiguous). With BDAT a full window withholds
    -- "next" while the last chunk leaves, so the mark goes first there too.
    if rec.caps and rec.caps.pipelining and not last and not rec.c:uses_bdat() then
      gate = true
    else
      batch.mark_async(job.user_msg or job.msg)
    end
  end
  -- The session's last transaction under the cap (last): QUIT leaves with
  -- its final dot (one round trip less per rotation).
  local ok, err = rec.c:start(job.msg.from, job.to, job.msg.data, job.msg.dsn, journal, line, last)
  if ok and gate then
    job.mark_pending = true
    rec.c:gate_dot() -- its dot cannot be queued before the server's 354
  end
  if not ok then
    if rec.state == "pipelining" then
      -- The session took back its offer of a next transaction (a BDAT
      -- transaction failed in the window after "next" came): the message
      -- waits for a ready connection, as if it had never been offered one.
      rec.state = "busy"
      table.insert(lane.queue, 1, job)
      return
    end
    local st = rec.c.state and rec.c:state()
    if st == "dead" or st == "closed" then
      -- The connection ended while this pool waited on something else (a
      -- Redis reply on the loop): its events are still to come. The
      -- message waits for another connection; this one takes no more.
      rec.state = "settling"
      table.insert(lane.queue, 1, job)
      return
    end
    -- Refused before a byte was sent (bad address, size over the server's
    -- limit...): final, and the connection stays as it was.
    self:_finish(lane, job, nil, err)
    return
  end
  if rec.state == "pipelining" then -- right behind the previous final dot
    rec.fly = rec.fly or {}
    rec.fly[#rec.fly + 1] = rec.job
  end
  rec.state = "busy"
  rec.job = job
  rec.txs = rec.txs + 1
  self.learned.rate:note(t)
  job.seq = rec.txs -- its place in the session, for the exhaustion rules
  rec.last_used = t
end

-- ===== the loop =====

-- Fails every job in the queue and the deferred list with err.
-- Ends every queued and deferred job with a copy of err; tried says whether
-- that counts as an attempt (a refused login) or not (a cancelled message).
local function end_waiting(self, lane, err, tried)
  for _, list in ipairs({ lane.queue, lane.deferred }) do
    while #list > 0 do
      local job = table.remove(list, 1)
      if tried then job.attempts = math.max(job.attempts, 1) end
      self:_finish(lane, job, nil, errors.new(err.kind, err.text, {
        phase = err.phase, code = err.code, enhanced = err.enhanced }))
    end
  end
end

-- Stopping (should_stop said so): nothing new starts; queued, deferred and
-- not yet started messages end `cancelled` (never sent, safe to send
-- later); the ones on the wire get close_timeout seconds to finish, then
-- their connections are cut (at once when should_stop says "now").
local CANCELLED = "not sent: the run was stopped before this message started"
S.CANCELLED = CANCELLED

function S:_stop(lane, level, t)
  local batch = lane.batch
  if not lane.stopping then
    lane.stopping = true
    batch.source_done = true
    self:_emit({ type = "stopping" })
  end
  end_waiting(self, lane, { kind = "cancelled", text = CANCELLED }, false)
  for _, rec in ipairs(self.conns) do
    if rec.state == "connecting" and rec.job then
      local job = rec.job
      rec.job = nil
      self:_finish(lane, job, nil, errors.new("cancelled", CANCELLED))
    end
  end
  if level == "now" or t - batch.stopping >= self.cfg.close_timeout then
    for _, rec in ipairs(self.conns) do
      if (rec.job or rec.fly) and not rec.cut then
        rec.cut = true
        rec.c:abort("the run was stopped")
      end
    end
  end
  return batch.stopping + self.cfg.close_timeout
end

-- The messages a route pulls ahead: enough to keep every connection busy,
-- and to see whether a rotating connection's replacement will have work
-- (with BDAT, once a server has offered CHUNKING, a window of transactions
-- per connection).
function S:_lookahead()
  local cfg = self.cfg
  local window = self._chunking and math.max(1, cfg.bdat_window) or 1
  return cfg.max_conns * (1 + window + cfg.rotate_ahead)
end

-- A rate window that holds work back for w seconds: counted and reported
-- once per wait, and the loop wakes when it opens.
local function held(self, lane, limit, w, t, wake_at)
  local noted = lane.waits_noted
  if w <= 0 then
    noted[limit] = nil
    return false
  end
  if not noted[limit] then
    noted[limit] = true
    self.counters.rate_waits = self.counters.rate_waits + 1
    self:_emit({ type = "rate_wait", limit = limit, seconds = w })
  end
  wake_at(t + w)
  return true
end

-- The first half of one turn of the loop for one route (lane: its share of
-- the run): retries due, deadlines, a stop, its limits; wake_at(x) asks the
-- loop to wake by time x.
function S:_turn(lane, t, wake_at)
  local cfg = self.cfg
  local batch = lane.batch
  -- Deferred messages whose time has come go back to the queue.
  for i = #lane.deferred, 1, -1 do
    local job = lane.deferred[i]
    if job.not_before <= t then
      table.remove(lane.deferred, i)
      job.queued_at = t
      lane.queue[#lane.queue + 1] = job
    else
      wake_at(job.not_before)
    end
  end

  -- After a refused login, nothing more is sent: the queue fails with it.
  -- After a TLS or configuration failure, this call's queue fails with it.
  local fatal = self.auth_failed or lane.config_failed
  if fatal then end_waiting(self, lane, fatal, true) end

  -- message_timeout: a message still waiting for a connection when its
  -- deadline comes fails; one on the wire has its connection cut (the
  -- connection's state is unknown after that, so it is never reused).
  if cfg.message_timeout then
    for i = #lane.queue, 1, -1 do
      local job = lane.queue[i]
      if job and t >= job.deadline then
        table.remove(lane.queue, i)
        job.attempts = math.max(job.attempts, 1)
        self:_finish(lane, job, nil, errors.new("connection",
          ("message_timeout (%gs) reached before a connection could take the message"):format(cfg.message_timeout),
          { phase = "connect" }))
      elseif job then
        wake_at(job.deadline)
      end
    end
    for _, rec in ipairs(self.conns) do
      local jobs = { rec.job or false }
      for _, j in ipairs(rec.fly or {}) do jobs[#jobs + 1] = j end
      for _, job in ipairs(jobs) do
        if job and job.deadline and not rec.cut then
          if t >= job.deadline then
            rec.cut = true
            rec.c:abort(("message_timeout (%gs) reached"):format(cfg.message_timeout))
          else
            wake_at(job.deadline)
          end
        end
      end
    end
  end
  if batch.stopping then wake_at(self:_stop(lane, batch.stop_now and "now" or true, t)) end

  self.limits:refresh(t)
  -- a shared backend that cannot work as configured (Redis refused the
  -- login): the queue fails with it, as after a TLS failure
  local lf = self.limits:failure()
  if lf then lane.config_failed = lane.config_failed or lf end
  local forgotten = self.learner:recover(t)
  if forgotten then self:_emit({ type = "unlearn_cap", cap = forgotten }) end
  self:_tick_limits(t)
end

-- The second half of a route's turn, once the run is known not to be over:
-- its idle connections, the connections to open, the head of its queue.
function S:_serve(lane, t, wake_at)
  local cfg = self.cfg
  local batch = lane.batch
  -- A message may start: the learned rate, then the rate windows.
  local learned_rate = self.learned.rate
  local function message_held()
    local w = learned_rate:wait(t)
    if held(self, lane, "learned_rate", w, t, wake_at) then return true end
    return held(self, lane, "messages", self.limits:take(MESSAGE, t), t, wake_at)
  end

  -- Idle connections: retire, check or load them. A fresh connection
  -- that just became ready takes the message bound to it first.
  local queue = lane.queue
  for _, rec in ipairs({ unpack(self.conns) }) do
    if rec.auth_wait then held(self, lane, "auth", self:_auth_go(rec, t), t, wake_at) end
    if rec.state == "idle" and rec.job then
      local job = rec.job
      rec.job = nil
      if message_held() then
        table.insert(queue, 1, job)
      else
        self:_start(lane, rec, job, t)
      end
    end
    if rec.state == "pipelining" and #queue > 0 and not batch.stopping then
      -- The final dot is queued and its reply not in yet: the next
      -- transaction leaves right behind it (one round trip per message),
      -- unless the session is due to rotate.
      local cap = self:_cap(rec)
      if not (cap and rec.txs >= cap) and not (cfg.max_conn_lifetime and t - rec.born >= cfg.max_conn_lifetime)
        and not message_held() then
        self:_start(lane, rec, table.remove(queue, 1), t)
      end
    end
    if rec.state == "idle" then
      local cap = self:_cap(rec)
      if cap and rec.txs >= cap then
        self:_quit(rec, "cap")
      elseif cfg.max_conn_lifetime and t - rec.born >= cfg.max_conn_lifetime then
        self:_quit(rec, "lifetime")
      elseif t - rec.last_used >= cfg.idle_timeout then
        self:_quit(rec, "idle")
      elseif #queue == 0 and self.limits:contended(t) then
        self:_quit(rec, "idle") -- another process waits for a slot this one holds idle
      elseif #queue > 0 and rec.txs > 0 and t - rec.last_used >= cfg.health_check_after then
        rec.c:noop()
        rec.state = "checking"
      elseif #queue > 0 and not (rec.spare and self:_senders() >= cfg.max_conns) then
        rec.spare = nil
        if not message_held() then
          self:_start(lane, rec, table.remove(queue, 1), t)
        end
      end
    end
  end

  -- Open connections for messages still queued, up to the ceiling on
  -- sockets (max_conns, or a lower one learned). With rotate_ahead (extra
  -- sockets, asked for by name) a connection on its way out does not
  -- count, so its replacement opens ahead, its handshakes overlapping
  -- the old one's last messages: QUIT sent, or within rotate_ahead
  -- transactions of its session cap and, once the pool has measured
  -- them, its time left no more than a handshake (_replace_at; until
  -- then, as soon as it is within the count).
  local open_conns = #self.conns
  local ceiling, learned_ceiling = self:_ceiling()
  if cfg.rotate_ahead > 0 and not learned_ceiling then
    local leaving, room = 0, 0
    for _, rec in ipairs(self.conns) do
      local cap = rec.state ~= "connecting" and self:_cap(rec)
      if rec.state == "quitting" then
        leaving = leaving + 1
      elseif cap and cap - rec.txs <= cfg.rotate_ahead then
        local due = self:_replace_at(rec, cap)
        if due and due > t then
          wake_at(due)
        else
          leaving = leaving + 1
          room = room + math.max(0, cap - rec.txs)
        end
      end
    end
    -- no replacement when what is queued fits in the leaving connections'
    -- last transactions (the look-ahead queue is deep enough to tell)
    if #queue > room then open_conns = open_conns - leaving end
  end
  local noted = lane.waits_noted
  while #queue > 0 and open_conns < ceiling do
    -- A slot among max_conns (across processes with a shared backend):
    -- when others hold them all, look again shortly.
    if not self.limits:conn_acquire(t, learned_ceiling and ceiling or nil) then
      if not noted.max_conns then
        noted.max_conns = true
        self:_emit({ type = "rate_wait", limit = "max_conns", seconds = SLOT_POLL })
      end
      wake_at(t + SLOT_POLL)
      break
    end
    noted.max_conns = nil
    -- a login rate learned from the server's refusals
    if self.auth and held(self, lane, "learned_auth", self.learned.auth:wait(t), t, wake_at) then
      self.limits:conn_release()
      break
    end
    if held(self, lane, "connections", self.limits:take(self:_connect_windows(), t), t, wake_at) then
      self.limits:conn_release()
      break
    end
    -- Past max_conns sockets, the replacement of a connection rotating
    -- out is a spare: it takes no message until a sender has left, so at
    -- most max_conns connections carry messages at once.
    local spare = #self.conns >= ceiling
    local job = not spare and table.remove(queue, 1) or nil
    local rec, err = self:_open(t, job)
    if not rec then
      self.limits:conn_release()
      if err.kind == "config" or err.kind == "tls" then lane.config_failed = err end
      if job then self:_after_failure(lane, job, err, nil, t) end
      break -- resolution failed: let the retry policy pace the next try
    end
    rec.spare = spare or nil
    open_conns = open_conns + 1
    if self.auth then self.learned.auth:note(t) end
  end

  -- Nothing could start a connection for the head of the queue in time.
  -- Time spent waiting on a rate limit does not count: that wait is chosen.
  local head = queue[1]
  if head and (noted.connections or noted.messages or noted.learned_rate or noted.learned_auth) then
    head.queued_at = t
  end
  if head then
    if t - head.queued_at >= cfg.wait_timeout then
      table.remove(queue, 1)
      head.attempts = math.max(head.attempts, 1)
      self:_finish(lane, head, nil, errors.new("connection",
        ("no connection became free within wait_timeout (%gs)"):format(cfg.wait_timeout),
        { phase = "connect" }))
    else
      wake_at(head.queued_at + cfg.wait_timeout)
    end
  end
end

-- Whether the run should take another message from its source: its one
-- route wants more (or, with several, the router says so).
local function wants_more(batch, lanes)
  if batch.source_done then return false end
  local router = batch.router
  if router then
    for _, lane in ipairs(lanes) do lane.ahead = lane.route:_lookahead() end
    return router:wants()
  end
  return #lanes[1].queue < lanes[1].route:_lookahead()
end

--- The loop: runs messages pulled from `next_msg()` through the pool until
-- all have an outcome (what `send`, `send_batch` and `smtppool.ngx`'s agent
-- run on). `on_result(item, res, err)` is called once per message. A
-- source may answer `false`: nothing now, more later.
-- @tparam function next_msg the source of prepared items
-- @tparam function on_result the outcome of each
-- @tparam[opt] table opts `mark(item) -> journal, key` (L just before each
--   attempt's final dot), `mark_async`, `should_stop() -> false | true | "now"`,
--   `poll` (seconds between asking a source that said `false`), `before_wait`
function S:run(next_msg, on_result, opts)
  return S.run_routes(self, { self }, next_msg, on_result, opts)
end

--- The loop over several routes (`smtppool.engine.relays`): one queue per
-- route in this run (its lane), one wait on the network for every route's
-- connections. Each route is a pool (its connections, limits, learned caps,
-- TLS sessions, credentials); `router` (opts.router) places each message
-- on a route (`take(item) -> lane, item`), says whether to take another
-- (`wants()`, each lane's `ahead` set) and moves one whose route failed
-- (`reroute(lane, job, err, t) -> moved, ended`: ended, the jobs to end
-- untried, each `{job, err}`). Without a router, the one route takes
-- everything.
-- @tparam table owner what runs (a pool, or a group of routes): its
--   `driver`, and `_wait_fds` (a signing queue's fd)
-- @tparam table routes the pools
-- @tparam function next_msg the source of prepared items, as for `run`
-- @tparam function on_result the outcome of each, as for `run`
-- @tparam[opt] table opts as for `run`, plus `router`
function S.run_routes(owner, routes, next_msg, on_result, opts)
  -- A source may answer false: nothing now, more later (the OpenResty
  -- agent's queue). The loop then wakes at least every `poll` seconds
  -- (opts.poll) to ask again, and the driver's wait returns early when the
  -- source is fed (driver.wake).
  local batch = {
    inflight = 0, done = 0, on_result = on_result, source_done = false,
    mark = opts and opts.mark, should_stop = opts and opts.should_stop,
    mark_async = opts and opts.mark_async, mark_many = opts and opts.mark_many,
    before_wait = opts and opts.before_wait, poll = opts and opts.poll, router = opts and opts.router,
  }
  local lanes = {}
  for i, r in ipairs(routes) do
    lanes[i] = { route = r, batch = batch, queue = {}, deferred = {}, waits_noted = {} }
  end
  batch.lanes = lanes
  local router = batch.router
  if router and router.start then router:start(lanes) end
  local now = owner.driver.now
  local t = now()

  while true do
    -- Pull messages lazily: enough to keep every connection busy.
    while wants_more(batch, lanes) do
      local ok, msg = guarded(batch, "the message source", next_msg)
      if not ok then break end
      if msg == nil then batch.source_done = true break end
      if msg == false then break end -- nothing now; ask again next turn (a long-running agent's queue)
      local lane = lanes[1]
      if router then lane, msg = router:take(msg) end
      local cfg = lane.route.cfg
      local job = { msg = msg.msg, to = msg.to, attempts = 0, free_moves = 0, queued_at = t,
                    user_msg = msg.user_msg or msg.msg, timeout = cfg.message_timeout,
                    deadline = cfg.message_timeout and t + cfg.message_timeout, lane = lane }
      batch.inflight = batch.inflight + 1
      if msg.err then
        lane.route:_finish(lane, job, nil, msg.err)
      else
        lane.queue[#lane.queue + 1] = job
      end
    end

    local next_wake
    local function wake_at(x)
      if x and (not next_wake or x < next_wake) then next_wake = x end
    end
    if batch.should_stop then
      local ok, level = guarded(batch, "should_stop", batch.should_stop)
      if ok and level or batch.stopping then
        if ok and level == "now" then batch.stop_now = true end
        batch.stopping = batch.stopping or t
        batch.source_done = true
      end
    end
    for _, lane in ipairs(lanes) do lane.route:_turn(lane, t, wake_at) end
    if batch.inflight == 0 and batch.source_done then break end
    for _, lane in ipairs(lanes) do lane.route:_serve(lane, t, wake_at) end

    -- Everything may have ended here (a message refused before sending).
    if batch.inflight == 0 and batch.source_done then break end
    if batch.poll and not batch.source_done then wake_at(t + batch.poll) end

    local timeout = next_wake and math.max(0, next_wake - t) or -1
    local list, recs, of = {}, {}, {}
    for _, lane in ipairs(lanes) do
      for _, rec in ipairs(lane.route.conns) do
        local n = #list + 1
        list[n], recs[n], of[n] = rec.c, rec, lane
      end
    end
    if #list == 0 and timeout < 0 and not owner._wait_fds then
      local waiting = false
      for _, lane in ipairs(lanes) do
        if #lane.queue > 0 or #lane.deferred > 0 then waiting = true end
      end
      if batch.inflight > 0 and not waiting then
        error("smtppool: internal error: messages in flight with no connection")
      end
      t = now()
    else
      t = S._wait_on(owner, batch, list, recs, of, timeout)
    end
  end
  local ue = batch.user_error
  if ue then
    -- Every message taken has its outcome by now; the caller's code failed.
    -- An error value (a table) goes up as it is, for callers that catch it.
    if type(ue.value) == "table" then error(ue.value, 0) end
    error(("smtppool: %s raised: %s (every message taken before it has been reported)"):format(ue.what,
      tostring(ue.value)), 0)
  end
end

--- A run with no messages, for waiting on connections outside `run`
-- (`close_connections`, `verify`).
function S:_quiet_lane()
  local batch = { inflight = 0, done = 0, on_result = function() end }
  return { route = self, batch = batch, queue = {}, deferred = {}, waits_noted = {} }
end

--- QUITs the idle connections, waits up to `close_timeout` for the
-- replies, then closes every socket; the pool stays usable (`close` also
-- refuses new messages).
function S:close_connections()
  for _, rec in ipairs(self.conns) do
    if rec.state == "idle" then self:_quit(rec) end
  end
  local now = self.driver.now
  local deadline = now() + self.cfg.close_timeout
  local lane = self:_quiet_lane()
  while true do
    local waiting = {}
    for _, rec in ipairs(self.conns) do
      if rec.state == "quitting" then waiting[#waiting + 1] = rec end
    end
    local left = deadline - now()
    if #waiting == 0 or left <= 0 then break end
    self:_wait(lane, waiting, left)
  end
  for _, rec in ipairs({ unpack(self.conns) }) do self:_remove(rec) end
end

for _, part in ipairs({ "smtppool.engine.learning", "smtppool.engine.events" }) do
  for k, v in pairs(require(part)) do S[k] = v end
end

return S
