--- A limits backend shared by every worker of one nginx: a `lua_shared_dict`.
--
-- Implements the interface of `smtppool.limits.process` for `smtppool.ngx` pools
-- given `shared_dict = "name"`:
--
-- * **Rate windows** are sliding logs: each window keeps the times of its
--   last `limit` events in a ring of dict keys, so at most `limit` events
--   fall in *any* `per` seconds, not just in aligned ones. A take reads and
--   updates every window it names under one lock, so the check and the
--   spend are atomic across workers. Times come from `CLOCK_MONOTONIC`,
--   which every process of the machine shares.
-- * **Connection slots**: each pool records how many sockets it holds
--   (`open:<pid>-<n>`, its worker's pid and its place among the worker's
--   pools of this dict, so two pools of one account in one worker are
--   counted apart; a lease renewed while it runs and expiring 30 s after a
--   worker dies without releasing them); a slot is granted while the sum
--   over live holders is below `max_conns`. A worker refused a slot says so
--   for a second (`want`), and workers holding idle connections with
--   nothing queued QUIT them, so slots follow the work.
-- * **The learned cap**: the lowest cap any worker learned, until
--   `cap_recover_after` seconds pass without a new one.
--
-- The lock is one `add` with a 1 s expiry (a worker that dies holding it
-- cannot wedge the others for longer); it is held for a handful of dict
-- operations and never across a yield. The expiry is reckoned from the
-- worker's clock made current first: nginx's cached time lags by as long
-- as the worker's last turn of work, and an expiry counted from a stale
-- clock can already be past for the other workers, letting two in at once
-- (two read-modify-writes of the worker list lose one, and its sockets go
-- uncounted). Waiting for it sleeps a millisecond at a time, so it needs a
-- context that may sleep (a timer, a request handler).
--
-- Keys are `<key>:...`; `key` defaults to host, port and user, so pools of
-- one account share their limits. The dict needs a few KB plus 64 bytes per
-- window slot: `lua_shared_dict smtppool 1m;` fits thousands.
-- @module smtppool.limits.shdict

local core = require("smtppool.core")
local errors = require("smtppool.errors")

local ngx = ngx -- luacheck: ignore (set by nginx)

local M = {}

local LOCK_TTL = 1
local LEASE = 30 -- seconds a worker's slot count outlives it
local RENEW = 10 -- seconds between lease renewals
local WANT_TTL = 1

local B = {}
B.__index = B

-- Pools of this worker given a backend so far: each one's slot count is
-- its own key (a count per worker would be overwritten by its other pools).
local made = 0

function B:_lock()
  local d, k = self.dict, self.p .. "lock"
  for i = 1, 5000 do
    ngx.update_time()
    local ok, err = d:add(k, true, LOCK_TTL)
    if ok then return true end
    if err ~= "exists" then error("smtppool.limits.shdict: cannot take the lock: " .. tostring(err)) end
    if i > 3 then ngx.sleep(0.001) end
  end
  -- 5 s without the lock: a holder cannot keep it past LOCK_TTL, so the
  -- dict itself is failing.
  error("smtppool.limits.shdict: the lock was not free for 5 s")
end

function B:_unlock()
  self.dict:delete(self.p .. "lock")
end

-- Seconds until window w allows one more event (0: now).
function B:_wait(w, now)
  local d = self.dict
  local n = d:get(w.key .. "n") or 0
  if n < w.limit then return 0 end
  local oldest = d:get(w.key .. (d:get(w.key .. "h") or 0)) or 0
  local t = oldest + w.per - now
  return t > 0 and t or 0
end

function B:_spend(w, now)
  local d = self.dict
  local n = d:get(w.key .. "n") or 0
  local h = d:get(w.key .. "h") or 0
  if n < w.limit then
    d:set(w.key .. ((h + n) % w.limit), now)
    d:set(w.key .. "n", n + 1)
  else
    d:set(w.key .. h, now)
    d:set(w.key .. "h", (h + 1) % w.limit)
  end
end

