-- One sending process of tests/spec/redis_spec.lua: a pool whose limits live
-- in Redis, sending N messages to an SMTP port; prints "sent <n> events <list>".
-- Usage: lua5.4 redis_child.lua SMTP_PORT REDIS_PORT KEY N MAX_CONNS PER_CONN TAG
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local smtp_port, redis_port, key, n, conns, per, tag = tonumber(arg[1]), tonumber(arg[2]), arg[3], tonumber(arg[4]),
  tonumber(arg[5]), tonumber(arg[6]), arg[7]
local events = {}
-- AUTH_WINDOW = {n, per} (set with lua5.4 -e): an AUTH window instead of the connection window
local aw = rawget(_G, "AUTH_WINDOW")
local pool = assert(smtppool.new{
  host = "127.0.0.1", port = smtp_port, tls = "none", max_conns = conns,
  max_messages_per_conn = per > 0 and per or nil, wait_timeout = 60,
  auth = aw and { user = "alice", token = "good" } or nil, allow_plaintext_auth = aw and true or nil,
  rate = { backend = "redis://127.0.0.1:" .. redis_port, key = key, connections = not aw and { 3, 1 } or nil,
           auth = aw },
  on_event = function(ev)
    if ev.type == "limits_unavailable" or ev.type == "limits_available" then events[#events + 1] = ev.type end
  end,
})
local list = {}
for i = 1, n do
  list[i] = { from = "a@x.test", to = { ("%s%d@y.test"):format(tag, i) },
              data = ("Subject: %s %d\r\n\r\nbody\r\n"):format(tag, i) }
end
local s = pool:send_batch(list)
pool:close()
print(("sent %d events %s"):format(s.sent, table.concat(events, ",")))
