#include "sp_session.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "sp_codec.h"
#include "sp_envelope.h"
#include "sp_sasl.h"

/* One awaited reply: which command it answers. */
typedef enum cmd {
    CMD_GREETING,
    CMD_EHLO,
    CMD_HELO,
    CMD_MAIL,
    CMD_RCPT,
    CMD_DATA,
    CMD_DATA_END,
    CMD_DATA_DISCARD, /* the empty body sent when DATA got 354 but no recipient was accepted */
    CMD_RSET,
    CMD_NOOP,
    CMD_QUIT,
    CMD_STARTTLS,
    CMD_AUTH, /* every step of the AUTH exchange */
    /* CHUNKING (RFC 3030): a BDAT transaction's commands, all pipelined; the
     * reply goes to the oldest transaction still waiting for one */
    CMD_BMAIL,
    CMD_BRCPT,
    CMD_BDAT,     /* a chunk that is not the last */
    CMD_BDAT_LAST /* the last chunk: its reply is the transaction's outcome */
} cmd;

typedef struct awaited {
    cmd c;
    size_t idx;             /* recipient index for CMD_RCPT */
    unsigned long long end; /* the output offset where the command ends: its reply cannot come before */
} awaited;

#define EVQ SP_SESSION_EVENTS_MAX
#define FLY_MAX SP_BDAT_WINDOW_MAX /* transactions awaiting their final reply behind the current one */
_Static_assert(EVQ >= 2 * (FLY_MAX + 1) + 8, "the event queue holds every transaction's outcome and more");
#define DONE_MAX (FLY_MAX + 4)
#define SP_REDACT_MAX 8
#define SP_TRACE_MAX 32

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

struct sp_session {
    sp_state state;
    char helo[256];
    sp_reply_reader *reader;
    sp_buf out;
    unsigned long long queued;  /* bytes ever queued to out */
    unsigned long long written; /* bytes ever consumed from out */
    unsigned long long handed;  /* bytes handed to the transport (>= written): replies may answer them */
    unsigned long long dot_mark;
    sp_caps caps;
    sp_reply greeting;
    sp_error err;
    sp_tx tx;
    int tx_active;
    /* RFC 2920: the next transaction may start once this one's final dot (or
     * last BDAT chunk) is queued; the ones awaiting their final replies wait
     * here, oldest first: one with DATA, up to window - 1 with BDAT. */
    sp_tx fly[FLY_MAX];
    unsigned long long fly_mark[FLY_MAX];
    size_t fly_head, fly_len;
    int window;      /* transactions in flight at once with BDAT; 0: never BDAT */
    int bdat;        /* the current transaction goes as BDAT chunks */
    sp_buf chunk;    /* BDAT: body bytes not yet framed as a chunk */
    int bdat_broken; /* a BDAT transaction failed: none starts until every reply is in, then RSET */
    int next_owed;   /* NEXT was withheld (window full): due when a slot frees */
    /* finished transactions whose outcome the driver has not taken yet */
    sp_tx done[DONE_MAX];
    size_t done_head, done_len;
    int quit_after; /* QUIT follows this transaction's final dot */
    int pipelining;
    sp_dotstuff ds;
    unsigned tx_count;
    awaited *aw;
    size_t aw_head, aw_len, aw_cap;
    int starttls, tls_active, allow_plaintext_auth;
    int auth_gate, auth_waiting, auth_mech_chosen; /* AUTH waits for sp_session_auth_go */
    char *auth_user, *auth_secret;
    unsigned auth_want, auth_mech;
    int auth_step, authed;
    /* What the server must never get to echo into an error or a log: the
     * secret and every base64 line the AUTH exchange sent (wiped on free). */
    char *redact[SP_REDACT_MAX];
    size_t nredact;
    unsigned long replies;
    int cur_code; /* the reply being handled, for the trace */
    int trace;
    sp_transition tr[SP_TRACE_MAX];
    size_t tr_head, tr_len;
    unsigned long tr_dropped;
    sp_event evq[EVQ];
    size_t ev_head, ev_len;
};

