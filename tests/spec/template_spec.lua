local template = require("smtppool.compose.template")
local message = require("smtppool.compose.message")

local function render(src, vars, opts)
  local t = assert(template.compile(src))
  return t:render(vars, opts)
end

describe("templates", function()
  it("inserts, escapes and keeps raw values", function()
    assert.equal("Hi Ann &amp; &lt;Bob&gt;", render("Hi {{name}}", { name = "Ann & <Bob>" }, { escape = "html" }))
    assert.equal("Hi Ann & <Bob>", render("Hi {{name}}", { name = "Ann & <Bob>" }))
    assert.equal("<b>x</b>", render("{{{html}}}", { html = "<b>x</b>" }, { escape = "html" }))
  end)

  it("loops over lists, renders inverted sections and dotted names", function()
    local src = "{{#items}}[{{name}}:{{user.city}}]{{/items}}{{^items}}none{{/items}}"
    assert.equal("[a:Oslo][b:Oslo]", render(src, { user = { city = "Oslo" }, items = { { name = "a" }, { name = "b" } } }))
    assert.equal("none", render(src, { items = {} }))
    assert.equal("1,2,", render("{{#xs}}{{.}},{{/xs}}", { xs = { 1, 2 } }))
    assert.equal("yes", render("{{#ok}}yes{{/ok}}", { ok = true }))
  end)

  it("makes a missing variable an error in strict mode (the default)", function()
    local t = assert(template.compile("line one\nHello {{nmae}}"))
    local s, err = t:render({ name = "x" })
    assert.is_nil(s)
    assert.equal("missing variable 'nmae' at line 2", err)
    assert.equal("Hello ", t:render({}, { strict = false }):sub(-6))
  end)

  it("reports broken templates with their line", function()
    local t, err = template.compile("a\n{{#open}}b")
    assert.is_nil(t)
    assert.matches("opened at line 2 is never closed", err)
    t, err = template.compile("{{/x}}")
    assert.is_nil(t)
    assert.matches("closes nothing", err)
    t, err = template.compile("{{name")
    assert.matches("unclosed tag at line 1", err)
    t, err = template.compile("{{a b}}")
    assert.matches("bad tag", err)
  end)

  it("renders a message per recipient, HTML-escaping only the html part", function()
    local tpl = { from = "News <n@x.test>", to = "{{email}}", subject = "Hi {{name}}", text = "Dear {{name}}",
                  html = "<p>Dear {{name}}</p>" }
    local m = assert(template.render_message(tpl, { name = "<Ann>", email = "a@y.test" }))
    assert.equal("Hi <Ann>", m.subject)
    assert.equal("<p>Dear &lt;Ann&gt;</p>", m.html)
    m.to = "a@y.test"
    assert.truthy(message.compose(m))
    local _, err = template.render_message(tpl, {})
    assert.matches("^subject: missing variable 'name'", err)
  end)

  it("takes another renderer", function()
    local m = assert(template.render_message({ subject = "S", text = "T" }, { x = 1 }, {
      renderer = function(src, vars, field) return field .. ":" .. src .. vars.x end }))
    assert.equal("subject:S1", m.subject)
    assert.equal("text:T1", m.text)
  end)

  it("renders a template of text and names by its fast way exactly as by the tree", function()
    math.randomseed(7)
    local pieces = { "Hi ", "{{name}}", "{{{name}}}", "{{city}}", "{{missing}}", "<&>", "{{n}}", "{{f}}",
                     "{{! note }}", "\n", "{{ name }}", "{{..}}", "" }
    local vars = { name = "<Ann & \"Bo\">", city = "O'Hare", n = 42, f = false }
    for _ = 1, 500 do
      local src = {}
      for i = 1, math.random(0, 6) do src[i] = pieces[math.random(#pieces)] end
      src = table.concat(src)
      local t = assert(template.compile(src))
      assert.truthy(t.flat, src)
      local tree = setmetatable({ root = t.root, source = src }, getmetatable(t))
      for _, opts in ipairs({ {}, { escape = "html" }, { strict = false }, { escape = "html", strict = false } }) do
        local a, ae = t:render(vars, opts)
        local b, be = tree:render(vars, opts)
        assert.equal(b, a, src)
        assert.equal(be, ae, src)
      end
    end
    -- sections, dotted names and {{.}} keep the tree
    for _, src in ipairs({ "{{#a}}x{{/a}}", "{{a.b}}", "{{.}}", "{{^a}}y{{/a}}" }) do
      assert.is_nil(assert(template.compile(src)).flat, src)
    end
  end)

  it("compiles a message once: text-only fields fixed, the rest rendered per recipient", function()
    local render = assert(template.compile_message({ from = "news@x.test", subject = "Hi {{name}}",
      text = template.compile("{{a}}{{b}}{{c}}{{d}}"), html = "<p>{{name}}</p>", headers = { X = "1" } }))
    local m = assert(render({ name = "<Ann>", a = 1, b = 2, c = 3, d = 4 }))
    assert.same({ from = "news@x.test", subject = "Hi <Ann>", text = "1234", html = "<p>&lt;Ann&gt;</p>",
                  headers = { X = "1" } }, m)
    assert.are_not.equal(m, render({ name = "B", a = 1, b = 2, c = 3, d = 4 })) -- a new table each time
    -- a missing column: the field, the message, the bare reason
    local none, e, field, why = render({ a = 1, b = 2, c = 3, d = 4 })
    assert.is_nil(none)
    assert.equal("subject", field)
    assert.equal("missing variable 'name' at line 1", why)
    assert.equal("subject: " .. why, e)
    -- not a template at all, or one that does not compile
    local bad, be = template.compile_message({ subject = 42 })
    assert.is_nil(bad)
    assert.matches("subject: a template is a string or a compiled template, not a number", be, 1, true)
    assert.matches("^text: unclosed tag", select(2, template.compile_message({ text = "{{x" })))
  end)

  it("renders a compiled message in one C call exactly as each field renders alone", function()
    -- core.template_plan serves flat fields with string and number values,
    -- and hands everything else to the Lua renderer: either way a message's
    -- fields and errors are what Template:render gives for each field
    math.randomseed(11)
    local pieces = { "Hi ", "{{name}}", "{{{name}}}", "{{city}}", "{{missing}}", "<&>", "{{n}}", "{{x}}",
                     "\n", "{{ name }}", "", "{{{city}}}", "{{#s}}[{{.}}]{{/s}}", "{{t.u}}" }
    local values = { "Ann", "<Ann & \"Bo\">", "O'Hare", "", 42, 3.5, -0.0, 1e300, true, false, { 1 }, "\0\r\n" }
    local function pick(t) return t[math.random(#t)] end
    local function src()
      local out = {}
      for i = 1, math.random(0, 5) do out[i] = pick(pieces) end
      return table.concat(out)
    end
    for _ = 1, 400 do
      local msg = { from = "news@x.test", subject = src(), text = src(), html = src(), headers = { X = "1" } }
      local render = assert(template.compile_message(msg))
      for _ = 1, 4 do
        local vars = { name = pick(values), city = pick(values), n = pick(values), x = pick(values),
                       s = { "a", "b" }, t = { u = "v" } }
        if math.random(5) == 1 then vars.name = nil end
        if math.random(8) == 1 then vars = setmetatable({}, { __index = function(_, k) return "v" .. k end }) end
        local m, e, field, why = render(vars)
        local want, werr = { from = "news@x.test", headers = msg.headers }, nil
        for _, f in ipairs({ "subject", "text", "html" }) do
          local v, ve = assert(template.compile(msg[f])):render(vars, { escape = f == "html" and "html" or nil })
          if v == nil then
            werr = { f, ve }
            break
          end
          want[f] = v
        end
        if werr then
          assert.is_nil(m)
          assert.same(werr, { field, why })
          assert.equal(werr[1] .. ": " .. werr[2], e)
        else
          assert.same(want, m)
        end
      end
    end
    -- flat fields take the C plan; a section keeps the Lua renderer
    assert.equal("C", debug.getinfo(assert(template.compile_message({ subject = "{{a}} b" }))).what)
    assert.equal("Lua", debug.getinfo(assert(template.compile_message({ subject = "{{#a}}b{{/a}}" }))).what)
    -- not a table: the Lua renderer's answer
    local r = assert(template.compile_message({ subject = "{{a}}" }))
    assert.same({ nil, "subject: missing variable 'a' at line 1", "subject", "missing variable 'a' at line 1" },
      { r("nope") })
  end)
end)
