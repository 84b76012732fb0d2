-- Real peers for the specs: exim4 (a real MTA) and the scriptable fault
-- server, each on a free 127.0.0.1 port, each stopped by the spec that
-- started it. Every wait here is bounded in time.
local json = require("dkjson")

local M = {}

local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "tests/support"
-- Children must not inherit a sanitizer preload meant for the Lua process.
local CLEAN = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS "
--- The prefix that runs a system tool without the sanitizers `make sanitize`
-- preloads (pkill and pgrep can hang with them).
M.CLEAN = CLEAN
local PY = CLEAN .. "/usr/bin/python3"

local function sh(cmd)
  local p = assert(io.popen(cmd, "r"))
  local out = p:read("a")
  p:close()
  return out
end
M.sh = sh

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
M.quote = q

function M.sleep(s) os.execute("sleep " .. s) end

--- Polls fn every 50 ms until it returns a true value or timeout seconds pass.
function M.wait_for(fn, timeout, what)
  local deadline = os.time() + (timeout or 10)
  while true do
    local v = fn()
    if v then return v end
    if os.time() > deadline then
      error("timed out waiting for " .. (what or "a condition"), 2)
    end
    M.sleep(0.05)
  end
end

function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

function M.write_file(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- Under tests/run.sh every folder goes inside SP_TEST_TMP, which the runner
-- removes when it exits, whatever a spec left (a spec that failed half-way,
-- the certificates a busted process made, which os.exit never collects).
function M.tmpdir()
  local base = os.getenv("SP_TEST_TMP") or "/tmp"
  local d = sh("mktemp -d " .. q(base .. "/smtppool-test.XXXXXX")):gsub("%s+$", "")
  assert(d ~= "", "mktemp failed")
  os.execute("chmod 755 " .. q(d))
  return d
end

function M.free_port()
  return tonumber(sh(PY .. [[ -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])']]))
end

-- A zombie (exited, not yet reaped by init) counts as gone.
local function alive(pid)
  if not pid then return false end
  local stat = M.read_file("/proc/" .. pid .. "/stat")
  return stat ~= nil and not stat:match("^%d+ %b() Z")
end

local function stop_pid(pid)
  if not alive(pid) then return end
  os.execute("kill " .. pid .. " 2>/dev/null")
  local deadline = os.time() + 5
  while alive(pid) and os.time() <= deadline do M.sleep(0.05) end
  if alive(pid) then os.execute("kill -9 " .. pid .. " 2>/dev/null") end
end

-- Open descriptors of this process (for leak checks).
function M.fd_count()
  return tonumber(sh("ls /proc/" .. sh("echo $PPID"):gsub("%s", "") .. "/fd | wc -l"))
end

---------------------------------------------------------------- certificates

local certs_cache

--- Test certificates, made once per process with the openssl command:
-- ca (CA), cert/key (server, for localhost and 127.0.0.1, signed by ca),
-- other_ca (a CA that signed nothing here), client_cert/client_key.
function M.certs()
  if certs_cache then return certs_cache end
  local d = M.tmpdir()
  local function run(cmd)
    assert(os.execute(CLEAN .. cmd .. " >" .. q(d .. "/openssl.log") .. " 2>&1"),
      "openssl failed: " .. tostring(M.read_file(d .. "/openssl.log")))
  end
  local function ca(name)
    run(("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=%s -keyout %s -out %s"):format(
      name, q(d .. "/" .. name .. ".key"), q(d .. "/" .. name .. ".pem")))
  end
  ca("ca")
  ca("other_ca")
  M.write_file(d .. "/san.ext", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
  run(("openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout %s -out %s"):format(
    q(d .. "/server.key"), q(d .. "/server.csr")))
  run(("openssl x509 -req -days 2 -in %s -CA %s -CAkey %s -CAcreateserial -extfile %s -out %s"):format(
    q(d .. "/server.csr"), q(d .. "/ca.pem"), q(d .. "/ca.key"), q(d .. "/san.ext"), q(d .. "/server.pem")))
  M.write_file(d .. "/client.ext", "extendedKeyUsage=clientAuth\n")
  run(("openssl req -newkey rsa:2048 -nodes -subj /CN=client.test -keyout %s -out %s"):format(
    q(d .. "/client.key"), q(d .. "/client.csr")))
  run(("openssl x509 -req -days 2 -in %s -CA %s -CAkey %s -CAcreateserial -extfile %s -out %s"):format(
    q(d .. "/client.csr"), q(d .. "/ca.pem"), q(d .. "/ca.key"), q(d .. "/client.ext"), q(d .. "/client.pem")))
  os.execute("chmod 644 " .. q(d) .. "/*")
  -- removed when the Lua state closes (the end of the test run)
  M._certs_reaper = setmetatable({}, { __gc = function() os.execute("rm -rf " .. q(d)) end })
  certs_cache = { dir = d, ca = d .. "/ca.pem", cert = d .. "/server.pem", key = d .. "/server.key",
                  other_ca = d .. "/other_ca.pem", client_cert = d .. "/client.pem",
                  client_key = d .. "/client.key" }
  return certs_cache
end

---------------------------------------------------------------- exim

local Exim = {}
Exim.__index = Exim

--- Starts exim on a free port.
-- opts.max_per_conn: smtp_accept_max_per_connection (0: no cap)
-- opts.pipelining: advertise PIPELINING (default true)
-- opts.starttls: advertise STARTTLS (default true); exim.tls_port takes implicit TLS
-- opts.tls_priority: GnuTLS priority string (default NORMAL)
-- opts.auth: list of mechanisms to offer ({"PLAIN", "LOGIN", "CRAM-MD5"}; default all)
function M.exim(opts)
  opts = opts or {}
  local dir = M.tmpdir()
  for _, sub in ipairs({ "spool", "log", "mail" }) do os.execute("mkdir -p " .. q(dir .. "/" .. sub)) end
  local user = "Debian-exim"
  os.execute("chown -R " .. user .. ":" .. user .. " " .. q(dir))
  local conf = assert(M.read_file(HERE .. "/exim.conf.in"))
  local last_err
  local certs = M.certs()
  local offer = {}
  for _, m in ipairs(opts.auth or { "PLAIN", "LOGIN", "CRAM-MD5" }) do offer[m] = true end
  local function adv(m) return offer[m] and "true" or "false" end
  for _ = 1, 5 do -- a free port can be taken between the probe and the bind: retry
    local port, tls_port = M.free_port(), M.free_port()
    local text = conf:gsub("@DIR@", dir):gsub("@PORT@", tostring(port)):gsub("@TLS_PORT@", tostring(tls_port))
      :gsub("@MAX_PER_CONN@", tostring(opts.max_per_conn or 0))
      :gsub("@USER@", user):gsub("@PIPELINING@", opts.pipelining == false and "" or "*")
      :gsub("@CHUNKING@", opts.chunking and "*" or "")
      :gsub("@TLS_ADVERTISE@", opts.starttls == false and "" or "*")
      :gsub("@TLS_CERT@", certs.cert):gsub("@TLS_KEY@", certs.key):gsub("@TLS_CA@", certs.ca)
      :gsub("@TLS_PRIORITY@", opts.tls_priority or "NORMAL")
      :gsub("@ADV_PLAIN@", adv("PLAIN")):gsub("@ADV_LOGIN@", adv("LOGIN")):gsub("@ADV_CRAM@", adv("CRAM-MD5"))
    M.write_file(dir .. "/exim.conf", text)
    os.execute("rm -f " .. q(dir .. "/exim.pid"))
    local rc = os.execute(CLEAN .. "exim4 -C " .. q(dir .. "/exim.conf") .. " -bd -oX " .. port .. ":" .. tls_port
      .. " -oP " .. q(dir .. "/exim.pid") .. " 2>" .. q(dir .. "/start.err"))
    if rc then
      local ok = pcall(M.wait_for, function()
        local log = M.read_file(dir .. "/log/mainlog") or ""
        return log:find("daemon started", 1, true) and M.read_file(dir .. "/exim.pid")
      end, 10, "exim to start")
      if ok then
        local self = setmetatable({ dir = dir, port = port, tls_port = tls_port,
          pid = tonumber((M.read_file(dir .. "/exim.pid") or ""):match("%d+")) }, Exim)
        return self
      end
    end
    last_err = (M.read_file(dir .. "/start.err") or "") .. (M.read_file(dir .. "/log/paniclog") or "")
    stop_pid(tonumber((M.read_file(dir .. "/exim.pid") or ""):match("%d+") or ""))
  end
  os.execute("rm -rf " .. q(dir))
  error("exim did not start: " .. tostring(last_err))
end

function Exim:mainlog() return M.read_file(self.dir .. "/log/mainlog") or "" end

--- Lines of the main log matching a Lua pattern.
function Exim:log_lines(pattern)
  local out = {}
  for line in self:mainlog():gmatch("[^\n]+") do
    if line:find(pattern) then out[#out + 1] = line end
  end
  return out
end

--- Number of deliveries exim logged ("=>" lines).
function Exim:deliveries() return #self:log_lines(" => ") end

function Exim:wait_deliveries(n, timeout)
  return M.wait_for(function() return self:deliveries() >= n end, timeout or 20,
    ("%d deliveries (have %d)"):format(n, self:deliveries()))
end

--- Messages in the maildir, as strings (LF line ends, as exim stores them).
function Exim:messages()
  local out = {}
  local list = sh("ls " .. q(self.dir .. "/mail/new") .. " 2>/dev/null")
  for name in list:gmatch("[^\n]+") do
    out[#out + 1] = M.read_file(self.dir .. "/mail/new/" .. name)
  end
  return out
end

function Exim:stop()
  if self.stopped then return end
  self.stopped = true
  stop_pid(self.pid)
  -- Delivery processes of the last messages may still be running, and exim
  -- would re-create its log folder after we remove it: wait for them (bounded).
  local deadline = os.time() + 10
  while os.time() <= deadline do
    local live = false
    for pid in sh(CLEAN .. "pgrep -f " .. q(self.dir .. "/exim.conf") .. " 2>/dev/null"):gmatch("%d+") do
      if alive(tonumber(pid)) then live = true end
    end
    if not live then break end
    M.sleep(0.1)
  end
  os.execute("rm -rf " .. q(self.dir))
end

--- The largest number of events (times, in seconds) inside any window of
-- `per` seconds: what a server's log says of a rate window.
function M.max_in_window(times, per)
  table.sort(times)
  local best, j = 0, 1
  for i = 1, #times do
    while times[i] - times[j] >= per do j = j + 1 end
    best = math.max(best, i - j + 1)
  end
  return best
end

--- Writes a recipients CSV (email,name): prefix<from>@y.test .. prefix<to>@y.test, then `extra`.
function M.write_list(path, prefix, from, to, extra)
  local lines = { "email,name" }
  for i = from, to do lines[#lines + 1] = ("%s%d@y.test,Reader %d"):format(prefix, i, i) end
  M.write_file(path, table.concat(lines, "\n") .. "\n" .. (extra or ""))
end

---------------------------------------------------------------- redis

local Redis = {}
Redis.__index = Redis

--- Starts redis-server on 127.0.0.1 (a free port, or `port`), its files in
-- a folder of its own; with the append-only file on (a restart keeps the
-- data), unless opts.persist is false (nothing on disk); opts.password sets
-- requirepass; opts.tls (a table from certs()) makes port a TLS port (rediss://)
-- with no plaintext one.
function M.redis(opts)
  opts = opts or {}
  local r = setmetatable({ dir = opts.dir or M.tmpdir(), port = opts.port or M.free_port(),
                           persist = opts.persist ~= false, password = opts.password, tls = opts.tls }, Redis)
  r:start()
  return r
end

function Redis:start()
  local ports = ("--port %d "):format(self.port)
  if self.tls then
    ports = ("--port 0 --tls-port %d --tls-cert-file %s --tls-key-file %s --tls-ca-cert-file %s "
      .. "--tls-auth-clients no "):format(self.port, q(self.tls.cert), q(self.tls.key), q(self.tls.ca))
  end
  self.pid = tonumber(sh(("%sredis-server --bind 127.0.0.1 %s--dir %s --save '' --appendonly %s "
    .. "--protected-mode no --daemonize no %s>%s 2>&1 & echo $!"):format(CLEAN, ports, q(self.dir),
    self.persist and "yes" or "no", self.password and ("--requirepass " .. q(self.password) .. " ") or "",
    q(self.dir .. "/redis.log"))):match("%d+"))
  M.wait_for(function()
    return (M.read_file(self.dir .. "/redis.log") or ""):find("Ready to accept connections", 1, true)
  end, 10, "redis-server")
end

--- Stops the server (its data stays for a restart when persisted).
function Redis:kill()
  stop_pid(self.pid)
  -- a restart writes a fresh "Ready" line: forget the old ones
  os.rename(self.dir .. "/redis.log", self.dir .. "/redis.log.old")
end

function Redis:stop()
  if self.stopped then return end
  self.stopped = true
  self:kill()
  os.execute("rm -rf " .. q(self.dir))
end

---------------------------------------------------------------- fault server

local Fault = {}
Fault.__index = Fault

-- Starts one of the Python test servers with a script; it prints its port.
local function start_server(file, script, port, args)
  local dir = M.tmpdir()
  local sfile = dir .. "/script.json"
  M.write_file(sfile, json.encode(script or {}))
  local cmd = ("%s %s --script %s --log %s%s%s >%s 2>%s & echo $!"):format(PY, q(HERE .. "/" .. file),
    q(sfile), q(dir .. "/events.jsonl"), port and (" --port " .. port) or "", args or "", q(dir .. "/port"),
    q(dir .. "/stderr"))
  local pid = tonumber(sh(cmd):match("%d+"))
  local ok, port = pcall(M.wait_for, function()
    local s = M.read_file(dir .. "/port") or ""
    return tonumber(s:match("PORT (%d+)"))
  end, 10, "the fault server to listen")
  if not ok then
    stop_pid(pid)
    local err = M.read_file(dir .. "/stderr")
    os.execute("rm -rf " .. q(dir))
    error(file .. " did not start: " .. tostring(err))
  end
  return setmetatable({ dir = dir, port = port, pid = pid }, Fault)
end

--- Starts the fault server with a script (a Lua table, see faultserver.py).
function M.fault(script) return start_server("faultserver.py", script) end

--- Starts a hostile server (see hostile.py): drips, echoed credentials,
-- seeded chaos. The same interface as the fault server's.
function M.hostile(script, port) return start_server("hostile.py", script, port) end

--- Starts a server that never answers (see silent.py): mode "accept"
-- holds every connection without a byte, "backlog" never lets one be made.
function M.silent(mode) return start_server("silent.py", { mode = mode }) end

--- Starts the benches' C sink (bench/sink.c) with its arguments (such as
-- "chunking"); its "PORT n" line goes to dir/port.
-- @treturn number pid
-- @treturn number port
function M.sink(bin, dir, args)
  local pid = tonumber(sh(("%s %s >%s 2>&1 & echo $!"):format(bin, args or "", q(dir .. "/port"))):match("%d+"))
  local port = M.wait_for(function() return tonumber((M.read_file(dir .. "/port") or ""):match("PORT (%d+)")) end,
    5, "the sink")
  return pid, port
end

--- Starts a DNS server (see dnsserver.py) answering the script's names;
-- `dns_servers = "127.0.0.1:" .. d.port` points a pool at it.
function M.dns(script) return start_server("dnsserver.py", script) end

--- Starts a TCP proxy to 127.0.0.1:target_port (see tcpproxy.py): it
-- counts the sockets open at once (events "open"/"close" with `open`) and
-- delays each chunk by `delay` seconds each way when given.
function M.proxy(target_port, delay)
  return start_server("tcpproxy.py", nil, nil, (" --target 127.0.0.1:%d --delay %g"):format(target_port, delay or 0))
end

--- Starts a SOCKS5 and HTTP CONNECT proxy (see tunnelproxy.py); script:
-- `{user = "u", password = "p"}` to require credentials.
function M.tunnel(script) return start_server("tunnelproxy.py", script) end

--- The server's event log as a list of tables.
function Fault:events()
  local out = {}
  for line in (M.read_file(self.dir .. "/events.jsonl") or ""):gmatch("[^\n]+") do
    out[#out + 1] = json.decode(line)
  end
  return out
end

--- The most connections a proxy (tcpproxy.py) saw open at once, when, and
-- how many it accepted. It reads a client's last bytes (its QUIT) and its
-- FIN in two turns of its loop, so a close it logs up to a turn after an
-- accept may have come first (a pool closes its socket before it gives its
-- slot to another process): a close counts `early` seconds (0.005) before
-- it was logged. A connection really over a limit lives a session, longer.
function Fault:most_open(early)
  local moves = {}
  for _, e in ipairs(self:events()) do
    if e.ev == "open" then moves[#moves + 1] = { t = e.t, d = 1 } end
    if e.ev == "close" then moves[#moves + 1] = { t = e.t - (early or 0.005), d = -1 } end
  end
  table.sort(moves, function(x, y) if x.t ~= y.t then return x.t < y.t end return x.d < y.d end)
  local most, now, opened, at = 0, 0, 0, nil
  for _, m in ipairs(moves) do
    now = now + m.d
    if m.d > 0 then opened = opened + 1 end
    if now > most then most, at = now, m.t end
  end
  return most, at, opened
end

--- Events of one type (and optional field filter).
function Fault:select(ev, filter)
  local out = {}
  for _, e in ipairs(self:events()) do
    if e.ev == ev then
      local keep = true
      for k, v in pairs(filter or {}) do
        if e[k] ~= v then keep = false end
      end
      if keep then out[#out + 1] = e end
    end
  end
  return out
end

--- The messages the server received with their text: a transaction whose
-- MAIL or every RCPT was refused under PIPELINING ends with a lone dot
-- (logged as a message with no data), and nothing arrived.
function Fault:arrived()
  local out = {}
  for _, m in ipairs(self:select("message")) do
    if #(m.data or "") > 0 then out[#out + 1] = m end
  end
  return out
end

--- How often each recipient reached the server among the arrived
-- messages, and how many recipients arrived in all.
function Fault:per_recipient()
  local per, total = {}, 0
  for _, m in ipairs(self:arrived()) do
    for _, r in ipairs(m.rcpt or m.to or {}) do
      per[r] = (per[r] or 0) + 1
      total = total + 1
    end
  end
  return per, total
end

function Fault:stop()
  if self.stopped then return end
  self.stopped = true
  stop_pid(self.pid)
  os.execute("rm -rf " .. q(self.dir))
end

--- Starts nginx (tests/support/nginx.conf.in, handlers in ngx_app.lua)
-- with n workers; returns {dir, port, url, get, parallel, log, pid, stop,
-- cleanup}.
function M.nginx(workers, opts)
  local ROOT = M.sh("pwd"):gsub("%s+$", "")
  local dir = M.tmpdir()
  local port = M.free_port()
  -- opts.resolver: "127.0.0.1:<port>", a DNS server (peers.dns) for the
  -- names the cosockets connect to
  local resolver = opts and opts.resolver and ("resolver " .. opts.resolver .. " ipv6=off;") or ""
  local conf = M.read_file("tests/support/nginx.conf.in"):gsub("@DIR@", dir):gsub("@PORT@", tostring(port))
    :gsub("@ROOT@", ROOT):gsub("@WORKERS@", tostring(workers)):gsub("@CA@", M.certs().ca)
    :gsub("@RESOLVER@", resolver)
  M.write_file(dir .. "/nginx.conf", conf)
  assert(os.execute(("env -u LD_PRELOAD nginx -p %s -c %s -e %s"):format(dir, dir .. "/nginx.conf",
    dir .. "/error.log")), "nginx did not start")
  M.wait_for(function() return M.read_file(dir .. "/nginx.pid") end, 10, "nginx")
  local n = {}
  n.dir, n.port = dir, port
  function n.url(path) return ("http://127.0.0.1:%d/%s"):format(port, path) end
  function n.get(path, max)
    return M.sh(("env -u LD_PRELOAD curl -s --max-time %d %s"):format(max or 30, M.quote(n.url(path))))
  end
  -- Many requests at once (curl --parallel); returns the bodies' lines.
  function n.parallel(paths, max)
    local cfg = dir .. "/urls.txt"
    local lines = {}
    for _, p in ipairs(paths) do lines[#lines + 1] = ('url = "%s"\noutput = "/dev/stdout"'):format(n.url(p)) end
    M.write_file(cfg, table.concat(lines, "\n") .. "\n")
    local out = M.sh(("env -u LD_PRELOAD curl -s --parallel --parallel-immediate --parallel-max %d "
      .. "--max-time %d -K %s 2>/dev/null"):format(#paths, max or 60, M.quote(cfg)))
    local res = {}
    for l in out:gmatch("[^\n]+") do res[#res + 1] = l end
    return res
  end
  function n.log() return M.read_file(dir .. "/error.log") or "" end
  function n.pid() return (M.read_file(dir .. "/nginx.pid") or ""):match("%d+") end
  function n.stop(signal)
    local pid = n.pid()
    if pid then os.execute("kill -" .. (signal or "TERM") .. " " .. pid) end
    M.wait_for(function() return not M.read_file(dir .. "/nginx.pid") end, 30, "nginx to stop")
  end
  function n.cleanup()
    if n.pid() then n.stop() end
    os.execute("rm -rf " .. M.quote(dir))
  end
  return n
end


--- Sets package paths so specs load the tree's module.
function M.use_tree()
  local root = HERE:gsub("/tests/support$", "")
  package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. package.path
  package.cpath = root .. "/build/lua5.4/?.so;" .. package.cpath
end

return M
