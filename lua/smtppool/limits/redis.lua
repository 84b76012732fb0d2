--- A limits backend shared by every process and machine using one Redis.
--
-- Implements the interface of `smtppool.limits.process` for pools given
-- `rate = { backend = "redis://host:port/db", key = "acct1", ... }`: the
-- account's limits hold across every process with the same key, whatever
-- machine it runs on.
--
-- * **Rate windows** are sliding logs in sorted sets, checked and spent by
--   one server-side script for all the windows a step needs (atomic: no two
--   processes can both take the last slot). Every time is the Redis
--   server's own clock (`TIME` inside the script), so clock skew between
--   the sending machines cannot let a window overflow.
-- * **Connection slots** (`max_conns` counted as sockets across every
--   process): a sorted set of leases, one per open socket, renewed while the
--   process runs and expiring 30 s after a process dies without releasing
--   them. A process refused a slot says so for a second, and processes
--   holding idle connections with nothing queued QUIT them.
-- * **The learned cap**: the lowest cap any process learned, until
--   `cap_recover_after` seconds pass without a new one.
--
-- **When Redis cannot be reached** the pool pauses: no connection opens and
-- no message starts (never a silent fall back to per-process limits); it
-- tries again every second, and says so with one `limits_unavailable`
-- event (and `limits_available` when Redis is back). Messages already on
-- the wire finish. A message waits within `wait_timeout` like any other.
--
-- Its Redis connection is a `smtppool.redis.client` over the driver's
-- transport: in the native driver a small blocking client in C (each step
-- is one round trip to Redis, about 0.1 ms on a local network); in nginx
-- (`smtppool.ngx`) a cosocket, one per light thread that uses it (the
-- agent's is kept open).
-- @module smtppool.limits.redis

local core = require("smtppool.core")
local errors = require("smtppool.errors")
local client = require("smtppool.redis.client")

local M = {}

local LEASE = 30
local RENEW = 10
local RETRY = 1 -- seconds between tries while Redis is unreachable

-- KEYS: the windows' keys; ARGV: limit, per for each, then a unique token.
-- Returns "0" (spent in every window) or the seconds to wait (spent in none).
local TAKE = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
for i, key in ipairs(KEYS) do
  local limit, per = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - per)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local w = tonumber(oldest[2]) + per - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[#ARGV] .. ':' .. i)
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2 * i]) * 1000) + 1000)
end
return '0'
]]

-- KEYS: slots, want; ARGV: max, member, lease, process. 1: granted.
local ACQUIRE = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  return 1
end
redis.call('SET', KEYS[2], ARGV[4], 'PX', 1000)
return 0
]]

-- KEYS: slots; ARGV: lease, members... (renewed when still held)
local RENEW_SCRIPT = [[
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i]) end
end
return 1
]]

-- KEYS: cap; ARGV: n, ttl. Keeps the lowest.
local CAP = [[
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur == 0 or tonumber(ARGV[1]) < cur then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return 1
]]

local B = {}
B.__index = B

--- Parses `redis[s]://[[user]:password@]host[:port][/db]` (as
-- `smtppool.redis.client.parse_url`).
M.parse_url = client.parse_url

function B:_emit(ev)
  if self.on_event then pcall(self.on_event, ev) end
end

-- Runs a script (EVALSHA, loading it once; scripts are the server's, so any
-- connection can run them): its value, or nil and the error when Redis is
-- unreachable or failing, and the pool then pauses.
function B:_call(name, body, keys, args)
  if self.down_until and core.now() < self.down_until then return nil, self.last_err end
  local v, err, why = self.client:script(name, body, keys, args)
  if client.misconfigured(why) then
    -- the credentials are the configuration's: the pool fails its queue at
    -- once (failure()) instead of pausing until wait_timeout
    self.failed = errors.new("config", err)
    self.last_err = err
    self.down_until = core.now() + RETRY
    return nil, err
  end
  if v ~= nil then
    if self.down_since then
      self:_emit({ type = "limits_available", backend = "redis", seconds = core.now() - self.down_since })
      self.down_since = nil
    end
    return v
  end
  self.last_err = err
  self.down_until = core.now() + RETRY
  if not self.down_since then
    self.down_since = core.now()
    self:_emit({ type = "limits_unavailable", backend = "redis",
                 err = errors.new("connection", "the shared limits are unreachable: " .. tostring(err)) })
  end
  return nil, err
end

-- A refused login, once (the next call tries again).
function B:failure()
  local f = self.failed
  self.failed = nil
  return f
end

-- One plain command; nil when Redis is unreachable (no pause: a read).
function B:_cmd(...)
  if self.down_until and core.now() < self.down_until then return nil end
  return (self.client:call(...))