static void push_event(sp_session *s, sp_event e)
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
static void set_state(sp_session *s, sp_state to)
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
    return e;
}

static int await(sp_session *s, cmd c, size_t idx)
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

static int queue_cmd(sp_session *s, const char *line, cmd c, size_t idx)
{
    size_t n = strlen(line);
    if (sp_buf_append(&s->out, line, n) < 0 || sp_buf_append(&s->out, "\r\n", 2) < 0)
        return -1;
    s->queued += n + 2;
    return await(s, c, idx);
}

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

/* Remembers a string the server must not echo back into our errors. */
static void add_redact(sp_session *s, const char *p, size_t n)
{
    if (n == 0 || s->nredact == SP_REDACT_MAX)
        return;
    char *c = malloc(n + 1);
    if (!c)
        return;
    memcpy(c, p, n);
    c[n] = 0;
    s->redact[s->nredact++] = c;
}

/* Where secret sec starts in hay, in any letter case and with line breaks
 * and blanks allowed between its characters (a server that folds an echo
 * over two reply lines, or lower-cases it); *span is how much of hay the
 * match covers. NULL when it is not there. */
static const char *find_loose(const char *hay, const char *sec, size_t *span)
{
    for (const char *h = hay; *h; h++) {
        const char *p = h, *q = sec;
        while (*q && *p) {
            if (p != h && (*p == '\n' || *p == '\r' || *p == ' ' || *p == '\t')) {
                p++;
                continue;
            }
            if (tolower((unsigned char)*p) != tolower((unsigned char)*q))
                break;
            p++;
            q++;
        }
        if (!*q) {
            *span = (size_t)(p - h);
            return h;
        }
    }
    return NULL;
}

/* Replaces every remembered secret in a reply's text with "[redacted]", so
 * a server that echoes the client's AUTH line, the password or its base64
 * (whole, folded over lines, in another case) cannot put the credentials
 * into an error, an event or a log. */
static void scrub_reply(sp_session *s, sp_reply *r)
{
    static const char mark[] = "[redacted]";
    if (!r->text || s->nredact == 0)
        return;
    for (size_t k = 0; k < s->nredact; k++) {
        const char *sec = s->redact[k];
        size_t span;
        const char *hit = find_loose(r->text, sec, &span);
        if (!hit)
            continue;
        /* each match covers at least one character: the result is at most
         * text_len * sizeof mark long */
        size_t cap = (r->text_len + 1) * sizeof mark + 1;
        char *out = malloc(cap);
        if (!out) { /* cannot rewrite: drop the text rather than leak it */
            OPENSSL_cleanse(r->text, r->text_len);
            r->text[0] = 0;
            r->text_len = 0;
            return;
        }
        size_t o = 0;
        const char *p = r->text;
        while (hit) {
            memcpy(out + o, p, (size_t)(hit - p));
            o += (size_t)(hit - p);
            memcpy(out + o, mark, sizeof mark - 1);
            o += sizeof mark - 1;
            p = hit + span;
            hit = find_loose(p, sec, &span);
        }
        size_t rest = strlen(p);
        memcpy(out + o, p, rest + 1);
        o += rest;
        OPENSSL_cleanse(r->text, r->text_len);
        free(r->text);
        r->text = out;
        r->text_len = o;
    }
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
            add_redact(s, s->auth_secret, strlen(s->auth_secret));
            /* and its base64, which no AUTH line carries alone but a
             * server may echo decoded-then-re-encoded */
            size_t sl = strlen(s->auth_secret);
            char *b = sl ? malloc(sp_base64_encoded_len(sl) + 1) : NULL;
            if (b) {
                sp_base64_encode((const unsigned char *)s->auth_secret, sl, b);
                b[sp_base64_encoded_len(sl)] = 0;
                add_redact(s, b, strlen(b));
                OPENSSL_cleanse(b, strlen(b));
                free(b);
            }
        }
    }
    if (await(s, CMD_GREETING, 0) < 0) {
        sp_session_free(s);
        return NULL;
    }
    return s;
}

