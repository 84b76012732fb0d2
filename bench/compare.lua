-- `make bench` (peers): smtppool against Postfix's smtp-source, Nodemailer's
-- pool and Python's smtplib, all sending to Postfix's smtp-sink, at 1 and 4
-- connections, uncapped and capped at 5 messages a session, on loopback and
-- through a delay proxy with a 21 ms round trip. Each figure is the median
-- of three interleaved rounds, with its ratio to smtppool's in the same
-- round, the CPU seconds per 10,000 messages and the peak RSS of the client
-- process. Writes an SVG chart (BENCH_CHART, default build/bench/compare.svg).
--
-- Postfix and Nodemailer are fetched into a cache folder (apt-get download
-- and dpkg -x, npm install --prefix: nothing is installed on the system,
-- exim is never replaced); a peer that cannot be had is skipped with a note.
-- Usage: lua5.4 bench/compare.lua [FALLBACK_SINK]
package.path = "lua/?.lua;lua/?/init.lua;tests/support/?.lua;" .. package.path
package.cpath = "build/lua5.4/?.so;" .. package.cpath
local peers = require("peers")
local q = peers.quote

local SIZE = 1024
local LOOP_N = tonumber(os.getenv("BENCH_N")) or 5000
local LINK_N = tonumber(os.getenv("LINK_N")) or 120
local RTT = 0.021
local CACHE = os.getenv("SMTPPOOL_BENCH_CACHE") or ((os.getenv("HOME") or "/tmp") .. "/.cache/smtppool-bench")
local CHART = os.getenv("BENCH_CHART") or "build/bench/compare.svg"
local notes = {}

local function ok(cmd) return os.execute("(" .. cmd .. ") >/dev/null 2>&1") == true end

