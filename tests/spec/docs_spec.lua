-- The reference renders: LDoc with a working Markdown formatter (make docs),
-- discount, so the guides' tables are tables; the index lists the API a
-- user calls apart from the internal modules.
local peers = require("peers")

describe("make docs", function()
  local dir, out
  setup(function()
    dir = peers.tmpdir()
    out = peers.sh(("env -u LD_PRELOAD build/jit_host /usr/bin/ldoc -q -d %s . 2>&1"):format(peers.quote(dir)))
  end)
  teardown(function() os.execute("rm -rf " .. peers.quote(dir)) end)

  local function pages(kind)
    local l = {}
    for name in peers.sh("ls " .. peers.quote(dir .. "/" .. kind) .. " 2>/dev/null"):gmatch("[^\n]+") do
      l[#l + 1] = name
    end
    return l
  end

  it("renders every module's Markdown, leaving no raw backticks in the pages", function()
    assert.is_nil(out:find("not found", 1, true), out)
    assert.is_nil(out:find("discount failed", 1, true), out)
    local raw, code, n = {}, 0, 0
    for _, kind in ipairs({ "api", "internals" }) do
      for _, name in ipairs(pages(kind)) do
        n = n + 1
        local html = peers.read_file(dir .. "/" .. kind .. "/" .. name)
        if html:find("`", 1, true) then raw[#raw + 1] = name end
        for _ in html:gmatch("<code>") do code = code + 1 end
      end
    end
    assert.is_true(n >= 20, "modules documented: " .. n)
    assert.same({}, raw)
    assert.is_true(code > 100)
  end)

  it("lists the API first and the internal modules apart", function()
    local api, internals = pages("api"), pages("internals")
    local function has(l, name)
      for _, p in ipairs(l) do if p == name .. ".html" then return true end end
      return false
    end
    for _, m in ipairs({ "smtppool", "smtppool.ngx", "smtppool.campaign", "smtppool.outbox", "smtppool.errors",
                         "smtppool.presets", "smtppool.engine.retry" }) do
      assert.is_true(has(api, m), m .. " is not under API")
    end
    for _, m in ipairs({ "smtppool.engine.scheduler", "smtppool.limits.redis", "smtppool.driver.native" }) do
      assert.is_true(has(internals, m), m .. " is not under Internals")
      assert.is_false(has(api, m), m .. " is listed as API")
    end
    local index = peers.read_file(dir .. "/index.html")
    assert.truthy(index:find("<h2>API</h2>", 1, true))
    assert.truthy(index:find("<h2>API</h2>", 1, true) < index:find("<h2>Internals</h2>", 1, true))
  end)

  it("renders the guides' tables as tables", function()
    for _, g in ipairs({ "guide.md", "benchmarks.md", "ARCHITECTURE.md", "SECURITY.md" }) do
      local src = peers.read_file((g:match("^%u") and "" or "docs/") .. g)
      local html = peers.read_file(dir .. "/guides/" .. g .. ".html")
      assert.truthy(html, g .. " is not rendered")
      local rows = 0
      for _ in src:gmatch("\n|[^\n]*|") do rows = rows + 1 end
      if rows > 0 then
        assert.truthy(html:find("<table", 1, true), g .. ": no table rendered")
        assert.is_nil(html:find("<p>|", 1, true), g .. ": a table left as text")
      end
    end
  end)
end)