static void tx_clear(sp_tx *t)
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
static void tx_done(sp_session *s, sp_tx *t)
{
    t->done = 1;
    if (s->done_len == DONE_MAX) { /* a driver that never takes them: the oldest goes */
        tx_clear(&s->done[s->done_head]);
        s->done_head = (s->done_head + 1) % DONE_MAX;
        s->done_len--;
    }
    s->done[(s->done_head + s->done_len++) % DONE_MAX] = *t;
    memset(t, 0, sizeof *t);
    if (t == &s->tx)
        s->tx_active = 0;
    push_event(s, SP_EV_TX_DONE);
}

static sp_tx *fly_at(sp_session *s, size_t i) { return &s->fly[(s->fly_head + i) % FLY_MAX]; }

/* The transaction the reply at the head of the awaited queue belongs to:
 * replies come in the order the commands left, oldest transaction first. */
static sp_tx *owner(sp_session *s) { return s->fly_len ? fly_at(s, 0) : &s->tx; }

/* How many transactions may await their final reply behind the current one. */
static size_t fly_room(const sp_session *s)
{
    if (!s->bdat)
        return 1; /* DATA: the next MAIL may follow a dot (RFC 2920), one dot unanswered at a time */
    return s->window > 1 ? (size_t)(s->window - 1) : 0;
}

/* Takes the oldest in-flight transaction out of the window (its outcome is
 * set) and reports it. */
static void fly_pop(sp_session *s)
{
    sp_tx *t = fly_at(s, 0);
    s->fly_mark[s->fly_head] = 0;
    s->fly_head = (s->fly_head + 1) % FLY_MAX;
    s->fly_len--;
    tx_done(s, t);
}

/* A slot of the window freed: NEXT if it was withheld. */
static void offer_next(sp_session *s)
{
    if (s->next_owed && s->state == SP_ST_DATA_END && s->tx_active && !s->bdat_broken &&
        s->fly_len < fly_room(s)) {
        s->next_owed = 0;
        push_event(s, SP_EV_NEXT);
    }
}

void sp_session_free(sp_session *s)
{
    if (!s)
        return;
    sp_reply_reader_free(s->reader);
    sp_buf_free(&s->out);
    sp_reply_clear(&s->greeting);
    tx_clear(&s->tx);
    for (size_t i = 0; i < FLY_MAX; i++)
        tx_clear(&s->fly[i]);
    sp_buf_free(&s->chunk);
    for (size_t i = 0; i < DONE_MAX; i++)
        tx_clear(&s->done[i]);
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
        sp_tx *t = owner(s);
        t->err = *err;
        if (t->dot_written && err->code == 0 && s->aw_len > 0)
            t->err.kind = SP_KIND_AMBIGUOUS;
        t->ok = 0;
        if (s->fly_len)
            fly_pop(s);
        else
            tx_done(s, t);
    }
    set_state(s, SP_ST_DEAD);
    s->aw_len = 0;
    sp_buf_reset(&s->out);
    push_event(s, SP_EV_ERROR);
}

static void die_reply(sp_session *s, sp_phase ph, const sp_reply *r)
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

static void die_oom(sp_session *s)
{
    sp_error e;
    sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(s), "out of memory");
    die(s, &e);
}

static void set_tx_err_reply(sp_tx *t, sp_phase ph, const sp_reply *r)
{
    sp_error_clear(&t->err);
    t->err.kind = sp_kind_of_code(r->code);
    t->err.phase = ph;
    t->err.code = r->code;
    memcpy(t->err.enhanced, r->enhanced, sizeof t->err.enhanced);
    snprintf(t->err.text, sizeof t->err.text, "%s", r->text ? r->text : "");
}

