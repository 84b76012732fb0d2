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
--
-- With `spread = true`, messages are shared among the relays that are up in
-- proportion to each relay's `weight` (smooth weighted round robin, as
-- nginx spreads requests over an upstream's servers), failover still
-- applying; a batch then runs every relay's connections at once, in one
-- loop (the native driver) or in light threads (nginx).
-- @module smtppool.engine.relays

local errors = require("smtppool.errors")
local loop = require("smtppool.engine.loop")
local policy = require("smtppool.engine.policy")
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

--- Makes a group of relays.
-- @tparam table list an array of relays, each the options of `smtppool.new`
--   plus `name` (default `"relay<i>"`), or `{ name = ..., pool = an existing pool }`
-- @tparam[opt] table opts `down_for` (seconds a relay that failed is
--   skipped, default 60); `spread` (boolean, default false): share messages
--   among the relays that are up in proportion to their `weight`, instead
--   of sending everything through the first one up
--   (each relay's `weight` is a positive number, default 1; a relay's
--   share is its weight over the sum of the weights of the relays up)
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
  if opts.spread ~= nil and type(opts.spread) ~= "boolean" then
    error("smtppool.relays: spread must be a boolean", 2)
  end
  local relays = {}
  for i, r in ipairs(list) do
    if type(r) ~= "table" then error("smtppool.relays: relay " .. i .. " must be a table", 2) end
    local name = r.name or ("relay" .. i)
    local weight = r.weight == nil and 1 or r.weight
    if type(weight) ~= "number" or not (weight > 0 and weight < math.huge) then
      error(("smtppool.relays: relay '%s': weight must be a positive number"):format(name), 2)
    end
    local pool = r.pool
    if not pool then
      local o = {}
      for k, v in pairs(r) do if k ~= "name" and k ~= "weight" then o[k] = v end end
      local ok, p, e = pcall(new, o)
      if not ok then error(("smtppool.relays: relay '%s': %s"):format(name, tostring(p):gsub("^smtppool.new: ", "")), 2) end
      if not p then return nil, errors.new("config", ("relay '%s': %s"):format(name, e.text), e) end
      pool = p
    end
    relays[i] = { name = name, pool = pool, down_until = 0, weight = weight, current = 0 }
  end
  return setmetatable({ relays = relays, down_for = down_for, now = opts.now or os.time,
                        spread = opts.spread or false }, Relays)
end

local function tag(name, res, err)
  if res then res.relay = name else err.relay = name end
  return res, err
end

