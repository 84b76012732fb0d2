-- The request handlers of tests/spec/ngx_spec.lua, inside nginx (LuaJIT).
-- /<action>?cfg=<name>&port=<smtp port>&...: each worker keeps one pool per
-- cfg and port, as an application keeps one per account.
local smtp = require("smtppool.ngx")

local M = {}
local pools = {}

local CONFIGS = {
  -- 4 connections across the whole nginx, DKIM-signed, plain SMTP
  exim = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 4,
             shared_dict = "smtppool", shared_key = "exim" .. a.port,
             dkim = { domain = "x.test", selector = "sel", key = a.key } }
  end,
  -- shared connection and AUTH windows (XOAUTH2 on the fault server)
  windows = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             max_messages_per_conn = 1, shared_dict = "smtppool", shared_key = "win" .. a.port,
             auth = { user = "alice", token = "good" }, allow_plaintext_auth = true,
             rate = { connections = { 3, 1 }, auth = { 3, 1 } } }
  end,
  -- an AUTH window alone (no connection window to hide it): the logins
  -- themselves must be paced, as each AUTH command leaves
  authwin = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 3,
             max_messages_per_conn = 1, shared_dict = "smtppool", shared_key = "aw" .. a.port,
             auth = { user = "alice", token = "good" }, allow_plaintext_auth = true,
             rate = { auth = { 3, 1 } } }
  end,
  -- STARTTLS with verification, AUTH PLAIN (exim: alice / s3cret); rotate=1: a connection per message
  tls = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "starttls", helo = "ngx.test",
             max_messages_per_conn = tonumber(a.rotate),
             server_name = a.name or "localhost", auth = { user = "alice", password = "s3cret" },
             trace = a.trace and true or nil,
             on_event = a.trace and function(ev) ngx.log(ngx.WARN, "EV ", ev.type, " ", tostring(ev.from), " ", tostring(ev.to), " ", tostring(ev.code), " ", tostring(ev.err)) end or nil }
  end,
  -- two pools of one account (same shared_key): what one learns, the other knows
  capA = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", shared_dict = "smtppool",
             shared_key = "cap" .. a.port }
  end,
  capB = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", shared_dict = "smtppool",
             shared_key = "cap" .. a.port }
  end,
  -- two pools of one account in each worker, 2 sockets between them all
  twinA = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             shared_dict = "smtppool", shared_key = "twin" .. a.port }
  end,
  twinB = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             shared_dict = "smtppool", shared_key = "twin" .. a.port }
  end,
  -- fire and forget, each outcome logged
  queue = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 1,
             queue_size = tonumber(a.qs),
             on_result = function(_, res, err)
               ngx.log(ngx.WARN, "OUTCOME ", res and "sent" or ("failed " .. err.kind .. " " .. tostring(err)))
             end }
  end,
  -- the same windows and max_conns held in Redis (over cosockets) instead of the shared dict
  rwin = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             max_messages_per_conn = 1, auth = { user = "alice", token = "good" }, allow_plaintext_auth = true,
             rate = { backend = "redis://127.0.0.1:" .. a.rport, key = "rwin" .. a.port,
                      connections = { 3, 1 }, auth = { 3, 1 } } }
  end,
  -- a dripping server: the greeting is timed whole, no retries
  drip = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", timeouts = { greeting = 1 },
             retry = function() return false end }
  end,
  -- for reloads under load: a short exit_timeout, so exiting workers end
  -- what they hold while requests keep coming
  reload = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             exit_timeout = 0.5 }
  end,
  -- the durable outbox in Redis, limits shared by the workers; outcomes logged
  outbox = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             shared_dict = "smtppool", shared_key = "ob" .. a.port .. (a.name or ""), outbox = "redis://127.0.0.1:" .. a.rport,
             outbox_name = a.name, exit_timeout = 2,
             on_result = function(m, res, err)
               ngx.log(ngx.WARN, "OUTBOX ", m.id, " ", res and "sent" or ("failed " .. err.kind))
             end }
  end,
  -- the outbox with short leases (a claim whose reply a cut connection
  -- lost comes back within seconds)
  outbox_short = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             outbox = "redis://127.0.0.1:" .. a.rport, outbox_name = a.name, outbox_lease = 3, exit_timeout = 2 }
  end,
  -- the outbox over rediss://, verified against lua_ssl_trusted_certificate
  -- for the name `sn` (the test certificate holds localhost)
  outbox_tls = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             outbox = ("rediss://:%s@127.0.0.1:%s/0?server_name=%s"):format(a.rpw, a.rport, a.sn),
             outbox_name = a.name, allow_volatile_redis = true, outbox_timeout = 2, exit_timeout = 2 }
  end,
  -- bench/outbox.lua: the same pool with its queue in memory or in the outbox
  bmem = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", max_conns = 2,
             queue_size = tonumber(a.qs), on_result = function(_, res, err)
               ngx.log(ngx.WARN, "OUTCOME ", res and "sent" or ("failed " .. err.kind))
             end }
  end,
  -- a server by name (nginx's resolver), retried as the default policy would
  named = function(a)
    return { host = a.host, port = a.port, tls = "none", helo = "ngx.test" }
  end,
  plain = function(a)
    return { host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test",
             auth = a.token and { user = "alice", token = a.token } or nil, allow_plaintext_auth = true }
  end,
}

