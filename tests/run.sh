#!/bin/sh
# Runs the C unit tests (cmocka) and the busted specs, then prints one
# summary line: "tests: N passed, N failed". Exits non-zero on any failure.
# Usage: tests/run.sh build/test_a build/test_b ...
passed=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT

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
LD_PRELOAD="${SP_PRELOAD:-}" busted -o TAP >"$out" 2>&1
rc=$?
grep -v '^ok ' "$out" || true
count "$out"
if [ $rc -ne 0 ] && ! grep -q '^not ok ' "$out"; then
    failed=$((failed + 1)) # busted itself failed (a spec file that did not load)
fi

echo "tests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