static void move_reply(sp_reply *dst, sp_reply *src)
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
static int finish_failed_tx(sp_session *s)
{
    if (tx_replies_pending(s))
        return 0;
    s->tx.ok = 0;
    tx_done(s, &s->tx);
    set_state(s, SP_ST_RSET);
    if (queue_cmd(s, "RSET", CMD_RSET, 0) < 0)
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

static void fail_tx_all_rcpts(sp_session *s) { fail_all_rcpts(&s->tx); }

static void record_rcpt(sp_tx *t, size_t idx, sp_reply *r)
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

static int send_ehlo(sp_session *s, const char *verb, cmd c)
{
    char line[300];
    snprintf(line, sizeof line, "%s %s", verb, s->helo);
    return queue_cmd(s, line, c, 0);
}

/* Queues one RCPT TO. */
static int send_rcpt_as(sp_session *s, size_t i, cmd c)
{
    size_t before = sp_buf_pending(&s->out);
    if (sp_envelope_rcpt(&s->out, s->tx.rcpts[i].address, s->tx.rcpt_params, s->tx.orcpt) < 0)
        return -1;
    s->queued += sp_buf_pending(&s->out) - before;
    return await(s, c, i);
}

static int send_rcpt(sp_session *s, size_t i) { return send_rcpt_as(s, i, CMD_RCPT); }

static void die_msg(sp_session *s, sp_kind kind, sp_phase ph, const char *text)
{
    sp_error e;
    sp_error_set(&e, kind, ph, "%s", text);
    die(s, &e);
}

/* Queues an AUTH line holding a secret (not through snprintf's fixed buffer). */
static int queue_secret(sp_session *s, const char *prefix, const unsigned char *raw, size_t n)
{
    size_t pl = strlen(prefix), bl = sp_base64_encoded_len(n);
    char *b = malloc(bl + 1);
    if (!b)
        return -1;
    sp_base64_encode(raw, n, b);
    int rc = 0;
    if (sp_buf_append(&s->out, prefix, pl) < 0 || sp_buf_append(&s->out, b, bl) < 0 ||
        sp_buf_append(&s->out, "\r\n", 2) < 0)
        rc = -1;
    s->queued += pl + bl + 2;
    b[bl] = 0;
    add_redact(s, b, bl);
    OPENSSL_cleanse(b, bl);
    free(b);
    return rc < 0 ? -1 : await(s, CMD_AUTH, 0);
}

/* The first AUTH line of mechanism m (RFC 4954 4: with the initial
 * response when the mechanism has one). */
static int auth_begin(sp_session *s, unsigned m)
{
    s->auth_mech = m;
    s->auth_step = 0;
    set_state(s, SP_ST_AUTH);
    unsigned char *raw;
    size_t n;
    if (sp_sasl_initial(m, s->auth_user, s->auth_secret, &raw, &n) < 0)
        return -1;
    char line[32];
    snprintf(line, sizeof line, raw ? "AUTH %s " : "AUTH %s", sp_auth_mech_name(m));
    if (!raw)
        return queue_cmd(s, line, CMD_AUTH, 0);
    int rc = queue_secret(s, line, raw, n);
    sp_sasl_free(raw, n);
    return rc;
}

/* Chooses the mechanism: the one asked for, else the strongest shared. */
static int start_auth(sp_session *s)
{
    if (!s->tls_active && !s->allow_plaintext_auth) {
        die_msg(s, SP_KIND_AUTH, SP_PHASE_AUTH,
                "refusing to send credentials over a connection without TLS "
                "(allow_plaintext_auth = true permits it)");
        return -1;
    }
    if (!(s->caps.flags & SP_CAP_AUTH)) {
        die_msg(s, SP_KIND_AUTH, SP_PHASE_AUTH, "the server does not offer AUTH");
        return -1;
    }
    const char *why = NULL;
    unsigned m = sp_sasl_choose(s->caps.auth, s->auth_want, &why);
    if (!m) {
        char t[160];
        if (s->auth_want)
            snprintf(t, sizeof t, "the server does not offer AUTH %s", sp_auth_mech_name(s->auth_want));
        else
            snprintf(t, sizeof t, "%s", why);
        die_msg(s, SP_KIND_AUTH, SP_PHASE_AUTH, t);
        return -1;
    }
    if (s->auth_gate) {
        /* the driver's caller spends its login window now, then lets it go */
        s->auth_waiting = 1;
        s->auth_mech_chosen = (int)m;
        set_state(s, SP_ST_AUTH);
        push_event(s, SP_EV_AUTH);
        return 0;
    }
    if (auth_begin(s, m) < 0) {
        die_oom(s);
        return -1;
    }
    return 0;
}

int sp_session_auth_go(sp_session *s)
{
    if (!s->auth_waiting)
        return -1;
    s->auth_waiting = 0;
    if (auth_begin(s, (unsigned)s->auth_mech_chosen) < 0) {
        die_oom(s);
        return -1;
    }
    return 0;
}

/* What follows a successful EHLO/HELO: STARTTLS, AUTH, or READY. */
static int after_ehlo(sp_session *s)
{
    if (!s->tls_active && s->starttls != SP_STARTTLS_NO) {
        if (s->caps.flags & SP_CAP_STARTTLS) {
            set_state(s, SP_ST_STARTTLS);
            if (queue_cmd(s, "STARTTLS", CMD_STARTTLS, 0) < 0)
                return die_oom(s), -1;
            return 0;
        }
        if (s->starttls == SP_STARTTLS_REQUIRED) {
            die_msg(s, SP_KIND_TLS, SP_PHASE_STARTTLS,
                    "the server does not offer STARTTLS and tls = \"starttls\" requires it");
            return -1;
        }
    }
    if (s->auth_user && !s->authed)
        return start_auth(s);
    set_state(s, SP_ST_READY);
    push_event(s, SP_EV_READY);
    return 0;
}

/* RFC 2195: answer the base64 challenge with "user hex(HMAC-MD5(secret, challenge))". */
static int cram_md5_response(sp_session *s, const sp_reply *r)
{
    unsigned char *raw;
    size_t n;
    int rc = sp_sasl_cram_md5(s->auth_user, s->auth_secret, r->text, r->text_len, &raw, &n);
    if (rc < 0)
        return rc;
    rc = queue_secret(s, "", raw, n);
    sp_sasl_free(raw, n);
    return rc;
}

static int on_auth_reply(sp_session *s, sp_reply *r)
{
    if (r->code == 235) {
        s->authed = 1;
        set_state(s, SP_ST_READY);
        push_event(s, SP_EV_READY);
        return 0;
    }
    if (r->code == 334) {
        int rc = 0;
        s->auth_step++;
        if (s->auth_mech == SP_AUTH_LOGIN && s->auth_step == 1)
            rc = queue_secret(s, "", (const unsigned char *)s->auth_user, strlen(s->auth_user));
        else if (s->auth_mech == SP_AUTH_LOGIN && s->auth_step == 2)
            rc = queue_secret(s, "", (const unsigned char *)s->auth_secret, strlen(s->auth_secret));
        else if (s->auth_mech == SP_AUTH_CRAM_MD5 && s->auth_step == 1)
            rc = cram_md5_response(s, r);
        else if (s->auth_mech == SP_AUTH_XOAUTH2 && s->auth_step == 1)
            rc = queue_secret(s, "", (const unsigned char *)"", 0); /* error details follow: ack them */
        else
            rc = -2;
        if (rc == -2) {
            die_msg(s, SP_KIND_PROTOCOL, SP_PHASE_AUTH, "unexpected 334 challenge in the AUTH exchange");
            return -1;
        }
        if (rc < 0)
            return die_oom(s), -1;
        return 0;
    }
    /* 535 bad credentials (and any 5xx) is final; 454 and other 4xx are transient. */
    die_reply(s, SP_PHASE_AUTH, r);
    if (r->code >= 500 || r->code == 421)
        s->err.kind = r->code == 421 ? SP_KIND_CONNECTION : SP_KIND_AUTH;
    return -1;
}

/* A reply to a BDAT transaction's command (RFC 3030, always pipelined): it
 * belongs to the oldest transaction still awaiting replies, and the reply
 * to its last chunk ends it. A failed one stops the window: no transaction
 * starts until every reply is in, then RSET. */
static int on_bdat_reply(sp_session *s, awaited a, sp_phase ph, sp_reply *r)
{
    sp_tx *t = owner(s);
    int cls = r->code / 100;
    switch (a.c) {
    case CMD_BMAIL:
        if (cls != 2 && !t->err.kind)
            set_tx_err_reply(t, ph, r);
        return 0;
    case CMD_BRCPT:
        record_rcpt(t, a.idx, r);
        return 0;
    case CMD_BDAT:
        if (cls != 2 && !t->err.kind) {
            if (t->accepted == 0)
                fail_all_rcpts(t);
            if (!t->err.kind)
                set_tx_err_reply(t, ph, r);
        }
        return 0;
    default: /* CMD_BDAT_LAST */
        break;
    }
    int was_broken = s->bdat_broken;
    move_reply(&t->final, r);
    if (cls == 2 && !t->err.kind && t->accepted > 0) {
        t->ok = 1;
        s->tx_count++;
    } else {
        t->ok = 0;
        if (!t->err.kind && t->accepted == 0)
            fail_all_rcpts(t);
        if (!t->err.kind)
            set_tx_err_reply(t, ph, &t->final);
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
        fly_pop(s);
        offer_next(s);
        return 0;
    }
    tx_done(s, &s->tx);
    if (s->quit_after) { /* QUIT left with the last chunk: its 221 comes next */
        set_state(s, SP_ST_QUIT);
        return 0;
    }
    if (s->bdat_broken) {
        s->bdat_broken = 0;
        set_state(s, SP_ST_RSET);
        if (queue_cmd(s, "RSET", CMD_RSET, 0) < 0) {
            die_oom(s);
            return -1;
        }
        return 0;
    }
    set_state(s, SP_ST_READY);
    push_event(s, SP_EV_READY);
    return 0;
}

/* Handles one complete reply. Returns -1 when the session died. */
static int on_reply(sp_session *s, sp_reply *r)
{
    if (s->aw_len == 0) {
        /* Unsolicited: a 421 is a server going away (RFC 5321 3.8); anything
         * else is a protocol violation. Either way the session is over. */
        if (r->code == 421) {
            die_reply(s, sp_session_phase(s), r);
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
        die_reply(s, ph, r);
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
            die_reply(s, ph, r);
            return -1;
        }
        move_reply(&s->greeting, r);
        set_state(s, SP_ST_EHLO);
        if (send_ehlo(s, "EHLO", CMD_EHLO) < 0)
            goto oom;
        return 0;
    case CMD_EHLO:
        if (cls == 2) {
            sp_caps_parse(&s->caps, r);
            s->pipelining = (s->caps.flags & SP_CAP_PIPELINING) != 0;
            return after_ehlo(s);
        }
        if (cls == 5) { /* EHLO refused: fall back to HELO (RFC 5321 4.1.1.1) */
            set_state(s, SP_ST_HELO);
            if (send_ehlo(s, "HELO", CMD_HELO) < 0)
                goto oom;
            return 0;
        }
        die_reply(s, ph, r);
        return -1;
    case CMD_HELO:
        if (cls == 2) {
            memset(&s->caps, 0, sizeof s->caps);
            s->pipelining = 0;
            return after_ehlo(s);
        }
        die_reply(s, ph, r);
        return -1;
    case CMD_MAIL:
        if (cls != 2 && !s->tx.err.kind)
            set_tx_err_reply(&s->tx, ph, r);
        if (cls != 2 && !s->pipelining)
            return finish_failed_tx(s) < 0 ? (die_oom(s), -1) : 0;
        if (!s->pipelining && send_rcpt(s, 0) < 0)
            goto oom;
        return 0;
    case CMD_RCPT: {
        record_rcpt(&s->tx, a.idx, r);
        if (s->pipelining)
            return 0;
        if (a.idx + 1 < s->tx.nrcpt) {
            if (send_rcpt(s, a.idx + 1) < 0)
                goto oom;
            return 0;
        }
        if (s->tx.accepted == 0) {
            fail_tx_all_rcpts(s);
            return finish_failed_tx(s) < 0 ? (die_oom(s), -1) : 0;
        }
        if (queue_cmd(s, "DATA", CMD_DATA, 0) < 0)
            goto oom;
        return 0;
    }
    case CMD_DATA:
        if (r->code == 354) {
            if (s->tx.accepted > 0 && !s->tx.err.kind) {
                set_state(s, SP_ST_BODY);
                sp_dotstuff_init(&s->ds);
                push_event(s, SP_EV_BODY);
                return 0;
            }
            /* Pipelined DATA accepted although the transaction failed: end
             * it with an empty body (RFC 2920 3.1) and ignore the reply. */
            if (sp_buf_append(&s->out, ".\r\n", 3) < 0 || await(s, CMD_DATA_DISCARD, 0) < 0)
                goto oom;
            s->queued += 3;
        } else if (!s->tx.err.kind) {
            if (s->tx.accepted == 0)
                fail_tx_all_rcpts(s);
            else
                set_tx_err_reply(&s->tx, ph, r);
        }
        if (s->tx.accepted == 0 && !s->tx.err.kind)
            fail_tx_all_rcpts(s);
        return finish_failed_tx(s) < 0 ? (die_oom(s), -1) : 0;
    case CMD_DATA_DISCARD:
        return finish_failed_tx(s) < 0 ? (die_oom(s), -1) : 0;
    case CMD_DATA_END:
        if (s->fly_len) {
            /* The reply to a dot the next transaction was pipelined behind:
             * that one carries on; no RSET (the reply ended this one). */
            sp_tx *t = fly_at(s, 0);
            move_reply(&t->final, r);
            if (cls == 2) {
                t->ok = 1;
                s->tx_count++;
            } else {
                set_tx_err_reply(t, ph, &t->final);
            }
            fly_pop(s);
            return 0;
        }
        move_reply(&s->tx.final, r);
        if (cls == 2) {
            s->tx.ok = 1;
            s->tx_count++;
            tx_done(s, &s->tx);
            if (s->quit_after) { /* QUIT left with the dot: its 221 comes next */
                set_state(s, SP_ST_QUIT);
                return 0;
            }
            set_state(s, SP_ST_READY);
            push_event(s, SP_EV_READY);
            return 0;
        }
        set_tx_err_reply(&s->tx, ph, &s->tx.final);
        if (s->quit_after) { /* no RSET: the session is ending */
            s->tx.ok = 0;
            tx_done(s, &s->tx);
            set_state(s, SP_ST_QUIT);
            return 0;
        }
        return finish_failed_tx(s) < 0 ? (die_oom(s), -1) : 0;
    case CMD_BMAIL:
    case CMD_BRCPT:
    case CMD_BDAT:
    case CMD_BDAT_LAST:
        return on_bdat_reply(s, a, ph, r);
    case CMD_RSET:
    case CMD_NOOP:
        if (cls == 2) {
            set_state(s, SP_ST_READY);
            push_event(s, SP_EV_READY);
            return 0;
        }
        die_reply(s, ph, r);
        return -1;
    case CMD_QUIT:
        set_state(s, SP_ST_CLOSED);
        push_event(s, SP_EV_CLOSED);
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
            set_state(s, SP_ST_TLS);
            push_event(s, SP_EV_TLS);
            return 0;
        }
        if (s->starttls == SP_STARTTLS_REQUIRED) {
            die_reply(s, ph, r);
            s->err.kind = SP_KIND_TLS;
            return -1;
        }
        s->starttls = SP_STARTTLS_NO; /* opportunistic: carry on in plaintext */
        return after_ehlo(s);
    case CMD_AUTH:
        return on_auth_reply(s, r);
    }
    return 0;
oom:
    die_oom(s);
    return -1;
}

