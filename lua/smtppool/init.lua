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
-- @api smtppool

local core = require("smtppool.core")
local errors = require("smtppool.errors")
local options = require("smtppool.options")
local prepare = require("smtppool.compose.prepare")
local policy = require("smtppool.engine.policy")
local scheduler = require("smtppool.engine.scheduler")
local loop = require("smtppool.engine.loop")
local native = require("smtppool.driver.native")
local limits = require("smtppool.limits.process")
local message = require("smtppool.compose.message")
local template = require("smtppool.compose.template")
local campaign = require("smtppool.campaign")
local csv = require("smtppool.compose.csv")
local retry = require("smtppool.engine.retry")
local presets = require("smtppool.presets")
local relays = require("smtppool.engine.relays")
local outbox = require("smtppool.outbox")

local M = { _VERSION = "0.5.0", retry = retry, message = message, template = template, campaign = campaign,
            csv = csv, errors = errors, presets = presets }

--- A provider preset's options with yours on top (see `smtppool.presets`):
-- `smtppool.new(smtppool.preset("mailersend", { auth = {...} }))`.
M.preset = presets.options

--- Several relays with failover (see `smtppool.relays`): each entry the
-- options of `new` plus a `name`, or `{name = ..., pool = pool}`.
-- @tparam table list the relays, in order of preference
-- @tparam[opt] table opts `down_for` (seconds, default 60)
function M.relays(list, opts) return relays.new(list, opts, M.new) end

--- Makes an error value (see `smtppool.errors.new`).
-- @tparam string kind one of `transient`, `permanent`, `connection`,
--   `ambiguous`, `protocol`, `tls`, `auth`, `invalid`, `config`
-- @tparam string text what went wrong, for a human
-- @tparam[opt] table fields more fields (`phase`, `code`, `enhanced`...)
-- @treturn table the error value
M.error = errors.new

--- True when `v` is an smtppool error value.
M.is_error = errors.is_error

local Pool = {}
Pool.__index = Pool
for k, v in pairs(scheduler) do Pool[k] = v end

