--- Claims with leases in Redis: the one queue a campaign in Redis
-- (`smtppool.campaign.redis`) and the outbox (`smtppool.outbox`) share.
--
-- Under a key prefix `p`:
--
-- * `q` (list): keys ready to send, oldest first;
-- * `delayed` (sorted set): keys waiting for a retry, scored by when it is
--   due (Redis's clock); claims move them to `q` when their time comes, so
--   a retry waiting ten minutes survives any restart;
-- * `claims` (sorted set): keys a worker holds, scored by when its lease
--   runs out; `owner` (hash) names the worker;
-- * `state` (hash): `L` once a key's final dot may have left (written
--   before it leaves), so a key whose worker dies after that is never sent
--   again by default: the queue's user records it ambiguous;
-- * `seen` (hash): each worker's last claim.
--
-- What a key holds and how an outcome is recorded belong to the queue's
-- user, which gives the scripts three Lua functions (`hooks`):
--
-- * `gone(p, key, state)`: nothing is left to send (its outcome is recorded);
-- * `lost(p, key)`: its lease ran out after its `L` (record it ambiguous);
-- * `payload(p, key)`: what a claim hands out with the key.
--
-- Every time is the Redis server's (`TIME`), so workers' clocks never matter.
-- @module smtppool.redis.queue

local core = require("smtppool.core")
local loop = require("smtppool.engine.loop")
local client = require("smtppool.redis.client")

local M = {}

