--- The pool inside nginx (OpenResty, `libnginx-mod-http-lua`).
--
-- The same pool as `smtppool.new` (options, errors, events, retry
-- policies, rotation, learned caps, LIMITS, DKIM, composition), carried by
-- cosockets (`smtppool.driver.ngx`) and run by one agent per worker: a
-- background timer that owns the connections. Request handlers hand it
-- messages and wait for their outcome, or queue them and return at once.
-- Connections stay open across requests, up to the caps in force; one in a
-- doubtful state is never reused.
--
--     -- nginx.conf: lua_shared_dict smtppool 1m;
--     -- init_worker_by_lua_block:
--     mail = require("smtppool.ngx").new{ host = "smtp.example.net", auth = {...},
--       shared_dict = "smtppool", max_conns = 4, max_messages_per_conn = 5,
--       rate = { connections_per_min = 300, auth_per_min = 120 } }
--     -- content_by_lua_block:
--     local res, err = mail:send{ from = "a@example.org", to = "b@example.net",
--                                 subject = "Hi", text = "Hello" }
--
-- With `shared_dict`, the account's limits hold across every worker of the
-- nginx (see `smtppool.limits.shdict`): the rate windows, `max_conns` (sockets
-- open across the whole nginx) and the learned cap. Without it each worker
-- keeps its own, as separate processes would.
--
-- A worker that exits (reload, `nginx -s quit`) keeps sending what it holds
-- for up to `exit_timeout` seconds, then ends the rest `cancelled` (never
-- sent, safe to send again); every message gets an outcome.
--
-- With `outbox = "redis://..."`, `enqueue` stores the message in Redis and
-- returns its id; every worker's agent delivers the outbox (see
-- `smtppool.outbox`), and an exiting worker gives back at once what it
-- claimed and had not started.
-- @api smtppool.ngx

local smtppool = require("smtppool")
local errors = require("smtppool.errors")
local options = require("smtppool.options")
local prepare = require("smtppool.compose.prepare")
local policy = require("smtppool.engine.policy")
local driver = require("smtppool.driver.ngx")
local shdict = require("smtppool.limits.shdict")
local outbox = require("smtppool.outbox")
local semaphore = require("ngx.semaphore")

local ngx = ngx -- luacheck: ignore (set by nginx)

local M = { _VERSION = smtppool._VERSION }

-- The options only this module takes, on top of `smtppool.new`'s.
local SCHEMA = { shared_dict = "string", shared_key = "string", queue_size = "number",
                 on_result = "function", exit_timeout = "number" }

local P = {}
P.__index = P

-- The agent's own options, checked: queue_size, exit_timeout.
local function agent_options(opts, level)
  local qs = opts.queue_size or 1000
  if not options.finite(qs) or qs < 1 or qs ~= math.floor(qs) then
    error("smtppool.new: option 'queue_size' must be a positive integer", level + 1)
  end
  local et = opts.exit_timeout or 10
  if not options.finite(et) or et < 0 then
    error("smtppool.new: option 'exit_timeout' must be a non-negative number", level + 1)
  end
  return qs, et
end

-- A route's pool on the agent's driver, from this module's options
-- (checked): the pool of `new`, or one relay's.
local function build_on(opts, drv)
  local base = {}
  for k, v in pairs(opts) do
    if not SCHEMA[k] then base[k] = v end
  end
  local shared
  if opts.shared_dict then
    local key = opts.shared_key or ("smtppool:%s:%s:%s"):format(opts.host, tostring(opts.port or ""),
      opts.auth and opts.auth.user or "")
    shared = shdict.backend(opts.shared_dict, key)
  end
  if opts.proxy then
    return nil, errors.new("config", "proxy: nginx's cosockets connect directly; a proxy is for the native "
      .. "driver (smtppool.new)")
  end
  local pool, err = smtppool.build(base, drv, shared)
  if not pool then return nil, err end
  return pool, base, shared
end

