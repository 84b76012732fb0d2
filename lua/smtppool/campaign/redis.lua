--- A campaign shared through Redis: any number of worker processes, on any
-- machines, send one list together, each recipient exactly once.
--
--     smtppool.campaign{ pool = pool, journal = "redis://10.0.0.5:6379/0", name = "spring-news",
--                        recipients = "list.csv", message = {...} }:run()
--
-- Run the same on every machine (`bin/smtppool send --journal redis://...`,
-- or `bin/smtppool worker` without a list once it is loaded):
--
-- * **Loading** is idempotent: each row is stored under its normalised
--   address (`HSETNX`) and queued only if it was new, so loading again, or
--   from several workers at once, adds nothing; duplicates are counted.
-- * **Claims with a lease.** A worker takes recipients from the queue a
--   group at a time; each claim is a lease (`lease`, default 30 s) renewed
--   while the worker lives. A lease that expires (the worker was killed, or
--   cut off from Redis) puts the recipient back at the front of the queue,
--   unless its final dot may have left: as in the file journal, `L` is
--   written to Redis before the final dot leaves (the session holds the
--   dot behind its gate until the mark is on its way, in both drivers;
--   its reply is read with the next call's), and such a recipient becomes `A` (ambiguous), or
--   is sent again with `resend_in_flight`. After a worker's `kill -9`, at
--   most one recipient per connection it had open is ambiguous.
-- * **Outcomes** are the file journal's letters (`S`, `D`, `F`, `T`, `A`),
--   counted per campaign and per worker; failures are listed with their
--   reasons (the last 10,000). `retry_failed` puts `T` recipients back.
-- * A worker returns when nothing is queued or claimed; while others still
--   hold claims it waits, and takes over any that expire.
-- * A worker started before the list is loaded waits for it (`list_wait`
--   seconds) instead of ending with nothing to do.
-- * **Lifecycle**: a finished campaign's keys (addresses included) expire
--   `expire_after` seconds after a run that found it complete; `purge`
--   deletes them now (refused while a worker holds claims, unless forced).
-- * Every time is the Redis server's (`TIME` in the scripts).
-- * `status(url, name)` reads the campaign's totals, rate and workers from
--   any machine (`bin/smtppool status`).
-- @module smtppool.campaign.redis

local core = require("smtppool.core")
local client = require("smtppool.redis.client")
local queue = require("smtppool.redis.queue")

local M = {}

-- KEYS[1]: the prefix; ARGV: epoch, key, row, key, row... -> {added, duplicates}.
-- The epoch names this generation of the campaign's state: set by the
-- first load, checked by every claim, so state that vanished (a Redis
-- restarted without persistence, keys deleted) is noticed, never mistaken
-- for a finished campaign.
local LOAD = [[
local p = KEYS[1]
redis.call('HSETNX', p .. 'meta', 'epoch', ARGV[1])
local added, dup = 0, 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', p .. 'rows', ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', p .. 'q', ARGV[i])
    added = added + 1
  else
    dup = dup + 1
  end
end
redis.call('HINCRBY', p .. 'meta', 'total', added)
return {added, dup}
]]

-- What the shared queue (smtppool.redis.queue) needs to know of a campaign:
-- a key holds its row in `rows`; an outcome is a letter in `state`; a key
-- whose worker died after its L becomes A, listed with the failures.
local HOOKS = [[
local final = {[SENT] = true, [TWICE] = true, [FAILED] = true, [AMBIGUOUS] = true}
local function gone(p, key, st) return st and final[st] end
local function lost(p, key)
  redis.call('HSET', p .. 'state', key, AMBIGUOUS)
  redis.call('HINCRBY', p .. 'stats', AMBIGUOUS, 1)
  redis.call('RPUSH', p .. 'failures', key .. '\t' .. AMBIGUOUS .. '\tfinal dot on its way when its worker stopped')
end
local function payload(p, key) return redis.call('HGET', p .. 'rows', key) or '' end
]]

