# smtppool: make deps | make | make test | make demo | make docs | make sanitize | make valgrind | make fuzz | make bench
LUA_VERSION ?= 5.4
LUA ?= lua$(LUA_VERSION)
PKGS = lua$(LUA_VERSION) openssl

CC ?= cc
OPT ?= -O2 -g
WARN = -Wall -Wextra -Werror
CFLAGS_ALL = -std=c11 -D_GNU_SOURCE -pthread $(OPT) $(WARN) -fPIC $(shell pkg-config --cflags $(PKGS)) $(CFLAGS)
LDLIBS_ALL = $(shell pkg-config --libs openssl libcares) $(LDLIBS)
# the binding alone also links SQLite (the campaign journal, src/store)
LDLIBS_STORE = $(shell pkg-config --libs sqlite3)
LDLIBS_CRYPTO = $(shell pkg-config --libs libcrypto) $(LDLIBS)
# the binding alone also links hiredis (its RESP reader, for shared limits in Redis)
LDLIBS_BIND = $(shell pkg-config --libs hiredis)

# The C in layers (ARCHITECTURE.md); each folder needs only the ones before it:
#   proto  the sans-IO protocol core: replies, capabilities, codecs, session (libcrypto)
#   mail   MIME, bodies, DKIM (libcrypto)
#   net    the native driver: sockets, TLS (libssl)
#   store  the campaign journal in SQLite (libc and SQLite only)
#   lua    the binding
PROTO_SRC = $(wildcard src/proto/*.c)
MAIL_SRC = $(wildcard src/mail/*.c)
NET_SRC = $(wildcard src/net/*.c)
STORE_SRC = $(wildcard src/store/*.c)
BIND_SRC = $(STORE_SRC) $(wildcard src/lua/*.c)
CORE_SRC = $(PROTO_SRC) $(MAIL_SRC) $(NET_SRC)
HDRS = $(wildcard src/*/*.h)
INC_PROTO = -Isrc/proto
INC_MAIL = $(INC_PROTO) -Isrc/mail
INC_ALL = $(INC_MAIL) -Isrc/net -Isrc/store -Isrc/lua
MODULE = $(BUILD)/lua5.4/smtppool/core.so
BUILD = build

CTESTS = $(patsubst tests/c/%.c,$(BUILD)/%,$(wildcard tests/c/test_*.c))

# Debian packages the project needs to build, test, document and demo.
DEB_PACKAGES = build-essential pkg-config lua5.4 liblua5.4-dev libssl-dev openssl \
	lua-busted lua-ldoc libcmocka-dev exim4-daemon-light python3 python3-aiosmtpd \
	lua-dkjson lua-argparse lua-discount valgrind clang libclang-rt-14-dev python3-dkim python3-nacl python3-cryptography \
	nginx libnginx-mod-http-lua libluajit2-5.1-dev redis-server libhiredis-dev luarocks libc-ares-dev \
	libsqlite3-dev sqlite3

PREFIX ?= /usr/local
LUA_LMOD = $(PREFIX)/share/lua/$(LUA_VERSION)
LUA_CMOD = $(PREFIX)/lib/lua/$(LUA_VERSION)

.PHONY: all deps test ctest spec demo docs sanitize valgrind clean install uninstall fuzz bench

all: $(MODULE)

$(MODULE): $(CORE_SRC) $(BIND_SRC) $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_ALL) $(INC_ALL) -shared -o $@ $(CORE_SRC) $(BIND_SRC) $(LDLIBS_ALL) $(LDLIBS_BIND) $(LDLIBS_STORE)

$(BUILD):
	mkdir -p $(BUILD)

# The same binding built for LuaJIT (the Lua 5.1 C API), as nginx's Lua module loads it.
LUAJIT_MODULE = $(BUILD)/luajit/smtppool/core.so
$(LUAJIT_MODULE): $(CORE_SRC) $(BIND_SRC) $(HDRS)
	mkdir -p $(dir $@)
	$(CC) -std=c11 -D_GNU_SOURCE -pthread $(OPT) $(WARN) -fPIC $(shell pkg-config --cflags luajit openssl) $(CFLAGS) \
	  $(INC_ALL) -shared -o $@ $(CORE_SRC) $(BIND_SRC) $(LDLIBS_ALL) $(LDLIBS_BIND) $(LDLIBS_STORE)