end

function B:take(names, now)
  local keys, args = {}, {}
  for _, name in ipairs(names) do
    local w = self.windows[name]
    if w then
      keys[#keys + 1] = w.key
      args[#args + 1] = tostring(w.limit)
      args[#args + 1] = tostring(w.per)
    end
  end
  if #keys == 0 then return 0 end
  self.seq = self.seq + 1
  args[#args + 1] = self.id .. ":" .. self.seq
  local v = self:_call("take", TAKE, keys, args)
  if v == nil then return RETRY end -- paused: look again in a second
  return tonumber(v) or RETRY
end

function B:conn_acquire(now, limit)
  self.seq = self.seq + 1
  local member = self.id .. ":c" .. self.seq
  local v = self:_call("acquire", ACQUIRE, { self.p .. "slots", self.p .. "want" },
    { tostring(limit or self.max_conns), member, tostring(LEASE), self.id })
  if v ~= 1 then return false end
  self.held[#self.held + 1] = member
  self:refresh(now)
  return true
end

function B:conn_release()
  local member = table.remove(self.held)
  if member then self:_cmd("ZREM", self.p .. "slots", member) end -- a failure leaves the lease to expire
end

function B:contended(now)
  -- asked on every turn of the loop while connections idle: cached briefly
  now = now or core.now()
  if self.want_at and now - self.want_at < 0.2 then return self.want_v end
  self.want_at = now
  local w = self:_cmd("GET", self.p .. "want")
  self.want_v = type(w) == "string" and w ~= self.id
  return self.want_v
end

function B:refresh(now)
  if #self.held > 0 and now - (self.renewed or 0) >= RENEW then
    self.renewed = now
    local args = { tostring(LEASE) }
    for _, m in ipairs(self.held) do args[#args + 1] = m end
    self:_call("renew", RENEW_SCRIPT, { self.p .. "slots" }, args)
  end
end

function B:cap()
  -- asked per transaction: cached for a second
  local now = core.now()
  if self.cap_at and now - self.cap_at < 1 then return self.cap_v end
  self.cap_at = now
  local v = self:_cmd("GET", self.p .. "cap")
  self.cap_v = type(v) == "string" and tonumber(v) or nil
  return self.cap_v
end

function B:publish_cap(n, ttl)
  self:_call("cap", CAP, { self.p .. "cap" }, { tostring(n), tostring(math.max(1, math.floor(ttl))) })
  self.cap_at = nil
end

function B:learned(name)
  -- asked on every turn of the loop: cached for a second
  local now = core.now()
  local c = self.learned_cache[name]
  if c and now - c.at < 1 then return c.v end
  local v = self:_cmd("GET", self.p .. "learned:" .. name)
  v = type(v) == "string" and tonumber(v) or nil
  self.learned_cache[name] = { at = now, v = v }
  return v
end

function B:publish_learned(name, n, ttl)
  if n then
    self:_cmd("SET", self.p .. "learned:" .. name, tostring(n), "EX", tostring(math.max(1, math.floor(ttl))))
  else
    self:_cmd("DEL", self.p .. "learned:" .. name)
  end
  self.learned_cache[name] = nil
end

--- Sockets open now across every process (stats).
function B:open_total()
  local v = self:_cmd("ZCARD", self.p .. "slots")
  return type(v) == "number" and v or nil
end

--- A backend constructor for `smtppool.limits.from_options`.
-- @tparam table url from `parse_url`
-- @tparam string key the account's name (the prefix of its keys)
-- @tparam[opt] function on_event the pool's event hook
-- @tparam[opt] table driver the pool's driver (its Redis transport: the
--   native driver's client, nginx's cosockets)
-- @tparam[opt] string dns_servers the name servers for the Redis host (the
--   pool's `dns_servers`)
function M.backend(url, key, on_event, driver, dns_servers)
  return function(specs, opts)
    local p = "smtppool:" .. key .. ":"
    local windows = {}
    for name, s in pairs(specs) do
      windows[name] = { limit = s.limit, per = s.per, key = ("%sw:%s:%d/%g"):format(p, name, s.limit, s.per) }
    end
    local host = core.hostname() or "host"
    return setmetatable({ name = "redis", url = url, p = p, windows = windows, max_conns = opts.max_conns or 1,
                          client = client.new(url, { driver = driver, timeout = 2, dns_servers = dns_servers }),
                          held = {}, seq = 0, on_event = on_event, learned_cache = {},
                          id = ("%s:%d:%s"):format(host, math.random(1, 2 ^ 31), tostring(core.now())) }, B)
  end
end

return M
