--- Message composition: addresses, headers and MIME structure.
--
-- `compose(msg)` turns a table into an RFC 5322 message and its envelope.
-- The encoders (base64, quoted-printable, RFC 2047 words, header folding)
-- are C (`smtppool.core`). Every address and header value is checked for
-- CR, LF and NUL before anything is built: no header or command injection.
-- @api smtppool.compose.message

local core = require("smtppool.core")

local M = {}

local invalid = require("smtppool.errors").invalid

local function has_ctl(s)
  return s:find("[\r\n%z]") ~= nil
end

-- ===== addresses =====

local ATEXT = "[%w!#$%%&'*+/=?^_`{|}~%-\128-\255]"

local function valid_local(l)
  if l:match("^\"(.*)\"$") then
    local q = l:sub(2, -2)
    return not q:find('[^\\]"') and not q:find("[%c]")
  end
  if l == "" or l:find("^%.") or l:find("%.$") or l:find("%.%.") then return false end
  return l:gsub(ATEXT, ""):gsub("%.", "") == ""
end

local function valid_domain(d)
  if d:match("^%[.+%]$") then return not d:find("[%s%c]") end
  if d == "" or #d > 253 then return false end
  for label in (d .. "."):gmatch("([^.]*)%.") do
    if label == "" or #label > 63 or label:find("^%-") or label:find("%-$") then return false end
    if label:gsub("[%w%-\128-\255]", "") ~= "" then return false end
  end
  return true
end

--- Checks an addr-spec (`local@domain`).
-- @treturn[1] string the address
-- @return[2] nil
-- @treturn[2] string why it is not valid
function M.check_address(a)
  if type(a) ~= "string" then return nil, "address must be a string" end
  if has_ctl(a) then return nil, "address contains CR, LF or NUL" end
  if #a > 254 then return nil, "address longer than 254 octets" end
  local l, d = a:match("^(.+)@([^@]+)$")
  if not l or not valid_local(l) or not valid_domain(d) then
    return nil, ("'%s' is not a valid address"):format(a)
  end
  if not core.utf8_valid(a) then return nil, "address is not valid UTF-8" end
  return a
end

--- Parses one RFC 5322 mailbox: `a@b`, `<a@b>`, `Name <a@b>` or
-- `"Quoted, Name" <a@b>`. Groups are refused.
-- @tparam string s
-- @treturn[1] table `{ name = display name or nil, address = "a@b" }`
-- @return[2] nil
-- @treturn[2] string why it cannot be used
function M.parse_mailbox(s)
  if type(s) ~= "string" then return nil, "mailbox must be a string" end
  if has_ctl(s) then return nil, "mailbox contains CR, LF or NUL" end
  local t = s:match("^%s*(.-)%s*$")
  if t:find("^[^\"<]*:.*;$") then return nil, "groups are not allowed here" end
  local name, addr = t:match("^(.-)%s*<([^<>]*)>$")
  if not name then
    if t:find("[<>]") then return nil, ("'%s' is not a valid mailbox"):format(s) end
    addr, name = t, ""
  end
  local q = name:match('^"(.*)"$')
  if q then
    name = q:gsub("\\(.)", "%1")
  elseif name:find('"') then
    return nil, ("unbalanced quotes in '%s'"):format(s)
  end
  local ok, why = M.check_address(addr)
  if not ok then return nil, why end
  if not core.utf8_valid(name) then return nil, "display name is not valid UTF-8" end
  return { name = name ~= "" and name or nil, address = addr }
end