-- KEYS[1]: the prefix; ARGV: worker, key, letter, info. Idempotent: a
-- call repeated because its reply was lost (Redis restarting) counts once.
local DONE = queue.script [[
local p = KEYS[1]
if redis.call('HGET', p .. 'state', ARGV[2]) == ARGV[3] then return 0 end
redis.call('HSET', p .. 'state', ARGV[2], ARGV[3])
redis.call('ZREM', p .. 'claims', ARGV[2])
redis.call('HDEL', p .. 'owner', ARGV[2])
redis.call('HINCRBY', p .. 'stats', ARGV[3], 1)
redis.call('HINCRBY', p .. 'w:' .. ARGV[1], ARGV[3], 1)
if ARGV[3] == TRANSIENT then redis.call('SADD', p .. 'retryable', ARGV[2]) end
if ARGV[3] == FAILED or ARGV[3] == TRANSIENT or ARGV[3] == AMBIGUOUS then
  redis.call('RPUSH', p .. 'failures', ARGV[2] .. '\t' .. ARGV[3] .. '\t' .. ARGV[4])
  redis.call('LTRIM', p .. 'failures', -10000, -1)
end
if redis.call('HEXISTS', p .. 'meta', 'started') == 0 then
  local t = redis.call('TIME')
  redis.call('HSET', p .. 'meta', 'started', t[1])
end
return 1
]]

-- KEYS[1]: the prefix: T recipients back in the queue
local RETRY = queue.script [[
local p = KEYS[1]
local n = 0
for _, key in ipairs(redis.call('SMEMBERS', p .. 'retryable')) do
  if redis.call('HGET', p .. 'state', key) == TRANSIENT then
    redis.call('HDEL', p .. 'state', key)
    redis.call('RPUSH', p .. 'q', key)
    n = n + 1
  end
  redis.call('SREM', p .. 'retryable', key)
end
return n
]]

local J = {}
J.__index = J

--- Opens a campaign in Redis.
-- @tparam string url `redis://host:port/db`
-- @tparam string name the campaign
-- @tparam[opt] table o `lease` (seconds, default 30), `resend_in_flight`,
--   `allow_volatile` (accept a Redis that keeps nothing on disk),
--   `dns_servers` (for the Redis host's name, as the pool's option)
-- @treturn[1] table the journal
-- @return[2] nil
-- @treturn[2] string why
function M.open(url, name, o)
  local u, uerr = client.parse_url(url)
  if not u then return nil, uerr end
  if type(name) ~= "string" or not name:match("^[%w._:-]+$") then
    return nil, "a campaign in Redis needs a name (letters, digits, . _ : -)"
  end
  o = o or {}
  -- its own connection (scripts, commands), not the limits backend's
  local c = client.new(u, { timeout = 2, dns_servers = o.dns_servers })
  local okc, ce, why = c:connect()
  if not okc and client.misconfigured(why) then
    -- wrong credentials are not an outage to wait out
    c:close()
    return nil, ce
  end
  if not o.allow_volatile then
    local vol = queue.volatile(c, "campaign")
    if vol then
      c:close()
      return nil, vol
    end
  end
  local p = "smtppool:campaign:" .. name .. ":"
  local q = queue.new(c, p, { name = "campaign", hooks = HOOKS, lease = o.lease,
    resend_in_flight = o.resend_in_flight })
  return setmetatable({ c = c, p = p, q = q, url = client.redact(url), name = name, list_wait = o.list_wait or 0,
    on_wait = o.on_wait, claim_state = {}, worker = q.worker }, J)
end

-- A script's value, waiting (bounded) while Redis is unreachable: a
-- campaign's bookkeeping must not be skipped.
function J:_run(name, body, args, patience)
  return self.q:run(name, body, args, patience)
end

