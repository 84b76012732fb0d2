--- The OpenResty driver: the same C protocol machine, with nginx cosockets
-- carrying the bytes (a C function must never block inside nginx).
--
--     local smtp = require("smtppool.ngx")
--     local res, err = smtp.send_raw({ host = "127.0.0.1", port = 25, tls = "none" },
--                                    { from = "a@x.example", to = { "b@y.example" }, data = raw })
--
-- One call opens a connection, sends one message, QUITs and closes. The
-- pool of the plain-Lua module (rotation, learned caps, rate windows) is not
-- available here yet: nginx's own keepalive pool does not know SMTP state.
-- @module smtppool.ngx

local core = require("smtppool.core")

local M = {}

local errors = require("smtppool.errors")

local function fail(kind, text, phase)
  return errors.new(kind, text, { phase = phase, attempts = 1 })
end

local TIMEOUT_MS = 300000 -- RFC 5321's five minutes

--- Sends one ready-made message over a cosocket.
-- @tparam table o `host`, `port` (25), `tls` (`"none"`, `"starttls"`,
--   `"opportunistic"`, `"implicit"`), `server_name`, `verify` (default true:
--   nginx's `lua_ssl_trusted_certificate` must name the CA), `helo`,
--   `timeout` (seconds for connect and each read or write), `auth`
--   (`{user, password}` or `{user, token}` for XOAUTH2, as for the pool) and
--   `allow_plaintext_auth`
-- @tparam table msg `from`, `to` (string or array), `data`
-- @treturn[1] table the result, as `Pool:send_raw` gives it
-- @return[2] nil
-- @treturn[2] table error value
function M.send_raw(o, msg)
  if type(o) ~= "table" or type(o.host) ~= "string" then error("smtppool.ngx.send_raw: options need a host", 2) end
  if type(msg) ~= "table" or type(msg.from) ~= "string" or type(msg.data) ~= "string" then
    error("smtppool.ngx.send_raw: message needs from, to and data", 2)
  end
  local to = type(msg.to) == "string" and { msg.to } or msg.to
  local tls = o.tls or "starttls"
  local ms = (o.timeout or TIMEOUT_MS / 1000) * 1000
  local sock = ngx.socket.tcp()
  sock:settimeouts(ms, ms, ms)
  local ok, err = sock:connect(o.host, o.port or (tls == "implicit" and 465 or 25))
  if not ok then return nil, fail("connection", "connect: " .. tostring(err), "connect") end
  local verify = o.verify ~= false
  local server_name = o.server_name or o.host
  local function handshake(phase)
    local hs, herr = sock:sslhandshake(nil, server_name, verify)
    if hs then return true end
    sock:close()
    return nil, fail("tls", "TLS handshake: " .. tostring(herr), phase)
  end
  if tls == "implicit" then
    ok, err = handshake("connect")
    if not ok then return nil, err end
  end
  local auth
  if o.auth then
    local a = o.auth
    local secret = a.password or a.token
    if type(secret) == "function" then secret = secret() end
    if type(a.user) ~= "string" or type(secret) ~= "string" then
      sock:close()
      return nil, fail("config", "auth needs user and a password or token")
    end
    auth = { user = a.user, secret = secret, mechanism = a.mechanism or (a.token and "XOAUTH2") or nil,
             allow_plaintext = o.allow_plaintext_auth }
  end
  local s, serr = core.session{ helo = o.helo or "localhost", tls_active = tls == "implicit", auth = auth,
    starttls = (tls == "starttls" and "required") or (tls == "opportunistic" and "opportunistic") or nil }
  if not s then -- a helo or credential the C core refuses (CR, LF, a space...)
    sock:close()
    return nil, serr
  end
  local result, final_err, started
  for _ = 1, 100000 do -- bounded: a session ends long before
    local out = s:output()
    if #out > 0 then
      local sent, serr = sock:send(out)
      if not sent then s:eof() final_err = fail("connection", "write: " .. tostring(serr), s:phase()) end
    end
    local ev = s:next_event()
    if ev == "ready" and not started then
      started = true
      local okk, e = s:start(msg.from, to, msg.data)
      if not okk then
        final_err = e
        s:quit()
      end
    elseif ev == "body" then
      s:body(msg.data)
      s:body_end()
    elseif ev == "tls" then
      ok, err = handshake("starttls")
      if not ok then return nil, err end
      s:tls_done()
    elseif ev == "tx" then
      local t = s:tx()
      if t.ok then
        local rejected = {}
        for _, r in ipairs(t.recipients) do
          if not r.ok then rejected[#rejected + 1] = r end
        end
        result = { code = t.code, enhanced = t.enhanced, text = t.text, recipients = t.recipients,
                   rejected = rejected, attempts = 1 }
      else
        final_err = t.err
        final_err.attempts = 1
      end
      s:quit()
    elseif ev == "error" then
      final_err = final_err or s:error()
      break
    elseif ev == "closed" then
      break
    elseif ev == nil and #s:output() == 0 then
      local data, rerr = sock:receiveany(16384)
      if data then
        s:feed(data)
      elseif rerr == "timeout" then
        s:timeout()
      else
        s:eof()
      end
    end
  end
  sock:close()
  if result then return result end
  return nil, final_err or fail("protocol", "the session ended without an outcome")
end

return M
