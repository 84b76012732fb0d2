--- The options of `smtppool.new`: one schema, the checks, the defaults.
-- Each decision is written here once; the pool, the drivers and the C
-- binding take the resolved values.
-- @module smtppool.options

local core = require("smtppool.core")
local errors = require("smtppool.errors")
local urls = require("smtppool.url")

local M = {}

-- Transactions a connection may have awaiting their final replies when the
-- server offers CHUNKING (BDAT): also how many messages can be ambiguous at
-- once when such a connection is lost.
M.BDAT_WINDOW = 4

M.TLS_MODES = { none = true, starttls = true, implicit = true, opportunistic = true }
M.PHASES = { "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "data_end", "rset", "noop", "quit" }

-- Option schema: name -> expected Lua type. Unknown names are misuse.
M.SCHEMA = {
  host = "string", port = "number", tls = "string", helo = "string",
  connect_timeout = "number", timeouts = "table", on_event = "function",
  max_conns = "number", close_timeout = "number", wait_timeout = "number",
  idle_timeout = "number", max_messages_per_conn = "number", max_conn_lifetime = "number",
  health_check_after = "number", rate = "table", retry = "function",
  ca_file = "string", ca_path = "string", cert_file = "string", key_file = "string",
  server_name = "string", insecure_skip_verify = "boolean", auth = "table",
  allow_plaintext_auth = "boolean", dkim = "table", message_timeout = "number",
  cap_recover_after = "number", limit_probe_after = "number", trace = "boolean", max_recipients_per_message = "number",
  rotate_ahead = "number", sign_threads = "number", dns_servers = "string", bdat_window = "number", proxy = "string",
  outbox = "string", outbox_name = "string", outbox_max = "number", outbox_keep = "number", outbox_lease = "number",
  outbox_timeout = "number", allow_volatile_redis = "boolean",
}

-- A real, finite number: NaN and the infinities pass `type` and most range
-- checks (NaN compares false with everything), and a NaN timeout waits forever.
local function finite(x)
  return type(x) == "number" and x == x and x > -math.huge and x < math.huge
end
M.finite = finite

-- RFC 5321 4.1.3: the EHLO name is a domain or an address literal; nothing
-- else (a space, CR, LF, NUL) may reach the command line. One rule, in C.
local valid_helo = core.valid_helo
M.valid_helo = valid_helo

local AUTH_OPTIONS = { user = "string", password = "string", token = true, mechanism = "string" }
-- The AUTH mechanisms the C core speaks (its one table of names).
local MECHANISMS = {}
for _, m in ipairs(core.auth_mechanisms) do MECHANISMS[m] = true end

-- Why a secret (password or token) cannot be sent, or nil. CR, LF and NUL
-- never belong to a credential; ^A would split XOAUTH2's fields.
function M.bad_secret(v)
  if type(v) ~= "string" then return nil end
  if v:find("[%z\r\n\1]") then return " must not contain CR, LF, NUL or ^A" end
  return nil
end

--- Checks the options of `smtppool.new`; raises on misuse (the caller's
-- caller is blamed, as `new` calls this). extra: more names -> types a
-- driver's `new` accepts (`smtppool.ngx`'s `shared_dict`...).
function M.check(opts, extra)
  if type(opts) ~= "table" then
    error("smtppool.new: options must be a table, got " .. type(opts), 3)
  end
  for k, v in pairs(opts) do
    local want = M.SCHEMA[k] or extra and extra[k]
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
    for _, p in ipairs(M.PHASES) do known[p] = true end
    for k, v in pairs(opts.timeouts) do
      if not known[k] then
        error(("smtppool.new: unknown timeout '%s' (phases: %s)"):format(tostring(k),
          table.concat(M.PHASES, ", ")), 3)
      end
      if not finite(v) or v <= 0 then
        error(("smtppool.new: timeout '%s' must be a positive finite number"):format(k), 3)
      end
    end
  end
  for _, k in ipairs({ "connect_timeout", "close_timeout", "wait_timeout", "idle_timeout",
                       "max_conn_lifetime", "health_check_after", "message_timeout", "cap_recover_after",
                       "limit_probe_after" }) do
    if opts[k] ~= nil and (not finite(opts[k]) or opts[k] <= 0) then
      error(("smtppool.new: option '%s' must be a positive finite number of seconds"):format(k), 3)
    end
  end
  if opts.port ~= nil and not finite(opts.port) then
    error("smtppool.new: option 'port' must be a finite number", 3)
  end
  if opts.helo ~= nil and not valid_helo(opts.helo) then
    error("smtppool.new: option 'helo' must be a domain name or an address literal such as [192.0.2.1]", 3)
  end
  if opts.auth then
    for k, v in pairs(opts.auth) do
      local want = AUTH_OPTIONS[k]
      if not want then error(("smtppool.new: unknown auth option '%s'"):format(tostring(k)), 3) end
      if k == "token" then
        if type(v) ~= "string" and type(v) ~= "function" then
          error("smtppool.new: auth.token must be a string or a function returning one", 3)
        end
      elseif type(v) ~= want then
        error(("smtppool.new: auth.%s must be a %s"):format(k, want), 3)
      end
    end
    if type(opts.auth.user) ~= "string" then error("smtppool.new: auth.user is required", 3) end
    if opts.auth.mechanism and not MECHANISMS[opts.auth.mechanism] then
      error("smtppool.new: auth.mechanism must be one of " .. table.concat(core.auth_mechanisms, ", "), 3)
    end
    if (opts.auth.password == nil) == (opts.auth.token == nil) then
      error("smtppool.new: auth takes a password or a token (for XOAUTH2), not both or neither", 3)
    end
    if opts.auth.user:find("[%z\1-\31\127]") then
      error("smtppool.new: auth.user must not contain control bytes (CR, LF, NUL...)", 3)
    end
    local bad = M.bad_secret(opts.auth.password or opts.auth.token)
    if bad then error("smtppool.new: auth." .. (opts.auth.password and "password" or "token") .. bad, 3) end
  end
  if opts.rotate_ahead ~= nil and (not finite(opts.rotate_ahead) or opts.rotate_ahead < 0
    or opts.rotate_ahead ~= math.floor(opts.rotate_ahead) or opts.rotate_ahead > 100) then
    error("smtppool.new: option 'rotate_ahead' must be an integer from 0 to 100", 3)
  end
  if opts.bdat_window ~= nil and (not finite(opts.bdat_window) or opts.bdat_window < 0
    or opts.bdat_window ~= math.floor(opts.bdat_window) or opts.bdat_window > 16) then
    error("smtppool.new: option 'bdat_window' must be an integer from 0 to 16", 3)
  end
  if opts.sign_threads ~= nil and (not finite(opts.sign_threads) or opts.sign_threads < 0
    or opts.sign_threads ~= math.floor(opts.sign_threads) or opts.sign_threads > 64) then
    error("smtppool.new: option 'sign_threads' must be an integer from 0 to 64", 3)
  end
  for _, k in ipairs({ "outbox_keep", "outbox_lease", "outbox_timeout" }) do
    if opts[k] ~= nil and (not finite(opts[k]) or opts[k] <= 0) then
      error(("smtppool.new: option '%s' must be a positive finite number of seconds"):format(k), 3)
    end
  end
  if opts.outbox_max ~= nil and (not finite(opts.outbox_max) or opts.outbox_max < 0
    or opts.outbox_max ~= math.floor(opts.outbox_max)) then
    error("smtppool.new: option 'outbox_max' must be a whole number (0: no bound)", 3)
  end
  if opts.outbox_name ~= nil and not opts.outbox_name:match("^[%w._:-]+$") then
    error("smtppool.new: option 'outbox_name' takes letters, digits, '.', '_', ':' or '-'", 3)
  end
  for _, k in ipairs({ "outbox_name", "outbox_max", "outbox_keep", "outbox_lease", "outbox_timeout" }) do
    if opts[k] ~= nil and not opts.outbox then error(("smtppool.new: option '%s' needs 'outbox'"):format(k), 3) end
  end
  for _, k in ipairs({ "max_conns", "max_messages_per_conn", "max_recipients_per_message" }) do
    if opts[k] and (not finite(opts[k]) or opts[k] < 1 or opts[k] ~= math.floor(opts[k]) or opts[k] > 100000) then
      error(("smtppool.new: option '%s' must be an integer from 1 to 100000"):format(k), 3)
    end
  end