# The C tests link only the layers they test: the protocol core's without
# mail/ and net/ (and without libssl), the MIME tests without net/.
PROTO_TESTS = $(BUILD)/test_reply $(BUILD)/test_session $(BUILD)/test_codec
MAIL_TESTS = $(BUILD)/test_mime
$(PROTO_TESTS): $(BUILD)/test_%: tests/c/test_%.c $(PROTO_SRC) $(HDRS) | $(BUILD)
	$(CC) $(CFLAGS_ALL) $(INC_PROTO) -o $@ $< $(PROTO_SRC) $(LDLIBS_CRYPTO) -lcmocka
$(MAIL_TESTS): $(BUILD)/test_%: tests/c/test_%.c $(PROTO_SRC) $(MAIL_SRC) $(HDRS) | $(BUILD)
	$(CC) $(CFLAGS_ALL) $(INC_MAIL) -o $@ $< $(PROTO_SRC) $(MAIL_SRC) $(LDLIBS_CRYPTO) -lcmocka
# any other C test (the native driver's) links every layer
$(BUILD)/test_%: tests/c/test_%.c $(CORE_SRC) $(HDRS) | $(BUILD)
	$(CC) $(CFLAGS_ALL) $(INC_ALL) -o $@ $< $(CORE_SRC) $(LDLIBS_ALL) -lcmocka

# Installs every Debian package the project uses; idempotent.
deps:
	@# policy-rc.d (exit 101) keeps the packaged exim and nginx from starting
	@# during the install: the tests run their own, on ports they choose.
	@if dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then echo "deps: all Debian packages present"; \
	else export DEBIAN_FRONTEND=noninteractive; made=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; \
	    chmod 755 /usr/sbin/policy-rc.d; made=1; fi; \
	  apt-get update -q && apt-get install -y -q --no-install-recommends $(DEB_PACKAGES); rc=$$?; \
	  if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc; fi
	@# The packaged exim and nginx daemons are not needed: tests start their own.
	@-systemctl disable --now exim4 nginx redis-server >/dev/null 2>&1 || true
	@-service exim4 stop >/dev/null 2>&1; service nginx stop >/dev/null 2>&1; service redis-server stop >/dev/null 2>&1; true

ctest: $(CTESTS)

# A minimal LuaJIT interpreter linked with the LuaJIT nginx uses (Debian's
# luajit package conflicts with it): the specs run under both interpreters.
JIT_HOST = $(BUILD)/jit_host
$(JIT_HOST): tests/support/jit_host.c | $(BUILD)
	$(CC) -std=c11 -O2 $(WARN) $(shell pkg-config --cflags luajit) -o $@ $< $(shell pkg-config --libs luajit)

test: all ctest $(LUAJIT_MODULE) $(JIT_HOST)
	@SP_JIT_HOST=$(JIT_HOST) sh tests/run.sh $(CTESTS)

demo: all
	@$(LUA) examples/demo.lua $(N)

# LDoc runs under LuaJIT: Debian's Markdown formatter (lua-markdown) is Lua 5.1
# code (setfenv), and without it LDoc prints Markdown as plain text.
docs: $(JIT_HOST)
	$(JIT_HOST) /usr/bin/ldoc -q .

# The whole suite with the C built under AddressSanitizer and UBSan; lua5.4
# itself is not instrumented, so the runtimes are preloaded into it. (The
# LuaJIT pass of `make test` is left out: its binding stays plain, and child
# processes would load the instrumented module without the runtimes.)
SAN = -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
sanitize:
	$(MAKE) clean
	@# nginx cannot load an instrumented module: the LuaJIT build stays plain
	$(MAKE) $(LUAJIT_MODULE) $(JIT_HOST)
	$(MAKE) all ctest OPT="-O1 -g $(SAN)" LDLIBS="$(SAN)"
	SP_PRELOAD="$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0 sh tests/run.sh $(CTESTS)
	$(MAKE) clean

valgrind: $(CTESTS)
	@for t in $(CTESTS); do valgrind -q --error-exitcode=1 --leak-check=full $$t >/dev/null || exit 1; done
	@echo "valgrind: C tests clean"

