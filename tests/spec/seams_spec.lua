-- Exactly once at the seams (issue "Exactly once at every seam"): the journal
-- admits one run at a time, a full disk stops a run that resumes without
-- doubling anything, an outage is not its messages' failure, and bad numbers
-- are usage errors. Through the CLI, against the hostile server.
local peers = require("peers")

local ROOT = peers.sh("pwd"):gsub("%s+$", "")
local CLI = "lua5.4 " .. ROOT .. "/bin/smtppool"

local function list(path, from, to)
  local out = { "email,name" }
  for i = from, to do out[#out + 1] = ("u%d@y.test,User %d"):format(i, i) end
  peers.write_file(path, table.concat(out, "\n") .. "\n")
end

local function run_cli(args)
  local out = peers.sh(CLI .. " " .. args .. " 2>&1; echo \"exit=$?\"")
  return out, tonumber(out:match("exit=(%d+)%s*$"))
end

-- accepted messages per recipient
local function received(srv)
  local per, n = {}, 0
  for _, e in ipairs(srv:select("message", { status = "accepted" })) do
    local a = e.rcpt[1]:match("<([^>]+)>")
    per[a] = (per[a] or 0) + 1
    n = n + 1
  end
  return per, n
end

describe("the journal's seams", function()
  local dir
  before_each(function() dir = peers.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. peers.quote(dir)) end)

  local function send_args(port, journal, extra)
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test', "
      .. "max_conns = 2 }"):format(port))
    return ("send --config %s/pool.lua --to %s/list.csv --subject 'Hi {{name}}' --text %s/list.csv --journal %s "
      .. "--quiet %s"):format(dir, dir, dir, journal, extra or "")
  end

  it("refuses a second run on a journal while the first lives, naming it; the list goes once", function()
    local srv = peers.hostile({ quiet = true, drip = { phase = "DATA_END", interval = 0.002 } })
    finally(function() srv:stop() end)
    list(dir .. "/list.csv", 1, 200)
    local args = send_args(srv.port, dir .. "/run.db")
    local pid = tonumber(peers.sh(("%s %s >%s 2>&1 & echo $!"):format(CLI, args, peers.quote(dir .. "/first")))
      :match("%d+"))
    peers.wait_for(function() return #srv:select("message") >= 5 end, 30, "the first run to be sending")
    -- the everyday mistake: a resume (a cron job) while the first run lives
    local out, code = run_cli(args .. " --resume")
    assert.equal(2, code, out)
    assert.matches("in use by another run %(pid " .. pid .. " on ", out)
    assert.is_nil(out:find("traceback", 1, true))
    -- status reads the running journal
    local st, scode = run_cli("status --journal " .. dir .. "/run.db")
    assert.equal(0, scode, st)
    assert.matches("campaign campaign: %d+ recipients", st)
    assert.matches("running run: pid " .. pid, st)
    peers.wait_for(function() return (peers.read_file(dir .. "/first") or ""):match("recipients") end, 60,
      "the first run to end")
    assert.matches("200 sent", peers.read_file(dir .. "/first"))
    local per, n = received(srv)
    assert.equal(200, n)
    for i = 1, 200 do assert.equal(1, per[("u%d@y.test"):format(i)], "u" .. i) end
    st = run_cli("status --journal " .. dir .. "/run.db --json")
    local js = require("dkjson").decode(st:match("^(.-)\nexit="))
    assert.equal(200, js.sent)
    assert.is_false(js.running)
  end)

  it("stops with exit 3 and no traceback when the disk is full; resumed with room, nothing is sent twice", function()
    local mnt = peers.tmpdir()
    -- a filesystem of its own that fills: tmpfs (the tests run as root)
    local function ok(r) return r == true or r == 0 end -- Lua 5.4 and LuaJIT
    assert.is_true(ok(os.execute(("mount -t tmpfs -o size=160k tmpfs %s"):format(peers.quote(mnt)))),
      "cannot mount a tmpfs (the suite runs as root)")
    local srv
    -- one finally: busted keeps only a test's last
    finally(function()
      if srv then srv:stop() end
      os.execute(("umount -l %s; rm -rf %s"):format(peers.quote(mnt), peers.quote(mnt)))
    end)
    srv = peers.hostile({ quiet = true })
    list(dir .. "/list.csv", 1, 1500)
    local args = send_args(srv.port, mnt .. "/run.db")
    local out, code = run_cli(args)
    assert.equal(3, code, out)
    assert.matches("stopped: the journal cannot be written %(.*the disk is full", out)
    assert.is_nil(out:find("traceback", 1, true))
    local _, first = received(srv)
    assert.is_true(first > 0 and first < 1500, first .. " sent before the disk filled")
    -- room again: the resume finishes the list, each recipient at most once
    assert.is_true(ok(os.execute(("mount -o remount,size=64m %s"):format(peers.quote(mnt)))))
    out, code = run_cli(args .. " --resume")
    assert.is_true(code == 0 or code == 1, out)
    local per, n = received(srv)
    local missing = 0
    for i = 1, 1500 do
      local k = per[("u%d@y.test"):format(i)]
      assert.is_true(k == nil or k == 1, "u" .. i .. " sent twice")
      if not k then missing = missing + 1 end
    end
    -- only the ambiguous (an outcome the full disk could not record) may be missing
    local amb = tonumber(out:match("(%d+) ambiguous")) or 0
    assert.is_true(missing <= amb, missing .. " missing, " .. amb .. " ambiguous: " .. out)
    assert.is_true(n >= 1500 - 4, n .. " sent in all")
  end)

  it("keeps an outage's messages pending: a plain resume sends every recipient once and exits 0", function()
    local port = peers.free_port()
    list(dir .. "/list.csv", 1, 40)
    local args = send_args(port, dir .. "/run.db", "--outage-threshold 5")
    local out, code = run_cli(args)
    assert.equal(3, code, out)
    assert.matches("0 failed", out)
    assert.matches("40 pending", out)
    -- the relay is back: a plain resume (no --retry-failed) finishes the list
    local srv = peers.hostile({ quiet = true }, port)
    finally(function() srv:stop() end)
    out, code = run_cli(args .. " --resume")
    assert.equal(0, code, out)
    assert.matches("40 sent", out)
    local per, n = received(srv)
    assert.equal(40, n)
    for i = 1, 40 do assert.equal(1, per[("u%d@y.test"):format(i)]) end
  end)

  it("exits 2 with a sentence for numbers out of range", function()
    list(dir .. "/list.csv", 1, 1)
    for _, bad in ipairs({ "1e999", "0", "-3", "2.5", "nan" }) do
      local out, code = run_cli(send_args(9, dir .. "/j", "--outage-threshold=" .. bad))
      assert.equal(2, code, out)
      assert.matches("%-%-outage%-threshold takes a whole number from 1 to 1000000", out)
      assert.is_nil(out:find("traceback", 1, true))
    end
  end)
end)
