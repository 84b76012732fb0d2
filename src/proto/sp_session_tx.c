/* sp_session_tx: a transaction from MAIL to its final dot or last BDAT
 * chunk, the ring of transactions awaiting their final replies, and the
 * checks of a session's options. */
#include "sp_session_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "sp_envelope.h"
#include "sp_sasl.h"

/* RFC 5321 4.1.3: a Domain (letters, digits, hyphens, dots; underscores
 * tolerated, as real host names carry them) or an address literal. */
int sp_session_valid_helo(const char *h)
{
    size_t n = strlen(h);
    if (n == 0 || n > 255)
        return 0;
    if (h[0] == '[') {
        if (n < 3 || h[n - 1] != ']')
            return 0;
        for (size_t i = 1; i + 1 < n; i++) {
            unsigned char c = (unsigned char)h[i];
            if (!(c >= '0' && c <= '9') && !(c >= 'a' && c <= 'z') && !(c >= 'A' && c <= 'Z') && c != ':' &&
                c != '.' && c != '-')
                return 0;
        }
        return 1;
    }
    if (h[0] == '.' || h[n - 1] == '.' || strstr(h, ".."))
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)h[i];
        if (!(c >= '0' && c <= '9') && !(c >= 'a' && c <= 'z') && !(c >= 'A' && c <= 'Z') && c != '-' &&
            c != '.' && c != '_')
            return 0;
    }
    return 1;
}

static int has_any(const char *p, const char *bad)
{
    return p && p[strcspn(p, bad)] != '\0';
}

int sp_session_opts_check(const sp_session_opts *o, sp_error *err)
{
    sp_error_clear(err);
    if (!o)
        return 0;
    if (o->helo && !sp_session_valid_helo(o->helo)) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_EHLO,
                     "helo must be a domain name or an address literal such as [192.0.2.1]");
        return -1;
    }
    /* The user and secret travel base64-encoded, yet CR and LF are never
     * part of a credential (a LOGIN server decodes them into its own lines),
     * and ^A separates XOAUTH2's fields: a user or token holding one could
     * add fields of its own. */
    if (o->auth_user) {
        for (const unsigned char *p = (const unsigned char *)o->auth_user; *p; p++)
            if (*p < 0x20 || *p == 0x7f) {
                sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_AUTH, "auth.user must not contain control bytes");
                return -1;
            }
    }
    if (has_any(o->auth_secret, o->auth_mech == SP_AUTH_XOAUTH2 ? "\r\n\001" : "\r\n")) {
        sp_error_set(err, SP_KIND_CONFIG, SP_PHASE_AUTH,
                     "the AUTH secret (password or token) must not contain CR, LF or, for XOAUTH2, ^A");
        return -1;
    }
    return 0;
}

void sp_ss_tx_clear(sp_tx *t)
{
    free(t->from);
    for (size_t i = 0; i < t->nrcpt; i++) {
        free(t->rcpts[i].address);
        free(t->rcpts[i].text);
    }
    free(t->rcpts);
    free(t->rcpt_params);
    sp_reply_clear(&t->final);
    memset(t, 0, sizeof *t);
}

/* A transaction has its outcome: it moves to the done queue (where
 * sp_session_tx finds it until sp_session_tx_done) and TX_DONE is queued. */
void sp_ss_tx_done(sp_session *s, sp_tx *t)
{
    t->done = 1;
    if (s->done_len == DONE_MAX) { /* a driver that never takes them: the oldest goes */
        sp_ss_tx_clear(&s->done[s->done_head]);
        s->done_head = (s->done_head + 1) % DONE_MAX;
        s->done_len--;
    }
    s->done[(s->done_head + s->done_len++) % DONE_MAX] = *t;
    memset(t, 0, sizeof *t);
    if (t == &s->tx)
        s->tx_active = 0;
    sp_ss_push_event(s, SP_EV_TX_DONE);
}

