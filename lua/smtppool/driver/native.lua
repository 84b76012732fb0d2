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
--   `caps()` (what EHLO offered), `gate_dot()` (right after `start`: the
--   transaction's final dot, once queued, waits behind the session's gate,
--   and nothing after it leaves either) and `gate_open()` (what a mark
--   written elsewhere first, in Redis, needs).
-- * `now()`: a monotonic clock in seconds; `tls_context(opts)`.
-- * `redis_connect(host, port, timeout[, tls[, pool, password[, dns_servers]]])`: a Redis connection for
--   `smtppool.redis.client` (`call`, `pipeline`, `close`; for writing
--   behind, `send_many(cmds)` (one write) and `recv()`, or nginx's
--   `send_many(cmds)`, `recv_one()` and `take()`, its replies read by a
--   light thread), over TLS with the
--   certificate verified when `tls` is given (`ca_file`, `ca_path`,
--   `server_name`, `insecure_skip_verify`); `dns_servers` as the pool's
--   option; here a small client in C whose name lookup (c-ares), connect
--   and TLS handshake, in a task of a loop (`smtppool.engine.loop`),
--   wait on the loop like its replies do, so the loop's SMTP connections
--   are served meanwhile (outside a loop they block, within `timeout`).
--   `redis_per_thread`: whether a connection belongs to the coroutine that
--   made it (nginx's cosockets do; these do not).
-- @module smtppool.driver.native

local core = require("smtppool.core")

-- A Redis connection: on a loop, made without blocking it (the name's
-- lookup, the connect and the TLS handshake wait on the loop).
local function redis_connect(host, port, timeout, tls, _, _, dns_servers)
  local loop = require("smtppool.engine.loop")
  if not loop.in_task() then return core.redis_connect(host, port, timeout, tls, false, dns_servers) end
  local c, e, why = core.redis_connect(host, port, timeout, tls, true, dns_servers)
  if not c then return nil, e, why end
  local deadline = core.now() + timeout
  while true do
    local done, fds, again = c:step()
    if done then return c end
    if done == nil then return nil, fds, again end
    local left = deadline - core.now()
    if left <= 0 then
      c:close()
      return nil, "redis connect: timed out"
    end
    loop.wait_fds(fds, again and math.min(again, left) or left)
  end
end

return {
  name = "native",
  now = core.now,
  open = core.connect,
  wait = core.wait,
  tls_context = core.tls_context,
  redis_connect = redis_connect,
  redis_per_thread = false,
}
