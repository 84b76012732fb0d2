-- Campaigns a sender can trust (issue "Campaigns a sender can trust"):
-- outages pause instead of burning the list, edits between runs never
-- re-send, signals stop gracefully, and the exit codes say what happened.
-- Against the hostile server, whose log says what it received.
local peers = require("peers")
local smtppool = require("smtppool")

local ROOT = peers.sh("pwd"):gsub("%s+$", "")
-- children inherit LD_PRELOAD: under make sanitize they load the instrumented module too
local CLI = "lua5.4 " .. ROOT .. "/bin/smtppool"

local function write_list(path, rows)
  local f = assert(io.open(path, "wb"))
  f:write("email,name\n")
  for _, r in ipairs(rows) do f:write(r, "\n") end
  f:close()
end

local function rows(from, to)
  local out = {}
  for i = from, to do out[#out + 1] = ("u%d@y.test,User %d"):format(i, i) end
  return out
end

-- Messages the server accepted, per recipient.
local function received(srv)
  local per, n = {}, 0
  for _, e in ipairs(srv:events()) do
    if e.ev == "message" and e.status == "accepted" then
      local a = e.rcpt[1]:match("<([^>]+)>")
      per[a] = (per[a] or 0) + 1
      n = n + 1
    end
  end
  return per, n
end

local function run_cli(args)
  local out = peers.sh(CLI .. " " .. args .. " 2>&1; echo \"exit=$?\"")
  return out, tonumber(out:match("exit=(%d+)%s*$"))
end

describe("campaign outages", function()
  local dir
  before_each(function() dir = peers.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. peers.quote(dir)) end)

  it("stops when the relay is down, keeps every recipient pending, and --retry-failed finishes the list", function()
    local port = peers.free_port()
    write_list(dir .. "/list.csv", rows(1, 200))
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test', "
      .. "max_conns = 2, retry = nil }"):format(port))
    local args = ("send --config %s/pool.lua --to %s/list.csv --subject 'Hi {{name}}' --text %s/list.csv "
      .. "--journal %s/j --quiet --outage-threshold 5"):format(dir, dir, dir, dir)
    local out, code = run_cli(args)
    assert.equal(3, code, out)
    assert.matches("stopped: the relay is failing", out)
    assert.matches("pending", out)
    assert.is_nil(out:find("traceback", 1, true))
    -- nothing was written off: every recipient the run met is still pending (P)
    assert.equal("P", peers.sh(("sqlite3 %s 'SELECT DISTINCT state FROM latest'"):format(
      peers.quote(dir .. "/j"))):gsub("%s+$", ""))
    -- the relay comes back on the same port
    local srv = peers.hostile({ quiet = true }, port)
    finally(function() srv:stop() end)
    out, code = run_cli(args .. " --resume --retry-failed")
    local per, n = received(srv)
    srv:stop()
    assert.equal(0, code, out)
    assert.equal(200, n)
    for i = 1, 200 do assert.equal(1, per[("u%d@y.test"):format(i)], "u" .. i) end
  end)

  it("resume without --retry-failed leaves transient failures out and exits 1", function()
    local port = peers.free_port()
    write_list(dir .. "/list.csv", rows(1, 3))
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = port, tls = "none",
      retry = smtppool.retry.none() })
    local r = assert(smtppool.campaign{ pool = pool, recipients = dir .. "/list.csv", journal = dir .. "/j",
      progress = false, message = { from = "n@x.test", subject = "s", text = "t" } }:run())
    pool:close()
    assert.equal(3, r.retryable)
    local srv = peers.hostile({ quiet = true }, port)
    finally(function() srv:stop() end)
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test' }")
      :format(port))
    local out, code = run_cli(("send --config %s/pool.lua --to %s/list.csv --subject s --text %s/list.csv "
      .. "--journal %s/j --quiet --resume"):format(dir, dir, dir, dir))
    local _, n = received(srv)
    srv:stop()
    assert.equal(1, code, out)
    assert.equal(0, n)
  end)

  it("waits out an outage with on_outage = wait and sends the list when the relay is back", function()
    local port = peers.free_port()
    write_list(dir .. "/list.csv", rows(1, 30))
    peers.write_file(dir .. "/child.lua", ([[
      package.path = "%s/lua/?.lua;%s/lua/?/init.lua;" .. package.path
      package.cpath = "%s/build/lua5.4/?.so;" .. package.cpath
      local smtppool = require("smtppool")
      local pool = assert(smtppool.new{ host = "127.0.0.1", port = %d, tls = "none", max_conns = 2,
        retry = smtppool.retry.none() })
      local r = assert(smtppool.campaign{ pool = pool, recipients = "%s/list.csv", journal = "%s/j",
        progress = false, on_outage = "wait", outage_threshold = 3, outage_delay = 0.3, outage_wait = 30,
        message = { from = "n@x.test", subject = "s {{name}}", text = "t" } }:run())
      print("sent=" .. r.sent .. " failed=" .. r.failed .. " stopped=" .. tostring(r.stopped))
    ]]):format(ROOT, ROOT, ROOT, port, dir, dir))
    local pid = tonumber(peers.sh(("lua5.4 %s/child.lua >%s/out 2>&1 & echo $!"):format(dir, dir))
      :match("%d+"))
    peers.sleep(1)
    local srv = peers.hostile({ quiet = true }, port)
    finally(function() srv:stop() end)
    peers.wait_for(function() return (peers.read_file(dir .. "/out") or ""):find("sent=") end, 30, "the campaign")
    local out = peers.read_file(dir .. "/out")
    local per, n = received(srv)
    srv:stop()
    os.execute("kill " .. pid .. " 2>/dev/null")
    assert.matches("sent=30 failed=0 stopped=nil", out)
    assert.equal(30, n)
    for i = 1, 30 do assert.equal(1, per[("u%d@y.test"):format(i)]) end
  end)
