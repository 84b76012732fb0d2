-- Sending through a proxy (issue 23): SOCKS5 (RFC 1928, user/password RFC
-- 1929) and HTTP CONNECT, plain, with STARTTLS and implicit TLS through the
-- tunnel (the certificate checked against the server's name), refused
-- credentials as config errors, an unreachable target as a connection
-- error, and the proxy's password never in an error.
local peers = require("peers")
local smtppool = require("smtppool")
local options = require("smtppool.options")

local function msg(i)
  return { from = "a@x.test", to = { ("px%d@y.test"):format(i) },
           data = ("Subject: proxy %d\r\n\r\nthrough a tunnel\r\n"):format(i) }
end

describe("a proxy URL", function()
  it("reads socks5, socks5h and http, credentials percent-decoded, and hides the password in errors", function()
    assert.same({ kind = "socks5", host = "10.0.0.1", port = 1080, user = "u", password = "p@ss" },
      options.parse_proxy("socks5://u:p%40ss@10.0.0.1:1080"))
    assert.same({ kind = "socks5", host = "proxy.test", port = 1081 }, options.parse_proxy("socks5h://proxy.test:1081"))
    assert.same({ kind = "http", host = "::1", port = 3128 }, options.parse_proxy("http://[::1]:3128"))
    local p, e = options.parse_proxy("https://u:TOPSECRET@h:1")
    assert.is_nil(p)
    assert.falsy(e:find("TOPSECRET", 1, true))
    p, e = options.parse_proxy("socks5://u:TOPSECRET@h")
    assert.is_nil(p)
    assert.matches("needs host:port", e)
    assert.falsy(e:find("TOPSECRET", 1, true))
    local pool, perr = smtppool.new{ host = "h", proxy = "ftp://h:1" }
    assert.is_nil(pool)
    assert.equal("config", perr.kind)
  end)
end)

describe("sending through a proxy", function()
  local exim, certs
  setup(function()
    certs = peers.certs()
    exim = peers.exim({})
  end)
  teardown(function() exim:stop() end)

  local function through(proxy_script, url_of, o)
    local px = peers.tunnel(proxy_script)
    local opts = { host = "localhost", port = exim.port, ca_file = certs.ca, proxy = url_of(px.port),
                   retry = smtppool.retry.none() }
    for k, v in pairs(o or {}) do opts[k] = v end
    local p = assert(smtppool.new(opts))
    local results = {}
    for i = 1, 3 do results[i] = { p:send_raw(msg(i)) } end
    p:close()
    local tunnels, refused = px:select("tunnel"), px:select("refused")
    px:stop()
    return results, tunnels, refused
  end

  it("sends over STARTTLS through SOCKS5 with a user and password, the name resolved by the proxy", function()
    local r, tunnels = through({ user = "me", password = "s3cr:t" },
      function(port) return ("socks5://me:s3cr%%3At@127.0.0.1:%d"):format(port) end)
    for i = 1, 3 do assert.truthy(r[i][1], tostring(r[i][2])) end
    assert.is_true(#tunnels >= 1)
    assert.same({ "socks5", "localhost", exim.port, true },
      { tunnels[1].proto, tunnels[1].host, tunnels[1].port, tunnels[1].auth })
    assert.equal(3, #exim:log_lines("<= a@x%.test .* X=TLS.*for px%d@y%.test"))
  end)

  it("sends through HTTP CONNECT, and over implicit TLS through the tunnel", function()
    local r, tunnels = through({}, function(port) return ("http://127.0.0.1:%d"):format(port) end)
    for i = 1, 3 do assert.truthy(r[i][1], tostring(r[i][2])) end
    assert.equal("http", tunnels[1].proto)
    r, tunnels = through({ user = "u", password = "p" }, function(port) return ("http://u:p@127.0.0.1:%d"):format(port) end,
      { port = exim.tls_port, tls = "implicit" })
    for i = 1, 3 do assert.truthy(r[i][1], tostring(r[i][2])) end
    assert.equal(exim.tls_port, tunnels[1].port)
    assert.is_true(tunnels[1].auth)
  end)

  it("fails refused credentials as config errors, without the password", function()
    for _, mk in ipairs({ function(port) return ("socks5://me:WRONGPW@127.0.0.1:%d"):format(port) end,
                          function(port) return ("http://me:WRONGPW@127.0.0.1:%d"):format(port) end }) do
      local r, tunnels, refused = through({ user = "me", password = "right" }, mk)
      assert.equal(0, #tunnels)
      assert.is_true(#refused >= 1)
      local err = r[1][2]
      assert.equal("config", err.kind)
      assert.equal("connect", err.phase)
      assert.matches("proxy", err.text)
      assert.falsy(tostring(err):find("WRONGPW", 1, true))
    end
  end)

  it("fails a target the proxy cannot reach as a connection error naming it", function()
    local dead = peers.free_port()
    local r = through({}, function(port) return ("socks5://127.0.0.1:%d"):format(port) end, { port = dead, tls = "none" })
    assert.equal("connection", r[1][2].kind)
    assert.matches("could not reach localhost port " .. dead .. ": connection refused", r[1][2].text)
    r = through({}, function(port) return ("http://127.0.0.1:%d"):format(port) end, { port = dead, tls = "none" })
    assert.equal("connection", r[1][2].kind)
    assert.matches("CONNECT localhost:" .. dead .. " refused: HTTP/1.1 502", r[1][2].text)
  end)

  it("checks the certificate through the tunnel against the server's name", function()
    local r = through({}, function(port) return ("socks5://127.0.0.1:%d"):format(port) end,
      { server_name = "wrong.example" })
    assert.equal("tls", r[1][2].kind)
    assert.matches("verif", r[1][2].text)
  end)
end)
