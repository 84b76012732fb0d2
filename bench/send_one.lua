-- One message with one attachment, then this process's peak RSS in KB.
-- Usage: lua5.4 bench/send_one.lua PORT FILE path|data
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local smtppool = require("smtppool")
local port, file, how = tonumber(arg[1]), arg[2], arg[3]
local att = { filename = "blob.bin" }
if how == "path" then
  att.path = file
else
  local f = assert(io.open(file, "rb"))
  att.data = f:read("a")
  f:close()
end
local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none" })
assert(pool:send{ from = "a@x.test", to = "b@y.test", subject = "big", text = "x", attachments = { att } })
pool:close()
att.data = nil
collectgarbage()
local status = assert(io.open("/proc/self/status")):read("a")
print(status:match("VmHWM:%s*(%d+)"))