function B:take(names, now)
  local ws = {}
  for _, name in ipairs(names) do
    if self.windows[name] then ws[#ws + 1] = self.windows[name] end
  end
  if #ws == 0 then return 0 end
  self:_lock()
  local wait = 0
  for _, w in ipairs(ws) do
    local x = self:_wait(w, now)
    if x > wait then wait = x end
  end
  if wait <= 0 then
    for _, w in ipairs(ws) do self:_spend(w, now) end
  end
  self:_unlock()
  return wait
end

-- The live holders (pools) and their total slots (under the lock).
function B:_holders()
  local d = self.dict
  local keep, total = {}, 0
  for pid in (d:get(self.p .. "workers") or ""):gmatch("%S+") do
    local c = d:get(self.p .. "open:" .. pid)
    if c then
      total = total + c
      keep[#keep + 1] = pid
    end
  end
  return keep, total
end

function B:_record(now)
  local d = self.dict
  d:set(self.p .. "open:" .. self.pid, self.mine, LEASE)
  local keep = self:_holders()
  local listed = false
  for _, pid in ipairs(keep) do
    if pid == self.pid then listed = true end
  end
  if not listed then keep[#keep + 1] = self.pid end
  d:set(self.p .. "workers", table.concat(keep, " "))
  self.renewed = now
end

function B:conn_acquire(now, limit)
  self:_lock()
  local _, total = self:_holders()
  local ok = total < (limit or self.max_conns)
  if ok then
    self.mine = self.mine + 1
    self:_record(now)
  else
    self.dict:set(self.p .. "want", self.pid, WANT_TTL)
  end
  self:_unlock()
  return ok
end

function B:conn_release()
  self:_lock()
  self.mine = math.max(0, self.mine - 1)
  self:_record(core.now())
  self:_unlock()
end

function B:contended()
  local w = self.dict:get(self.p .. "want")
  return w ~= nil and w ~= self.pid
end

function B.failure() end

function B:refresh(now)
  if self.mine > 0 and now - (self.renewed or 0) >= RENEW then
    self:_lock()
    self:_record(now)
    self:_unlock()
  end
end

function B:cap()
  return self.dict:get(self.p .. "cap")
end

function B:publish_cap(n, ttl)
  self:_lock()
  local cur = self.dict:get(self.p .. "cap")
  if not cur or n < cur then self.dict:set(self.p .. "cap", n, ttl) end
  self:_unlock()
end

function B:learned(name)
  return self.dict:get(self.p .. "learned:" .. name)
end

function B:publish_learned(name, n, ttl)
  if n then self.dict:set(self.p .. "learned:" .. name, n, ttl) else self.dict:delete(self.p .. "learned:" .. name) end
end

--- Sockets open now across every worker (stats).
function B:open_total()
  local total = 0
  for pid in (self.dict:get(self.p .. "workers") or ""):gmatch("%S+") do
    total = total + (self.dict:get(self.p .. "open:" .. pid) or 0)
  end
  return total
end

--- A backend constructor for `smtppool.limits.from_options`.
-- @tparam string dict_name the `lua_shared_dict` to use
-- @tparam string key the prefix of this account's keys
-- @return `function(specs, opts) -> backend | nil, err`
function M.backend(dict_name, key)
  return function(specs, opts)
    local dict = ngx.shared[dict_name]
    if not dict then
      return nil, errors.new("config", ("lua_shared_dict '%s' is not declared in nginx.conf"):format(dict_name))
    end
    local p = key .. ":"
    local windows = {}
    for name, s in pairs(specs) do
      -- the window's shape is in its keys: a reload with other numbers starts afresh
      windows[name] = { limit = s.limit, per = s.per, key = ("%sw:%s:%d/%g:"):format(p, name, s.limit, s.per) }
    end
    made = made + 1
    return setmetatable({ name = "shared_dict", dict = dict, p = p, windows = windows,
                          max_conns = opts.max_conns or 1, mine = 0, pid = ngx.worker.pid() .. "-" .. made }, B)
  end
end

return M
