-- The CSV reader (compose/csv.lua): the fast way (a plain line read and made
-- a row in C, core.csv_plain) and the field-by-field way must read every file
-- alike, and check must count and refuse what rows refuses.
local csv = require("smtppool.compose.csv")
local peers = require("peers")

local dir
setup(function() dir = peers.tmpdir() end)
teardown(function() os.execute("rm -rf " .. peers.quote(dir)) end)

local n_files = 0
local function file(text)
  n_files = n_files + 1
  local p = ("%s/l%d.csv"):format(dir, n_files)
  peers.write_file(p, text)
  return p
end

local function read_all(path, opts)
  local it, header = csv.rows(path, opts)
  if not it then return nil, header end
  local out = {}
  local ok, e = pcall(function()
    while true do
      local row, line = it()
      if not row then break end
      out[#out + 1] = { row = row, line = line }
    end
  end)
  if not ok then return nil, type(e) == "table" and e.csv_error or tostring(e) end
  return out, header
end

-- RFC 4180 by the book, one character at a time: the reference.
local function reference(text, delim)
  if text:sub(1, 3) == "\239\187\191" then text = text:sub(4) end
  local records, fields, field, i, inq, line, start = {}, {}, {}, 1, false, 1, 1
  local function push_field() fields[#fields + 1] = table.concat(field) field = {} end
  local function push_record()
    push_field()
    records[#records + 1] = { fields = fields, line = start }
    fields = {}
  end
  while i <= #text do
    local c = text:sub(i, i)
    if inq then
      if c == '"' and text:sub(i + 1, i + 1) == '"' then field[#field + 1] = '"' i = i + 1
      elseif c == '"' then inq = false
      else
        if c == "\n" then line = line + 1 end
        field[#field + 1] = c
      end
    elseif c == '"' then inq = true
    elseif c == delim then push_field()
    elseif c == "\r" and text:sub(i + 1, i + 1) == "\n" then
      push_record() i = i + 1 line = line + 1 start = line
    elseif c == "\n" then push_record() line = line + 1 start = line
    else field[#field + 1] = c end
    i = i + 1
  end
  if #field > 0 or #fields > 0 then push_record() end
  local header = table.remove(records, 1).fields
  local out = {}
  for _, r in ipairs(records) do
    if not (#r.fields == 1 and r.fields[1] == "") then
      local row = {}
      for k, name in ipairs(header) do row[name] = r.fields[k] end
      out[#out + 1] = { row = row, line = r.line }
    end
  end
  return out, header
end

describe("the CSV reader", function()
  it("reads plain, quoted, multi-line, CRLF and blank-line rows with their lines", function()
    local p = file('\239\187\191email,name,note\r\n' .. 'a@y.test,Ann,plain\r\n' .. '\r\n'
      .. 'b@y.test,"Bo, Jr.","say ""hi"""\n' .. 'c@y.test,Cy,"two\nlines"\n' .. 'd@y.test,,\n')
    local rows, header = assert(read_all(p))
    assert.same({ "email", "name", "note" }, header)
    assert.same({ { row = { email = "a@y.test", name = "Ann", note = "plain" }, line = 2 },
                  { row = { email = "b@y.test", name = "Bo, Jr.", note = 'say "hi"' }, line = 4 },
                  { row = { email = "c@y.test", name = "Cy", note = "two\nlines" }, line = 5 },
                  { row = { email = "d@y.test", name = "", note = "" }, line = 7 } }, rows)
    assert.equal(4, (csv.check(p)))
  end)

  it("takes header names that are no Lua names, ';' and tab lists, and more columns than a pattern captures", function()
    local p = file('e mail;"a""b";x\\y;%d;\226\130\172\nu@y.test;1;2;3;4\n')
    local rows, header = assert(read_all(p))
    assert.same({ "e mail", 'a"b', "x\\y", "%d", "\226\130\172" }, header)
    assert.same({ ["e mail"] = "u@y.test", ['a"b'] = "1", ["x\\y"] = "2", ["%d"] = "3", ["\226\130\172"] = "4" },
      rows[1].row)
    p = file("email\tname\nu@y.test\tU, V\n")
    assert.same({ email = "u@y.test", name = "U, V" }, assert(read_all(p))[1].row)
    local names, vals = {}, {}
    for i = 1, 40 do names[i] = "c" .. i vals[i] = "v" .. i end
    p = file(table.concat(names, ",") .. "\n" .. table.concat(vals, ",") .. "\n" .. table.concat(vals, ",") .. "\n")
    rows = assert(read_all(p))
    assert.equal(2, #rows)
    assert.equal("v40", rows[2].row.c40)
    assert.equal(3, rows[2].line)
    assert.equal(2, (csv.check(p)))
  end)

  it("refuses a row with too few or too many fields, naming its line, in rows and check alike", function()
    for _, body in ipairs({ "a@y.test,Ann\nb@y.test\n", "a@y.test,Ann\nb@y.test,Bo,extra\n",
                            'a@y.test,Ann\n"b@y.test",Bo,extra\n' }) do
      local p = file("email,name\n" .. body)
      local rows, e = read_all(p)
      assert.is_nil(rows)
      assert.matches("line 3, column 1: %d fields where the header has 2", e)
      local n, ce = csv.check(p)
      assert.is_nil(n)
      assert.equal(e, ce)
    end
    local p = file("email\n\n\nx@y.test\n")
    assert.same({ { row = { email = "x@y.test" }, line = 4 } }, assert(read_all(p)))
    assert.equal(1, (csv.check(p)))
  end)

  it("refuses invalid UTF-8, a lone quote and an unterminated field with line and column", function()
    local cases = { { "email,name\nx@y.test,B\255d\n", "line 2, column %d+: field is not valid UTF%-8" },
                    { 'email,name\nx@y.test,B"d\n', "line 2, column 11: quote inside an unquoted field" },
                    { 'email,name\nx@y.test,"Bd\n', "line 2, column 10: unterminated quoted field" } }
    for _, c in ipairs(cases) do
      local p = file(c[1])
      local _, e = read_all(p)
      assert.matches(c[2], e)
      local _, ce = csv.check(p)
      assert.equal(e, ce)
    end
  end)

  it("reads in C only a whole plain line with the header's number of fields", function()
    local core = require("smtppool.core")
    local h = { "email", "name" }
    local np, row = core.csv_plain("a@x.test,Ann\nb@x.test,Bo\n", 1, ",", 2, h)
    assert.equal(14, np)
    assert.same({ email = "a@x.test", name = "Ann" }, row)
    np, row = core.csv_plain("a@x.test,Ann\r\nb@x.test,\r\n", 15, ",", 2, h)
    assert.equal(26, np)
    assert.same({ email = "b@x.test", name = "" }, row) -- CR LF dropped, an empty last field kept
    assert.equal(14, (core.csv_plain("a@x.test,Ann\n", 1, ",", 2))) -- counting: no row
    -- anything else is left to the careful reader: nil, never an error
    for _, text in ipairs({ "a@x.test,Ann", "\"a\"@x.test,Ann\n", "a@x.test,A\rnn\n", "a@x.test\n",
                           "a@x.test,Ann,3\n", "\n", "\r\n", "a@x.test,\255\n" }) do
      assert.is_nil(core.csv_plain(text, 1, ",", 2, h), text)
    end
    assert.is_nil(core.csv_plain("a,b\n", 5, ",", 2, h)) -- past the end
    assert.equal(7, (core.csv_plain("a;b;c\n", 1, ";", 3)))
    assert.has_error(function() core.csv_plain("a,b\n", 1, ",,", 2) end)
    -- csv_count passes over a run of such lines at once (check's way), up
    -- to the first line the careful reader must see, or a partial last one
    local text = "a@x.test,Ann\r\nb@x.test,Bo\n\"c\"@x.test,Cy\nd@x.test,Di\n"
    assert.same({ 27, 2 }, { core.csv_count(text, 1, ",", 2) })
    assert.same({ 27, 0 }, { core.csv_count(text, 27, ",", 2) }) -- the quoted line
    assert.same({ #text + 1, 1 }, { core.csv_count(text, 41, ",", 2) })
    assert.same({ 14, 1 }, { core.csv_count("a@x.test,Ann\nb@x.test,Bo", 1, ",", 2) }) -- no LF yet
    assert.same({ 1, 0 }, { core.csv_count("a,b,c\n", 1, ",", 2) })
    assert.same({ 9, 0 }, { core.csv_count("a,b\n", 9, ",", 2) }) -- past the end
    assert.has_error(function() core.csv_count("a,b\n", 1, ",", 0) end)
  end)

  it("reads random lists, lines across its 64 KB chunks included, as RFC 4180 says", function()
    math.randomseed(20261206)
    local alphabet = { "a", "b", "z", "0", " ", ",", ";", "\t", '"', "\n", "\r\n", "\195\169", "@", "." }
    local function value(quote_ok)
      local t = {}
      for _ = 1, math.random(0, 12) do t[#t + 1] = alphabet[math.random(#alphabet)] end
      local v = table.concat(t)
      if v:find('[",;\t\r\n]') then
        if not quote_ok then return (v:gsub('[",;\t\r\n]', "x")) end
        return '"' .. v:gsub('"', '""') .. '"'
      end
      return v
    end
    for round = 1, 12 do
      local delim = ({ ",", ";", "\t" })[round % 3 + 1]
      local cols = math.random(1, 6)
      local names = {}
      for i = 1, cols do names[i] = "col" .. i end
      names[1] = "email"
      local lines = { table.concat(names, delim) }
      -- enough rows to cross a chunk boundary or two
      for _ = 1, math.random(200, 3000) do
        local vals = {}
        for i = 1, cols do vals[i] = value(math.random() < 0.3) end
        if cols == 1 and vals[1] == "" then vals[1] = "x" end
        lines[#lines + 1] = table.concat(vals, delim)
      end
      local text = table.concat(lines, math.random() < 0.5 and "\n" or "\r\n") .. "\n"
      local p = file(text)
      local want = reference(text, delim)
      local got = assert(read_all(p, { delimiter = delim }))
      assert.equal(#want, #got, "round " .. round)
      for i = 1, #want do
        assert.same(want[i], got[i], ("round %d, row %d"):format(round, i))
      end
      assert.equal(#want, (csv.check(p, { delimiter = delim })))
    end
  end)
end)
