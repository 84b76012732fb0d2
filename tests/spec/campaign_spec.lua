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

local function journal_states(path)
  local st = {}
  for line in io.lines(path) do
    local s, key = line:match("^([PLSFTAD])\t([^\t]+)")
    if s then st[key] = s end
  end
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
    assert.truthy(peers.read_file(dir .. "/report.json"):find('"sent": 5000', 1, true))
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

-- The campaign's address index: a file the process never holds in memory.
describe("the address index (core.keyset)", function()
  local core = require("smtppool.core")

  it("keeps one state per key across growth, counts by state, and leaves no file behind", function()
    local dir = peers.tmpdir()
    finally(function() os.execute("rm -rf " .. peers.quote(dir)) end)
    local ks = assert(core.keyset(dir))
    assert.equal("", peers.sh("ls -A " .. peers.quote(dir))) -- unlinked at once
    for i = 1, 20000 do ks:set("user" .. i .. "@example.net", "P") end -- grows 4096 -> 32768 slots
    for i = 1, 20000, 2 do ks:set("user" .. i .. "@example.net", "s") end
    assert.equal(20000, ks:count())
    assert.equal(10000, ks:count("P"))
    assert.equal(10000, ks:count("s"))
    for i = 1, 20000 do
      local want = i % 2 == 1 and "s" or "P"
      if ks:get("user" .. i .. "@example.net") ~= want then error("wrong state for key " .. i) end
    end
    assert.is_nil(ks:get("nobody@example.net"))
    assert.has_error(function() ks:set("x", "") end)
    assert.has_error(function() ks:set("x", "\0") end)
    ks:close()
    ks:close()
    assert.has_error(function() ks:get("x") end)
    assert.equal("", peers.sh("ls -A " .. peers.quote(dir)))
  end)

  it("says why when its folder cannot hold it", function()
    local ks, err = core.keyset("/nonexistent/folder")
    assert.is_nil(ks)
    assert.matches("cannot make the address index in /nonexistent/folder", err)
  end)
end)