/* How many transactions may await their final reply behind the current one. */
static size_t fly_room(const sp_session *s)
{
    if (!s->bdat)
        return 1; /* DATA: the next MAIL may follow a dot (RFC 2920), one dot unanswered at a time */
    return s->window > 1 ? (size_t)(s->window - 1) : 0;
}

/* Takes the oldest in-flight transaction out of the window (its outcome is
 * set) and reports it. */
void sp_ss_fly_pop(sp_session *s)
{
    sp_tx *t = sp_ss_fly_at(s, 0);
    s->fly_mark[s->fly_head] = 0;
    s->fly_head = (s->fly_head + 1) % FLY_MAX;
    s->fly_len--;
    sp_ss_tx_done(s, t);
}

/* A slot of the window freed: NEXT if it was withheld. */
static void offer_next(sp_session *s)
{
    if (s->next_owed && s->state == SP_ST_DATA_END && s->tx_active && !s->bdat_broken &&
        s->fly_len < fly_room(s)) {
        s->next_owed = 0;
        sp_ss_push_event(s, SP_EV_NEXT);
    }
}

void sp_ss_set_tx_err_reply(sp_tx *t, sp_phase ph, const sp_reply *r)
{
    sp_error_clear(&t->err);
    t->err.kind = sp_kind_of_code(r->code);
    t->err.phase = ph;
    t->err.code = r->code;
    memcpy(t->err.enhanced, r->enhanced, sizeof t->err.enhanced);
    snprintf(t->err.text, sizeof t->err.text, "%s", r->text ? r->text : "");
}

void sp_ss_move_reply(sp_reply *dst, sp_reply *src)
{
    sp_reply_clear(dst);
    *dst = *src;
    memset(src, 0, sizeof *src);
}

/* Whether any reply of the current transaction is still awaited. */
static int tx_replies_pending(const sp_session *s)
{
    for (size_t i = 0; i < s->aw_len; i++) {
        cmd c = s->aw[s->aw_head + i].c;
        if (c == CMD_MAIL || c == CMD_RCPT || c == CMD_DATA || c == CMD_DATA_END ||
            c == CMD_DATA_DISCARD)
            return 1;
    }
    return 0;
}

/* A failed transaction whose replies are all in: report it and RSET. */
int sp_ss_finish_failed_tx(sp_session *s)
{
    if (tx_replies_pending(s))
        return 0;
    s->tx.ok = 0;
    sp_ss_tx_done(s, &s->tx);
    sp_ss_set_state(s, SP_ST_RSET);
    if (sp_ss_queue_cmd(s, "RSET", CMD_RSET, 0) < 0)
        return -1;
    return 0;
}

static void fail_all_rcpts(sp_tx *t)
{
    /* No recipient was accepted: the transaction fails with the first
     * rejection's reply, which the result's recipient list details. */
    for (size_t i = 0; i < t->nrcpt; i++) {
        if (t->rcpts[i].code && t->rcpts[i].code >= 300) {
            sp_error_clear(&t->err);
            t->err.kind = sp_kind_of_code(t->rcpts[i].code);
            t->err.phase = SP_PHASE_RCPT;
            t->err.code = t->rcpts[i].code;
            memcpy(t->err.enhanced, t->rcpts[i].enhanced, sizeof t->err.enhanced);
            snprintf(t->err.text, sizeof t->err.text, "%s", t->rcpts[i].text ? t->rcpts[i].text : "");
            return;
        }
    }
}

void sp_ss_record_rcpt(sp_tx *t, size_t idx, sp_reply *r)
{
    sp_rcpt_result *rr = &t->rcpts[idx];
    rr->code = r->code;
    memcpy(rr->enhanced, r->enhanced, sizeof rr->enhanced);
    free(rr->text);
    rr->text = r->text;
    r->text = NULL;
    t->answered++;
    if (r->code / 100 == 2)
        t->accepted++;
}

/* Queues one RCPT TO. */
static int send_rcpt_as(sp_session *s, size_t i, cmd c)
{
    size_t before = sp_buf_pending(&s->out);
    if (sp_envelope_rcpt(&s->out, s->tx.rcpts[i].address, s->tx.rcpt_params, s->tx.orcpt) < 0)
        return -1;
    s->queued += sp_buf_pending(&s->out) - before;
    return sp_ss_await(s, c, i);
}