-- Postfix's smtp-sink and smtp-source, unpacked from the Debian package.
local PF = CACHE .. "/postfix"
local function postfix()
  local bin = PF .. "/usr/sbin/smtp-sink"
  if not ok("test -x " .. q(bin)) then
    os.execute("mkdir -p " .. q(CACHE))
    ok(("cd %s && rm -f postfix_*.deb && apt-get download postfix && dpkg -x postfix_*.deb postfix"):format(q(CACHE)))
  end
  if not ok("test -x " .. q(bin)) then
    notes[#notes + 1] = "Postfix could not be fetched (apt-get download postfix): smtp-source skipped, the C sink used"
    return nil
  end
  return "env LD_LIBRARY_PATH=" .. q(PF .. "/usr/lib/postfix") .. " "
end
local PFENV = postfix()

local NODE = CACHE .. "/node"
local function nodemailer()
  if not ok("test -d " .. q(NODE .. "/node_modules/nodemailer")) then
    ok(("mkdir -p %s && npm install --silent --no-audit --no-fund --prefix %s nodemailer"):format(q(NODE), q(NODE)))
  end
  if not ok("command -v node && test -d " .. q(NODE .. "/node_modules/nodemailer")) then
    notes[#notes + 1] = "Nodemailer could not be installed (npm install nodemailer): skipped"
    return false
  end
  return true
end
local HAVE_NODE = nodemailer()

-- the sink: Postfix's smtp-sink (PIPELINING on), else the C sink
local dir = peers.tmpdir()
local sink_port, sink_pid
if PFENV then
  sink_port = peers.free_port()
  sink_pid = tonumber(peers.sh(("%s%s -4 -u nobody 127.0.0.1:%d 1024 >%s 2>&1 & echo $!"):format(PFENV,
    q(PF .. "/usr/sbin/smtp-sink"), sink_port, q(dir .. "/sink.log"))):match("%d+"))
  peers.wait_for(function()
    return ok(("/usr/bin/python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", %d), 1).close()'")
      :format(sink_port))
  end, 5, "smtp-sink")
else
  local sink = arg[1] or "build/sink"
  sink_pid, sink_port = peers.sink(sink, dir)
end
local proxy = peers.proxy(sink_port, RTT / 2)

-- One client run under /usr/bin/time: seconds (the client's own clock when
-- it prints one), CPU seconds, peak RSS KB.
local LIMIT = tonumber(os.getenv("BENCH_PEER_TIMEOUT")) or 60
local function timed(cmd, who)
  local tf = dir .. "/time"
  os.remove(tf)
  -- a peer that hangs (seen: Nodemailer's pool with maxMessages and thousands queued) is cut
  local out = peers.sh(("timeout %d /usr/bin/time -f '%%e %%U %%S %%M' -o %s %s 2>&1; echo rc=$?"):format(LIMIT,
    q(tf), cmd))
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  local e, u, s, m = (peers.read_file(tf) or ""):match("([%d.]+) ([%d.]+) ([%d.]+) (%d+)")
  local own = tonumber(out:match("^%s*([%d.]+)%s*rc="))
  if rc ~= 0 or not e then
    notes[#notes + 1] = ("%s failed or took over %d s (exit %s): %s"):format(who or cmd, LIMIT, tostring(rc),
      (out:gsub("%s*rc=%d+%s*$", "")):sub(1, 120))
    return nil
  end
  return { secs = own or tonumber(e), cpu = tonumber(u) + tonumber(s), rss = tonumber(m) }
end

local CLIENTS = {
  { name = "smtppool", run = function(port, n, conns, per)
    return timed(("lua5.4 bench/send_tree.lua . %d %d %d %d %d"):format(port, conns, per or 0, n, SIZE), "smtppool")
  end },
  { name = "smtp-source", skip = not PFENV, run = function(port, n, conns, per)
    if per then return nil end -- it sends every message of a session over one connection (-d) or one per session
    return timed(("%s%s -4 -d -s %d -m %d -l %d -f a@x.test -t b@y.test 127.0.0.1:%d"):format(PFENV,
      q(PF .. "/usr/sbin/smtp-source"), conns, n, SIZE, port), "smtp-source")
  end },
  { name = "Nodemailer", skip = not HAVE_NODE, run = function(port, n, conns, per)
    return timed(("env NODE_PATH=%s node bench/peer_nodemailer.js %d %d %d %d %d"):format(q(NODE .. "/node_modules"),
      port, n, SIZE, conns, per or 0), ("Nodemailer (%d conns, maxMessages %s)"):format(conns, per or "none"))
  end },
  { name = "smtplib", run = function(port, n, conns, per)
    if conns > 1 then return nil end -- one connection per process: its usual use
    return timed(("/usr/bin/python3 bench/peer_smtplib.py %d %d %d %d"):format(port, n, SIZE, per or 0), "smtplib")
  end },
}

local SETUPS = {}
for _, link in ipairs({ { "loopback", sink_port, LOOP_N }, { "21 ms RTT", proxy.port, LINK_N } }) do
  for _, c in ipairs({ { 1 }, { 4 }, { 1, 5 }, { 4, 5 } }) do
    SETUPS[#SETUPS + 1] = { link = link[1], port = link[2], n = link[3], conns = c[1], per = c[2],
      label = ("%s, %d conn%s, %s"):format(link[1], c[1], c[1] > 1 and "s" or "", c[2] and "cap 5" or "uncapped") }
  end
end

local results = {} -- label -> client -> list of {secs, cpu, rss, ratio}
for round = 1, 3 do
  io.stderr:write(("round %d of 3\n"):format(round))
  for _, su in ipairs(SETUPS) do
    results[su.label] = results[su.label] or {}
    local mine
    for _, cl in ipairs(CLIENTS) do
      if not cl.skip then
        local r = cl.run(su.port, su.n, su.conns, su.per)
        if r then
          if cl.name == "smtppool" then mine = r end
          r.ratio = mine and (mine.secs / r.secs) or nil -- the client's msg/s over smtppool's, this round
          local l = results[su.label][cl.name] or {}
          results[su.label][cl.name] = l
          l[#l + 1] = r
        end
      end
    end
  end
end
proxy:stop()
os.execute("kill " .. sink_pid)
os.execute("rm -rf " .. q(dir))

local function median(list, key)
  local v = {}
  for _, x in ipairs(list) do v[#v + 1] = x[key] end
  table.sort(v)
  return v[math.ceil(#v / 2)], v[1], v[#v]
end

print(("%d (loopback) and %d (21 ms link) messages of ~%d bytes to %s; median of 3 interleaved rounds"):format(
  LOOP_N, LINK_N, SIZE, PFENV and "Postfix smtp-sink" or "the C sink"))
print(("%-34s %-12s %9s %17s %10s %12s %9s"):format("setup", "client", "msg/s", "spread msg/s", "vs smtppool",
  "CPU s/10k", "RSS KB"))
local chart = {}
for _, su in ipairs(SETUPS) do
  for _, cl in ipairs(CLIENTS) do
    local l = results[su.label][cl.name]
    if l then
      local secs, lo, hi = median(l, "secs")
      local ratio = median(l, "ratio")
      local cpu = median(l, "cpu")
      local rss = median(l, "rss")
      print(("%-34s %-12s %9.0f %8.0f-%-8.0f %10s %12.2f %9d"):format(su.label, cl.name, su.n / secs, su.n / hi,
        su.n / lo, ratio and ("%.2fx"):format(ratio) or "-", cpu / su.n * 10000, rss))
      chart[#chart + 1] = { setup = su.label, client = cl.name, rate = su.n / secs }
    end
  end
end
for _, n in ipairs(notes) do print("note: " .. n) end

-- The chart: one group of bars per setup, one bar per client, log scale.
local colors = { smtppool = "#1f77b4", ["smtp-source"] = "#2ca02c", Nodemailer = "#ff7f0e", smtplib = "#7f7f7f" }
local W, H, left, top, bh = 900, 40 + #SETUPS * 74, 230, 40, 14
local svg = { ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">')
  :format(W, H), '<rect width="100%" height="100%" fill="white"/>',
  ('<text x="%d" y="20" font-size="14">messages per second (log scale), median of 3 rounds</text>'):format(left) }
local maxr = 1
for _, c in ipairs(chart) do maxr = math.max(maxr, c.rate) end
local lmax = math.log(maxr * 1.2, 10)
local function x(rate) return left + (W - left - 20) * math.max(0, math.log(math.max(rate, 1), 10)) / lmax end
for p = 0, math.floor(lmax) do
  svg[#svg + 1] = ('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/><text x="%.1f" y="%d" fill="#666">%d</text>')
    :format(x(10 ^ p), top, x(10 ^ p), H - 10, x(10 ^ p) + 2, H - 2, 10 ^ p)
end
local y = top
for _, su in ipairs(SETUPS) do
  svg[#svg + 1] = ('<text x="4" y="%d">%s</text>'):format(y + 12, su.label)
  local k = 0
  for _, c in ipairs(chart) do
    if c.setup == su.label then
      local yy = y + k * (bh + 2)
      svg[#svg + 1] = ('<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"/><text x="%.1f" y="%d">%s %.0f</text>')
        :format(left, yy, x(c.rate) - left, bh, colors[c.client] or "#000", x(c.rate) + 4, yy + 11, c.client, c.rate)
      k = k + 1
    end
  end
  y = y + 74
end
svg[#svg + 1] = "</svg>"
os.execute("mkdir -p " .. q(CHART:match("^(.*)/[^/]*$") or "."))
peers.write_file(CHART, table.concat(svg, "\n") .. "\n")
print("chart: " .. CHART)
