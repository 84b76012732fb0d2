-- The rockspec tells the truth about the tree: every Lua module and every C
-- source is in it, and the CLI is installed. LuaRocks itself lints it, builds
-- and installs it into a private tree for Lua 5.4, Lua 5.1 and LuaJIT, and
-- each interpreter then loads it from another folder.
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

  -- LuaRocks builds in the source folder (objects next to the sources): it
  -- works on a copy of the tree, never on the checkout.
  local function luarocks(args)
    return peers.sh("cd " .. args.dir .. " && env -u LD_PRELOAD luarocks " .. args.cmd .. " 2>&1; echo rc=$?")
  end

  it("passes luarocks lint, and luarocks make installs a tree each interpreter loads from elsewhere", function()
    assert.truthy(peers.sh("command -v luarocks"):match("luarocks"), "luarocks is missing: make deps installs it")
    local root = peers.sh("pwd"):gsub("%s+$", "")
    local src = peers.tmpdir()
    peers.sh(("tar -C %s -cf - --exclude=./.git --exclude=./build --exclude=./doc --exclude='*.o' --exclude='*.so' . "
      .. "| tar -C %s -xf -"):format(peers.quote(root), peers.quote(src)))
    local lint = luarocks({ dir = peers.quote(src), cmd = "lint rockspec/smtppool-scm-1.rockspec" })
    assert.matches("rc=0\n$", lint)
    local probe = peers.tmpdir() .. "/probe.lua"
    peers.write_file(probe, [[
local s = require("smtppool")
local p = assert(s.new{ host = "127.0.0.1", tls = "none" })
p:close()
local m = assert(require("smtppool.compose.message").compose{ from = "a@x.test", to = "b@y.test", subject = "s", text = "t" })
print((jit and "luajit" or _VERSION) .. " " .. s._VERSION .. " " .. #m)
]])
    for _, v in ipairs({
      { lua = "5.4", interp = "lua5.4", want = "^Lua 5%.4 %d" },
      { lua = "5.1", interp = "lua5.1", want = "^Lua 5%.1 %d" },
      { lua = "5.1", interp = "env -u LD_PRELOAD " .. root .. "/build/jit_host", want = "^luajit %d",
        flags = " LUA_INCDIR=/usr/include/luajit-2.1" },
    }) do
      local tree = peers.tmpdir()
      local out = luarocks({ dir = peers.quote(src), cmd = ("--lua-version %s make --tree %s --deps-mode none "
        .. "rockspec/smtppool-scm-1.rockspec%s"):format(v.lua, peers.quote(tree), v.flags or "") })
      assert.matches("rc=0\n$", out)
      local lmod, cmod = tree .. "/share/lua/" .. v.lua, tree .. "/lib/lua/" .. v.lua
      -- the C module only where C modules go: no stray copy among the Lua files
      assert.equal("", peers.sh("find " .. peers.quote(lmod) .. " -name '*.so'"))
      assert.truthy(peers.read_file(cmod .. "/smtppool/core.so"))
      local env = ("cd / && LUA_PATH='%s/?.lua;%s/?/init.lua' LUA_CPATH='%s/?.so' "):format(lmod, lmod, cmod)
      local got = peers.sh(env .. v.interp .. " " .. peers.quote(probe) .. " 2>&1")
      assert.matches(v.want, got)
      -- the CLI, through LuaRocks' wrapper (argparse and dkjson from Debian)
      assert.matches("Usage: smtppool", peers.sh(peers.quote(tree .. "/bin/smtppool") .. " --help 2>&1"))
      os.execute("rm -rf " .. peers.quote(tree))
    end
    os.execute("rm -rf " .. peers.quote(src))
  end)

  it("luarocks make in a checkout where make ran installs no stray module and leaves git status clean", function()
    local root = peers.sh("pwd"):gsub("%s+$", "")
    local src = peers.tmpdir()
    -- the tracked files, committed in a repository of their own, and this
    -- checkout's build (make's output, which luarocks must not pick up)
    peers.sh(("cd %s && git ls-files -z | xargs -0 tar -cf - | tar -C %s -xf - && cp -r build %s/"):format(
      peers.quote(root), peers.quote(src), peers.quote(src)))
    peers.sh(("cd %s && git init -q && git add -A && git -c user.name=t -c user.email=t@x.test commit -qm tree"):format(
      peers.quote(src)))
    local tree = peers.tmpdir()
    local out = luarocks({ dir = peers.quote(src), cmd = ("--lua-version 5.4 make --tree %s --deps-mode none "
      .. "rockspec/smtppool-scm-1.rockspec"):format(peers.quote(tree)) })
    assert.matches("rc=0\n$", out)
    assert.equal("", peers.sh("find " .. peers.quote(tree .. "/share") .. " -name '*.so'"))
    assert.truthy(peers.read_file(tree .. "/lib/lua/5.4/smtppool/core.so"))
    assert.equal("", peers.sh("cd " .. peers.quote(src) .. " && git status --porcelain"))
    os.execute("rm -rf " .. peers.quote(src) .. " " .. peers.quote(tree))
  end)
end)
