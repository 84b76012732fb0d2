-- Campaigns against exim: every recipient once, across a kill -9.
local peers = require("peers")
local smtppool = require("smtppool")
local campaign = smtppool.campaign

local function write_list(path, n, extra)
  local f = assert(io.open(path, "wb"))
  f:write("email,name\n")
  for i = 1, n do f:write(("u%d@y.test,User %d\n"):format(i, i)) end
  f:write(extra or "")
  f:close()
end

-- Deliveries per recipient from exim's log.
local function delivered(exim)
  local per = {}
  for _, l in ipairs(exim:log_lines(" => ")) do
    local a = l:match("<([^>]+)>")
    if a then per[a] = (per[a] or 0) + 1 end
  end
  return per
end

-- address -> state letter, read with the sqlite3 shell as a user would
-- (the view latest: the merged table and the log not merged yet)
local function journal_states(path)
  local st = {}
  local out = peers.sh(("sqlite3 -separator ' ' %s 'SELECT state, address FROM latest'"):format(peers.quote(path)))
  for s, key in out:gmatch("([PLSFTAD]) ([^\n]+)") do st[key] = s end
  return st
end

describe("campaigns against exim with a per-session cap of 5", function()
  local exim, dir
  before_each(function()
    exim = peers.exim({ max_per_conn = 5 })
    dir = peers.tmpdir()
  end)
  after_each(function()
    exim:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)

  it("delivers a 5,000-recipient list exactly once each", function()
    write_list(dir .. "/list.csv", 5000)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none", max_conns = 8 })
    local report = assert(campaign{ pool = pool, recipients = dir .. "/list.csv", journal = dir .. "/j",
      progress = false, report_json = dir .. "/report.json",
      message = { from = "news@x.test", subject = "Hi {{name}}", text = "Dear {{name}}" } }:run())
    pool:close()
    assert.equal(5000, report.sent)
    assert.equal(0, report.failed)
    exim:wait_deliveries(5000, 120)
    assert.equal(5000, exim:deliveries())
    local per = delivered(exim)
    for i = 1, 5000 do assert.equal(1, per[("u%d@y.test"):format(i)]) end
    local written = require("dkjson").decode(peers.read_file(dir .. "/report.json"))
    assert.equal(5000, written.sent)
    assert.equal(0, written.failed)
    assert.is_nil(report.report_error)
  end)

  it("says in the report when its JSON file cannot be written, and sends all the same", function()
    write_list(dir .. "/small.csv", 3)
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none" })
    local report = assert(campaign{ pool = pool, recipients = dir .. "/small.csv", progress = false,
      report_json = dir .. "/no/such/dir/report.json",
      message = { from = "news@x.test", subject = "Hi {{name}}", text = "Dear {{name}}" } }:run())
    pool:close()
    assert.equal(3, report.sent)
    assert.matches("cannot write the report .*/no/such/dir/report%.json: .*No such file", report.report_error)
  end)

  it("survives kill -9: resumed, every recipient arrives once except ones marked ambiguous", function()
    write_list(dir .. "/list.csv", 600)
    local cmd = ("lua5.4 tests/support/campaign_child.lua %d %s %s"):format(exim.port,
      peers.quote(dir .. "/list.csv"), peers.quote(dir .. "/j"))
    local pid = tonumber(peers.sh(cmd .. " >/dev/null 2>&1 & echo $!"):match("%d+"))
    -- kill it somewhere in the middle: after 50 to 350 deliveries
    local target = math.random(50, 350)
    peers.wait_for(function() return exim:deliveries() >= target end, 60, "the campaign to get going")
    os.execute("kill -9 " .. pid)
    peers.sleep(0.3)
    local first = exim:deliveries()
    assert.is_true(first < 600, "the campaign finished before the kill")
    local out = peers.sh(cmd .. " 2>&1")
    assert.matches("600 recipients", out)
    exim:wait_deliveries(560, 60)
    peers.sleep(1)
    local per = delivered(exim)
    local st = journal_states(dir .. "/j")
    local ambiguous = 0
    for i = 1, 600 do
      local a = ("u%d@y.test"):format(i)
      if st[a] == "A" then
        ambiguous = ambiguous + 1
        assert.is_true((per[a] or 0) <= 1, a .. " delivered " .. tostring(per[a]) .. " times")
      else
        assert.equal("S", st[a], a)
        assert.equal(1, per[a], a .. " delivered " .. tostring(per[a]) .. " times")
      end
    end
    -- only a message whose final dot was leaving can be ambiguous: one per connection at most
    assert.is_true(ambiguous <= 4, ambiguous .. " ambiguous with 4 connections")
  end)

  it("records a 550 as failed without retrying and retries a 451 on schedule through the hook", function()
    write_list(dir .. "/list.csv", 3, "reject-me@y.test,R\ntempfail-once@y.test,T\n")
    local calls = {}
    local last
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none" })
    local report = assert(campaign{ pool = pool, recipients = dir .. "/list.csv", journal = dir .. "/j",
      progress = function(st) last = st end, message = { from = "news@x.test", subject = "Hi {{name}}", text = "x" },
      retry = function(err, attempt, msg)
        calls[#calls + 1] = { kind = err.kind, code = err.code, attempt = attempt, to = msg.to }
        if err.kind == "transient" and attempt < 3 then return 0.05 end
        return false
      end } :run())
    pool:close()
    assert.equal(3, report.sent)
    assert.equal(2, report.failed)
    local st = journal_states(dir .. "/j")
    assert.equal("F", st["reject-me@y.test"])
    assert.equal("T", st["tempfail-once@y.test"]) -- transient: --retry-failed may send it again
    local by = {}
    for _, c in ipairs(calls) do by[c.code] = (by[c.code] or 0) + 1 end
    assert.equal(1, by[550])       -- asked once, said no
    assert.equal(3, by[451])       -- attempts 1, 2 retried on schedule; 3 gives up
    assert.equal(2, report.retried)
    assert.equal(5, last.expected) -- the progress hook knows the list's length (for its ETA)
    assert.equal(3, last.sent)
  end)

  it("stops on bad CSV with a line and column before anything is sent", function()
    local pool = assert(smtppool.new{ host = "127.0.0.1", port = exim.port, tls = "none" })
    peers.write_file(dir .. "/bad.csv", 'email,name\na@y.test,"Ann\nb@y.test,Bob\n')
    local r, err = campaign{ pool = pool, recipients = dir .. "/bad.csv", progress = false,
      message = { from = "n@x.test", subject = "Hi {{name}}", text = "x" } }:run()
    assert.is_nil(r)
    assert.equal("invalid", err.kind)
    assert.matches("line 2, column 10: unterminated quoted field", err.text)
    write_list(dir .. "/list.csv", 3)
    r, err = campaign{ pool = pool, recipients = dir .. "/list.csv", progress = false,
      message = { from = "n@x.test", subject = "Hi {{city}}", text = "x" } }:run()
    pool:close()
    assert.is_nil(r)
    assert.matches("missing variable 'city' at line 1", err.text)
    assert.equal(0, pool:stats().opened)
    assert.equal(0, #exim:log_lines("<= "))
  end)
end)

-- The journal itself (src/store/sp_journal.c): one run at a time, a schema
-- version, refusals that say what the file is.
describe("the campaign journal (SQLite)", function()
  local core = require("smtppool.core")
  local dir
  before_each(function() dir = peers.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. peers.quote(dir)) end)

  it("has its letters from one definition, which the journal, the runner and Redis scripts share", function()
    local n, seen = 0, {}
    for meaning, l in pairs(core.letters) do
      assert.equal(1, #l, meaning)
      assert.is_nil(seen[l], "two meanings for " .. l)
      seen[l] = meaning
      assert.truthy(require("smtppool.campaign").LETTERS[l], "the runner names " .. l)
      n = n + 1
    end
    assert.equal(7, n)
    local j = assert(core.journal_open(dir .. "/j", "spring"))
    for _, l in pairs(core.letters) do assert(j:record(l, "k" .. l .. "@x.test", "")) end
    assert.has_error(function() j:record("X", "x@x.test", "") end)
    assert(j:close())
    -- every Redis script that spells a letter has them defined in it
    local body = require("smtppool.redis.queue").script("return LEAVING")
    assert.equal(core.letters.leaving, assert(load(body))())
  end)

  it("keeps one state per address, knows what this run met, counts by state", function()
    local j = assert(core.journal_open(dir .. "/j", "spring"))
    for i = 1, 2000 do assert(j:record("P", "user" .. i .. "@example.net", "")) end
    for i = 1, 2000, 2 do assert(j:record("S", "user" .. i .. "@example.net", "250 ok")) end
    assert(j:commit(true))
    local c = j:counts()
    assert.equal(1000, c.P)
    assert.equal(1000, c.S)
    assert.same({ "S", true }, { j:get("user1@example.net") })
    assert.is_nil(j:get("nobody@example.net"))
    assert.has_error(function() j:record("x", "a@b", "") end)
    assert(j:close())
    assert.has_error(function() j:get("x") end)
    -- a later run reads the letters as an earlier run's until it meets them
    j = assert(core.journal_open(dir .. "/j", "spring"))
    -- every key recorded is found again (the lookup's filter is loaded from
    -- the table), and keys never recorded are not
    for i = 1, 2000 do
      assert.equal(i % 2 == 1 and "S" or "P", (j:get("user" .. i .. "@example.net")), i)
      assert.is_nil(j:get("other" .. i .. "@example.net"))
    end
    assert.same({ "P", false }, { j:get("user2@example.net") })
    assert(j:meet("user2@example.net"))
    assert.same({ "P", true }, { j:get("user2@example.net") })
    assert(j:close())
  end)

  it("admits one run at a time and names the one that holds it", function()
    local j = assert(core.journal_open(dir .. "/j", "spring"))
    local again, e, st = core.journal_open(dir .. "/j", "spring")
    assert.is_nil(again)
    assert.equal("busy", st)
    assert.matches("in use by another run %(pid " .. peers.sh("echo $PPID"):match("%d+") .. " on ", e)
    -- another process is refused too
    local out = peers.sh(("lua5.4 -e 'package.cpath=\"build/lua5.4/?.so;\"..package.cpath local c=require(\"smtppool.core\") "
      .. "print(select(3, c.journal_open(%q, \"spring\")))'"):format(dir .. "/j"))
    assert.matches("busy", out)
    local status = assert(core.journal_status(dir .. "/j"))
    assert.is_true(status.running)
    assert.equal("spring", status.campaign)
    assert(j:close())
    assert.is_false(assert(core.journal_status(dir .. "/j")).running)
    assert(assert(core.journal_open(dir .. "/j", "spring")):close())
  end)

  local function sql(path, q) return (peers.sh(("sqlite3 %s %s"):format(peers.quote(path), peers.quote(q))):gsub("%s+$", "")) end

  it("logs records and merges them in batches; a run killed before a merge loses none, and status reads them", function()
    -- a child records 3,000 keys (the log is merged at 2,048 records),
    -- commits, says so, and waits to be killed
    peers.write_file(dir .. "/child.lua", ([[
      package.cpath = "build/lua5.4/?.so;" .. package.cpath
      local j = assert(require("smtppool.core").journal_open(%q, "spring"))
      for i = 1, 3000 do
        assert(j:record(i %% 3 == 0 and "L" or "S", "k" .. i .. "@x.test", "250 ok " .. i))
        if i %% 100 == 0 then assert(j:commit()) end
      end
      -- bytes the log's JSON must carry as they are
      assert(j:record("F", '"odd\\ key"@x.test', 'he said "no" \\ \1\31 caf\195\169 \255'))
      assert(j:commit())
      print("recorded")
      io.stdout:flush()
      io.open(%q):read() -- a FIFO nobody writes: waits for the kill without a process of its own
    ]]):format(dir .. "/j", dir .. "/fifo"))
    peers.sh("mkfifo " .. peers.quote(dir .. "/fifo"))
    local out = dir .. "/child.out"
    local pid = tonumber(peers.sh(("lua5.4 %s > %s 2>&1 & echo $!"):format(peers.quote(dir .. "/child.lua"),
      peers.quote(out))):match("%d+"))
    finally(function() os.execute("kill -9 " .. pid .. " 2>/dev/null") end) -- whatever fails below
    peers.wait_for(function() return (peers.read_file(out) or ""):find("recorded") end, 30, "the child's records")
    -- while it lives: 953 records not merged, in a log row a commit, counted all the same
    assert.equal("11|953", sql(dir .. "/j", "SELECT count(DISTINCT seq), count(*) FROM logged"))
    local st = assert(core.journal_status(dir .. "/j"))
    assert.is_true(st.running)
    assert.same({ S = 2000, L = 1000, F = 1 }, st.counts)
    assert.equal("F|1\nL|1000\nS|2000", sql(dir .. "/j", "SELECT state, count(*) FROM latest GROUP BY state"))
    os.execute("kill -9 " .. pid)
    peers.wait_for(function() return not assert(core.journal_status(dir .. "/j")).running end, 10, "the lock to go")
    -- the next run merges what the log holds before anything else
    local j = assert(core.journal_open(dir .. "/j", "spring"))
    assert.equal("0", sql(dir .. "/j", "SELECT count(*) FROM log"))
    for i = 1, 3000 do
      assert.same({ i % 3 == 0 and "L" or "S", false }, { j:get("k" .. i .. "@x.test") }, i)
    end
    assert.equal("250 ok 2999", sql(dir .. "/j", "SELECT info FROM recipients WHERE address = 'k2999@x.test'"))
    assert.same({ "F", false }, { j:get('"odd\\ key"@x.test') })
    assert.equal('he said "no" \\ \1\31 caf\195\169 \255',
      sql(dir .. "/j", [[SELECT info FROM recipients WHERE address = '"odd\ key"@x.test']]))
    -- this run's records, merged at its close: the log is left empty
    for i = 1, 100 do assert(j:record("F", "k" .. i .. "@x.test", "550 no")) end
    assert.same({ "F", true }, { j:get("k1@x.test") })
    -- the run's own count merges first, then counts the table: earlier
    -- runs' rows and this run's records alike, as the view counts them
    assert.same({ F = 101, L = 967, S = 1933 }, j:counts())
    assert.same({ "F", true }, { j:get("k2@x.test") }) -- merged as this run's
    assert(j:record("S", "k1@x.test", "250 at last"))
    assert(j:close())
    assert.equal("0", sql(dir .. "/j", "SELECT count(*) FROM log"))
    assert.equal("F|100\nL|967\nS|1934", sql(dir .. "/j", "SELECT state, count(*) FROM recipients GROUP BY state"))
    assert.same({ F = 100, L = 967, S = 1934 }, assert(core.journal_status(dir .. "/j")).counts)
  end)

  it("reads a version 3 journal as it is, and upgrades it when a run opens it", function()
    sql(dir .. "/j", "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
      .. " CREATE TABLE recipients(address TEXT PRIMARY KEY, state TEXT NOT NULL, info TEXT NOT NULL DEFAULT '',"
      .. " run INTEGER NOT NULL, updated REAL NOT NULL) WITHOUT ROWID;"
      .. " CREATE TABLE runs(id INTEGER PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, started REAL NOT NULL,"
      .. " ended REAL); INSERT INTO meta VALUES('campaign', 'spring');"
      .. " INSERT INTO runs VALUES(1, 1, 'h', 1e9, 1e9 + 60);"
      .. " INSERT INTO recipients VALUES('a@x.test', 'S', '250 ok', 1, 1e9), ('b@x.test', 'T', '451 later', 1, 1e9);"
      .. " PRAGMA journal_mode=WAL; PRAGMA user_version=3;")
    local st = assert(core.journal_status(dir .. "/j"))
    assert.same({ S = 1, T = 1 }, st.counts)
    assert.equal("b@x.test", st.failures[1].address)
    assert.equal("3", sql(dir .. "/j", "PRAGMA user_version"))
    local j = assert(core.journal_open(dir .. "/j", "spring"))
    assert.equal("4", sql(dir .. "/j", "PRAGMA user_version"))
    assert.same({ "S", false }, { j:get("a@x.test") })
    assert(j:record("S", "b@x.test", "250 ok"))
    assert(j:close())
    assert.same({ S = 2 }, assert(core.journal_status(dir .. "/j")).counts)
  end)

  it("refuses another campaign's journal, another schema version, and a file that is no journal", function()
    assert(assert(core.journal_open(dir .. "/j", "spring")):close())
    local j, e, st = core.journal_open(dir .. "/j", "autumn")
    assert.is_nil(j)
    assert.equal("campaign", st)
    assert.matches("belongs to campaign 'spring', not 'autumn'", e)
    peers.sh(("sqlite3 %s 'PRAGMA user_version=9'"):format(peers.quote(dir .. "/j")))
    j, e, st = core.journal_open(dir .. "/j", "spring")
    assert.equal("version", st)
    assert.matches("schema version 9; this smtppool reads versions 3 and 4", e)
    peers.write_file(dir .. "/bin", "\0\1\2binary junk")
    j, e, st = core.journal_open(dir .. "/bin", "spring")
    assert.equal("not_journal", st)
    assert.matches("is not an smtppool journal", e)
    assert.equal("\0\1\2binary junk", peers.read_file(dir .. "/bin")) -- never appended to
  end)

  it("imports text journals (versions 1 and 2), ignoring a torn last line, and refuses unknown ones", function()
    peers.write_file(dir .. "/v2", "# smtppool journal 2 campaign=campaign\nP\ta@x.test\t\nS\ta@x.test\t250 ok\n"
      .. "P\tb@x.test\t\nL\tb@x.test\t\nP\tc@x")
    assert(campaign.import_text_journal(dir .. "/v2", "campaign"))
    assert.same({ ["a@x.test"] = "S", ["b@x.test"] = "L" }, journal_states(dir .. "/v2"))
    assert.matches("^# smtppool journal 2", peers.read_file(dir .. "/v2.v2.txt"))
    peers.write_file(dir .. "/v1", "P\t1:A@X.test\t\nF\t1:A@X.test\t550 no\n")
    assert(campaign.import_text_journal(dir .. "/v1", "campaign"))
    assert.same({ ["a@x.test"] = "F" }, journal_states(dir .. "/v1"))
    for _, bad in ipairs({ "# smtppool journal 7 campaign=campaign\n", "# smtppool journal of the future\n",
                           "\0\0binary\n" }) do
      peers.write_file(dir .. "/bad", bad)
      local ok, e = campaign.import_text_journal(dir .. "/bad", "campaign")
      assert.is_nil(ok)
      assert.matches("journal .*bad", e)
      assert.equal(bad, peers.read_file(dir .. "/bad"))
    end
    peers.write_file(dir .. "/other", "# smtppool journal 2 campaign=spring\n")
    local ok, e = campaign.import_text_journal(dir .. "/other", "campaign")
    assert.is_nil(ok)
    assert.matches("belongs to campaign 'spring'", e)
  end)
end)