-- A value for an error message: control bytes shown as \xNN, at most 80 bytes.
local function shown(s)
  if type(s) ~= "string" then return tostring(s) end
  local t = s:sub(1, 80):gsub("[%c\127\\\"]", function(c)
    if c == "\\" or c == '"' then return "\\" .. c end
    return ("\\x%02X"):format(c:byte())
  end)
  return '"' .. t .. (#s > 80 and '..."' or '"')
end

local function mailbox_list(v, field, allow_empty)
  if v == nil then return {} end
  local one = type(v) == "string"
  if one then v = { v } end
  if type(v) ~= "table" then
    return nil, invalid(("'%s' must be a string or an array of strings"):format(field), field)
  end
  local out = {}
  for i, s in ipairs(v) do
    local mb, why = M.parse_mailbox(s)
    if not mb then
      -- the address as given (its control bytes visible), and which one when there are several
      return nil, invalid(("'%s'%s %s: %s"):format(field, (one or #v == 1) and "" or (" entry " .. i), shown(s), why),
        field)
    end
    out[i] = mb
  end
  if #out == 0 and not allow_empty then return nil, invalid(("'%s' is empty"):format(field), field) end
  return out
end

local function format_mailbox(mb)
  if not mb.name then return mb.address end
  return core.phrase(mb.name) .. " <" .. mb.address .. ">"
end

-- ===== helpers =====

local function random_hex(n)
  local fast = core.random_hex(n) -- OpenSSL's generator, no file to open
  if fast then return fast end
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(n)
  if f then f:close() end
  if not bytes or #bytes < n then
    local t = {}
    for i = 1, n do t[i] = string.char(math.random(0, 255)) end
    bytes = table.concat(t)
  end
  return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end
M.random_hex = random_hex

local function format_date(t)
  local utc = os.date("!*t", t)
  local loc = os.date("*t", t)
  loc.isdst = false
  local off = os.difftime(os.time(loc), os.time(utc))
  local sign = off < 0 and "-" or "+"
  off = math.abs(off)
  return os.date("%a, %d %b %Y %H:%M:%S ", t) .. ("%s%02d%02d"):format(sign, math.floor(off / 3600),
    math.floor((off % 3600) / 60))
end

-- The date of the current second, kept: a campaign composes thousands of
-- messages a second.
local date_cache = { t = nil, s = nil }

local function rfc5322_date(t)
  t = t or os.time()
  if date_cache.t == t then return date_cache.s end
  local s = format_date(t)
  date_cache.t, date_cache.s = t, s
  return s
end

local TYPES = {
  txt = "text/plain", html = "text/html", htm = "text/html", csv = "text/csv", pdf = "application/pdf",
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", svg = "image/svg+xml",
  zip = "application/zip", json = "application/json", ics = "text/calendar", webp = "image/webp",
}

local function guess_type(name)
  local ext = name and name:match("%.([%w]+)$")
  return ext and TYPES[ext:lower()] or "application/octet-stream"
end

-- A MIME parameter: quoted, or RFC 2231 encoded when not ASCII.
local function param(name, value)
  if value:find("[\128-\255]") then
    return ("%s*=utf-8''%s"):format(name, (value:gsub("[^%w%-%._~]", function(c)
      return ("%%%02X"):format(c:byte())
    end)))
  end
  return ('%s="%s"'):format(name, (value:gsub('(["\\])', "\\%1")))
end

-- Body of a text part: 7bit when it is short-lined ASCII, else quoted-printable.
-- Whether every line of s is at most max octets (no copy of s is made).
-- A text part: 7bit with CRLF lines when it can be (core.text_7bit; text
-- already in CRLF lines is used as it is, no copy), else quoted-printable.
local function text_part(ctype, text)
  local body, needs_crlf = core.text_7bit(text)
  local cte = "7bit"
  if not body then
    body, cte = core.encode("qp", text), "quoted-printable"
  elseif needs_crlf then
    body = { body, "\r\n" }
  end
  return { headers = { "Content-Type: " .. ctype .. "; charset=utf-8\r\n",
                       "Content-Transfer-Encoding: " .. cte .. "\r\n" }, body = body }
end

local function attachment_part(a, i)
  if type(a) ~= "table" then return nil, invalid(("attachment %d must be a table"):format(i), "attachments") end
  local data = a.data
  local filename = a.filename or (type(a.path) == "string" and a.path:match("([^/]+)$")) or nil
  local body
  if data == nil then
    if type(a.path) ~= "string" then
      return nil, invalid(("attachment %d needs 'data' or 'path'"):format(i), "attachments")
    end
    -- Streamed from disk as it is sent: checked readable now, never loaded whole.
    local f, err = io.open(a.path, "rb")
    if not f then return nil, invalid(("attachment %d: %s"):format(i, err), "attachments") end
    f:close()
    body = { path = a.path }
  elseif type(data) ~= "string" then
    return nil, invalid(("attachment %d: 'data' must be a string"):format(i), "attachments")
  end
  for _, k in ipairs({ "filename", "content_type", "cid" }) do
    local v = k == "filename" and filename or a[k]
    if v ~= nil and (type(v) ~= "string" or has_ctl(v)) then
      return nil, invalid(("attachment %d: '%s' must be a string without CR, LF or NUL"):format(i, k), "attachments")
    end
  end
  local ctype = a.content_type or guess_type(filename)
  if not ctype:match("^[%w!#$&^_.+-]+/[%w!#$&^_.+-]+$") then
    return nil, invalid(("attachment %d: bad content type '%s'"):format(i, ctype), "attachments")
  end
  local h = { "Content-Type: " .. ctype .. (filename and ("; " .. param("name", filename)) or "") .. "\r\n",
              "Content-Transfer-Encoding: base64\r\n" }
  local disp = a.inline and "inline" or "attachment"
  h[#h + 1] = "Content-Disposition: " .. disp .. (filename and ("; " .. param("filename", filename)) or "") .. "\r\n"
  if a.cid then
    if a.cid:find("[<>%s]") then
      return nil, invalid(("attachment %d: cid must not hold <, > or spaces"):format(i), "attachments")
    end
    h[#h + 1] = "Content-ID: <" .. a.cid .. ">\r\n"
  end
  return { headers = h, body = body or core.encode("base64", data), inline = a.inline and a.cid ~= nil }
end

-- A multipart part holding the given parts.
local function multipart(subtype, parts, boundary)
  return { headers = { ('Content-Type: multipart/%s; boundary="%s"\r\n'):format(subtype, boundary) },
           parts = parts, boundary = boundary }
end

-- Part headers are built as "Name: value\r\n"; they go out folded.
local function fold(h)
  local name, value = h:match("^([^:]+): (.*)\r\n$")
  return assert(core.header(name, value, false))
end

local function render(part, out)
  for _, h in ipairs(part.headers) do out[#out + 1] = fold(h) end
  out[#out + 1] = "\r\n"
  if part.parts then
    for _, p in ipairs(part.parts) do
      out[#out + 1] = "--" .. part.boundary .. "\r\n"
      render(p, out)
    end
    out[#out + 1] = "--" .. part.boundary .. "--\r\n"
  elseif type(part.body) == "table" and part.body.path == nil then
    for _, piece in ipairs(part.body) do out[#out + 1] = piece end
  else
    out[#out + 1] = part.body
  end
end

--- The message as one string, files read and encoded: for tools and tests
-- (sending streams the segments instead).
-- @param data a string or the segments `compose` returns
function M.flatten(data)
  if type(data) == "string" then return data end
  local out = {}
  for i, seg in ipairs(data) do
    if type(seg) == "string" then
      out[i] = seg
    else
      local f = assert(io.open(seg.path, "rb"))
      out[i] = core.encode("base64", f:read("a"))
      f:close()
    end
  end
  return table.concat(out)
end

-- ===== compose =====

local FIELDS = {
  from = true, to = true, cc = true, bcc = true, reply_to = true, sender = true, subject = true,
  text = true, html = true, attachments = true, headers = true, message_id = true, date = true,
  list_unsubscribe = true, list_unsubscribe_post = true, mail_from = true, rcpt = true,
  dsn = true, -- used by the pool for MAIL/RCPT parameters, not in the text
  dkim = true, -- used by the pool: this message's signing keys, or false
  require_tls = true, -- used by the pool: REQUIRETLS (RFC 8689)
}
M.FIELDS = FIELDS

-- Header names set by the composer; the `headers` table may not repeat them.
local RESERVED = {
  ["from"] = true, ["to"] = true, ["cc"] = true, ["bcc"] = true, ["subject"] = true, ["date"] = true,
  ["message-id"] = true, ["mime-version"] = true, ["content-type"] = true, ["sender"] = true,
  ["content-transfer-encoding"] = true, ["reply-to"] = true,
}

local function add_header(out, name, value, encode)
  local h, why = core.header(name, value, encode)
  if not h then return nil, invalid(("header %s %s"):format(name, why), name) end
  out[#out + 1] = h
  return true
end

--- Composes a message into segments, the form the pool sends without
-- copying: the header block (to the blank line) as the first string, then
-- each body piece as it is (a text given in CRLF lines is the caller's own
-- string), files as `{path = file}`.
-- @tparam table msg `from` (required), `to`, `cc`, `bcc` (envelope only),
--   `reply_to`, `sender`, `subject`, `text`, `html`, `attachments` (each
--   `{path = ... | data = ..., filename, content_type, inline, cid}`),
--   `headers` (extra `{name = value}`), `message_id`, `date` (a string or
--   a time number), `list_unsubscribe` (a string of `<uri>`s) with
--   `list_unsubscribe_post = true` for RFC 8058 one-click, `mail_from` and
--   `rcpt` to override the envelope, `dsn` (see `Pool:send_raw`), `dkim`
--   (`false` to send this message unsigned, or its own DKIM configuration
--   as for the pool option).
-- @treturn[1] table the segments (see `flatten` for one string)
-- @treturn[1] table the envelope `{from = "a@b", to = {...}}`
-- @return[2] nil
-- @treturn[2] table error value (kind `invalid`)
function M.compose_segments(msg)
  for k in pairs(msg) do
    if not FIELDS[k] then return nil, invalid(("unknown message field '%s'"):format(tostring(k)), k) end
  end
  local from, e = mailbox_list(msg.from, "from")
  if not from then return nil, e end
  if #from ~= 1 then return nil, invalid("'from' must hold one mailbox", "from") end
  local lists = {}
  for _, f in ipairs({ "to", "cc", "bcc", "reply_to", "sender" }) do
    lists[f], e = mailbox_list(msg[f], f, true)
    if not lists[f] then return nil, e end
  end
  for _, f in ipairs({ "subject", "text", "html", "message_id", "list_unsubscribe" }) do
    local v = msg[f]
    if v ~= nil and type(v) ~= "string" then return nil, invalid(("'%s' must be a string"):format(f), f) end
    if v and (f == "text" or f == "html") and not core.utf8_valid(v) then
      return nil, invalid(("'%s' is not valid UTF-8"):format(f), f)
    end
  end
  if msg.subject and not core.utf8_valid(msg.subject) then return nil, invalid("'subject' is not valid UTF-8", "subject") end
  if msg.mail_from ~= nil and type(msg.mail_from) ~= "string" then
    return nil, invalid("'mail_from' must be a string", "mail_from")
  end
  if msg.require_tls ~= nil and type(msg.require_tls) ~= "boolean" then
    return nil, invalid("'require_tls' must be a boolean", "require_tls")
  end
  if msg.list_unsubscribe_post ~= nil and type(msg.list_unsubscribe_post) ~= "boolean" then
    return nil, invalid("'list_unsubscribe_post' must be a boolean", "list_unsubscribe_post")
  end

  local h = {}
  local failed -- the first header error
  local function put(name, value, encode)
    if not failed then
      local okh, he = add_header(h, name, value, encode)
      if not okh then failed = he end
    end
  end
  local date = msg.date
  if type(date) == "number" then
    -- os.date raises on NaN and on times it cannot represent: check first.
    if not (date >= 0 and date <= 253402300799) or date ~= math.floor(date) then
      return nil, invalid("'date' must be a whole number of seconds since 1970 (up to the year 9999)", "date")
    end
    date = rfc5322_date(date)
  elseif date ~= nil and (type(date) ~= "string" or not date:match("^[ -~]+$")) then
    return nil, invalid("'date' must be a time number or a string of printable ASCII", "date")
  end
  put("Date", date or rfc5322_date())
  put("From", format_mailbox(from[1]), false)
  if #lists.sender > 0 then put("Sender", format_mailbox(lists.sender[1]), false) end
  for _, f in ipairs({ { "reply_to", "Reply-To" }, { "to", "To" }, { "cc", "Cc" } }) do
    local l = lists[f[1]]
    if #l > 0 then
      local parts = {}
      for i, mb in ipairs(l) do parts[i] = format_mailbox(mb) end
      put(f[2], table.concat(parts, ", "), false)
    end
  end
  if msg.subject then put("Subject", msg.subject, true) end
  local domain = from[1].address:match("@(.+)$")
  local mid = msg.message_id or ("<%s@%s>"):format(random_hex(16), domain)
  if not mid:match("^<[^<>%s]+@[^<>%s]+>$") then
    return nil, invalid("message_id must look like <left@right>", "message_id")
  end
  put("Message-ID", mid, false)
  if msg.list_unsubscribe then
    put("List-Unsubscribe", msg.list_unsubscribe, false)
    if msg.list_unsubscribe_post then put("List-Unsubscribe-Post", "List-Unsubscribe=One-Click", false) end
  end
  if msg.headers ~= nil then
    if type(msg.headers) ~= "table" then return nil, invalid("'headers' must be a table", "headers") end
    local names = {}
    for name in pairs(msg.headers) do names[#names + 1] = name end
    table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
    for _, name in ipairs(names) do
      local v = msg.headers[name]
      if type(name) ~= "string" or not name:match("^[!-9;-~]+$") then
        return nil, invalid(("header name '%s' is not valid"):format(tostring(name)), "headers")
      end
      if RESERVED[name:lower()] then
        return nil, invalid(("header '%s' is set by its own field"):format(name), "headers")
      end
      if type(v) ~= "string" then return nil, invalid(("header '%s' must be a string"):format(name), "headers") end
      if not core.utf8_valid(v) then
        return nil, invalid(("header '%s' is not valid UTF-8"):format(name), "headers")
      end
      put(name, v, true)
    end
  end
  if failed then return nil, failed end
  h[#h + 1] = "MIME-Version: 1.0\r\n"

  -- The body tree.
  -- Base64 and quoted-printable never hold "=_"; a 7bit text part could, in
  -- theory, hold the boundary, so draw again until it does not.
  local boundary
  repeat
    boundary = "=_sp_" .. random_hex(12)
  until not ((msg.text or ""):find(boundary, 1, true) or (msg.html or ""):find(boundary, 1, true))
  local n = 0
  local function bnd()
    n = n + 1
    return boundary .. "_" .. n
  end
  local alt
  local textp = msg.text and text_part("text/plain", msg.text)
  local htmlp = msg.html and text_part("text/html", msg.html)
  if textp and htmlp then
    alt = multipart("alternative", { textp, htmlp }, bnd())
  else
    alt = textp or htmlp or text_part("text/plain", "")
  end
  local inline, attached = {}, {}
  if msg.attachments ~= nil then
    if type(msg.attachments) ~= "table" then return nil, invalid("'attachments' must be an array", "attachments") end
    for i, a in ipairs(msg.attachments) do
      local p, pe = attachment_part(a, i)
      if not p then return nil, pe end
      if p.inline then inline[#inline + 1] = p else attached[#attached + 1] = p end
    end
  end
  local root = alt
  if #inline > 0 then
    local parts = { alt }
    for _, p in ipairs(inline) do parts[#parts + 1] = p end
    root = multipart("related", parts, bnd())
  end
  if #attached > 0 then
    local parts = { root }
    for _, p in ipairs(attached) do parts[#parts + 1] = p end
    root = multipart("mixed", parts, bnd())
  end
  -- Segments: the header block (the message's headers and the root part's,
  -- to the blank line) as one string, then every piece as it is: bodies are
  -- never copied into a bigger string; files stay {path = file}.
  local out = {}
  render(root, out)
  local hdr_end = 1
  while out[hdr_end] ~= "\r\n" do hdr_end = hdr_end + 1 end
  for i = 1, hdr_end do h[#h + 1] = out[i] end
  local message = { table.concat(h) }
  for i = hdr_end + 1, #out do
    if out[i] ~= "" then message[#message + 1] = out[i] end
  end

  -- The envelope.
  local env_from = msg.mail_from or from[1].address
  if msg.mail_from ~= nil and env_from ~= "" then
    local okm, why = M.check_address(env_from)
    if not okm then return nil, invalid("mail_from: " .. why, "mail_from") end
  end
  local rcpt = {}
  if msg.rcpt ~= nil then
    local list = type(msg.rcpt) == "string" and { msg.rcpt } or msg.rcpt
    if type(list) ~= "table" then return nil, invalid("'rcpt' must be a string or an array", "rcpt") end
    for i, a in ipairs(list) do
      if type(a) ~= "string" then return nil, invalid(("rcpt %d must be a string"):format(i), "rcpt") end
      local okr, why = M.check_address(a)
      if not okr then return nil, invalid(("rcpt %d: %s"):format(i, why), "rcpt") end
      rcpt[#rcpt + 1] = a
    end
  else
    for _, f in ipairs({ "to", "cc", "bcc" }) do
      for _, mb in ipairs(lists[f]) do rcpt[#rcpt + 1] = mb.address end
    end
  end
  if #rcpt == 0 then return nil, invalid("no recipients (to, cc, bcc or rcpt)", "to") end
  return message, { from = env_from, to = rcpt }
end

--- Composes a message as text.
-- @tparam table msg the fields of `compose_segments`
-- @treturn[1] string the message (CRLF line ends), or when attachments
--   come from `path`, an array of strings and `{path = file}` segments that
--   the pool streams (see `flatten`)
-- @treturn[1] table the envelope `{from = "a@b", to = {...}}`
-- @return[2] nil
-- @treturn[2] table error value (kind `invalid`)
function M.compose(msg)
  local segs, env = M.compose_segments(msg)
  if not segs then return nil, env end
  -- Strings between files are joined; without files, one string.
  local out, run = {}, {}
  for _, seg in ipairs(segs) do
    if type(seg) == "table" then
      out[#out + 1] = table.concat(run)
      out[#out + 1] = seg
      run = {}
    else
      run[#run + 1] = seg
    end
  end
  if #out == 0 then return table.concat(run), env end
  out[#out + 1] = table.concat(run)
  return out, env
end

return M