int sp_session_feed(sp_session *s, const char *buf, size_t len)
{
    if (s->state == SP_ST_DEAD)
        return -1;
    if (s->state == SP_ST_CLOSED)
        return 0; /* bytes after the QUIT reply are of no interest */
    if (sp_reply_reader_feed(s->reader, buf, len) < 0) {
        die_oom(s);
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
        scrub_reply(s, &r);
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
        set_state(s, SP_ST_CLOSED);
        s->aw_len = 0;
        push_event(s, SP_EV_CLOSED);
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
    sp_error_set(&e, SP_KIND_CONNECTION, sp_session_phase(s), "timed out waiting for the server");
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

static int not_ready(sp_session *s, sp_error *err, const char *what)
{
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "cannot %s: session is not ready (state %d)", what,
                 (int)s->state);
    return -1;
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
    s->bdat = s->window > 0 && s->pipelining && (s->caps.flags & SP_CAP_CHUNKING);

    tx_clear(&s->tx);
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
        tx_clear(&s->tx);
        if (err->kind == SP_KIND_NONE)
            sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
        return -1;
    }
    s->tx_active = 1;
    s->quit_after = o->quit_after && s->pipelining;
    s->dot_mark = 0;
    set_state(s, SP_ST_TX);
    int rc = queue_cmd(s, sp_buf_head(&mail), s->bdat ? CMD_BMAIL : CMD_MAIL, 0);
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
        set_state(s, SP_ST_BODY);
        push_event(s, SP_EV_BODY);
        return 0;
    }
    if (s->pipelining) { /* RFC 2920: MAIL, every RCPT and DATA in one group */
        for (size_t i = 0; i < t->nrcpt; i++)
            if (send_rcpt(s, i) < 0)
                goto oom_dead;
        if (queue_cmd(s, "DATA", CMD_DATA, 0) < 0)
            goto oom_dead;
    }
    return 0;