local function pool_for(a)
  if a.cfg == "relays" then
    -- the first relay refuses connections; the second is the server under test
    local id = "relays:" .. a.port
    pools[id] = pools[id] or assert(smtp.relays({
      { name = "dead", host = "127.0.0.1", port = 1, tls = "none", helo = "ngx.test" },
      { name = "live", host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test" } }))
    return pools[id]
  end
  if a.cfg == "spread" then
    -- two relays sharing the messages 3 to 1, both sending at once
    local id = "spread:" .. a.port .. ":" .. a.port2
    pools[id] = pools[id] or assert(smtp.relays({
      { name = "a", host = "127.0.0.1", port = a.port, tls = "none", helo = "ngx.test", weight = 3 },
      { name = "b", host = "127.0.0.1", port = tonumber(a.port2), tls = "none", helo = "ngx.test", weight = 1 } },
      { spread = true }))
    return pools[id]
  end
  local id = a.cfg .. ":" .. a.port .. ":" .. (a.name or "") .. ":" .. (a.token or "") .. ":" .. (a.rotate or "")
  local p = pools[id]
  if not p then
    local err
    p, err = smtp.new(CONFIGS[a.cfg](a))
    if not p then return nil, err end
    pools[id] = p
  end
  return p
end

local function say_outcome(res, err)
  if res then
    ngx.say("sent ", res.code, res.relay and (" via " .. res.relay) or "", " rejected ", #res.rejected, " ",
      res.rejected[1] and res.rejected[1].code or "")
    return
  end
  ngx.say("failed ", err.kind, " ", tostring(err))
end

function M.handle()
  local a = ngx.req.get_uri_args()
  a.port = tonumber(a.port) or 0
  local action = ngx.var.uri:sub(2)
  if action == "modules" then
    -- every module loads under LuaJIT, and composition works there
    -- (every file under lua/smtppool, found where this nginx loads them from)
    local init = assert(package.searchpath("smtppool", package.path))
    local root = init:gsub("/smtppool/init%.lua$", "")
    local names = {}
    for path in io.popen("find " .. root .. "/smtppool -name '*.lua' | sort"):lines() do
      names[#names + 1] = path:sub(#root + 2):gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
    end
    for _, n in ipairs(names) do require(n) end
    local msg = require("smtppool.compose.message")
    local tpl = require("smtppool.compose.template")
    local subject = assert(tpl.compile("Hi {{name}}")):render({ name = "Zoë" })
    local data, env = msg.compose({ from = "A <a@x.test>", to = "b@y.test", subject = subject,
      text = "caf959", html = "<p>x</p>", date = 0 })
    ngx.say("loaded ", #names, " ", data and "composed" or tostring(env), " ",
      data and data:match("Date: ([^\r]+)") or "", " ", data and data:match("Subject: ([^\r]+)") or "")
    return
  end
  if action == "rping" then
    -- the floor under oenqueue (bench/outbox.lua): one Redis round trip on
    -- a kept-alive cosocket, no smtppool code, timed as oenqueue is
    local now = require("smtppool.core").now
    local sock = ngx.socket.tcp()
    sock:settimeouts(1000, 1000, 1000)
    local ok, cerr = sock:connect("127.0.0.1", tonumber(a.rport))
    if not ok then ngx.say("failed ", cerr) return end
    local t0 = now()
    sock:send("PING\r\n")
    local line, rerr = sock:receive("*l")
    local t = now() - t0
    sock:setkeepalive(10000, 64)
    ngx.say(line == "+PONG" and ("pong " .. t) or ("failed " .. tostring(line or rerr)))
    return
  end
  local p, err = pool_for(a)
  if not p then
    ngx.say("config ", tostring(err))
    return
  end
  if action == "send" then
    if a.delay then ngx.sleep(tonumber(a.delay)) end -- a handler busy before it hands its message over
    say_outcome(p:send{ from = "a@x.test", to = { a.to or "b@y.test" }, subject = a.subject or "from nginx",
                        text = ".dot line\nbody " .. (a.n or "") .. "\n" })
  elseif action == "raw" then
    say_outcome(p:send_raw{ from = "a@x.test", to = { a.to or "b@y.test", "reject-me@y.test" },
                            data = "Subject: from nginx\r\n\r\n.dot line\r\nbody\r\n" })
  elseif action == "big" then
    -- about 1 MB, dot-stuffed lines included: short writes and reads on the way
    say_outcome(p:send_raw{ from = "a@x.test", to = "big@y.test", data = require("ngx_data").big() })
  elseif action == "burst" then
    local n, queued, busy = tonumber(a.n) or 1, 0, 0
    for i = 1, n do
      local ok, qerr = p:enqueue{ from = "a@x.test", to = "q" .. i .. "@y.test", subject = "queued " .. i, text = "q" }
      if ok then queued = queued + 1 elseif qerr.kind == "busy" then busy = busy + 1 end
    end
    ngx.say("queued ", queued, " busy ", busy)
  elseif action == "batch" then
    local list, by = {}, {}
    for i = 1, tonumber(a.n) or 1 do
      list[i] = { from = "a@x.test", to = "batch" .. i .. "@y.test", subject = "batch " .. i, text = "b" }
    end
    local sum = p:send_batch(list, { on_result = function(_, res, berr)
      local k = res and res.relay or ("failed:" .. berr.kind)
      by[k] = (by[k] or 0) + 1
    end })
    ngx.say("sent ", sum.sent, " failed ", sum.failed, " a ", by.a or 0, " b ", by.b or 0)
  elseif action == "gated" then
    -- a batch whose marks are due at the loop's wait (as the outbox's): when
    -- each mark is taken, the server (its event log, a.log) must not have
    -- that message yet; on_result sleeps while the next dot is queued
    local marks, early = 0, 0
    local function mark(m)
      marks = marks + 1
      local f = io.open(a.log, "rb")
      local text = f and f:read("*a") or ""
      if f then f:close() end
      for line in text:gmatch("[^\n]+") do
        if line:find('"ev":%s*"message"') and line:find('"' .. m.to[1] .. '"', 1, true) then early = early + 1 end
      end
    end
    local list = {}
    for i = 1, tonumber(a.n) or 1 do
      list[i] = { from = "a@x.test", to = { "g" .. i .. "@y.test" }, data = "Subject: g\r\n\r\nbody\r\n" }
    end
    -- the pool itself (the ngx pool's send_batch hands messages to its agent)
    local sum = p.pool:send_batch(list, { mark_async = mark,
      mark_many = function(l) for _, m in ipairs(l) do mark(m) end end,
      on_result = function() ngx.sleep(0.1) end })
    p.pool:close_connections() -- their light threads are this request's: it ends with them
    ngx.say("sent ", sum.sent, " marks ", marks, " early ", early)
  elseif action == "enqueue" then
    local ok, qerr = p:enqueue{ from = "a@x.test", to = a.to or "b@y.test", subject = "queued", text = "q" }
    ngx.say(ok and "queued" or ("failed " .. tostring(qerr)))
  elseif action == "oenqueue" then
    -- the id, and the seconds enqueue took (for bench/outbox.lua)
    local now = require("smtppool.core").now
    local t0 = now()
    local id, qerr = p:enqueue{ from = "a@x.test", to = a.to or "b@y.test", subject = "outbox", text = "o" }
    ngx.say(id and ("id " .. id .. " " .. (now() - t0)) or ("failed " .. qerr.kind .. " " .. tostring(qerr)))
  elseif action == "outcome" then
    local o, oerr = p:outcome(a.id)
    ngx.say(o and ("outcome " .. o.status) or (oerr and ("failed " .. oerr.kind) or "pending"))
  elseif action == "verify" then
    local r, verr = p:verify()
    ngx.say(r and ("verified tls=" .. tostring(r.tls) .. " auth=" .. tostring(r.auth)) or
      ("failed " .. verr.kind .. " " .. tostring(verr)))
  elseif action == "stats" then
    local s = p:stats()
    ngx.say("opened ", s.opened, " open_total ", tostring(s.open_total), " sent ", s.sent, " queued ", s.queued,
      " learned_cap ", tostring(s.learned_cap))
  else
    ngx.status = 404
    ngx.say("no such action")
  end
end

return M
