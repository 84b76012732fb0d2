-- DKIM signatures checked by an independent verifier (dkimpy, Debian's
-- python3-dkim), with keys the tests make with openssl.
local peers = require("peers")
local smtppool = require("smtppool")

local keys
local function make_keys()
  if keys then return keys end
  local d = peers.tmpdir()
  local function run(cmd) assert(os.execute(cmd .. " 2>/dev/null"), cmd) end
  run("openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " .. d .. "/rsa.pem")
  run("openssl genpkey -algorithm ED25519 -out " .. d .. "/ed.pem")
  run("openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " .. d .. "/ec.pem")
  run("openssl pkey -in " .. d .. "/rsa.pem -pubout -out " .. d .. "/rsa.pub")
  run("openssl pkey -in " .. d .. "/ed.pem -pubout -out " .. d .. "/ed.pub")
  keys = { dir = d, rsa = d .. "/rsa.pem", ed = d .. "/ed.pem", ec = d .. "/ec.pem",
           rsa_pub = d .. "/rsa.pub", ed_pub = d .. "/ed.pub" }
  return keys
end

local function verify(data, ...)
  local d = peers.tmpdir()
  peers.write_file(d .. "/m.eml", data)
  local args = {}
  for _, p in ipairs({ ... }) do args[#args + 1] = peers.quote(p) end
  local out = peers.sh("env -u LD_PRELOAD /usr/bin/python3 tests/support/dkim_verify.py " .. peers.quote(d .. "/m.eml")
    .. " " .. table.concat(args, " ") .. " 2>&1")
  os.execute("rm -rf " .. peers.quote(d))
  return out:gsub("%s+$", "")
end

describe("DKIM", function()
  local f, pool, k
  setup(function()
    k = make_keys()
    f = peers.fault({})
    pool = assert(smtppool.new{ host = "127.0.0.1", port = f.port, tls = "none", dkim = {
      { domain = "x.test", selector = "rsa1", key = k.rsa },
      { domain = "x.test", selector = "ed1", key = peers.read_file(k.ed), algorithm = "ed25519-sha256" },
    } })
  end)
  teardown(function()
    pool:close()
    f:stop()
    os.execute("rm -rf " .. peers.quote(k.dir))
  end)

  local function sent_data(n)
    local msgs = f:select("message")
    return msgs[n or #msgs].data
  end

  it("signs with RSA and Ed25519 side by side, both verified independently", function()
    assert.truthy(pool:send{ from = "a@x.test", to = "b@y.test", subject = "signed", text = "hello  world \n\n\n" })
    local data = sent_data()
    local _, n = data:gsub("DKIM%-Signature:", "")
    assert.equal(2, n)
    assert.truthy(data:find("a=rsa-sha256", 1, true))
    assert.truthy(data:find("a=ed25519-sha256", 1, true))
    assert.equal("ok", verify(data, k.rsa_pub, k.ed_pub))
  end)

  it("verifies with non-ASCII headers and a 5 MB attachment", function()
    local blob = {}
    for i = 0, 255 do blob[#blob + 1] = string.char(i) end
    local big = table.concat(blob):rep(5 * 1024 * 1024 / 256)
    assert.truthy(pool:send{ from = '"Jörg Müller" <j@x.test>', to = "Zoë <z@y.test>", subject = "Grüße — 日本語",
      text = "caf\195\169", attachments = { { data = big, filename = "big.bin" } } })
    assert.equal("ok", verify(sent_data(), k.rsa_pub, k.ed_pub))
  end)

  it("signs a message whose 5 MB attachment streams from disk", function()
    local blob = {}
    for i = 0, 255 do blob[#blob + 1] = string.char((i * 7) % 256) end
    local path = k.dir .. "/big.bin"
    peers.write_file(path, table.concat(blob):rep(5 * 1024 * 1024 / 256))
    local res, err = pool:send{ from = "a@x.test", to = "b@y.test", subject = "streamed",
      text = "see attached", attachments = { { path = path } } }
    assert.is_nil(err)
    assert.truthy(res)
    local data = sent_data()
    assert.equal("ok", verify(data, k.rsa_pub, k.ed_pub))
    -- and what arrived decodes to the file, byte for byte
    local d = peers.tmpdir()
    peers.write_file(d .. "/m.eml", data)
    local out = peers.sh("env -u LD_PRELOAD /usr/bin/python3 tests/support/parse_mail.py " .. d .. "/m.eml")
    os.execute("rm -rf " .. peers.quote(d))
    local sum = peers.sh("sha256sum " .. peers.quote(path)):match("^(%x+)")
    assert.truthy(out:find(sum, 1, true))
    assert.truthy(out:find('"defects": []', 1, true))
  end)

  it("signs ready-made messages given to send_raw", function()
    assert.truthy(pool:send_raw{ from = "a@x.test", to = "b@y.test",
      data = "From: a@x.test\nTo: b@y.test\nSubject: raw\n\nbody\n" })
    assert.equal("ok", verify(sent_data(), k.rsa_pub, k.ed_pub))
  end)

  it("fails verification once the message is altered", function()
    assert.truthy(pool:send{ from = "a@x.test", to = "b@y.test", subject = "original", text = "pay 10 EUR" })
    local data = sent_data()
    assert.equal("ok", verify(data, k.rsa_pub, k.ed_pub))
    assert.matches("^fail", verify((data:gsub("pay 10 EUR", "pay 99 EUR")), k.rsa_pub, k.ed_pub))
    assert.matches("^fail", verify((data:gsub("Subject: original", "Subject: changed")), k.rsa_pub, k.ed_pub))
  end)

  it("lets a message opt out or bring its own key", function()
    assert.truthy(pool:send{ from = "a@x.test", to = "b@y.test", subject = "unsigned", text = "x", dkim = false })
    assert.is_nil(sent_data():find("DKIM-Signature", 1, true))
    local own = { domain = "x.test", selector = "ed9", key = k.ed, algorithm = "ed25519-sha256" }
    assert.truthy(pool:send{ from = "a@x.test", to = "b@y.test", subject = "own", text = "x", dkim = own })
    local data = sent_data()
    local _, n = data:gsub("DKIM%-Signature:", "")
    assert.equal(1, n)
    assert.truthy(data:find("s=ed9", 1, true))
    assert.equal("ok", verify(data, k.ed_pub))
    local res, err = pool:send{ from = "a@x.test", to = "b@y.test", text = "x",
      dkim = { domain = "x.test", selector = "s", key = "/nonexistent" } }
    assert.is_nil(res)
    assert.equal("invalid", err.kind)
  end)

  it("refuses bad keys at new with a config error", function()
    local cases = {
      { key = "/nonexistent/key.pem" },
      { key = "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n" },
      { key = k.ec },
      { key = k.rsa, algorithm = "ed25519-sha256" },
      { key = k.rsa, selector = "bad selector" },
    }
    for _, c in ipairs(cases) do
      local cfg = { domain = "x.test", selector = "s", key = c.key, algorithm = c.algorithm }
      if c.selector then cfg.selector = c.selector end
      local p, err = smtppool.new{ host = "h", tls = "none", dkim = cfg }
      assert.is_nil(p)
      assert.equal("config", err.kind)
    end
    assert.has_error(function() smtppool.new{ host = "h", tls = "none", dkim = { domain = "x" } } end)
  end)
end)