--- Loads rows (an iterator of `key, row` with row a string); idempotent.
-- @treturn[1] number added
-- @treturn[1] number duplicates (already loaded, or twice in the list)
function J:load(next_row)
  local added, dup, batch = 0, 0, {}
  local epoch = core.random_hex(8)
  local function flush()
    if #batch == 0 then return true end
    table.insert(batch, 1, epoch)
    local v, e = self:_run("load", LOAD, batch)
    if not v then return nil, e end
    added, dup = added + v[1], dup + v[2]
    batch = {}
    return true
  end
  for key, row in next_row do
    batch[#batch + 1] = key
    batch[#batch + 1] = row
    if #batch >= 1000 then
      local ok, e = flush()
      if not ok then return nil, e end
    end
  end
  local ok, e = flush()
  if not ok then return nil, e end
  return added, dup
end

--- Claims up to n recipients: a list of `{key, row, state}`, and the
-- campaign's pending and claimed counts.
function J:claim(n)
  local out, pending, claimed = self.q:claim(n, self.epoch)
  if not out then
    if pending == "gone" then return nil, self:_gone() end
    return nil, pending
  end
  for _, c in ipairs(out) do c.row = c.payload end
  return out, pending, claimed
end

-- Why the run stops when the campaign's state is gone.
function J:_gone()
  self.gone = true
  local held = self.q:holding()
  return ("the campaign '%s' is gone from %s (Redis restarted without persistence, or its keys were deleted): "
    .. "%d recipients this worker held have no recorded outcome. Running the same command again would load "
    .. "the list anew and send again every recipient whose outcome was lost; check what was delivered first")
    :format(self.name, self.url, held)
end

--- Records a letter: `L` before a final dot leaves, or an outcome.
function J:record(letter, key, info)
  if letter == core.letters.prepared then return true end -- a claim is the P of this journal
  if letter == core.letters.leaving then
    return self.q:mark(key)
  end
  self.q:release(key)
  return self:_run("done", DONE, { self.worker, key, letter, info or "" })
end

--- Renews the leases of the recipients this worker holds (every lease/3 s).
function J:renew()
  self.q:renew()
end

--- Gives back claims this worker will not send now (a stop, an outage):
-- `void` as the queue's (their attempts' final dots never left).
function J:unclaim(keys, void)
  return self.q:unclaim(keys, void)
end

--- The campaign's recipients for the pool: an iterator of rows (tables,
-- `email` set) and their keys, claimed `n` at a time; `false` while nothing can be claimed
-- but some are still held (by this worker's connections or by others,
-- whose leases may run out); nil when nothing is queued or held.
function J:source(n)
  local json = require("dkjson")
  local buf, bi, quiet_until = {}, 0, 0
  local wait_until = core.now() + self.list_wait
  local function loaded()
    local epoch = self.c:call("HGET", self.p .. "meta", "epoch")
    if epoch == nil then
      error(require("smtppool.errors").new("connection", "Redis at " .. self.url .. " cannot be reached"), 0)
    end
    if epoch == false and core.now() >= wait_until then
      error(require("smtppool.errors").new("config", ("no campaign '%s' in %s: nothing is loaded (a worker "
        .. "without a list joins a campaign whose list is loaded%s)"):format(self.name, self.url,
        self.list_wait > 0 and (", and none was within %gs"):format(self.list_wait) or "")), 0)
    end
    self.epoch = epoch or nil
    return epoch
  end
  if not loaded() and self.on_wait then self.on_wait(self.name, self.list_wait) end
  return function()
    if not self.epoch then
      -- waiting for another process to load the list: ask again shortly
      if core.now() < quiet_until then return false end
      if not loaded() then
        quiet_until = core.now() + 0.5
        return false
      end
    end
    self:renew()
    if bi >= #buf then
      if core.now() < quiet_until then return false end
      local got, pending, claimed = self:claim(n)
      if not got and self.gone then error(require("smtppool.errors").new("journal", pending), 0) end
      if not got then error(require("smtppool.errors").new("connection", "Redis: " .. tostring(pending)), 0) end
      buf, bi = got, 0
      if #got == 0 then
        if pending == 0 and claimed == 0 then return nil end
        quiet_until = core.now() + 0.2
        return false
      end
    end
    bi = bi + 1
    local c = buf[bi]
    local row = type(c.row) == "string" and json.decode(c.row) or nil
    if type(row) ~= "table" then row = {} end
    row.email = type(row.email) == "string" and row.email or c.key
    self.claim_state[c.key] = c.state
    return row, c.key
  end
end

--- What the campaign runner asks of an address index: the state each claim
-- came with (`get`); letters go to `record`.
function J:states()
  local cs = self.claim_state
  -- (no key is met twice in one run: Redis deduplicates the list as it loads)
  return { get = function(_, k) return cs[k] end, meet = function() return true end }
end

--- Puts the `T` (transient failure) recipients back in the queue.
function J:retry_failed()
  return self:_run("retry", RETRY, {})
end

function J:close()
  self.c:close()
end

