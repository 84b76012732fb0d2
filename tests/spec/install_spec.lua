-- make install / make uninstall: both builds where each interpreter looks,
-- usable from another folder, and removed again to the last file.
local peers = require("peers")

describe("make install and make uninstall", function()
  it("installs both builds and the CLI under DESTDIR, loads from elsewhere, and removes every file", function()
    local root = peers.sh("pwd"):gsub("%s+$", "")
    local dest = peers.tmpdir()
    local prefix = "/opt/sp"
    local out = peers.sh(("make -s install DESTDIR=%s PREFIX=%s 2>&1"):format(peers.quote(dest), prefix))
    local base = dest .. prefix
    assert.truthy(peers.read_file(base .. "/lib/lua/5.4/smtppool/core.so"), out)
    assert.truthy(peers.read_file(base .. "/lib/lua/5.1/smtppool/core.so"))
    assert.truthy(peers.read_file(base .. "/share/lua/5.4/smtppool/init.lua"))
    assert.truthy(peers.read_file(base .. "/share/lua/5.1/smtppool/driver/native.lua"))
    assert.truthy(peers.read_file(base .. "/bin/smtppool"))
    -- from another folder, with only the installed paths
    local probe = [[local s = require("smtppool"); assert(s.new{ host = "127.0.0.1", tls = "none" }); ]]
      .. [[print((jit and "jit " or "lua ") .. s._VERSION)]]
    peers.write_file(dest .. "/probe.lua", probe)
    local env = ("cd / && LUA_PATH='%s/share/lua/%%s/?.lua;%s/share/lua/%%s/?/init.lua' LUA_CPATH='%s/lib/lua/%%s/?.so' ")
      :format(base, base, base)
    local r54 = peers.sh(env:format("5.4", "5.4", "5.4") .. "lua5.4 " .. peers.quote(dest .. "/probe.lua") .. " 2>&1")
    local rjit = peers.sh(env:format("5.1", "5.1", "5.1") .. "env -u LD_PRELOAD " .. root .. "/build/jit_host "
      .. peers.quote(dest .. "/probe.lua") .. " 2>&1")
    assert.matches("^lua %d", r54)
    assert.matches("^jit %d", rjit)
    os.remove(dest .. "/probe.lua")
    peers.sh(("make -s uninstall DESTDIR=%s PREFIX=%s 2>&1"):format(peers.quote(dest), prefix))
    local left = peers.sh("find " .. peers.quote(dest) .. " -type f")
    os.execute("rm -rf " .. peers.quote(dest))
    assert.equal("", left)
  end)
end)
