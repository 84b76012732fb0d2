--- A small Redis client: one connection, its state kept, the transport
-- given by the driver.
--
--     local client = require("smtppool.redis.client")
--     local c = assert(client.new("redis://:secret@127.0.0.1:6379/2"))
--     assert(c:connect())
--     c:call("SET", "k", "v")              --> "OK"
--     c:pipeline({ { "GET", "k" }, { "INCR", "n" } })  --> { "v", 1 }
--     c:script("bump", "return redis.call('INCR', KEYS[1])", { "n" }, {})
--     c:close()
--
-- Its surface is lua-resty-redis's (connect, call, pipeline, close). The
-- limits backend (`smtppool.limits.redis`) and the campaign journal in Redis
-- (`smtppool.campaign.redis`) each hold one; neither reaches into the other.
--
-- * **Values**: a status or bulk string is a string, an integer a number,
--   an array a table, a nil reply `false`. An error reply is `nil`, the
--   error (`"redis: ERR ..."`) and `true` (the server answered), so a
--   caller can tell a refused command from an unreachable server
--   (`nil, err` with no third value; the connection is then dropped and
--   the next call makes a new one).
-- * **Connecting**: on first use, and after a failure: the password
--   (`AUTH`) and the database (`SELECT`) are sent first; an error never
--   shows the password.
-- * **Transport**: `driver.redis_connect(host, port, timeout)` gives a
--   connection with `call(...)`, `pipeline(cmds)` and `close()` (the native
--   driver's is in C; nginx's a cosocket). A driver whose connections
--   belong to the light thread that made them (`redis_per_thread`, nginx)
--   gets a connection for each call made from another thread.
-- * **On a loop** (`smtppool.engine.loop`: a pool's batch running as its task), a
--   native connection does not block: the task waits for the reply's bytes
--   on the loop, which meanwhile serves every SMTP connection (a Redis that
--   hangs pauses the Redis work, not the sockets). Elsewhere a call blocks
--   for at most `timeout` seconds.
-- * **Misuse** raises: a call after `close()`, a command that is not a
--   non-empty list of strings and numbers.
-- @module smtppool.redis.client

local core = require("smtppool.core")
local loop = require("smtppool.engine.loop")
local urls = require("smtppool.url")

local M = {}

local C = {}
C.__index = C

--- Whether a failure's `why` (the third value of `call`, `script`,
-- `pipeline`, `connect`) is the configuration's: a refused login
-- (`"login"`) or a refused TLS handshake (`"tls"`: the certificate, its
-- name, the CA given). Every try would fail alike; an outage would not.
-- @param why
-- @treturn boolean
function M.misconfigured(why) return why == "login" or why == "tls" end

--- Whether a string names a Redis server (a `redis://` or `rediss://`
-- URL): the one test every module and the command line make.
-- @param s anything
-- @treturn boolean
function M.is_url(s)
  return type(s) == "string" and (s:sub(1, 8) == "redis://" or s:sub(1, 9) == "rediss://")
end

-- The URL for errors and logs: without its password (`redis://secret@host`
-- included: a userinfo without ':' is a password).
local function redact(url) return urls.redact(url, "password") end
M.redact = redact

-- What a rediss:// URL's query may say about its TLS.
local TLS_PARAMS = { ca_file = true, ca_path = true, server_name = true, insecure_skip_verify = true }

