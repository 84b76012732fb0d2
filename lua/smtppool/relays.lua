--- Several relays with failover: a message goes to the first relay that is
-- up; when a relay cannot be reached, refuses its TLS or its login, the
-- message moves to the next one (a failure of the message itself, such as
-- a 550 for a recipient, does not move it). A relay that failed that way is
-- skipped for `down_for` seconds. Each relay is a pool of its own, with its
-- own limits, learned caps and TLS sessions; every outcome says which relay
-- carried the message (`relay`, on the result or the error).
--
--     local relays = smtppool.relays{
--       { name = "primary", host = "smtp1.example.net", auth = {...} },
--       { name = "backup", host = "smtp2.example.net", auth = {...} },
--     }
--     local res, err = relays:send{ from = ..., to = ..., subject = ..., text = ... }
--     relays:close()
-- @module smtppool.relays

local errors = require("smtppool.errors")

local M = {}

local Relays = {}
Relays.__index = Relays

-- A failure that says the relay, not the message, is the problem.
local function relay_failure(err)
  if not err then return false end
  if err.kind == "tls" or err.kind == "auth" or err.kind == "config" then return true end
  if err.kind == "connection" then
    local ph = err.phase
    return ph == nil or ph == "connect" or ph == "greeting" or ph == "ehlo" or ph == "starttls" or ph == "auth"
  end
  return false
end
M.relay_failure = relay_failure

--- Makes a group of relays.
-- @tparam table list an array of relays, each the options of `smtppool.new`
--   plus `name` (default `"relay<i>"`), or `{ name = ..., pool = an existing pool }`
-- @tparam[opt] table opts `down_for` (seconds a relay that failed is
--   skipped, default 60)
-- @tparam[opt] function new the pool constructor (default `smtppool.new`;
--   `smtppool.ngx.new` in nginx)
-- @treturn[1] table the group
-- @return[2] nil
-- @treturn[2] table a `config` error naming the relay
function M.new(list, opts, new)
  if type(list) ~= "table" or #list == 0 then error("smtppool.relays: give an array of relays", 2) end
  opts = opts or {}
  local down_for = opts.down_for or 60
  if type(down_for) ~= "number" or not (down_for >= 0 and down_for < math.huge) then
    error("smtppool.relays: down_for must be a finite number of seconds", 2)
  end
  local relays = {}
  for i, r in ipairs(list) do
    if type(r) ~= "table" then error("smtppool.relays: relay " .. i .. " must be a table", 2) end
    local name = r.name or ("relay" .. i)
    local pool = r.pool
    if not pool then
      local o = {}
      for k, v in pairs(r) do if k ~= "name" then o[k] = v end end
      local ok, p, e = pcall(new, o)
      if not ok then error(("smtppool.relays: relay '%s': %s"):format(name, tostring(p):gsub("^smtppool.new: ", "")), 2) end
      if not p then return nil, errors.new("config", ("relay '%s': %s"):format(name, e.text), e) end
      pool = p
    end
    relays[i] = { name = name, pool = pool, down_until = 0 }
  end
  return setmetatable({ relays = relays, down_for = down_for, now = opts.now or os.time }, Relays)
end

local function tag(name, res, err)
  if res then res.relay = name else err.relay = name end
  return res, err
end

-- The relays to try, up ones first (in order), then the ones marked down.
function Relays:_order()
  local t, up, down = self.now(), {}, {}
  for _, r in ipairs(self.relays) do
    if r.down_until <= t then up[#up + 1] = r else down[#down + 1] = r end
  end
  for _, r in ipairs(down) do up[#up + 1] = r end
  return up
end

function Relays:_one(method, msg)
  local res, err
  for _, r in ipairs(self:_order()) do
    res, err = r.pool[method](r.pool, msg)
    if res or not relay_failure(err) then return tag(r.name, res, err) end
    r.down_until = self.now() + self.down_for
    tag(r.name, nil, err)
  end
  return nil, err
end

--- Sends one message through the first relay that takes it (as `Pool:send`).
function Relays:send(msg) return self:_one("send", msg) end

--- Sends one ready-made message (as `Pool:send_raw`).
function Relays:send_raw(msg) return self:_one("send_raw", msg) end

--- Sends many messages (as `Pool:send_batch`): through the first relay up;
-- the messages it could not carry for a relay-level reason go on to the
-- next, and so on. `on_result` is called once per message, with `relay` set.
function Relays:send_batch(source, opts)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("send_batch: source must be an array or an iterator function", 2)
  end
  local on_result = opts and opts.on_result
  local summary = { sent = 0, failed = 0, cancelled = 0, total = 0 }
  local order = self:_order()
  local pending = source
  for i, r in ipairs(order) do
    local next_round = {}
    local last = i == #order
    local relay_down = false
    r.pool:send_batch(pending, { on_result = function(m, res, err)
      if not res and not last and relay_failure(err) then
        relay_down = true
        next_round[#next_round + 1] = m
        return
      end
      tag(r.name, res, err)
      summary.total = summary.total + 1
      if res then summary.sent = summary.sent + 1
      elseif err.kind == "cancelled" then summary.cancelled = summary.cancelled + 1
      else summary.failed = summary.failed + 1 end
      if on_result then on_result(m, res, err) end
    end })
    if relay_down then r.down_until = self.now() + self.down_for end
    if #next_round == 0 then break end
    pending = next_round
  end
  return summary
end

--- The relays' names and state: one `{name, up, stats}` per relay.
function Relays:status()
  local t, out = self.now(), {}
  for i, r in ipairs(self.relays) do
    out[i] = { name = r.name, up = r.down_until <= t, stats = r.pool:stats() }
  end
  return out
end

--- Closes every relay's pool.
function Relays:close()
  for _, r in ipairs(self.relays) do r.pool:close() end
  return true
end

return M
