/* The protocol machine, driven by hand: no sockets. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdlib.h>
#include <string.h>

#include "sp_session.h"

static char outbuf[8192];

/* Takes everything the session wants to write. */
static const char *take(sp_session *s)
{
    const sp_buf *o = sp_session_output(s);
    size_t n = sp_buf_pending(o);
    assert_true(n < sizeof outbuf);
    if (n)
        memcpy(outbuf, sp_buf_head(o), n);
    outbuf[n] = '\0';
    sp_session_consume(s, n);
    return outbuf;
}

static void feed(sp_session *s, const char *str) { sp_session_feed(s, str, strlen(str)); }

static void expect_events(sp_session *s, const sp_event *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        assert_int_equal(sp_session_next_event(s), want[i]);
    assert_int_equal(sp_session_next_event(s), SP_EV_NONE);
}
#define EXPECT(s, ...)                                                                                \
    do {                                                                                              \
        sp_event w_[] = {__VA_ARGS__};                                                                \
        expect_events(s, w_, sizeof w_ / sizeof w_[0]);                                               \
    } while (0)

/* A session past its greeting and EHLO, with the given options (tls_active...). */
static sp_session *ready_with(sp_session_opts o, const char *ehlo_reply)
{
    o.helo = "client.test";
    sp_session *s = sp_session_new(&o);
    assert_string_equal(take(s), "");
    assert_int_equal(sp_session_phase(s), SP_PHASE_GREETING);
    feed(s, "220 mx.test ESMTP\r\n");
    assert_string_equal(take(s), "EHLO client.test\r\n");
    feed(s, ehlo_reply);
    EXPECT(s, SP_EV_READY);
    assert_int_equal(sp_session_state(s), SP_ST_READY);
    return s;
}

static sp_session *ready(const char *ehlo_reply)
{
    sp_session_opts o = {0};
    return ready_with(o, ehlo_reply);
}

static int start(sp_session *s, const char *from, const char *const *rcpts, size_t n, sp_error *e)
{
    sp_tx_opts o;
    memset(&o, 0, sizeof o);
    o.from = from;
    o.rcpts = rcpts;
    o.nrcpt = n;
    o.size = 100;
    return sp_session_start_tx(s, &o, e);
}

/* A transaction just started (one recipient, no PIPELINING) walked to its 354. */
static void to_body(sp_session *s)
{
    take(s);
    feed(s, "250 ok\r\n");
    take(s);
    feed(s, "250 ok\r\n");
    take(s);
    feed(s, "354 go\r\n");
}

/* A session with one transaction (a@x.test to b@y.test) at its 354. */
static sp_session *at_body(const char *ehlo_reply)
{
    static const char *const rc[] = {"b@y.test"};
    sp_error e;
    sp_session *s = ready(ehlo_reply);
    assert_int_equal(start(s, "a@x.test", rc, 1, &e), 0);
    to_body(s);
    return s;
}

/* One queue for the driver and its user: the driver looks at each new event
 * once and takes out its own (the body); the user gets the rest in order,
 * including events queued while the driver was still looking. */
static void one_event_queue_for_driver_and_user(void **state)
{
    (void)state;
    sp_session *s = at_body("250-mx.test\r\n250 SIZE 1000\r\n");
    sp_error e;
    assert_int_equal(sp_session_events(s), 1);
    assert_int_equal(sp_session_look_event(s), SP_EV_BODY);
    assert_int_equal(sp_session_look_event(s), SP_EV_NONE); /* each event is looked at once */
    sp_session_take_looked(s);
    assert_int_equal(sp_session_events(s), 0);
    assert_int_equal(sp_session_body(s, "x\n", 2, &e), 0);
    assert_int_equal(sp_session_body_end(s, &e), 0);
    take(s);
    feed(s, "250 queued\r\n");
    assert_int_equal(sp_session_events(s), 2);
    assert_int_equal(sp_session_look_event(s), SP_EV_TX_DONE);
    /* the user takes the looked-at event before the driver has seen the next */
    assert_int_equal(sp_session_next_event(s), SP_EV_TX_DONE);
    assert_int_equal(sp_session_look_event(s), SP_EV_READY);
    sp_session_quit(s);
    take(s);
    feed(s, "221 bye\r\n");
    assert_int_equal(sp_session_look_event(s), SP_EV_CLOSED);
    sp_session_take_looked(s); /* taken from the end: the one before stays */
    assert_int_equal(sp_session_look_event(s), SP_EV_NONE);
    EXPECT(s, SP_EV_READY);
    sp_session_take_looked(s); /* nothing looked at: nothing happens */
    assert_int_equal(sp_session_events(s), 0);
    sp_session_free(s);
}

