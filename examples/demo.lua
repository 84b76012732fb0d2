-- The demo: starts exim on a free loopback port with a per-session cap of 5
-- messages (as MailerSend has), sends a run of messages through a pool that
-- was told nothing about the cap, and shows the pool learning it, rotating
-- before the server's 421 and delivering everything exactly once.
-- Run it with `make demo` (N messages: `make demo N=500`).
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "lua/?.so;" .. package.cpath

local smtppool = require("smtppool")
local peers = require("peers")

local N = tonumber(arg[1]) or 100
local exim = peers.exim({ max_per_conn = 5 })
print(("demo: exim on 127.0.0.1:%d, at most 5 messages per session"):format(exim.port))

local ok, err = pcall(function()
  local pool = assert(smtppool.new{
    host = "127.0.0.1", port = exim.port, tls = "none", helo = "demo.example", max_conns = 4,
    on_event = function(ev)
      if ev.type == "learn_cap" then
        print(("  learned: the server allows %d messages per session"):format(ev.cap))
      elseif ev.type == "discard" then
        print(("  connection %d ended by the server after %d messages: %s"):format(ev.conn, ev.messages, tostring(ev.err)))
      end
    end,
  })
  local i = 0
  local function next_message()
    if i == N then return nil end
    i = i + 1
    local rcpts = { ("user%d@example.net"):format(i) }
    if i % 25 == 0 then rcpts[2] = ("reject-%d@example.net"):format(i) end
    return {
      from = "demo@example.org", to = rcpts,
      data = table.concat({
        "From: Demo <demo@example.org>", "To: " .. rcpts[1],
        "Subject: smtppool demo message " .. i, "Message-ID: <demo-" .. i .. "@example.org>", "",
        "Hello from smtppool.", ".this line starts with a dot and arrives intact", "",
      }, "\r\n"),
    }
  end
  local t0 = os.clock()
  local summary = pool:send_batch(next_message, { on_result = function(msg, res, e)
    if not res then
      print(("  failed %s: %s"):format(msg.to[1], tostring(e)))
    elseif #res.rejected > 0 then
      print(("  sent to %s; refused %s (%d %s)"):format(msg.to[1], res.rejected[1].address,
        res.rejected[1].code, res.rejected[1].enhanced or ""))
    end
  end })
  local st = pool:stats()
  pool:close()
  exim:wait_deliveries(summary.sent, 60)
  print(("demo: %d sent, %d failed; %d connections opened, %d rotated before the cap, "
    .. "%d ended by the server, %d messages moved without spending an attempt (%.2fs CPU)"):format(
    summary.sent, summary.failed, st.opened, st.rotated, st.closed_by_server, st.moved, os.clock() - t0))
  print(("demo: exim logged %d deliveries and refused %d MAIL commands for the cap"):format(
    exim:deliveries(), #exim:log_lines("too many messages")))
end)
exim:stop()
if not ok then
  io.stderr:write("demo failed: ", tostring(err), "\n")
  os.exit(1)
end
