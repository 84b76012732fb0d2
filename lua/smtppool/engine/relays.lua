--- Several relays with failover: a message goes to the first relay that is
-- up; when a relay cannot be reached, refuses its TLS or its login, the
-- message moves to the next one (a failure of the message itself, such as
-- a 550 for a recipient, does not move it). A relay that failed that way is
-- skipped for `down_for` seconds. Every outcome says which relay carried
-- the message (`relay`, on the result or the error).
--
--     local relays = smtppool.relays{
--       { name = "primary", host = "smtp1.example.net", auth = {...} },
--       { name = "backup", host = "smtp2.example.net", auth = {...} },
--     }
--     local res, err = relays:send{ from = ..., to = ..., subject = ..., text = ... }
--     relays:close()
--
-- With `spread = true`, messages are shared among the relays that are up in
-- proportion to each relay's `weight` (smooth weighted round robin, as
-- nginx spreads requests over an upstream's servers), failover still
-- applying.
--
-- The relays are routes of one scheduler (`smtppool.engine.scheduler`'s
-- `run_routes`), as OpenSMTPD's mta holds its routes: each route keeps its
-- own connections, limits, learned caps, TLS sessions and credentials (a
-- pool), one loop waits on every route's connections, and the router here
-- places each message on a route and moves it when its route fails. A
-- message is prepared (composed, DKIM-signed) once, before a route is
-- chosen: every relay of a group signs alike (the same `dkim`, or none).
-- @module smtppool.engine.relays

local errors = require("smtppool.errors")
local loop = require("smtppool.engine.loop")
local scheduler = require("smtppool.engine.scheduler")

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

-- A value as one string, keys sorted: two relays' dkim options compared.
local function canon(v)
  if type(v) ~= "table" then return type(v) .. ":" .. tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = tostring(k) .. "=" .. canon(v[k]) end
  return "{" .. table.concat(out, ",") .. "}"
end