end


-- This machine's name when it is a valid EHLO name, else "localhost".
function M.default_helo()
  local h = core.hostname()
  if h and valid_helo(h) then return h end
  return "localhost"
end

--- Resolves checked options into the values the pool runs on.
-- @treturn[1] table `tls` (mode), `port`, `helo`, and the defaults filled in
-- @return[2] nil
-- @treturn[2] table a `config` error (an unknown TLS mode, credentials over
--   plaintext without `allow_plaintext_auth`, a port out of range)
function M.resolve(opts)
  -- Port 465 is implicit TLS's (RFC 8314's submissions): a pool given that
  -- port and no mode speaks TLS from the first byte, as Nodemailer does.
  local tls = opts.tls or (opts.port == 465 and "implicit" or "starttls")
  if not M.TLS_MODES[tls] then
    return nil, errors.new("config", ("unknown tls mode '%s' (none, starttls, implicit, opportunistic)"):format(tls))
  end
  if opts.auth and tls == "none" and not opts.allow_plaintext_auth then
    return nil, errors.new("config", "refusing to send credentials with tls = \"none\"; "
      .. "set allow_plaintext_auth = true if you mean it")
  end
  local port = opts.port or (tls == "implicit" and 465 or 25)
  if port ~= math.floor(port) or port < 1 or port > 65535 then
    return nil, errors.new("config", "port must be an integer from 1 to 65535")
  end
  local proxy
  if opts.proxy then
    local perr
    proxy, perr = M.parse_proxy(opts.proxy)
    if not proxy then return nil, errors.new("config", perr) end
  end
  return {
    tls = tls, port = port, helo = opts.helo or M.default_helo(),
    max_conns = opts.max_conns or 1,
    max_messages_per_conn = opts.max_messages_per_conn,
    max_recipients_per_message = opts.max_recipients_per_message,
    max_conn_lifetime = opts.max_conn_lifetime,
    idle_timeout = opts.idle_timeout or 60,
    health_check_after = opts.health_check_after or 30,
    wait_timeout = opts.wait_timeout or 60,
    close_timeout = opts.close_timeout or 5,
    cap_recover_after = opts.cap_recover_after or 600,
    message_timeout = opts.message_timeout,
    limit_probe_after = opts.limit_probe_after or 30,
    -- 0: max_conns is the ceiling on sockets open, as servers count them
    rotate_ahead = opts.rotate_ahead or 0,
    bdat_window = opts.bdat_window or M.BDAT_WINDOW,
    -- DKIM signing threads for batches: nil here means the default, which
    -- depends on the keys (init.lua, sign_threads_default)
    sign_threads = opts.sign_threads,
    proxy = proxy,
  }
