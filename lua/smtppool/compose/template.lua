--- Mustache-style templates for personalised messages.
--
--     local template = require("smtppool.compose.template")
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
-- @api smtppool.compose.template

local core = require("smtppool.core")

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
      local node = M._path({ kind = sigil == "#" and "section" or "inverted", name = name, children = {},
                             line = line_of(src, s) })
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
      top.children[#top.children + 1] = M._path({ kind = sigil == "{" and "raw" or "var", name = name,
                                                  line = line_of(src, s) })
    end
    pos = ce + 1
  end
  if #stack > 1 then
    local open = stack[#stack]
    return nil, ("section '{{#%s}}' opened at line %d is never closed"):format(open.name, open.line)
  end
  -- A template of text and plain names only (no section, no dotted path,
  -- no `{{.}}`), the common case, also keeps a flat list for the fast
  -- render: its text pieces as strings, its names as their nodes.
  local flat = {}
  for i, n in ipairs(root.children) do
    if n.kind == "text" then
      flat[i] = n.text
    elseif (n.kind == "var" or n.kind == "raw") and not n.parts and n.name ~= "." then
      flat[i] = n
    else
      flat = nil
      break
    end
  end
  local fast, text
  if flat then fast, text = M._fast(flat) end
  return setmetatable({ root = root, source = src, flat = flat, fast = fast, text = text }, Template)
end

local ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;", ["'"] = "&#39;" }

-- A name's lookup path, split once at compile time: `first` is looked up
-- in the context stack, then each of `parts` in turn.
function M._path(node)
  local name = node.name
  node.first = name:match("^([^.]+)")
  if name:find(".", 1, true) and name ~= "." then
    local parts = {}
    for part in name:match("^[^.]*(.*)$"):gmatch("%.([^.]+)") do parts[#parts + 1] = part end
    if #parts > 0 then node.parts = parts end
  end
  return node
end

-- One name's value in a flat template: a string, or nil and the error.
local function value(vars, p, html, strict)
  local v = vars[p.first]
  if type(v) ~= "string" then
    if v == nil then
      if strict then return nil, ("missing variable '%s' at line %d"):format(p.name, p.line) end
      return ""
    end
    v = tostring(v)
  end
  if html and p.kind == "var" and v:find("[&<>\"']") then v = v:gsub("[&<>\"']", ESC) end
  return v
end

-- A flat template of up to three names renders by one concatenation,
-- without a table of pieces: `fast(vars, html, strict)`. Rows of a campaign
-- render their subject and text this way. Nil for a longer template (the
-- flat loop of render_string serves it). A template without names also
-- gives its text, second.
function M._fast(flat)
  -- as text, name, text, name, ..., text (empty texts where names touch)
  local t, names = { "" }, {}
  for i = 1, #flat do
    local p = flat[i]
    if type(p) == "string" then
      t[#t] = t[#t] .. p
    else
      names[#names + 1] = p
      t[#t + 1] = ""
    end
  end
  local t0, t1, t2, t3 = t[1], t[2], t[3], t[4]
  local n1, n2, n3 = names[1], names[2], names[3]
  -- a name's value taken as it is when it is a string and nothing is
  -- escaped (a row's columns always are); value() does the rest
  local k1, k2, k3 = n1 and n1.first, n2 and n2.first, n3 and n3.first
  if #names == 0 then
    return function() return t0 end, t0
  elseif #names == 1 then
    return function(vars, html, strict)
      local a = vars[k1]
      if html or type(a) ~= "string" then
        local e
        a, e = value(vars, n1, html, strict)
        if not a then return nil, e end
      end
      return t0 .. a .. t1
    end
  elseif #names == 2 then
    return function(vars, html, strict)
      local a, e = vars[k1], nil
      if html or type(a) ~= "string" then
        a, e = value(vars, n1, html, strict)
        if not a then return nil, e end
      end
      local b = vars[k2]
      if html or type(b) ~= "string" then
        b, e = value(vars, n2, html, strict)
        if not b then return nil, e end
      end
      return t0 .. a .. t1 .. b .. t2
    end
  elseif #names == 3 then
    return function(vars, html, strict)
      local a, e = vars[k1], nil
      if html or type(a) ~= "string" then
        a, e = value(vars, n1, html, strict)
        if not a then return nil, e end
      end
      local b = vars[k2]
      if html or type(b) ~= "string" then
        b, e = value(vars, n2, html, strict)
        if not b then return nil, e end
      end
      local c = vars[k3]
      if html or type(c) ~= "string" then
        c, e = value(vars, n3, html, strict)
        if not c then return nil, e end
      end
      return t0 .. a .. t1 .. b .. t2 .. c .. t3
    end
  end
end

local function lookup(ctx, n)
  if n.name == "." then return ctx[#ctx], true end
  local first = n.first
  if first == nil then return nil, false end
  for i = #ctx, 1, -1 do
    local c = ctx[i]
    if type(c) == "table" then
      local v = c[first]
      if v ~= nil then
        local parts = n.parts
        if parts then
          for k = 1, #parts do
            if type(v) ~= "table" then return nil, false end
            v = v[parts[k]]
          end
        end
        return v, v ~= nil
      end
    end
  end
  return nil, false
end

local function truthy(v)
  if v == nil or v == false or v == "" then return false end
  if type(v) == "table" and next(v) == nil then return false end
  return true
end

-- Appends node's output to out; returns the node of a missing variable
-- when strict (nothing is raised: rendering a row is on the hot path).
local function render(node, ctx, out, html, strict)
  local children = node.children
  for i = 1, #children do
    local n = children[i]
    local kind = n.kind
    if kind == "text" then
      out[#out + 1] = n.text
    elseif kind == "var" or kind == "raw" then
      local v, found = lookup(ctx, n)
      if not found and strict then return n end
      if v ~= nil then
        if type(v) ~= "string" then v = tostring(v) end
        if html and kind == "var" then v = v:gsub("[&<>\"']", ESC) end
        out[#out + 1] = v
      end
    elseif kind == "section" then
      local v, found = lookup(ctx, n)
      if not found and strict then return n end
      if truthy(v) then
        if type(v) == "table" and v[1] ~= nil then
          for _, item in ipairs(v) do
            ctx[#ctx + 1] = item
            local miss = render(n, ctx, out, html, strict)
            ctx[#ctx] = nil
            if miss then return miss end
          end
        else
          ctx[#ctx + 1] = type(v) == "table" and v or ctx[#ctx]
          local miss = render(n, ctx, out, html, strict)
          ctx[#ctx] = nil
          if miss then return miss end
        end
      end
    elseif kind == "inverted" then
      if not truthy((lookup(ctx, n))) then
        local miss = render(n, ctx, out, html, strict)
        if miss then return miss end
      end
    end
  end
end

local function render_string(t, vars, html, strict)
  local flat = t.flat
  if flat and type(vars) == "table" then
    local fast = t.fast
    if fast then return fast(vars, html, strict) end
    -- the same as render below for a flat template, without its context stack
    local out = {}
    for i = 1, #flat do
      local p = flat[i]
      if type(p) == "string" then
        out[i] = p
      else
        local v, e = value(vars, p, html, strict)
        if not v then return nil, e end
        out[i] = v
      end
    end
    return table.concat(out)
  end
  local out = {}
  local miss = render(t.root, { vars or {} }, out, html, strict)
  if miss then return nil, ("missing variable '%s' at line %d"):format(miss.name, miss.line) end
  return table.concat(out)
end

--- Renders with the given variables.
-- @tparam table vars
-- @tparam[opt] table opts `escape = "html"` to HTML-escape `{{name}}`
--   values; `strict = true` (the default) makes a missing variable an error
-- @treturn[1] string
-- @return[2] nil
-- @treturn[2] string the missing variable and its line
function Template:render(vars, opts)
  return render_string(self, vars, opts and opts.escape == "html", not (opts and opts.strict == false))
end

--- The message fields that are templates, in one list for every user
-- (`render_message`, campaigns, the command line): `from`, `subject`,
-- `text`, `html` (its values HTML-escaped) and `list_unsubscribe`.
M.FIELDS = { "from", "subject", "text", "html", "list_unsubscribe" }
local FIELDS = M.FIELDS

--- Compiles the templated fields of a message once, for many recipients.
-- The fields of `FIELDS` may be template sources or compiled templates;
-- other fields are copied. A field without names is rendered once, here.
-- When every other field is text and plain names (no section, no dotted
-- name), `render` is one C function for the lot (the common case: a
-- campaign's rows), with the same results and errors as the Lua renderer,
-- which it hands anything else to.
-- With `opts.renderer = function(source, vars, field) -> string | nil, err`
-- another template engine does the work.
-- @tparam table msg the message with templates
-- @tparam[opt] table opts `renderer`, `strict`
-- @treturn[1] function `render(vars)`: a message for `pool:send`, or nil,
--   which field failed and why, the field, and the bare reason
-- @return[2] nil
-- @treturn[2] string which field does not compile and why
function M.compile_message(msg, opts)
  local renderer = opts and opts.renderer
  local strict = not (opts and opts.strict == false)
  local fixed, fields, temps = {}, {}, {}
  for k, v in pairs(msg) do fixed[k] = v end
  for i = 1, #FIELDS do
    local f = FIELDS[i]
    local t = msg[f]
    if t ~= nil then
      if renderer then
        t = type(t) == "table" and t.source or t
      elseif type(t) == "string" then
        local err
        t, err = M.compile(t)
        if not t then return nil, f .. ": " .. tostring(err) end
      elseif getmetatable(t) ~= Template then
        return nil, ("%s: a template is a string or a compiled template, not a %s"):format(f, type(t))
      end
      if not renderer and t.text then -- text alone
        fixed[f] = t.text
      else
        fixed[f] = nil
        fields[#fields + 1], temps[#temps + 1] = f, t
      end
    end
  end
  local n = #fields
  -- per call: the fixed fields copied from arrays, and a flat template's
  -- fast function called directly (render_string would only pick it)
  local fixed_k, fixed_v = {}, {}
  for k, v in pairs(fixed) do fixed_k[#fixed_k + 1], fixed_v[#fixed_v + 1] = k, v end
  local nfixed = #fixed_k
  local html, fast = {}, {}
  for i = 1, n do
    html[i] = fields[i] == "html"
    fast[i] = not renderer and temps[i].fast or false
  end
  local function render_lua(vars)
    -- A constructor's fields size the table's hash part, nil values
    -- included: room for a message's usual fields at once, where an empty
    -- table filled field by field would be reallocated three times.
    local out = { from = nil, to = nil, subject = nil, text = nil, html = nil }
    for i = 1, nfixed do out[fixed_k[i]] = fixed_v[i] end
    local flat = type(vars) == "table"
    for i = 1, n do
      local f = fields[i]
      local s, err
      if flat and fast[i] then
        s, err = fast[i](vars, html[i], strict)
      elseif renderer then
        s, err = renderer(temps[i], vars, f)
      else
        s, err = render_string(temps[i], vars, html[i], strict)
      end
      if s == nil then return nil, f .. ": " .. tostring(err), f, err end
      out[f] = s
    end
    return out
  end
  if renderer then return render_lua end
  -- Every field flat (text and plain names): one C call renders them all
  -- (core.template_plan), handing what it does not serve (a missing name,
  -- a value that is not a string or a number, one an html field escapes)
  -- to render_lua, whose results and errors it keeps.
  local plan = { general = render_lua, fixed = {}, fields = {} }
  for i = 1, nfixed do
    plan.fixed[2 * i - 1], plan.fixed[2 * i] = fixed_k[i], fixed_v[i]
  end
  for i = 1, n do
    local flat = temps[i].flat
    if not flat then return render_lua end
    local pieces = {}
    for k, p in ipairs(flat) do
      pieces[k] = type(p) == "string" and p or { p.first, p.kind == "raw" }
    end
    plan.fields[i] = { name = fields[i], html = html[i], pieces = pieces }
  end
  return core.template_plan(plan)
end

--- Renders the templated fields of a message for one recipient
-- (`compile_message(msg, opts)` once, then its function for each).
-- @tparam table msg the message with templates
-- @tparam table vars the recipient's variables
-- @tparam[opt] table opts `renderer`, `strict`
-- @treturn[1] table a message for `pool:send`
-- @return[2] nil
-- @treturn[2] string which field failed and why
function M.render_message(msg, vars, opts)
  local render, err = M.compile_message(msg, opts)
  if not render then return nil, err end
  local m, e = render(vars)
  return m, e
end

return M
