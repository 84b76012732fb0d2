--- CSV recipient lists (RFC 4180): a header row names the columns; quoted
-- fields may hold delimiters, doubled quotes and line breaks; UTF-8 text.
-- The file is streamed in chunks, so memory stays flat however long the
-- list; the delimiter (`,`, `;` or tab, as spreadsheet exports in many
-- locales use) is found from the header row unless given. Errors name the
-- line and column where the problem starts.
-- @api smtppool.compose.csv

local core = require("smtppool.core")

local M = {}

local CHUNK = 65536
local DELIMITERS = { [","] = true, [";"] = true, ["\t"] = true }

--- The delimiter of a header line: the most frequent of `,`, `;` and tab
-- outside quotes (`,` on a tie or when none appears).
function M.sniff(line)
  local counts, inq = { [","] = 0, [";"] = 0, ["\t"] = 0 }, false
  for i = 1, #line do
    local c = line:sub(i, i)
    if c == '"' then inq = not inq
    elseif not inq and counts[c] then counts[c] = counts[c] + 1 end
  end
  local best = ","
  for _, d in ipairs({ ";", "\t" }) do
    if counts[d] > counts[best] then best = d end
  end
  return best
end

--- Iterates the rows of a CSV file as tables keyed by the header names.
-- @tparam string path
-- @tparam[opt] table opts `delimiter` (`","`, `";"` or `"\t"`; default: sniffed)
-- @treturn[1] function iterator returning `row, line` (or nil at the end;
--   raises `{csv_error = text}` tables through `error` on malformed input,
--   which `M.check` turns into `nil, err`)
-- @treturn[1] table the header names
-- @treturn[1] string the delimiter
-- @return[2] nil
-- @treturn[2] string why the file cannot be read
function M.rows(path, opts)
  return M._open(path, opts, false)
end