-- Every key of the campaign (SCAN, never KEYS: a big Redis stays responsive).
local function campaign_keys(c, p)
  local keys, cursor = {}, "0"
  repeat
    local r, e = c:call("SCAN", cursor, "MATCH", p:gsub("[%*%?%[%]\\]", "\\%0") .. "*", "COUNT", 1000)
    if not r then return nil, e end
    cursor = r[1]
    for _, k in ipairs(r[2]) do keys[#keys + 1] = k end
  until cursor == "0"
  return keys
end

--- After a run: when the campaign is complete (nothing queued or claimed),
-- its keys expire in `seconds`. Returns true when they were set to expire.
function J:expire_when_done(seconds)
  local q, claims = self.c:call("LLEN", self.p .. "q"), self.c:call("ZCARD", self.p .. "claims")
  if q ~= 0 or claims ~= 0 then return false end
  local keys, e = campaign_keys(self.c, self.p)
  if not keys then return nil, e end
  local cmds = {}
  for i, k in ipairs(keys) do cmds[i] = { "EXPIRE", k, tostring(math.max(1, math.floor(seconds))) } end
  local ok, pe = self.c:pipeline(cmds)
  if not ok then return nil, pe end
  return true
end

--- Deletes a campaign's every key (its list, states, counts, failures).
-- Refused while a worker holds claims (a campaign still running), unless
-- `force`.
-- @treturn[1] number the keys deleted (0: no such campaign)
-- @return[2] nil
-- @treturn[2] string why
function M.purge(url, name, force)
  local j, e = M.open(url, name, { allow_volatile = true })
  if not j then return nil, e end
  local claims = j.c:call("ZCARD", j.p .. "claims")
  if claims == nil then
    j:close()
    return nil, "redis at " .. j.url .. " cannot be reached"
  end
  if claims > 0 and not force then
    j:close()
    return nil, ("campaign '%s' is running: %d recipients are claimed by workers (stop them, or force)")
      :format(name, claims)
  end
  local keys, ke = campaign_keys(j.c, j.p)
  if not keys then
    j:close()
    return nil, ke
  end
  local n = 0
  for i = 1, #keys, 500 do
    local cmd = { "UNLINK" }
    for k = i, math.min(#keys, i + 499) do cmd[#cmd + 1] = keys[k] end
    local d, de = j.c:call((table.unpack or unpack)(cmd)) -- luacheck: ignore
    if not d then
      j:close()
      return nil, de
    end
    n = n + d
  end
  j:close()
  return n
end

--- The campaign's state, from any machine.
-- @treturn[1] table `total`, `pending`, `claimed`, `sent`, `failed`,
--   `retryable`, `ambiguous`, `possible_duplicates`, `started` (Unix time),
--   `workers` (`{name, sent, failed, ambiguous, seen}`), `failures` (the
--   last ones: `{address, letter, reason}`)
-- @return[2] nil
-- @treturn[2] string why
function M.status(url, name, nfail)
  local j, e = M.open(url, name, { allow_volatile = true }) -- a reader risks nothing
  if not j then return nil, e end
  local p = j.p
  local function cmd(...)
    return (j.c:call(...))
  end
  local total = cmd("HGET", p .. "meta", "total")
  if total == nil then
    j:close()
    return nil, "redis at " .. url .. " cannot be reached"
  end
  if total == false then
    j:close()
    return nil, ("no campaign '%s' in %s"):format(name, url)
  end
  local stats = {}
  local flat = cmd("HGETALL", p .. "stats") or {}
  for i = 1, #flat, 2 do stats[flat[i]] = tonumber(flat[i + 1]) end
  local st = { total = tonumber(total), pending = cmd("LLEN", p .. "q"), claimed = cmd("ZCARD", p .. "claims"),
               sent = (stats.S or 0) + (stats.D or 0), possible_duplicates = stats.D or 0,
               failed = stats.F or 0, retryable = cmd("SCARD", p .. "retryable"), ambiguous = stats.A or 0,
               started = tonumber(cmd("HGET", p .. "meta", "started") or nil), workers = {}, failures = {} }
  local seen = cmd("HGETALL", p .. "seen") or {}
  for i = 1, #seen, 2 do
    local w = { name = seen[i], seen = tonumber(seen[i + 1]) }
    local ws = cmd("HGETALL", p .. "w:" .. seen[i]) or {}
    local c = {}
    for k = 1, #ws, 2 do c[ws[k]] = tonumber(ws[k + 1]) end
    w.sent, w.failed, w.ambiguous = (c.S or 0) + (c.D or 0), (c.F or 0) + (c.T or 0), c.A or 0
    st.workers[#st.workers + 1] = w
  end
  table.sort(st.workers, function(a, b) return a.name < b.name end)
  for _, line in ipairs(cmd("LRANGE", p .. "failures", -(nfail or 20), -1) or {}) do
    local a, l, r = line:match("^([^\t]*)\t([^\t]*)\t(.*)$")
    st.failures[#st.failures + 1] = { address = a, letter = l, reason = r }
  end
  j:close()
  return st
end

return M
