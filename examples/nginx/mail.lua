--- The handlers of examples/nginx/nginx.conf: a contact form that waits for
-- its outcome, a notification that is queued and answered at once (in Redis
-- when OUTBOX is set: stored durably, delivered once by any worker, its
-- outcome readable by id), and the pool's metrics for Prometheus.
local smtp = require("smtppool.ngx")

local M = {}
local pool

local function env(name, default)
  local v = os.getenv(name)
  if v == nil or v == "" then return default end
  return v
end

--- Runs in every worker (init_worker_by_lua): one pool per worker.
function M.init()
  local user = env("SMTP_USER")
  local err
  pool, err = smtp.new{
    host = env("SMTP_HOST", "127.0.0.1"),
    port = tonumber(env("SMTP_PORT", "25")),
    tls = env("SMTP_TLS", "starttls"),
    auth = user and { user = user, password = env("SMTP_PASSWORD", "") } or nil,
    shared_dict = "smtppool", -- limits below hold across every worker
    max_conns = 4,             -- sockets open across the whole nginx
    max_messages_per_conn = 5, -- rotate before the provider's per-session cap
    rate = { connections_per_min = 300, auth_per_min = 120 },
    queue_size = 500,
    -- a durable outbox (redis://...): enqueue stores the message before it answers
    outbox = env("OUTBOX"),
    -- queued messages' outcomes (runs in the agent: keep it short)
    on_result = function(msg, res, e)
      if not res then ngx.log(ngx.WARN, "notification to ", tostring(msg.to), " failed: ", tostring(e)) end
    end,
  }
  if not pool then ngx.log(ngx.ERR, "smtppool: ", tostring(err)) end
end

local function form()
  ngx.req.read_body()
  return ngx.req.get_post_args() or {}
end

--- POST from=...&text=...: sends, waits for the outcome, answers 202 or 502.
function M.contact()
  local a = form()
  local res, err = pool:send{
    from = "Contact form <form@example.org>",
    reply_to = a.from,                   -- checked: CR/LF or a bad address is an invalid outcome
    to = env("MAIL_TO", "team@example.org"),
    subject = "Contact form",
    text = a.text or "",
  }
  if res then
    ngx.status = 202
    ngx.say("sent (", res.code, ")")
  else
    ngx.status = err.kind == "invalid" and 400 or 502
    ngx.say("not sent: ", err.kind) -- the details are for the log, not the visitor
    ngx.log(ngx.WARN, "contact form: ", tostring(err))
  end
end

--- POST to=...: queues a notification and answers at once (with its id
-- when the outbox holds it).
function M.notify()
  local a = form()
  local id, err = pool:enqueue{ from = "noreply@example.org", to = a.to or "", subject = "Notification",
                                text = "Something happened." }
  if id then
    ngx.status = 202
    ngx.say("queued", type(id) == "string" and (" " .. id) or "")
    return
  end
  ngx.status = (err.kind == "busy" or err.kind == "connection") and 503 or (err.kind == "invalid" and 400 or 500)
  ngx.say("not queued: ", err.kind)
  if err.kind ~= "invalid" then ngx.log(ngx.ERR, "notify: ", tostring(err)) end
end

--- GET ?id=...: what became of a notification held by the outbox (from
-- any worker or machine): pending, sent, failed or ambiguous.
function M.outcome()
  local o, err = pool:outcome(ngx.var.arg_id or "")
  if err then
    ngx.status = err.kind == "invalid" and 404 or 503
    ngx.say(err.kind == "invalid" and "unknown id" or "outbox unreachable")
  else
    ngx.say(o and o.status or "pending")
  end
end

--- The pool's counters (this worker's) in the Prometheus text format.
function M.metrics()
  ngx.header.content_type = "text/plain; version=0.0.4"
  ngx.print(pool:metrics("smtppool_", { worker = ngx.worker.id() }))
end

return M
