#include "sp_session_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "sp_codec.h"
#include "sp_envelope.h"
#include "sp_sasl.h"

static const char *const state_names[] = {"greeting", "ehlo",   "helo", "ready",  "tx",     "body",
                                          "data_end", "rset",   "noop", "quit",   "closed", "dead",
                                          "starttls", "tls",    "auth"};
static const char *const event_names[] = {"none", "ready", "body", "tx", "error", "closed", "tls", "next", "auth"};

const char *sp_state_name(sp_state st)
{
    return (unsigned)st < sizeof state_names / sizeof state_names[0] ? state_names[st] : "?";
}

const char *sp_event_name(sp_event e)
{
    return (unsigned)e < sizeof event_names / sizeof event_names[0] ? event_names[e] : "?";
}


void sp_ss_push_event(sp_session *s, sp_event e)
{
    /* Between two of the driver's turns a session queues one SP_EV_TX_DONE
     * per transaction it holds (at most FLY_MAX + 1) and a few others (one
     * SP_EV_ERROR or SP_EV_CLOSED ends it): EVQ is sized with room to spare,
     * so a full queue is a broken invariant, never a silent drop. */
    if (s->ev_len == EVQ) {
        fprintf(stderr, "smtppool: session event queue overflow (%s dropped): a bug, please report\n",
                sp_event_name(e));
        abort();
    }
    s->evq[(s->ev_head + s->ev_len++) % EVQ] = e;
}

/* Every state change goes through here, so a trace sees each one. */
void sp_ss_set_state(sp_session *s, sp_state to)
{
    if (s->trace && s->state != to) {
        if (s->tr_len == SP_TRACE_MAX) { /* the oldest goes: a trace is for the recent past */
            s->tr_head = (s->tr_head + 1) % SP_TRACE_MAX;
            s->tr_len--;
            s->tr_dropped++;
        }
        sp_transition *t = &s->tr[(s->tr_head + s->tr_len++) % SP_TRACE_MAX];
        t->from = s->state;
        t->to = to;
        t->code = s->cur_code;
    }
    s->state = to;
}

void sp_session_trace(sp_session *s, int on) { s->trace = on; }

size_t sp_session_transitions(sp_session *s, sp_transition *out, size_t max)
{
    size_t n = 0;
    while (n < max && s->tr_len) {
        out[n++] = s->tr[s->tr_head];
        s->tr_head = (s->tr_head + 1) % SP_TRACE_MAX;
        s->tr_len--;
    }
    return n;
}

sp_event sp_session_next_event(sp_session *s)
{
    if (!s->ev_len)
        return SP_EV_NONE;
    sp_event e = s->evq[s->ev_head];
    s->ev_head = (s->ev_head + 1) % EVQ;
    s->ev_len--;
    if (s->ev_looked)
        s->ev_looked--;
    return e;
}

size_t sp_session_events(const sp_session *s) { return s->ev_len; }
size_t sp_session_looked_events(const sp_session *s) { return s->ev_looked; }

sp_event sp_session_look_event(sp_session *s)
{
    if (s->ev_looked == s->ev_len)
        return SP_EV_NONE;
    return s->evq[(s->ev_head + s->ev_looked++) % EVQ];
}

void sp_session_take_looked(sp_session *s)
{
    if (!s->ev_looked)
        return;
    for (size_t i = s->ev_looked - 1; i + 1 < s->ev_len; i++)
        s->evq[(s->ev_head + i) % EVQ] = s->evq[(s->ev_head + i + 1) % EVQ];
    s->ev_len--;
    s->ev_looked--;
}