/* A reply to a BDAT transaction's command (RFC 3030, always pipelined): it
 * belongs to the oldest transaction still awaiting replies, and the reply
 * to its last chunk ends it. A failed one stops the window: no transaction
 * starts until every reply is in, then RSET. */
int sp_ss_on_bdat_reply(sp_session *s, awaited a, sp_phase ph, sp_reply *r)
{
    sp_tx *t = sp_ss_owner(s);
    int cls = r->code / 100;
    switch (a.c) {
    case CMD_BMAIL:
        if (cls != 2 && !t->err.kind)
            sp_ss_set_tx_err_reply(t, ph, r);
        return 0;
    case CMD_BRCPT:
        sp_ss_record_rcpt(t, a.idx, r);
        return 0;
    case CMD_BDAT:
        if (cls != 2 && !t->err.kind) {
            if (t->accepted == 0)
                fail_all_rcpts(t);
            if (!t->err.kind)
                sp_ss_set_tx_err_reply(t, ph, r);
        }
        return 0;
    default: /* CMD_BDAT_LAST */
        break;
    }
    int was_broken = s->bdat_broken;
    sp_ss_move_reply(&t->final, r);
    if (cls == 2 && !t->err.kind && t->accepted > 0) {
        t->ok = 1;
        s->tx_count++;
    } else {
        t->ok = 0;
        if (!t->err.kind && t->accepted == 0)
            fail_all_rcpts(t);
        if (!t->err.kind)
            sp_ss_set_tx_err_reply(t, ph, &t->final);
        /* A server may answer the transactions pipelined behind a failed one
         * "bad sequence" (503): that says nothing about the message itself. */
        if (was_broken && t->err.code == 503) {
            t->err.kind = SP_KIND_TRANSIENT;
            size_t l = strlen(t->err.text);
            snprintf(t->err.text + l, sizeof t->err.text - l, " (behind a failed BDAT transaction)");
        }
        s->bdat_broken = 1;
    }
    if (s->fly_len) {
        sp_ss_fly_pop(s);
        offer_next(s);
        return 0;
    }
    sp_ss_tx_done(s, &s->tx);
    if (s->quit_after) { /* QUIT left with the last chunk: its 221 comes next */
        sp_ss_set_state(s, SP_ST_QUIT);
        return 0;
    }
    if (s->bdat_broken) {
        s->bdat_broken = 0;
        sp_ss_set_state(s, SP_ST_RSET);
        if (sp_ss_queue_cmd(s, "RSET", CMD_RSET, 0) < 0) {
            sp_ss_die_oom(s);
            return -1;
        }
        return 0;
    }
    sp_ss_set_state(s, SP_ST_READY);
    sp_ss_push_event(s, SP_EV_READY);
    return 0;
}

static int not_ready(sp_session *s, sp_error *err, const char *what)
{
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "cannot %s: session is not ready (state %d)", what,
                 (int)s->state);
    return -1;
}

void sp_session_gate_dot(sp_session *s) { s->gate_armed = s->tx_active; }
void sp_session_gate_open(sp_session *s) { s->gated = 0; }
int sp_session_gated(const sp_session *s) { return s->gated; }

int sp_session_uses_bdat(const sp_session *s)
{
    return s->window > 0 && s->pipelining && (s->caps.flags & SP_CAP_CHUNKING);
}

