-- The quick start: starts exim on a free loopback port (the tests' helper),
-- sends one composed message and a small batch through it, prints what
-- happened, and stops exim. From the repository's top folder, after `make`:
--
--   lua5.4 examples/hello.lua
--
-- Point `host`, `port`, `tls` and `auth` at your own server to use it for real.
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local peers = require("peers")
local smtppool = require("smtppool")

local exim = peers.exim({ max_per_conn = 5 }) -- a local MTA that ends sessions after 5 messages
local ok, err = pcall(function()
  local pool = assert(smtppool.new{
    host = "127.0.0.1", port = exim.port,
    tls = "none",                  -- a real server: leave the default ("starttls"), or port 465
    max_conns = 2,
  })

  -- one message, composed (UTF-8, MIME and RFC 2047 are the pool's job)
  local res, e = pool:send{
    from = "Hello <hello@example.org>", to = "alice@example.net",
    subject = "Grüße from smtppool", text = "Hi Alice.", html = "<p>Hi <b>Alice</b>.</p>",
  }
  print(res and ("sent: %d %s"):format(res.code, res.text) or ("failed: " .. tostring(e)))

  -- a batch: 12 messages over 2 connections; the pool is not told exim's cap
  -- of 5 a session: a session exim ends with 421 is never reused, and the
  -- message it refused moves to a fresh connection without spending a retry
  local list = {}
  for i = 1, 12 do
    list[i] = { from = "hello@example.org", to = ("user%d@example.net"):format(i),
                subject = "Batch " .. i, text = "Message " .. i }
  end
  local summary = pool:send_batch(list, {
    on_result = function(msg, r, fe) if not r then print("failed:", msg.to, fe) end end,
  })
  local st = pool:stats()
  print(("batch: %d sent, %d failed, over %d connections (%d moved after a 421)"):format(
    summary.sent, summary.failed, st.opened, st.moved))
  pool:close()
  exim:wait_deliveries(13, 30)
  print(("exim delivered %d messages"):format(exim:deliveries()))
end)
exim:stop()
if not ok then error(err, 0) end
