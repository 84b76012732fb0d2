--- Error values: one constructor for every layer.
--
-- An error is a table with `kind` (`transient`, `permanent`, `connection`,
-- `ambiguous`, `protocol`, `tls`, `auth`, `invalid`, `config`, `cancelled`
-- (never sent: a stopped run, an exiting nginx worker), `busy` (nginx: the
-- agent's queue is full)), `text`, and
-- when known `phase`, `code`, `enhanced`, `attempts`, `recipients`; it prints
-- as one line with `tostring`. The C core makes its errors with the same
-- metatable, so `is_error` holds for both.
-- @api smtppool.errors

local core = require("smtppool.core")

local M = { mt = core.error_mt }

--- Makes an error value.
-- @tparam string kind
-- @tparam string text what went wrong, for a human
-- @tparam[opt] table fields more fields (`phase`, `code`, `enhanced`...),
--   copied first: `kind` and `text` win over theirs
-- @treturn table the error value
function M.new(kind, text, fields)
  local e = {}
  if fields then
    for k, v in pairs(fields) do e[k] = v end
  end
  e.kind, e.text = kind, text
  return setmetatable(e, M.mt)
end

--- The same error with a note added to its text (a copy; the original stays).
function M.annotate(err, note)
  return M.new(err.kind, err.text .. " (" .. note .. ")", err)
end

--- True when `v` is an error value.
function M.is_error(v)
  return type(v) == "table" and getmetatable(v) == M.mt
end

--- An `invalid` error (bad input from the caller; nothing was sent).
function M.invalid(text, field)
  return M.new("invalid", text, { field = field, attempts = 0 })
end

return M
