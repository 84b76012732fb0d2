--- The OpenResty driver: nginx cosockets carry the bytes of the same C
-- protocol machine (a C function must never block inside nginx).
--
-- It has the interface of `smtppool.driver.native` (`open`, `wait`, `now`,
-- `tls_context`, and the handle methods), plus `wake()`, which makes a
-- `wait` in progress return (the agent's queue was fed). Each connection is
-- two light threads spawned by the thread that opened it: a reader (connect,
-- TLS handshakes, every read, reply timeouts) and a writer (everything the
-- session queues, body included, in order); `close` ends both. The scheduler's thread only
-- calls the session's non-blocking methods and waits on one semaphore that
-- both threads post when they have news.
--
-- Timeouts follow RFC 5321 4.5.3.2 per phase, as in the native driver: a
-- reply is timed whole, from the last write, the last complete reply or the
-- last phase change; bytes trickling in do not restart it. A write that
-- fails before the final dot has fully left is a `connection` error (the
-- message is retried); only after it is the message `ambiguous`.
--
-- TLS: `sslhandshake` with the certificate verified against nginx's
-- `lua_ssl_trusted_certificate` (the file or folder options of the pool
-- cannot be used per socket in nginx) and the name checked; the TLS session
-- of the last handshake is offered again (resumption) to the next one.
-- @module smtppool.driver.ngx

local core = require("smtppool.core")
local semaphore = require("ngx.semaphore")

local ngx = ngx -- luacheck: ignore (set by nginx)

local M = {}

local READ_SLICE = 0.5 -- seconds: a reader looks at its deadline at least this often
local DEFAULT_TIMEOUT = core.default_timeouts -- RFC 5321 4.5.3.2, the native driver's table
local SEND_TIMEOUT = 300 -- a write that cannot progress for five minutes is a dead peer

local H = {}
H.__index = H

-- The session's events go to the handle's queue and the waiting scheduler
-- is woken. A "tls" event is the reader's to act on (returned true).
function H:_collect()
  local entry = self.s:drain(0)
  if not entry then
    if self.s:pending() then self:_kick() end
    return false
  end
  local tls = false
  local ev = self.events
  for i = 1, #entry, 2 do
    if entry[i] == "tls" then
      tls = true
    else
      ev[#ev + 1] = entry[i]
      ev[#ev + 1] = entry[i + 1]
      local name = entry[i]
      if name == "error" or name == "closed" then self.over = true end
    end
  end
  -- The scheduler is woken before the writer: after a "next" event it
  -- starts the next transaction first, and the writer then sends the final
  -- dot and the next MAIL, RCPT and DATA in one write.
  if #ev > 0 then self.drv.wake() end
  if self.s:pending() then self:_kick() end
  return tls
end

function H:_kick()
  if not self.kicked then
    self.kicked = true
    self.wsem:post(1)
  end
end

-- The deadline of the reply awaited now (nil: none, the session is idle):
-- the session's own reply clock, as the native driver arms it.
function H:_deadline(now)
  return self.s:deadline(now)
end

local function ms(seconds) return math.max(1, math.floor(seconds * 1000)) end

-- sock:sslhandshake, with one known fault of lua-resty-core before 0.1.32
-- (Debian 12 has 0.1.25) turned back into an answer: when nginx finishes the
-- handshake at once and then its certificate check fails, resty.core raises
-- "assertion failed!" instead of returning the error (openresty/lua-resty-core
-- #499, fixed by #500 and #533). Only a refused certificate gets there.
local function sslhandshake(sock, session, name, verify)
  local ok, a, b = pcall(sock.sslhandshake, sock, session, name, verify)
  if ok then return a, b end
  if tostring(a):find("assertion failed", 1, true) then
    return nil, "certificate verify failed: not trusted, or not for " .. tostring(name)
  end
  error(a, 0)
end

function H:_handshake(phase)
  local tls = self.tls
  local sess, err = sslhandshake(self.sock, tls.session or nil, self.server_name, tls.verify)
  tls.handshakes = tls.handshakes + 1
  if not sess then
    tls.session = nil
    self.s:abort("TLS handshake with " .. self.server_name .. ": " .. tostring(err), phase, "tls")
    return false
  end
  if type(sess) == "userdata" or type(sess) == "cdata" then tls.session = sess end
  self.tls_on = true
  self.s:activity(core.now())
  return true
end

-- The reader thread: connect, then read until the session ends.
local function reader(self)
  local o, s, sock = self.o, self.s, self.sock
  sock:settimeouts(ms(o.connect_timeout or DEFAULT_TIMEOUT.connect), ms(SEND_TIMEOUT), ms(READ_SLICE))
  local ok, err = sock:connect(o.host, o.port)
  if not ok then
    -- nginx's resolver says "(3: Host not found)" for a name that does not
    -- exist: the configuration's, as the native driver's NXDOMAIN
    local unknown = tostring(err):find("could not be resolved %(3:") and "config" or nil
    s:abort(("connect to %s:%s: %s"):format(o.host, tostring(o.port), tostring(err)), "connect", unknown)
  elseif o.tls_mode == "implicit" then
    self:_handshake("connect")
  end
  s:activity(core.now())
  while not self.over and not self.cut do
    if self:_collect() then
      if self:_handshake("starttls") then s:tls_done() end
    else
      local now = core.now()
      local deadline = self:_deadline(now)
      local slice = READ_SLICE
      if deadline then slice = math.min(slice, math.max(0.001, deadline - now)) end
      sock:settimeouts(ms(o.connect_timeout or DEFAULT_TIMEOUT.connect), ms(SEND_TIMEOUT), ms(slice))
      local data, rerr = sock:receiveany(65536)
      if self.cut then break end
      if data then
        s:feed(data)
      elseif rerr == "timeout" then
        deadline = self:_deadline(core.now())
        if self.write_err then
          s:abort("write: " .. self.write_err)
        elseif deadline and core.now() >= deadline then
          s:timeout()
        end
      elseif self.write_err then
        -- the replies that were waiting are read: the write's error it is
        s:abort("write: " .. self.write_err)
      elseif rerr == "closed" then
        s:eof()
      else
        s:abort("read: " .. tostring(rerr))
      end
    end
  end
  self:_collect()
  self.over = true
  self:_kick() -- lets the writer see the end; the socket is closed by close()
end

-- The writer thread: sends what the session queues, in order; only bytes
-- the socket took count as written.
function M._writer(self)
  local s, sock = self.s, self.sock
  while not self.over and not self.cut do
    local out = s:pending()
    if out then
      s:handing(#out) -- the reader may take their replies before send returns
      local n, err = sock:send(out)
      if self.cut then break end
      if not n then
        -- A peer that closed may have answered first (the 421 that ended
        -- the session, a 250 for a dot that left): a failed send closes
        -- only nginx's write half, so the reader reads those replies, then
        -- the end; the write's error ends the session if nothing else does.
        self.write_err = tostring(err)
        break
      end
      s:written(#out)
      s:activity(core.now())
      self:_collect()
    else
      self.kicked = false
      self.wsem:wait(READ_SLICE * 10)
    end
  end
  self.writer_done = true
end

--- Handle methods (as the native connection's).
function H:start(from, to, data, params, journal, line, last)
  local ok, err = self.s:send(from, to, data, params, journal, line, last)
  if ok then self:_kick() end
  return ok, err
end

-- The gate before a final dot (the session's: `pending` gives nothing
-- while it is closed); opening it wakes the writer.
function H:gate_dot() self.s:gate_dot() end
function H:gate_open()
  self.s:gate_open()
  self:_kick()
end

function H:quit()
  self.s:quit()
  self:_collect()
  self:_kick()
end

function H:auth_go()
  self.s:auth_go()
  self:_collect()
  self:_kick()
end

function H:noop()
  self.s:noop()
  self:_kick()
end

-- Cuts the connection now: the transaction in flight fails (ambiguous if
-- its final dot had left).
function H:abort(text)
  if self.over then return end
  self.s:abort(text)
  self.cut = true
  self:_collect()
  self:_close_socket()
end

function H:_close_socket()
  self.over = true
  -- Both threads end first (a thread blocked on the socket would keep it
  -- busy; killing a finished one frees it), then the socket closes (with
  -- close_notify over TLS).
  ngx.thread.kill(self.reader)
  ngx.thread.kill(self.writer)
  self.sock:close()
end

function H:close()
  if self.closed then return end
  self.closed = true
  self.cut = true
  self:_close_socket()
end

function H:caps() return self.s:caps() end
function H:tls_active() return self.s:tls_active() end
function H:uses_bdat() return self.s:uses_bdat() end
function H:auth_mechanism() return self.s:auth_mechanism() end

-- Idle Redis connections a worker keeps per pool name (for 30 s). Requests
-- arriving together each take one: with 32 kept, 200 requests at once
-- opened 168 new connections (connect, login, database) a round, and the
-- outbox bench's enqueue median was 14-18 ms; with 256, 7-10 ms (p99 22-25
-- ms against 30-33, same run, 2 processors).
local KEEP_REDIS = 256

--- A Redis connection over a cosocket, for `smtppool.redis.client`:
-- `call(...)`, `pipeline(cmds)`, `send_many(cmds)` and `recv_one()` (the
-- client's writing behind: commands now, replies later, read by a light
-- thread as they come: `take()` looks without waiting), `close()`, with the RESP codec of the
-- native one (hiredis's). A cosocket belongs to the light thread that made
-- it (`redis_per_thread`). With `tls` (rediss://) the handshake verifies
-- the certificate against `lua_ssl_trusted_certificate` (nginx's store: a
-- URL's `ca_file` cannot replace it per connection, and is refused rather
-- than ignored), for the host's name or `server_name`.
--
-- With `pool` (a name: the server, database, user and TLS name; `secret`,
-- the password, is added as its digest), the connection comes
-- from nginx's keepalive pool of that name when one is there (`reused`:
-- its login and database are done) and `release()` puts it back (up to
-- 256 idle per name in a worker, for 30 s), so a request's Redis call does
-- not pay a connection.
function M.redis_connect(host, port, timeout, tls, pool, secret)
  if tls and (tls.ca_file or tls.ca_path) then
    return nil, "redis connect: in nginx a rediss:// CA comes from lua_ssl_trusted_certificate, not ca_file"
  end
  -- the password is part of what a kept connection is, named by a digest
  if pool and secret then pool = pool .. ":" .. ngx.encode_base64(ngx.sha1_bin(secret)) end
  local sock = ngx.socket.tcp()
  local ms = math.floor(timeout * 1000)
  sock:settimeouts(ms, ms, ms)
  local ok, err = sock:connect(host, port, pool and { pool = pool } or nil)
  if not ok then return nil, "redis connect: " .. tostring(err) end
  local reused = pool ~= nil and (sock:getreusedtimes() or 0) > 0
  if tls and not reused then
    local sess, herr = sslhandshake(sock, nil, tls.server_name or host, not tls.insecure_skip_verify)
    if not sess then
      sock:close()
      -- a certificate that does not verify ("<code>: <reason>") or is for
      -- another name: every try would be refused, as a login would; a
      -- timeout, a cut or a bare "handshake failed" may be an outage
      local e = tostring(herr)
      local refused = (e == "certificate host mismatch" or e:match("^%d+: ") ~= nil
        or e:find("^certificate verify failed") ~= nil) and "tls" or nil
      return nil, "redis connect: TLS handshake: " .. tostring(herr), refused
    end
  end
  local reader = core.resp_reader()
  local c = {}
  local function failed(what, e)
    sock:close()
    return nil, ("redis %s: %s"):format(what, tostring(e))
  end
  -- one reply: true and its value, or nil and why (the socket left open)
  local function read_value()
    while true do
      local got, v = reader:next()
      if got then return true, v end
      if v then return nil, v end -- malformed
      local data, rerr = sock:receiveany(16384)
      if not data then return nil, rerr end
      reader:feed(data)
    end
  end
  local function read(what)
    local ok2, v = read_value()
    if ok2 then return true, v end
    return failed(what, v)
  end
  -- Reading behind: the replies of `send_many`'s commands are read by a
  -- light thread of the sender's while any is due, into `inbox`, so the
  -- sender can look without waiting (`take`) and is told when one came
  -- (`c.on_arrival`, set by the client: the driver's `wake`). A cosocket
  -- can be read by one thread while another writes on it.
  local inbox, ihead, itail, due = {}, 1, 0, 0
  local reading, closing, waiting, rthread, rerr = false, false, false, nil, nil
  local rsem = semaphore.new(0)
  local function read_behind()
    reading = true
    while due > 0 and not closing do
      local ok2, v = read_value()
      if closing then break end
      if not ok2 then
        rerr, due = "redis recv: " .. tostring(v), 0
      else
        itail, due = itail + 1, due - 1
        inbox[itail] = v
      end
      if waiting then rsem:post(1) end
      if c.on_arrival then c.on_arrival() end
    end
    reading = false
    if closing then sock:close() end
  end
  local function pop()
    local v = inbox[ihead]
    inbox[ihead], ihead = nil, ihead + 1
    return v
  end
  function c.call(_, ...)
    local sent, serr = sock:send(core.resp_command(...))
    if not sent then return failed("call", serr) end
    local ok2, v = read("call")
    if not ok2 then return nil, v end
    return v
  end
  function c.pipeline(_, cmds)
    local out = {}
    for i, cmd in ipairs(cmds) do out[i] = core.resp_command((table.unpack or unpack)(cmd)) end -- luacheck: ignore
    local sent, serr = sock:send(table.concat(out))
    if not sent then return failed("pipeline", serr) end
    local values = {}
    for i = 1, #cmds do
      local ok2, v = read("pipeline")
      if not ok2 then return nil, v end
      values[i] = v
    end
    return values
  end
  -- write-behind (`smtppool.redis.client`'s post): the commands leave in
  -- one write; their replies are read one at a time later
  function c.send_many(_, cmds)
    local out = {}
    for i, cmd in ipairs(cmds) do out[i] = core.resp_command((table.unpack or unpack)(cmd)) end -- luacheck: ignore
    local sent, serr = sock:send(table.concat(out))
    if not sent then return failed("send", serr) end
    due = due + #cmds
    if not reading then
      rthread = ngx.thread.spawn(read_behind)
    end
    return true
  end
  -- the next reply of a send_many: waits for the reading thread
  function c.recv_one()
    local deadline = core.now() + timeout + 1
    while ihead > itail and reading and not rerr do
      local left = deadline - core.now()
      if left <= 0 then
        closing = true
        return nil, "redis recv: timed out"
      end
      waiting = true
      rsem:wait(left)
      waiting = false
    end
    if ihead <= itail then return pop() end
    if rerr then return nil, rerr end
    local ok2, v = read("recv")
    if not ok2 then return nil, v end
    return v
  end
  -- the next reply of a send_many if it has come: true and it; false and
  -- nil while it has not; false and why when the connection failed
  function c.take()
    if ihead <= itail then return true, pop() end
    return false, rerr
  end
  function c.close()
    closing = true
    -- the reading thread is the sender's child: ended here, or it closes
    -- the socket itself when it wakes
    if reading and rthread then
      if ngx.thread.kill(rthread) then reading = false end
    end
    if not reading then sock:close() end
  end
  c.reused = reused
  if pool then
    function c.release()
      if not sock:setkeepalive(30000, KEEP_REDIS) then sock:close() end
    end
  end
  return c
end

--- A driver instance: one per pool (its semaphore wakes that pool's loop).
-- @treturn table the driver
function M.new()
  local sem = semaphore.new(0)
  local d = { name = "ngx", now = core.now, redis_connect = M.redis_connect, redis_per_thread = true,
              sleep = function(s) ngx.sleep(s) end }
  local waiting, posted = false, false

  function d.wake()
    if waiting and not posted then
      posted = true
      sem:post(1)
    end
  end

  --- Options as for the native driver (`tls` is this driver's context).
  function d.open(o)
    local auth = o.auth
    local s, err = core.session{
      helo = o.helo, tls_active = o.tls_mode == "implicit", trace = o.trace, auth = auth,
      auth_gate = o.auth_gate, bdat_window = o.bdat_window, timeouts = o.timeouts,
      starttls = (o.tls_mode == "starttls" and "required") or (o.tls_mode == "opportunistic" and "opportunistic")
        or nil,
    }
    if not s then return nil, err end
    local h = setmetatable({
      drv = d, o = o, s = s, sock = ngx.socket.tcp(), events = {}, wsem = semaphore.new(0),
      tls = o.tls, server_name = o.server_name or o.host,
    }, H)
    -- Both threads are the opener's children, so it can end them.
    h.reader = ngx.thread.spawn(reader, h)
    h.writer = ngx.thread.spawn(M._writer, h)
    return h
  end

  -- Every handle with news, as the native wait returns them; waits on the
  -- semaphore when none has any (timeout < 0: until woken).
  local function gather(list)
    local out = {}
    for i, h in ipairs(list) do
      local ev = h.events
      if #ev > 0 then
        local entry = { conn = i }
        for j = 1, #ev do entry[j] = ev[j] end
        h.events = {}
        out[#out + 1] = entry
      end
    end
    return out
  end

  function d.wait(list, timeout)
    local out = gather(list)
    if #out > 0 or timeout == 0 then return out end
    waiting, posted = true, false
    sem:wait(timeout < 0 and 3600 or timeout)
    waiting, posted = false, false
    return gather(list)
  end

  --- A TLS context: what `sslhandshake` needs, and the session to resume.
  -- nginx verifies against `lua_ssl_trusted_certificate`; the pool's own
  -- trust and client certificate options cannot apply to a cosocket.
  function d.tls_context(o)
    for _, k in ipairs({ "ca_file", "ca_path", "cert_file", "key_file" }) do
      if o[k] then
        return nil, require("smtppool.errors").new("config",
          ("option '%s' does not apply in nginx: set lua_ssl_trusted_certificate (and lua_ssl_verify_depth) "
           .. "in nginx.conf instead"):format(k))
      end
    end
    local ctx = { verify = not o.insecure_skip_verify, handshakes = 0 }
    function ctx.stats() return { handshakes = ctx.handshakes } end
    return ctx
  end

  return d
end

return M
