--- The loop: one wait on the network for several tasks.
--
-- A task is a coroutine (a pool's `send_batch`, a relay's share of a
-- spread batch). When a task running on a loop waits (the scheduler's wait
-- goes through `smtppool.loop.wait`), it yields its connections, timeout
-- and file descriptors to the loop instead of waiting itself; the loop
-- makes one `driver.wait` over every task's connections and fds, with the
-- nearest of their deadlines, and resumes each task whose connections have
-- events, whose fds are readable or whose deadline has come, with its own
-- entries (connection indexes as in the list it gave).
--
--     local loop = require("smtppool.engine.loop")
--     local l = loop.new(require("smtppool.driver.native"))
--     l:spawn(function() return pool_a:send_batch(list_a) end)
--     l:spawn(function() return pool_b:send_batch(list_b) end)
--     local failure = l:run() -- nil, or the first error a task raised
--
-- A wait made outside any loop (a plain `send_batch`) goes to the driver
-- directly. Native driver only: in nginx every pool's agent is a light
-- thread of its own and the cosockets are nginx's loop.
-- @module smtppool.engine.loop

local M = {}

local Loop = {}
Loop.__index = Loop

-- coroutine -> the loop it runs on (weak: a finished task is forgotten)
local running = setmetatable({}, { __mode = "k" })
-- what a task yields for a side wait (one fd, e.g. a Redis reply)
local SIDE = {}

--- A loop over a driver (`wait`, `now`).
-- @tparam table driver
-- @treturn table the loop
function M.new(driver)
  if type(driver) ~= "table" or type(driver.wait) ~= "function" or type(driver.now) ~= "function" then
    error("loop.new: a driver with wait and now is needed", 2)
  end
  return setmetatable({ driver = driver, tasks = {} }, Loop)
end

--- Adds a task: `fn(...)` runs as a coroutine on this loop from `run`.
-- @tparam function fn
-- @return the task (a table; `task.done`, `task.ok`, `task.result` or
--   `task.err` once it ended)
function Loop:spawn(fn, ...)
  if type(fn) ~= "function" then error("loop:spawn: a function is needed", 2) end
  local args = table.pack and table.pack(...) or { n = select("#", ...), ... }
  local task = { co = coroutine.create(function() return fn((table.unpack or unpack)(args, 1, args.n)) end) } -- luacheck: ignore
  running[task.co] = self
  self.tasks[#self.tasks + 1] = task
  return task
end

--- Waits as the driver's `wait` does: on the running task's loop when there
-- is one (the task yields), else on the driver itself.
-- @tparam table driver the caller's driver
-- @tparam table handles connections
-- @tparam number timeout seconds (negative: no limit)
-- @tparam[opt] table fds file descriptors whose readability wakes the wait
-- @tparam[opt] function live the caller's connections open now (a list of
--   handles): what the loop serves while the task waits aside (`wait_fd`)
-- @return the driver's entries
function M.wait(driver, handles, timeout, fds, live)
  local co = coroutine.running()
  if co and running[co] then return coroutine.yield(handles, timeout, fds, live) end
  return driver.wait(handles, timeout, fds)
end

--- Whether the running coroutine is a task of a loop.
function M.in_task()
  local co = coroutine.running()
  return co ~= nil and running[co] ~= nil
end

--- Waits until one of fds is ready or timeout seconds pass. On a loop, the
-- task yields and the loop goes on serving every connection, this task's
-- own included: their bytes move, and the events they bring are kept for
-- the task's next wait. Outside a loop, the driver waits on the fds alone.
-- @tparam table fds file descriptors, each waited on until readable, or
--   given as `-(fd + 1)` until writable (a socket still connecting), as the
--   native driver's `wait` takes them
-- @tparam number timeout seconds
-- @tparam[opt] table driver (default: the native one)
function M.wait_fds(fds, timeout, driver)
  if M.in_task() then return coroutine.yield(SIDE, timeout, fds) end
  return (driver or require("smtppool.driver.native")).wait({}, timeout, fds)
end

--- Waits until fd is readable (as `wait_fds` with one fd).
-- @tparam number fd
-- @tparam number timeout seconds
-- @tparam[opt] table driver (default: the native one)
function M.wait_fd(fd, timeout, driver)
  return M.wait_fds({ fd }, timeout, driver)
end