int sp_ss_await(sp_session *s, cmd c, size_t idx)
{
    if (s->aw_head + s->aw_len == s->aw_cap) {
        if (s->aw_head > 0) {
            memmove(s->aw, s->aw + s->aw_head, s->aw_len * sizeof *s->aw);
            s->aw_head = 0;
        } else {
            size_t cap = s->aw_cap ? s->aw_cap * 2 : 8;
            awaited *a = realloc(s->aw, cap * sizeof *a);
            if (!a)
                return -1;
            s->aw = a;
            s->aw_cap = cap;
        }
    }
    s->aw[s->aw_head + s->aw_len].c = c;
    s->aw[s->aw_head + s->aw_len].idx = idx;
    /* every caller has appended the command's bytes already */
    s->aw[s->aw_head + s->aw_len].end = s->written + sp_buf_pending(&s->out);
    s->aw_len++;
    return 0;
}

static sp_phase phase_of(cmd c)
{
    switch (c) {
    case CMD_GREETING: return SP_PHASE_GREETING;
    case CMD_EHLO:
    case CMD_HELO: return SP_PHASE_EHLO;
    case CMD_MAIL:
    case CMD_BMAIL: return SP_PHASE_MAIL;
    case CMD_RCPT:
    case CMD_BRCPT: return SP_PHASE_RCPT;
    case CMD_DATA:
    case CMD_BDAT: return SP_PHASE_DATA;
    case CMD_DATA_END:
    case CMD_BDAT_LAST:
    case CMD_DATA_DISCARD: return SP_PHASE_DATA_END;
    case CMD_RSET: return SP_PHASE_RSET;
    case CMD_NOOP: return SP_PHASE_NOOP;
    case CMD_QUIT: return SP_PHASE_QUIT;
    case CMD_STARTTLS: return SP_PHASE_STARTTLS;
    case CMD_AUTH: return SP_PHASE_AUTH;
    }
    return SP_PHASE_NONE;
}

int sp_ss_queue_cmd(sp_session *s, const char *line, cmd c, size_t idx)
{
    size_t n = strlen(line);
    if (sp_buf_append(&s->out, line, n) < 0 || sp_buf_append(&s->out, "\r\n", 2) < 0)
        return -1;
    s->queued += n + 2;
    return sp_ss_await(s, c, idx);
}

sp_session *sp_session_new(const sp_session_opts *opts)
{
    sp_session *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->reader = sp_reply_reader_new();
    if (!s->reader) {
        free(s);
        return NULL;
    }
    for (int i = 0; i < SP_PHASE_COUNT; i++)
        s->timeouts[i] = opts && opts->timeouts[i] > 0 ? opts->timeouts[i] : sp_default_timeout((sp_phase)i);
    const char *h = opts && opts->helo && *opts->helo ? opts->helo : "localhost";
    snprintf(s->helo, sizeof s->helo, "%s", h);
    sp_buf_init(&s->out);
    sp_buf_init(&s->chunk);
    s->state = SP_ST_GREETING; /* the first state: no transition to trace */
    if (opts) {
        s->starttls = opts->starttls;
        s->tls_active = opts->tls_active;
        s->allow_plaintext_auth = opts->allow_plaintext_auth;
        s->auth_gate = opts->auth_gate;
        s->auth_want = opts->auth_mech;
        s->window = opts->bdat_window < 0 ? 0 : opts->bdat_window > FLY_MAX ? FLY_MAX : opts->bdat_window;
        if (opts->auth_user) {
            s->auth_user = strdup(opts->auth_user);
            s->auth_secret = strdup(opts->auth_secret ? opts->auth_secret : "");
            if (!s->auth_user || !s->auth_secret) {
                sp_session_free(s);
                return NULL;
            }
            sp_ss_add_redact(s, s->auth_secret, strlen(s->auth_secret));
            /* and its base64, which no AUTH line carries alone but a
             * server may echo decoded-then-re-encoded */
            size_t sl = strlen(s->auth_secret);
            char *b = sl ? malloc(sp_base64_encoded_len(sl) + 1) : NULL;
            if (b) {
                sp_base64_encode((const unsigned char *)s->auth_secret, sl, b);
                b[sp_base64_encoded_len(sl)] = 0;
                sp_ss_add_redact(s, b, strlen(b));
                OPENSSL_cleanse(b, strlen(b));
                free(b);
            }
        }
    }
    if (sp_ss_await(s, CMD_GREETING, 0) < 0) {
        sp_session_free(s);
        return NULL;
    }
    return s;
}

