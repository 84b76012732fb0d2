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
    keys = nil
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

-- Batches sign on worker threads (sign_threads) while the loop serves the
-- sockets: every message must carry its own signatures, whatever order the
-- threads finish in.
describe("DKIM on signing threads", function()
  local f, k
  setup(function()
    k = make_keys()
    f = peers.fault({})
  end)
  teardown(function()
    f:stop()
    os.execute("rm -rf " .. peers.quote(k.dir))
    keys = nil
  end)

  local function new_pool(o)
    local opts = { host = "127.0.0.1", port = f.port, tls = "none", max_conns = 2, dkim = {
      { domain = "x.test", selector = "rsa1", key = k.rsa },
      { domain = "x.test", selector = "ed1", key = k.ed, algorithm = "ed25519-sha256" },
    } }
    for kk, v in pairs(o or {}) do opts[kk] = v end
    return assert(smtppool.new(opts))
  end

  -- Each signature's bh= is the body hash of the message it is in.
  local function own_signatures(data)
    local body = data:match("\r\n\r\n(.*)$")
    local bh = assert(require("smtppool.core").body_hash(body))
    local n, at = 0, 1
    while true do
      local s = data:find("DKIM-Signature:", at, true)
      if not s then return n end
      local e = data:find("\r\n%S", s)
      local got = data:sub(s, e):gsub("%s", ""):match("bh=([^;]+)")
      assert.equal(bh, got)
      n, at = n + 1, e
    end
  end

  it("signs a 200-message batch with RSA and Ed25519, each message its own signatures", function()
    local pool = new_pool({ sign_threads = 2 })
    local before = #f:select("message")
    local list = {}
    for i = 1, 200 do
      list[i] = { from = "a@x.test", to = ("r%d@y.test"):format(i), subject = "n " .. i,
                  text = ("Hello recipient %d, %s\n"):format(i, ("x"):rep(i)) }
    end
    local summary = pool:send_batch(list)
    pool:close()
    assert.same({ sent = 200, failed = 0, cancelled = 0, total = 200 }, summary)
    local msgs = f:select("message")
    assert.equal(200, #msgs - before)
    for i = before + 1, #msgs do assert.equal(2, own_signatures(msgs[i].data)) end
    for _, i in ipairs({ before + 1, before + 77, #msgs }) do
      assert.equal("ok", verify(msgs[i].data, k.rsa_pub, k.ed_pub))
    end
  end)

  it("signs ready-made messages, skips dkim = false and uses a message's own key, in one batch", function()
    local pool = new_pool({ sign_threads = 3 })
    local before = #f:select("message")
    local own = { domain = "x.test", selector = "ed9", key = k.ed, algorithm = "ed25519-sha256" }
    local list = {}
    for i = 1, 30 do
      local kind = i % 3
      if kind == 0 then
        list[i] = { from = "a@x.test", to = "raw" .. i .. "@y.test",
                    data = ("From: a@x.test\r\nTo: raw%d@y.test\r\nSubject: raw %d\r\n\r\nbody %d\r\n"):format(i, i, i) }
      elseif kind == 1 then
        list[i] = { from = "a@x.test", to = "off" .. i .. "@y.test", subject = "off", text = "x" .. i, dkim = false }
      else
        list[i] = { from = "a@x.test", to = "own" .. i .. "@y.test", subject = "own", text = "y" .. i, dkim = own }
      end
    end
    local summary = pool:send_batch(list)
    pool:close()
    assert.same({ sent = 30, failed = 0, cancelled = 0, total = 30 }, summary)
    local msgs = f:select("message")
    local counts = { raw = 0, off = 0, own = 0 }
    for i = before + 1, #msgs do
      local d = msgs[i].data
      local kind = msgs[i].rcpt and msgs[i].rcpt[1] and msgs[i].rcpt[1]:match("^<?(%a+)") or d:match("To: (%a+)")
      local n = own_signatures(d)
      if d:find("Subject: raw", 1, true) then
        counts.raw = counts.raw + 1
        assert.equal(2, n)
      elseif d:find("s=ed9", 1, true) then
        counts.own = counts.own + 1
        assert.equal(1, n)
      else
        counts.off = counts.off + 1
        assert.equal(0, n)
      end
      assert.truthy(kind)
    end
    assert.same({ raw = 10, off = 10, own = 10 }, counts)
  end)

  it("ends the messages still being signed as cancelled when the batch stops", function()
    local pool = new_pool({ sign_threads = 1 })
    local pulled, results = 0, 0
    local summary = pool:send_batch(function()
      if pulled == 100 then return nil end
      pulled = pulled + 1
      return { from = "a@x.test", to = "s" .. pulled .. "@y.test", subject = "s", text = "stop " .. pulled }
    end, {
      on_result = function() results = results + 1 end,
      should_stop = function() return results >= 3 end,
    })
    pool:close()
    assert.equal(pulled, summary.total)
    assert.equal(pulled, results)
    assert.equal(summary.total, summary.sent + summary.cancelled)
    assert.is_true(summary.cancelled > 0)
    assert.is_true(pulled < 100)
  end)

  -- n composed messages through a pool with these options: every one sent,
  -- and every one carrying both its signatures.
  local function send_signed(o, n)
    local pool = new_pool(o)
    local before = #f:select("message")
    local list = {}
    for i = 1, n do list[i] = { from = "a@x.test", to = "n" .. i .. "@y.test", subject = "n", text = "n" .. i } end
    assert.same({ sent = n, failed = 0, cancelled = 0, total = n }, pool:send_batch(list))
    pool:close()
    local msgs = f:select("message")
    assert.equal(n, #msgs - before)
    for i = before + 1, #msgs do assert.equal(2, own_signatures(msgs[i].data)) end
  end

  it("signs on the loop when no thread can be started", function()
    local core = require("smtppool.core")
    local real = core.signq
    core.signq = function() return nil, "cannot start a signing thread: Resource temporarily unavailable" end
    finally(function() core.signq = real end)
    send_signed({ sign_threads = 2 }, 6)
  end)

  it("takes sign_threads = 0 (sign on the loop) and refuses a bad count", function()
    send_signed({ sign_threads = 0 }, 5)
    -- the default: every processor for RSA, one left to the loop when every key is Ed25519
    local cpus = require("smtppool.core").cpus()
    assert.equal(math.min(8, cpus), smtppool._sign_threads_default({ { alg = "rsa-sha256" }, { alg = "ed25519-sha256" } }))
    assert.equal(math.max(1, math.min(8, cpus - 1)), smtppool._sign_threads_default({ { alg = "ed25519-sha256" } }))
    for _, bad in ipairs({ -1, 1.5, 65, 0 / 0 }) do
      assert.has_error(function() smtppool.new{ host = "h", tls = "none", sign_threads = bad } end,
        "smtppool.new: option 'sign_threads' must be an integer from 0 to 64")
    end
  end)
end)