-- The reader behind rows and check: with count_only its iterator returns
-- how many rows it passed over (one, or a run of plain lines at once)
-- instead of building them.
function M._open(path, opts, count_only)
  local delim = opts and opts.delimiter
  if delim ~= nil and not DELIMITERS[delim] then
    error("smtppool.csv: delimiter must be ',', ';' or a tab", 3)
  end
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  -- text: the part of the file in memory; pos: the next byte to parse.
  local text, pos, eof = f:read(CHUNK) or "", 1, false
  if text:sub(1, 3) == "\239\187\191" then text = text:sub(4) end -- a UTF-8 BOM
  local line, col0 = 1, 1 -- col0: position in text where the current line starts

  -- Reads another chunk onto the buffer; false at the end of the file.
  -- Positions stay valid: the consumed part is dropped only between
  -- records (see record), so the buffer holds about one chunk and a record.
  local function more()
    if eof then return false end
    local c = f:read(CHUNK)
    if not c then
      eof = true
      f:close()
      return false
    end
    text = text .. c
    return true
  end
  -- Finds a plain string or a pattern from pos, reading on as needed.
  local function find(pat, plain)
    while true do
      local a = text:find(pat, pos, plain)
      if a then return a end
      if not more() then return nil end
    end
  end
  local function char_at(i)
    while i > #text do
      if not more() then return "" end
    end
    return text:sub(i, i)
  end

  local function fail(msg, at_line, at_col)
    error({ csv_error = ("%s: line %d, column %d: %s"):format(path, at_line, at_col, msg) }, 0)
  end

  if not delim then
    local nl = find("\n", true)
    delim = M.sniff(text:sub(1, nl or #text))
  end
  local unquoted_end = "[" .. (delim == "\t" and "\t" or delim) .. "\r\n]"

  -- The common case: a whole line in the buffer with no quote and no lone
  -- CR, valid UTF-8 (its CR LF ending dropped), consumed; nil otherwise
  -- (anything else, and a problem to report with its column, takes the
  -- field-by-field way in record).
  local function compact()
    if pos > CHUNK then
      text = text:sub(pos)
      col0 = col0 - pos + 1
      pos = 1
    end
  end
  local function plain_line()
    compact()
    local nl = text:find("\n", pos, true)
    if not nl then return nil end
    local stop = nl - 1
    if stop >= pos and text:byte(stop) == 13 then stop = stop - 1 end
    local s = text:sub(pos, stop)
    if s:find('["\r]') or not core.utf8_valid(s) then return nil end
    local start_line = line
    pos = nl + 1
    line = line + 1
    col0 = pos
    return s, start_line
  end
  local function split(s)
    local fields, i = {}, 1
    while true do
      local d = s:find(delim, i, true)
      if not d then
        fields[#fields + 1] = s:sub(i)
        return fields
      end
      fields[#fields + 1] = s:sub(i, d - 1)
      i = d + 1
    end
  end

  -- One record: a list of fields, or nil at the end of the file.
  local function record()
    local s, at = plain_line()
    if s then return split(s), at end
    if char_at(pos) == "" then return nil end
    local fields = {}
    local start_line = line
    while true do
      local field
      if char_at(pos) == '"' then
        local qline, qcol = line, pos - col0 + 1
        local buf = {}
        pos = pos + 1
        while true do
          local q = find('"', true)
          if not q then fail("unterminated quoted field", qline, qcol) end
          local chunk = text:sub(pos, q - 1)
          for _ in chunk:gmatch("\n") do line = line + 1 end
          local last_nl = chunk:match(".*()\n")
          if last_nl then col0 = pos + last_nl end
          buf[#buf + 1] = chunk
          if char_at(q + 1) == '"' then
            buf[#buf + 1] = '"'
            pos = q + 2
          else
            pos = q + 1
            break
          end
        end
        field = table.concat(buf)
        local c = char_at(pos)
        if c ~= delim and c ~= "\r" and c ~= "\n" and c ~= "" then
          fail("text after a closing quote", line, pos - col0 + 1)
        end
      else
        local e = find(unquoted_end) or #text + 1
        field = text:sub(pos, e - 1)
        local bad = field:find('"', 1, true)
        if bad then fail("quote inside an unquoted field", line, pos - col0 + bad) end
        pos = e
      end
      if not core.utf8_valid(field) then fail("field is not valid UTF-8", line, pos - col0 + 1) end
      fields[#fields + 1] = field
      local c = char_at(pos)
      if c == delim then
        pos = pos + 1
      else
        if c == "\r" and char_at(pos + 1) == "\n" then pos = pos + 2 elseif c ~= "" then pos = pos + 1 end
        line = line + 1
        col0 = pos
        return fields, start_line
      end
    end
  end

  local ok, h = pcall(record)
  if not ok then
    if not eof then f:close() end
    return nil, type(h) == "table" and h.csv_error or tostring(h)
  end
  local header = h
  if not header or #header == 0 then return nil, path .. ": the file has no header row" end
  local seen = {}
  for i, name in ipairs(header) do
    if name == "" then return nil, ("%s: line 1, column %d: empty column name"):format(path, i) end
    if seen[name] then return nil, ("%s: line 1: column '%s' appears twice"):format(path, name) end
    seen[name] = true
  end
  -- A plain line with as many fields as the header, the common case, is
  -- read in C (core.csv_plain) and, unless counting, made a row there.
  -- Other lines (quotes, line breaks in fields, the wrong number of fields,
  -- blank lines) take record's way, which also reports their errors.
  local n, csv_plain, csv_count = #header, core.csv_plain, core.csv_count
  local iter = function()
    while true do
      compact()
      -- counting passes over a run of plain lines; reading makes one a row
      local np, got
      if count_only then
        np, got = csv_count(text, pos, delim, n)
        if got == 0 then np = nil end
      else
        np, got = csv_plain(text, pos, delim, n, header)
      end
      if np then
        local at = line
        pos, line, col0 = np, line + (count_only and got or 1), np
        return got, at
      end
      local fields, at
      local s, sat = plain_line()
      if s then
        fields, at = s == "" and { "" } or split(s), sat
      else
        fields, at = record()
        if not fields then return nil end
      end
      if not (#fields == 1 and fields[1] == "") then -- blank lines are skipped
        if #fields ~= #header then
          fail(("%d fields where the header has %d"):format(#fields, #header), at, 1)
        end
        if count_only then return 1, at end
        local row = {}
        for i, name in ipairs(header) do row[name] = fields[i] end
        return row, at
      end
    end
  end
  return iter, header, delim
end

--- Reads the whole file once (streamed) to find any malformed row before a
-- message is sent, and counts the rows.
-- @tparam string path
-- @tparam[opt] table opts as for `rows`
-- @treturn[1] number rows
-- @treturn[1] table header names
-- @treturn[1] string the delimiter
-- @return[2] nil
-- @treturn[2] string the first problem, with line and column
function M.check(path, opts)
  local iter, header, delim = M._open(path, opts, true)
  if not iter then return nil, header end
  local count = 0
  local ok, err = pcall(function()
    while true do
      local k = iter()
      if not k then break end
      count = count + k
    end
  end)
  if not ok then return nil, type(err) == "table" and err.csv_error or tostring(err) end
  return count, header, delim
end

--- The column holding the address: `email` in any case (or `e-mail`,
-- `mail`, `email address`); nil and a hint naming the columns otherwise.
function M.email_column(header)
  for _, want in ipairs({ "email", "e-mail", "mail", "email address", "e-mail address" }) do
    for _, name in ipairs(header) do
      if name:lower():gsub("^%s+", ""):gsub("%s+$", "") == want then return name end
    end
  end
  return nil, ("no 'email' column (columns seen: %s)"):format(table.concat(header, ", "))
end

return M
