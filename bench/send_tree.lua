-- Sends N messages through one smtppool tree (its lua/ and lua/smtppool/core.so)
-- and prints the seconds taken: `make bench BASELINE=dir` runs it for an
-- older checkout and for this one, interleaved, in the same run.
-- Usage: lua5.4 bench/send_tree.lua TREE PORT CONNS PER_CONN N SIZE
local tree, port, conns, per, N, SIZE = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]),
  tonumber(arg[5]), tonumber(arg[6])
package.path = tree .. "/lua/?.lua;" .. tree .. "/lua/?/init.lua;" .. package.path
package.cpath = tree .. "/lua/?.so;" .. package.cpath
local smtppool = require("smtppool")
local core = require("smtppool.core")
local line = ("x"):rep(70) .. "\r\n"
local body = line:rep(math.floor(SIZE / #line))
local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none", max_conns = conns,
  max_messages_per_conn = per > 0 and per or nil })
local i = 0
local t = core.now()
local s = pool:send_batch(function()
  if i == N then return nil end
  i = i + 1
  return { from = "a@x.test", to = { "b@y.test" }, data = "From: a@x.test\r\nSubject: " .. i .. "\r\n\r\n" .. body }
end)
pool:close()
assert(s.sent == N, "sent " .. s.sent)
print(core.now() - t)