end)

describe("campaign journals keyed by address", function()
  local dir, srv
  before_each(function()
    dir = peers.tmpdir()
    srv = peers.hostile({ quiet = true })
  end)
  after_each(function()
    srv:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)

  local function run(list_rows, extra)
    write_list(dir .. "/list.csv", list_rows)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = srv.port, tls = "none", max_conns = 2 })
    local o = { pool = pool, recipients = dir .. "/list.csv", journal = dir .. "/j", progress = false,
                message = { from = "n@x.test", subject = "s {{name}}", text = "t" } }
    for k, v in pairs(extra or {}) do o[k] = v end
    local r, e = smtppool.campaign(o):run()
    pool:close()
    return r, e
  end

  it("never re-sends after rows are added, removed or reordered between runs", function()
    assert(run(rows(1, 20)))
    local edited = rows(21, 22)               -- two new rows at the top
    for i = 20, 2, -1 do edited[#edited + 1] = ("u%d@y.test,User %d"):format(i, i) end -- reversed, u1 removed
    local r = assert(run(edited))
    assert.equal(2, r.sent)
    assert.equal(19, r.skipped)
    local per, n = received(srv)
    assert.equal(22, n)
    for a, k in pairs(per) do assert.equal(1, k, a) end
  end)

  it("sends an address listed twice once, whatever its case, and reports it", function()
    local list = rows(1, 3)
    list[#list + 1] = "U2@Y.TEST,Again"
    local r = assert(run(list))
    assert.equal(3, r.sent)
    assert.equal(1, r.duplicates)
    local _, n = received(srv)
    assert.equal(3, n)
    assert.matches("1 duplicate rows sent once", smtppool.campaign.summary(r))
  end)

  it("sends an address listed again while its first row is still on its way once", function()
    -- a new recipient has no journal row before its L: the rows right behind it, in the same
    -- group or while it is on the wire, are told duplicates by the run's own memory
    local list = {}
    for i = 1, 40 do
      list[#list + 1] = ("u%d@y.test,User %d"):format(i, i)
      for _ = 1, i % 3 do list[#list + 1] = ("U%d@Y.test,Again %d"):format(i, i) end
    end
    local r = assert(run(list))
    assert.equal(40, r.sent)
    assert.equal(40, r.duplicates)
    local per, n = received(srv)
    assert.equal(40, n)
    for a, k in pairs(per) do assert.equal(1, k, a) end
    local st = assert(require("smtppool.core").journal_status(dir .. "/j"))
    assert.same({ S = 40 }, st.counts)
  end)

  it("keys an address trimmed and lower-cased, and gives none to one with a control character", function()
    local key = smtppool.campaign.key
    assert.equal("ann@x.test", key("  Ann@X.Test "))
    assert.equal("\195\137ve@x.test", key("\195\137VE@x.test")) -- ASCII letters only: UTF-8 kept as it is
    assert.equal(smtppool.campaign.normalize(" Bo@Y.test"), key(" Bo@Y.test"))
    for _, a in ipairs({ "a@x.test\r", "\ta@x.test", "a\0@x.test", "a@x.test\127" }) do
      local k, why = key(a)
      assert.is_nil(k)
      assert.matches("invalid address: it holds a control character %(byte %d+ at %d+%)", why)
    end
    assert.equal("invalid address: it holds a control character (byte 13 at 9)", select(2, key("a@x.test\r")))
    assert.same({ nil, "invalid address: empty" }, { key("   ") })
    assert.same({ nil, "invalid recipient (no email field)" }, { key(nil) })
  end)

  it("fails a row whose address holds CR, LF, NUL or another control character, and that row only", function()
    local failures = {}
    local list = {
      '"x@y.test\r",Carriage',               -- trimmed, this was once the key of the valid row below
      'x@y.test,Valid',
      '"a@b.test\nF\tvictim@c.test\t",Forger', -- once wrote a forged F line for victim into the journal
      'victim@c.test,Victim',
      '"nul\0@x.test",Nul',
      '"tab\t@x.test",Tab',
    }
    local r = assert(run(list, { on_failure = function(key, state, e) failures[#failures + 1] = { key, state, e } end }))
    assert.equal(2, r.sent)
    assert.equal(4, r.failed)
    assert.equal(0, r.duplicates)
    local per, n = received(srv)
    assert.equal(2, n)
    assert.equal(1, per["x@y.test"])
    assert.equal(1, per["victim@c.test"])
    assert.equal(4, #failures)
    for _, f in ipairs(failures) do
      assert.equal("F", f[2])
      assert.equal("invalid", f[3].kind)
      assert.matches("control character", f[3].text)
      assert.is_nil(f[1]:find("[%z\1-\31\127]"), "a key with a control character: " .. f[1])
    end
    -- a resume reads back what the first run did: nothing is sent again, no row hides another
    local r2 = assert(run(list))
    assert.equal(0, r2.sent)
    assert.equal(2, r2.skipped)
    local _, n2 = received(srv)
    assert.equal(2, n2)
  end)

  it("refuses a journal of another campaign", function()
    assert(run(rows(1, 2), { name = "spring" }))
    local r, e = run(rows(1, 2), { name = "autumn" })
    assert.is_nil(r)
    assert.equal("config", e.kind)
    assert.matches("belongs to campaign 'spring'", e.text)
  end)

  it("writes L before each final dot: a message cut after it is ambiguous on resume, one before it is sent", function()
    -- the server drops the connection right after the 5th message's final dot: its L is in the journal
    srv:stop()
    srv = peers.hostile({ quiet = true, p_drop_dot = 1, seed = 1 })
    local r = assert(run(rows(1, 1), { retry = smtppool.retry.none() }))
    assert.equal(1, r.ambiguous)
    -- the journal is an SQLite database the sqlite3 shell reads
    assert.equal("A|ambiguous", peers.sh(("sqlite3 %s \"SELECT state, substr(info, 1, 9) FROM latest "
      .. "WHERE address = 'u1@y.test'\""):format(peers.quote(dir .. "/j"))):gsub("%s+$", ""))
    -- a text journal (version 2) is imported: one that ends at P (the process
    -- died before the dot) sends it; one that ends at L does not
    os.remove(dir .. "/j")
    peers.write_file(dir .. "/j", "# smtppool journal 2 campaign=campaign\nP\tu1@y.test\t\nP\tu2@y.test\t\n"
      .. "L\tu2@y.test\t\n")
    srv:stop()
    srv = peers.hostile({ quiet = true })
    r = assert(run(rows(1, 2)))
    assert.equal(1, r.sent)
    assert.equal(1, r.ambiguous)
    local per = received(srv)
    assert.equal(1, per["u1@y.test"])
    assert.is_nil(per["u2@y.test"])
  end)
end)

describe("campaign signals", function()
  it("stops on SIGINT with a summary and exit 3, no stack trace; resume sends every recipient exactly once", function()
    local dir = peers.tmpdir()
    local srv = peers.hostile({ quiet = true, drip = { phase = "DATA_END", interval = 0.002 } })
    finally(function() srv:stop() end)
    write_list(dir .. "/list.csv", rows(1, 300))
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test', "
      .. "max_conns = 2 }"):format(srv.port))
    local args = ("send --config %s/pool.lua --to %s/list.csv --subject 'Hi {{name}}' --text %s/list.csv "
      .. "--journal %s/j --quiet"):format(dir, dir, dir, dir)
    local pid = tonumber(peers.sh(("(%s %s >%s/out 2>&1; echo \"exit=$?\" >>%s/out) >/dev/null 2>&1 & echo $!")
      :format(CLI, args, dir, dir)):match("%d+"))
    peers.wait_for(function() return select(2, received(srv)) >= 20 end, 30, "the campaign to get going")
    -- the CLI runs under a shell wrapper: signal the lua process itself
    local lpid = peers.sh("env -u LD_PRELOAD pgrep -f '^lua5.4 .*bin/smtppool send --config " .. dir .. "'"):match("%d+")
    os.execute("kill -INT " .. lpid)
    peers.wait_for(function() return (peers.read_file(dir .. "/out") or ""):find("exit=") end, 20, "the CLI to stop")
    local out = peers.read_file(dir .. "/out")
    assert.matches("exit=3", out)
    assert.matches("stopped on a signal", out)
    -- the summary says how much of the list it read, not "N recipients"
    assert.matches("%d+ of 300 recipients:", out)
    assert.matches("pending", out)
    assert.is_nil(out:find("traceback", 1, true))
    assert.is_nil(out:find("interrupted!", 1, true))
    local _, first = received(srv)
    assert.is_true(first < 300, "finished before the signal")
    local out2, code = run_cli(args .. " --resume")
    local per, n = received(srv)
    srv:stop()
    os.execute("rm -rf " .. peers.quote(dir))
    assert.equal(0, code, out2)
    assert.equal(300, n)
    for i = 1, 300 do assert.equal(1, per[("u%d@y.test"):format(i)], "u" .. i) end
    assert.truthy(pid)
  end)
end)

describe("campaign exit codes", function()
  it("exits 2 for a journal path that cannot be written", function()
    local dir = peers.tmpdir()
    write_list(dir .. "/list.csv", rows(1, 1))
    peers.write_file(dir .. "/pool.lua", "return { host = '127.0.0.1', port = 9, tls = 'none', from = 'n@x.test' }")
    local out, code = run_cli(("send --config %s/pool.lua --to %s/list.csv --subject s --text %s/list.csv "
      .. "--journal /nonexistent/dir/j --quiet"):format(dir, dir, dir))
    os.execute("rm -rf " .. peers.quote(dir))
    assert.equal(2, code, out)
    assert.matches("journal", out)
  end)
end)

describe("the progress bar", function()
  it("fills with the share of the list done", function()
    assert.equal("[#####...............]  25% ", smtppool.campaign.bar(25, 100))
    assert.equal("[####################] 100% ", smtppool.campaign.bar(7, 7))
    assert.equal("", smtppool.campaign.bar(3, nil))
  end)

  it("counts a resumed run's list from what earlier runs did, and ends 'stopped' when stopped", function()
    local line = smtppool.campaign.progress_line
    -- a resume of a 2,000-row list with 499 done before: a quarter, not 1/2000
    local l = line{ sent = 1, failed = 0, ambiguous = 0, deferred = 0, skipped = 499, expected = 2000, rate = 10,
                    elapsed = 1, eta = 150 }
    assert.matches("^%[#####%.+%]  25%% 500/2000 done %(499 before this run%) | 1 sent, 0 failed", l)
    assert.matches("ETA 150s", l)
    l = line{ sent = 700, failed = 1, ambiguous = 0, skipped = 0, expected = 2000, final = true, stopped = "interrupted" }
    assert.matches("701/2000 done | 700 sent, 1 failed", l)
    assert.matches("| stopped", l, 1, true)
    assert.is_nil(l:find("done |", l:find("sent"), true))
    assert.matches("| done", line{ sent = 2, failed = 0, ambiguous = 0, expected = 2, final = true }, 1, true)
    -- a list of unknown length: no bar, no share
    assert.matches("^3 sent, 0 failed", line{ sent = 3, failed = 0, ambiguous = 0 })
  end)
end)