int sp_session_start_tx(sp_session *s, const sp_tx_opts *o, sp_error *err)
{
    sp_error_clear(err);
    /* RFC 2920: with PIPELINING the next MAIL may follow a final dot
     * before its reply (one dot unanswered at a time); with CHUNKING, up to
     * window transactions may await their final replies. */
    int next = s->state == SP_ST_DATA_END && s->pipelining && s->tx_active && !s->quit_after && !s->bdat_broken &&
               s->fly_len < fly_room(s);
    if (s->state != SP_ST_READY && !next)
        return not_ready(s, err, "start a transaction");
    int utf8 = 0;
    if (sp_envelope_check(o, &s->caps, s->tls_active, &utf8, err) < 0)
        return -1;
    if (next) {
        size_t k = (s->fly_head + s->fly_len) % FLY_MAX;
        s->fly[k] = s->tx;
        s->fly_mark[k] = s->dot_mark;
        s->fly_len++;
        memset(&s->tx, 0, sizeof s->tx);
        s->dot_mark = 0;
    }
    s->next_owed = 0;
    s->bdat = sp_session_uses_bdat(s);
    s->gate_armed = 0;

    sp_ss_tx_clear(&s->tx);
    sp_tx *t = &s->tx;
    sp_buf mail;
    sp_buf_init(&mail);
    t->from = strdup(o->from);
    t->rcpts = calloc(o->nrcpt, sizeof *t->rcpts);
    if (!t->from || !t->rcpts)
        goto oom;
    t->nrcpt = o->nrcpt;
    for (size_t i = 0; i < o->nrcpt; i++)
        if (!(t->rcpts[i].address = strdup(o->rcpts[i])))
            goto oom;
    int params_oom;
    t->rcpt_params = sp_envelope_rcpt_params(o, &s->caps, &params_oom);
    if (params_oom)
        goto oom;
    t->orcpt = (s->caps.flags & SP_CAP_DSN) ? o->dsn_orcpt : 0;
    if (sp_envelope_mail(&mail, o, &s->caps, utf8, err) < 0 || sp_buf_append(&mail, "", 1) < 0) {
        sp_buf_free(&mail);
        sp_ss_tx_clear(&s->tx);
        if (err->kind == SP_KIND_NONE)
            sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
        return -1;
    }
    s->tx_active = 1;
    s->quit_after = o->quit_after && s->pipelining;
    t->bdat = s->bdat;
    t->quit = s->quit_after;
    s->dot_mark = 0;
    sp_ss_set_state(s, SP_ST_TX);
    int rc = sp_ss_queue_cmd(s, sp_buf_head(&mail), s->bdat ? CMD_BMAIL : CMD_MAIL, 0);
    sp_buf_free(&mail);
    if (rc < 0)
        goto oom_dead;
    if (s->bdat) { /* RFC 3030: MAIL, every RCPT, then the body as BDAT chunks, no reply awaited */
        for (size_t i = 0; i < t->nrcpt; i++)
            if (send_rcpt_as(s, i, CMD_BRCPT) < 0)
                goto oom_dead;
        sp_buf_reset(&s->chunk);
        sp_dotstuff_init(&s->ds);
        s->ds.nostuff = 1;
        sp_ss_set_state(s, SP_ST_BODY);
        sp_ss_push_event(s, SP_EV_BODY);
        return 0;
    }
    if (s->pipelining) { /* RFC 2920: MAIL, every RCPT and DATA in one group */
        for (size_t i = 0; i < t->nrcpt; i++)
            if (sp_ss_send_rcpt(s, i) < 0)
                goto oom_dead;
        if (sp_ss_queue_cmd(s, "DATA", CMD_DATA, 0) < 0)
            goto oom_dead;
    }
    return 0;
oom:
    sp_buf_free(&mail);
    sp_ss_tx_clear(&s->tx);
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
    return -1;
oom_dead:
    sp_ss_die_oom(s);
    *err = s->err;
    return -1;
}

/* BDAT: the body bytes gathered so far leave as one chunk ("BDAT n" and the
 * bytes; "BDAT n LAST" for the last). A chunk is framed only when more
 * bytes arrive or the body ends, so a message fed in one piece is one
 * "BDAT n LAST". */
static int flush_chunk(sp_session *s, int last)
{
    char line[48];
    size_t n = sp_buf_pending(&s->chunk);
    if (!n && !last)
        return 0;
    snprintf(line, sizeof line, last ? "BDAT %zu LAST\r\n" : "BDAT %zu\r\n", n);
    size_t ll = strlen(line);
    if (sp_buf_append(&s->out, line, ll) < 0 || sp_buf_append(&s->out, sp_buf_head(&s->chunk), n) < 0 ||
        sp_ss_await(s, last ? CMD_BDAT_LAST : CMD_BDAT, 0) < 0)
        return -1;
    s->queued += ll + n;
    sp_buf_reset(&s->chunk);
    return 0;
}