# Both builds of the binding, where each interpreter looks: Lua 5.4 under
# share/lua/5.4 and lib/lua/5.4; LuaJIT (OpenResty) under share/lua/5.1 and
# lib/lua/5.1. `make uninstall` with the same PREFIX and DESTDIR removes
# exactly what `make install` put there.
JIT_LMOD = $(PREFIX)/share/lua/5.1
JIT_CMOD = $(PREFIX)/lib/lua/5.1
# every Lua module, by its path under lua/ (smtppool/engine/loop.lua ...),
# and the folders that hold them, deepest first for uninstall
LUA_FILES = $(patsubst lua/%,%,$(shell find lua/smtppool -name '*.lua' | sort))
LUA_DIRS = $(patsubst lua/%,%,$(shell find lua/smtppool -type d | sort -r))

install: all $(LUAJIT_MODULE)
	@for lmod in $(LUA_LMOD) $(JIT_LMOD); do \
	  for f in $(LUA_FILES); do \
	    install -D -m 644 lua/$$f $(DESTDIR)$$lmod/$$f || exit 1; \
	  done; \
	done
	install -d $(DESTDIR)$(LUA_CMOD)/smtppool $(DESTDIR)$(JIT_CMOD)/smtppool $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(MODULE) $(DESTDIR)$(LUA_CMOD)/smtppool/core.so
	install -m 755 $(LUAJIT_MODULE) $(DESTDIR)$(JIT_CMOD)/smtppool/core.so
	install -m 755 bin/smtppool $(DESTDIR)$(PREFIX)/bin/smtppool

uninstall:
	@for lmod in $(LUA_LMOD) $(JIT_LMOD); do \
	  for f in $(LUA_FILES); do rm -f $(DESTDIR)$$lmod/$$f; done; \
	  for d in $(LUA_DIRS); do rmdir $(DESTDIR)$$lmod/$$d 2>/dev/null; done; true; \
	done
	rm -f $(DESTDIR)$(LUA_CMOD)/smtppool/core.so $(DESTDIR)$(JIT_CMOD)/smtppool/core.so $(DESTDIR)$(PREFIX)/bin/smtppool
	-rmdir $(DESTDIR)$(LUA_CMOD)/smtppool $(DESTDIR)$(JIT_CMOD)/smtppool 2>/dev/null

# Throughput against a peer client (Python smtplib), side by side in one run;
# calls into C and Lua allocation per message (counted); then the soak
# (memory and descriptors over a million messages; SOAK_N).
$(BUILD)/sink: bench/sink.c | $(BUILD)
	$(CC) -O2 -Wall -Wextra -o $@ $<

bench: all $(BUILD)/sink
	@BASELINE=$(BASELINE) $(LUA) bench/run.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/link.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/learn.lua
	@echo
	@$(LUA) bench/compare.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/count.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/soak.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/campaign_rss.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/signed.lua $(BUILD)/sink
	@echo
	@$(LUA) bench/redis_campaign.lua
	@echo
	@$(LUA) bench/outbox.lua $(BUILD)/sink

# Coverage-guided fuzzing of the reply reader, protocol machine and codecs
# (libFuzzer with ASan and UBSan); FUZZ_TIME seconds per target.
FUZZ_TIME ?= 60
FUZZ_CC ?= clang
fuzz: | $(BUILD)
	@for t in session codec; do \
	  $(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE $(INC_MAIL) \
	    -o $(BUILD)/fuzz_$$t tests/fuzz/fuzz_$$t.c $(PROTO_SRC) $(MAIL_SRC) -lcrypto || exit 1; \
	  mkdir -p $(BUILD)/corpus_$$t; \
	  if ! $(BUILD)/fuzz_$$t -max_total_time=$(FUZZ_TIME) -max_len=4096 $(BUILD)/corpus_$$t \
	      tests/fuzz/seeds/$$t >$(BUILD)/fuzz_$$t.log 2>&1; then tail -40 $(BUILD)/fuzz_$$t.log; exit 1; fi; \
	  echo "fuzz_$$t: $$(tail -1 $(BUILD)/fuzz_$$t.log)"; \
	done

clean:
	rm -rf $(BUILD) doc lua/smtppool/core.so smtppool
	find src -name '*.o' -delete
