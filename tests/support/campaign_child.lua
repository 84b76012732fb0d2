-- Runs a campaign in its own process so a spec can kill -9 it.
-- Usage: lua5.4 campaign_child.lua PORT CSV JOURNAL
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local port, list, journal = tonumber(arg[1]), arg[2], arg[3]
local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none", max_conns = 4,
  max_messages_per_conn = 5 })
local report = assert(smtppool.campaign{ pool = pool, recipients = list, journal = journal, progress = false,
  message = { from = "news@x.test", subject = "Hello {{name}}", text = "Dear {{name}}" } }:run())
pool:close()
print(smtppool.campaign.summary(report))