end

--- Parses a `proxy` URL: `socks5://[user:password@]host:port` (`socks5h://`
-- alike: the proxy always resolves the server's name) or
-- `http://[user:password@]host:port` (HTTP CONNECT); credentials
-- percent-decoded, never shown in errors.
-- @treturn[1] table `kind` (`"socks5"` or `"http"`), `host`, `port`, `user`, `password`
-- @return[2] nil
-- @treturn[2] string why
function M.parse_proxy(url)
  local scheme, rest = url:match("^(%w+)://(.+)$")
  local kind = ({ socks5 = "socks5", socks5h = "socks5", http = "http" })[scheme or ""]
  local shown = urls.redact(url)
  if not kind then
    return nil, ("proxy must be socks5://, socks5h:// or http:// (host:port), got %s"):format(shown)
  end
  local user, password, hostpart = urls.userinfo(rest, "user")
  if not hostpart then return nil, "a bad %-escape in the proxy's credentials: " .. shown end
  rest = hostpart
  local host, port = rest:match("^%[([%x:.]+)%]:(%d+)/?$")
  if not host then host, port = rest:match("^([^:/%[%]]+):(%d+)/?$") end
  port = tonumber(port)
  if not host or not port or port < 1 or port > 65535 then
    return nil, ("proxy needs host:port, got %s"):format(shown)
  end
  return { kind = kind, host = host, port = port, user = user, password = password }
end

return M