--- Makes a group of relays.
-- @tparam table list an array of relays, each the options of `smtppool.new`
--   plus `name` (default `"relay<i>"`) and `weight`, or `{ name = ..., pool =
--   an existing pool }`; every relay signs alike (the same `dkim`, or none)
-- @tparam[opt] table opts `down_for` (seconds a relay that failed is
--   skipped, default 60); `spread` (boolean, default false): share messages
--   among the relays that are up in proportion to their `weight`, instead
--   of sending everything through the first one up
--   (each relay's `weight` is a positive number, default 1; a relay's
--   share is its weight over the sum of the weights of the relays up)
-- @tparam[opt] function new the route constructor (default `smtppool.new`;
--   `smtppool.ngx.relays` gives one that builds on nginx's cosockets)
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
  if opts.spread ~= nil and type(opts.spread) ~= "boolean" then
    error("smtppool.relays: spread must be a boolean", 2)
  end
  local relays, routes = {}, {}
  local signing
  for i, r in ipairs(list) do
    if type(r) ~= "table" then error("smtppool.relays: relay " .. i .. " must be a table", 2) end
    local name = r.name or ("relay" .. i)
    local weight = r.weight == nil and 1 or r.weight
    if type(weight) ~= "number" or not (weight > 0 and weight < math.huge) then
      error(("smtppool.relays: relay '%s': weight must be a positive number"):format(name), 2)
    end
    local pool = r.pool
    local dkim = pool and pool.opts and pool.opts.dkim or r.dkim
    if i == 1 then
      signing = canon(dkim)
    elseif canon(dkim) ~= signing then
      error(("smtppool.relays: relay '%s' signs otherwise than relay '%s': a message is signed once, before a "
        .. "relay is chosen; give every relay the same dkim (or none)"):format(name, relays[1].name), 2)
    end
    if not pool then
      local o = {}
      for k, v in pairs(r) do if k ~= "name" and k ~= "weight" then o[k] = v end end
      local ok, p, e = pcall(new, o)
      if not ok then error(("smtppool.relays: relay '%s': %s"):format(name, tostring(p):gsub("^smtppool.new: ", "")), 2) end
      if not p then return nil, errors.new("config", ("relay '%s': %s"):format(name, e.text), e) end
      pool = p
    end
    if pool.outbox then
      error(("smtppool.relays: relay '%s': an outbox belongs to a pool, not to one relay of a group"):format(name), 2)
    end
    if routes[1] and pool.driver.name ~= routes[1].driver.name then
      error(("smtppool.relays: relay '%s' runs on another driver than relay '%s'"):format(name, relays[1].name), 2)
    end
    relays[i] = { name = name, pool = pool, down_until = 0, weight = weight, current = 0 }
    routes[i] = pool
  end
  local first = routes[1]
  local max_conns = 0
  for _, p in ipairs(routes) do max_conns = max_conns + p.cfg.max_conns end
  return setmetatable({ relays = relays, routes = routes, down_for = down_for, now = opts.now or os.time,
                        spread = opts.spread or false, driver = first.driver, prep = first.prep,
                        cfg = { sign_threads = first.cfg.sign_threads, max_conns = max_conns },
                        closed = false }, Relays)
end

local function tag(name, res, err)
  if res then res.relay = name else err.relay = name end
  return res, err
end

-- Smooth weighted round robin (nginx's): every candidate gains its weight,
-- the one with the most goes and pays back the sum. Over any run of picks
-- each relay's share stays within one message of its weight's share.
local function pick(lanes)
  local total, best = 0, nil
  for _, lane in ipairs(lanes) do
    local r = lane.relay
    r.current = r.current + r.weight
    total = total + r.weight
    if not best or r.current > best.relay.current then best = lane end
  end
  if best then best.relay.current = best.relay.current - total end
  return best
end

-- ===== the router: which route a message takes =====

-- With several routes, how many messages one may hold assigned and not
-- started while another wants more: the weighted share is kept within
-- this, so a slow relay holds the others back rather than let its share
-- drift.
local BACKLOG = 64

local Router = {}
Router.__index = Router

-- The lanes (each route's share of the run, `smtppool.engine.scheduler`)
-- of this run, each with its relay.
function Router:start(lanes)
  self.lanes = lanes
  for i, lane in ipairs(lanes) do lane.relay = self.g.relays[i] end
end

-- The route for a message that has not tried the lanes in `tried`: one
-- still running in this run, the relays up first; the weighted pick with
-- `spread`, else the first in order. nil when none is left.
function Router:_choose(tried)
  local t = self.g.now()
  if not self.g.spread then -- the first up, else the first at all (no list made: this runs per message)
    local first
    for _, lane in ipairs(self.lanes) do
      if not lane.stopped and not (tried and tried[lane]) then
        if lane.relay.down_until <= t then return lane end
        first = first or lane
      end
    end
    return first
  end
  local up, down = {}, {}
  for _, lane in ipairs(self.lanes) do
    if not lane.stopped and not (tried and tried[lane]) then
      if lane.relay.down_until <= t then up[#up + 1] = lane else down[#down + 1] = lane end
    end
  end
  local cands = #up > 0 and up or down
  if #cands == 0 then return nil end
  return #cands > 1 and pick(cands) or cands[1]
end

-- Whether the run should take another message: the route the next one
-- would take wants more (with spread: some route does, and none holds
-- BACKLOG waiting). With every route stopped, the rest is taken to end.
-- (lane.ahead: how many the lane's route pulls ahead, set by the scheduler.)
function Router:wants()
  local want, running = false, false
  for _, lane in ipairs(self.lanes) do
    if not lane.stopped then
      running = true
      local ahead = lane.ahead
      if self.g.spread then
        if #lane.queue >= math.max(BACKLOG, ahead) then return false end
        if #lane.queue < ahead then want = true end
      end
    end
  end
  if not running then return true end
  if self.g.spread then return want end
  local lane = self:_choose(nil)
  return #lane.queue < lane.ahead
end

-- A new message's route. When every route has failed in this run, the
-- message ends untried with the last failure.
function Router:take(item)
  local lane = self:_choose(nil)
  if lane then return lane, item end
  local last = self.last
  if item.err then return last.lane, item end
  local e = errors.annotate(last.err, "not tried: every relay is down")
  e.attempts = 0
  return last.lane, { msg = item.msg, to = item.to, user_msg = item.user_msg, err = e }
end

-- Puts a job on a route it has not tried, as if new there; false when none is left.
function Router:_move(job, t)
  local to = self:_choose(job.tried)
  if not to then return false end
  local cfg = to.route.cfg
  job.attempts, job.free_moves, job.not_before, job.seq = 0, 0, nil, nil
  job.queued_at, job.timeout = t, cfg.message_timeout
  job.deadline = cfg.message_timeout and t + cfg.message_timeout
  job.lane = to
  table.insert(to.queue, 1, job)
  return true
end

-- A message's final failure on lane: when it is the relay's (it could not
-- be reached, refused TLS or the login), the relay is marked down, takes
-- nothing more in this run, and what it held moves on with the message.
-- Returns whether the message moved (its outcome is still to come), and
-- the jobs the lane held that no relay is left for, each with the error
-- it ends with (the scheduler ends them).
function Router:reroute(lane, job, err, t)
  if not relay_failure(err) or lane.batch.stopping then return false end
  local g = self.g
  local ended
  if not lane.stopped then
    lane.stopped = true
    lane.relay.down_until = g.now() + g.down_for
    self.last = { lane = lane, err = err }
    local held = {}
    for _, list in ipairs({ lane.queue, lane.deferred }) do
      while #list > 0 do held[#held + 1] = table.remove(list, 1) end
    end
    for _, j in ipairs(held) do
      j.tried = j.tried or {}
      j.tried[lane] = true
      if not self:_move(j, t) then
        -- no relay left for it: it ends with the failure, untried
        j.attempts = 0
        ended = ended or {}
        ended[#ended + 1] = { j, errors.annotate(err, "not tried: relay '" .. lane.relay.name .. "' went down") }
      end
    end
  end
  job.tried = job.tried or {}
  job.tried[lane] = true
  return self:_move(job, t), ended
end

-- ===== the group: what a pool does, over routes =====

--- The loop over every relay's route (what `send`, `send_raw`,
-- `send_batch` and an nginx agent run on): as `Pool:run`, each outcome with
-- `relay` set.
function Relays:run(next_msg, on_result, opts)
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.router = setmetatable({ g = self }, Router)
  local function tagged(m, res, err, job)
    tag(job.lane.relay.name, res, err)
    return on_result(m, res, err, job)
  end
  return scheduler.run_routes(self, self.routes, next_msg, tagged, o)
end

--- Runs prepared items through the routes (as `Pool:run_items`: `retry`
-- and `on_event` of opts for these items only, on every route).
function Relays:run_items(next_item, on_result, opts)
  local saved = {}
  for i, p in ipairs(self.routes) do
    saved[i] = { p.batch_retry, p.batch_on_event }
    p.batch_retry, p.batch_on_event = opts and opts.retry, opts and opts.on_event
  end
  local ok, e = pcall(self._on_loop, self, self.run, self, next_item, on_result, opts)
  for i, p in ipairs(self.routes) do p.batch_retry, p.batch_on_event = saved[i][1], saved[i][2] end
  if not ok then error(e, 0) end
end

-- On a loop when a route waits on more than its sockets (limits in Redis).
function Relays:_on_loop(fn, ...)
  if self.driver.name == "native" then
    for _, p in ipairs(self.routes) do
      if p.limits.name == "redis" then return loop.run(self.driver, fn, ...) end
    end
  end
  return fn(...)
end

--- QUITs every route's idle connections and closes the rest (as
-- `Pool:close_connections`).
function Relays:close_connections()
  for _, p in ipairs(self.routes) do p:close_connections() end
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
  self.closed = true
  for _, r in ipairs(self.relays) do r.pool:close() end
  return true
end

--- Gives the group the pool's sending methods (`send`, `send_raw`,
-- `send_batch`: the same checks, preparation and signing threads, here
-- over the routes). `Pool` is the pool's method table.
function M.adopt(Pool)
  for _, k in ipairs({ "send", "send_raw", "send_batch", "_send_one" }) do Relays[k] = Pool[k] end
end

--- Sends one message through the first relay that takes it (as `Pool:send`).
-- @function Relays:send

--- Sends one ready-made message (as `Pool:send_raw`).
-- @function Relays:send_raw

--- Sends many messages (as `Pool:send_batch`): each through a relay that
-- is up (the first, or with `spread` by weight; with `spread` every relay
-- up sends at once); a message whose relay could not carry it for a
-- relay-level reason goes to a relay that has not tried it, and that relay
-- takes no more of the batch. `on_result` is called once per message,
-- with `relay` set.
-- @function Relays:send_batch

return M
