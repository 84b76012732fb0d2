-- The demo (`make demo`): starts exim on a free loopback port with a cap
-- of 5 messages per session (as MailerSend has), writes a 1,000-recipient
-- list, and runs the command line on it:
--
--   bin/smtppool send --config examples/campaign/pool.lua --to list.csv \
--     --subject "Hello {{name}}" --text examples/campaign/message.txt \
--     --html examples/campaign/message.html --journal run.journal
--
-- then prints the report and what exim logged, and stops exim.
-- `make demo N=5000` for another size.
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local peers = require("peers")

local N = tonumber(arg[1]) or 1000
local exim = peers.exim({ max_per_conn = 5 })
local dir = peers.tmpdir()
print(("demo: exim on 127.0.0.1:%d, at most 5 messages per session; %d recipients"):format(exim.port, N))

local cities = { "Oslo", "Lisboa", "Köln", "", "Kraków" }
local f = assert(io.open(dir .. "/list.csv", "wb"))
f:write("email,name,n,city\n")
for i = 1, N do
  local email = (i % 250 == 0) and ("reject-%d@example.net"):format(i) or ("user%d@example.net"):format(i)
  f:write(('%s,"Reader %d",%d,%s\n'):format(email, i, i, cities[i % #cities + 1]))
end
f:close()

local cmd = ("SMTP_PORT=%d lua5.4 bin/smtppool send --config examples/campaign/pool.lua --to %s "
  .. "--subject 'Hello {{name}}' --text examples/campaign/message.txt --html examples/campaign/message.html "
  .. "--journal %s --report %s"):format(exim.port, peers.quote(dir .. "/list.csv"), peers.quote(dir .. "/run.journal"),
  peers.quote(dir .. "/report.json"))
local ok, how, code = os.execute(cmd)
local report = require("dkjson").decode(peers.read_file(dir .. "/report.json") or "") or {}
print(("demo: report: %s sent, %s failed (%d listed with their reasons), %s ambiguous, %.1f s"):format(
  tostring(report.sent), tostring(report.failed), #(report.failures or {}), tostring(report.ambiguous),
  report.elapsed or 0))
for i = 1, math.min(2, #(report.failures or {})) do
  print("demo:   " .. report.failures[i].email .. ": " .. report.failures[i].reason)
end
local sent = tonumber(report.sent) or 0
pcall(exim.wait_deliveries, exim, sent, 60)
print(("demo: exim logged %d deliveries and refused %d MAIL commands for its cap; exit code %s"):format(
  exim:deliveries(), #exim:log_lines("too many messages"), tostring(code)))
exim:stop()
os.execute("rm -rf " .. peers.quote(dir))
-- the refused addresses (reject-*) make exit code 1: that is the demo working
if not ok and code ~= 1 then os.exit(1) end
