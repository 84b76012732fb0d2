--- A pooled, limit-aware SMTP client.
--
-- The protocol machine, the codecs and the socket driver are C
-- (`smtppool.core`); this module is the pool users talk to.
--
--     local smtppool = require("smtppool")
--     local pool = assert(smtppool.new{ host = "127.0.0.1", port = 25, tls = "none",
--                                       max_conns = 4, max_messages_per_conn = 5 })
--     local res, err = pool:send_raw{ from = "a@example.org", to = { "b@example.net" },
--                                     data = "Subject: hi\r\n\r\nHello\r\n" }
--     pool:close()
--
-- The pool keeps the invariants of ARCHITECTURE.md: a connection that saw a 421,
-- EOF, reset, malformed reply or timeout is closed and never reused; the
-- message it carried moves to a fresh connection under the retry policy;
-- connections are rotated (QUIT) before the server's per-session cap, which
-- is the least of the configured one, the one the server advertises
-- (RFC 9422 `LIMITS MAILMAX`) and the one the pool learned from the server
-- closing sessions; rate limits are waited for, never exceeded; and every
-- message gets exactly one outcome.
--
-- Runtime failures return `nil, err`; `err` is a table with `kind`, `phase`,
-- `code`, `enhanced`, `text` and `attempts` and prints as one line with
-- `tostring`. Wrong argument types raise.
-- @module smtppool

local core = require("smtppool.core")
local rate = require("smtppool.rate")
local message = require("smtppool.message")
local template = require("smtppool.template")
local campaign = require("smtppool.campaign")
local csv = require("smtppool.csv")
local retry = require("smtppool.retry")

local M = { _VERSION = "0.4.0", retry = retry, message = message, template = template, campaign = campaign,
            csv = csv }
local unpack = table.unpack or unpack -- luacheck: ignore (LuaJIT)

local error_mt = core.error_mt
local now = core.now

--- Makes an error value.
-- @tparam string kind one of `transient`, `permanent`, `connection`,
--   `ambiguous`, `protocol`, `tls`, `auth`, `invalid`, `config`
-- @tparam string text what went wrong, for a human
-- @tparam[opt] table fields more fields (`phase`, `code`, `enhanced`...)
-- @treturn table the error value
function M.error(kind, text, fields)
  local e = {}
  if fields then
    for k, v in pairs(fields) do e[k] = v end
  end
  e.kind, e.text = kind, text
  return setmetatable(e, error_mt)
end

--- True when `v` is an smtppool error value.
function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == error_mt
end