oom:
    sp_buf_free(&mail);
    tx_clear(&s->tx);
    sp_error_set(err, SP_KIND_INVALID, SP_PHASE_NONE, "out of memory");
    return -1;
oom_dead:
    die_oom(s);
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
        await(s, last ? CMD_BDAT_LAST : CMD_BDAT, 0) < 0)
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
            die_oom(s);
            *err = s->err;
            return -1;
        }
        return 0;
    }
    size_t before = sp_buf_pending(&s->out);
    if (sp_dotstuff_feed(&s->ds, p, n, &s->out) < 0) {
        die_oom(s);
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
            die_oom(s);
            *err = s->err;
            return -1;
        }
    } else {
        size_t before = sp_buf_pending(&s->out);
        if (sp_dotstuff_finish(&s->ds, &s->out) < 0 || await(s, CMD_DATA_END, 0) < 0) {
            die_oom(s);
            *err = s->err;
            return -1;
        }
        s->queued += sp_buf_pending(&s->out) - before;
    }
    s->dot_mark = s->queued;
    if (s->quit_after && queue_cmd(s, "QUIT", CMD_QUIT, 0) < 0) {
        die_oom(s);
        *err = s->err;
        return -1;
    }
    set_state(s, SP_ST_DATA_END);
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
    set_state(s, st);
    if (queue_cmd(s, verb, c, 0) < 0) {
        die_oom(s);
        *err = s->err;
        return -1;
    }
    return 0;
}