void sp_session_free(sp_session *s)
{
    if (!s)
        return;
    sp_reply_reader_free(s->reader);
    sp_buf_free(&s->out);
    sp_reply_clear(&s->greeting);
    sp_ss_tx_clear(&s->tx);
    for (size_t i = 0; i < FLY_MAX; i++)
        sp_ss_tx_clear(&s->fly[i]);
    sp_buf_free(&s->chunk);
    for (size_t i = 0; i < DONE_MAX; i++)
        sp_ss_tx_clear(&s->done[i]);
    free(s->aw);
    if (s->auth_user) {
        OPENSSL_cleanse(s->auth_user, strlen(s->auth_user));
        free(s->auth_user);
    }
    if (s->auth_secret) {
        OPENSSL_cleanse(s->auth_secret, strlen(s->auth_secret));
        free(s->auth_secret);
    }
    for (size_t i = 0; i < s->nredact; i++) {
        OPENSSL_cleanse(s->redact[i], strlen(s->redact[i]));
        free(s->redact[i]);
    }
    /* AUTH lines may still sit in the output buffer */
    if (s->out.data)
        OPENSSL_cleanse(s->out.data, s->out.cap);
    free(s);
}

/* Ends the session: records err, fails the transaction in flight, queues events. */
static void die(sp_session *s, const sp_error *err)
{
    if (s->state == SP_ST_DEAD || s->state == SP_ST_CLOSED)
        return;
    s->err = *err;
    /* The oldest transaction first (its final reply was awaited first). Lost
     * after its final dot (or last BDAT chunk) left and before its final
     * reply, the server may have taken the message: only an explicit reply
     * can settle that. */
    while (s->fly_len + (s->tx_active && !s->tx.done)) {
        sp_tx *t = sp_ss_owner(s);
        t->err = *err;
        if (t->dot_written && err->code == 0 && s->aw_len > 0)
            t->err.kind = SP_KIND_AMBIGUOUS;
        t->ok = 0;
        if (s->fly_len)
            sp_ss_fly_pop(s);
        else
            sp_ss_tx_done(s, t);
    }
    sp_ss_set_state(s, SP_ST_DEAD);
    s->aw_len = 0;
    sp_buf_reset(&s->out);
    sp_ss_push_event(s, SP_EV_ERROR);
}

void sp_ss_die_reply(sp_session *s, sp_phase ph, const sp_reply *r)
{
    sp_error e;
    sp_error_clear(&e);
    e.kind = sp_kind_of_code(r->code);
    e.phase = ph;
    e.code = r->code;
    memcpy(e.enhanced, r->enhanced, sizeof e.enhanced);
    snprintf(e.text, sizeof e.text, "%s", r->text ? r->text : "");
    die(s, &e);
}

void sp_ss_die_oom(sp_session *s)
{
    sp_error e;
    sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(s), "out of memory");
    die(s, &e);
}

static int send_ehlo(sp_session *s, const char *verb, cmd c)
{
    char line[300];
    snprintf(line, sizeof line, "%s %s", verb, s->helo);
    return sp_ss_queue_cmd(s, line, c, 0);
}

void sp_ss_die_msg(sp_session *s, sp_kind kind, sp_phase ph, const char *text)
{
    sp_error e;
    sp_error_set(&e, kind, ph, "%s", text);
    die(s, &e);
}

