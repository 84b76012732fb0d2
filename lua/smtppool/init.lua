--- A pooled, limit-aware SMTP client.
--
-- The protocol machine, the codecs and the socket driver are C
-- (`smtppool.core`); this module is the pool users talk to.
--
--     local smtppool = require("smtppool")
--     local pool = assert(smtppool.new{ host = "127.0.0.1", port = 25, tls = "none" })
--     local res, err = pool:send_raw{ from = "a@example.org", to = { "b@example.net" },
--                                     data = "Subject: hi\r\n\r\nHello\r\n" }
--     pool:close()
--
-- Runtime failures return `nil, err`; `err` is a table with `kind`, `phase`,
-- `code`, `enhanced`, `text` and `attempts` (see `smtppool.error`), and
-- prints as one line with `tostring`. Wrong argument types raise.
-- @module smtppool

local core = require("smtppool.core")

local M = { _VERSION = "0.1.0" }
local unpack = table.unpack or unpack -- luacheck: ignore (LuaJIT)

local error_mt = core.error_mt

--- Makes an error value.
-- @tparam string kind one of `transient`, `permanent`, `connection`,
--   `ambiguous`, `protocol`, `tls`, `auth`, `invalid`, `config`
-- @tparam string text what went wrong, for a human
-- @tparam[opt] table fields more fields (`phase`, `code`, `enhanced`...)
-- @treturn table the error value
function M.error(kind, text, fields)
  local e = { kind = kind, text = text }
  if fields then
    for k, v in pairs(fields) do e[k] = v end
  end
  return setmetatable(e, error_mt)
end

--- True when `v` is an smtppool error value.
function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == error_mt
end

local TLS_MODES = { none = true, starttls = true, implicit = true, opportunistic = true }
local PHASES = { "greeting", "ehlo", "mail", "rcpt", "data", "data_end", "rset", "noop", "quit" }

-- Option schema: name -> expected Lua type. Unknown names are misuse.
local OPTIONS = {
  host = "string", port = "number", tls = "string", helo = "string",
  connect_timeout = "number", timeouts = "table", on_event = "function",
  max_conns = "number", close_timeout = "number",
}

local function check_options(opts)
  if type(opts) ~= "table" then
    error("smtppool.new: options must be a table, got " .. type(opts), 3)
  end
  for k, v in pairs(opts) do
    local want = OPTIONS[k]
    if not want then
      error(("smtppool.new: unknown option '%s'"):format(tostring(k)), 3)
    end
    if type(v) ~= want then
      error(("smtppool.new: option '%s' must be a %s, got %s"):format(k, want, type(v)), 3)
    end
  end
  if not opts.host then error("smtppool.new: option 'host' is required", 3) end
  if opts.timeouts then
    local known = {}
    for _, p in ipairs(PHASES) do known[p] = true end
    for k, v in pairs(opts.timeouts) do
      if not known[k] then
        error(("smtppool.new: unknown timeout '%s' (phases: %s)"):format(tostring(k),
          table.concat(PHASES, ", ")), 3)
      end
      if type(v) ~= "number" or v <= 0 then
        error(("smtppool.new: timeout '%s' must be a positive number"):format(k), 3)
      end
    end
  end
end

local Pool = {}
Pool.__index = Pool

--- Creates a pool. No connection is opened until a message needs one.
-- @tparam table opts
--
-- * `host` (string, required): server name or address.
-- * `port` (number, default 25).
-- * `tls` (string, default `"starttls"`): `"none"` for plaintext SMTP.
--   The other modes (`"starttls"`, `"implicit"`, `"opportunistic"`) are not
--   built yet and are refused with a `config` error rather than silently
--   sending in the clear.
-- * `helo` (string, default this machine's host name): the EHLO name.
-- * `connect_timeout` (seconds, default 30).
-- * `timeouts` (table): reply timeouts in seconds per phase (`greeting`,
--   `ehlo`, `mail`, `rcpt`, `data`, `data_end`, `rset`, `noop`, `quit`);
--   defaults are RFC 5321 section 4.5.3.2's (5 minutes; `data` 3,
--   `data_end` 10).
-- * `max_conns` (number, default 1): connections open at once.
-- * `close_timeout` (seconds, default 5): how long `close` waits for QUIT.
-- * `on_event` (function): called with one table per event
--   (`{type = "connect" | "ready" | "discard" | "close", ...}`).
-- @treturn[1] Pool
-- @return[2] nil
-- @treturn[2] table error value (kind `config`)
function M.new(opts)
  check_options(opts)
  local tls = opts.tls or "starttls"
  if not TLS_MODES[tls] then
    return nil, M.error("config", ("unknown tls mode '%s' (none, starttls, implicit, opportunistic)"):format(tls))
  end
  if tls ~= "none" then
    return nil, M.error("config", ("tls mode '%s' is not available in this version; "
      .. "pass tls = \"none\" to send in plaintext"):format(tls))
  end
  local port = opts.port or 25
  if port ~= math.floor(port) or port < 1 or port > 65535 then
    return nil, M.error("config", "port must be an integer from 1 to 65535")
  end
  local max_conns = opts.max_conns or 1
  if max_conns < 1 or max_conns ~= math.floor(max_conns) then
    return nil, M.error("config", "max_conns must be a positive integer")
  end
  local self = setmetatable({
    opts = opts,
    conn_opts = {
      host = opts.host, port = port, helo = opts.helo or core.hostname() or "localhost",
      connect_timeout = opts.connect_timeout, timeouts = opts.timeouts,
    },
    max_conns = max_conns,
    close_timeout = opts.close_timeout or 5,
    on_event = opts.on_event,
    conns = {},      -- every live connection record
    closed = false,
    counters = { opened = 0, closed_by_us = 0, closed_by_server = 0, sent = 0, failed = 0 },
  }, Pool)
  return self