int sp_session_body(sp_session *s, const char *p, size_t n, sp_error *err)
{
    if (s->state != SP_ST_BODY)
        return not_ready(s, err, "send body bytes");
    if (s->bdat) {
        if (n == 0)
            return 0;
        if (flush_chunk(s, 0) < 0 || sp_dotstuff_feed(&s->ds, p, n, &s->chunk) < 0) {
            sp_ss_die_oom(s);
            *err = s->err;
            return -1;
        }
        return 0;
    }
    size_t before = sp_buf_pending(&s->out);
    if (sp_dotstuff_feed(&s->ds, p, n, &s->out) < 0) {
        sp_ss_die_oom(s);
        *err = s->err;
        return -1;
    }
    s->queued += sp_buf_pending(&s->out) - before;
    return 0;
}

int sp_session_body_end(sp_session *s, sp_error *err)
{
    if (s->state != SP_ST_BODY)
        return not_ready(s, err, "end the body");
    if (s->bdat) {
        if (sp_dotstuff_end_line(&s->ds, &s->chunk) < 0 || flush_chunk(s, 1) < 0) {
            sp_ss_die_oom(s);
            *err = s->err;
            return -1;
        }
    } else {
        size_t before = sp_buf_pending(&s->out);
        if (sp_dotstuff_finish(&s->ds, &s->out) < 0 || sp_ss_await(s, CMD_DATA_END, 0) < 0) {
            sp_ss_die_oom(s);
            *err = s->err;
            return -1;
        }
        s->queued += sp_buf_pending(&s->out) - before;
    }
    s->dot_mark = s->queued;
    if (s->gate_armed) {
        s->gate_armed = 0;
        s->gated = 1;
    }
    if (s->quit_after && sp_ss_queue_cmd(s, "QUIT", CMD_QUIT, 0) < 0) {
        sp_ss_die_oom(s);
        *err = s->err;
        return -1;
    }
    sp_ss_set_state(s, SP_ST_DATA_END);
    if (s->pipelining && !s->quit_after) {
        /* the next transaction may follow the dot now, if the window has room */
        s->next_owed = 1;
        offer_next(s);
    }
    return 0;
}

static int simple_cmd(sp_session *s, const char *verb, cmd c, sp_state st, sp_error *err)
{
    if (s->state != SP_ST_READY)
        return not_ready(s, err, verb);
    sp_ss_set_state(s, st);
    if (sp_ss_queue_cmd(s, verb, c, 0) < 0) {
        sp_ss_die_oom(s);
        *err = s->err;
        return -1;
    }
    return 0;
}

int sp_session_quit(sp_session *s)
{
    if (s->state == SP_ST_DEAD || s->state == SP_ST_CLOSED || s->state == SP_ST_QUIT)
        return 0;
    /* QUIT goes out whatever is pending; replies still awaited are dropped. */
    s->aw_len = 0;
    s->aw_head = 0;
    sp_ss_set_state(s, SP_ST_QUIT);
    if (sp_ss_queue_cmd(s, "QUIT", CMD_QUIT, 0) < 0) {
        sp_ss_die_oom(s);
        return -1;
    }
    return 0;
}

void sp_ss_fail_tx_all_rcpts(sp_session *s) { fail_all_rcpts(&s->tx); }

int sp_ss_send_rcpt(sp_session *s, size_t i) { return send_rcpt_as(s, i, CMD_RCPT); }

int sp_session_noop(sp_session *s, sp_error *err) { return simple_cmd(s, "NOOP", CMD_NOOP, SP_ST_NOOP, err); }

int sp_session_rset(sp_session *s, sp_error *err) { return simple_cmd(s, "RSET", CMD_RSET, SP_ST_RSET, err); }