-- Smooth weighted round robin (nginx's): every candidate gains its weight,
-- the one with the most goes and pays back the sum. Over any run of picks
-- each relay's share stays within one message of its weight's share.
local function pick(candidates)
  local total, best = 0, nil
  for _, r in ipairs(candidates) do
    r.current = r.current + r.weight
    total = total + r.weight
    if not best or r.current > best.current then best = r end
  end
  if best then best.current = best.current - total end
  return best
end

-- The relays to try, up ones first (in order, or with `spread` the weighted
-- pick first), then the ones marked down.
function Relays:_order()
  local t, up, down = self.now(), {}, {}
  for _, r in ipairs(self.relays) do
    if r.down_until <= t then up[#up + 1] = r else down[#down + 1] = r end
  end
  if self.spread and #up > 1 then
    local first = pick(up)
    for i, r in ipairs(up) do
      if r == first then table.remove(up, i) break end
    end
    table.insert(up, 1, first)
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
--
-- With `spread`, every relay up sends at once, each its weighted share;
-- a message a relay could not carry for a relay-level reason goes to another
-- relay that has not tried it, and the relay takes no more of the batch.
-- `should_stop` is honoured by every relay.
function Relays:send_batch(source, opts)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("send_batch: source must be an array or an iterator function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("send_batch: opts must be a table", 2) end
  if self.spread then return self:_spread_batch(source, opts or {}) end
  local summary, account = policy.summary(opts and opts.on_result)
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
      account(m, res, err)
    end })
    if relay_down then r.down_until = self.now() + self.down_for end
    if #next_round == 0 then break end
    pending = next_round
  end
  return summary
end

-- ===== spread batches =====

-- How many messages a relay may have assigned and not yet taken: the
-- weighted share is kept within this many messages, so a slow relay holds
-- the others back rather than let its share drift.
local BACKLOG = 64
-- How often a relay with nothing to do asks again (a message moved to it
-- from a relay that went down, or the batch's end).
local POLL = 0.05

-- The shared state of one spread batch: the source, each relay's assigned
-- messages, and the messages moved off a relay that went down.
local function batch_state(self, source, opts)
  local t = self.now()
  local active = {}
  for _, r in ipairs(self.relays) do
    if r.down_until <= t then active[#active + 1] = r end
  end
  if #active == 0 then for i, r in ipairs(self.relays) do active[i] = r end end
  local st = { active = active, backlog = {}, outstanding = {}, stopped = {}, moved = {}, tried = {}, why = {}, finished = {},
               ended = {}, -- relays whose pool's send_batch has returned
               exhausted = false }
  st.summary, st.account = policy.summary(opts.on_result)
  for _, r in ipairs(active) do
    st.backlog[r] = {}
    st.outstanding[r] = 0
  end
  local i = 0
  st.pull = type(source) == "table" and function()
    i = i + 1
    return source[i]
  end or source
  st.should_stop = opts.should_stop
  return st
end

local function running(st)
  local out = {}
  for _, r in ipairs(st.active) do
    if not st.stopped[r] and not st.finished[r] then out[#out + 1] = r end
  end
  return out
end

-- The next message for relay r: nil when it has nothing more to do (the
-- batch is over for it), false for "nothing now".
local function next_for(st, r)
  if st.stopped[r] then return nil end
  if st.raised then -- a callback raised: nothing more is taken (what is left ends cancelled)
    st.finished[r] = true
    return nil
  end
  for i, e in ipairs(st.moved) do
    if not st.tried[e][r] then
      table.remove(st.moved, i)
      st.outstanding[r] = st.outstanding[r] + 1
      return e
    end
  end
  local mine = st.backlog[r]
  if #mine == 0 and not st.exhausted then
    local candidates = running(st)
    while #mine == 0 do
      if st.should_stop and st.should_stop() then st.exhausted = true break end
      local ok, m = pcall(st.pull)
      if not ok then -- the source raised: no relay takes more; the pool asking gets the error
        st.raised = true
        error(m, 0)
      end
      if m == nil then st.exhausted = true break end
      local to = pick(candidates)
      local q = st.backlog[to]
      q[#q + 1] = m
      st.tried[m] = st.tried[m] or {}
      if #q >= BACKLOG and to ~= r then break end
    end
  end
  if #mine > 0 then
    st.outstanding[r] = st.outstanding[r] + 1
    return table.remove(mine, 1)
  end
  -- Nothing assigned: done unless another relay may still move a message
  -- here (one still running with messages in flight or assigned, even a
  -- relay gone down).
  if #st.moved > 0 then return false end
  for other, n in pairs(st.outstanding) do
    if other ~= r and not st.ended[other] and (n > 0 or #st.backlog[other] > 0) then return false end
  end
  st.finished[r] = true
  return nil
end

local function report(st, r, m, res, err)
  st.tried[m] = nil
  st.why[m] = nil
  tag(r.name, res, err)
  -- a callback that raises stops the whole batch taking new messages (the
  -- error goes on up through the pool that called it)
  local ok, e = pcall(st.account, m, res, err)
  if not ok then
    st.raised = true
    error(e, 0)
  end
end

-- Moved messages no running relay may still try end with the failure that
-- moved them.
local function settle(st)
  local live = running(st)
  local i = 1
  while i <= #st.moved do
    local m = st.moved[i]
    local open = false
    for _, r in ipairs(live) do
      if not st.tried[m][r] then open = true break end
    end
    if open then
      i = i + 1
    else
      table.remove(st.moved, i)
      local why = st.why[m]
      report(st, why.relay, m, nil, why.err)
    end
  end
end

-- A relay went down for this batch (err says why): what was assigned to it
-- and not taken yet moves on.
local function stop_relay(self, st, r, err)
  if st.stopped[r] then return end
  st.stopped[r] = true
  r.down_until = self.now() + self.down_for
  local untried = errors.annotate(err, "not tried: relay '" .. r.name .. "' went down")
  untried.attempts = 0
  for _, m in ipairs(st.backlog[r]) do
    st.moved[#st.moved + 1] = m
    st.why[m] = { relay = r, err = untried }
  end
  st.backlog[r] = {}
end

-- One relay's outcome for m: reported, or moved to a relay that has not
-- tried it when the relay itself failed.
local function outcome(self, st, r, m, res, err)
  st.outstanding[r] = st.outstanding[r] - 1
  if not res and relay_failure(err) then
    stop_relay(self, st, r, err)
    st.tried[m] = st.tried[m] or {}
    st.tried[m][r] = true
    st.why[m] = { relay = r, err = err }
    st.moved[#st.moved + 1] = m
    settle(st)
    return
  end
  report(st, r, m, res, err)
end

-- Runs every relay's send_batch at once. Native pools run as tasks of one
-- loop (`smtppool.engine.loop`): each pool's wait yields its connections, timeout
-- and fds to it, and one wait serves them all. In nginx each relay gets a
-- light thread.
function Relays:_spread_batch(source, opts)
  local st = batch_state(self, source, opts)
  local function batch_opts(r)
    return { poll = POLL, on_result = function(m, res, err) outcome(self, st, r, m, res, err) end,
             should_stop = opts.should_stop }
  end
  local function source_for(r)
    return function() return next_for(st, r) end
  end
  local native = true
  for _, r in ipairs(st.active) do
    -- (smtppool.ngx's pools have no driver_name: they run in light threads)
    if not (type(r.pool.driver_name) == "function" and r.pool:driver_name() == "native") then native = false end
  end
  local failure
  if native then
    failure = self:_mux(st, source_for, batch_opts)
  else
    local ngx = rawget(_G, "ngx")
    if not (ngx and ngx.thread) then
      error("smtppool.relays: a spread batch runs on pools of smtppool.new or, in nginx, of smtppool.ngx.new", 3)
    end
    local threads = {}
    for i, r in ipairs(st.active) do
      threads[i] = ngx.thread.spawn(function()
        local ok, e = pcall(r.pool.send_batch, r.pool, source_for(r), batch_opts(r))
        st.ended[r] = true
        if not ok then error(e, 0) end
      end)
    end
    for _, th in ipairs(threads) do
      local ok, e = ngx.thread.wait(th)
      if not ok then failure = failure or e end
    end
  end
  -- What no pool took (the batch was stopped, or a callback raised): every
  -- message taken from the source still gets its one outcome.
  for _, r in ipairs(st.active) do
    for _, m in ipairs(st.backlog[r]) do
      report(st, r, m, nil, errors.new("cancelled", scheduler.CANCELLED, { attempts = 0 }))
    end
    st.backlog[r] = {}
  end
  for _, m in ipairs(st.moved) do
    local why = st.why[m]
    report(st, why.relay, m, nil, why.err)
  end
  st.moved = {}
  if failure then error(failure, 0) end
  return st.summary
end

-- Every native relay's share as a task of one loop (smtppool.engine.loop): one
-- wait on the network serves them all.
function Relays:_mux(st, source_for, batch_opts)
  local l = loop.new(require("smtppool.driver.native"))
  for _, r in ipairs(st.active) do
    l:spawn(function()
      local ok, e = pcall(r.pool.send_batch, r.pool, source_for(r), batch_opts(r))
      st.ended[r] = true -- the others may take what it has not
      if not ok then error(e, 0) end
    end)
  end
  return l:run()
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