int sp_session_noop(sp_session *s, sp_error *err) { return simple_cmd(s, "NOOP", CMD_NOOP, SP_ST_NOOP, err); }

int sp_session_rset(sp_session *s, sp_error *err) { return simple_cmd(s, "RSET", CMD_RSET, SP_ST_RSET, err); }

int sp_session_quit(sp_session *s)
{
    if (s->state == SP_ST_DEAD || s->state == SP_ST_CLOSED || s->state == SP_ST_QUIT)
        return 0;
    /* QUIT goes out whatever is pending; replies still awaited are dropped. */
    s->aw_len = 0;
    s->aw_head = 0;
    set_state(s, SP_ST_QUIT);
    if (queue_cmd(s, "QUIT", CMD_QUIT, 0) < 0) {
        die_oom(s);
        return -1;
    }
    return 0;
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
    set_state(s, SP_ST_EHLO);
    if (send_ehlo(s, "EHLO", CMD_EHLO) < 0)
        die_oom(s);
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
    tx_clear(&s->done[s->done_head]);
    s->done_head = (s->done_head + 1) % DONE_MAX;
    s->done_len--;
}

int sp_session_tx_open(const sp_session *s) { return s->tx_active; }
const sp_error *sp_session_error(const sp_session *s) { return &s->err; }
unsigned sp_session_tx_count(const sp_session *s) { return s->tx_count; }

unsigned long sp_session_replies(const sp_session *s) { return s->replies; }
const sp_reply *sp_session_greeting(const sp_session *s) { return &s->greeting; }
