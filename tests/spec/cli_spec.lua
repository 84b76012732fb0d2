-- bin/smtppool: exit codes scripts can test, errors that say what to fix.
local peers = require("peers")

local function run(args, env)
  local d = peers.tmpdir()
  local cmd = ("%s lua5.4 bin/smtppool %s >%s 2>%s; echo $?"):format(env or "", args,
    peers.quote(d .. "/out"), peers.quote(d .. "/err"))
  local code = tonumber(peers.sh(cmd):match("%d+"))
  local out, err = peers.read_file(d .. "/out"), peers.read_file(d .. "/err")
  os.execute("rm -rf " .. peers.quote(d))
  return code, out, err
end

describe("bin/smtppool", function()
  local dir, f
  setup(function()
    dir = peers.tmpdir()
    f = peers.fault({})
    peers.write_file(dir .. "/list.csv", "email,name\na@y.test,Ann\nb@y.test,Bob\n")
    peers.write_file(dir .. "/bad.csv", "email,name\na@y.test,\"Ann\n")
    peers.write_file(dir .. "/body.txt", "Dear {{name}}\n")
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test' }"):format(f.port))
  end)
  teardown(function()
    f:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)

  local function send(extra)
    return run(("send --config %s/pool.lua --to %s --subject 'Hi {{name}}' --text %s/body.txt --quiet %s"):format(
      dir, extra and extra.to or (dir .. "/list.csv"), dir, extra and extra.args or ""))
  end

  it("prints help for the program and each subcommand, and its version, exiting 0", function()
    local code, out = run("--help")
    assert.equal(0, code)
    assert.matches("Usage: smtppool", out)
    assert.matches("Exit codes: 0 all sent", out)
    code, out = run("send --help")
    assert.equal(0, code)
    assert.matches("%-%-retry%-failed", out)
    assert.matches("%-%-list%-unsubscribe%-post", out)
    code, out = run("preview --help")
    assert.equal(0, code)
    assert.matches("%-%-out", out)
    code, out = run("--version")
    assert.equal(0, code)
    assert.matches("^smtppool %d+%.%d+%.%d+", out)
  end)

  it("takes --opt=value, a ';' list with an 'Email' column, and newsletter options", function()
    peers.write_file(dir .. "/semi.csv", "Email;name\nc@y.test;Cy\n")
    peers.write_file(dir .. "/att.txt", "attached")
    local before = #f:select("message")
    local code, out = run(("send --config=%s/pool.lua --to=%s/semi.csv --subject='Hi {{name}}' --text=%s/body.txt "
      .. "--quiet --reply-to r@x.test --header 'X-Campaign: spring' --list-unsubscribe '<https://x.test/u>' "
      .. "--list-unsubscribe-post --attach %s/att.txt"):format(dir, dir, dir, dir))
    assert.equal(0, code, out)
    local msgs = f:select("message")
    assert.equal(before + 1, #msgs)
    local data = msgs[#msgs].data
    assert.matches("Reply%-To: r@x%.test", data)
    assert.matches("X%-Campaign: spring", data)
    assert.matches("List%-Unsubscribe%-Post: List%-Unsubscribe=One%-Click", data)
    assert.matches('filename="?att%.txt', data)
  end)

  it("takes list_unsubscribe and reply_to from the config file, not as pool options", function()
    peers.write_file(dir .. "/pool3.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test', "
      .. "list_unsubscribe = '<mailto:u@x.test>', reply_to = 'r2@x.test' }"):format(f.port))
    local before = #f:select("message")
    local code, out, err = run(("send --config %s/pool3.lua --to %s/list.csv --subject s --text %s/body.txt --quiet")
      :format(dir, dir, dir))
    assert.equal(0, code, tostring(out) .. tostring(err))
    local msgs = f:select("message")
    assert.equal(before + 2, #msgs)
    assert.matches("List%-Unsubscribe: <mailto:u@x%.test>", msgs[#msgs].data)
    assert.matches("Reply%-To: r2@x%.test", msgs[#msgs].data)
  end)

  it("logs the pool's events as NDJSON with --events", function()
    local code = run(("send --config %s/pool.lua --to %s/list.csv --subject s --text %s/body.txt --quiet "
      .. "--events %s/ev.ndjson"):format(dir, dir, dir, dir))
    assert.equal(0, code)
    local types = {}
    for l in peers.read_file(dir .. "/ev.ndjson"):gmatch("[^\n]+") do
      local ev = require("dkjson").decode(l)
      types[ev.type] = true
      assert.is_number(ev.time)
    end
    assert.is_true(types.connect and types.ready and true)
  end)

  it("names the columns it saw when there is no email column", function()
    peers.write_file(dir .. "/noemail.csv", "address,name\nc@y.test,Cy\n")
    local code, _, err = send({ to = dir .. "/noemail.csv" })
    assert.equal(2, code)
    assert.matches("columns seen: address, name", err)
  end)

  it("previews the first messages as .eml files and checks every row as the real run would", function()
    peers.write_file(dir .. "/mixed.csv", 'email,name\na@y.test,Ann\nb@y.test,"Bo\nb"\nc@y.test,Cy\n')
    local code, out, err = run(("preview --config %s/pool.lua --to %s/mixed.csv --subject 'Hi {{name}}' "
      .. "--text %s/body.txt --out %s/eml --count 5"):format(dir, dir, dir, dir))
    assert.equal(1, code)                        -- one row would fail
    assert.matches("3 recipients, 1 would fail", out)
    assert.matches("line 3", err)               -- the row with a line break in the subject
    assert.matches("Subject: Hi Ann", peers.read_file(dir .. "/eml/0001.eml"))
    assert.matches("To: c@y%.test", peers.read_file(dir .. "/eml/0002.eml"))
    assert.is_nil(peers.read_file(dir .. "/eml/0003.eml"))
  end)

  it("writes every failure to an NDJSON report and the first ones on screen", function()
    peers.write_file(dir .. "/fails.csv", "email,name\nreject1@y.test,A\nreject2@y.test,B\nok@y.test,C\n")
    local ff = peers.fault({ rules = { { on = "RCPT", match = "reject", ["do"] = "reply", text = "550 5.1.1 no such user",
      times = -1 } } })
    peers.write_file(dir .. "/pool2.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test' }")
      :format(ff.port))
    local code, _, err = run(("send --config %s/pool2.lua --to %s/fails.csv --subject s --text %s/body.txt --quiet "
      .. "--report %s/r.ndjson"):format(dir, dir, dir, dir))
    ff:stop()
    assert.equal(1, code)
    assert.matches("failed reject1@y.test %(line 2%): permanent error in rcpt: 550", err)
    local lines = {}
    for l in peers.read_file(dir .. "/r.ndjson"):gmatch("[^\n]+") do lines[#lines + 1] = require("dkjson").decode(l) end
    assert.equal(3, #lines)
    assert.equal("F", lines[1].state)
    assert.equal(550, lines[1].code)
    -- each failure names its row's line in the CSV
    local by = {}
    for _, l in ipairs(lines) do if l.email then by[l.email] = l.line end end
    assert.same({ ["reject1@y.test"] = 2, ["reject2@y.test"] = 3 }, by)
    assert.equal("totals", lines[3].type)
    assert.equal(1, lines[3].sent)
  end)

  it("exits 2 on usage errors, naming what is missing", function()
    local code, _, err = run("send --to x.csv")
    assert.equal(2, code)
    assert.matches("%-%-config is required", err)
    code, _, err = run("send --frobnicate")
    assert.equal(2, code)
    assert.matches("unknown option '%-%-frobnicate'", err)
  end)

  it("exits 2 on a bad CSV with its line and column, sending nothing", function()
    local c0 = #f:select("connect")
    local code, _, err = send({ to = dir .. "/bad.csv" })
    assert.equal(2, code)
    assert.matches("line 2, column 10: unterminated quoted field", err)
    assert.equal(c0, #f:select("connect"))
  end)

  it("checks everything and sends nothing with --dry-run, counting rows as the run does", function()
    local c0 = #f:select("connect")
    local code, out = send({ args = "--dry-run" })
    assert.equal(0, code)
    assert.matches("dry run: 2 recipients,", out)
    assert.equal(c0, #f:select("connect"))
    -- a list naming one address twice (in two spellings): the run sends it once, the dry run says so
    peers.write_file(dir .. "/dup.csv", "email,name\na@y.test,Ann\nb@y.test,Bob\n A@Y.test ,Ann again\n")
    code, out = send({ to = dir .. "/dup.csv", args = "--dry-run" })
    assert.equal(0, code)
    assert.matches("dry run: 2 recipients %(and 1 duplicate row, sent once%), 0 would fail", out)
    -- a row whose address holds a CR: its error shows the address as given
    peers.write_file(dir .. "/cr.csv", "email,name\n\"c@y.test\r\",Cy\n")
    local _, _, err = send({ to = dir .. "/cr.csv", args = "--dry-run" })
    assert.matches("'to' \"c@y%.test\\x0D\"", err)
    assert.equal(c0, #f:select("connect"))
  end)

  it("sends, journals, and refuses to reuse a journal without --resume", function()
    local m0 = #f:select("message")
    local code, out = send({ args = "--journal " .. dir .. "/j" })
    assert.equal(0, code)
    assert.matches("2 sent, 0 failed", out)
    assert.equal(m0 + 2, #f:select("message"))
    local code2, _, err = send({ args = "--journal " .. dir .. "/j" })
    assert.equal(2, code2)
    assert.matches("add %-%-resume", err)
    local code3, out3 = send({ args = "--journal " .. dir .. "/j --resume" })
    assert.equal(0, code3)
    assert.matches("2 skipped", out3)
    assert.equal(m0 + 2, #f:select("message"))
  end)
end)

describe("bin/smtppool exit codes, path by path", function()
  local dir, srv
  setup(function()
    dir = peers.tmpdir()
    srv = peers.hostile({ quiet = true })
    peers.write_file(dir .. "/ok.csv", "email,name\na@y.test,A\n")
    peers.write_file(dir .. "/body.txt", "Hi {{name}}\n")
    peers.write_file(dir .. "/pool.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test' }")
      :format(srv.port))
    peers.write_file(dir .. "/dead.lua", ("return { host = '127.0.0.1', port = %d, tls = 'none', from = 'n@x.test', "
      .. "retry = nil }"):format(peers.free_port()))
  end)
  teardown(function()
    srv:stop()
    os.execute("rm -rf " .. peers.quote(dir))
  end)

  local function send(args)
    return run("send --quiet --subject s --text " .. dir .. "/body.txt " .. args)
  end

  local cases = {
    { "all sent", 0, function() return send(("--config %s/pool.lua --to %s/ok.csv"):format(dir, dir)) end },
    { "no --config", 2, function() return send(("--to %s/ok.csv"):format(dir)) end },
    { "a config file that does not load", 2, function()
      return send(("--config %s/missing.lua --to %s/ok.csv"):format(dir, dir)) end },
    { "a list that cannot be read", 2, function() return send(("--config %s/pool.lua --to %s/none.csv"):format(dir, dir)) end },
    { "--retry-failed without --resume", 2, function()
      return send(("--config %s/pool.lua --to %s/ok.csv --retry-failed"):format(dir, dir)) end },
    { "--resume without --journal", 2, function()
      return send(("--config %s/pool.lua --to %s/ok.csv --resume"):format(dir, dir)) end },
    { "an unwritable --report", 2, function()
      return send(("--config %s/pool.lua --to %s/ok.csv --report /nonexistent/r.json"):format(dir, dir)) end },
    { "a bad --delimiter", 2, function()
      return send(("--config %s/pool.lua --to %s/ok.csv --delimiter '|'"):format(dir, dir)) end },
    { "the relay down (an outage)", 3, function()
      return send(("--config %s/dead.lua --to %s/ok.csv --journal %s/j-dead --outage-threshold 1"):format(dir, dir, dir)) end },
  }
  for _, c in ipairs(cases) do
    it(("exits %d for %s"):format(c[2], c[1]), function()
      local code, out, err = c[3]()
      assert.equal(c[2], code, tostring(out) .. tostring(err))
      assert.is_nil((err or ""):find("traceback", 1, true))
    end)
  end
end)