--- Parses `redis://[[user]:password@]host[:port][/db]` (and `rediss://`,
-- TLS), as managed Redis services hand them out: a user (Redis 6 ACLs;
-- `AUTH user password`), or a password alone (`redis://:secret@host`);
-- both percent-decoded. A host may be an IPv6 literal in brackets. A
-- `rediss://` URL verifies the server's certificate against the system
-- store, or `?ca_file=/path` (`ca_path`), for the host's name or
-- `server_name=`; only `insecure_skip_verify=true` turns that off.
-- @treturn[1] table `host`, `port`, `db`, `user`, `password`, `tls` (a
--   table for rediss://: `ca_file`, `ca_path`, `server_name`,
--   `insecure_skip_verify`)
-- @return[2] nil
-- @treturn[2] string why (never with the password)
function M.parse_url(url)
  if type(url) ~= "string" then return nil, "the backend must be a redis:// or rediss:// URL" end
  if not M.is_url(url) then
    return nil, "the backend must be a redis:// or rediss:// URL, got " .. redact(url)
  end
  local tls = url:sub(1, 9) == "rediss://" and {} or nil
  local rest, query = url:sub(tls and 10 or 9), nil
  rest, query = rest:match("^([^?]*)%??(.*)$")
  for pair in query:gmatch("[^&]+") do
    local k, v = pair:match("^([%w_]+)=(.*)$")
    if not k or not TLS_PARAMS[k] or not tls then
      return nil, ("unknown URL parameter '%s' (rediss:// takes ca_file, ca_path, server_name, "
        .. "insecure_skip_verify) in %s"):format(k or pair, redact(url))
    end
    v = urls.unescape(v)
    if not v then return nil, "a bad %-escape in " .. redact(url) end
    if k == "insecure_skip_verify" then
      if v ~= "true" and v ~= "false" then return nil, "insecure_skip_verify must be true or false" end
      v = v == "true"
    end
    tls[k] = v
  end
  -- redis://secret@host: a password alone, as before ACLs
  local user, password, hostpart = urls.userinfo(rest, "password")
  if not hostpart then return nil, "a bad %-escape in the credentials of " .. redact(url) end
  rest = hostpart
  local host, port, db = rest:match("^%[([%x:.]+)%]:?(%d*)/?(%d*)$")
  if not host then host, port, db = rest:match("^([^:/%[%]]+):?(%d*)/?(%d*)$") end
  if not host then return nil, "cannot read host, port and db from " .. redact(url) end
  return { host = host, port = tonumber(port) or 6379, db = tonumber(db) or 0, user = user, password = password,
           tls = tls }
end

