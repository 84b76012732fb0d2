-- The send the throughput bench times: N messages of about SIZE bytes through
-- one pool to the sink; returns the seconds taken. Shared by bench/run.lua
-- (this tree, in process) and bench/send_tree.lua (any tree, in a process).
-- extra: more pool options (bdat_window...).
return function(smtppool, port, conns, per_conn, N, SIZE, extra)
  local core = require("smtppool.core")
  local line = ("x"):rep(70) .. "\r\n"
  local body = line:rep(math.floor(SIZE / #line))
  local opts = { host = "127.0.0.1", port = port, tls = "none", max_conns = conns, max_messages_per_conn = per_conn }
  for k, v in pairs(extra or {}) do opts[k] = v end
  local pool = assert(smtppool.new(opts))
  local i = 0
  local t = core.now()
  local s = pool:send_batch(function()
    if i == N then return nil end
    i = i + 1
    return { from = "a@x.test", to = { "b@y.test" }, data = "From: a@x.test\r\nTo: b@y.test\r\nSubject: " .. i
      .. "\r\n\r\n" .. body }
  end)
  pool:close()
  assert(s.sent == N, "smtppool sent " .. s.sent)
  return core.now() - t
end