end

function Pool:_emit(ev)
  if self.on_event then
    local ok, e = pcall(self.on_event, ev)
    if not ok then
      -- A broken hook must not break delivery; report it once on stderr.
      if not self._hook_warned then
        self._hook_warned = true
        io.stderr:write("smtppool: on_event hook failed: ", tostring(e), "\n")
      end
    end
  end
end

local function conn_list(self)
  local list = {}
  for i, rec in ipairs(self.conns) do list[i] = rec.c end
  return list
end

function Pool:_remove(rec)
  for i, r in ipairs(self.conns) do
    if r == rec then table.remove(self.conns, i) break end
  end
  rec.c:close()
  rec.state = "gone"
end

-- Handles the events of one connection record.
function Pool:_dispatch(rec)
  while true do
    local ev = rec.c:next_event()
    if not ev then return end
    if ev == "ready" then
      if rec.state == "connecting" then
        self:_emit({ type = "ready", conn = rec.id, caps = rec.c:caps() })
      end
      rec.state = "ready"
    elseif ev == "tx" then
      rec.tx_result = rec.c:tx()
      rec.state = "settling" -- "ready" follows at once on success, after RSET on failure
      rec.messages = rec.messages + 1
    elseif ev == "error" then
      local e = rec.c:error()
      rec.err = e
      rec.state = "dead"
      self.counters.closed_by_server = self.counters.closed_by_server + 1
      self:_emit({ type = "discard", conn = rec.id, err = e })
      self:_remove(rec)
      return
    elseif ev == "closed" then
      rec.state = "closed"
      self.counters.closed_by_us = self.counters.closed_by_us + 1
      self:_emit({ type = "close", conn = rec.id })
      self:_remove(rec)
      return
    end
  end
end

-- Runs the poll loop until done() is true or the deadline passes.
function Pool:_drive(done, deadline)
  while not done() do
    local list = conn_list(self)
    if #list == 0 then return end
    local left = deadline and (deadline - core.now()) or -1
    if deadline and left <= 0 then return end
    core.wait(list, left)
    for _, rec in ipairs({ unpack(self.conns) }) do self:_dispatch(rec) end
  end
end

