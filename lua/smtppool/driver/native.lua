--- The native driver: the C core's sockets, OpenSSL and one poll loop.
--
-- The driver interface the scheduler runs on (ARCHITECTURE.md):
--
-- * `open(opts)`: starts a connection (`host`, `port`, `helo`, `tls_mode`,
--   `tls`, `server_name`, `auth`, `connect_timeout`, `timeouts`, `trace`); returns a
--   handle, or nil and an error value.
-- * `wait(handles, timeout[, fds])`: moves bytes until some connection has
--   events, one of `fds` (the native driver: a signing queue's eventfd)
--   is readable, or `timeout` seconds pass (negative: no limit); returns one entry per
--   connection with events: `{conn = index, name, payload, name, payload...}`
--   with names `ready`, `tx` (payload: the transaction's outcome), `error`
--   (payload: the error value), `closed`, and with `opts.trace`, `trace`
--   first (payload: the state changes `{from, to, code}` since the last
--   wait). One call per wake.
-- * handle methods: `start(from, to, data, dsn)` (true, or nil and an
--   `invalid` error when refused before a byte left), `quit()`, `noop()`,
--   `abort(text)` (cut now; the transaction in flight fails), `close()`,
--   `caps()` (what EHLO offered).
-- * `now()`: a monotonic clock in seconds; `tls_context(opts)`.
-- * `redis_connect(host, port, timeout[, tls])`: a Redis connection for
--   `smtppool.redis.client` (`call`, `pipeline`, `close`), over TLS with the
--   certificate verified when `tls` is given (`ca_file`, `ca_path`,
--   `server_name`, `insecure_skip_verify`); here a small blocking client in C. `redis_per_thread`: whether a connection belongs
--   to the coroutine that made it (nginx's cosockets do; these do not).
-- @module smtppool.driver.native

local core = require("smtppool.core")

return {
  name = "native",
  now = core.now,
  open = core.connect,
  wait = core.wait,
  tls_context = core.tls_context,
  redis_connect = core.redis_connect,
  redis_per_thread = false,
}