local TLS_MODES = { none = true, starttls = true, implicit = true, opportunistic = true }
local PHASES = { "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "data_end", "rset", "noop", "quit" }

-- Option schema: name -> expected Lua type. Unknown names are misuse.
local OPTIONS = {
  host = "string", port = "number", tls = "string", helo = "string",
  connect_timeout = "number", timeouts = "table", on_event = "function",
  max_conns = "number", close_timeout = "number", wait_timeout = "number",
  idle_timeout = "number", max_messages_per_conn = "number", max_conn_lifetime = "number",
  health_check_after = "number", rate = "table", retry = "function",
  ca_file = "string", ca_path = "string", cert_file = "string", key_file = "string",
  server_name = "string", insecure_skip_verify = "boolean", auth = "table",
  allow_plaintext_auth = "boolean", dkim = "table", message_timeout = "number",
  cap_recover_after = "number",
}

-- A real, finite number: NaN and the infinities pass `type` and most range
-- checks (NaN compares false with everything), and a NaN timeout waits forever.
local function finite(x)
  return type(x) == "number" and x == x and x > -math.huge and x < math.huge
end
M._finite = finite

-- RFC 5321 4.1.3: the EHLO name is a domain or an address literal; nothing
-- else (a space, CR, LF, NUL) may reach the command line.
local function valid_helo(h)
  if #h == 0 or #h > 255 then return false end
  if h:sub(1, 1) == "[" then return h:match("^%[[%w:.%-]+%]$") ~= nil end
  return h:match("^[%w_%-]+[%w_.%-]*$") ~= nil and not h:find("..", 1, true) and h:sub(-1) ~= "."
end
M._valid_helo = valid_helo

local AUTH_OPTIONS = { user = "string", password = "string", token = true, mechanism = "string" }
local MECHANISMS = { PLAIN = true, LOGIN = true, ["CRAM-MD5"] = true, XOAUTH2 = true }

-- Why a secret (password or token) cannot be sent, or nil. CR, LF and NUL
-- never belong to a credential; ^A would split XOAUTH2's fields.
function M._bad_secret(v)
  if type(v) ~= "string" then return nil end
  if v:find("[%z\r\n\1]") then return " must not contain CR, LF, NUL or ^A" end
  return nil
end

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
      if not finite(v) or v <= 0 then
        error(("smtppool.new: timeout '%s' must be a positive finite number"):format(k), 3)
      end
    end
  end
  for _, k in ipairs({ "connect_timeout", "close_timeout", "wait_timeout", "idle_timeout",
                       "max_conn_lifetime", "health_check_after", "message_timeout", "cap_recover_after" }) do
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
      error("smtppool.new: auth.mechanism must be PLAIN, LOGIN, CRAM-MD5 or XOAUTH2", 3)
    end
    if (opts.auth.password == nil) == (opts.auth.token == nil) then
      error("smtppool.new: auth takes a password or a token (for XOAUTH2), not both or neither", 3)
    end
    if opts.auth.user:find("[%z\1-\31\127]") then
      error("smtppool.new: auth.user must not contain control bytes (CR, LF, NUL...)", 3)
    end
    local bad = M._bad_secret(opts.auth.password or opts.auth.token)
    if bad then error("smtppool.new: auth." .. (opts.auth.password and "password" or "token") .. bad, 3) end
  end
  for _, k in ipairs({ "max_conns", "max_messages_per_conn" }) do
    if opts[k] and (not finite(opts[k]) or opts[k] < 1 or opts[k] ~= math.floor(opts[k]) or opts[k] > 100000) then
      error(("smtppool.new: option '%s' must be an integer from 1 to 100000"):format(k), 3)
    end
  end
end

local Pool = {}
Pool.__index = Pool

-- This machine's name when it is a valid EHLO name, else "localhost".
local function default_helo()
  local h = core.hostname()
  if h and valid_helo(h) then return h end
  return "localhost"
end

--- Creates a pool. No connection is opened until a message needs one.
-- @tparam table opts
--
-- * `host` (string, required): server name or address.
-- * `port` (number, default 25).
-- * `tls` (string, default `"starttls"`): `"starttls"` (fails closed when
--   the server does not offer it), `"implicit"` (TLS from the first byte,
--   port 465 by default), `"opportunistic"` (STARTTLS when offered) or
--   `"none"`.
-- * `ca_file`, `ca_path` (strings, default the system store): trust anchors.
-- * `server_name` (string, default `host`): checked against the
--   certificate and sent as SNI.
-- * `cert_file`, `key_file` (strings): a client certificate and its key.
-- * `insecure_skip_verify` (boolean, default false): accept any certificate.
-- * `auth` (table): `user` with `password`, or with `token` (a string or a
--   function returning one, called for each new connection) for XOAUTH2;
--   `mechanism` (`PLAIN`, `LOGIN`, `CRAM-MD5`, `XOAUTH2`) to insist on one,
--   else the strongest both sides speak.
-- * `allow_plaintext_auth` (boolean, default false): permit credentials over
--   a connection without TLS.
-- * `dkim` (table, or an array of tables to sign with several keys):
--   `domain`, `selector`, `key` (PEM text or a file path), `algorithm`
--   (`"rsa-sha256"`, the default, or `"ed25519-sha256"`), `headers` (names
--   to sign; default From, Reply-To, Sender, Subject, Date, Message-ID, To,
--   Cc, MIME and List-Unsubscribe fields present). Relaxed/relaxed; every
--   message the pool sends is signed.
-- * `helo` (string, default this machine's host name): the EHLO name, a
--   domain or an address literal (`"[192.0.2.1]"`); anything else (a
--   space, CR, LF) is refused.
-- * `max_conns` (default 1): connections open at once.
-- * `max_messages_per_conn` (default none): transactions per connection
--   before it is rotated (QUIT and replaced). The pool also honours the
--   server's `LIMITS MAILMAX` and a cap it learns when the server declares
--   three sessions exhausted after the same count with none in between
--   carrying more (never below 2).
-- * `cap_recover_after` (seconds, default 600): a learned cap is forgotten
--   after this long without an exhaustion signal.
-- * `message_timeout` (seconds, default none): how long a message may take
--   from submission to outcome, retries included; at the deadline a
--   message on the wire has its connection cut (`ambiguous` when its final
--   dot had left) and a waiting one fails.
-- * `max_conn_lifetime` (seconds, default none): rotate older connections.
-- * `idle_timeout` (seconds, default 60): idle connections older than this
--   are closed with QUIT at the pool's next use instead of being reused.
-- * `health_check_after` (seconds, default 30): a connection idle this long
--   is checked with NOOP before it carries a message.
-- * `wait_timeout` (seconds, default 60): how long the message at the head
--   of the queue may wait for a connection before it fails.
-- * `rate` (table): `connections_per_min`, `auth_per_min`,
--   `messages_per_sec` (or `messages_per_min`); each limit is waited for,
--   never exceeded, in any sliding window. `{limit, per_seconds}` under the
--   names `connections`, `auth`, `messages` sets another window length.
-- * `retry` (function, default `smtppool.retry.backoff()`): the retry
--   policy, `function(err, attempt, msg) -> delay | false`.
-- * `connect_timeout` (seconds, default 30).
-- * `timeouts` (table): reply timeouts in seconds per phase (`greeting`,
--   `ehlo`, `starttls`, `auth`, `mail`, `rcpt`, `data`, `data_end`, `rset`,
--   `noop`, `quit`); defaults are RFC 5321 section 4.5.3.2's (5 minutes;
--   `data` 3, `data_end` 10). Each bounds a whole reply, counted from the
--   last write: bytes trickling in do not restart it.
-- * `close_timeout` (seconds, default 5): how long `close` waits for QUIT.
-- * `on_event` (function): called with one table per event: `connect`,
--   `ready`, `rotate`, `learn_cap`, `unlearn_cap`, `retry`, `discard`,
--   `rate_wait`, `idle_close`, `close`.
-- @treturn[1] Pool
-- @return[2] nil
-- @treturn[2] table error value (kind `config`: an unreadable CA or key,
--   credentials with `tls = "none"` and no `allow_plaintext_auth`...)
function M.new(opts)
  check_options(opts)
  local tls = opts.tls or "starttls"
  if not TLS_MODES[tls] then
    return nil, M.error("config", ("unknown tls mode '%s' (none, starttls, implicit, opportunistic)"):format(tls))
  end
  local tls_ctx
  if tls ~= "none" then
    local e
    tls_ctx, e = core.tls_context{ ca_file = opts.ca_file, ca_path = opts.ca_path, cert_file = opts.cert_file,
      key_file = opts.key_file, insecure_skip_verify = opts.insecure_skip_verify }
    if not tls_ctx then return nil, e end
  end
  if opts.auth and tls == "none" and not opts.allow_plaintext_auth then
    return nil, M.error("config", "refusing to send credentials with tls = \"none\"; "
      .. "set allow_plaintext_auth = true if you mean it")
  end
  local signers, derr = M._dkim_signers(opts.dkim)
  if not signers then return nil, derr end
  local port = opts.port or (tls == "implicit" and 465 or 25)
  if port ~= math.floor(port) or port < 1 or port > 65535 then
    return nil, M.error("config", "port must be an integer from 1 to 65535")
  end
  local self = setmetatable({
    opts = opts,
    conn_opts = {
      host = opts.host, port = port, helo = opts.helo or default_helo(),
      connect_timeout = opts.connect_timeout, timeouts = opts.timeouts,
      tls = tls_ctx, tls_mode = tls, server_name = opts.server_name,
    },
    tls_ctx = tls_ctx,
    auth = opts.auth,
    signers = signers,
    max_conns = opts.max_conns or 1,
    max_per_conn = opts.max_messages_per_conn,
    lifetime = opts.max_conn_lifetime,
    idle_timeout = opts.idle_timeout or 60,
    health_after = opts.health_check_after or 30,
    wait_timeout = opts.wait_timeout or 60,
    close_timeout = opts.close_timeout or 5,
    policy = opts.retry or retry.backoff(),
    windows = rate.from_options(opts.rate),
    on_event = opts.on_event,
    conns = {},          -- connection records
    learned_cap = nil,   -- learned per-session cap
    cap_seen = {},       -- cap observations not yet contradicted: count -> times seen
    cap_recover_after = opts.cap_recover_after or 600,
    message_timeout = opts.message_timeout,
    closed = false,
    next_id = 0,
    counters = { opened = 0, closed_by_us = 0, closed_by_server = 0, rotated = 0,
                 sent = 0, failed = 0, retried = 0, ambiguous = 0, rate_waits = 0,
                 moved = 0 },
  }, Pool)
  return self
end

function Pool:_emit(ev)
  if self.on_event then
    local ok, e = pcall(self.on_event, ev)
    if not ok and not self._hook_warned then
      -- A broken hook must not break delivery; report it once on stderr.
      self._hook_warned = true
      io.stderr:write("smtppool: on_event hook failed: ", tostring(e), "\n")
    end
  end
end

-- ===== connections =====

-- Connection record states:
--   connecting  opened, greeting/EHLO not done yet (rec.job may be bound to it)
--   idle        ready for a transaction
--   busy        a transaction in flight (rec.job)
--   settling    transaction reported, READY not yet back (RSET in flight)
--   checking    NOOP health check in flight
--   quitting    QUIT sent
--   gone        closed and removed

function Pool:_remove(rec)
  if rec.state ~= "gone" then self:_note_session(rec.sent) end
  for i, r in ipairs(self.conns) do
    if r == rec then table.remove(self.conns, i) break end
  end
  rec.c:close()
  rec.state = "gone"
end

-- The session cap in force for a connection: the least of configured,
-- advertised and learned.
function Pool:_cap(rec)
  local cap = self.max_per_conn
  local adv = rec.caps and rec.caps.mailmax
  if adv and (not cap or adv < cap) then cap = adv end
  if self.learned_cap and (not cap or self.learned_cap < cap) then cap = self.learned_cap end
  return cap
end

-- QUITs a connection; reason "cap", "lifetime" or "exhausted" makes it a
-- rotation, "idle" an idle close.
function Pool:_quit(rec, reason)
  rec.c:quit()
  rec.state = "quitting"
  if reason == "idle" then
    self:_emit({ type = "idle_close", conn = rec.id, messages = rec.sent })
  elseif reason then
    self.counters.rotated = self.counters.rotated + 1
    self:_emit({ type = "rotate", conn = rec.id, messages = rec.sent, reason = reason })
  end
end

-- The credentials for one new connection (a token function is asked each time).
function Pool:_credentials()
  local a = self.auth
  local secret, mech = a.password, a.mechanism
  if a.token ~= nil then
    secret = a.token
    if type(secret) == "function" then
      local ok, tok = pcall(secret)
      if not ok or type(tok) ~= "string" then
        return nil, M.error("auth", "the auth.token function did not return a token: "
          .. (ok and type(tok) or tostring(tok)), { phase = "auth" })
      end
      local bad = M._bad_secret(tok)
      if bad then return nil, M.error("auth", "the token from auth.token" .. bad, { phase = "auth" }) end
      secret = tok
    end
    mech = mech or "XOAUTH2"
  end
  return { user = a.user, secret = secret, mechanism = mech, allow_plaintext = self.opts.allow_plaintext_auth }
end

-- Opens a connection, spending from the connection (and AUTH) windows first.
function Pool:_open(t, job)
  local w = self.windows.connections
  if w then w:spend(t) end
  self.conn_opts.auth = nil
  if self.auth then
    local aw = self.windows.auth
    if aw then aw:spend(t) end
    local cred, e = self:_credentials()
    if not cred then return nil, e end
    self.conn_opts.auth = cred
  end
  local c, e = core.connect(self.conn_opts)
  self.conn_opts.auth = nil
  if not c then return nil, e end
  self.next_id = self.next_id + 1
  local rec = { c = c, id = self.next_id, state = "connecting", txs = 0, sent = 0, born = t, last_used = t,
                job = job }
  self.conns[#self.conns + 1] = rec
  self.counters.opened = self.counters.opened + 1
  self:_emit({ type = "connect", conn = rec.id, host = self.conn_opts.host, port = self.conn_opts.port })
  return rec
end

-- ===== jobs =====

-- A job is one message on its way: it is in the queue, deferred, bound to a
-- connecting connection, or in flight on a busy one. Never in two places.

local function classify_cap_signal(rec, e)
  -- The server declaring the session exhausted: a 421 anywhere, or any 4xx
  -- to MAIL, on a connection that already carried a transaction.
  if rec.txs <= 1 or not e.code then return false end
  if e.code == 421 then return true end
  return e.phase == "mail" and e.code >= 400 and e.code < 500
end

local MAX_FREE_MOVES = 3

-- Learning a session cap (ARCHITECTURE.md, invariant 3). A server with a real cap
-- ends every session at the same count; ordinary failures (a 451 now and
-- then, a random 421) end them at scattered counts while other sessions
-- carry more. So a count n is learned only when the server signalled
-- exhaustion after n transactions CAP_EVIDENCE times with no session in
-- between carrying more than n, and never below CAP_FLOOR. A learned cap is
-- forgotten after `cap_recover_after` quiet seconds, so a cap learned from
-- a bad spell recovers (a real one is learned again at the cost of a few
-- moved messages).
local CAP_EVIDENCE = 3
local CAP_FLOOR = 2

-- A session ended having carried n messages: evidence against any cap below n.
function Pool:_note_session(n)
  for k in pairs(self.cap_seen) do
    if k < n then self.cap_seen[k] = nil end
  end
end

-- The server declared a session exhausted after n transactions.
function Pool:_observe_cap(n, t)
  self.cap_signal_at = t
  if n < CAP_FLOOR then return end
  self.cap_seen[n] = (self.cap_seen[n] or 0) + 1
  if self.cap_seen[n] >= CAP_EVIDENCE and (not self.learned_cap or n < self.learned_cap) then
    self.learned_cap = n
    self:_emit({ type = "learn_cap", cap = n })
  end
end

-- Forgets a learned cap after a quiet period (no exhaustion signal).
function Pool:_maybe_unlearn_cap(t)
  if self.learned_cap and t - (self.cap_signal_at or t) >= self.cap_recover_after then
    local old = self.learned_cap
    self.learned_cap = nil
    self.cap_seen = {}
    self.cap_signal_at = t
    self:_emit({ type = "unlearn_cap", cap = old })
  end
end

-- Calls user code (on_result, a template, the source iterator) so that an
-- error it raises cannot leave the loop with messages unreported: the first
-- such error is kept, no new message is taken, the ones already on the wire
-- run to their outcome, and the error is raised once the loop is done.
local function guarded(run, what, fn, ...)
  local ok, a, b = pcall(fn, ...)
  if ok then return true, a, b end
  if not run.user_error then
    run.user_error = { what = what, value = a }
    run.source_done = true
  end
  return false
end

function Pool:_finish(run, job, res, err)
  local group = job.group
  if group then
    -- One transaction of a message split for the server's RCPTMAX: the
    -- message's outcome waits for every part.
    group.parts[job.part] = { res = res, err = err, job = job }
    group.pending = group.pending - 1
    if group.pending > 0 then return end
    job = group.job
    res, err = M._merge_parts(group)
  end
  run.inflight = run.inflight - 1
  run.done = run.done + 1
  if res then
    res.attempts = job.attempts
    if job.ambiguous then res.ambiguous = true end
    self.counters.sent = self.counters.sent + 1
  else
    err.attempts = job.attempts
    if job.ambiguous and err.kind ~= "ambiguous" then err.ambiguous = true end
    self.counters.failed = self.counters.failed + 1
  end
  guarded(run, "on_result", run.on_result, job.user_msg or job.msg, res, err, job)
end

-- The one outcome of a message sent as several transactions: sent when any
-- recipient was accepted (the others listed as rejected, with the reason of
-- their part), else the failure of the first part, ambiguous when any part
-- may have been delivered. Attempts are the most any part took.
function M._merge_parts(group)
  local recipients, rejected, first_ok, first_err, ambiguous_err = {}, {}, nil, nil, nil
  local attempts, ambiguous = 0, false
  for _, p in ipairs(group.parts) do
    attempts = math.max(attempts, p.job.attempts)
    if p.job.ambiguous then ambiguous = true end
    if p.res then
      first_ok = first_ok or p.res
      for _, r in ipairs(p.res.recipients) do recipients[#recipients + 1] = r end
    else
      local e = p.err
      first_err = first_err or e
      if e.kind == "ambiguous" or e.ambiguous then ambiguous_err = ambiguous_err or e end
      local answered = {}
      for _, r in ipairs(e.recipients or {}) do answered[r.address] = r end
      for _, a in ipairs(p.job.to) do
        recipients[#recipients + 1] = answered[a] or { address = a, ok = false, code = e.code,
          enhanced = e.enhanced, text = e.text }
      end
    end
  end
  for _, r in ipairs(recipients) do
    if not r.ok then rejected[#rejected + 1] = r end
  end
  group.job.attempts = attempts
  group.job.ambiguous = ambiguous or nil
  if first_ok then
    local res = { code = first_ok.code, enhanced = first_ok.enhanced, text = first_ok.text,
                  recipients = recipients, rejected = rejected, transactions = #group.parts }
    if ambiguous_err then res.ambiguous = true end
    return res
  end
  local e = ambiguous_err or first_err
  local out = {}
  for k, v in pairs(e) do out[k] = v end
  out.recipients = recipients
  return nil, setmetatable(out, error_mt)
end

-- Decides what happens to a job after a failed attempt.
function Pool:_after_failure(run, job, err, rec, t)
  local expired = job.deadline and t >= job.deadline
  if rec and not expired and (classify_cap_signal(rec, err) or
      (rec.txs > 1 and err.kind == "connection" and not err.code)) and job.free_moves < MAX_FREE_MOVES then
    -- Exhausted or stale reused connection: not the message's fault.
    job.free_moves = job.free_moves + 1
    self.counters.moved = self.counters.moved + 1
    table.insert(run.queue, 1, job)
    job.queued_at = t
    return
  end
  job.attempts = job.attempts + 1
  if err.kind == "ambiguous" then
    job.ambiguous = true
    self.counters.ambiguous = self.counters.ambiguous + 1
  end
  local ok, delay = pcall(self.policy, err, job.attempts, job.msg)
  if not ok then
    err = M.error(err.kind, err.text .. " (retry policy failed: " .. tostring(delay) .. ")", err)
    delay = false
  end
  if type(delay) == "number" and not (delay >= 0 and delay < math.huge) then
    err = M.error(err.kind, err.text .. " (retry policy returned " .. tostring(delay) .. ")", err)
    delay = false
  end
  if delay and job.deadline and t + delay >= job.deadline then
    -- The retry could not start before the message's deadline.
    err = M.error(err.kind, err.text .. (" (message_timeout %gs reached)"):format(self.message_timeout), err)
    delay = false
  end
  if type(delay) == "number" then
    self.counters.retried = self.counters.retried + 1
    self:_emit({ type = "retry", attempt = job.attempts, delay = delay, err = err })
    job.not_before = t + delay
    run.deferred[#run.deferred + 1] = job
    return
  end
  self:_finish(run, job, nil, err)
end

local function outcome(t)
  local rejected = {}
  for _, r in ipairs(t.recipients) do
    if not r.ok then rejected[#rejected + 1] = r end
  end
  if t.ok then
    return { code = t.code, enhanced = t.enhanced, text = t.text, recipients = t.recipients,
             rejected = rejected }
  end
  local e = t.err
  if #t.recipients > 0 and t.recipients[1].code then e.recipients = t.recipients end
  return nil, e
end

-- RFC 9422 LIMITS RCPTMAX: a message with more recipients than the server
-- takes in one transaction is sent as several, each with at most rcptmax
-- recipients; the parts are queued next and the message gets one outcome
-- when all have theirs (never half-sent and reported as whole).
function Pool:_split(run, job, max)
  local group = { job = job, parts = {}, pending = 0 }
  local parts = {}
  for i = 1, #job.to, max do
    local to = { unpack(job.to, i, math.min(i + max - 1, #job.to)) }
    local part = { msg = job.msg, to = to, attempts = job.attempts, free_moves = 0, queued_at = job.queued_at,
                   user_msg = job.user_msg, deadline = job.deadline, group = group }
    parts[#parts + 1] = part
    part.part = #parts
  end
  group.pending = #parts
  for i = #parts, 2, -1 do table.insert(run.queue, 1, parts[i]) end
  return parts[1]
end

function Pool:_start(run, rec, job, t)
  local rmax = rec.caps and rec.caps.rcptmax
  if rmax and #job.to > rmax and not job.group then job = self:_split(run, job, rmax) end
  local ok, err = rec.c:start(job.msg.from, job.to, job.msg.data, job.msg.dsn)
  if not ok then
    -- Refused before a byte was sent (bad address, size over the server's
    -- limit...): final, and the connection stays good.
    rec.state = "idle"
    self:_finish(run, job, nil, err)
    return
  end
  local w = self.windows.messages
  if w then w:spend(t) end
  rec.state = "busy"
  rec.job = job
  rec.txs = rec.txs + 1
  rec.last_used = t
end

-- ===== events =====

function Pool:_dispatch(run, rec, t)
  while true do
    local ev = rec.c:next_event()
    if not ev then return end
    if ev == "ready" then
      if rec.state == "connecting" then
        rec.caps = rec.c:caps()
        self:_emit({ type = "ready", conn = rec.id, caps = rec.caps })
      end
      if rec.state ~= "quitting" then
        rec.state = "idle"
        rec.last_used = t
      end
      if rec.retire then self:_quit(rec, "exhausted") end
    elseif ev == "tx" then
      local job = rec.job
      rec.job = nil
      rec.state = "settling"
      local tx = rec.c:tx()
      if job then
        local res, err = outcome(tx)
        if res then
          job.attempts = job.attempts + 1
          rec.sent = rec.sent + 1
          self:_finish(run, job, res)
        else
          if classify_cap_signal(rec, err) then
            self:_observe_cap(rec.txs - 1, t)
            rec.retire = true -- 4xx to MAIL leaves the session open: QUIT it once RSET is done
          end
          self:_after_failure(run, job, err, rec, t)
        end
      end
    elseif ev == "error" then
      local e = rec.c:error()
      local job = rec.job
      rec.job = nil
      self.counters.closed_by_server = self.counters.closed_by_server + 1
      self:_emit({ type = "discard", conn = rec.id, err = e, messages = rec.sent })
      self:_remove(rec)
      if e.kind == "auth" and e.code then
        -- The server refused the credentials: every further try would be
        -- refused too, and servers lock accounts that keep trying.
        self.auth_failed = e
      elseif e.kind == "tls" then
        -- A certificate that fails verification (or a server without the
        -- STARTTLS we require) fails every connection alike: the queue of
        -- this call fails once with it rather than one connection per message.
        run.tls_failed = e
      end
      if job then
        -- Died before it could carry the message bound to it (connect,
        -- greeting, EHLO): that is the message's attempt.
        self:_after_failure(run, job, e, nil, t)
      end
      return
    elseif ev == "closed" then
      self.counters.closed_by_us = self.counters.closed_by_us + 1
      self:_emit({ type = "close", conn = rec.id, messages = rec.sent })
      self:_remove(rec)
      return
    end
  end
end

-- ===== the loop =====

local function rate_wait(self, name, t)
  local w = self.windows[name]
  return w and w:wait_time(t) or 0
end

-- Runs messages pulled from next_msg() through the pool until all have an
-- outcome. on_result(msg, res, err) is called once per message.
function Pool:_run(next_msg, on_result)
  local run = {
    queue = {}, deferred = {}, inflight = 0, done = 0, on_result = on_result,
    source_done = false,
  }
  local lookahead = self.max_conns * 2
  local waits_noted = {}

  while true do
    local t = now()

    -- Pull messages lazily: enough to keep every connection busy.
    while not run.source_done and #run.queue < lookahead do
      local ok, msg = guarded(run, "the message source", next_msg)
      if not ok then break end
      if msg == nil then run.source_done = true break end
      local job = { msg = msg.msg, to = msg.to, attempts = 0, free_moves = 0, queued_at = t,
                    user_msg = msg.user_msg or msg.msg,
                    deadline = self.message_timeout and t + self.message_timeout }
      run.inflight = run.inflight + 1
      if msg.err then
        self:_finish(run, job, nil, msg.err)
      else
        run.queue[#run.queue + 1] = job
      end
    end

    -- Deferred messages whose time has come go back to the queue.
    local next_wake
    for i = #run.deferred, 1, -1 do
      local job = run.deferred[i]
      if job.not_before <= t then
        table.remove(run.deferred, i)
        job.queued_at = t
        run.queue[#run.queue + 1] = job
      elseif not next_wake or job.not_before < next_wake then
        next_wake = job.not_before
      end
    end

    -- After a refused login, nothing more is sent: the queue fails with it.
    -- After a TLS failure, this call's queue fails with it.
    local fatal = self.auth_failed or run.tls_failed
    if fatal then
      for _, list in ipairs({ run.queue, run.deferred }) do
        while #list > 0 do
          local job = table.remove(list, 1)
          job.attempts = math.max(job.attempts, 1)
          self:_finish(run, job, nil, M.error(fatal.kind, fatal.text, {
            phase = fatal.phase, code = fatal.code, enhanced = fatal.enhanced }))
        end
      end
    end

    -- message_timeout: a message still waiting for a connection when its
    -- deadline comes fails; one on the wire has its connection cut (the
    -- connection's state is unknown after that, so it is never reused).
    if self.message_timeout then
      for i = #run.queue, 1, -1 do
        local job = run.queue[i]
        if t >= job.deadline then
          table.remove(run.queue, i)
          job.attempts = math.max(job.attempts, 1)
          self:_finish(run, job, nil, M.error("connection",
            ("message_timeout (%gs) reached before a connection could take the message"):format(self.message_timeout),
            { phase = "connect" }))
        elseif not next_wake or job.deadline < next_wake then
          next_wake = job.deadline
        end
      end
      for _, rec in ipairs(self.conns) do
        local job = rec.job
        if job and job.deadline then
          if t >= job.deadline then
            rec.c:abort(("message_timeout (%gs) reached"):format(self.message_timeout))
          elseif not next_wake or job.deadline < next_wake then
            next_wake = job.deadline
          end
        end
      end
    end
    self:_maybe_unlearn_cap(t)

    if run.inflight == 0 and run.source_done then break end

    local function wake_at(x)
      if x and (not next_wake or x < next_wake) then next_wake = x end
    end

    -- A rate window that holds work back for w seconds: counted and
    -- reported once per wait, and the loop wakes when it opens.
    local function held(limit, w)
      if w <= 0 then
        waits_noted[limit] = nil
        return false
      end
      if not waits_noted[limit] then
        waits_noted[limit] = true
        self.counters.rate_waits = self.counters.rate_waits + 1
        self:_emit({ type = "rate_wait", limit = limit, seconds = w })
      end
      wake_at(t + w)
      return true
    end

    -- Idle connections: retire, check or load them.
    for _, rec in ipairs({ unpack(self.conns) }) do
      if rec.state == "idle" then
        local cap = self:_cap(rec)
        if cap and rec.txs >= cap then
          self:_quit(rec, "cap")
        elseif self.lifetime and t - rec.born >= self.lifetime then
          self:_quit(rec, "lifetime")
        elseif t - rec.last_used >= self.idle_timeout then
          self:_quit(rec, "idle")
        elseif #run.queue > 0 and rec.txs > 0 and t - rec.last_used >= self.health_after then
          rec.c:noop()
          rec.state = "checking"
        elseif #run.queue > 0 then
          if not held("messages", rate_wait(self, "messages", t)) then
            self:_start(run, rec, table.remove(run.queue, 1), t)
          end
        end
      end
    end

    -- Open connections for messages still queued.
    local open_conns = #self.conns
    while #run.queue > 0 and open_conns < self.max_conns do
      if held("connections", math.max(rate_wait(self, "connections", t), rate_wait(self, "auth", t))) then
        break
      end
      local job = table.remove(run.queue, 1)
      local rec, err = self:_open(t, job)
      if not rec then
        self:_after_failure(run, job, err, nil, t)
        break -- resolution failed: let the retry policy pace the next try
      end
      open_conns = open_conns + 1
    end

    -- Nothing could start a connection for the head of the queue in time.
    -- Time spent waiting on a rate limit does not count: that wait is chosen.
    local head = run.queue[1]
    if head and (waits_noted.connections or waits_noted.messages) then
      head.queued_at = t
    end
    if head then
      if t - head.queued_at >= self.wait_timeout then
        table.remove(run.queue, 1)
        head.attempts = math.max(head.attempts, 1)
        self:_finish(run, head, nil, M.error("connection",
          ("no connection became free within wait_timeout (%gs)"):format(self.wait_timeout),
          { phase = "connect" }))
      else
        wake_at(head.queued_at + self.wait_timeout)
      end
    end

    -- Everything may have ended here (a message refused before sending).
    if run.inflight == 0 and run.source_done then break end

    local timeout = next_wake and math.max(0, next_wake - t) or -1
    local list = {}
    for i, rec in ipairs(self.conns) do list[i] = rec.c end
    if #list == 0 and timeout < 0 then
      if run.inflight > 0 and #run.queue == 0 and #run.deferred == 0 then
        error("smtppool: internal error: messages in flight with no connection")
      end
    else
      core.wait(list, timeout)
    end
    t = now()
    for _, rec in ipairs({ unpack(self.conns) }) do
      self:_dispatch(run, rec, t)
      -- A fresh connection that just became ready takes its bound message now.
      if rec.state == "idle" and rec.job then
        local job = rec.job
        rec.job = nil
        local w = rate_wait(self, "messages", t)
        if w > 0 then
          table.insert(run.queue, 1, job)
        else
          self:_start(run, rec, job, t)
        end
      end
    end
  end
  local ue = run.user_error
  if ue then
    -- Every message taken has its outcome by now; the caller's code failed.
    -- An error value (a table) goes up as it is, for callers that catch it.
    if type(ue.value) == "table" then error(ue.value, 0) end
    error(("smtppool: %s raised: %s (every message taken before it has been reported)"):format(ue.what,
      tostring(ue.value)), 0)
  end
end

-- ===== public API =====

local function check_raw(msg, fname, level)
  if type(msg) ~= "table" then
    error(fname .. ": message must be a table, got " .. type(msg), level)
  end
  if type(msg.from) ~= "string" then
    error(fname .. ": 'from' must be a string", level)
  end
  local to = msg.to
  if type(to) == "string" then to = { to } end
  if type(to) ~= "table" then
    error(fname .. ": 'to' must be a string or an array of strings", level)
  end
  for i, a in ipairs(to) do
    if type(a) ~= "string" then
      error(("%s: recipient %d must be a string, got %s"):format(fname, i, type(a)), level)
    end
  end
  if type(msg.data) ~= "string" then
    error(fname .. ": 'data' must be a string holding an RFC 5322 message", level)
  end
  if msg.dsn ~= nil and type(msg.dsn) ~= "table" then
    error(fname .. ": 'dsn' must be a table", level)
  end
  return to
end

local DKIM_FIELDS = { domain = "string", selector = "string", key = "string", algorithm = "string", headers = "table" }

-- Loads the DKIM keys of the `dkim` option (one table or an array of them):
-- a bad key is a config error at new, not at the first send.
function M._dkim_signers(cfg)
  if cfg == nil then return {} end
  local list = cfg[1] and cfg or { cfg }
  local out = {}
  for i, c in ipairs(list) do
    if type(c) ~= "table" then error("smtppool.new: dkim entries must be tables", 4) end
    for k, v in pairs(c) do
      if not DKIM_FIELDS[k] then error(("smtppool.new: unknown dkim option '%s'"):format(tostring(k)), 4) end
      if type(v) ~= DKIM_FIELDS[k] then error(("smtppool.new: dkim.%s must be a %s"):format(k, DKIM_FIELDS[k]), 4) end
    end
    for _, k in ipairs({ "domain", "selector", "key" }) do
      if not c[k] then error(("smtppool.new: dkim.%s is required"):format(k), 4) end
    end
    for _, k in ipairs({ "domain", "selector" }) do
      if not c[k]:match("^[%w._-]+$") then
        return nil, M.error("config", ("dkim %d: %s '%s' is not a valid name"):format(i, k, c[k]))
      end
    end
    local alg = c.algorithm or "rsa-sha256"
    if alg ~= "rsa-sha256" and alg ~= "ed25519-sha256" then
      return nil, M.error("config", ("dkim %d: algorithm must be rsa-sha256 or ed25519-sha256"):format(i))
    end
    local key, e = core.dkim_key(c.key, alg)
    if not key then
      e.text = ("dkim %d: %s"):format(i, e.text)
      return nil, e
    end
    local headers
    if c.headers then
      for _, h in ipairs(c.headers) do
        if type(h) ~= "string" or not h:match("^[!-9;-~]+$") then
          return nil, M.error("config", ("dkim %d: bad header name '%s'"):format(i, tostring(h)))
        end
      end
      headers = table.concat(c.headers, ":"):lower()
    end
    out[#out + 1] = { key = key, domain = c.domain, selector = c.selector, headers = headers }
  end
  return out
end

-- The keys that sign one message: the pool's, unless the message says
-- `dkim = false` or gives its own configuration (keys loaded once, cached).
function Pool:_signers_for(msg)
  local d = msg.dkim
  if d == nil then return self.signers end
  if d == false then return {} end
  if type(d) ~= "table" then
    return nil, M.error("invalid", "'dkim' must be false or a DKIM configuration", { attempts = 0 })
  end
  self.dkim_cache = self.dkim_cache or setmetatable({}, { __mode = "k" })
  local cached = self.dkim_cache[d]
  if cached then return cached end
  local ok, signers, err = pcall(M._dkim_signers, d)
  if not ok then
    return nil, M.error("invalid", tostring(signers):gsub("^smtppool.new: ", ""), { attempts = 0 })
  end
  if not signers then
    return nil, M.error("invalid", err.text, { attempts = 0 })
  end
  self.dkim_cache[d] = signers
  return signers
end

-- Prepends one DKIM-Signature per configured key (RSA and Ed25519 may sign
-- side by side).
local function sign(signers, data)
  if #signers == 0 then return data end
  local t = os.time()
  local sigs = {}
  if type(data) == "table" then
    -- Streaming segments: hash the body once (files read as they will be
    -- sent), then sign the header block with that hash for every key.
    local first = data[1]
    local he = first:find("\r\n\r\n", 1, true)
    local hdr = first:sub(1, he + 1)
    local body = { first:sub(he + 4) }
    for i = 2, #data do body[i] = data[i] end
    local bh, e = core.body_hash(body)
    if not bh then return nil, e end
    for i, s in ipairs(signers) do
      local h, se = s.key:sign_hashed(hdr, s.domain, s.selector, s.headers, t, bh)
      if not h then return nil, se end
      sigs[i] = h
    end
    local out = { table.concat(sigs) .. first }
    for i = 2, #data do out[i] = data[i] end
    return out
  end
  for i, s in ipairs(signers) do
    local h, e = s.key:sign(data, s.domain, s.selector, s.headers, t)
    if not h then return nil, e end
    sigs[i] = h
  end
  return table.concat(sigs) .. data
end

-- DSN options are checked here, so a bad one is that message's invalid
-- failure rather than an error raised in the middle of a batch.
local NOTIFY = { success = true, failure = true, delay = true, never = true }
local function check_dsn(d)
  if d == nil then return nil end
  if type(d) ~= "table" then return "'dsn' must be a table" end
  for k in pairs(d) do
    if k ~= "ret" and k ~= "envid" and k ~= "notify" and k ~= "orcpt" then
      return ("unknown dsn option '%s'"):format(tostring(k))
    end
  end
  if d.ret ~= nil and d.ret ~= "full" and d.ret ~= "hdrs" then return "dsn.ret must be 'full' or 'hdrs'" end
  if d.envid ~= nil and (type(d.envid) ~= "string" or #d.envid > 100 or d.envid:find("[%c\128-\255]")) then
    return "dsn.envid must be printable ASCII of at most 100 characters"
  end
  if d.notify ~= nil then
    if type(d.notify) ~= "table" or #d.notify == 0 then return "dsn.notify must be a non-empty array" end
    local seen = {}
    for _, w in ipairs(d.notify) do
      if not NOTIFY[w] or seen[w] or (w == "never" and #d.notify > 1) then
        return "dsn.notify takes success, failure and delay, or never alone"
      end
      seen[w] = true
    end
  end
  return nil
end

-- A composed message (no `data`): build the RFC 5322 text and envelope.
local function prepare_composed(msg, pool)
  local signers, serr = pool:_signers_for(msg)
  if not signers then return { msg = msg, to = {}, err = serr } end
  local derr = check_dsn(msg.dsn)
  if derr then return { msg = msg, to = {}, err = M.error("invalid", derr, { attempts = 0 }) } end
  local data, env = message.compose(msg)
  if data then
    local signed, e = sign(signers or {}, data)
    if signed then data = signed else data, env = nil, e end
  end
  if not data then
    env.attempts = 0
    return { msg = msg, to = {}, err = env }
  end
  return { msg = { from = env.from, data = data, dsn = msg.dsn, source = msg }, to = env.to, user_msg = msg }
end

local function prepare(msg, fname, level, pool)
  if type(msg) == "table" and msg.data == nil and (fname ~= "send_raw") then
    return prepare_composed(msg, pool)
  end
  local to
  if level then
    to = check_raw(msg, fname, level + 1)
  else
    -- In a batch, a malformed message is that message's failure, not the batch's.
    local ok, r = pcall(check_raw, msg, fname, 1)
    if not ok then
      return { msg = msg, to = {}, err = M.error("invalid", tostring(r):gsub("^[^:]*:%d+: ", ""), { attempts = 0 }) }
    end
    to = r
  end
  if #to == 0 then
    return { msg = msg, to = to, err = M.error("invalid", "no recipients", { attempts = 0 }) }
  end
  local derr = check_dsn(msg.dsn)
  if derr then return { msg = msg, to = to, err = M.error("invalid", derr, { attempts = 0 }) } end
  local signers, serr = pool:_signers_for(msg)
  if not signers then return { msg = msg, to = to, err = serr } end
  if #signers > 0 then
    local signed, e = sign(signers, msg.data)
    if not signed then
      e.attempts = 0
      return { msg = msg, to = to, err = e }
    end
    return { msg = { from = msg.from, data = signed, dsn = msg.dsn }, to = to, user_msg = msg }
  end
  return { msg = msg, to = to }
end

-- Runs one prepared message through the scheduler and returns its outcome.
function Pool:_send_one(item)
  local res, err
  local given = false
  self:_run(function()
    if given then return nil end
    given = true
    return item
  end, function(_, r, e) res, err = r, e end)
  return res, err
end

--- Sends one ready-made RFC 5322 message.
-- The message is sent to every recipient the server accepts; recipients it
-- refuses are listed in the result. A message whose connection dies is
-- retried on a fresh connection as the retry policy says.
-- @tparam table msg
--
-- * `from` (string): envelope sender (`""` for the null sender).
-- * `to` (string or array of strings): envelope recipients.
-- * `data` (string): the message, headers and body. Line ends may be CRLF
--   or bare LF; leading dots are stuffed; 8-bit bytes need a server that
--   offers 8BITMIME.
-- * `dsn` (table, optional): RFC 3461 delivery status notifications, sent
--   only when the server offers DSN: `ret` (`"full"` or `"hdrs"`), `envid`,
--   `notify` (an array of `"success"`, `"failure"`, `"delay"`, or
--   `{"never"}`), `orcpt = true` to send each recipient's ORCPT.
-- @treturn[1] table result: `code`, `enhanced`, `text` (the server's reply
--   to the message), `recipients` (one `{address, ok, code, enhanced, text}`
--   per recipient), `rejected` (the recipients that were refused),
--   `attempts`, and `ambiguous = true` when an earlier attempt was lost
--   after its final dot (the message may have arrived twice).
-- @return[2] nil
-- @treturn[2] table error value, with `attempts`, and `recipients` when the
--   server answered any RCPT
function Pool:send_raw(msg)
  local item = prepare(msg, "send_raw", 3, self)
  if self.closed then
    return nil, M.error("config", "the pool is closed")
  end
  return self:_send_one(item)
end

--- Composes and sends one message.
-- @tparam table msg the fields of `smtppool.message.compose`: `from`, `to`,
--   `cc`, `bcc` (envelope only, never a header), `reply_to`, `sender`,
--   `subject`, `text`, `html`, `attachments`, `headers`, `message_id`,
--   `date`, `list_unsubscribe`, `list_unsubscribe_post`, `mail_from`, `rcpt`
-- @treturn[1] table result, as for `send_raw`
-- @return[2] nil
-- @treturn[2] table error value; kind `invalid` when the message cannot be
--   composed (bad address, CR/LF in a header...), and nothing was sent
function Pool:send(msg)
  if type(msg) ~= "table" then error("send: message must be a table, got " .. type(msg), 2) end
  if msg.data ~= nil then error("send: 'data' is for send_raw; send composes the message itself", 2) end
  if self.closed then
    return nil, M.error("config", "the pool is closed")
  end
  local item = prepare_composed(msg, self)
  return self:_send_one(item)
end

--- Sends many messages over up to `max_conns` connections at once.
-- Messages are pulled from `source` as connections can take them, so an
-- iterator of a million messages needs no million-element table.
-- @param source an array of messages (ready ones with `data`, as for
--   `send_raw`, or tables to compose, as for `send`) or an iterator
--   function returning the next message, or nil at the end
-- @tparam[opt] table opts `on_result = function(msg, res, err)`, called once
--   per message, in completion order
-- @treturn table summary: `sent`, `failed`, `total`
function Pool:send_batch(source, opts)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("send_batch: source must be an array or an iterator function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("send_batch: opts must be a table", 2) end
  local on_result = opts and opts.on_result
  if on_result ~= nil and type(on_result) ~= "function" then
    error("send_batch: on_result must be a function", 2)
  end
  if self.closed then error("send_batch: the pool is closed", 2) end
  local i = 0
  local next_msg
  -- An item that cannot be prepared (a template or a field that raises) is
  -- that item's invalid outcome; an error of the source itself stops the
  -- batch once everything taken has been reported.
  local function prepare_item(m)
    if m == nil then return nil end
    local ok, item = pcall(prepare, m, "send_batch", nil, self)
    if ok then return item end
    return { msg = m, to = {}, err = M.error("invalid", "cannot prepare the message: " .. tostring(item),
      { attempts = 0 }) }
  end
  if type(source) == "table" then
    next_msg = function()
      i = i + 1
      return prepare_item(source[i])
    end
  else
    next_msg = function() return prepare_item(source()) end
  end
  local summary = { sent = 0, failed = 0, total = 0 }
  self:_run(next_msg, function(msg, res, err)
    summary.total = summary.total + 1
    if res then summary.sent = summary.sent + 1 else summary.failed = summary.failed + 1 end
    if on_result then on_result(msg, res, err) end
  end)
  return summary
end

--- Counters since the pool was made.
-- @treturn table `opened`, `closed_by_us`, `closed_by_server`, `rotated`,
--   `moved` (messages moved off exhausted connections without spending an
--   attempt), `sent`, `failed`, `retried`, `ambiguous`, `rate_waits`,
--   `open`, `idle`, `in_use`, and `learned_cap` when one was learned
function Pool:stats()
  local s = {}
  for k, v in pairs(self.counters) do s[k] = v end
  if self.tls_ctx then
    local ts = self.tls_ctx:stats()
    s.tls_handshakes, s.tls_resumed = ts.handshakes, ts.resumed
  end
  s.open, s.idle, s.in_use = #self.conns, 0, 0
  for _, rec in ipairs(self.conns) do
    if rec.state == "idle" then s.idle = s.idle + 1
    elseif rec.state == "busy" or rec.state == "settling" then s.in_use = s.in_use + 1 end
  end
  s.learned_cap = self.learned_cap
  return s
end

--- Closes every connection: QUIT on idle ones (waiting at most
-- `close_timeout` seconds), then the sockets. The pool refuses new messages
-- afterwards. Safe to call twice.
function Pool:close()
  if self.closed then return true end
  self.closed = true
  for _, rec in ipairs(self.conns) do
    if rec.state == "idle" then self:_quit(rec) end
  end
  local deadline = now() + self.close_timeout
  local run = { queue = {}, deferred = {}, inflight = 0, done = 0, on_result = function() end }
  while true do
    local waiting = {}
    for _, rec in ipairs(self.conns) do
      if rec.state == "quitting" then waiting[#waiting + 1] = rec.c end
    end
    local left = deadline - now()
    if #waiting == 0 or left <= 0 then break end
    core.wait(waiting, left)
    local t = now()
    for _, rec in ipairs({ unpack(self.conns) }) do self:_dispatch(run, rec, t) end
  end
  for _, rec in ipairs({ unpack(self.conns) }) do self:_remove(rec) end
  return true
end

Pool.__gc = function(self)
  for _, rec in ipairs(self.conns or {}) do rec.c:close() end
end
Pool.__close = Pool.close

return M