-- The pool object requests use: an agent over `pool` (a pool, or a group
-- of relays' routes) on driver drv.
local function with_agent(pool, drv, qs, et, on_result)
  local p = setmetatable({
    pool = pool, drv = drv, queue = {}, head = 1, tail = 0,
    queue_size = qs, exit_timeout = et, on_result = on_result, running = false, closed = false,
  }, P)
  -- with an outbox the agent runs from the start: it delivers what any
  -- worker (or another nginx) stored
  if pool.outbox then p:_start() end
  return p
end

--- Creates a pool for this worker. Call it where each worker runs it
-- (`init_worker_by_lua*`, or lazily in a handler); the agent starts with the
-- first message. No connection opens until a message needs one.
-- @tparam table opts every option of `smtppool.new`, and:
--
-- * `shared_dict` (string): a `lua_shared_dict` holding the limits every
--   worker shares (rate windows, `max_conns` across the nginx, the learned
--   cap). Without it, limits are per worker.
-- * `shared_key` (string, default host, port and user): the account's name
--   in the dict; pools with the same key share limits.
-- * `queue_size` (default 1000): messages waiting for the agent; past it,
--   `enqueue` and `send` fail at once with kind `busy`.
-- * `on_result` (function): `function(msg, res, err)` for messages given to
--   `enqueue` (runs in the agent: keep it short, no blocking I/O). Without
--   it, each such message that fails is logged at `warn`.
-- * `exit_timeout` (seconds, default 10): how long an exiting worker keeps
--   sending what it holds.
--
-- In nginx, certificates are verified against `lua_ssl_trusted_certificate`;
-- `ca_file`, `ca_path`, `cert_file` and `key_file` are `config` errors.
-- @treturn[1] table the pool
-- @return[2] nil
-- @treturn[2] table error value (kind `config`)
function M.new(opts)
  options.check(opts, SCHEMA)
  local qs, et = agent_options(opts, 2)
  local drv = driver.new()
  local pool, base, shared = build_on(opts, drv)
  if not pool then return nil, base end
  local p = with_agent(pool, drv, qs, et, opts.on_result)
  p.base, p.shared = base, shared -- for verify, on a connection of its own
  return p
end

local R = {}
R.__index = R

--- Several relays with failover, as `smtppool.relays` (each entry the
-- options of this module's `new` plus `name` and `weight`): a relay that
-- cannot be reached, fails TLS or refuses the login is skipped for
-- `down_for` seconds; outcomes name their relay. The relays are routes of
-- one agent: one scheduler over every relay's connections. `opts` also
-- takes the agent's `queue_size`, `exit_timeout` and `on_result`.
-- @treturn[1] table the group: `send`, `send_raw`, `send_batch` (as this
--   module's pool's), `status`, `close`
-- @return[2] nil
-- @treturn[2] table error value (kind `config`)
function M.relays(list, opts)
  if opts ~= nil and type(opts) ~= "table" then error("smtppool.relays: opts must be a table", 2) end
  local gopts, own = {}, {}
  for k, v in pairs(opts or {}) do
    if SCHEMA[k] then own[k] = v else gopts[k] = v end
  end
  if own.on_result ~= nil and type(own.on_result) ~= "function" then
    error("smtppool.relays: on_result must be a function", 2)
  end
  local qs, et = agent_options(own, 2)
  local drv = driver.new()
  local group, err = require("smtppool.engine.relays").new(list, gopts, function(o)
    options.check(o, SCHEMA)
    return build_on(o, drv)
  end)
  if not group then return nil, err end
  return setmetatable({ agent = with_agent(group, drv, qs, et, own.on_result), group = group }, R)
end

--- Sends one message through a relay (as this module's `Pool:send`).
function R:send(msg) return self.agent:send(msg) end
--- Sends one ready-made message (as `Pool:send_raw`).
function R:send_raw(msg) return self.agent:send_raw(msg) end
--- Sends many messages (as `Pool:send_batch`), each outcome with `relay`.
function R:send_batch(source, opts) return self.agent:send_batch(source, opts) end
--- The relays' names and state: one `{name, up, stats}` per relay.
function R:status() return self.group:status() end
--- Stops taking messages; the agent sends what it holds, then QUITs.
function R:close() return self.agent:close() end

-- ===== the agent =====

function P:_len() return self.tail - self.head + 1 end

function P:_pop()
  if self.head > self.tail then return nil end
  local e = self.queue[self.head]
  self.queue[self.head] = nil
  self.head = self.head + 1
  return e
end

-- An outcome goes to the request waiting for it, or to on_result.
function P:_deliver(entry, res, err)
  local w = entry.waiter
  if w then
    w.res, w.err, w.done = res, err, true
    w.sem:post(1)
    return
  end
  if self.on_result then
    local ok, e = pcall(self.on_result, entry.msg, res, err)
    if not ok then ngx.log(ngx.ERR, "smtppool: on_result raised: ", tostring(e)) end
  elseif err then
    local to = entry.msg and entry.msg.to
    ngx.log(ngx.WARN, "smtppool: a queued message to ", type(to) == "table" and table.concat(to, ", ")
      or tostring(to), " failed: ", tostring(err))
  end
end

local function agent(premature, self)
  local pool = self.pool
  local exit_started
  local function leaving() return self.closed or premature or ngx.worker.exiting() end
  -- The outbox's messages come after the ones requests wait for; an
  -- exiting worker claims no more and gives back at once what it claimed
  -- and had not started.
  local box = pool.outbox
  local run = box and box:runner(pool, { on_result = self.on_result,
    log = function(m) ngx.log(ngx.ERR, m) end })
  local from_box = box and box:source(outbox.claim_size(pool.cfg.max_conns), { stop = leaving })
  local paused_until = 0
  local function source()
    local e = self:_pop()
    if e then
      e.item.user_msg = e
      return e.item
    end
    if run and run.misconfigured then
      -- the relay refused the configuration: the message went back; the
      -- outbox waits rather than claim and return in a loop
      ngx.log(ngx.ERR, "smtppool: outbox delivery paused for 30 s: ", tostring(run.misconfigured))
      paused_until, run.misconfigured = self.drv.now() + 30, nil
    end
    if from_box and self.drv.now() >= paused_until then
      local item = from_box()
      if item then return item end
      if item == nil then from_box = nil end
    end
    if leaving() then return nil end
    return false
  end
  local function should_stop()
    if not (premature or ngx.worker.exiting()) then return false end
    exit_started = exit_started or self.drv.now()
    return self.drv.now() - exit_started >= self.exit_timeout
  end
  local function on_result(entry, res, e)
    if run and run.on_result(entry, res, e) then return end
    self:_deliver(entry, res, e)
  end
  local ok, err = pcall(pool.run_items, pool, source, on_result, { poll = box and 0.25 or 1,
    should_stop = should_stop, retry = run and run.retry, mark_async = run and run.mark_async,
    mark_many = run and run.mark_many,
    before_wait = run and run.before_wait })
  if not ok then ngx.log(ngx.ERR, "smtppool: the sending agent failed: ", tostring(err)) end
  if box and box.give_back then pcall(box.give_back) end
  if box then pcall(box.settle, box) end
  -- Closing the connections yields: a request may hand a message in
  -- meanwhile, and finds the agent still running. So the agent stops
  -- running first, then ends what it holds (no yield between the two), and
  -- a message handed in later starts a new agent or is refused at once.
  self:_cancel_all() -- the waiting requests answer before the connections close
  pcall(pool.close_connections, pool)
  self.running = false
  self:_cancel_all()
end

-- Ends every queued message `cancelled` (the loop no longer takes them).
-- Runs without yielding (on_result must not block), so nothing can slip in
-- between the last check and the end.
function P:_cancel_all()
  while true do
    local e = self:_pop()
    if not e then break end
    self:_deliver(e, nil, errors.new("cancelled", "not sent: the nginx worker is exiting or the pool closed",
      { attempts = 0 }))
  end
end

-- Starts the agent unless it runs.
function P:_start()
  if self.running then return true end
  -- an exiting worker starts no agent: its timers would be premature
  if ngx.worker.exiting() then
    return nil, errors.new("cancelled", "not sent: the nginx worker is exiting", { attempts = 0 })
  end
  local ok, err = ngx.timer.at(0, agent, self)
  if not ok then
    return nil, errors.new("cancelled", "not sent: cannot start the sending agent: " .. tostring(err),
      { attempts = 0 })
  end
  self.running = true
  return true
end

-- Hands a prepared item to the agent, starting it if needed.
function P:_submit(item, waiter)
  if self.closed then return nil, errors.new("config", "the pool is closed") end
  if self:_len() >= self.queue_size then
    return nil, errors.new("busy", ("the sending queue is full (queue_size %d): nothing was queued")
      :format(self.queue_size), { attempts = 0 })
  end
  local ok, err = self:_start()
  if not ok then return nil, err end
  self.tail = self.tail + 1
  self.queue[self.tail] = { item = item, waiter = waiter, msg = item.user_msg or item.msg }
  self.drv.wake()
  return true
end

-- Hands an item over and waits for its outcome.
function P:_send_wait(item)
  local w = { sem = semaphore.new(0) }
  local ok, err = self:_submit(item, w)
  if not ok then return nil, err end
  -- The agent gives every message an outcome; the bound only guards a
  -- worker that is killed.
  while not w.done do
    w.sem:wait(3600)
  end
  return w.res, w.err
end

-- ===== public API =====

--- Composes and sends one message, waiting for its outcome (as
-- `Pool:send`). Must run where nginx lets Lua wait (a request handler, a
-- timer).
function P:send(msg)
  if type(msg) ~= "table" then error("send: message must be a table, got " .. type(msg), 2) end
  if msg.data ~= nil then error("send: 'data' is for send_raw; send composes the message itself", 2) end
  return self:_send_wait(prepare.prepare_composed(msg, self.pool.prep))
end

--- Sends one ready-made message, waiting for its outcome (as `Pool:send_raw`).
function P:send_raw(msg)
  return self:_send_wait(prepare.prepare(msg, "send_raw", 3, self.pool.prep))
end

--- Queues a message and returns at once (fire and forget): one with `data`
-- is sent as it is, any other is composed. Its outcome goes to the
-- `on_result` option (or the error log when it fails).
--
-- With the `outbox` option the message is stored in Redis before this
-- returns its id, and any worker of any nginx (or `smtppool worker
-- --outbox`) delivers it once; a reload or a crash loses nothing (see
-- `smtppool.outbox`). Without it the message waits in this worker's memory.
-- @treturn[1] string|boolean the message's id (with `outbox`; for
--   `outcome`), or true (queued in memory)
-- @return[2] nil
-- @treturn[2] table error value: kind `invalid` (cannot be composed),
--   `busy` (the queue, or `outbox_max`, is full), `config` (the pool is
--   closed; Redis refused the login or keeps nothing on disk),
--   `connection` (Redis cannot be reached within `outbox_timeout`),
--   `cancelled` (the worker is exiting; in memory only)
function P:enqueue(msg)
  if type(msg) ~= "table" then error("enqueue: message must be a table, got " .. type(msg), 2) end
  if self.pool.outbox then
    if self.closed then return nil, errors.new("config", "the pool is closed") end
    local id, err = self.pool:enqueue(msg)
    if id then
      if not self.running then self:_start() end
      self.drv.wake()
    end
    return id, err
  end
  return self:_submit(prepare.item(msg, self.pool.prep))
end

--- A message's outcome by the id `enqueue` gave (with `outbox`; from any
-- worker): as `Pool:outcome`.
function P:outcome(id)
  return self.pool:outcome(id)
end

--- Sends many messages and waits for all of them (as `Pool:send_batch`:
-- `on_result`, `should_stop`, and `poll` for a source that may answer
-- `false`, "nothing now"; `mark` is for campaigns, not available here).
-- Messages are handed over as the queue has room.
function P:send_batch(source, opts)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("send_batch: source must be an array or an iterator function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("send_batch: opts must be a table", 2) end
  opts = opts or {}
  for _, k in ipairs({ "on_result", "should_stop" }) do
    if opts[k] ~= nil and type(opts[k]) ~= "function" then error("send_batch: " .. k .. " must be a function", 2) end
  end
  if opts.mark ~= nil then error("send_batch: mark (campaign journals) is not available in nginx", 2) end
  if self.closed then error("send_batch: the pool is closed", 2) end
  local i = 0
  local nextm = type(source) == "table" and function()
    i = i + 1
    return source[i]
  end or source
  local summary, account = policy.summary(opts.on_result)
  local done = {}
  local sem = semaphore.new(0)
  local inflight, exhausted, stopped = 0, false, false
  local window = math.max(1, math.floor(self.queue_size / 2))
  local poll = opts.poll or 0.05
  while true do
    local idle = false
    while not exhausted and not stopped and inflight < window do
      if opts.should_stop and opts.should_stop() then
        stopped = true
        break
      end
      local m = nextm()
      if m == nil then
        exhausted = true
        break
      end
      if m == false then -- nothing now: ask again within poll seconds
        idle = true
        break
      end
      local item = prepare.item(m, self.pool.prep)
      local w = { sem = sem, msg = m }
      local ok, err = self:_submit(item, w)
      if ok then
        inflight = inflight + 1
        done[#done + 1] = w
      else
        account(m, nil, err)
      end
    end
    if inflight == 0 and not idle then break end
    sem:wait(idle and poll or 3600)
    -- outcomes in completion order
    local j = 1
    while j <= #done do
      local w = done[j]
      if w.done then
        table.remove(done, j)
        inflight = inflight - 1
        account(w.msg, w.res, w.err)
      else
        j = j + 1
      end
    end
  end
  return summary
end

--- Checks the configuration against the server (as `Pool:verify`), on a
-- connection of its own in the calling request.
function P:verify()
  if self.closed then return nil, errors.new("config", "the pool is closed") end
  local p, err = smtppool.build(self.base, driver.new(), self.shared)
  if not p then return nil, err end
  local res, verr = p:verify()
  p:close()
  return res, verr
end

--- This worker's counters (as `Pool:stats`), plus `queued` (waiting for
-- the agent) and, with `shared_dict`, `open_total` (sockets open across
-- every worker).
function P:stats()
  local s = self.pool:stats()
  s.queued = self:_len()
  return s
end

--- The counters in Prometheus text format (as `Pool:metrics`; this worker's).
function P:metrics(prefix, labels)
  return self.pool:metrics(prefix, labels)
end

--- Stops taking messages; the agent sends what it holds, then QUITs its
-- connections. Safe to call twice.
function P:close()
  self.closed = true
  self.drv.wake()
  return true
end

return M
