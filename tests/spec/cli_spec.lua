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

  it("prints help and exits 0", function()
    local code, out = run("--help")
    assert.equal(0, code)
    assert.matches("usage: smtppool send", out)
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
    local code, _, err = send({ to = dir .. "/bad.csv" })
    assert.equal(2, code)
    assert.matches("line 2, column 10: unterminated quoted field", err)
    assert.equal(0, #f:select("connect"))
  end)

  it("checks everything and sends nothing with --dry-run", function()
    local code, out = send({ args = "--dry-run" })
    assert.equal(0, code)
    assert.matches("dry run: 2 recipients", out)
    assert.equal(0, #f:select("connect"))
  end)

  it("sends, journals, and refuses to reuse a journal without --resume", function()
    local code, out = send({ args = "--journal " .. dir .. "/j" })
    assert.equal(0, code)
    assert.matches("2 sent, 0 failed", out)
    assert.equal(2, #f:select("message"))
    local code2, _, err = send({ args = "--journal " .. dir .. "/j" })
    assert.equal(2, code2)
    assert.matches("add %-%-resume", err)
    local code3, out3 = send({ args = "--journal " .. dir .. "/j --resume" })
    assert.equal(0, code3)
    assert.matches("2 skipped", out3)
    assert.equal(2, #f:select("message"))
  end)
end)
