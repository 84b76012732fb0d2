-- The demo: starts exim on a free loopback port, sends a small run of
-- messages through one pool, shows each outcome and what exim logged, then
-- stops exim. Run it with `make demo`.
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "lua/?.so;" .. package.cpath

local smtppool = require("smtppool")
local peers = require("peers")

local N = tonumber(arg[1]) or 20
local exim = peers.exim({ max_per_conn = 0 })
print(("demo: exim listening on 127.0.0.1:%d"):format(exim.port))

local ok, err = pcall(function()
  local pool = assert(smtppool.new{
    host = "127.0.0.1", port = exim.port, tls = "none", helo = "demo.example",
    on_event = function(ev)
      if ev.type ~= "ready" then print("  event: " .. ev.type .. (ev.err and (" " .. tostring(ev.err)) or "")) end
    end,
  })
  local sent, failed = 0, 0
  for i = 1, N do
    local rcpts = { ("user%d@example.net"):format(i) }
    if i % 10 == 0 then rcpts[2] = ("reject-%d@example.net"):format(i) end
    local data = table.concat({
      "From: Demo <demo@example.org>",
      "To: " .. rcpts[1],
      "Subject: smtppool demo message " .. i,
      "Message-ID: <demo-" .. i .. "@example.org>",
      "",
      "Hello from smtppool.",
      ".this line starts with a dot and arrives intact",
      "",
    }, "\r\n")
    local res, e = pool:send_raw{ from = "demo@example.org", to = rcpts, data = data }
    if res then
      sent = sent + 1
      local note = #res.rejected > 0 and ("; refused " .. res.rejected[1].address .. " (" .. res.rejected[1].code .. ")") or ""
      print(("  %3d sent: %d %s%s"):format(i, res.code, res.text, note))
    else
      failed = failed + 1
      print(("  %3d failed: %s"):format(i, tostring(e)))
    end
  end
  local st = pool:stats()
  pool:close()
  exim:wait_deliveries(sent, 30)
  print(("demo: %d sent, %d failed, %d connection(s) opened; exim logged %d deliveries"):format(
    sent, failed, st.opened, exim:deliveries()))
end)
exim:stop()
if not ok then
  io.stderr:write("demo failed: ", tostring(err), "\n")
  os.exit(1)
end