--- A client (nothing is connected yet).
-- @param url a `redis://` URL or a table from `parse_url`
-- @tparam[opt] table opts `driver` (its `redis_connect` and
--   `redis_per_thread`; default: the native driver), `timeout` (seconds
--   for each connect and reply, default 2), `dns_servers` (`"ip[:port],..."`,
--   the name servers that resolve the host instead of the system's; native
--   driver: the name is looked up without blocking its loop), `keep` (default true; false:
--   a connection for each call, from the driver's pool when it keeps one:
--   for callers that are many short light threads, nginx's requests)
-- @treturn[1] table the client
-- @return[2] nil
-- @treturn[2] string why the URL is wrong
function M.new(url, opts)
  if type(url) ~= "table" then
    local u, e = M.parse_url(url)
    if not u then return nil, e end
    url = u
  end
  opts = opts or {}
  if opts.timeout ~= nil and (type(opts.timeout) ~= "number" or opts.timeout <= 0) then
    error("redis_client.new: timeout must be a positive number", 2)
  end
  if opts.dns_servers ~= nil and type(opts.dns_servers) ~= "string" then
    error("redis_client.new: dns_servers must be a string", 2)
  end
  local d = opts.driver or {}
  return setmetatable({ url = url, timeout = opts.timeout or 2, keep = opts.keep ~= false,
                        dns_servers = opts.dns_servers,
                        transport = d.redis_connect or require("smtppool.driver.native").redis_connect,
                        per_thread = d.redis_per_thread and true or false, wake = d.wake,
                        shas = {}, posted = {}, closed = false }, C)
end

-- One reply read without blocking the loop: the task waits on the socket.
local function read_on_loop(c, timeout)
  local deadline = core.now() + timeout
  while true do
    local ok, v = c:recv()
    if ok then return v end
    if v ~= nil then return nil, v end
    local left = deadline - core.now()
    if left <= 0 then
      c:close()
      return nil, "redis call: timed out"
    end
    local fd = c:fd()
    if not fd then return nil, "redis call: the connection is closed" end
    loop.wait_fd(fd, left)
  end
end

-- conn:call(...) and conn:pipeline(cmds), or their non-blocking forms on a loop.
local function conn_call(self, c, args)
  if c.recv and loop.in_task() then
    local sent, e = c:send((table.unpack or unpack)(args)) -- luacheck: ignore
    if not sent then return nil, e end
    return read_on_loop(c, self.timeout)
  end
  return c:call((table.unpack or unpack)(args)) -- luacheck: ignore
end

local function conn_pipeline(self, c, cmds)
  if c.recv and loop.in_task() then
    for _, cmd in ipairs(cmds) do
      local sent, e = c:send((table.unpack or unpack)(cmd)) -- luacheck: ignore
      if not sent then return nil, e end
    end
    local out = {}
    for i = 1, #cmds do
      local v, e = read_on_loop(c, self.timeout)
      if v == nil then return nil, e end
      out[i] = v
    end
    return out
  end
  return c:pipeline(cmds)
end

-- Write-behind: commands sent whose replies are still to be read.
local function conn_send(c, cmds)
  if c.send_many then return c:send_many(cmds) end
  for _, cmd in ipairs(cmds) do
    local sent, e = c:send((table.unpack or unpack)(cmd)) -- luacheck: ignore
    if not sent then return nil, e end
  end
  return true
end

local function conn_recv(self, c)
  if c.recv_one then return c:recv_one() end
  return read_on_loop(c, self.timeout)
end

-- Reads the replies of the posts on connection c, in order, and hands
-- each post its values once all are in (an error reply is a value:
-- `{err = ...}`): every post, waiting for them; or, with `ready`, only
-- what has arrived (a native connection's `recv` never waits), a post
-- read in part keeping what it got. On a failed read, this post and every
-- later one get `nil, err` (whether they ran is unknown) and the
-- connection is dropped.
-- @return true when no post waits any more; nil and why on a failure;
--   false (ready) while some still wait
function C:_read_posts(c, ready)
  while self.posted[1] do
    local p = self.posted[1]
    p.got = p.got or {}
    while #p.got < p.n do
      local v, e
      if ready then
        local ok
        ok, v = (c.take or c.recv)(c)
        if not ok then
          if v == nil then return false end -- nothing more yet
          e, v = v, nil
        end
      else
        v, e = conn_recv(self, c)
      end
      if v == nil then
        self:_drop(e)
        return nil, e
      end
      p.got[#p.got + 1] = v
    end
    table.remove(self.posted, 1)
    p.on_reply(p.got)
  end
  return true
end

-- The kept connection is gone: every post still unread fails.
function C:_drop(e)
  if self.c then pcall(self.c.close, self.c) end
  self.c, self.owner = nil, nil
  local posted = self.posted
  self.posted = {}
  for _, p in ipairs(posted) do p.on_reply(nil, tostring(e or "the connection was closed")) end
end

-- An error text without the password.
function C:_scrub(e)
  local pw = self.url.password
  e = tostring(e)
  if pw and pw ~= "" then e = e:gsub(pw:gsub("%p", "%%%0"), "***") end
  return e
end

-- Opens a transport connection, AUTH and SELECT done.
function C:_open()
  local u = self.url
  -- a driver whose connections belong to one light thread may keep them
  -- in a pool between threads (nginx's keepalive pool), named by all a
  -- connection was opened with: the server, database and user, the TLS
  -- name and verification, and the password (the driver names it by a
  -- digest), so a pool with another password or TLS name never takes a
  -- connection another logged in or verified
  local pool
  if self.per_thread then
    local t = u.tls
    pool = ("smtppool-redis:%s:%d:%d:%s:%s"):format(u.host, u.port, u.db, u.user or "",
      t and ("tls:" .. (t.server_name or "") .. (t.insecure_skip_verify and ":noverify" or "")) or "")
  end
  local c, err, refused = self.transport(u.host, u.port, self.timeout, u.tls, pool, u.password, self.dns_servers)
  if not c then return nil, self:_scrub(err), refused == "tls" and "tls" or nil end
  -- a transport that reads posts' replies behind (nginx's) says when one
  -- came: the driver's loop wakes to take it
  if c.take and self.wake then c.on_arrival = self.wake end
  if c.reused then return c end
  local function step(...)
    local v, e = conn_call(self, c, { ... })
    if v == nil then return nil, e end
    if type(v) == "table" and v.err then return nil, "redis: " .. v.err end
    return v
  end
  if u.password then
    local ok, e
    if u.user then ok, e = step("AUTH", u.user, u.password) else ok, e = step("AUTH", u.password) end
    if not ok then
      c:close()
      -- an answer (WRONGPASS, an unknown user): every try would get it
      if tostring(e):match("^redis: ") then return nil, "Redis refused the login: " .. self:_scrub(e), "login" end
      return nil, self:_scrub(e)
    end
  end
  if u.db ~= 0 then
    local ok, e = step("SELECT", tostring(u.db))
    if not ok then
      c:close()
      return nil, e
    end
  end
  return c
end

-- The connection for this call: the kept one, or (another light thread's
-- call when connections are per thread) one for this call only.
function C:_conn(behind)
  if self.closed then error("redis client: used after close()", 3) end
  if self.per_thread and self.owner and coroutine.status(self.owner) == "dead" then
    -- its light thread ended (nginx cleaned up its cosocket): the next caller keeps one
    self:_drop("the light thread that held the connection ended")
  end
  local mine = self.keep and (not self.per_thread or self.owner == nil or self.owner == coroutine.running())
  if self.c and mine then
    -- the replies of earlier posts come first on the connection
    -- (a failure there fails those posts and drops the connection: a new one follows)
    if self.posted[1] and not behind then self:_read_posts(self.c) end
    if self.c then return self.c, true end
  end
  local c, err, why = self:_open()
  if not c then return nil, err, why end
  if mine then
    self.c, self.owner = c, coroutine.running()
    return c, true
  end
  return c, false
end

-- Runs fn(conn) -> value | nil, err: an unreachable server drops the kept
-- connection (the next call makes a new one); an error reply keeps it.
function C:_with(fn)
  local c, kept, why = self:_conn()
  if not c then return nil, kept, why end
  local v, err, answered = fn(c)
  if not kept then
    -- a connection for this call only: back to the driver's pool when it
    -- ended cleanly
    if (v ~= nil or answered) and c.release then c:release() else c:close() end
  elseif v == nil and not answered then
    self:_drop(err)
  end
  return v, err, answered
end

local function value(v, err)
  if v == nil then return nil, tostring(err) end
  if type(v) == "table" and v.err then return nil, "redis: " .. v.err, true end
  return v
end

-- empty: a script's KEYS and ARGV may be none; a command needs its name
local function check_args(args, level, empty)
  if #args == 0 and not empty then error("redis client: a command needs a name", level) end
  for i = 1, #args do
    local t = type(args[i])
    if t ~= "string" and t ~= "number" then
      error(("redis client: argument %d is a %s, not a string or number"):format(i, t), level)
    end
  end
end

--- Connects now (calls connect on their own otherwise).
-- @treturn[1] true
-- @return[2] nil
-- @treturn[2] string why (never with the password)
function C:connect()
  local c, kept, why = self:_conn()
  if not c then return nil, kept, why end
  -- a connection for this call only (keep = false, another light thread's):
  -- it proved the server answers; back to the driver's pool
  if not kept then
    if c.release then c:release() else c:close() end
  end
  return true
end

--- One command.
-- @param ... the command and its arguments (strings or numbers)
-- @return[1] its value (`false` for a nil reply)
-- @return[2] nil
-- @treturn[2] string why
-- @treturn[2] boolean|string true when the server answered with an error;
--   `"login"` when it refused the credentials, `"tls"` when the TLS
--   handshake was refused (every try would: a configuration error, not an
--   outage; see `misconfigured`)
function C:call(...)
  local args = { ... }
  check_args(args, 3)
  return self:_with(function(c)
    return value(conn_call(self, c, args))
  end)
end

--- Several commands in one round trip.
-- @tparam table cmds a list of commands, each a list of strings
-- @treturn[1] table their values in order; an error reply is a table
--   `{err = "..."}` in its place
-- @return[2] nil
-- @treturn[2] string why (the server could not be reached)
function C:pipeline(cmds)
  if type(cmds) ~= "table" then error("redis client: pipeline takes a list of commands", 2) end
  for _, cmd in ipairs(cmds) do
    if type(cmd) ~= "table" then error("redis client: each command must be a list", 2) end
    check_args(cmd, 3)
  end
  if #cmds == 0 then return {} end
  return self:_with(function(c)
    local v, err = conn_pipeline(self, c, cmds)
    if v == nil then return nil, tostring(err) end
    return v
  end)
end

--- Sends commands without waiting for their replies (write-behind): they
-- leave now, in order after everything sent before, and their replies are
-- read before the next call on this connection or by `settle`, then handed
-- to `on_reply(values)` (as `pipeline`'s: an error reply is `{err = ...}`
-- in its place), or `on_reply(nil, err)` when the connection failed first
-- (whether they ran is then unknown: post only what may run twice). From
-- a light thread that does not hold the connection (nginx), it is a
-- pipeline: `on_reply` runs before it returns.
-- @tparam table cmds a list of commands, each a list of strings
-- @tparam function on_reply
-- @treturn[1] true sent
-- @return[2] nil
-- @treturn[2] string why (nothing was sent, or the connection failed while
--   sending: `on_reply` was not called and will not be)
function C:post(cmds, on_reply)
  if type(cmds) ~= "table" or #cmds == 0 then error("redis client: post takes a non-empty list of commands", 2) end
  for _, cmd in ipairs(cmds) do
    if type(cmd) ~= "table" then error("redis client: each command must be a list", 2) end
    check_args(cmd, 3)
  end
  if type(on_reply) ~= "function" then error("redis client: post needs an on_reply function", 2) end
  local c, kept, why = self:_conn(true) -- behind the posts before it: no reply read
  if not c then return nil, kept, why end
  if not kept then -- a connection for this call only: a pipeline
    local v, err = conn_pipeline(self, c, cmds)
    if v == nil then
      c:close()
      return nil, tostring(err)
    end
    if c.release then c:release() else c:close() end
    on_reply(v)
    return true
  end
  -- the replies are read at the latest when this many posts wait (a
  -- worker that only posts keeps a bounded backlog)
  if #self.posted >= 256 then
    self:_read_posts(c)
    return self:post(cmds, on_reply)
  end
  local ok, e = conn_send(c, cmds)
  if not ok then
    self:_drop(e)
    return nil, tostring(e)
  end
  self.posted[#self.posted + 1] = { n = #cmds, on_reply = on_reply }
  return true
end

--- How many posts wait for their replies.
function C:unsettled() return #self.posted end

--- Whether `take_ready` can read without waiting: a native connection
-- looks at its socket; nginx's has a light thread reading the replies of
-- posts as they come (and wakes the driver's loop on each).
function C:reads_ready()
  local c = self.c
  return c == nil or c.take ~= nil or (c.recv ~= nil and c.recv_one == nil)
end

--- The file descriptor whose readability says a reply has come, when
-- the kept connection is a native one (a loop can wait on it); nil else.
function C:ready_fd()
  local c = self.c
  if c and c.fd and c.recv_one == nil and not c.take then return c:fd() end
end

--- Reads, without waiting, the replies already here: each post whose
-- replies are all in gets them (as `settle` hands them).
-- @treturn number how many posts still wait
function C:take_ready()
  if self.c and self:reads_ready() then self:_read_posts(self.c, true) end
  return #self.posted
end

--- Reads the replies of every post (waiting for them).
-- @treturn[1] true
-- @return[2] nil
-- @treturn[2] string why (the connection failed: the posts not read got
--   `nil, err`)
function C:settle()
  if not self.posted[1] then return true end
  if self.per_thread and self.owner and self.owner ~= coroutine.running() then
    error("redis client: settle from a light thread that does not hold the connection", 2)
  end
  return self:_read_posts(self.c)
end

--- Whether an error (a reply's `err`, or a call's error text) says the
-- server forgot a script (a restart, `SCRIPT FLUSH`): then its SHA is
-- forgotten here too, and the next `script` (or `sha`) loads it again.
-- @tparam string name the script's name for the cache
-- @param err
-- @treturn boolean
function C:forgot(name, err)
  if type(err) == "string" and (err:match("^NOSCRIPT") or err:match("^redis: NOSCRIPT")) then
    self.shas[name] = nil
    return true
  end
  return false
end

--- Runs a server-side script by its SHA (`EVALSHA`), loading it once per
-- client and again when the server has forgotten it (a restart).
-- @tparam string name the script's name for the cache
-- @tparam string body its source
-- @tparam table keys KEYS
-- @tparam table args ARGV
-- @return as `call`
function C:script(name, body, keys, args)
  local all = {}
  for _, k in ipairs(keys) do all[#all + 1] = k end
  for _, a in ipairs(args) do all[#all + 1] = a end
  check_args(all, 3, true)
  return self:_with(function(c)
    for _ = 1, 2 do
      local sha = self.shas[name]
      if not sha then
        local r, e, answered = value(conn_call(self, c, { "SCRIPT", "LOAD", body }))
        if r == nil then return nil, e, answered end
        sha = r
        self.shas[name] = sha
      end
      local r, e, answered = value(conn_call(self, c, { "EVALSHA", sha, tostring(#keys),
        (table.unpack or unpack)(all) })) -- luacheck: ignore
      if r ~= nil or not (answered and self:forgot(name, e)) then return r, e, answered end
      -- the server restarted: load it again, once
    end
  end)
end

--- Closes the connection; the client cannot be used again.
function C:close()
  self:_drop("the client was closed")
  self.closed = true
end

return M
