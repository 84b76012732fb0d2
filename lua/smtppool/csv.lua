--- CSV recipient lists (RFC 4180): a header row names the columns; quoted
-- fields may hold commas, doubled quotes and line breaks; UTF-8 text.
-- Errors name the line and column where the problem starts.
-- @module smtppool.csv

local core = require("smtppool.core")

local M = {}

--- Iterates the rows of a CSV file as tables keyed by the header names.
-- @tparam string path
-- @treturn[1] function iterator returning `row, line` (or nil at the end;
--   raises `{csv_error = text}` tables through `error` on malformed input,
--   which `M.check` turns into `nil, err`)
-- @treturn[1] table the header names
-- @return[2] nil
-- @treturn[2] string why the file cannot be read
function M.rows(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("a")
  f:close()
  if text:sub(1, 3) == "\239\187\191" then text = text:sub(4) end -- a UTF-8 BOM
  local pos, line, col0 = 1, 1, 1 -- col0: position where the current line starts
  local n = #text

  local function fail(msg, at_line, at_col)
    error({ csv_error = ("%s: line %d, column %d: %s"):format(path, at_line, at_col, msg) }, 0)
  end

  -- One record: a list of fields, or nil at the end of the file.
  local function record()
    if pos > n then return nil end
    local fields = {}
    local start_line = line
    while true do
      local field
      if text:sub(pos, pos) == '"' then
        local qline, qcol = line, pos - col0 + 1
        local buf = {}
        pos = pos + 1
        while true do
          local q = text:find('"', pos, true)
          if not q then fail("unterminated quoted field", qline, qcol) end
          local chunk = text:sub(pos, q - 1)
          for nl in chunk:gmatch("\n") do line = line + 1 end
          local last_nl = chunk:match(".*()\n")
          if last_nl then col0 = pos + last_nl end
          buf[#buf + 1] = chunk
          if text:sub(q + 1, q + 1) == '"' then
            buf[#buf + 1] = '"'
            pos = q + 2
          else
            pos = q + 1
            break
          end
        end
        field = table.concat(buf)
        local c = text:sub(pos, pos)
        if c ~= "," and c ~= "\r" and c ~= "\n" and c ~= "" then
          fail("text after a closing quote", line, pos - col0 + 1)
        end
      else
        local e = text:find("[,\r\n]", pos) or n + 1
        field = text:sub(pos, e - 1)
        local bad = field:find('"', 1, true)
        if bad then fail("quote inside an unquoted field", line, pos - col0 + bad) end
        pos = e
      end
      if not core.utf8_valid(field) then fail("field is not valid UTF-8", line, pos - col0 + 1) end
      fields[#fields + 1] = field
      local c = text:sub(pos, pos)
      if c == "," then
        pos = pos + 1
      else
        if c == "\r" and text:sub(pos + 1, pos + 1) == "\n" then pos = pos + 2 elseif c ~= "" then pos = pos + 1 end
        line = line + 1
        col0 = pos
        return fields, start_line
      end
    end
  end

  local ok, h = pcall(record)
  if not ok then return nil, type(h) == "table" and h.csv_error or tostring(h) end
  local header = h
  if not header or #header == 0 then return nil, path .. ": the file has no header row" end
  local seen = {}
  for i, name in ipairs(header) do
    if name == "" then return nil, ("%s: line 1, column %d: empty column name"):format(path, i) end
    if seen[name] then return nil, ("%s: line 1: column '%s' appears twice"):format(path, name) end
    seen[name] = true
  end
  local iter = function()
    while true do
      local fields, at = record()
      if not fields then return nil end
      if not (#fields == 1 and fields[1] == "") then -- blank lines are skipped
        if #fields ~= #header then
          fail(("%d fields where the header has %d"):format(#fields, #header), at, 1)
        end
        local row = {}
        for i, name in ipairs(header) do row[name] = fields[i] end
        return row, at
      end
    end
  end
  return iter, header
end

--- Reads the whole file once to find any malformed row before a message
-- is sent.
-- @treturn[1] number rows
-- @treturn[1] table header names
-- @return[2] nil
-- @treturn[2] string the first problem, with line and column
function M.check(path)
  local iter, header = M.rows(path)
  if not iter then return nil, header end
  local count = 0
  local ok, err = pcall(function()
    while iter() do count = count + 1 end
  end)
  if not ok then return nil, type(err) == "table" and err.csv_error or tostring(err) end
  return count, header
end

return M
