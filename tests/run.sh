#!/bin/sh
# Runs the C unit tests (cmocka) and the busted specs, then prints one
# summary line: "tests: N passed, N failed". Exits non-zero on any failure.
# Usage: [SP_JIT_HOST=build/jit_host] tests/run.sh build/test_a build/test_b ...
passed=0
failed=0
out=$(mktemp)
# Every folder the specs make goes in here, removed however the run ends.
# exim drops to its own user: the folder must be traversable by it.
SP_TEST_TMP=$(mktemp -d /tmp/smtppool-run.XXXXXX)
chmod 755 "$SP_TEST_TMP"
export SP_TEST_TMP
trap 'rm -f "$out"; rm -rf "$SP_TEST_TMP"' EXIT

count() { # $1: TAP file; adds its ok / not ok lines to the totals
    p=$(grep -c '^ok ' "$1")
    f=$(grep -c '^not ok ' "$1")
    passed=$((passed + p))
    failed=$((failed + f))
}

for t in "$@"; do
    echo "== $t"
    if ! CMOCKA_MESSAGE_OUTPUT=TAP "$t" >"$out" 2>&1; then
        # a crash or an abort counts as a failure even without a "not ok" line
        grep -q '^not ok ' "$out" || failed=$((failed + 1))
    fi
    grep -v '^ok ' "$out" | grep -v '^#' | grep -v '^1\.\.' || true
    count "$out"
done

echo "== busted"
# SP_PRELOAD: sanitizer runtimes for `make sanitize` (lua5.4 is not instrumented)
# busted is started through the interpreter by name: its #! line says `lua`,
# which is whatever /usr/bin/lua points to (LuaRocks installs lua5.1 with a
# higher priority).
LD_PRELOAD="${SP_PRELOAD:-}" lua5.4 /usr/bin/busted -o TAP >"$out" 2>&1
rc=$?
grep -v '^ok ' "$out" || true
count "$out"
if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$out"; then
    failed=$((failed + 1)) # busted itself failed (a spec file that did not load)
fi

# The same specs under LuaJIT (OpenResty's interpreter), with the LuaJIT build
# of the binding; the nginx, CLI, rockspec and install specs run their own
# interpreters already, and the outbox's Lua runs under LuaJIT in
# ngx_outbox_spec (its native spec, a minute of waiting on workers, runs once).
if [ -n "${SP_JIT_HOST:-}" ]; then
    echo "== busted under LuaJIT"
    jit_specs=$(ls tests/spec/*_spec.lua | grep -v -e ngx_spec -e ngx_outbox_spec -e outbox_spec -e cli_spec -e rockspec_spec -e install_spec -e readme_spec)
    # shellcheck disable=SC2086
    "$SP_JIT_HOST" /usr/bin/busted --cpath="build/luajit/?.so" -o TAP $jit_specs >"$out" 2>&1
    rc=$?
    grep -v '^ok ' "$out" | sed 's/^not ok /not ok (LuaJIT) /' || true
    count "$out"
    if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$out"; then
        failed=$((failed + 1))
    fi
fi

echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