--- Creates a pool. No connection is opened until a message needs one.
-- @tparam table opts
--
-- * `host` (string, required): server name or address. A name is resolved
--   without blocking the loop (c-ares; `/etc/hosts` first, then the
--   servers of `/etc/resolv.conf`); `connect_timeout` covers the lookup.
-- * `proxy` (string): connect through a proxy: `socks5://[user:password@]host:port`
--   (RFC 1928/1929; the proxy resolves the server's name) or
--   `http://[user:password@]host:port` (HTTP CONNECT); TLS and STARTTLS run
--   through the tunnel as usual, verified against `host`. The proxy's
--   credentials travel as its protocol carries them (in the clear to the
--   proxy). Native driver only (nginx's cosockets connect directly).
-- * `dns_servers` (string, default the system's): `"ip[:port],..."`, the
--   name servers to ask instead of `/etc/resolv.conf`'s, for the server's
--   name and the Redis host's of `rate.backend`, `outbox` and a campaign's
--   Redis journal (native driver, without blocking the loop; in nginx,
--   nginx's `resolver` applies).
-- * `port` (number, default 25; 465 with `tls = "implicit"`).
-- * `tls` (string, default `"starttls"`, `"implicit"` when `port` is 465):
--   `"starttls"` (fails closed when
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
-- * `sign_threads` (default: one per processor, at most 8, or one fewer
--   when every pool key is Ed25519, whose signatures cost less than the
--   loop's own work on a message; 0 signs on the loop): in a batch, DKIM signatures of messages held in memory are
--   computed by this many worker threads while the loop keeps serving the
--   sockets, so a signed campaign scales with cores. Single sends, messages
--   streamed from files and nginx sign on the loop.
-- * `helo` (string, default this machine's host name): the EHLO name, a
--   domain or an address literal (`"[192.0.2.1]"`); anything else (a
--   space, CR, LF) is refused.
-- * `max_conns` (default 1): the ceiling on sockets open at once, as
--   servers and providers count them (in nginx with `shared_dict` and
--   with `rate.backend`, across every worker and process). The pool also
--   learns a lower one when the server refuses connections for
--   concurrency (see `limit_probe_after`).
-- * `rotate_ahead` (default 0): extra sockets, past `max_conns`, for a
--   connection's replacement opened before its session cap, so its
--   handshakes overlap the old one's last messages (it sends nothing until
--   the old one has left). It opens when the old session's time left (its
--   unanswered messages times the measured time between answers) falls to
--   the measured handshake time (connect to ready), at most this many
--   transactions before the cap (at that count until both are measured).
--   Off by default: providers count those sockets too.
-- * `bdat_window` (default 4, at most 16): when the server offers CHUNKING
--   and PIPELINING, bodies go as BDAT chunks (RFC 3030) and this many
--   transactions per connection may await their final replies at once;
--   it is also the most messages a lost connection can leave ambiguous
--   (one over DATA). 0: always DATA.
-- * `max_messages_per_conn` (default none): transactions per connection
--   before it is rotated (QUIT and replaced). The pool also honours the
--   server's `LIMITS MAILMAX` and a cap it learns when the server declares
--   five sessions in a row exhausted after the same count with none between
--   carrying more (never below 2).
-- * `cap_recover_after` (seconds, default 600): a learned cap, concurrency,
--   rate or login rate is forgotten after this long without a signal.
-- * `limit_probe_after` (seconds, default 30): after a concurrency limit
--   was learned (a 4xx at connect or greeting while other connections
--   were open: the limit is cut to those), each quiet period this long
--   allows one connection more, up to `max_conns`. A learned message rate
--   (a 4xx to MAIL not explained by a session count) is cut to 90 % of what
--   the server let through in the last second and raised 5 % every quiet
--   2 s; a login rate (a 4xx to AUTH), likewise over a minute. A message
--   refused for any of these limits waits its turn without spending a
--   retry attempt (`stats().limited`).
-- * `message_timeout` (seconds, default none): how long a message may take
--   from submission to outcome, retries included; at the deadline a
--   message on the wire has its connection cut (`ambiguous` when its final
--   dot had left) and a waiting one fails.
-- * `max_conn_lifetime` (seconds, default none): rotate older connections.
-- * `max_recipients_per_message` (default none): a message with more
--   recipients is sent as several transactions (as for the server's
--   `LIMITS RCPTMAX`, whichever is lower).
-- * `idle_timeout` (seconds, default 60): idle connections older than this
--   are closed with QUIT at the pool's next use instead of being reused.
-- * `health_check_after` (seconds, default 30): a connection idle this long
--   is checked with NOOP before it carries a message.
-- * `wait_timeout` (seconds, default 60): how long the message at the head
--   of the queue may wait for a connection before it fails.
-- * `rate` (table): `connections_per_min`, `auth_per_min`,
--   `messages_per_sec` (or `messages_per_min`, `messages_per_hour`,
--   `messages_per_day`); each limit is waited for, never exceeded, in any
--   sliding window. `{limit, per_seconds}` under the
--   names `connections`, `auth`, `messages` sets another window length.
--   With `backend = "redis://host:port/db"` and `key = "account"`, the
--   windows, `max_conns` (then counted as sockets across every process) and
--   the learned cap are shared by every process and machine using that key
--   (see `smtppool.limits.redis`); while Redis cannot be reached, sending pauses.
-- * `retry` (function, default `smtppool.retry.backoff()`): the retry
--   policy, `function(err, attempt, msg) -> delay | false`.
-- * `connect_timeout` (seconds, default 30).
-- * `timeouts` (table): reply timeouts in seconds per phase (`greeting`,
--   `ehlo`, `starttls`, `auth`, `mail`, `rcpt`, `data`, `data_end`, `rset`,
--   `noop`, `quit`); defaults are RFC 5321 section 4.5.3.2's (5 minutes;
--   `data` 3, `data_end` 10), except `greeting`, 30 s: a server silent that
--   long is most often an implicit-TLS port asked for STARTTLS, and the
--   error says so (kind `config` when the pool has never been greeted: the
--   call's queue fails once). Each bounds a whole reply, counted from the
--   last write: bytes trickling in do not restart it.
-- * `close_timeout` (seconds, default 5): how long `close` waits for QUIT.
-- * `trace` (boolean, default false): report every protocol state change
--   as an `on_event` event `{type = "trace", conn, from, to, code}` (`code`:
--   the reply that caused it), what one reaches for first when a server
--   misbehaves.
-- * `on_event` (function): called with one table per event: `connect`,
--   `ready`, `rotate`, `learn_cap`, `unlearn_cap`, `retry`, `discard`,
--   `rate_wait`, `idle_close`, `close`.
-- @treturn[1] Pool
-- @return[2] nil
-- @treturn[2] table error value (kind `config`: an unreadable CA or key,
--   credentials with `tls = "none"` and no `allow_plaintext_auth`...)
function M.new(opts)
  options.check(opts)
  return M.build(opts, native)
end

-- The default number of signing threads. An RSA-2048 signature costs four
-- times a message's composition and sending on the loop: every processor
-- signs. An Ed25519 one costs about half of it: a thread per processor then
-- takes the loop's own processor and the campaign runs slower than with one
-- processor left to the loop (measured by bench/signed.lua on 2 processors:
-- Ed25519 with 2 threads 9,600-11,000 msg/s, with 1 thread 16,150; RSA-2048
-- with 2 threads 6,200-6,500, with 1 thread 4,350).
function M._sign_threads_default(signers)
  local cpus = core.cpus()
  local all_ed = #signers > 0
  for _, s in ipairs(signers) do
    if s.alg ~= "ed25519-sha256" then all_ed = false end
  end
  if all_ed then return math.max(1, math.min(8, cpus - 1)) end
  return math.min(8, cpus)
end

--- A pool over a given driver: what a front-end on another event loop uses
-- (`smtppool.ngx` builds its pools on nginx's cosockets with it). `new` is
-- `build(opts, require("smtppool.driver.native"))` after checking opts.
-- @tparam table opts the pool's options, as for `new` (checked by the caller:
--   `smtppool.options.check`)
-- @tparam table driver a driver (the interface: `smtppool.driver.native`)
-- @param[opt] shared a limits backend constructor (`smtppool.limits.from_options`)
-- @treturn[1] Pool
-- @return[2] nil
-- @treturn[2] table error value (kind `config`)
function M.build(opts, driver, shared)
  local cfg, cerr = options.resolve(opts)
  if not cfg then return nil, cerr end
  local tls_ctx
  if cfg.tls ~= "none" then
    local e
    tls_ctx, e = driver.tls_context{ ca_file = opts.ca_file, ca_path = opts.ca_path, cert_file = opts.cert_file,
      key_file = opts.key_file, insecure_skip_verify = opts.insecure_skip_verify }
    if not tls_ctx then return nil, e end
  end
  local signers, derr = prepare.dkim_signers(opts.dkim)
  if not signers then return nil, derr end
  if cfg.sign_threads == nil then cfg.sign_threads = M._sign_threads_default(signers) end
  local lim, lerr = limits.from_options(opts, shared, driver)
  if not lim then return nil, lerr end
  local box
  if opts.outbox then
    local berr
    box, berr = outbox.open(opts.outbox, { name = opts.outbox_name, max = opts.outbox_max, keep = opts.outbox_keep,
      lease = opts.outbox_lease, timeout = opts.outbox_timeout, allow_volatile = opts.allow_volatile_redis,
      driver = driver, dns_servers = opts.dns_servers })
    if not box then return nil, berr end
  end
  return setmetatable({
    opts = opts,
    cfg = cfg,
    driver = driver,
    conn_opts = {
      host = opts.host, port = cfg.port, helo = cfg.helo,
      connect_timeout = opts.connect_timeout, timeouts = opts.timeouts,
      tls = tls_ctx, tls_mode = cfg.tls, server_name = opts.server_name, trace = opts.trace,
      dns_servers = opts.dns_servers, bdat_window = cfg.bdat_window,
      proxy_kind = cfg.proxy and cfg.proxy.kind, proxy_host = cfg.proxy and cfg.proxy.host,
      proxy_port = cfg.proxy and tostring(cfg.proxy.port), proxy_user = cfg.proxy and cfg.proxy.user,
      proxy_password = cfg.proxy and cfg.proxy.password,
    },
    tls_ctx = tls_ctx,
    auth = opts.auth,
    prep = { signers = signers },       -- what preparing a message needs: keys, their cache
    retry = opts.retry or retry.backoff(),
    limits = lim,                       -- rate windows, connection slots, shared caps (smtppool.limits.process)
    auth_gate = opts.auth ~= nil and lim.windows ~= nil and lim.windows.auth ~= nil, -- logins counted at AUTH
    on_event = opts.on_event,
    conns = {},                         -- connection records (see smtppool.engine.scheduler)
    learner = policy.learner(cfg.cap_recover_after),
    -- limits the server shows but nobody told the pool (see policy.signal)
    learned = {
      conns = policy.concurrency_learner(cfg.max_conns, cfg.limit_probe_after, cfg.cap_recover_after),
      rate = policy.rate_learner(1, 2, cfg.cap_recover_after),          -- messages a second
      auth = policy.rate_learner(60, 60, cfg.cap_recover_after),        -- logins a minute
    },
    outbox = box,                       -- the durable outbox in Redis (smtppool.outbox), or nil
    closed = false,
    next_id = 0,
    counters = { opened = 0, closed_by_us = 0, closed_by_server = 0, rotated = 0,
                 sent = 0, failed = 0, retried = 0, ambiguous = 0, rate_waits = 0,
                 moved = 0, limited = 0 },
  }, Pool)
end

-- ===== public API =====

-- Runs fn on a loop when the pool waits on more than its sockets (its
-- limits in Redis: the loop goes on serving the sockets while a Redis
-- reply is awaited); directly otherwise.
function Pool:_on_loop(fn, ...)
  if self.limits.name == "redis" or self.outbox then return self:on_loop(fn, ...) end
  return fn(...)
end

--- Runs `fn(...)` as a task of a loop over this pool's connections and
-- returns what it returns. Inside it, a Redis round trip through
-- `smtppool.redis_client` (or a `smtppool.engine.loop` sleep) waits
-- aside: the loop goes on serving every connection the pool has open
-- (their bytes move, held dots leave) instead of the process blocking on
-- the Redis socket. The pool's own sends run inside it; a campaign whose
-- journal is in Redis runs its whole sending in one. With nginx's driver
-- `fn` simply runs (cosockets already yield to the rest of the worker).
-- @tparam function fn
-- @return what `fn` returns (its error is raised again)
function Pool:on_loop(fn, ...)
  if self.driver.name == "native" then return loop.run(self.driver, fn, ...) end
  return fn(...)
end

-- Runs one prepared message through the scheduler and returns its outcome.
function Pool:_send_one(item)
  local res, err
  local given = false
  self:_on_loop(self.run, self, function()
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
-- * `require_tls` (boolean, optional): RFC 8689 REQUIRETLS: the message
--   goes only over TLS to a server that offers REQUIRETLS (and asks every
--   later hop to do the same); otherwise it fails with kind `tls`, unsent.
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
  local item = prepare.prepare(msg, "send_raw", 3, self.prep)
  if self.closed then
    return nil, errors.new("config", "the pool is closed")
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
    return nil, errors.new("config", "the pool is closed")
  end
  local item = prepare.prepare_composed(msg, self.prep)
  return self:_send_one(item)
end

--- Sends many messages over up to `max_conns` connections at once.
-- Messages are pulled from `source` as connections can take them, so an
-- iterator of a million messages needs no million-element table.
-- @param source an array of messages (ready ones with `data`, as for
--   `send_raw`, or tables to compose, as for `send`) or an iterator
--   function returning the next message, or nil at the end
-- @tparam[opt] table opts
--
-- * `on_result = function(msg, res, err)`, called once per message, in
--   completion order.
-- * `should_stop = function() -> false | true | "now"`, asked on every turn
--   of the loop: when true, nothing new starts, messages not yet started end
--   with an error of kind `cancelled` (never sent), and the ones on the wire
--   get `close_timeout` seconds to finish before their connections are cut
--   (at once with `"now"`).
-- * `mark_async = function(msg)`: called before each attempt's final dot
--   leaves: over DATA with PIPELINING, at the loop's next wait after the
--   dot was queued, which waits behind the session's gate until the call
--   returns (in both drivers, whatever the loop waits on meanwhile); else
--   before the attempt's first byte. A campaign in Redis and the outbox
--   write their `L` there (on its way to Redis when the call returns; the
--   reply is read later).
-- * `mark_many = function(msgs)`: with `mark_async`, the marks of the
--   final dots behind their gates at the loop's wait, several at once (one
--   round trip, or one write, for all).
-- * `poll` (seconds): with a source that may answer `false` (nothing now,
--   more later), how often to ask it again.
-- * `mark = function(msg) -> journal, key`: key's `L` committed to a
--   journal (from `smtppool.core.journal_open`) just before each attempt's
--   final dot leaves; a campaign uses it to know which messages may have
--   been committed when the process dies.
-- * `before_wait = function() -> seconds | nil[, fds]`: called once a turn of the
--   loop, before it waits on the network (a campaign commits its journal's
--   records there, one transaction a turn); a number caps that wait (the
--   outbox's outcomes waiting to be written go within 50 ms); `fds`, a
--   list of file descriptors (native driver), end it when one is readable
--   (the outbox's claim on its way in Redis).
-- * `retry = function(err, attempt, msg) -> delay | false`: this batch's retry
--   policy instead of the pool's (`smtppool.engine.retry`).
-- * `on_event = function(ev)`: called with this batch's events, besides
--   the pool's `on_event`.
-- @treturn table summary: `sent`, `failed`, `cancelled` (never started:
--   the run was stopped), `total`
function Pool:send_batch(source, opts)
  if type(source) ~= "table" and type(source) ~= "function" then
    error("send_batch: source must be an array or an iterator function", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("send_batch: opts must be a table", 2) end
  local on_result = opts and opts.on_result
  for _, k in ipairs({ "on_result", "should_stop", "mark", "mark_async", "mark_many", "before_wait", "retry",
                       "on_event" }) do
    if opts and opts[k] ~= nil and type(opts[k]) ~= "function" then
      error("send_batch: " .. k .. " must be a function", 2)
    end
  end
  if self.closed then error("send_batch: the pool is closed", 2) end
  -- An item that cannot be prepared (a template or a field that raises) is
  -- that item's invalid outcome; an error of the source itself stops the
  -- batch once everything taken has been reported.
  -- With signing threads (the native driver), messages held in one string
  -- are signed by the workers of a queue made for this batch, while the
  -- loop serves sockets; the loop's wait also wakes on the queue's eventfd.
  local threaded = self.cfg.sign_threads > 0 and self.driver.name == "native"
  local ctx = self.prep
  if threaded then ctx = setmetatable({ defer_sign = true }, { __index = self.prep }) end
  local next_msg
  if type(source) == "table" then
    local i = 0
    next_msg = function()
      i = i + 1
      return prepare.item(source[i], ctx)
    end
  else
    next_msg = function() return prepare.item(source(), ctx) end
  end
  local finish
  if threaded then
    next_msg, finish = prepare.signing_stage(next_msg, { threads = self.cfg.sign_threads,
      depth = math.max(64, 8 * self.cfg.sign_threads),
      waiting = function(fd) self._wait_fds = fd and { fd } or nil end })
  end
  local summary, account = policy.summary(on_result)
  local ok, e = pcall(self.run_items, self, next_msg, account, opts)
  if finish then
    -- messages taken for signing and never started (the batch was stopped)
    local left = finish()
    for _, item in ipairs(ok and left or {}) do
      account(item.user_msg or item.msg, nil, errors.new("cancelled", scheduler.CANCELLED, { attempts = 0 }))
    end
  end
  if not ok then error(e, 0) end
  return summary
end

--- Runs prepared items (`smtppool.compose.prepare`'s, or the outbox's)
-- through the scheduler: what `send_batch` does once its messages are
-- prepared, for a source that hands out items of its own (the outbox).
-- @tparam function next_item the items; `false`: nothing now; nil: the end
-- @tparam function on_result `(msg, res, err)`, once per item
-- @tparam[opt] table opts as `send_batch`'s (`retry` and `on_event` for
--   these items only)
function Pool:run_items(next_item, on_result, opts)
  local saved_retry, saved_hook = self.batch_retry, self.batch_on_event
  self.batch_retry, self.batch_on_event = opts and opts.retry, opts and opts.on_event
  local ok, e = pcall(self._on_loop, self, self.run, self, next_item, on_result, opts)
  self.batch_retry, self.batch_on_event = saved_retry, saved_hook
  if not ok then error(e, 0) end
end

--- Hands a message to the outbox (option `outbox`): composes it (or checks
-- a ready one with `data`), stores it in Redis and returns its id only
-- then. Whichever worker claims it sends it (`deliver` here, another
-- process's, `smtppool worker --outbox`, an nginx worker's).
-- @tparam table msg as for `send` (or `send_raw`, with `data`)
-- @treturn[1] string the message's id (for `outcome`)
-- @return[2] nil
-- @treturn[2] table error value: `invalid` (cannot be composed; nothing
--   stored), `busy` (past `outbox_max`), `config` (Redis refused the login,
--   or keeps nothing on disk), `connection` (Redis cannot be reached within
--   `outbox_timeout`)
function Pool:enqueue(msg)
  if type(msg) ~= "table" then error("enqueue: message must be a table, got " .. type(msg), 2) end
  if not self.outbox then error("enqueue: the pool has no outbox (option outbox = \"redis://...\")", 2) end
  if self.closed then return nil, errors.new("config", "the pool is closed") end
  return self.outbox:put(prepare.item(msg, self.prep))
end

--- A message's outcome, by the id `enqueue` gave (from any process).
-- @treturn[1] table `status` (`sent`, `failed`, `ambiguous`), `code`,
--   `enhanced`, `text`, `kind`, `attempts`, `at`, `possible_duplicate`
-- @treturn[2] nil while it is pending
-- @return[3] nil
-- @treturn[3] table error value: `invalid` (an unknown or expired id),
--   `connection`
function Pool:outcome(id)
  if not self.outbox then error("outcome: the pool has no outbox (option outbox)", 2) end
  return self.outbox:outcome(id)
end

--- Delivers the outbox's messages (option `outbox`) until told to stop:
-- claims them a few at a time, sends them over the pool's connections,
-- records each outcome in Redis (see `smtppool.outbox`).
-- @tparam[opt] table opts `should_stop` (function; when true, nothing new
--   is claimed and the claims not started go back to the queue at once),
--   `until_empty` (return once nothing is queued, waiting or claimed
--   anywhere), `on_result(msg, res, err)` (each final outcome; `msg.id`),
--   `on_event`
-- @treturn[1] table summary: `sent`, `failed`, `ambiguous`, `later` (put
--   back to wait for a retry), `returned` (claims given back unsent)
-- @return[2] nil
-- @treturn[2] table error value: a configuration the server refused (TLS
--   mode, certificate, login: delivery stops, the messages wait)
function Pool:deliver(opts)
  if not self.outbox then error("deliver: the pool has no outbox (option outbox)", 2) end
  if opts ~= nil and type(opts) ~= "table" then error("deliver: opts must be a table", 2) end
  if self.closed then error("deliver: the pool is closed", 2) end
  return self.outbox:deliver(self, opts or {})
end

--- Checks the pool's configuration against the server, like Nodemailer's
-- `transporter.verify()`: connects, negotiates TLS, logs in when `auth` is
-- set, then QUITs, sending no mail. The connection counts against the rate
-- windows like any other.
-- @treturn[1] table `host`, `port`, `tls` (true when the session ran over
--   TLS), `auth` (the mechanism used, when one was), `size_max`,
--   `pipelining`, `chunking`, `dsn`, `smtputf8`, `8bitmime`, `mailmax` and
--   `rcptmax` (RFC 9422 LIMITS), `auth_mechanisms` (what the server offers),
--   `caps` (everything EHLO said), `elapsed` (seconds)
-- @return[2] nil
-- @treturn[2] table error value: the same a message would have met
--   (`connection`, `tls`, `auth`...)
function Pool:verify()
  if self.closed then return nil, errors.new("config", "the pool is closed") end
  local t0 = self.driver.now()
  -- The connection spends from the windows like any other: wait for them.
  local t = t0
  while true do
    local w = self.limits:take(self:_connect_windows(), t)
    if w <= 0 then break end
    if t + w - t0 > (self.opts.connect_timeout or 30) + 60 then
      return nil, errors.new("connection", "verify: the rate windows allow no connection in time",
        { phase = "connect" })
    end
    loop.sleep(w, self.driver)
    t = self.driver.now()
  end
  local rec, err = self:_open(t)
  if not rec then return nil, err end
  rec.slot = nil -- verify's own connection, outside max_conns
  local deadline = t0 + (self.opts.connect_timeout or 30) + 60
  local lane = self:_quiet_lane()
  local result
  while rec.state ~= "gone" do
    local left = deadline - self.driver.now()
    if rec.auth_wait then -- its login waits for the AUTH window
      local w = self:_auth_go(rec, self.driver.now())
      if w > 0 then left = math.min(left, w) end
    end
    if left <= 0 then
      rec.c:abort("verify: no answer in time")
      left = 0
    end
    local was = rec.state
    self:_wait(lane, { rec }, math.min(left, 1))
    if was == "connecting" and rec.state == "idle" then
      local caps = rec.caps or {}
      local mechs = {}
      for m in pairs(caps.auth_mechs or {}) do mechs[#mechs + 1] = m end
      table.sort(mechs)
      result = { host = self.conn_opts.host, port = self.conn_opts.port, tls = rec.c:tls_active(),
                 auth = rec.c:auth_mechanism(), size_max = caps.size_max, pipelining = caps.pipelining or false,
                 chunking = caps.chunking or false, dsn = caps.dsn or false, smtputf8 = caps.smtputf8 or false,
                 ["8bitmime"] = caps["8bitmime"] or false, mailmax = caps.mailmax, rcptmax = caps.rcptmax,
                 auth_mechanisms = mechs, caps = caps, elapsed = self.driver.now() - t0 }
      self:_quit(rec)
      deadline = math.min(deadline, self.driver.now() + self.cfg.close_timeout)
    end
    if rec.state == "gone" and not result then
      err = rec.err
    end
  end
  if result then return result end
  return nil, err or errors.new("connection", "verify: the connection ended before it was ready",
    { phase = "connect" })
end

--- The pool's counters in the Prometheus text exposition format (0.0.4),
-- for a metrics endpoint (in OpenResty, a location can return it).
-- @tparam[opt] string prefix metric name prefix (default `"smtppool_"`)
-- @tparam[opt] table labels constant labels, e.g. `{relay = "ses"}`
-- @treturn string
function Pool:metrics(prefix, labels)
  prefix = prefix or "smtppool_"
  if type(prefix) ~= "string" or not prefix:match("^[%a_:][%w_:]*$") then
    error("metrics: prefix must be a metric name prefix", 2)
  end
  local lab = {}
  for k, v in pairs(labels or {}) do
    if type(k) ~= "string" or not k:match("^[%a_][%w_]*$") then error("metrics: bad label name", 2) end
    lab[#lab + 1] = ('%s="%s"'):format(k, tostring(v):gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"',
      ["\n"] = "\\n" }))
  end
  table.sort(lab)
  local ls = #lab > 0 and ("{" .. table.concat(lab, ",") .. "}") or ""
  local st = self:stats()
  local out = {}
  local function metric(name, kind, help, value)
    if value == nil then return end
    out[#out + 1] = ("# HELP %s%s %s\n# TYPE %s%s %s\n%s%s%s %s\n"):format(prefix, name, help, prefix, name, kind,
      prefix, name, ls, tostring(value))
  end
  metric("messages_sent_total", "counter", "Messages the server accepted.", st.sent)
  metric("messages_failed_total", "counter", "Messages that ended in failure.", st.failed)
  metric("messages_ambiguous_total", "counter", "Attempts lost after the final dot.", st.ambiguous)
  metric("retries_total", "counter", "Attempts scheduled again by the retry policy.", st.retried)
  metric("moved_total", "counter", "Messages moved off an exhausted connection without spending an attempt.",
    st.moved)
  metric("connections_opened_total", "counter", "Connections opened.", st.opened)
  metric("connections_closed_by_server_total", "counter", "Connections the server ended (421, EOF, reset...).",
    st.closed_by_server)
  metric("connections_rotated_total", "counter", "Connections rotated at a session cap or lifetime.", st.rotated)
  metric("rate_waits_total", "counter", "Times a rate window held work back.", st.rate_waits)
  metric("connections_open", "gauge", "Connections open now.", st.open)
  metric("connections_in_use", "gauge", "Connections carrying a transaction now.", st.in_use)
  metric("learned_cap", "gauge", "The session cap learned from the server.", st.learned_cap)
  metric("learned_conns", "gauge", "The concurrent connections learned from the server.", st.learned_conns)
  metric("learned_rate", "gauge", "The messages a second learned from the server.", st.learned_rate)
  metric("learned_auth_per_min", "gauge", "The logins a minute learned from the server.", st.learned_auth_per_min)
  metric("limited_total", "counter", "Messages moved by a limit signal without spending an attempt.", st.limited)
  metric("tls_handshakes_total", "counter", "TLS handshakes.", st.tls_handshakes)
  metric("tls_resumed_total", "counter", "TLS handshakes that resumed a session.", st.tls_resumed)
  if self.outbox then
    -- the outbox's, as Redis holds them (every worker's together)
    local ob = self.outbox:stats()
    if ob then
      metric("outbox_depth", "gauge", "Messages in the outbox: queued, waiting for a retry, or claimed.", ob.depth)
      metric("outbox_delayed", "gauge", "Messages in the outbox waiting for a retry.", ob.delayed)
      metric("outbox_oldest_seconds", "gauge", "Seconds since the oldest pending message was handed over.",
        ob.oldest or 0)
      metric("outbox_enqueued_total", "counter", "Messages handed to the outbox.", ob.enqueued)
      metric("outbox_sent_total", "counter", "Outbox messages sent.", ob.sent)
      metric("outbox_failed_total", "counter", "Outbox messages that failed.", ob.failed)
      metric("outbox_ambiguous_total", "counter", "Outbox messages whose final dot was on its way when their "
        .. "worker stopped.", ob.ambiguous)
    end
  end
  return table.concat(out)
end

--- Counters since the pool was made.
-- @treturn table `opened`, `closed_by_us`, `closed_by_server`, `rotated`,
--   `moved` (messages moved off exhausted connections without spending an
--   attempt), `sent`, `failed`, `retried`, `ambiguous`, `rate_waits`,
--   `limited` (messages moved by a limit signal of the server's without
--   spending an attempt), `open`, `idle`, `in_use`; `learned_cap`,
--   `learned_conns`, `learned_rate` (messages a second) and
--   `learned_auth_per_min` while learned (see `limit_probe_after`); with
--   limits shared by every process (`shared_dict` in nginx, `rate.backend`
--   in Redis) `open_total`: sockets open across all of them
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
    elseif rec.state == "busy" or rec.state == "pipelining" or rec.state == "settling" then
      s.in_use = s.in_use + 1
    end
  end
  s.learned_cap = self:_learned_cap()
  local ceiling, learned_ceiling = self:_ceiling()
  s.learned_conns, s.learned_rate = learned_ceiling and ceiling or nil, self.learned.rate.limit
  s.learned_auth_per_min = self.learned.auth.limit
  if self.limits.open_total then s.open_total = self.limits:open_total() end
  return s
end

--- The name of the driver the pool runs on: `"native"` (the C core's
-- sockets) or `"ngx"` (cosockets).
function Pool:driver_name() return self.driver.name end

--- Closes every connection: QUIT on idle ones (waiting at most
-- `close_timeout` seconds), then the sockets. The pool refuses new messages
-- afterwards. Safe to call twice.
function Pool:close()
  if self.closed then return true end
  self.closed = true
  self:close_connections()
  return true
end

Pool.__gc = function(self)
  for _, rec in ipairs(self.conns or {}) do rec.c:close() end
end
Pool.__close = Pool.close

-- a group of relays sends as a pool does, over its routes
relays.adopt(Pool)

return M
