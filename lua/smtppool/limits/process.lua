--- Where a pool's account limits live: one interface, several backends.
--
-- A provider's limits belong to the account, not to one process. The
-- scheduler asks a limits backend, never a window directly:
--
-- * `take(names, now)`: spends one event in each of the named windows
--   (`"connections"`, `"auth"`, `"messages"`; names without a configured
--   window are skipped) if every one of them allows it, all or none, and
--   returns 0; otherwise spends nothing and returns the seconds until they
--   could. Atomic across everything sharing the backend.
-- * `conn_acquire(now[, limit])` / `conn_release()`: a slot among
--   `max_conns` sockets open at once (or `limit`, a lower ceiling learned
--   from the server). In one process the pool counts its own; a shared
--   backend counts every process's.
-- * `contended(now)`: true when another process waited for a slot in the
--   last second (a pool then QUITs its idle connections rather than hold
--   them).
-- * `cap()` / `publish_cap(n, ttl)`: a session cap learned by any process,
--   forgotten after `ttl` seconds.
-- * `learned(name)` / `publish_learned(name, n, ttl)`: another limit learned
--   from the server (`"conns"`: concurrent connections), the latest any
--   process published (a cut or a probe upward), until `ttl`; `n = nil`
--   forgets it.
-- * `refresh(now)`: renews what this process holds (a shared backend's
--   leases); called on every turn of the pool's loop, cheap when not due.
-- * `failure()`: a `config` error once when the backend cannot work as
--   configured (Redis refused the login), then nil until it happens again;
--   the pool fails the call's queue with it instead of pausing.
-- * `name`: `"process"`, `"shared_dict"`, `"redis"`.
--
-- Backends: this module's (in one process; the default), `smtppool.limits.shdict`
-- (every worker of one nginx, through a `lua_shared_dict`) and
-- `smtppool.limits.redis` (every process and machine using one Redis).
-- @module smtppool.limits.process

local rate = require("smtppool.limits.windows")
local errors = require("smtppool.errors")

local M = {}

local Local = {}
Local.__index = Local

--- The in-process backend over `rate` windows (see `smtppool.limits.windows`).
-- @tparam table windows name -> window, from `smtppool.rate.from_options`
function M.process(windows)
  return setmetatable({ name = "process", windows = windows }, Local)
end

function Local:take(names, now)
  local wait = 0
  for _, n in ipairs(names) do
    local w = self.windows[n]
    if w then
      local x = w:wait_time(now)
      if x > wait then wait = x end
    end
  end
  if wait > 0 then return wait end
  for _, n in ipairs(names) do
    local w = self.windows[n]
    if w then w:spend(now) end
  end
  return 0
end

function Local.conn_acquire() return true end
function Local.conn_release() end
function Local.contended() return false end
function Local.cap() return nil end
function Local.publish_cap() end
function Local.learned() return nil end
function Local.publish_learned() end
function Local.refresh() end
function Local.failure() end

--- The limits a pool's options ask for: `rate` windows, in `shared` when
-- given, or in Redis when `rate.backend` names it.
-- @tparam table opts the pool's options (`rate`, and `max_conns` for shared backends)
-- @param[opt] shared a backend constructor `function(specs, opts)` (specs: name
--   -> `{limit, per}`), e.g. `smtppool.shdict.backend(...)`
-- @tparam[opt] table driver the driver the pool runs on (Redis goes over its `redis_connect`)
-- @return a backend, or nil and a `config` error
function M.from_options(opts, shared, driver)
  local windows = rate.from_options(opts.rate)
  local r = opts.rate
  if r and (r.backend ~= nil or r.key ~= nil) then
    -- rate = { backend = "redis://host:port/db", key = "acct1", ... }
    if shared then
      return nil, errors.new("config", "rate.backend and shared_dict both name where the limits live: choose one")
    end
    if type(r.key) ~= "string" or not r.key:match("^[%w._:-]+$") then
      return nil, errors.new("config", "rate.key must name the account (letters, digits, . _ : -)")
    end
    local url, uerr = require("smtppool.limits.redis").parse_url(r.backend)
    if not url then return nil, errors.new("config", "rate.backend: " .. uerr) end
    shared = require("smtppool.limits.redis").backend(url, r.key, opts.on_event, driver, opts.dns_servers)
  end
  if not shared then return M.process(windows) end
  local specs = {}
  for name, w in pairs(windows) do specs[name] = { limit = w.limit, per = w.per } end
  return shared(specs, opts)
end

return M
