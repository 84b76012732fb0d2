--- Mustache-style templates for personalised messages.
--
--     local template = require("smtppool.template")
--     local t = assert(template.compile("Hello {{name}}{{#items}}, {{.}}{{/items}}"))
--     t:render({ name = "Ann", items = { "a", "b" } })   --> "Hello Ann, a, b"
--
-- `{{name}}` inserts a value (HTML-escaped when rendering with
-- `escape = "html"`), `{{{raw}}}` inserts it as it is, `{{#s}}...{{/s}}`
-- repeats for each element of an array (or once for a true value or a
-- table), `{{^s}}...{{/s}}` renders when `s` is missing, false or empty,
-- `{{a.b.c}}` looks into nested tables, `{{.}}` is the current element.
-- Compiled templates are trees, never Lua code: a template cannot run
-- anything.
-- @module smtppool.template

local M = {}

local Template = {}
Template.__index = Template

-- Sections nest at most this deep: deeper is an error, not a stack
-- overflow (or a compile that never ends) on hostile input.
M.MAX_DEPTH = 100

--- Compiles a template.
-- @tparam string src
-- @treturn[1] table a template with `render`
-- @return[2] nil
-- @treturn[2] string what is wrong and on which line
function M.compile(src)
  if type(src) ~= "string" then error("template.compile: source must be a string", 2) end
  local root = { kind = "root", children = {} }
  local stack = { root }
  local pos = 1
  -- Line numbers are counted as the scan moves forward, so compiling stays
  -- linear in the source length.
  local line, counted = 1, 0
  local function line_of(_, at)
    for _ in src:sub(counted + 1, at):gmatch("\n") do line = line + 1 end
    counted = math.max(counted, at)
    return line
  end
  while true do
    local s, e, triple = src:find("{{({?)", pos)
    local top = stack[#stack]
    if not s then
      if pos <= #src then top.children[#top.children + 1] = { kind = "text", text = src:sub(pos) } end
      break
    end
    if s > pos then top.children[#top.children + 1] = { kind = "text", text = src:sub(pos, s - 1) } end
    local close = triple == "{" and "}}}" or "}}"
    local cs, ce = src:find(close, e + 1, true)
    if not cs then return nil, ("unclosed tag at line %d"):format(line_of(src, s)) end
    local tag = src:sub(e + 1, cs - 1):match("^%s*(.-)%s*$")
    local sigil, name = tag:match("^([#^/!]?)%s*(.*)$")
    if triple == "{" then sigil = "{" end
    if sigil ~= "!" and not name:match("^[%w_.%-]+$") then
      return nil, ("bad tag '{{%s}}' at line %d"):format(tag, line_of(src, s))
    end
    if sigil == "#" or sigil == "^" then
      local node = { kind = sigil == "#" and "section" or "inverted", name = name, children = {},
                     line = line_of(src, s) }
      top.children[#top.children + 1] = node
      if #stack > M.MAX_DEPTH then
        return nil, ("sections nest deeper than %d at line %d"):format(M.MAX_DEPTH, node.line)
      end
      stack[#stack + 1] = node
    elseif sigil == "/" then
      if top.kind == "root" or top.name ~= name then
        return nil, ("'{{/%s}}' at line %d closes nothing open%s"):format(name, line_of(src, s),
          top.kind ~= "root" and (" (open: '" .. top.name .. "')") or "")
      end
      stack[#stack] = nil
    elseif sigil ~= "!" then
      top.children[#top.children + 1] = { kind = sigil == "{" and "raw" or "var", name = name,
                                          line = line_of(src, s) }
    end
    pos = ce + 1
  end
  if #stack > 1 then
    local open = stack[#stack]
    return nil, ("section '{{#%s}}' opened at line %d is never closed"):format(open.name, open.line)
  end
  return setmetatable({ root = root, source = src }, Template)
end

local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

local function lookup(ctx, name)
  if name == "." then return ctx[#ctx], true end
  local first, rest = name:match("^([^.]+)(.*)$")
  for i = #ctx, 1, -1 do
    local c = ctx[i]
    if type(c) == "table" and c[first] ~= nil then
      local v = c[first]
      for part in rest:gmatch("%.([^.]+)") do
        if type(v) ~= "table" then return nil, false end
        v = v[part]
      end
      return v, v ~= nil
    end
  end
  return nil, false
end

local function truthy(v)
  if v == nil or v == false or v == "" then return false end
  if type(v) == "table" and next(v) == nil then return false end
  return true
end

local function render(node, ctx, out, opts)
  for _, n in ipairs(node.children) do
    if n.kind == "text" then
      out[#out + 1] = n.text
    elseif n.kind == "var" or n.kind == "raw" then
      local v, found = lookup(ctx, n.name)
      if not found and opts.strict then
        error({ missing = n.name, line = n.line }, 0)
      end
      if v ~= nil then
        v = tostring(v)
        if n.kind == "var" and opts.escape == "html" then v = v:gsub("[&<>\"']", ESC) end
        out[#out + 1] = v
      end
    elseif n.kind == "section" then
      local v, found = lookup(ctx, n.name)
      if not found and opts.strict then error({ missing = n.name, line = n.line }, 0) end
      if truthy(v) then
        if type(v) == "table" and v[1] ~= nil then
          for _, item in ipairs(v) do
            ctx[#ctx + 1] = item
            render(n, ctx, out, opts)
            ctx[#ctx] = nil
          end
        else
          ctx[#ctx + 1] = type(v) == "table" and v or ctx[#ctx]
          render(n, ctx, out, opts)
          ctx[#ctx] = nil
        end
      end
    elseif n.kind == "inverted" then
      if not truthy((lookup(ctx, n.name))) then render(n, ctx, out, opts) end
    end
  end
end

--- Renders with the given variables.
-- @tparam table vars
-- @tparam[opt] table opts `escape = "html"` to HTML-escape `{{name}}`
--   values; `strict = true` (the default) makes a missing variable an error
-- @treturn[1] string
-- @return[2] nil
-- @treturn[2] string the missing variable and its line
function Template:render(vars, opts)
  opts = opts or {}
  local o = { escape = opts.escape, strict = opts.strict ~= false }
  local out = {}
  local ok, err = pcall(render, self.root, { vars or {} }, out, o)
  if not ok then
    if type(err) == "table" then
      return nil, ("missing variable '%s' at line %d"):format(err.missing, err.line)
    end
    error(err, 0)
  end
  return table.concat(out)
end

--- Renders the templated fields of a message for one recipient.
-- `subject`, `text`, `html` (HTML-escaped) and `from` may be template
-- sources or compiled templates; other fields are copied. With
-- `opts.renderer = function(source, vars, field) -> string | nil, err`
-- another template engine does the work.
-- @tparam table msg the message with templates
-- @tparam table vars the recipient's variables
-- @tparam[opt] table opts `renderer`, `strict`
-- @treturn[1] table a message for `pool:send`
-- @return[2] nil
-- @treturn[2] string which field failed and why
function M.render_message(msg, vars, opts)
  opts = opts or {}
  local out = {}
  for k, v in pairs(msg) do out[k] = v end
  for _, f in ipairs({ "from", "subject", "text", "html" }) do
    local src = msg[f]
    if src ~= nil then
      local s, err
      if opts.renderer then
        s, err = opts.renderer(type(src) == "table" and src.source or src, vars, f)
      else
        local t = src
        if type(t) == "string" then
          t, err = M.compile(t)
        end
        if t then s, err = t:render(vars, { escape = f == "html" and "html" or nil, strict = opts.strict }) end
      end
      if s == nil then return nil, f .. ": " .. tostring(err) end
      out[f] = s
    end
  end
  return out
end

return M
