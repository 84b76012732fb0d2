--- Sliding-window rate limits.
--
-- A window allows at most `limit` events in any `per` seconds: it keeps the
-- times of the last `limit` events, so the rule holds for every window, not
-- just aligned ones (a token bucket would allow a burst of twice the limit
-- across a refill). Time comes from the caller (a monotonic clock).
-- @module smtppool.limits.windows

local M = {}

local Window = {}
Window.__index = Window

--- A window of `limit` events per `per` seconds.
-- @tparam number limit events allowed in any window (a positive integer)
-- @tparam number per window length in seconds
-- @tparam string name for events and errors (`"connections"`...)
function M.window(limit, per, name)
  return setmetatable({ limit = limit, per = per, name = name, times = {}, head = 1, n = 0 }, Window)
end

--- Seconds until one more event is allowed (0 when it is allowed now).
function Window:wait_time(now)
  if self.n < self.limit then return 0 end
  local oldest = self.times[self.head]
  local t = oldest + self.per - now
  return t > 0 and t or 0
end

--- Records one event at `now` (call only when `wait_time(now) == 0`).
function Window:spend(now)
  if self.n < self.limit then
    self.n = self.n + 1
    self.times[(self.head + self.n - 2) % self.limit + 1] = now
  else
    self.times[self.head] = now
    self.head = self.head % self.limit + 1
  end
end

--- The margin a window of `per` seconds is kept with: 1 % of it, at least
-- 20 ms. The pool counts an event when it starts it; the server sees it a
-- little later, later by more or less (a handshake, a busy scheduler), so
-- two events `per` apart at the pool can arrive less than `per` apart.
-- Measured: a `{10, 1}` AUTH window across four processes showed 11 logins
-- within one second at the server without it (arrival jitter under 10 ms).
function M.margin(per) return math.max(0.02, per * 0.01) end

--- Builds the pool's windows from its `rate` option.
-- Each limit is a number per the unit its name gives, or `{limit, per_seconds}`
-- for another window length: `connections_per_min = 300`,
-- `auth_per_min = 120`, `messages_per_sec = 10` (also `_per_min`, `_per_hour`,
-- `_per_day`), or `connections = {3, 2}`.
-- @treturn table name -> window; raises on misuse
function M.from_options(rate)
  local spec = {
    connections_per_min = { "connections", 60 }, auth_per_min = { "auth", 60 },
    messages_per_sec = { "messages", 1 }, messages_per_min = { "messages", 60 },
    messages_per_hour = { "messages", 3600 }, messages_per_day = { "messages", 86400 },
    connections = { "connections" }, auth = { "auth" }, messages = { "messages" },
  }
  local out = {}
  for k, v in pairs(rate or {}) do
    -- backend and key say where the windows live (smtppool.limits.process)
    if k ~= "backend" and k ~= "key" then
      local s = spec[k]
      if not s then error(("smtppool.new: unknown rate limit '%s'"):format(tostring(k)), 4) end
      local limit, per = v, s[2]
      if type(v) == "table" then limit, per = v[1], v[2] end
      -- Written so that NaN and the infinities fail (NaN compares false with anything).
      if type(limit) ~= "number" or not (limit >= 1 and limit < 2^31) or limit ~= math.floor(limit)
        or type(per) ~= "number" or not (per > 0 and per < math.huge) then
        error(("smtppool.new: rate limit '%s' must be a positive integer%s"):format(k,
          s[2] and "" or " pair {limit, per_seconds}"), 4)
      end
      if out[s[1]] then error(("smtppool.new: rate limit for %s given twice"):format(s[1]), 4) end
      out[s[1]] = M.window(limit, per + M.margin(per), s[1])
    end
  end
  return out
end

return M
