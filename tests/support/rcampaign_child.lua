-- One worker of a campaign shared through Redis (tests/spec/redis_spec.lua).
-- Usage: lua5.4 rcampaign_child.lua SMTP_PORT REDIS_PORT NAME CSV|- CONNS LEASE
-- Prints "sent <n> ambiguous <n> loaded <n> duplicates <n> total <n>".
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local smtp_port, redis_port, name, list, conns, lease = tonumber(arg[1]), tonumber(arg[2]), arg[3], arg[4],
  tonumber(arg[5]), tonumber(arg[6])
local pool = assert(smtppool.new{ host = "127.0.0.1", port = smtp_port, tls = "none", max_conns = conns })
local r = assert(smtppool.campaign{
  pool = pool, journal = ("redis://127.0.0.1:%d"):format(redis_port), name = name, lease = lease,
  recipients = list ~= "-" and list or nil, progress = false,
  message = { from = "news@x.test", subject = "Hello {{name}}", text = "Dear {{name}}" },
}:run())
pool:close()
print(("sent %d ambiguous %d loaded %d duplicates %d total %d"):format(r.sent, r.ambiguous, r.loaded or 0,
  r.duplicates or 0, r.total))
io.stdout:flush()
