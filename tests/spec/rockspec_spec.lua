-- The rockspec tells the truth about the tree: every Lua module and every C
-- source is in it, and the CLI is installed.
local peers = require("peers")

describe("the rockspec", function()
  it("lists every Lua module and C source, and installs the CLI", function()
    local spec = {}
    local chunk
    if setfenv then -- LuaJIT: the 5.1 way to give a chunk its environment
      chunk = assert(loadfile("rockspec/smtppool-scm-1.rockspec"))
      setfenv(chunk, spec)
    else
      chunk = assert(loadfile("rockspec/smtppool-scm-1.rockspec", "t", spec))
    end
    chunk()
    local mods, files = spec.build.modules, {}
    for name, v in pairs(mods) do
      if type(v) == "string" then files[v] = name end
    end
    for path in peers.sh("find lua/smtppool -name '*.lua' | sort"):gmatch("[^\n]+") do
      local name = path:gsub("^lua/", ""):gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
      assert.equal(name, files[path], path .. " is not in the rockspec")
    end
    local srcs = {}
    for _, s in ipairs(mods["smtppool.core"].sources) do srcs[s] = true end
    for path in peers.sh("find src -name '*.c' | sort"):gmatch("[^\n]+") do
      assert.is_true(srcs[path] ~= nil, path .. " is not in the rockspec")
    end
    assert.equal("bin/smtppool", spec.build.install.bin.smtppool)
    assert.matches("lua >= 5%.1", spec.dependencies[1])
  end)
end)