function Pool:_open()
  local c, e = core.connect(self.conn_opts)
  if not c then return nil, e end
  self.next_id = (self.next_id or 0) + 1
  local rec = { c = c, id = self.next_id, state = "connecting", messages = 0, born = core.now() }
  self.conns[#self.conns + 1] = rec
  self.counters.opened = self.counters.opened + 1
  self:_emit({ type = "connect", conn = rec.id, host = self.conn_opts.host, port = self.conn_opts.port })
  return rec
end

-- Returns a ready connection record, opening one if needed.
function Pool:_acquire()
  for _, rec in ipairs(self.conns) do
    if rec.state == "ready" and not rec.busy then return rec end
  end
  local rec
  -- A connection finishing its RSET will be ready in a moment; prefer it.
  for _, r in ipairs(self.conns) do
    if not r.busy and (r.state == "connecting" or r.state == "settling") then rec = r break end
  end
  if not rec then
    if #self.conns >= self.max_conns then
      for _, r in ipairs(self.conns) do
        if not r.busy then rec = r break end
      end
    end
    if not rec then
      local e
      rec, e = self:_open()
      if not rec then return nil, e end
    end
  end
  self:_drive(function() return rec.state == "ready" or rec.state == "gone" end)
  if rec.state ~= "ready" then
    return nil, rec.err or M.error("connection", "connection closed before it was ready")
  end
  return rec
end

local function check_message(msg, fname)
  if type(msg) ~= "table" then
    error(fname .. ": message must be a table, got " .. type(msg), 3)
  end
  if type(msg.from) ~= "string" then
    error(fname .. ": 'from' must be a string", 3)
  end
  local to = msg.to
  if type(to) == "string" then to = { to } end
  if type(to) ~= "table" then
    error(fname .. ": 'to' must be a string or an array of strings", 3)
  end
  for i, a in ipairs(to) do
    if type(a) ~= "string" then
      error(("%s: recipient %d must be a string, got %s"):format(fname, i, type(a)), 3)
    end
  end
  if type(msg.data) ~= "string" then
    error(fname .. ": 'data' must be a string holding an RFC 5322 message", 3)
  end
  return to
end

-- Turns a finished transaction into the result, or nil and an error value.
local function outcome(t, attempts)
  local rejected = {}
  for _, r in ipairs(t.recipients) do
    if not r.ok then rejected[#rejected + 1] = r end
  end
  if t.ok then
    return { code = t.code, enhanced = t.enhanced, text = t.text, recipients = t.recipients,
             rejected = rejected, attempts = attempts }
  end
  local e = t.err
  e.attempts = attempts
  e.recipients = t.recipients
  return nil, e
end

--- Sends one ready-made RFC 5322 message.
-- The message is sent to every recipient the server accepts; recipients it
-- refuses are listed in the result.
-- @tparam table msg
--
-- * `from` (string): envelope sender (`""` for the null sender).
-- * `to` (string or array of strings): envelope recipients.
-- * `data` (string): the message, headers and body. Line ends may be CRLF
--   or bare LF; leading dots are stuffed; 8-bit bytes need a server that
--   offers 8BITMIME.
-- @treturn[1] table result: `code`, `enhanced`, `text` (the server's reply
--   to the message), `recipients` (one `{address, ok, code, enhanced, text}`
--   per recipient), `rejected` (the recipients that were refused) and
--   `attempts`.
-- @return[2] nil
-- @treturn[2] table error value, with `recipients` when the server answered
--   any RCPT
function Pool:send_raw(msg)
  local to = check_message(msg, "send_raw")
  if self.closed then
    return nil, M.error("config", "the pool is closed")
  end
  if #to == 0 then
    return nil, M.error("invalid", "no recipients", { attempts = 0 })
  end
  local rec, e = self:_acquire()
  if not rec then
    e.attempts = 1
    self.counters.failed = self.counters.failed + 1
    return nil, e
  end
  local ok, serr = rec.c:start(msg.from, to, msg.data)
  if not ok then
    serr.attempts = 0
    return nil, serr
  end
  rec.busy = true
  rec.tx_result = nil
  self:_drive(function() return rec.tx_result ~= nil or rec.state == "gone" end)
  rec.busy = false
  local t = rec.tx_result
  if not t then
    -- The connection died with the transaction in flight and never reported it.
    t = { ok = false, recipients = {}, err = rec.err or M.error("connection", "connection lost") }
  end
  local res, rerr = outcome(t, 1)
  if res then
    self.counters.sent = self.counters.sent + 1
  else
    self.counters.failed = self.counters.failed + 1
  end
  return res, rerr
end

--- Counters since the pool was made.
-- @treturn table `opened`, `closed_by_us`, `closed_by_server`, `sent`,
--   `failed`, `open` (connections open now)
function Pool:stats()
  local s = {}
  for k, v in pairs(self.counters) do s[k] = v end
  s.open = #self.conns
  return s
end

--- Closes every connection: QUIT on idle ones (waiting at most
-- `close_timeout` seconds), then the sockets. The pool refuses new messages
-- afterwards. Safe to call twice.
function Pool:close()
  if self.closed then return true end
  self.closed = true
  for _, rec in ipairs(self.conns) do
    if rec.state == "ready" then
      rec.c:quit()
      rec.state = "quitting"
    end
  end
  local deadline = core.now() + self.close_timeout
  self:_drive(function()
    for _, rec in ipairs(self.conns) do
      if rec.state == "quitting" then return false end
    end
    return true
  end, deadline)
  for _, rec in ipairs({ unpack(self.conns) }) do self:_remove(rec) end
  return true
end

Pool.__gc = function(self)
  for _, rec in ipairs(self.conns or {}) do rec.c:close() end
end
Pool.__close = Pool.close

return M
