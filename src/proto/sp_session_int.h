/* sp_session_int.h: the session's insides, shared by its three files and
 * by nothing else (sp_session.h is the interface):
 *   sp_session.c       states, events, awaited replies, the reply dispatcher
 *   sp_session_auth.c  STARTTLS and AUTH after EHLO, the secrets' scrubber
 *   sp_session_tx.c    transactions: MAIL to the final dot or last BDAT
 *                      chunk, the ring of those in flight, option checks */
#ifndef SP_SESSION_INT_H
#define SP_SESSION_INT_H

#include <stddef.h>

#include "sp_codec.h"
#include "sp_session.h"

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
    int gate_armed;  /* this transaction's final dot closes the gate (sp_session_gate_dot) */
    int gated;       /* no output leaves until sp_session_gate_open */
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
    unsigned long long bytes_in; /* bytes ever fed from the server */
    int cur_code; /* the reply being handled, for the trace */
    int trace;
    sp_transition tr[SP_TRACE_MAX];
    size_t tr_head, tr_len;
    unsigned long tr_dropped;
    sp_event evq[EVQ];
    size_t ev_head, ev_len;
    size_t ev_looked; /* the driver has looked at the first ev_looked events */
    /* the reply clock (sp_session_deadline) */
    double timeouts[SP_PHASE_COUNT];
    double timed_at;
    sp_phase timed_phase;
    unsigned long timed_replies;
};

static inline sp_tx *sp_ss_fly_at(sp_session *s, size_t i) { return &s->fly[(s->fly_head + i) % FLY_MAX]; }
/* The transaction the reply at the head of the awaited queue belongs to:
 * replies come in the order the commands left, oldest transaction first. */
static inline sp_tx *sp_ss_owner(sp_session *s) { return s->fly_len ? sp_ss_fly_at(s, 0) : &s->tx; }

void sp_ss_push_event(sp_session *s, sp_event e);
void sp_ss_set_state(sp_session *s, sp_state to);
int sp_ss_await(sp_session *s, cmd c, size_t idx);
int sp_ss_queue_cmd(sp_session *s, const char *line, cmd c, size_t idx);
void sp_ss_add_redact(sp_session *s, const char *p, size_t n);
void sp_ss_scrub_reply(sp_session *s, sp_reply *r);
void sp_ss_tx_clear(sp_tx *t);
void sp_ss_tx_done(sp_session *s, sp_tx *t);
void sp_ss_fly_pop(sp_session *s);
void sp_ss_die_reply(sp_session *s, sp_phase ph, const sp_reply *r);
void sp_ss_die_oom(sp_session *s);
void sp_ss_set_tx_err_reply(sp_tx *t, sp_phase ph, const sp_reply *r);
void sp_ss_move_reply(sp_reply *dst, sp_reply *src);
int sp_ss_finish_failed_tx(sp_session *s);
void sp_ss_record_rcpt(sp_tx *t, size_t idx, sp_reply *r);
void sp_ss_die_msg(sp_session *s, sp_kind kind, sp_phase ph, const char *text);
int sp_ss_after_ehlo(sp_session *s);
int sp_ss_on_auth_reply(sp_session *s, sp_reply *r);
int sp_ss_on_bdat_reply(sp_session *s, awaited a, sp_phase ph, sp_reply *r);
void sp_ss_fail_tx_all_rcpts(sp_session *s);
int sp_ss_send_rcpt(sp_session *s, size_t i);

#endif
