-- The README's code blocks are true (issue 23): each is marked as run by
-- something (a spec, make, CI) or as illustrative, and the quick start's
-- script runs and prints what the README shows.
local peers = require("peers")

local function blocks(text)
  local out = {}
  local prev = ""
  local i = 1
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    if line:match("^```") then
      if not out.open then
        out.open = { marker = prev:match("^<!%-%- (.-) %-%->$"), line = i, body = {} }
      else
        out[#out + 1] = out.open
        out.open = nil
      end
    elseif out.open then
      table.insert(out.open.body, line)
    end
    if line ~= "" then prev = line end
    i = i + 1
  end
  return out
end

describe("the README", function()
  local readme = peers.read_file("README.md")
  local list = blocks(readme)

  it("marks every code block as run (by what) or illustrative, and stays short", function()
    assert.is_true(#list >= 5)
    for _, b in ipairs(list) do
      assert.truthy(b.marker, "the block at line " .. b.line .. " has no <!-- runs/output/illustrative --> marker")
      assert.truthy(b.marker:match("^runs: ") or b.marker:match("^output: ") or b.marker:match("^illustrative"),
        "line " .. b.line .. ": " .. b.marker)
      for path in b.marker:gmatch("([%w_.-]+/[%w_./-]+%.lua)") do
        assert.truthy(peers.read_file(path), path .. " (named at line " .. b.line .. ") does not exist")
      end
    end
    local n = select(2, readme:gsub("\n", ""))
    assert.is_true(n <= 350, "README.md has " .. n .. " lines")
  end)

  it("has a quick start whose script prints what the README shows", function()
    local out = peers.sh("timeout 120 lua5.4 examples/hello.lua 2>&1")
    local shown
    for _, b in ipairs(list) do
      if b.marker:match("^output: examples/hello%.lua") then shown = b.body end
    end
    assert.truthy(shown, "no output block for examples/hello.lua")
    local got = {}
    for l in out:gmatch("[^\n]+") do got[#got + 1] = l end
    assert.equal(#shown, #got, out)
    -- the same words; the server's queue id and the counts that vary stay free
    local function shape(l) return (l:gsub("id=%S+", "id=X"):gsub("%d+", "N")) end
    for i, want in ipairs(shown) do assert.equal(shape(want), shape(got[i])) end
    assert.matches("batch: 12 sent, 0 failed", out)
    assert.matches("exim delivered 13 messages", out)
  end)

  it("links only to files that exist", function()
    for target in readme:gmatch("%]%(([^)#]+)[)#]") do
      if not target:match("^https?:") then
        assert.is_true(os.execute("test -e " .. peers.quote(target)) == true or
          os.execute("test -e " .. peers.quote(target)) == 0, target)
      end
    end
  end)
end)