/* Handles one complete reply. Returns -1 when the session died. */
static int on_reply(sp_session *s, sp_reply *r)
{
    if (s->aw_len == 0) {
        /* Unsolicited: a 421 is a server going away (RFC 5321 3.8); anything
         * else is a protocol violation. Either way the session is over. */
        if (r->code == 421) {
            sp_ss_die_reply(s, sp_session_phase(s), r);
        } else {
            sp_error e;
            sp_error_set(&e, SP_KIND_PROTOCOL, SP_PHASE_NONE, "unexpected reply %d with no command pending", r->code);
            e.code = r->code;
            die(s, &e);
        }
        return -1;
    }
    awaited a = s->aw[s->aw_head];
    s->aw_head++;
    s->aw_len--;
    if (s->aw_len == 0)
        s->aw_head = 0;
    sp_phase ph = phase_of(a.c);
    int cls = r->code / 100;

    /* 421 anywhere: the server is closing the channel. */
    if (r->code == 421 && a.c != CMD_QUIT) {
        sp_ss_die_reply(s, ph, r);
        return -1;
    }

    /* A reply that belongs to no command: it came before the command it
     * would answer had left in full (a server that answered one command
     * twice), or its code cannot answer that command (354 is DATA's alone;
     * AUTH's 334 the only other 3xx). Matched anyway, it would shift every
     * later outcome by one: the session ends instead, and the transactions
     * in flight are judged as for a lost connection. */
    int early = a.c != CMD_GREETING && s->handed < a.end;
    if (early ||
        (a.c == CMD_DATA ? (cls != 3 && cls != 4 && cls != 5) || (cls == 3 && r->code != 354)
                         : a.c != CMD_AUTH && cls == 3)) {
        sp_error e;
        sp_error_set(&e, SP_KIND_PROTOCOL, ph,
                     early ? "reply %d came before the command it would answer was sent: it belongs "
                                          "to no command (the server answered one twice?)"
                                        : "reply %d cannot answer %s: it belongs to no command (the server "
                                          "answered one twice?)",
                     r->code, sp_phase_name(ph));
        e.code = r->code;
        die(s, &e);
        return -1;
    }

    switch (a.c) {
    case CMD_GREETING:
        if (r->code != 220) {
            sp_ss_die_reply(s, ph, r);
            return -1;
        }
        sp_ss_move_reply(&s->greeting, r);
        sp_ss_set_state(s, SP_ST_EHLO);
        if (send_ehlo(s, "EHLO", CMD_EHLO) < 0)
            goto oom;
        return 0;
    case CMD_EHLO:
        if (cls == 2) {
            sp_caps_parse(&s->caps, r);
            s->pipelining = (s->caps.flags & SP_CAP_PIPELINING) != 0;
            return sp_ss_after_ehlo(s);
        }
        if (cls == 5) { /* EHLO refused: fall back to HELO (RFC 5321 4.1.1.1) */
            sp_ss_set_state(s, SP_ST_HELO);
            if (send_ehlo(s, "HELO", CMD_HELO) < 0)
                goto oom;
            return 0;
        }
        sp_ss_die_reply(s, ph, r);
        return -1;
    case CMD_HELO:
        if (cls == 2) {
            memset(&s->caps, 0, sizeof s->caps);
            s->pipelining = 0;
            return sp_ss_after_ehlo(s);
        }
        sp_ss_die_reply(s, ph, r);
        return -1;
    case CMD_MAIL:
        if (cls != 2 && !s->tx.err.kind)
            sp_ss_set_tx_err_reply(&s->tx, ph, r);
        if (cls != 2 && !s->pipelining)
            return sp_ss_finish_failed_tx(s) < 0 ? (sp_ss_die_oom(s), -1) : 0;
        if (!s->pipelining && sp_ss_send_rcpt(s, 0) < 0)
            goto oom;
        return 0;
    case CMD_RCPT: {
        sp_ss_record_rcpt(&s->tx, a.idx, r);
        if (s->pipelining)
            return 0;
        if (a.idx + 1 < s->tx.nrcpt) {
            if (sp_ss_send_rcpt(s, a.idx + 1) < 0)
                goto oom;
            return 0;
        }
        if (s->tx.accepted == 0) {
            sp_ss_fail_tx_all_rcpts(s);
            return sp_ss_finish_failed_tx(s) < 0 ? (sp_ss_die_oom(s), -1) : 0;
        }
        if (sp_ss_queue_cmd(s, "DATA", CMD_DATA, 0) < 0)
            goto oom;
        return 0;
    }
    case CMD_DATA:
        if (r->code == 354) {
            if (s->tx.accepted > 0 && !s->tx.err.kind) {
                sp_ss_set_state(s, SP_ST_BODY);
                sp_dotstuff_init(&s->ds);
                sp_ss_push_event(s, SP_EV_BODY);
                return 0;
            }
            /* Pipelined DATA accepted although the transaction failed: end
             * it with an empty body (RFC 2920 3.1) and ignore the reply. */
            if (sp_buf_append(&s->out, ".\r\n", 3) < 0 || sp_ss_await(s, CMD_DATA_DISCARD, 0) < 0)
                goto oom;
            s->queued += 3;
        } else if (!s->tx.err.kind) {
            if (s->tx.accepted == 0)
                sp_ss_fail_tx_all_rcpts(s);
            else
                sp_ss_set_tx_err_reply(&s->tx, ph, r);
        }
        if (s->tx.accepted == 0 && !s->tx.err.kind)
            sp_ss_fail_tx_all_rcpts(s);
        return sp_ss_finish_failed_tx(s) < 0 ? (sp_ss_die_oom(s), -1) : 0;
    case CMD_DATA_DISCARD:
        return sp_ss_finish_failed_tx(s) < 0 ? (sp_ss_die_oom(s), -1) : 0;
    case CMD_DATA_END:
        if (s->fly_len) {
            /* The reply to a dot the next transaction was pipelined behind:
             * that one carries on; no RSET (the reply ended this one). */
            sp_tx *t = sp_ss_fly_at(s, 0);
            sp_ss_move_reply(&t->final, r);
            if (cls == 2) {
                t->ok = 1;
                s->tx_count++;
            } else {
                sp_ss_set_tx_err_reply(t, ph, &t->final);
            }
            sp_ss_fly_pop(s);
            return 0;
        }
        sp_ss_move_reply(&s->tx.final, r);
        if (cls == 2) {
            s->tx.ok = 1;
            s->tx_count++;
            sp_ss_tx_done(s, &s->tx);
            if (s->quit_after) { /* QUIT left with the dot: its 221 comes next */
                sp_ss_set_state(s, SP_ST_QUIT);
                return 0;
            }
            sp_ss_set_state(s, SP_ST_READY);
            sp_ss_push_event(s, SP_EV_READY);
            return 0;
        }
        sp_ss_set_tx_err_reply(&s->tx, ph, &s->tx.final);
        if (s->quit_after) { /* no RSET: the session is ending */
            s->tx.ok = 0;
            sp_ss_tx_done(s, &s->tx);
            sp_ss_set_state(s, SP_ST_QUIT);
            return 0;
        }
        return sp_ss_finish_failed_tx(s) < 0 ? (sp_ss_die_oom(s), -1) : 0;
    case CMD_BMAIL:
    case CMD_BRCPT:
    case CMD_BDAT:
    case CMD_BDAT_LAST:
        return sp_ss_on_bdat_reply(s, a, ph, r);
    case CMD_RSET:
    case CMD_NOOP:
        if (cls == 2) {
            sp_ss_set_state(s, SP_ST_READY);
            sp_ss_push_event(s, SP_EV_READY);
            return 0;
        }
        sp_ss_die_reply(s, ph, r);
        return -1;
    case CMD_QUIT:
        sp_ss_set_state(s, SP_ST_CLOSED);
        sp_ss_push_event(s, SP_EV_CLOSED);
        return 0;
    case CMD_STARTTLS:
        if (r->code == 220) {
            /* Bytes after the 220 and before the handshake were injected by
             * someone on the path (CVE-2011-0411 and kin): refuse them. */
            if (sp_reply_reader_pending(s->reader)) {
                sp_error e;
                sp_error_set(&e, SP_KIND_TLS, SP_PHASE_STARTTLS,
                             "plaintext received after the STARTTLS reply (response injection)");
                die(s, &e);
                return -1;
            }
            sp_ss_set_state(s, SP_ST_TLS);
            sp_ss_push_event(s, SP_EV_TLS);
            return 0;
        }
        if (s->starttls == SP_STARTTLS_REQUIRED) {
            sp_ss_die_reply(s, ph, r);
            s->err.kind = SP_KIND_TLS;
            return -1;
        }
        s->starttls = SP_STARTTLS_NO; /* opportunistic: carry on in plaintext */
        return sp_ss_after_ehlo(s);
    case CMD_AUTH:
        return sp_ss_on_auth_reply(s, r);
    }
    return 0;
oom:
    sp_ss_die_oom(s);
    return -1;
}

