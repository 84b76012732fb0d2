-- A fake driver: the driver interface (smtppool.driver.native) over a model
-- of SMTP servers at the level of the events the scheduler sees, on a
-- virtual clock. Specs drive the scheduler with it (rotation, caps,
-- concurrency, retries, the loop) without sockets, in milliseconds, and the
-- model keeps the server's view (sessions, messages each, sockets at once)
-- to assert on.
--
--   local fake = require("fake_driver")
--   local net = fake.network()
--   local srv = net:server("mx", { cap = 5, rtt = 0.01 })
--   local pool = smtppool.build({ host = "mx", tls = "none", ... }, net:driver())
--
-- A server's options: `cap` (messages a session takes; the next MAIL gets
-- 421 and the session ends), `max_sessions` (sockets at once; one more is
-- refused with 421 at the greeting), `rtt` (seconds a round trip takes,
-- default 0.01), `pipelining` (default true), `mailmax` (LIMITS MAILMAX),
-- `reply(srv, session, tx, to) -> nil | code, text[, phase]` (a reply for
-- the transaction instead of 250: 4xx transient, 5xx permanent; in phase
-- `data_end` unless told: a 4xx to MAIL after a transaction is the
-- session's exhaustion, moved without an attempt). `srv.received` lists
-- what it accepted: `{from, to, data}` (the message as it left);
-- `srv.sessions` each session's `messages`, `opened` and `closed` times.
local errors = require("smtppool.errors")

local M = {}

local Net = {}
Net.__index = Net

local Server = {}
Server.__index = Server

local H = {}
H.__index = H

function M.network()
  return setmetatable({ t = 0, servers = {}, handles = {}, seq = 0 }, Net)
end

function Net:server(host, o)
  o = o or {}
  local s = setmetatable({ host = host, cap = o.cap, max_sessions = o.max_sessions, rtt = o.rtt or 0.01,
    pipelining = o.pipelining ~= false, mailmax = o.mailmax, reply = o.reply, sessions = {}, open = 0,
    max_open = 0, refused = 0, accepted = 0, over_cap = 0, received = {} }, Server)
  self.servers[host] = s
  return s
end

-- Schedules an event for a handle at time at.
function Net:_at(h, at, name, payload)
  self.seq = self.seq + 1
  h.queue[#h.queue + 1] = { at = at, seq = self.seq, name = name, payload = payload }
end

local function tx_payload(ok, code, text, to, err, quit)
  local rcpts = {}
  for i, a in ipairs(to) do rcpts[i] = { address = a, code = ok and 250 or nil, ok = ok, text = ok and "OK" or nil } end
  return { ok = ok, done = true, accepted = ok and #to or 0, code = code, text = text, recipients = rcpts, err = err,
           quit = quit or false, bdat = false }
end

function Net:driver()
  local net = self
  local d = { name = "fake" }
  function d.now() return net.t end
  function d.open(o)
    local srv = net.servers[o.host]
    if not srv then return nil, errors.new("connection", "fake: no server " .. tostring(o.host), { phase = "connect" }) end
    local h = setmetatable({ net = net, srv = srv, queue = {}, state = "connecting", txs = 0 }, H)
    net.handles[#net.handles + 1] = h
    srv.open = srv.open + 1
    if srv.open > srv.max_open then srv.max_open = srv.open end
    if srv.max_sessions and srv.open > srv.max_sessions then
      srv.refused = srv.refused + 1
      net:_at(h, net.t + srv.rtt, "error", errors.new("transient", "421 4.3.2 too many connections",
        { code = 421, phase = "greeting" }))
      h.dying = true
      return h
    end
    h.session = { messages = 0, opened = net.t }
    srv.sessions[#srv.sessions + 1] = h.session
    -- connect, greeting, EHLO: two round trips
    net:_at(h, net.t + 2 * srv.rtt, "ready", true)
    return h
  end
  -- The events due first among the handles (the clock moves to them), or
  -- none once timeout has passed (the clock moves by it).
  function d.wait(list, timeout)
    local first
    for _, h in ipairs(list) do
      for _, e in ipairs(h.queue) do
        if not first or e.at < first then first = e.at end
      end
    end
    if not first or (timeout >= 0 and first > net.t + timeout) then
      if timeout >= 0 then
        net.t = net.t + timeout
      else
        -- a real wait would block forever here: fail loudly instead
        net.stuck = (net.stuck or 0) + 1
        if net.stuck > 100 then error("fake driver: waited with no timeout and nothing that can happen", 0) end
      end
      return {}
    end
    net.stuck = 0
    if first > net.t then net.t = first end
    local out = {}
    for i, h in ipairs(list) do
      local due, keep = {}, {}
      for _, e in ipairs(h.queue) do
        if e.at <= net.t then due[#due + 1] = e else keep[#keep + 1] = e end
      end
      if #due > 0 then
        table.sort(due, function(a, b) return a.seq < b.seq end)
        h.queue = keep
        local entry = { conn = i }
        for _, e in ipairs(due) do
          entry[#entry + 1] = e.name
          entry[#entry + 1] = e.payload
          h:_happened(e.name)
        end
        out[#out + 1] = entry
      end
    end
    return out
  end
  return d
end

function H:_happened(name)
  if name == "ready" then self.state = "ready" end
  if (name == "error" or name == "closed") and not self.gone then
    self.gone = true
    if self.session then self.session.closed = self.net.t end
    self.srv.open = self.srv.open - 1
  end
end

function H:caps()
  return { pipelining = self.srv.pipelining, mailmax = self.srv.mailmax, auth_mechs = {} }
end
function H:tls_active() return false end
function H:uses_bdat() return false end
function H:gate_dot() end -- a fake session queues no bytes to withhold
function H:gate_open() end
function H:auth_mechanism() return nil end

local function flat(data)
  if type(data) == "string" then return data end
  local out = {}
  for i, seg in ipairs(data) do out[i] = type(seg) == "string" and seg or "" end
  return table.concat(out)
end

function H:start(from, to, data, _, _, _, last)
  if self.state ~= "ready" or self.dying then
    return nil, errors.new("invalid", "fake: the session is not ready")
  end
  local srv, net = self.srv, self.net
  -- as the session does: QUIT leaves with the final dot only with PIPELINING
  local quit = (last and srv.pipelining) and true or false
  self.state = "busy"
  self.txs = self.txs + 1
  local at = net.t + srv.rtt
  if srv.cap and self.txs > srv.cap then
    srv.over_cap = srv.over_cap + 1
    local e = errors.new("transient", "421 4.7.0 too many messages in this session", { code = 421, phase = "mail" })
    net:_at(self, at, "tx", tx_payload(false, 421, e.text, to, e))
    net:_at(self, at, "error", e)
    self.dying = true
    return true
  end
  local code, text, phase = nil, nil, nil
  if srv.reply then code, text, phase = srv.reply(srv, self.session, self.txs, to) end
  if code then
    local kind = code >= 500 and "permanent" or "transient"
    local e = errors.new(kind, code .. " " .. (text or ""), { code = code, phase = phase or "data_end" })
    net:_at(self, at, "tx", tx_payload(false, code, text, to, e, quit))
    if quit then
      net:_at(self, at, "closed", true)
      self.dying = true
    else
      net:_at(self, at, "ready", true)
    end
    return true
  end
  self.session.messages = self.session.messages + 1
  srv.accepted = srv.accepted + 1
  srv.received[#srv.received + 1] = { from = from, to = to, data = flat(data) }
  -- MAIL, RCPT, DATA pipelined, then the body and its dot: two round trips
  net:_at(self, net.t + 2 * srv.rtt, "tx", tx_payload(true, 250, "OK", to, nil, quit))
  if quit then
    net:_at(self, net.t + 2 * srv.rtt, "closed", true) -- QUIT left with the dot
    self.dying = true
  else
    net:_at(self, net.t + 2 * srv.rtt, "ready", true)
  end
  return true
end

function H:quit()
  if self.dying or self.gone then return end
  self.dying = true
  self.net:_at(self, self.net.t + self.srv.rtt, "closed", true)
end

function H:noop()
  self.net:_at(self, self.net.t + self.srv.rtt, "ready", true)
end

function H:abort(text)
  if self.gone then return end
  self.queue = {}
  local e = errors.new("connection", "fake: " .. tostring(text), { phase = "data" })
  if self.state == "busy" then self.net:_at(self, self.net.t, "tx", tx_payload(false, nil, nil, {}, e)) end
  self.net:_at(self, self.net.t, "error", e)
  self.dying = true
end

function H:close()
  self.queue = {}
  self:_happened("closed")
end

return M