static void lockstep_transaction(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 SIZE 1000\r\n");
    const char *rc[] = {"b@y.test", "bad@y.test"};
    sp_error e;
    assert_int_equal(start(s, "a@x.test", rc, 2, &e), 0);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test> SIZE=100\r\n");
    feed(s, "250 2.1.0 ok\r\n");
    assert_string_equal(take(s), "RCPT TO:<b@y.test>\r\n");
    feed(s, "250 2.1.5 ok\r\n");
    assert_string_equal(take(s), "RCPT TO:<bad@y.test>\r\n");
    feed(s, "550 5.1.1 no such user\r\n");
    assert_string_equal(take(s), "DATA\r\n");
    feed(s, "354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    assert_int_equal(sp_session_phase(s), SP_PHASE_DATA);
    assert_int_equal(sp_session_body(s, "Subject: x\n\n.line\n", 18, &e), 0);
    assert_int_equal(sp_session_body_end(s, &e), 0);
    assert_string_equal(take(s), "Subject: x\r\n\r\n..line\r\n.\r\n");
    assert_int_equal(sp_session_phase(s), SP_PHASE_DATA_END);
    feed(s, "250 2.0.0 queued as X\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    const sp_tx *t = sp_session_tx(s);
    assert_true(t->ok);
    assert_int_equal(t->accepted, 1);
    assert_int_equal(t->rcpts[0].code, 250);
    assert_int_equal(t->rcpts[1].code, 550);
    assert_string_equal(t->rcpts[1].enhanced, "5.1.1");
    assert_string_equal(t->rcpts[1].text, "no such user");
    assert_string_equal(t->final.text, "queued as X");
    assert_int_equal(sp_session_tx_count(s), 1);
    sp_session_quit(s);
    assert_string_equal(take(s), "QUIT\r\n");
    feed(s, "221 bye\r\n");
    EXPECT(s, SP_EV_CLOSED);
    sp_session_free(s);
}

static void pipelined_group(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    const char *rc[] = {"b@y.test", "c@y.test"};
    sp_error e;
    assert_int_equal(start(s, "", rc, 2, &e), 0);
    /* one group, one write: MAIL, every RCPT, DATA */
    assert_string_equal(take(s), "MAIL FROM:<>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n");
    feed(s, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    sp_session_body(s, "hi", 2, &e);
    sp_session_body_end(s, &e);
    EXPECT(s, SP_EV_NEXT); /* the next transaction could follow the dot now */
    assert_string_equal(take(s), "hi\r\n.\r\n");
    feed(s, "250 ok\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    assert_true(sp_session_tx(s)->ok);
    sp_session_free(s);
}

/* RFC 2920: the next transaction's MAIL, RCPT and DATA leave right behind
 * the final dot, before its reply; the outcomes come in order. */
static void next_transaction_pipelined(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    const char *rc1[] = {"b@y.test"}, *rc2[] = {"c@y.test"};
    sp_error e;
    start(s, "a@x.test", rc1, 1, &e);
    take(s);
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    sp_session_body(s, "one", 3, &e);
    sp_session_body_end(s, &e);
    EXPECT(s, SP_EV_NEXT);
    assert_int_equal(start(s, "a@x.test", rc2, 1, &e), 0);
    /* one write: the dot and the whole next group */
    assert_string_equal(take(s), "one\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n");
    assert_int_equal(sp_session_phase(s), SP_PHASE_DATA_END); /* the dot's reply is timed first */
    /* the dot's reply, then the next group's, in one read */
    feed(s, "250 queued 1\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_BODY);
    const sp_tx *t = sp_session_tx(s);
    assert_true(t->ok);
    assert_string_equal(t->rcpts[0].address, "b@y.test");
    assert_string_equal(t->final.text, "queued 1");
    assert_false(t->bdat); /* no CHUNKING offered: DATA */
    assert_false(t->quit);
    sp_session_tx_done(s);
    assert_true(sp_session_tx_open(s));
    sp_session_body(s, "two", 3, &e);
    sp_session_body_end(s, &e);
    EXPECT(s, SP_EV_NEXT);
    assert_string_equal(take(s), "two\r\n.\r\n");
    feed(s, "250 queued 2\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    t = sp_session_tx(s);
    assert_true(t->ok);
    assert_string_equal(t->rcpts[0].address, "c@y.test");
    sp_session_tx_done(s);
    assert_false(sp_session_tx_open(s));
    assert_int_equal(sp_session_tx_count(s), 2);
    sp_session_free(s);
}

/* One transaction (PIPELINING, one recipient, an empty body) up to its
 * queued final dot, its gate armed or not. */
static void to_dot(sp_session *s, int gate)
{
    const char *rc[] = {"b@y.test"};
    sp_error e;
    assert_int_equal(start(s, "a@x.test", rc, 1, &e), 0);
    if (gate)
        sp_session_gate_dot(s);
    take(s);
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    assert_int_equal(sp_session_body_end(s, &e), 0);
    EXPECT(s, SP_EV_NEXT);
}

/* The gate before a final dot (a mark to record elsewhere first): closed
 * when the armed transaction's dot is queued, open again on the caller's
 * word; a connection that ends with the dot behind it never sent it; an
 * arm whose transaction ended before its dot does not close on the next. */
static void gated_dot(void **state)
{
    (void)state;
    const char *rc[] = {"b@y.test"};
    sp_error e;
    sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    assert_int_equal(start(s, "a@x.test", rc, 1, &e), 0);
    sp_session_gate_dot(s);
    assert_false(sp_session_gated(s)); /* not before the dot */
    assert_string_equal(take(s), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    sp_session_body(s, "one", 3, &e);
    sp_session_body_end(s, &e);
    EXPECT(s, SP_EV_NEXT);
    assert_true(sp_session_gated(s));
    /* the next transaction (not armed) queues behind the closed gate */
    assert_int_equal(start(s, "a@x.test", rc, 1, &e), 0);
    assert_true(sp_session_gated(s));
    sp_session_gate_open(s);
    assert_false(sp_session_gated(s));
    assert_string_equal(take(s), "one\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
    feed(s, "250 queued 1\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_BODY);
    sp_session_tx_done(s);
    sp_session_body_end(s, &e);
    EXPECT(s, SP_EV_NEXT);
    assert_false(sp_session_gated(s)); /* this one was not armed */
    assert_string_equal(take(s), ".\r\n");
    feed(s, "250 queued 2\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    sp_session_tx_done(s);

    /* armed, but every recipient refused: no dot; the next is not gated */
    const char *bad[] = {"bad@y.test"};
    assert_int_equal(start(s, "a@x.test", bad, 1, &e), 0);
    sp_session_gate_dot(s);
    take(s);
    feed(s, "250 ok\r\n550 no\r\n554 no valid recipients\r\n");
    EXPECT(s, SP_EV_TX_DONE);
    sp_session_tx_done(s);
    assert_false(sp_session_gated(s));
    assert_string_equal(take(s), "RSET\r\n");
    feed(s, "250 reset\r\n");
    EXPECT(s, SP_EV_READY);
    to_dot(s, 0);
    assert_false(sp_session_gated(s));
    take(s);
    feed(s, "250 queued 3\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    sp_session_tx_done(s);

    /* armed, its dot behind the gate when the connection ends: never sent */
    to_dot(s, 1);
    assert_true(sp_session_gated(s));
    sp_session_eof(s);
    EXPECT(s, SP_EV_TX_DONE, SP_EV_ERROR);
    assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_CONNECTION);
    sp_session_free(s);
}

/* A refused dot ends only its own transaction (no RSET: the next one is
 * already under way); a connection lost with both in flight makes the one
 * whose dot left ambiguous and the other a plain connection failure. */
static void next_transaction_failures(void **state)
{
    (void)state;
    const char *rc[] = {"b@y.test"};
    sp_error e;
    for (int lost = 0; lost < 2; lost++) {
        sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
        start(s, "a@x.test", rc, 1, &e);
        take(s);
        feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
        EXPECT(s, SP_EV_BODY);
        sp_session_body_end(s, &e);
        EXPECT(s, SP_EV_NEXT);
        start(s, "a@x.test", rc, 1, &e);
        take(s); /* everything left, the dot included */
        if (lost) {
            sp_session_eof(s);
            EXPECT(s, SP_EV_TX_DONE, SP_EV_TX_DONE, SP_EV_ERROR);
            assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_AMBIGUOUS);
            sp_session_tx_done(s);
            assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_CONNECTION);
            sp_session_tx_done(s);
        } else {
            feed(s, "554 5.7.1 refused\r\n250 ok\r\n250 ok\r\n354 go\r\n");
            EXPECT(s, SP_EV_TX_DONE, SP_EV_BODY);
            assert_int_equal(sp_session_tx(s)->err.code, 554);
            assert_int_equal(sp_session_tx(s)->err.phase, SP_PHASE_DATA_END);
            sp_session_tx_done(s);
            sp_session_body_end(s, &e);
            EXPECT(s, SP_EV_NEXT);
            assert_string_equal(take(s), ".\r\n"); /* no RSET */
            feed(s, "250 ok\r\n");
            EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
            assert_true(sp_session_tx(s)->ok);
        }
        sp_session_free(s);
    }
}

static void pipelined_all_rejected_then_354(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n");
    /* RFC 2920: end the DATA with an empty body, then RSET */
    assert_string_equal(take(s), ".\r\n");
    EXPECT(s);
    feed(s, "554 no valid recipients\r\n");
    EXPECT(s, SP_EV_TX_DONE);
    const sp_tx *t = sp_session_tx(s);
    assert_false(t->ok);
    assert_int_equal(t->err.kind, SP_KIND_PERMANENT);
    assert_int_equal(t->err.phase, SP_PHASE_RCPT);
    assert_int_equal(t->err.code, 550);
    assert_string_equal(take(s), "RSET\r\n");
    feed(s, "250 reset\r\n");
    EXPECT(s, SP_EV_READY);
    sp_session_free(s);
}

static void helo_fallback(void **state)
{
    (void)state;
    sp_session *s = sp_session_new(NULL);
    feed(s, "220 old.test\r\n");
    assert_string_equal(take(s), "EHLO localhost\r\n");
    feed(s, "502 5.5.2 command not recognised\r\n");
    assert_string_equal(take(s), "HELO localhost\r\n");
    feed(s, "250 old.test\r\n");
    EXPECT(s, SP_EV_READY);
    assert_int_equal(sp_session_caps(s)->esmtp, 0);
    sp_session_free(s);
}

static void mail_421_kills_session(void **state)
{
    (void)state;
    sp_session *s = ready("250 mx.test\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "421 4.7.0 too many messages in this connection\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_ERROR);
    const sp_tx *t = sp_session_tx(s);
    assert_int_equal(t->err.kind, SP_KIND_CONNECTION);
    assert_int_equal(t->err.phase, SP_PHASE_MAIL);
    assert_int_equal(t->err.code, 421);
    assert_int_equal(sp_session_state(s), SP_ST_DEAD);
    assert_int_equal(sp_session_start_tx(s, &(sp_tx_opts){.from = "", .rcpts = rc, .nrcpt = 1}, &e), -1);
    assert_int_equal(e.kind, SP_KIND_INVALID);
    assert_int_equal(sp_session_feed(s, "250 ok\r\n", 8), -1);
    sp_session_free(s);
}

static void mail_452_is_transient_and_rsets(void **state)
{
    (void)state;
    sp_session *s = ready("250 mx.test\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "452 4.5.3 too many\r\n");
    EXPECT(s, SP_EV_TX_DONE);
    assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_TRANSIENT);
    assert_string_equal(take(s), "RSET\r\n");
    feed(s, "250 ok\r\n");
    EXPECT(s, SP_EV_READY);
    sp_session_free(s);
}

static void eof_after_dot_is_ambiguous(void **state)
{
    (void)state;
    sp_session *s = at_body("250 mx.test\r\n");
    sp_error e;
    EXPECT(s, SP_EV_BODY);
    sp_session_body_end(s, &e);
    take(s);
    sp_session_eof(s);
    EXPECT(s, SP_EV_TX_DONE, SP_EV_ERROR);
    assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_AMBIGUOUS);
    assert_int_equal(sp_session_tx(s)->err.phase, SP_PHASE_DATA_END);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_CONNECTION);
    sp_session_free(s);
}

static void eof_before_dot_written_is_not_ambiguous(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    sp_session_body_end(s, &e);
    /* nothing consumed: the dot never left */
    sp_session_eof(s);
    EXPECT(s, SP_EV_NEXT, SP_EV_TX_DONE, SP_EV_ERROR);
    assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_CONNECTION);
    sp_session_free(s);
}

/* auth_gate: the session stops before AUTH (SP_EV_AUTH) until the caller
 * has spent its login window and says go. */
static void auth_waits_for_the_gate(void **state)
{
    (void)state;
    sp_session_opts o;
    memset(&o, 0, sizeof o);
    o.helo = "client.test";
    o.auth_user = "alice";
    o.auth_secret = "s3cret";
    o.allow_plaintext_auth = 1;
    o.auth_gate = 1;
    sp_session *s = sp_session_new(&o);
    feed(s, "220 mx.test\r\n");
    assert_string_equal(take(s), "EHLO client.test\r\n");
    feed(s, "250-mx.test\r\n250 AUTH PLAIN\r\n");
    EXPECT(s, SP_EV_AUTH);
    assert_string_equal(take(s), ""); /* nothing leaves before the gate opens */
    assert_int_equal(sp_session_phase(s), SP_PHASE_NONE); /* no reply awaited: no timeout runs */
    assert_int_equal(sp_session_auth_go(s), 0);
    assert_int_equal(sp_session_auth_go(s), -1); /* once */
    assert_string_equal(take(s), "AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n");
    feed(s, "235 ok\r\n");
    EXPECT(s, SP_EV_READY);
    sp_session_free(s);
}

static void malformed_reply_per_phase(void **state)
{
    (void)state;
    sp_session *s = sp_session_new(NULL);
    feed(s, "220 ok\r\n");
    take(s);
    feed(s, "2x0 garbage\r\n");
    EXPECT(s, SP_EV_ERROR);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_PROTOCOL);
    assert_int_equal(sp_session_error(s)->phase, SP_PHASE_EHLO);
    sp_session_free(s);

    s = ready("250 mx.test\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "250-ok\r\n");
    sp_session_eof(s);
    EXPECT(s, SP_EV_TX_DONE, SP_EV_ERROR);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_CONNECTION);
    assert_int_equal(sp_session_error(s)->phase, SP_PHASE_MAIL);
    assert_non_null(strstr(sp_session_error(s)->text, "middle of a reply"));
    sp_session_free(s);
}

static void greeting_timeout_and_refusal(void **state)
{
    (void)state;
    sp_session *s = sp_session_new(NULL);
    sp_session_timeout(s);
    EXPECT(s, SP_EV_ERROR);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_CONNECTION);
    assert_int_equal(sp_session_error(s)->phase, SP_PHASE_GREETING);
    sp_session_free(s);

    s = sp_session_new(NULL);
    feed(s, "554 5.7.1 go away\r\n");
    EXPECT(s, SP_EV_ERROR);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_PERMANENT);
    assert_int_equal(sp_session_error(s)->code, 554);
    sp_session_free(s);
}

static void unsolicited_421_when_idle(void **state)
{
    (void)state;
    sp_session *s = ready("250 mx.test\r\n");
    feed(s, "421 4.4.2 idle too long\r\n");
    EXPECT(s, SP_EV_ERROR);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_CONNECTION);
    sp_session_free(s);
}

static void injection_and_limits_refused(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 SIZE 50\r\n");
    sp_error e;
    const char *bad[] = {"b@y.test\r\nRCPT TO:<evil@z.test>"};
    assert_int_equal(start(s, "a@x.test", bad, 1, &e), -1);
    assert_int_equal(e.kind, SP_KIND_INVALID);
    assert_string_equal(take(s), "");
    const char *ok[] = {"b@y.test"};
    assert_int_equal(start(s, "a@x.test>\r\nDATA", ok, 1, &e), -1);
    assert_int_equal(e.kind, SP_KIND_INVALID);
    assert_int_equal(start(s, "a@x.test", ok, 0, &e), -1);
    /* SIZE: 100 bytes over a 50-byte limit */
    assert_int_equal(start(s, "a@x.test", ok, 1, &e), -1);
    assert_int_equal(e.kind, SP_KIND_PERMANENT);
    sp_tx_opts o = {.from = "a@x.test", .rcpts = ok, .nrcpt = 1, .body_8bit = 1};
    assert_int_equal(sp_session_start_tx(s, &o, &e), -1);
    assert_non_null(strstr(e.text, "8BITMIME"));
    const char *utf[] = {"j\xc3\xb6rg@y.test"};
    o.body_8bit = 0;
    o.rcpts = utf;
    assert_int_equal(sp_session_start_tx(s, &o, &e), -1);
    assert_non_null(strstr(e.text, "SMTPUTF8"));
    assert_string_equal(take(s), "");
    assert_int_equal(sp_session_state(s), SP_ST_READY);
    sp_session_free(s);
}

static void utf8_and_8bit_parameters(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n");
    sp_error e;
    const char *utf[] = {"j\xc3\xb6rg@y.test"};
    sp_tx_opts o = {.from = "a@x.test", .rcpts = utf, .nrcpt = 1, .body_8bit = 1};
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test> BODY=8BITMIME SMTPUTF8\r\n");
    sp_session_free(s);
}

static void dsn_parameters(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 DSN\r\n");
    sp_error e;
    const char *rc[] = {"b@y.test"};
    sp_tx_opts o = {.from = "a@x.test", .rcpts = rc, .nrcpt = 1, .dsn_ret = "HDRS", .dsn_envid = "id+1 x",
                    .dsn_notify = "SUCCESS,FAILURE", .dsn_orcpt = 1};
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test> RET=HDRS ENVID=id+2B1+20x\r\n");
    feed(s, "250 ok\r\n");
    assert_string_equal(take(s), "RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@y.test\r\n");
    sp_session_free(s);
    /* without DSN offered the parameters are left out */
    s = ready("250 mx.test\r\n");
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test>\r\n");
    sp_session_free(s);
}

/* RFC 8689: REQUIRETLS goes on MAIL only over TLS to a server offering it;
 * otherwise the transaction is refused before a byte is sent. */
static void requiretls(void **state)
{
    (void)state;
    const char *rcpt[] = {"b@y.test"};
    sp_tx_opts o;
    memset(&o, 0, sizeof o);
    o.from = "a@x.test";
    o.rcpts = rcpt;
    o.nrcpt = 1;
    o.requiretls = 1;
    sp_error e;
    /* plaintext, even with the keyword offered: refused */
    sp_session *s = ready("250-mx.test\r\n250-REQUIRETLS\r\n250 PIPELINING\r\n");
    assert_int_equal(sp_session_start_tx(s, &o, &e), -1);
    assert_int_equal(e.kind, SP_KIND_TLS);
    assert_string_equal(take(s), "");
    sp_session_free(s);
    /* over TLS (implicit), offered: the keyword on MAIL */
    sp_session_opts so = {.tls_active = 1};
    s = ready_with(so, "250-mx.test\r\n250-REQUIRETLS\r\n250 PIPELINING\r\n");
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    assert_non_null(strstr(take(s), "MAIL FROM:<a@x.test> REQUIRETLS\r\n"));
    sp_session_free(s);
    /* over TLS, not offered: refused */
    s = ready_with(so, "250-mx.test\r\n250 PIPELINING\r\n");
    assert_int_equal(sp_session_start_tx(s, &o, &e), -1);
    assert_int_equal(e.kind, SP_KIND_TLS);
    assert_non_null(strstr(e.text, "does not offer REQUIRETLS"));
    sp_session_free(s);
}

/* The session's last transaction: QUIT leaves in the same write as the
 * final dot, and the 221 after the dot's 250 closes the session. */
static void quit_with_the_final_dot(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    const char *rcpt[] = {"b@y.test"};
    sp_tx_opts o;
    memset(&o, 0, sizeof o);
    o.from = "a@x.test";
    o.rcpts = rcpt;
    o.nrcpt = 1;
    o.quit_after = 1;
    sp_error e;
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    take(s);
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    assert_int_equal(sp_session_body(s, "hi\r\n", 4, &e), 0);
    assert_int_equal(sp_session_body_end(s, &e), 0);
    assert_string_equal(take(s), "hi\r\n.\r\nQUIT\r\n");
    feed(s, "250 queued\r\n221 bye\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_CLOSED);
    assert_true(sp_session_tx(s)->ok);
    assert_true(sp_session_tx(s)->quit); /* the outcome says the session ends with it */
    assert_false(sp_session_tx(s)->bdat);
    assert_int_equal(sp_session_state(s), SP_ST_CLOSED);
    sp_session_free(s);
    /* a refused dot: the outcome, then the session ends all the same */
    s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    take(s);
    feed(s, "250 ok\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_BODY);
    sp_session_body_end(s, &e);
    assert_string_equal(take(s), ".\r\nQUIT\r\n");
    feed(s, "554 no\r\n221 bye\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_CLOSED);
    assert_false(sp_session_tx(s)->ok);
    assert_true(sp_session_tx(s)->quit);
    assert_int_equal(sp_session_tx(s)->err.code, 554);
    sp_session_free(s);
    /* without PIPELINING QUIT cannot ride: the outcome says so */
    s = ready("250 mx.test\r\n");
    assert_int_equal(sp_session_start_tx(s, &o, &e), 0);
    to_body(s);
    EXPECT(s, SP_EV_BODY);
    sp_session_body_end(s, &e);
    assert_string_equal(take(s), ".\r\n");
    feed(s, "250 queued\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    assert_false(sp_session_tx(s)->quit);
    sp_session_free(s);
}

/* CHUNKING with a window of 3: MAIL, RCPT and the body as "BDAT n LAST"
 * leave without waiting; three transactions await their replies at once,
 * the fourth waits for a slot; replies settle them oldest first. */
static sp_session *bdat_ready(int window)
{
    sp_session_opts o = {0};
    o.bdat_window = window;
    return ready_with(o, "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
}

static void bdat_one(sp_session *s, const char *to, const char *body)
{
    const char *rc[] = {to};
    sp_error e;
    assert_int_equal(start(s, "a@x.test", rc, 1, &e), 0);
    EXPECT(s, SP_EV_BODY);
    assert_int_equal(sp_session_body(s, body, strlen(body), &e), 0);
    assert_int_equal(sp_session_body_end(s, &e), 0);
}

static void bdat_window_pipelines(void **state)
{
    (void)state;
    sp_session *s = bdat_ready(3);
    assert_true(sp_session_uses_bdat(s));
    bdat_one(s, "b@y.test", ".dot\nline");
    EXPECT(s, SP_EV_NEXT);
    /* no dot-stuffing, line ends made CRLF, the size counted after that */
    assert_string_equal(take(s), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                                 "BDAT 12 LAST\r\n.dot\r\nline\r\n");
    bdat_one(s, "c@y.test", "two\r\n");
    EXPECT(s, SP_EV_NEXT);
    bdat_one(s, "d@y.test", "three\r\n");
    EXPECT(s); /* three in flight: the window is full, NEXT waits */
    sp_error e;
    const char *rc[] = {"e@y.test"};
    assert_int_equal(start(s, "a@x.test", rc, 1, &e), -1);
    take(s);
    /* the first transaction's replies: it is done, and a slot opens */
    feed(s, "250 ok\r\n250 ok\r\n250 queued 1\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_NEXT);
    const sp_tx *t = sp_session_tx(s);
    assert_true(t->ok);
    assert_string_equal(t->rcpts[0].address, "b@y.test");
    assert_string_equal(t->final.text, "queued 1");
    assert_true(t->bdat);
    assert_false(t->quit);
    sp_session_tx_done(s);
    /* the other two in one read */
    feed(s, "250 ok\r\n250 ok\r\n250 queued 2\r\n250 ok\r\n250 ok\r\n250 queued 3\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_TX_DONE, SP_EV_READY);
    assert_string_equal(sp_session_tx(s)->final.text, "queued 2");
    sp_session_tx_done(s);
    assert_string_equal(sp_session_tx(s)->final.text, "queued 3");
    sp_session_tx_done(s);
    assert_int_equal(sp_session_tx_count(s), 3);
    assert_int_equal(sp_session_state(s), SP_ST_READY);
    sp_session_free(s);
}

/* A body fed in pieces goes as chunks, the last one marked LAST. */
static void bdat_chunks(void **state)
{
    (void)state;
    sp_session *s = bdat_ready(2);
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    EXPECT(s, SP_EV_BODY);
    sp_session_body(s, "abc\r", 4, &e);
    sp_session_body(s, "\nxyz", 4, &e);
    sp_session_body_end(s, &e);
    EXPECT(s, SP_EV_NEXT);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n"
                                 "BDAT 4\r\nabc\rBDAT 6 LAST\r\n\nxyz\r\n");
    feed(s, "250 ok\r\n250 ok\r\n250 4 octets\r\n250 queued\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_READY);
    assert_true(sp_session_tx(s)->ok);
    sp_session_free(s);
}

/* A refused recipient fails its own transaction only; the window stops
 * (no NEXT) until every reply is in, then RSET; a 503 to a transaction
 * pipelined behind the failure is transient, not the message's fault. */
static void bdat_failure_in_window(void **state)
{
    (void)state;
    sp_session *s = bdat_ready(3);
    bdat_one(s, "bad@y.test", "one\r\n");
    EXPECT(s, SP_EV_NEXT);
    bdat_one(s, "c@y.test", "two\r\n");
    EXPECT(s, SP_EV_NEXT);
    take(s);
    feed(s, "250 ok\r\n550 no such user\r\n554 no valid recipients\r\n");
    EXPECT(s, SP_EV_TX_DONE); /* no NEXT: the window stopped */
    const sp_tx *t = sp_session_tx(s);
    assert_false(t->ok);
    assert_int_equal(t->err.code, 550);
    assert_int_equal(t->err.kind, SP_KIND_PERMANENT);
    assert_int_equal(t->err.phase, SP_PHASE_RCPT);
    sp_session_tx_done(s);
    feed(s, "503 sender already given\r\n250 ok\r\n503 bad sequence\r\n");
    EXPECT(s, SP_EV_TX_DONE);
    t = sp_session_tx(s);
    assert_false(t->ok);
    assert_int_equal(t->err.kind, SP_KIND_TRANSIENT);
    assert_int_equal(t->err.code, 503);
    sp_session_tx_done(s);
    assert_string_equal(take(s), "RSET\r\n");
    feed(s, "250 reset\r\n");
    EXPECT(s, SP_EV_READY);
    sp_session_free(s);
}

/* The connection lost with three last chunks written and no final reply:
 * all three are ambiguous (the bound is the window); a transaction whose
 * last chunk had not left is a plain connection failure. */
static void bdat_lost_window_is_ambiguous(void **state)
{
    (void)state;
    sp_session *s = bdat_ready(4);
    bdat_one(s, "b@y.test", "1\r\n");
    EXPECT(s, SP_EV_NEXT);
    bdat_one(s, "c@y.test", "2\r\n");
    EXPECT(s, SP_EV_NEXT);
    bdat_one(s, "d@y.test", "3\r\n");
    EXPECT(s, SP_EV_NEXT);
    take(s);
    bdat_one(s, "e@y.test", "4\r\n"); /* queued, never written */
    EXPECT(s); /* four in flight: the window (4) is full */
    feed(s, "250 ok\r\n250 ok\r\n"); /* the first one's MAIL and RCPT only */
    sp_session_eof(s);
    EXPECT(s, SP_EV_TX_DONE, SP_EV_TX_DONE, SP_EV_TX_DONE, SP_EV_TX_DONE, SP_EV_ERROR);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_AMBIGUOUS);
        sp_session_tx_done(s);
    }
    assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_CONNECTION);
    sp_session_free(s);
}

/* A reply that belongs to no command ends the session as a protocol error;
 * matched to the next command it would shift every later outcome. Over DATA
 * in lock step: a second reply to MAIL comes before RCPT has left. */
static void extra_reply_before_its_command(void **state)
{
    (void)state;
    sp_session *s = ready("250 mx.test\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "250 ok\r\n250 ok again\r\n"); /* RCPT is queued, not written */
    EXPECT(s, SP_EV_TX_DONE, SP_EV_ERROR);
    const sp_tx *t = sp_session_tx(s);
    assert_int_equal(t->err.kind, SP_KIND_PROTOCOL);
    assert_non_null(strstr(sp_session_error(s)->text, "belongs to no command"));
    assert_int_equal(sp_session_error(s)->phase, SP_PHASE_RCPT);
    sp_session_free(s);
}

/* Pipelined over DATA: the extra reply shifts RCPT's 250 onto DATA, where
 * only 354 or an error can answer: a protocol error, not "failed at DATA". */
static void extra_reply_in_a_pipelined_group(void **state)
{
    (void)state;
    sp_session *s = ready("250-mx.test\r\n250 PIPELINING\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    take(s);
    feed(s, "250 ok\r\n250 extra\r\n250 ok\r\n354 go\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_ERROR);
    assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_PROTOCOL);
    assert_int_equal(sp_session_error(s)->code, 250);
    assert_int_equal(sp_session_error(s)->phase, SP_PHASE_DATA);
    sp_session_free(s);
}

/* In a BDAT window: an extra reply shifts the first transaction's replies
 * (its RCPT's 550 lands on its last chunk: failed, in the wrong phase, the
 * limit of what can be told), and the next reply would answer the second
 * transaction's MAIL, which has not left: the session ends there as a
 * protocol error; nothing is reported sent on a shifted 250. */
static void extra_reply_in_a_bdat_window(void **state)
{
    (void)state;
    sp_session *s = bdat_ready(4);
    bdat_one(s, "b@y.test", "1\r\n");
    EXPECT(s, SP_EV_NEXT);
    take(s);
    bdat_one(s, "c@y.test", "2\r\n"); /* queued, not written */
    EXPECT(s, SP_EV_NEXT);
    /* MAIL, an extra 250, RCPT's 550: taken in order they would make the
     * first transaction fail at its last chunk and the fourth reply (BDAT's
     * own) answer the second transaction's MAIL, which has not left */
    feed(s, "250 ok\r\n250 extra\r\n550 no such user\r\n250 queued\r\n");
    EXPECT(s, SP_EV_TX_DONE, SP_EV_TX_DONE, SP_EV_ERROR);
    const sp_tx *t = sp_session_tx(s);
    assert_false(t->ok);
    sp_session_tx_done(s);
    t = sp_session_tx(s);
    assert_false(t->ok);
    assert_int_equal(t->err.kind, SP_KIND_PROTOCOL);
    assert_int_equal(sp_session_error(s)->kind, SP_KIND_PROTOCOL);
    sp_session_free(s);
}

/* The documented maximum window, lost: sixteen outcomes and the error, none
 * dropped (a driver's queue once held sixteen events and lost the error). */
static void bdat_full_window_of_16_lost(void **state)
{
    (void)state;
    sp_session *s = bdat_ready(16);
    for (int i = 0; i < 16; i++) {
        bdat_one(s, "b@y.test", "x\r\n");
        if (i < 15)
            EXPECT(s, SP_EV_NEXT);
        else
            EXPECT(s); /* the window is full */
        take(s);
    }
    sp_session_eof(s);
    for (int i = 0; i < 16; i++)
        assert_int_equal(sp_session_next_event(s), SP_EV_TX_DONE);
    assert_int_equal(sp_session_next_event(s), SP_EV_ERROR);
    for (int i = 0; i < 16; i++) {
        assert_int_equal(sp_session_tx(s)->err.kind, SP_KIND_AMBIGUOUS);
        sp_session_tx_done(s);
    }
    sp_session_free(s);
}

/* Without CHUNKING offered, or with a window of 0, DATA as before. */
static void bdat_only_when_offered(void **state)
{
    (void)state;
    sp_session_opts o = {0};
    o.bdat_window = 4;
    sp_session *s = ready_with(o, "250-mx.test\r\n250 PIPELINING\r\n");
    const char *rc[] = {"b@y.test"};
    sp_error e;
    start(s, "a@x.test", rc, 1, &e);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
    sp_session_free(s);
    s = bdat_ready(0);
    start(s, "a@x.test", rc, 1, &e);
    assert_string_equal(take(s), "MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
    sp_session_free(s);
}

/* The reply clock: each awaited reply gets its phase's timeout, counted
 * from the last write, the last complete reply or the last phase change,
 * never from a partial read; none while idle. */
static void reply_deadlines(void **state)
{
    (void)state;
    sp_session_opts o = {0};
    o.helo = "client.test";
    o.timeouts[SP_PHASE_GREETING] = 7;
    o.timeouts[SP_PHASE_EHLO] = 3;
    sp_session *s = sp_session_new(&o);
    assert_true(sp_session_deadline(s, 100.0) == 107.0); /* the greeting, from when first asked */
    assert_true(sp_session_deadline(s, 104.0) == 107.0);
    feed(s, "220 mx.test");                                 /* a partial line restarts nothing */
    assert_true(sp_session_deadline(s, 105.0) == 107.0);
    feed(s, " ESMTP\r\n");                                   /* the greeting is in: EHLO's own */
    assert_true(sp_session_deadline(s, 105.5) == 108.5);
    take(s);
    sp_session_activity(s, 106.0);                          /* EHLO left at 106 */
    assert_true(sp_session_deadline(s, 106.5) == 109.0);
    feed(s, "250-mx.test\r\n");                             /* a partial multi-line reply */
    assert_true(sp_session_deadline(s, 107.0) == 109.0);
    feed(s, "250 PIPELINING\r\n");
    EXPECT(s, SP_EV_READY);
    assert_true(sp_session_deadline(s, 108.0) == 0);        /* idle */
    assert_true(sp_session_phase_timeout(s, SP_PHASE_MAIL) == 300);
    assert_true(sp_session_phase_timeout(s, SP_PHASE_DATA_END) == 600);
    assert_true(sp_default_timeout(SP_PHASE_DATA) == 180);
    sp_session_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(lockstep_transaction),
        cmocka_unit_test(pipelined_group),
        cmocka_unit_test(next_transaction_pipelined),
        cmocka_unit_test(gated_dot),
        cmocka_unit_test(bdat_window_pipelines),
        cmocka_unit_test(bdat_chunks),
        cmocka_unit_test(bdat_failure_in_window),
        cmocka_unit_test(bdat_lost_window_is_ambiguous),
        cmocka_unit_test(bdat_only_when_offered),
        cmocka_unit_test(next_transaction_failures),
        cmocka_unit_test(auth_waits_for_the_gate),
        cmocka_unit_test(pipelined_all_rejected_then_354),
        cmocka_unit_test(helo_fallback),
        cmocka_unit_test(mail_421_kills_session),
        cmocka_unit_test(mail_452_is_transient_and_rsets),
        cmocka_unit_test(eof_after_dot_is_ambiguous),
        cmocka_unit_test(eof_before_dot_written_is_not_ambiguous),
        cmocka_unit_test(malformed_reply_per_phase),
        cmocka_unit_test(greeting_timeout_and_refusal),
        cmocka_unit_test(unsolicited_421_when_idle),
        cmocka_unit_test(injection_and_limits_refused),
        cmocka_unit_test(utf8_and_8bit_parameters),
        cmocka_unit_test(dsn_parameters),
        cmocka_unit_test(requiretls),
        cmocka_unit_test(quit_with_the_final_dot),
        cmocka_unit_test(extra_reply_before_its_command),
        cmocka_unit_test(extra_reply_in_a_pipelined_group),
        cmocka_unit_test(extra_reply_in_a_bdat_window),
        cmocka_unit_test(bdat_full_window_of_16_lost),
        cmocka_unit_test(reply_deadlines),
        cmocka_unit_test(one_event_queue_for_driver_and_user),
    };
    return cmocka_run_group_tests_name("session", tests, NULL, NULL);
}