int sp_session_feed(sp_session *s, const char *buf, size_t len)
{
    if (s->state == SP_ST_DEAD)
        return -1;
    if (s->state == SP_ST_CLOSED)
        return 0; /* bytes after the QUIT reply are of no interest */
    s->bytes_in += len;
    if (sp_reply_reader_feed(s->reader, buf, len) < 0) {
        sp_ss_die_oom(s);
        return -1;
    }
    for (;;) {
        sp_reply r;
        memset(&r, 0, sizeof r);
        sp_reply_status st = sp_reply_reader_next(s->reader, &r);
        if (st == SP_REPLY_MORE)
            return 0;
        if (st == SP_REPLY_ERR) {
            sp_error e;
            sp_error_set(&e, SP_KIND_PROTOCOL, sp_session_phase(s), "malformed reply: %s",
                         sp_reply_reader_error(s->reader));
            die(s, &e);
            return -1;
        }
        s->replies++;
        sp_ss_scrub_reply(s, &r);
        s->cur_code = r.code;
        int rc = on_reply(s, &r);
        s->cur_code = 0;
        sp_reply_clear(&r);
        if (rc < 0)
            return -1;
        if (s->state == SP_ST_CLOSED)
            return 0;
    }
}

int sp_session_eof(sp_session *s)
{
    if (s->state == SP_ST_DEAD)
        return -1;
    if (s->state == SP_ST_CLOSED)
        return 0;
    if (s->state == SP_ST_QUIT) { /* closed without a 221: fine, we were leaving */
        sp_ss_set_state(s, SP_ST_CLOSED);
        s->aw_len = 0;
        sp_ss_push_event(s, SP_EV_CLOSED);
        return 0;
    }
    sp_error e;
    if (sp_reply_reader_pending(s->reader))
        sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(s),
                     "connection closed by the server in the middle of a reply");
    else
        sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(s), "connection closed by the server");
    die(s, &e);
    return -1;
}

