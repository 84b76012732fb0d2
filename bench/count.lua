-- `make bench` (counts): how often the pool crosses into C per message, and
-- how many bytes Lua allocates per message, counted rather than estimated.
--
-- Every function of smtppool.core and every method of its connection
-- objects is wrapped with a counter before the pool is loaded, so each call
-- from Lua into C is seen. Allocation is the growth of Lua's heap with the
-- collector stopped: a copy of a message's text would show as at least its
-- size per message. Usage: lua5.4 bench/count.lua SINK
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local core = require("smtppool.core")

local calls, by_name = 0, {}
local function counted(name, f)
  return function(...)
    calls = calls + 1
    by_name[name] = (by_name[name] or 0) + 1
    return f(...)
  end
end
for k, f in pairs(core) do
  if type(f) == "function" and k ~= "connect" then core[k] = counted(k, f) end
end
local wrapped_methods = false
local connect = core.connect
core.connect = function(...)
  calls = calls + 1
  by_name.connect = (by_name.connect or 0) + 1
  local c, e = connect(...)
  if c and not wrapped_methods then
    wrapped_methods = true
    local idx = getmetatable(c).__index
    for k, f in pairs(idx) do
      if type(f) == "function" then idx[k] = counted("conn:" .. k, f) end
    end
  end
  return c, e
end

local smtppool = require("smtppool")
local peers = require("peers")

local N = tonumber(os.getenv("BENCH_N")) or 2000
local SIZE = tonumber(os.getenv("BENCH_SIZE")) or 2048
local SINK = arg[1] or "build/sink"

local dir = peers.tmpdir()
local pid, port = peers.sink(SINK, dir)

local function lists(size)
  local body = ("x"):rep(70) .. "\r\n"
  body = body:rep(math.floor(size / #body))
  local raw, composed = {}, {}
  for i = 1, N do
    raw[i] = { from = "a@x.test", to = { "b@y.test" }, data = "From: a@x.test\r\nSubject: " .. i .. "\r\n\r\n" .. body }
    composed[i] = { from = "a@x.test", to = "b@y.test", subject = "n" .. i, text = body }
  end
  return { raw = raw, composed = composed }
end

-- Runs one case; returns C calls per message and Lua bytes allocated per message.
local function run(list, o)
  local opts = { host = "127.0.0.1", port = port, tls = "none", max_conns = 4 }
  for k, v in pairs(o or {}) do opts[k] = v end
  local pool = assert(smtppool.new(opts))
  assert(pool:send_raw({ from = "a@x.test", to = "b@y.test", data = "From: a@x.test\r\nSubject: warm-up\r\n\r\nx\r\n" }))
  collectgarbage()
  collectgarbage("stop")
  calls, by_name = 0, {}
  local heap0 = collectgarbage("count")
  local s = pool:send_batch(list)
  local heap1 = collectgarbage("count")
  local c, detail = calls, by_name
  collectgarbage("restart")
  pool:close()
  collectgarbage()
  assert(s.sent == N, "sent " .. s.sent)
  return c / N, (heap1 - heap0) * 1024 / N, detail
end

local small, large = lists(SIZE), lists(4 * SIZE)
print(("%d messages, 4 connections: calls from Lua into C per message, and the Lua heap allocated per"):format(N))
print(("message at %d and %d bytes; body copies = growth of allocation / growth of size"):format(SIZE, 4 * SIZE))
print(("%-40s %8s %12s %12s %12s"):format("case", "C calls", "Lua B @1x", "Lua B @4x", "body copies"))
local key = peers.sh("openssl genpkey -algorithm ed25519 2>/dev/null")
local detail
for _, c in ipairs({
  { "send_raw, no rotation", "raw" },
  { "send_raw, rotate every 5", "raw", { max_messages_per_conn = 5 } },
  { "composed", "composed" },
  { "composed, DKIM-signed (Ed25519)", "composed",
    { dkim = { domain = "x.test", selector = "s", key = key, algorithm = "ed25519-sha256" } } },
}) do
  local calls1, bytes1, d = run(small[c[2]], c[3])
  local _, bytes4 = run(large[c[2]], c[3])
  if c[1] == "send_raw, rotate every 5" then detail = d end
  print(("%-40s %8.2f %12.0f %12.0f %12.2f"):format(c[1], calls1, bytes1, bytes4, (bytes4 - bytes1) / (3 * SIZE)))
end
local names = {}
for k, v in pairs(detail) do names[#names + 1] = ("%s %.2f"):format(k, v / N) end
table.sort(names)
print("calls per message, send_raw rotating every 5: " .. table.concat(names, ", "))

os.execute("kill " .. pid)
os.execute("rm -rf " .. peers.quote(dir))
