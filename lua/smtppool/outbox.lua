--- A durable outbox in Redis: a message handed over is stored before
-- `enqueue` returns its id, and is delivered once by whichever worker
-- claims it (any nginx worker, any machine, `smtppool worker --outbox`).
--
-- A pool made with `outbox = "redis://..."` uses one itself
-- (`pool:enqueue`, `pool:outcome`, `pool:deliver`); this module is the
-- outbox on its own, for tools and tests.
--
-- * **Stored before acknowledged.** `put` composes nothing: it takes a
--   prepared message (from, recipients, the finished text, DSN options) and
--   stores it in one script with its id, refusing past `max` queued
--   (`busy`).
-- * **Claims with leases**, the queue Redis campaigns use
--   (`smtppool.redis.queue`): a worker claims a few messages at a time and
--   renews its leases while it lives; a lease that runs out puts the
--   message back, unless its final dot may have left (`L` is written to
--   Redis's connection before it leaves, the dot waiting behind the
--   session's gate; Redis's replies are read later): then it ends
--   `ambiguous`, never sent twice by default (`resend_in_flight`).
-- * **Retries** that wait longer than a few seconds wait in Redis
--   (`delayed`, scored by Redis's clock), so a message waiting ten minutes
--   survives a restart of every worker; attempts are counted across claims.
-- * **Outcomes**: `status` (`sent`, `failed`, `ambiguous`), `code`,
--   `enhanced`, `text`, `kind`, `attempts`, `at`, kept `keep` seconds
--   (default a week) and read by id from anywhere.
-- * A Redis that keeps nothing on disk is refused (the outbox would vanish
--   with a restart) unless `allow_volatile` is said by name.
--
-- Keys live under `smtppool:outbox:<name>:`: `q`, `delayed`, `claims`,
-- `owner`, `state`, `seen` (the queue's), `m:<id>` (a message), `o:<id>`
-- (an outcome), `age` (ids by the time they were handed over), `stats`,
-- `meta`.
-- @api smtppool.outbox

local core = require("smtppool.core")
local errors = require("smtppool.errors")
local client = require("smtppool.redis.client")
local queue = require("smtppool.redis.queue")
local message = require("smtppool.compose.message")

local M = {}

-- What the queue needs to know of an outbox: a key is a message id whose
-- message is `m:<id>`; an outcome deletes it and writes `o:<id>`.
local HOOKS = [[
local function keep_of(p) return tonumber(redis.call('HGET', p .. 'meta', 'keep') or '604800') end
local function finish(p, key, worker, status, code, enhanced, text, kind, attempts, dup, keep, at)
  -- the message gone already: a repeat, counted once; a mark sent again
  -- after it (a batch whose replies a cut connection lost, redone) is
  -- cleared
  if redis.call('DEL', p .. 'm:' .. key) == 0 then
    redis.call('HDEL', p .. 'state', key)
    return 0
  end
  redis.call('ZREM', p .. 'claims', key)
  redis.call('ZREM', p .. 'delayed', key)
  redis.call('ZREM', p .. 'age', key)
  redis.call('HDEL', p .. 'owner', key)
  redis.call('HDEL', p .. 'state', key)
  local o = p .. 'o:' .. key
  redis.call('HSET', o, 'status', status, 'code', code, 'enhanced', enhanced, 'text', text, 'kind', kind,
    'attempts', attempts, 'at', at or redis.call('TIME')[1], 'worker', worker, 'possible_duplicate', dup)
  redis.call('EXPIRE', o, keep)
  redis.call('HINCRBY', p .. 'stats', status, 1)
  return 1
end
local function gone(p, key) return redis.call('EXISTS', p .. 'm:' .. key) == 0 end
local function lost(p, key)
  local a = redis.call('HGET', p .. 'm:' .. key, 'attempts') or '0'
  finish(p, key, '', 'ambiguous', '', '', 'the final dot was on its way when its worker stopped: it may have '
    .. 'been delivered', 'ambiguous', tostring(tonumber(a) + 1), '1', keep_of(p))
end
local function payload(p, key) return redis.call('HGETALL', p .. 'm:' .. key) end
]]

-- KEYS[1]: the prefix; ARGV: max, id, from, to, data, dsn -> {1, depth} or {0, depth} (full)
local PUT = [[
local p = KEYS[1]
local max = tonumber(ARGV[1])
local depth = redis.call('LLEN', p .. 'q') + redis.call('ZCARD', p .. 'delayed') + redis.call('ZCARD', p .. 'claims')
if max > 0 and depth >= max then return {0, depth} end
local t = redis.call('TIME')
local id = ARGV[2]
redis.call('HSET', p .. 'm:' .. id, 'from', ARGV[3], 'to', ARGV[4], 'data', ARGV[5], 'dsn', ARGV[6],
  'at', t[1], 'attempts', '0')
redis.call('ZADD', p .. 'age', tonumber(t[1]) + tonumber(t[2]) / 1000000, id)
redis.call('RPUSH', p .. 'q', id)
redis.call('HINCRBY', p .. 'stats', 'enqueued', 1)
return {1, depth + 1}
]]

-- KEYS[1]: the prefix; ARGV: (worker, id, status, code, enhanced, text,
-- kind, attempts, dup) for each outcome: a batch costs one script call
local DONE = HOOKS .. [[
local p, keep, n = KEYS[1], keep_of(KEYS[1]), 0
local at = redis.call('TIME')[1]
for i = 1, #ARGV, 9 do
  n = n + finish(p, ARGV[i + 1], ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6],
    ARGV[i + 7], ARGV[i + 8], keep, at)
end
return n
]]

-- KEYS[1]: the prefix -> {depth, queued, delayed, claimed, oldest (seconds, -1: none), stats...}
local STATS = [[
local p = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local q, d, c = redis.call('LLEN', p .. 'q'), redis.call('ZCARD', p .. 'delayed'), redis.call('ZCARD', p .. 'claims')
local first = redis.call('ZRANGE', p .. 'age', 0, 0, 'WITHSCORES')
local oldest = -1
if first[2] then oldest = now - tonumber(first[2]) end
return {q + d + c, q, d, c, tostring(oldest), redis.call('HGETALL', p .. 'stats')}
]]

-- DSN parameters (smtppool.compose.prepare's tx_params) as one line each.
local function encode_dsn(d)
  if not d then return "" end
  local out = {}
  for _, k in ipairs({ "ret", "envid", "orcpt", "requiretls" }) do
    if d[k] ~= nil then out[#out + 1] = k .. "=" .. tostring(d[k]) end
  end
  if d.notify then out[#out + 1] = "notify=" .. table.concat(d.notify, ",") end
  return table.concat(out, "\n")
end

local function decode_dsn(s)
  if not s or s == "" then return nil end
  local d = {}
  for line in s:gmatch("[^\n]+") do
    local k, v = line:match("^(%w+)=(.*)$")
    if k == "notify" then
      d.notify = {}
      for w in v:gmatch("[^,]+") do d.notify[#d.notify + 1] = w end
    elseif k == "orcpt" or k == "requiretls" then
      d[k] = v == "true"
    elseif k then
      d[k] = v
    end
  end
  return d
end

local B = {}
B.__index = B

--- Opens an outbox (nothing is connected until it is used: nginx's
-- `init_worker` cannot open sockets).
-- @tparam string url `redis[s]://...` (as `smtppool.redis.client`)
-- @tparam[opt] table o `name` (default `"default"`), `max` (messages
--   queued, delayed or claimed past which `put` answers `busy`; default
--   100000, 0 for none), `keep` (seconds an outcome is kept, default
--   604800), `lease` (seconds, default 30), `resend_in_flight`,
--   `allow_volatile` (accept a Redis that keeps nothing on disk), `timeout`
--   (seconds for each Redis reply, default 2), `driver` (whose Redis
--   transport to use; default the native one), `dns_servers` (for the
--   Redis host's name, as the pool's option)
-- @treturn[1] table the outbox
-- @return[2] nil
-- @treturn[2] table error value (kind `config`)
function M.open(url, o)
  o = o or {}
  local u, uerr = client.parse_url(url)
  if not u then return nil, errors.new("config", "outbox: " .. uerr) end
  local name = o.name or "default"
  if type(name) ~= "string" or not name:match("^[%w._:-]+$") then
    return nil, errors.new("config", "outbox_name takes letters, digits, '.', '_', ':' or '-'")
  end
  -- two connections: the delivering side's (claims, marks, outcomes; in
  -- nginx the agent's own cosocket) and the handing-over side's (enqueue,
  -- outcome, stats: request handlers)
  local c = client.new(u, { timeout = o.timeout or 2, driver = o.driver, dns_servers = o.dns_servers })
  local rc = client.new(u, { timeout = o.timeout or 2, driver = o.driver, dns_servers = o.dns_servers,
    keep = not (o.driver and o.driver.redis_per_thread) })
  local p = "smtppool:outbox:" .. name .. ":"
  local drv = o.driver
  local q = queue.new(c, p, { name = "outbox", hooks = HOOKS, lease = o.lease,
    resend_in_flight = o.resend_in_flight,
    sleep = drv and drv.sleep or nil })
  -- mine: the messages this outbox handed out (weak: forgotten once done)
  return setmetatable({ c = c, rc = rc, p = p, q = q, pending = {}, redo = {}, mine = setmetatable({}, { __mode = "k" }),
    url = client.redact(url), name = name, max = o.max or 100000,
    keep = o.keep or 604800, allow_volatile = o.allow_volatile, checked = false }, B)
end

-- The first use checks the server once: reachable, the login, persistence;
-- and records how long outcomes are kept.
function B:_ready()
  if self.checked then return true end
  local ok, e, why = self.rc:connect()
  if not ok then
    return nil, errors.new(client.misconfigured(why) and "config" or "connection", ("outbox at %s: %s"):format(self.url, e))
  end
  if not self.allow_volatile then
    -- on the handing-over side's client: the delivering side's connection
    -- belongs to the agent (in nginx, a request must not become its owner)
    local vol = queue.volatile(self.rc, "outbox")
    if vol then return nil, errors.new("config", vol) end
  end
  local v, se = self.rc:call("HSET", self.p .. "meta", "keep", tostring(math.floor(self.keep)))
  if not v then return nil, errors.new("connection", ("outbox at %s: %s"):format(self.url, se)) end
  self.checked = true
  return true
end

-- A Redis failure as an error value (a refused login is configuration).
local function redis_error(self, e, why)
  return errors.new(client.misconfigured(why) and "config" or "connection", ("outbox at %s: %s"):format(self.url, tostring(e)),
    { attempts = 0 })
end

--- Stores a prepared message (`smtppool.compose.prepare`'s item: `msg`
-- with `from`, `data`, `dsn`, and `to`) and returns its id.
-- @treturn[1] string the id
-- @return[2] nil
-- @treturn[2] table error value: the item's own (`invalid`), `busy` (past
--   `max`), `config` (a refused login, a volatile Redis), `connection`
function B:put(item)
  if item.err then return nil, item.err end
  local ok, e = self:_ready()
  if not ok then return nil, e end
  local fok, data = pcall(message.flatten, item.msg.data)
  if not fok then return nil, errors.new("invalid", "cannot read the message: " .. tostring(data), { attempts = 0 }) end
  local id = core.random_hex(12)
  local v, re, why = self.rc:script("outbox:put", PUT, { self.p }, { tostring(math.floor(self.max)), id,
    item.msg.from, table.concat(item.to, "\n"), data, encode_dsn(item.msg.dsn) })
  if not v then return nil, redis_error(self, re, why) end
  if v[1] == 0 then
    return nil, errors.new("busy", ("the outbox '%s' is full (%d messages, outbox_max %d): nothing was queued")
      :format(self.name, v[2], self.max), { attempts = 0 })
  end
  return id
end

--- A message's outcome.
-- @tparam string id
-- @treturn[1] table `status` (`sent`, `failed`, `ambiguous`), `code`,
--   `enhanced`, `text`, `kind` (an error's), `attempts`, `at` (Unix time),
--   `possible_duplicate` (sent, but an earlier try may have arrived too)
-- @treturn[2] nil while the message is pending
-- @return[3] nil
-- @treturn[3] table error value: kind `invalid` for an id the outbox does
--   not know (never handed over, or its outcome expired), `connection`
function B:outcome(id)
  if type(id) ~= "string" then error("outcome: id must be a string", 2) end
  local ok, e = self:_ready()
  if not ok then return nil, e end
  local cmds = { { "HGETALL", self.p .. "o:" .. id }, { "EXISTS", self.p .. "m:" .. id } }
  local r, re, why = self.rc:pipeline(cmds)
  -- a read is safe to repeat: once more on a fresh connection (the kept
  -- one may be stale: Redis restarted since)
  if not r and not why then r, re, why = self.rc:pipeline(cmds) end
  if not r then return nil, redis_error(self, re, why) end
  local flat = r[1]
  if type(flat) == "table" and #flat > 0 then
    local o = {}
    for i = 1, #flat, 2 do o[flat[i]] = flat[i + 1] end
    o.code, o.attempts, o.at = tonumber(o.code), tonumber(o.attempts), tonumber(o.at)
    for _, k in ipairs({ "enhanced", "text", "kind", "worker" }) do
      if o[k] == "" then o[k] = nil end
    end
    o.possible_duplicate = o.possible_duplicate == "1"
    return o
  end
  if r[2] == 1 then return nil end
  return nil, errors.new("invalid", ("the outbox '%s' knows no message %s (never handed over, or its outcome "
    .. "expired)"):format(self.name, id))
end

--- The outbox's state: `depth` (queued, waiting for a retry or claimed),
-- `queued`, `delayed`, `claimed`, `oldest` (seconds since the oldest
-- pending message was handed over; nil when none), and the counts
-- `enqueued`, `sent`, `failed`, `ambiguous`.
-- @return[1] table
-- @return[2] nil
-- @treturn[2] table error value
function B:stats()
  local ok, e = self:_ready()
  if not ok then return nil, e end
  local v, re, why = self.rc:script("outbox:stats", STATS, { self.p }, {})
  if not v and not why then v, re, why = self.rc:script("outbox:stats", STATS, { self.p }, {}) end
  if not v then return nil, redis_error(self, re, why) end
  local s = { depth = v[1], queued = v[2], delayed = v[3], claimed = v[4], oldest = tonumber(v[5]),
              enqueued = 0, sent = 0, failed = 0, ambiguous = 0 }
  if s.oldest < 0 then s.oldest = nil end
  for i = 1, #v[6], 2 do s[v[6][i]] = tonumber(v[6][i + 1]) end
  return s
end

--- The messages for a pool: an iterator of prepared items (each
-- `user_msg` is `{id, from, to, attempts}`, attempts made before this
-- claim), claimed `n` at a time; `false` while nothing can be claimed now
-- (or Redis cannot be reached: the sockets go on being served); nil once
-- `o.stop()` says so (the claims not handed out go back at once), or, with
-- `o.until_empty`, when nothing is queued, delayed or claimed anywhere.
-- @tparam number n
-- @tparam[opt] table o `stop` (function), `until_empty`, `idle` (seconds
--   between claims while the outbox is empty, default 0.25)
function B:source(n, o)
  o = o or {}
  local buf, bi, quiet_until = {}, 0, 0
  local idle = o.idle or 0.25
  -- The next claim is posted while half of this one is still to hand out
  -- (when it was full: more is likely queued), so its reply is there when
  -- it is needed: `ahead` is true while it is on its way, then its result.
  local ahead
  local function post_ahead()
    ahead = true -- (before: a reply handed at once, a pipeline, lands in it)
    if not self.q:post_claim(n, function(got, pending, claimed)
      self.claim_due = nil
      if ahead == true then ahead = { got = got, pending = pending, claimed = claimed } end
    end) and ahead == true then
      ahead = nil
    end
  end
  -- The claim posted ahead, once its reply is read (waiting for it unless
  -- `ready`: then only what has arrived is read, and while it is on its
  -- way this says so, `"later"`: the loop serves the sockets meanwhile and
  -- looks again when woken by its arrival).
  local function take_ahead(ready)
    if ahead == true then
      if ready and self.c:reads_ready() then
        self.c:take_ready()
        if ahead == true then
          self.claim_due = true
          return nil, "later"
        end
      else
        self.c:settle()
      end
    end
    self.claim_due = nil
    local a = ahead
    ahead = nil
    if type(a) == "table" and a.got then return a.got, a.pending, a.claimed end
  end
  local function give_back()
    local keys = {}
    for i = bi + 1, #buf do keys[#keys + 1] = buf[i].key end
    buf, bi = {}, 0
    local got = take_ahead()
    for _, c in ipairs(got or {}) do keys[#keys + 1] = c.key end
    if #keys > 0 then self.q:unclaim(keys) end
  end
  self.give_back = give_back
  return function()
    if o.stop and o.stop() then
      give_back()
      self:flush()
      return nil
    end
    if bi >= #buf then
      local got, pending, claimed
      if ahead then
        local later
        got, later, claimed = take_ahead(true)
        if later == "later" then return false end
        pending = later
      end
      if not got and core.now() < quiet_until then return false end
      local ok = got or self:_ready()
      if ok and not got then got, pending, claimed = self.q:claim(n, nil, 0) end
      if not got then
        quiet_until = core.now() + 1 -- Redis is away: ask again in a second
        return false
      end
      buf, bi = got, 0
      if #got == 0 then
        if o.until_empty and pending == 0 and claimed == 0 then return nil end
        quiet_until = core.now() + idle
        return false
      end
    end
    bi = bi + 1
    if not ahead and #buf == n and bi == math.floor((n + 1) / 2) then post_ahead() end
    local c = buf[bi]
    local f = {}
    for i = 1, #c.payload, 2 do f[c.payload[i]] = c.payload[i + 1] end
    local to = {}
    for a in (f.to or ""):gmatch("[^\n]+") do to[#to + 1] = a end
    local um = { id = c.key, from = f.from, to = to, attempts = tonumber(f.attempts) or 0 }
    self.mine[um] = true
    return { msg = { from = f.from or "", data = f.data or "", dsn = decode_dsn(f.dsn), outbox = um }, to = to,
             user_msg = um }, c.key
  end
end

--- Writes a message's `L`: its final dot is about to leave. The outcomes
-- waiting to be written go in the same round trip.
function B:mark(id) return self:flush({ { "HSET", self.p .. "state", id, core.letters.leaving } }) end

--- Writes several messages' `L` in one round trip (their dots are held
-- until it is written), with the outcomes waiting.
function B:mark_many(ids)
  local cmd = { "HSET", self.p .. "state" }
  for _, id in ipairs(ids) do
    cmd[#cmd + 1] = id
    cmd[#cmd + 1] = core.letters.leaving
  end
  return self:flush({ cmd })
end

--- Renews this worker's leases (call it often; it acts every lease/3 s)
-- and writes the outcomes waiting.
-- @treturn number|nil seconds until it should run again (outcomes wait)
-- @treturn table|nil file descriptors whose readability should wake the
--   loop (a claim on its way, natively)
function B:renew()
  self.q:renew()
  -- a claim on its way: the loop wakes when its reply comes (natively on
  -- the Redis socket; in nginx its reading thread wakes it), or looks again
  -- within a millisecond when it cannot know
  local cap, fds
  if self.claim_due and not self.c.wake then
    -- what has come is read first (a socket left readable would end
    -- every wait at once)
    self.c:take_ready()
    local fd = self.claim_due and self.c:ready_fd()
    if fd then fds = { fd } elseif self.claim_due then cap = 0.001 end
  end
  -- outcomes ride on the next L; alone they go when 64 wait, or the oldest
  -- has waited 50 ms (what `outcome` readers wait at most)
  if #self.pending > 0 then
    local left = self.pending_since + 0.05 - core.now()
    if left <= 0 then
      self:flush()
    elseif not cap or left < cap then
      cap = left
    end
  end
  return cap, fds
end

--- Records a message's outcome (idempotent: a repeat counts once).
--
-- Outcomes are written in batches: each waits for the next round trip
-- this worker makes to Redis anyway (the next message's `L`, the end of
-- the loop's turn) and goes in the same pipeline, so a message costs one
-- round trip, not two. A worker killed in between leaves such a message
-- `L`, hence ambiguous; no connection of its started another since, so the
-- bound (its connections times the window) holds.
-- @tparam string id
-- @tparam string status `sent`, `failed` or `ambiguous`
-- @tparam table r the result or error value (`code`, `enhanced`, `text`
--   or its message, `kind`)
-- @tparam number attempts in all
-- @tparam[opt] boolean dup sent, but an earlier try may have arrived too
function B:finish(id, status, r, attempts, dup)
  self.q:release(id)
  local text = r and (r.text or r.message) or ""
  if #self.pending == 0 then self.pending_since = core.now() end
  self.pending[#self.pending + 1] = { self.q.worker, id, status, tostring(r and r.code or ""),
    tostring(r and r.enhanced or ""), tostring(text), tostring(r and r.kind or ""), tostring(attempts),
    dup and "1" or "0" }
  if #self.pending >= 64 then return self:flush() end
  return true
end

-- A batch's commands: its outcomes in one script call, then its extra
-- commands (the marks): a message's outcome is never written after the
-- next message's mark. Loads the script first when this client has not.
function B:_cmds(batch)
  local cmds = {}
  if #batch.pending > 0 then
    local sha = self.c.shas["outbox:done_many"]
    if not sha then
      local v, le = self.c:call("SCRIPT", "LOAD", DONE)
      if not v then return nil, le end
      self.c.shas["outbox:done_many"], sha = v, v
    end
    local done = { "EVALSHA", sha, "1", self.p }
    for _, a in ipairs(batch.pending) do
      for k = 1, 9 do done[#done + 1] = a[k] end
    end
    cmds[1] = done
  end
  for _, x in ipairs(batch.extra or {}) do cmds[#cmds + 1] = x end
  return cmds
end

-- The first error reply among a batch's values (a script Redis forgot is
-- loaded again on the next try).
function B:_failed(values)
  for _, v in ipairs(values) do
    if type(v) == "table" and v.err then
      self.c:forgot("outbox:done_many", v.err)
      return "redis: " .. v.err
    end
  end
end

-- Sends the batches whose post failed (an error reply, a cut connection)
-- again, in order, each waiting for its replies; while Redis cannot be
-- reached it tries again (bounded: 120 s), since every part may be
-- repeated.
function B:_redo()
  local deadline = core.now() + 120
  while self.redo[1] do
    local batch = self.redo[1]
    local cmds, e = self:_cmds(batch)
    if cmds then
      -- (this reads the replies of earlier posts first: a failed one joins redo)
      local res, pe = self.c:pipeline(cmds)
      e = pe
      if res then
        e = self:_failed(res)
        if not e then table.remove(self.redo, 1) end
      end
    end
    if e then
      if core.now() >= deadline then return nil, e end
      self.q.sleep(0.5)
    end
  end
  return true
end

--- Writes the outcomes waiting, and `extra` (a list of idempotent
-- commands) after them, without waiting for Redis's replies: they leave
-- now, in one write, behind everything sent before (a mark is on its way
-- before the final dot it guards leaves its session's gate), and
-- their replies are read before this worker's next call to Redis (a claim,
-- a renewal) or by `settle`. A batch Redis refused (a script it forgot
-- across a restart) or that a cut connection may have lost goes again,
-- waiting, on the next flush; so does one that cannot be sent now (while
-- Redis cannot be reached it tries again, bounded: 120 s).
-- @return[1] true
-- @return[2] nil
-- @treturn[2] string why
function B:flush(extra)
  if self.redo[1] then
    local ok, e = self:_redo()
    if not ok then
      if #self.pending > 0 or extra then
        self.redo[#self.redo + 1] = { pending = self.pending, extra = extra }
        self.pending = {}
      end
      return nil, e
    end
  end
  if #self.pending == 0 and not extra then return true end
  local batch = { pending = self.pending, extra = extra }
  self.pending = {}
  local cmds = self:_cmds(batch)
  if cmds and self.c:post(cmds, function(values)
    if not values or self:_failed(values) then self.redo[#self.redo + 1] = batch end
  end) then
    return true
  end
  self.redo[#self.redo + 1] = batch
  return self:_redo()
end

--- Writes everything waiting and reads every reply: when `true` comes
-- back, each outcome and mark handed to `finish`, `mark` or `flush` is in
-- Redis.
-- @return[1] true
-- @return[2] nil
-- @treturn[2] string why
function B:settle()
  local ok, e = self:flush()
  if not ok then return nil, e end
  self.c:settle() -- a failed post joins redo
  return self:_redo()
end

--- Puts a claimed message back to wait `seconds` for its next attempt
-- (`attempts`: made so far, across claims).
function B:later(id, seconds, attempts)
  self.c:call("HSET", self.p .. "m:" .. id, "attempts", tostring(attempts))
  return self.q:later(id, seconds)
end

--- Gives claimed messages back to the queue at once (never started, or
-- no attempt's final dot left: `void`, their marks are cleared).
-- @tparam table ids
-- @tparam[opt] boolean void
function B:unclaim(ids, void) return self.q:unclaim(ids, void) end

--- Deletes the outbox's every key (messages, outcomes, counts).
-- @treturn[1] number the keys deleted
-- @return[2] nil
-- @treturn[2] table error value
function B:purge()
  local n, cursor = 0, "0"
  repeat
    local r, e, why = self.rc:call("SCAN", cursor, "MATCH", self.p:gsub("[%*%?%[%]\\]", "\\%0") .. "*", "COUNT", 1000)
    if not r then return nil, redis_error(self, e, why) end
    cursor = r[1]
    if #r[2] > 0 then
      local d, de, dwhy = self.rc:call("UNLINK", (table.unpack or unpack)(r[2])) -- luacheck: ignore
      if not d then return nil, redis_error(self, de, dwhy) end
      n = n + d
    end
  until cursor == "0"
  return n
end

-- A retry waiting at least this long waits in Redis (`delayed`), not in
-- the worker's memory: it survives the worker.
M.LATER = 5

--- How many messages a worker claims at a time for a pool of `max_conns`
-- connections: enough that a claim's round trip is paid every 8 messages a
-- connection sends, not every 4 (what a worker leaving gives back at once).
-- @tparam number max_conns
-- @treturn number
function M.claim_size(max_conns) return math.max(tonumber(os.getenv("CS") or 16), tonumber(os.getenv("CPC") or 8) * (max_conns or 1)) end

--- What a pool's loop needs to deliver this outbox's items (besides any
-- others it runs, as nginx's agent does): `retry` (the pool's policy, a
-- long wait handed back to Redis), `on_result(m, res, err)` (records the
-- outcome; false for an item that is not the outbox's), `mark_async`,
-- `before_wait`, and `summary`; `misconfigured` is set by a configuration
-- failure (the message goes back to the queue; delivery should stop).
-- @tparam table pool the pool (its `retry`)
-- @tparam table o `retry` (instead of the pool's), `on_result(msg, res,
--   err)` (each final outcome; `msg.id`), `log(text)` (where a raising
--   on_result is told; default stderr)
function B:runner(pool, o)
  local policy = require("smtppool.engine.policy")
  local r = { summary = { sent = 0, failed = 0, ambiguous = 0, later = 0, returned = 0 } }
  local base = o.retry or pool.retry
  local summary = r.summary
  -- A retry of more than LATER seconds gives the message back to Redis
  -- to wait; a shorter one waits here, its lease renewed.
  function r.retry(err, attempt, m)
    if not m.outbox then return base(err, attempt, m) end
    local d = base(err, m.outbox.attempts + attempt, m)
    if d and d >= M.LATER then
      m.outbox.later = d
      return false
    end
    return d
  end
  function r.on_result(um, res, err)
    if not self.mine[um] then return false end
    local attempts = um.attempts + ((res or err).attempts or 1)
    local status
    if res then
      status = "sent"
      self:finish(um.id, "sent", res, attempts, res.ambiguous)
    elseif um.later and err.kind ~= "cancelled" then
      self:later(um.id, um.later, attempts)
      summary.later = summary.later + 1
      return true
    elseif err.kind == "cancelled" or policy.misconfigured(err) then
      -- never started, or stopped by the configuration: back to the queue
      if err.kind ~= "cancelled" then r.misconfigured = r.misconfigured or err end
      -- (not ambiguous: no final dot of it left, a mark written for one is void)
      self:unclaim({ um.id }, true)
      summary.returned = summary.returned + 1
      return true
    elseif err.kind == "ambiguous" or err.ambiguous then
      status = "ambiguous"
      self:finish(um.id, status, err, attempts)
    else
      status = "failed"
      self:finish(um.id, status, err, attempts)
    end
    summary[status] = summary[status] + 1
    if o.on_result then
      local pok, perr = pcall(o.on_result, um, res, err)
      if not pok then
        local msg = "smtppool: the outbox's on_result raised: " .. tostring(perr)
        if o.log then o.log(msg) else io.stderr:write(msg, "\n") end
      end
    end
    return true
  end
  function r.mark_async(um)
    if self.mine[um] then self:mark(um.id) end
  end
  function r.mark_many(list)
    local ids = {}
    for _, um in ipairs(list) do
      if self.mine[um] then ids[#ids + 1] = um.id end
    end
    if #ids > 0 then self:mark_many(ids) end
  end
  function r.before_wait() return self:renew() end
  return r
end

--- Delivers the outbox's messages over a pool (`Pool:deliver`).
-- @tparam table pool a pool (its `run_items`, `retry`, `cfg`)
-- @tparam table opts as `Pool:deliver`'s
function B:deliver(pool, opts)
  for _, k in ipairs({ "should_stop", "on_result", "on_event", "retry" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "function" then error("deliver: " .. k .. " must be a function", 3) end
  end
  local ok, e = self:_ready()
  if not ok then return nil, e end
  local r = self:runner(pool, opts)
  local function stop()
    return r.misconfigured ~= nil or (opts.should_stop ~= nil and opts.should_stop())
  end
  local source = self:source(M.claim_size(pool.cfg.max_conns), { stop = stop,
    until_empty = opts.until_empty, idle = opts.idle })
  local rok, rerr = pcall(pool.run_items, pool, source, r.on_result, {
    should_stop = stop, retry = r.retry, on_event = opts.on_event, poll = opts.idle or 0.25,
    mark_async = r.mark_async, mark_many = r.mark_many, before_wait = r.before_wait })
  if self.give_back then self.give_back() end
  self:settle()
  if not rok then error(rerr, 0) end
  if r.misconfigured then return nil, r.misconfigured end
  return r.summary
end

function B:close()
  -- the replies of what was written without waiting are read first (a
  -- run ends with settle: nothing is left to send again then)
  if not self.c.closed then pcall(self.c.settle, self.c) end
  self.c:close()
  self.rc:close()
end

return M