int sp_session_timeout(sp_session *s)
{
    if (s->state == SP_ST_DEAD || s->state == SP_ST_CLOSED)
        return -1;
    sp_error e;
    if (s->state == SP_ST_GREETING && s->bytes_in == 0 && !s->tls_active) {
        /* Not one byte: a server that starts with TLS (implicit TLS, RFC 8314)
         * waits silently for the client's handshake, where an SMTP server
         * greets. The commonest misconfiguration gets its hint here. */
        sp_error_set(&e, SP_KIND_CONNECTION, SP_PHASE_GREETING,
                     "no greeting within %gs, and not one byte from the server: a server that expects TLS "
                     "from the first byte (implicit TLS, usually port 465) waits like this; set tls = \"implicit\"",
                     s->timeouts[SP_PHASE_GREETING]);
        e.silent = 1;
    } else {
        sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(s), "timed out waiting for the server");
    }
    die(s, &e);
    return -1;
}

void sp_session_fail(sp_session *s, const sp_error *err) { die(s, err); }

const sp_buf *sp_session_output(const sp_session *s) { return &s->out; }

void sp_session_handing(sp_session *s, size_t n)
{
    if (n > sp_buf_pending(&s->out))
        n = sp_buf_pending(&s->out);
    if (s->written + n > s->handed)
        s->handed = s->written + n;
}

