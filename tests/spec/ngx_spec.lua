-- The OpenResty driver inside nginx (libnginx-mod-http-lua, LuaJIT): the
-- same C protocol machine with cosockets carrying the bytes.
local peers = require("peers")

local ROOT = peers.sh("pwd"):gsub("%s+$", "")

describe("the OpenResty driver", function()
  local dir, port, exim
  setup(function()
    exim = peers.exim({})
    dir = peers.tmpdir()
    port = peers.free_port()
    local conf = peers.read_file("tests/support/nginx.conf.in"):gsub("@DIR@", dir):gsub("@PORT@", tostring(port))
      :gsub("@ROOT@", ROOT)
    peers.write_file(dir .. "/nginx.conf", conf)
    assert(os.execute(("env -u LD_PRELOAD nginx -p %s -c %s -e %s"):format(dir, dir .. "/nginx.conf", dir .. "/error.log")),
      "nginx did not start")
    peers.wait_for(function() return peers.read_file(dir .. "/nginx.pid") end, 10, "nginx")
  end)
  teardown(function()
    local pid = (peers.read_file(dir .. "/nginx.pid") or ""):match("%d+")
    if pid then os.execute("kill " .. pid) end
    peers.wait_for(function() return not peers.read_file(dir .. "/nginx.pid") end, 10, "nginx to stop")
    os.execute("rm -rf " .. peers.quote(dir))
    exim:stop()
  end)

  local function get(query, path)
    return peers.sh(("env -u LD_PRELOAD curl -s --max-time 20 'http://127.0.0.1:%d/%s?%s'"):format(port,
      path or "send", query))
  end

  it("authenticates with XOAUTH2, and a refused token is an auth error", function()
    local f = peers.fault({ xoauth2_tokens = { "good" } })
    local ok_out = get("port=" .. f.port .. "&token=good", "auth")
    local bad_out = get("port=" .. f.port .. "&token=bad-secret", "auth")
    local msgs = #f:select("message")
    f:stop()
    assert.matches("^sent 250", ok_out)
    assert.matches("^failed auth error in auth: 535", bad_out)
    assert.is_nil(bad_out:find("bad-secret", 1, true))
    assert.equal(1, msgs)
  end)

  it("sends through exim from a request handler, per-recipient results included", function()
    local out = get("to=ngx@y.test&port=" .. exim.port)
    assert.matches("^sent 250 rejected 1 550", out)
    exim:wait_deliveries(1)
    assert.equal(1, #exim:log_lines("=> %S+ <ngx@y%.test>"))
    local found
    for _, m in ipairs(exim:messages()) do
      if m:find("Subject: from nginx", 1, true) then found = m end
    end
    assert.truthy(found)
    assert.truthy(found:find("\n.dot line\nbody\n", 1, true))
    assert.equal("", (peers.read_file(dir .. "/error.log") or ""):match("%[error%][^\n]*") or "")
  end)

  it("loads every module under LuaJIT and composes a message there", function()
    local out = get("", "modules")
    assert.matches("^loaded 16 composed Thu, 01 Jan 1970 %d%d:00:00 [+-]%d%d%d%d Hi =%?UTF%-8%?", out)
  end)

  it("reports a 421 as a connection error value", function()
    local f = peers.fault({ rules = { { on = "MAIL", ["do"] = "reply", text = "421 4.7.0 bye" } } })
    local out = get("port=" .. f.port)
    f:stop()
    assert.matches("^failed connection error in mail: 421 4%.7%.0 bye", out)
  end)
end)
