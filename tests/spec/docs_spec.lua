-- The reference renders: LDoc with a working Markdown formatter (make docs).
local peers = require("peers")

describe("make docs", function()
  it("renders every module's Markdown, leaving no raw backticks in the pages", function()
    local dir = peers.tmpdir()
    local out = peers.sh(("env -u LD_PRELOAD build/jit_host /usr/bin/ldoc -q -d %s . 2>&1"):format(peers.quote(dir)))
    local pages = {}
    for name in peers.sh("ls " .. peers.quote(dir .. "/modules")):gmatch("[^\n]+") do pages[#pages + 1] = name end
    local raw, code = {}, 0
    for _, name in ipairs(pages) do
      local html = peers.read_file(dir .. "/modules/" .. name)
      if html:find("`", 1, true) then raw[#raw + 1] = name end
      for _ in html:gmatch("<code>") do code = code + 1 end
    end
    os.execute("rm -rf " .. peers.quote(dir))
    assert.is_nil(out:find("markdown not found", 1, true), out)
    assert.is_true(#pages >= 14, "modules documented: " .. #pages)
    assert.same({}, raw)
    assert.is_true(code > 100)
  end)
end)