void sp_session_consume(sp_session *s, size_t n)
{
    sp_buf_consume(&s->out, n);
    s->written += n;
    if (s->handed < s->written)
        s->handed = s->written;
    for (size_t i = 0; i < s->fly_len; i++) {
        size_t k = (s->fly_head + i) % FLY_MAX;
        if (s->fly_mark[k] && s->written >= s->fly_mark[k])
            s->fly[k].dot_written = 1;
    }
    if (s->dot_mark && s->written >= s->dot_mark && s->tx_active)
        s->tx.dot_written = 1;
}

void sp_session_tls_done(sp_session *s)
{
    if (s->state != SP_ST_TLS)
        return;
    /* RFC 3207 4.2: forget everything learned before the handshake. */
    s->tls_active = 1;
    memset(&s->caps, 0, sizeof s->caps);
    s->pipelining = 0;
    sp_reply_reader_reset(s->reader);
    sp_ss_set_state(s, SP_ST_EHLO);
    if (send_ehlo(s, "EHLO", CMD_EHLO) < 0)
        sp_ss_die_oom(s);
}

int sp_session_tls_active(const sp_session *s) { return s->tls_active; }
unsigned sp_session_auth_mech(const sp_session *s) { return s->authed ? s->auth_mech : 0; }

sp_state sp_session_state(const sp_session *s) { return s->state; }

sp_phase sp_session_phase(const sp_session *s)
{
    if (s->state == SP_ST_BODY)
        return SP_PHASE_DATA;
    if (s->state == SP_ST_TLS)
        return SP_PHASE_STARTTLS;
    if (s->aw_len)
        return phase_of(s->aw[s->aw_head].c);
    return SP_PHASE_NONE;
}

const sp_caps *sp_session_caps(const sp_session *s) { return &s->caps; }
const sp_tx *sp_session_tx(const sp_session *s)
{
    return s->done_len ? &s->done[s->done_head] : &s->tx;
}

void sp_session_tx_done(sp_session *s)
{
    if (!s->done_len)
        return;
    sp_ss_tx_clear(&s->done[s->done_head]);
    s->done_head = (s->done_head + 1) % DONE_MAX;
    s->done_len--;
}

int sp_session_tx_open(const sp_session *s) { return s->tx_active; }
const sp_error *sp_session_error(const sp_session *s) { return &s->err; }
unsigned sp_session_tx_count(const sp_session *s) { return s->tx_count; }

unsigned long sp_session_replies(const sp_session *s) { return s->replies; }
const sp_reply *sp_session_greeting(const sp_session *s) { return &s->greeting; }

double sp_default_timeout(sp_phase ph)
{
    switch (ph) {
    case SP_PHASE_DATA: return 180;     /* DATA initiation is 2 min, data blocks 3 min */
    case SP_PHASE_DATA_END: return 600; /* the final dot: 10 min */
    case SP_PHASE_CONNECT: return 30;
    case SP_PHASE_GREETING: return 30; /* RFC 5321 says 5 min for relays; see sp_session.h */
    default: return 300;
    }
}

void sp_session_activity(sp_session *s, double now) { s->timed_at = now; }

double sp_session_phase_timeout(const sp_session *s, sp_phase ph)
{
    return (unsigned)ph < SP_PHASE_COUNT ? s->timeouts[ph] : sp_default_timeout(ph);
}

double sp_session_deadline(sp_session *s, double now)
{
    sp_phase ph = sp_session_phase(s);
    if (ph != s->timed_phase || s->replies != s->timed_replies) {
        s->timed_phase = ph;
        s->timed_replies = s->replies;
        s->timed_at = now;
    }
    if (ph == SP_PHASE_NONE)
        return 0;
    return s->timed_at + s->timeouts[ph];
}
