--- The scheduler's events: one wait on the loop, then each connection's
-- events (ready, auth, next, tx, error, closed) applied to its record.
-- Methods mixed into the pool with the scheduler's
-- (`smtppool.engine.scheduler`).
-- @module smtppool.engine.events

local errors = require("smtppool.errors")
local policy = require("smtppool.engine.policy")
local loop = require("smtppool.engine.loop")

local S = {}

-- Calls user code (on_result, the source iterator, before_wait) so that an
-- error it raises cannot leave the loop with messages unreported: the
-- first such error is kept in the run's batch, no new message is taken,
-- the ones already on the wire run to their outcome, and the error is
-- raised once the loop is done.
local function guarded(batch, what, fn, ...)
  local ok, a, b = pcall(fn, ...)
  if ok then return true, a, b end
  if not batch.user_error then
    batch.user_error = { what = what, value = a }
    batch.source_done = true
  end
  return false
end
S._guarded = guarded

-- ===== events =====

-- Acts on one connection's events, as the driver's wait returned them
-- (lane: this route's share of the run, see `smtppool.engine.scheduler`).
function S:_dispatch(lane, rec, entry, t)
  for i = 1, #entry, 2 do
    local ev, payload = entry[i], entry[i + 1]
    if ev == "trace" then
      for _, tr in ipairs(payload) do
        self:_emit({ type = "trace", conn = rec.id, from = tr.from, to = tr.to, code = tr.code })
      end
    elseif ev == "ready" then
      if rec.state == "connecting" then
        self.greeted = true
        self:_note_ready(rec, t)
        rec.caps = rec.c:caps()
        if rec.c:uses_bdat() then self._chunking = true end
        self:_emit({ type = "ready", conn = rec.id, caps = rec.caps })
      end
      if rec.state == "busy" and rec.job then
        -- Stale: the session was ready before the transaction now on it
        -- started (events kept while the pool waited on a Redis reply on
        -- the loop arrive after what it did meanwhile).
      else
        if rec.state ~= "quitting" then
          rec.state = "idle"
          rec.last_used = t
        end
        if rec.retire then self:_quit(rec, "exhausted") end
      end
    elseif ev == "auth" then
      rec.auth_wait = true
      self:_auth_go(rec, t)
    elseif ev == "next" then
      if rec.state == "busy" then rec.state = "pipelining" end
      local j = rec.job
      if j and j.mark_pending then
        -- its final dot waits behind the session's gate (closed when the
        -- dot was queued) until its mark is written, at the loop's next
        -- wait: whatever waits on the way (a Redis reply, a claim) leaves
        -- it where it is
        j.mark_pending = nil
        local batch = lane.batch
        batch.marks_due = batch.marks_due or {}
        batch.marks_due[#batch.marks_due + 1] = j.user_msg or j.msg
        batch.gated = batch.gated or {}
        batch.gated[#batch.gated + 1] = rec.c
      end
    elseif ev == "tx" then
      -- Outcomes come in order: the oldest transaction first.
      local job = rec.fly and table.remove(rec.fly, 1)
      if job then
        if #rec.fly == 0 then rec.fly = nil end -- the connection carries on with rec.job
      else
        job = rec.job
        rec.job = nil
        rec.state = "settling"
      end
      if job and payload.quit then
        -- QUIT left with the dot: the session ends after this reply.
        rec.state = "quitting"
        self.counters.rotated = self.counters.rotated + 1
        self:_emit({ type = "rotate", conn = rec.id, messages = rec.sent + (payload.ok and 1 or 0), reason = "cap" })
      end
      if job then
        self:_note_answer(rec, t)
        local res, err = policy.outcome(payload)
        if res then
          job.attempts = job.attempts + 1
          rec.sent = rec.sent + 1
          self:_tx_sent(rec, t)
          self:_finish(lane, job, res)
        else
          local sig = self:_tx_failed(rec, job, err, t)
          if sig == "session" then
            rec.retire = true -- 4xx to MAIL leaves the session open: QUIT it once RSET is done
          end
          self:_after_failure(lane, job, err, rec, t, sig)
        end
      end
    elseif ev == "error" then
      local e = payload
      if e.silent and not self.greeted then
        -- Not one byte before the greeting timeout, and this pool has never
        -- been greeted by the server: the TLS mode, not a slow server (the
        -- error says which mode): the configuration's, failed once.
        e = errors.new("config", e.text, e)
      end
      local job = rec.job
      rec.job = nil
      self.counters.closed_by_server = self.counters.closed_by_server + 1
      rec.err = e
      self:_emit({ type = "discard", conn = rec.id, err = e, messages = rec.sent })
      self:_remove(rec)
      if e.kind == "auth" and e.code then
        -- The server refused the credentials: every further try would be
        -- refused too, and servers lock accounts that keep trying.
        self.auth_failed = e
      elseif e.kind == "tls" or e.kind == "config" then
        -- A certificate that fails verification (or a server without the
        -- STARTTLS we require), a TLS mode the server does not speak, a host
        -- name that does not exist fail every connection alike: the queue of
        -- this call fails once with it rather than one connection per message.
        lane.config_failed = e
      end
      local sig = self:_conn_failed(e, t)
      if job then
        -- Died before it could carry the message bound to it (connect,
        -- greeting, EHLO): that is the message's attempt, unless a limit
        -- of the server's refused it.
        self:_after_failure(lane, job, e, nil, t, sig)
      end
      return
    elseif ev == "closed" then
      self.counters.closed_by_us = self.counters.closed_by_us + 1
      self:_emit({ type = "close", conn = rec.id, messages = rec.sent })
      self:_remove(rec)
      return
    end
  end
end

-- One wait on the driver, then each connection's events. recs: the
-- connection records waited on.
function S:_wait(lane, recs, timeout)
  local list, lanes = {}, {}
  for i, rec in ipairs(recs) do list[i], lanes[i] = rec.c, lane end
  return S._wait_on(self, lane.batch, list, recs, lanes, timeout)
end

-- One wait on the driver for several routes' connections (list: their
-- handles; recs and lanes: each one's record and lane, at the same index),
-- then each connection's events, applied by its route. owner: what runs
-- (a pool, or a group of routes: `routes`).
function S._wait_on(owner, batch, list, recs, lanes, timeout)
  if not owner._live then
    -- the connections open now, for a loop serving them while this pool
    -- waits on something else (a Redis reply)
    owner._live = function()
      local l = {}
      for _, route in ipairs(owner.routes or { owner }) do
        for _, rec in ipairs(route.conns) do l[#l + 1] = rec.c end
      end
      return l
    end
  end
  -- The marks of the final dots held until this wait, written first (all
  -- in one round trip when the batch can: mark_many)
  local due = batch.marks_due
  if due then
    batch.marks_due = nil
    local gated = batch.gated
    batch.gated = nil
    if batch.mark_many then
      batch.mark_many(due)
    else
      for _, m in ipairs(due) do batch.mark_async(m) end
    end
    for _, c in ipairs(gated) do c:gate_open() end
  end
  local fds = owner._wait_fds
  if batch.before_wait then
    -- it may ask to run again within some seconds (outcomes waiting to be
    -- written): the wait is no longer than that; or when one of its file
    -- descriptors is readable (a Redis reply it waits for)
    local _, again, wake_fds = guarded(batch, "before_wait", batch.before_wait)
    if type(again) == "number" and again >= 0 and (timeout < 0 or again < timeout) then timeout = again end
    if type(wake_fds) == "table" and #wake_fds > 0 then
      local all = {}
      for _, fd in ipairs(fds or {}) do all[#all + 1] = fd end
      for _, fd in ipairs(wake_fds) do all[#all + 1] = fd end
      fds = all
    end
  end
  local ready = loop.wait(owner.driver, list, timeout, fds, owner._live)
  local t = owner.driver.now()
  for _, entry in ipairs(ready) do
    local i = entry.conn
    local lane = lanes[i]
    lane.route:_dispatch(lane, recs[i], entry, t)
  end
  return t
end

return S