--- Sleeps: the running task waits aside (as `wait_fd`, with no fd): the
-- loop goes on serving every connection, this task's own included, and
-- their events are kept for the task's next wait on them (a sleep is not
-- that wait: events handed to it would be lost). Outside a loop, a wait on
-- the driver with no connections.
-- @tparam number seconds
-- @tparam[opt] table driver (default: the native one)
function M.sleep(seconds, driver)
  if M.in_task() then return coroutine.yield(SIDE, seconds, {}) end
  return (driver or require("smtppool.driver.native")).wait({}, seconds)
end

--- Runs fn(...) as the one task of a new loop over driver (unless the
-- caller is a task already: then fn runs as it is) and returns what it
-- returns; its error is raised. What a pool whose waits are not all on its
-- sockets (limits in Redis) runs its batches on.
function M.run(driver, fn, ...)
  if M.in_task() then return fn(...) end
  local l = M.new(driver)
  local res
  local args = { n = select("#", ...), ... }
  l:spawn(function() res = { fn((table.unpack or unpack)(args, 1, args.n)) } end) -- luacheck: ignore
  local failure = l:run()
  if failure ~= nil then error(failure, 0) end
  return (table.unpack or unpack)(res) -- luacheck: ignore
end

local function resume(self, task, ...)
  local ok, list, timeout, fds, live = coroutine.resume(task.co, ...)
  if not ok then
    task.done, task.ok, task.err = true, false, list
    self.failure = self.failure or list
  elseif coroutine.status(task.co) == "dead" then
    task.done, task.ok, task.result = true, true, list
  elseif list == SIDE then
    -- its connections open now stay served; their events wait for it
    task.side, task.side_fds = true, fds
    task.list = task.live and task.live() or {}
  else
    task.side, task.side_fds = false, nil
    task.list, task.fds, task.live = list or {}, fds, live
  end
  if not task.done then
    task.due = (timeout and timeout >= 0) and self.driver.now() + timeout or nil
  end
end

-- The events kept for a task while it waited aside, as entries of the list
-- it waits on now (its connections' order may have changed; one it no
-- longer waits on was closed meanwhile: its events are of no use).
local function take_stash(task)
  local out = {}
  for _, entry in ipairs(task.stash) do
    for i, c in ipairs(task.list) do
      if c == entry.handle then
        entry.conn, entry.handle = i, nil
        out[#out + 1] = entry
        break
      end
    end
  end
  task.stash = nil
  return out
end

--- Runs every task to its end, tasks spawned meanwhile included.
-- @treturn[1] nil every task ended without an error
-- @return[2] the first error a task raised (the others still ran to their end)
function Loop:run()
  local started = 0
  self.failure = nil
  while true do
    while started < #self.tasks do
      started = started + 1
      resume(self, self.tasks[started])
    end
    -- a task back from a side wait with events kept for it goes on at once
    local again = false
    for _, task in ipairs(self.tasks) do
      if not task.done and not task.side and task.stash then
        local entries = take_stash(task)
        if #entries > 0 then
          resume(self, task, entries)
          again = true
        end
      end
    end
    local all, owner, index, live, fds = {}, {}, {}, {}, {}
    local due
    for _, task in ipairs(self.tasks) do
      if not task.done then
        live[#live + 1] = task
        for _, fd in ipairs((task.side and task.side_fds or task.fds) or {}) do fds[#fds + 1] = fd end
        for i, c in ipairs(task.list) do
          all[#all + 1] = c
          owner[#all] = task
          index[#all] = i
        end
        if task.due and (not due or task.due < due) then due = task.due end
      end
    end
    if #live == 0 then return self.failure end
    local t = self.driver.now()
    local ready, fd_ready = self.driver.wait(all, again and 0 or (due and math.max(0, due - t) or -1),
      #fds > 0 and fds or nil)
    local got = {}
    for _, entry in ipairs(ready) do
      local task = owner[entry.conn]
      if task.side then -- kept for its next wait
        entry.handle = task.list[index[entry.conn]]
        task.stash = task.stash or {}
        task.stash[#task.stash + 1] = entry
      else
        entry.conn = index[entry.conn]
        got[task] = got[task] or {}
        table.insert(got[task], entry)
      end
    end
    t = self.driver.now()
    for _, task in ipairs(live) do
      local woken = false
      for _, fd in ipairs((task.side and task.side_fds or task.fds) or {}) do
        woken = woken or (fd_ready and fd_ready[fd]) or false
      end
      if task.side then
        if woken or (task.due and task.due <= t) then resume(self, task) end
      elseif got[task] or woken or (task.due and task.due <= t) then
        resume(self, task, got[task] or {}, fd_ready)
      end
    end
  end
end

return M