-- The journal's letters (defined once, in the C core: `core.letters`) as
-- constants of every script: PREPARED, LEAVING, SENT, TWICE, FAILED,
-- TRANSIENT, AMBIGUOUS.
local LETTERS = (function()
  local names, values = {}, {}
  for _, k in ipairs({ "prepared", "leaving", "sent", "twice", "failed", "transient", "ambiguous" }) do
    names[#names + 1] = k:upper()
    values[#values + 1] = ("%q"):format(core.letters[k])
  end
  return "local " .. table.concat(names, ", ") .. " = " .. table.concat(values, ", ") .. "\n"
end)()

--- A script's text with the journal's letters defined in it (as
-- `LEAVING`, `SENT`, ...): every script that reads or writes a letter is
-- made by this.
-- @tparam string body
-- @treturn string
function M.script(body) return LETTERS .. body end

-- KEYS[1]: the prefix; ARGV: worker, n, lease, resend_in_flight, epoch ('' for none)
-- -> {pending, claimed, key, payload, state, ...}, or {-1, 0} when the
-- state is not the epoch's any more
local CLAIM = [[
local p = KEYS[1]
if ARGV[5] ~= '' and redis.call('HGET', p .. 'meta', 'epoch') ~= ARGV[5] then return {-1, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- retries whose time has come
for _, key in ipairs(redis.call('ZRANGEBYSCORE', p .. 'delayed', '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', p .. 'delayed', key)
  redis.call('RPUSH', p .. 'q', key)
end
-- leases that ran out: a dead or cut-off worker's keys
for _, key in ipairs(redis.call('ZRANGEBYSCORE', p .. 'claims', '-inf', now)) do
  redis.call('ZREM', p .. 'claims', key)
  redis.call('HDEL', p .. 'owner', key)
  local st = redis.call('HGET', p .. 'state', key)
  if st == LEAVING and ARGV[4] ~= '1' then
    lost(p, key)
  elseif not gone(p, key, st) then
    redis.call('LPUSH', p .. 'q', key)
  end
end
local out = {0, 0}
for _ = 1, tonumber(ARGV[2]) do
  local key = redis.call('LPOP', p .. 'q')
  if not key then break end
  local st = redis.call('HGET', p .. 'state', key)
  if not gone(p, key, st) then
    redis.call('ZADD', p .. 'claims', now + tonumber(ARGV[3]), key)
    redis.call('HSET', p .. 'owner', key, ARGV[1])
    out[#out + 1] = key
    out[#out + 1] = payload(p, key)
    out[#out + 1] = st or ''
  end
end
out[1] = redis.call('LLEN', p .. 'q') + redis.call('ZCARD', p .. 'delayed')
out[2] = redis.call('ZCARD', p .. 'claims')
redis.call('HSET', p .. 'seen', ARGV[1], now)
return out
]]

-- KEYS[1]: the prefix; ARGV: lease, keys... (renewed while still claimed)
local RENEW = [[
local p = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
  if redis.call('ZSCORE', p .. 'claims', ARGV[i]) then redis.call('ZADD', p .. 'claims', now + tonumber(ARGV[1]), ARGV[i]) end
end
return 1
]]

-- KEYS[1]: the prefix; ARGV: void ('1': an L these keys hold was written
-- here for attempts whose final dots never left, and is cleared), then keys
-- claimed here that will not be sent now: back to the front of the queue
-- (with an L that is not void, the next claimer sees it: a key left out of
-- every list would never get an outcome)
local UNCLAIM = [[
local p = KEYS[1]
local void = ARGV[1] == '1'
for i = 2, #ARGV do
  local key = ARGV[i]
  if redis.call('ZREM', p .. 'claims', key) == 1 then
    redis.call('HDEL', p .. 'owner', key)
    local st = redis.call('HGET', p .. 'state', key)
    if st == LEAVING and void then
      redis.call('HDEL', p .. 'state', key)
      st = nil
    end
    if not gone(p, key, st) then redis.call('LPUSH', p .. 'q', key) end
  end
end
return 1
]]

-- KEYS[1]: the prefix; ARGV: key, seconds: a claimed key waits in
-- `delayed` for its next attempt (its L, if any, is void: the attempt failed
-- with an answer)
local LATER = [[
local p = KEYS[1]
if redis.call('ZREM', p .. 'claims', ARGV[1]) == 0 then return 0 end
redis.call('HDEL', p .. 'owner', ARGV[1])
redis.call('HDEL', p .. 'state', ARGV[1])
if gone(p, ARGV[1]) then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', p .. 'delayed', tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[2]), ARGV[1])
return 1
]]

--- Why a server cannot hold a queue: it keeps nothing on disk (no AOF,
-- no RDB saves), so a restart would lose it. CONFIG may be renamed away
-- (managed services, which persist): then nothing can be told (nil).
-- @tparam table c a client
-- @tparam string what what would be lost ("campaign", "outbox")
-- @treturn string|nil why not
function M.volatile(c, what)
  local aof, save = c:call("CONFIG", "GET", "appendonly"), c:call("CONFIG", "GET", "save")
  if type(aof) == "table" and type(save) == "table" and aof[2] == "no" and save[2] == "" then
    return ("Redis at %s:%s keeps nothing on disk (appendonly no, save \"\"): a restart would lose the %s%s. "
      .. "Turn on AOF or RDB snapshots, or accept the risk by name (allow_volatile_redis = true, "
      .. "--allow-volatile-redis)"):format(c.url.host, c.url.port, what,
      what == "campaign" and " and a second run would send it again" or " and every message in it")
  end
end

local Q = {}
Q.__index = Q

-- Error replies that pass: the server is loading its data, or busy.
local function RETRYABLE(e)
  local code = tostring(e):match("^redis: (%u+)")
  return code == "LOADING" or code == "BUSY" or code == "TRYAGAIN" or code == "MASTERDOWN"
end

--- A queue over a client.
-- @tparam table c a `smtppool.redis.client`
-- @tparam string prefix every key's prefix
-- @tparam table o `name` (names the scripts in the client's cache),
--   `hooks` (the Lua source of `gone`, `lost` and `payload`), `lease`
--   (seconds, default 30), `resend_in_flight` (a key whose lease ran out
--   after its L goes back to the queue instead of `lost`), `worker` (this
--   worker's name; default host and time), `sleep` (how to wait between
--   tries while Redis is away; default `smtppool.engine.loop.sleep`)
function M.new(c, prefix, o)
  local q = setmetatable({ c = c, p = prefix, lease = o.lease or 30, resend = o.resend_in_flight and "1" or "0",
    held = {}, renewed = 0, sleep = o.sleep or loop.sleep,
    worker = o.worker or ("%s:%s"):format(core.hostname() or "host", tostring(core.now()):gsub("%.", "")) }, Q)
  q.scripts = {}
  for name, body in pairs({ claim = CLAIM, unclaim = UNCLAIM, later = LATER }) do
    q.scripts[name] = { o.name .. ":" .. name, M.script(o.hooks .. "\n" .. body) }
  end
  return q
end

--- A script's value, waiting (bounded by `patience` seconds, default 120)
-- while Redis is unreachable: bookkeeping must not be skipped. On a loop
-- the wait serves the loop's other tasks.
-- @tparam string name
-- @tparam string body
-- @tparam table args ARGV (KEYS is the prefix)
-- @tparam[opt] number patience seconds
-- @return the value, or nil and why
function Q:run(name, body, args, patience)
  local deadline = core.now() + (patience or 120)
  while true do
    local v, e, why = self.c:script(name, body, { self.p }, args)
    if v ~= nil then return v end
    -- an outage is waited out; an answer is final unless it says to wait
    -- (a Redis restarting with AOF answers LOADING until it has read it)
    if client.misconfigured(why) or core.now() >= deadline then return nil, e end
    if why == true and not RETRYABLE(e) then return nil, e end
    self.sleep(0.5)
  end
end

function Q:_script(which, args, patience)
  local s = self.scripts[which]
  return self:run(s[1], s[2], args, patience)
end

-- A claim's ARGV.
local function claim_args(self, n, epoch)
  return { self.worker, tostring(n), tostring(self.lease), self.resend, epoch or "" }
end

--- Claims up to n keys.
-- @tparam number n
-- @tparam[opt] string epoch the state's generation (a claim made when it
--   changed answers `nil, "gone"`)
-- @tparam[opt] number patience seconds to wait for Redis (default 120)
-- @treturn[1] table `{key, payload, state}` each
-- @treturn[1] number pending (queued or delayed)
-- @treturn[1] number claimed (by every worker)
-- @return[2] nil
-- @treturn[2] string why (`"gone"`: the epoch changed)
function Q:claim(n, epoch, patience)
  local v, e = self:_script("claim", claim_args(self, n, epoch), patience)
  if not v then return nil, e end
  return self:_took(v)
end

-- What a claim's reply hands out (as `claim` returns it).
function Q:_took(v)
  if v[1] == -1 then return nil, "gone" end
  local out = {}
  for i = 3, #v, 3 do
    out[#out + 1] = { key = v[i], payload = v[i + 1], state = v[i + 2] ~= "" and v[i + 2] or nil }
    self.held[v[i]] = true
  end
  return out, v[1], v[2]
end

--- Claims up to n keys without waiting (the client's `post`): the claim
-- leaves now and `on_done` gets what `claim` returns once its reply is read
-- (`nil, why` when it failed: Redis forgot the script, the connection was
-- cut; whether it ran is then unknown, and keys it took come back when
-- their leases run out). False when it cannot be posted now (its script
-- was never loaded on this client, or the connection is down): `claim`.
-- @tparam number n
-- @tparam function on_done
-- @tparam[opt] string epoch as `claim`'s
-- @treturn boolean posted
function Q:post_claim(n, on_done, epoch)
  local name = self.scripts.claim[1]
  local sha = self.c.shas[name]
  if not sha then return false end
  local cmd = { "EVALSHA", sha, "1", self.p }
  for _, a in ipairs(claim_args(self, n, epoch)) do cmd[#cmd + 1] = a end
  return self.c:post({ cmd }, function(values, err)
    local v = values and values[1]
    if type(v) == "table" and v.err then
      self.c:forgot(name, v.err)
      return on_done(nil, "redis: " .. v.err)
    end
    if not values then return on_done(nil, err) end
    return on_done(self:_took(v))
  end) == true
end

--- Writes a key's `L`: its final dot is about to leave (it waits behind
-- its session's gate until this returns). Written behind: the command is
-- on its way when this returns, and its reply is read with the next call's.
-- That is as durable as a reply: a worker killed now leaves it in the
-- kernel's hands and Redis reads it (a Redis that answered may lose it too,
-- with `appendfsync everysec`), and a Redis that hangs holds no dot. A
-- reply that says it failed (the connection cut meanwhile) changes nothing:
-- the outcome is written later anyway; only that worker dying as well
-- could send the key again. When it cannot be sent now, it waits for Redis
-- (bounded), the dot behind its gate.
local MARK = M.script("redis.call('HSET', KEYS[1] .. 'state', ARGV[1], LEAVING) return 1")
local function ignore() end
function Q:mark(key)
  if self.c:post({ { "HSET", self.p .. "state", key, core.letters.leaving } }, ignore) then return true end
  return self:run("queue:mark", MARK, { key })
end

--- Forgets a key this worker held (its outcome is recorded).
function Q:release(key) self.held[key] = nil end

--- Renews the leases of the keys this worker holds (at most every lease/3 s).
function Q:renew(force)
  local now = core.now()
  if not force and now - self.renewed < self.lease / 3 then return end
  self.renewed = now
  local args = { tostring(self.lease) }
  for k in pairs(self.held) do args[#args + 1] = k end
  if #args > 1 then self.c:script("queue:renew", RENEW, { self.p }, args) end
end

--- Gives back claims this worker will not send now (a stop, an outage,
-- a refused configuration): to the front of the queue.
-- @tparam table keys
-- @tparam[opt] boolean void the keys were handed out here and no attempt's
--   final dot left (their failures said so): an `L` written for them is
--   cleared (else it stays, for the next claimer to see)
-- @tparam[opt] number patience seconds to wait for Redis (default 10)
function Q:unclaim(keys, void, patience)
  if #keys == 0 then return true end
  local args = { void and "1" or "0" }
  for _, k in ipairs(keys) do
    self.held[k] = nil
    args[#args + 1] = k
  end
  return self:_script("unclaim", args, patience or 10)
end

--- Puts a claimed key in `delayed` for `seconds` (a retry kept in Redis).
function Q:later(key, seconds)
  self.held[key] = nil
  return self:_script("later", { key, tostring(seconds) })
end

--- How many keys this worker holds.
function Q:holding()
  local n = 0
  for _ in pairs(self.held) do n = n + 1 end
  return n
end

return M
