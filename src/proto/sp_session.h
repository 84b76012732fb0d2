/* sp_session: the sans-IO SMTP client protocol machine.
 *
 * It is fed the server's bytes (sp_session_feed), end of stream
 * (sp_session_eof) and timeouts (sp_session_timeout); it yields bytes to
 * write (sp_session_output / sp_session_consume) and events
 * (sp_session_next_event). It never touches a socket or reads a clock: the
 * native driver, the OpenResty driver and the fuzzers all drive this one
 * machine.
 *
 * Life of a session: greeting, EHLO (HELO when EHLO is refused), then READY.
 * On READY the driver may start one transaction (MAIL, RCPT per recipient,
 * DATA; pipelined when the server offers PIPELINING), feed the body on
 * SP_EV_BODY, and learns the outcome on SP_EV_TX_DONE. With CHUNKING,
 * PIPELINING and a bdat_window, the body goes as BDAT chunks right after the
 * RCPTs, and SP_EV_NEXT comes after each last chunk while fewer than
 * bdat_window transactions await their final replies. A failed transaction
 * is followed by RSET and a new READY. A 421, malformed reply, EOF or
 * timeout ends the session for good with SP_EV_ERROR: the driver closes the
 * connection and never reuses it. */
#ifndef SP_SESSION_H
#define SP_SESSION_H

#include <stddef.h>

#include "sp_buf.h"
#include "sp_caps.h"
#include "sp_error.h"
#include "sp_reply.h"

typedef enum sp_event {
    SP_EV_NONE = 0,
    SP_EV_READY,   /* idle and usable: a transaction, NOOP or QUIT may start */
    SP_EV_BODY,    /* DATA got 354: feed the body, then sp_session_body_end */
    SP_EV_TX_DONE, /* the transaction has its outcome (sp_session_tx) */
    SP_EV_ERROR,   /* the session is dead (sp_session_error): close, never reuse */
    SP_EV_CLOSED,  /* QUIT was answered or the server closed after QUIT */
    SP_EV_TLS,     /* STARTTLS accepted: handshake, then sp_session_tls_done */
    SP_EV_NEXT,    /* PIPELINING: the final dot is queued; the next transaction may
                      start now, before that dot's reply (RFC 2920) */
    SP_EV_AUTH     /* with auth_gate: AUTH is ready to go; sp_session_auth_go sends it */
} sp_event;
/* "ready", "body", "tx", "error", "closed", "tls", "next", "auth" ("none" for SP_EV_NONE). */
const char *sp_event_name(sp_event e);

typedef enum sp_state {
    SP_ST_GREETING,
    SP_ST_EHLO,
    SP_ST_HELO,
    SP_ST_READY,
    SP_ST_TX,       /* MAIL/RCPT/DATA replies outstanding */
    SP_ST_BODY,     /* the driver is feeding the body */
    SP_ST_DATA_END, /* the final dot is out, its reply outstanding */
    SP_ST_RSET,
    SP_ST_NOOP,
    SP_ST_QUIT,
    SP_ST_CLOSED,
    SP_ST_DEAD,
    SP_ST_STARTTLS, /* STARTTLS sent, its reply outstanding */
    SP_ST_TLS,      /* the driver is doing the handshake */
    SP_ST_AUTH      /* AUTH exchange in progress */
} sp_state;
/* The state's name in lower case: "greeting", "ehlo", ... "auth". */
const char *sp_state_name(sp_state st);

/* One state change, for traces: the reply code that caused it (0 when a
 * command the driver gave did). */
typedef struct sp_transition {
    sp_state from, to;
    int code;
} sp_transition;

typedef struct sp_rcpt_result {
    char *address;
    int code; /* 0 until answered */
    char enhanced[SP_ENHANCED_MAX];
    char *text;
} sp_rcpt_result;

typedef struct sp_tx {
    char *from;
    sp_rcpt_result *rcpts;
    size_t nrcpt;
    size_t answered;
    size_t accepted;
    int ok;          /* 1: the server took responsibility for the accepted recipients */
    int done;        /* the outcome below is final */
    int dot_written; /* every byte up to the final dot left through sp_session_consume */
    sp_error err;    /* why it failed, when done && !ok */
    sp_reply final;  /* reply to the final dot (or the reply that failed the transaction) */
    char *rcpt_params; /* DSN parameters added to every RCPT, or NULL */
    int orcpt;
    int bdat;        /* the body went as BDAT chunks (RFC 3030), not DATA */
    int quit;        /* QUIT left with the final dot: the session ends after this transaction */
} sp_tx;

typedef struct sp_tx_opts {
    const char *from;          /* reverse-path without <>; "" for the null sender */
    const char *const *rcpts;  /* forward-paths without <> */
    size_t nrcpt;
    unsigned long size;        /* message size for SIZE=, 0 to leave out */
    int body_8bit;             /* the body has 8-bit bytes: BODY=8BITMIME needed */
    /* DSN (RFC 3461), used only when the server offers it; NULL/0 to leave out */
    const char *dsn_ret;       /* "FULL" or "HDRS" */
    const char *dsn_envid;     /* envelope id, sent as xtext */
    const char *dsn_notify;    /* "NEVER" or a comma list of SUCCESS, FAILURE, DELAY */
    int dsn_orcpt;             /* send ORCPT=rfc822;<address> with each RCPT */
    int requiretls;            /* RFC 8689: the message must travel over TLS at every hop */
    int quit_after;            /* the session's last transaction: QUIT leaves with the final dot
                                  (RFC 2920 lets QUIT end a pipelined group), saving a round trip */
} sp_tx_opts;

enum { SP_STARTTLS_NO = 0, SP_STARTTLS_REQUIRED, SP_STARTTLS_OPPORTUNISTIC };

typedef struct sp_session_opts {
    const char *helo;  /* EHLO/HELO name; "localhost" when NULL */
    int starttls;      /* SP_STARTTLS_*: upgrade after the first EHLO */
    int tls_active;    /* the transport is already TLS (implicit TLS) */
    /* AUTH (RFC 4954): user NULL for none. secret is the password, or the
     * OAuth 2 token for XOAUTH2. Copies are wiped when the session is freed. */
    const char *auth_user;
    const char *auth_secret;
    unsigned auth_mech;        /* one SP_AUTH_* to insist on, 0 to pick the strongest shared */
    int allow_plaintext_auth;  /* credentials over a connection without TLS */
    int auth_gate;             /* AUTH waits for sp_session_auth_go (SP_EV_AUTH): the caller spends
                                  a login window when the AUTH command really leaves */
    int bdat_window;           /* with CHUNKING and PIPELINING: send bodies as BDAT (RFC 3030) and let
                                  up to this many transactions await their final replies at once
                                  (1..16); 0: never BDAT. At most that many messages are ambiguous
                                  when the connection is lost. */
    double timeouts[SP_PHASE_COUNT]; /* seconds for each phase's reply; 0: sp_default_timeout */
} sp_session_opts;

typedef struct sp_session sp_session;

/* RFC 5321 4.5.3.2 timeouts: MAIL 5 min, RCPT 5, DATA 2, data block 3,
 * final dot 10; 5 min for the rest (connect: 30 s). The greeting: 30 s,
 * not the RFC's 5 min. Submission servers greet at once, and a silent one
 * is most often an implicit-TLS port asked for STARTTLS (the session's
 * timeout then says so): 5 minutes times the retries left users waiting
 * with no word. Relays to MXes that delay their greeting set it higher. */
double sp_default_timeout(sp_phase ph);

/* Checks every string of opts that reaches a command line: the EHLO name
 * must be a domain or an address literal (RFC 5321 4.1.3), the AUTH user
 * and secret must not hold CR, LF (or, for XOAUTH2, ^A, which separates its
 * fields). 0, or -1 with *err (kind config) naming the option. */
int sp_session_opts_check(const sp_session_opts *opts, sp_error *err);
/* Whether h is a valid EHLO name: a domain or an address literal. */
int sp_session_valid_helo(const char *h);
/* NULL when out of memory; opts are not checked here (sp_session_opts_check). */
sp_session *sp_session_new(const sp_session_opts *opts);
void sp_session_free(sp_session *s);

/* Input. Each returns 0, or -1 when the session has died (an SP_EV_ERROR is queued). */
int sp_session_feed(sp_session *s, const char *buf, size_t len);
int sp_session_eof(sp_session *s);
int sp_session_timeout(sp_session *s);
/* The session's clock, which a driver feeds and arms (the one rule for
 * every driver): each awaited reply gets its phase's timeout, counted from
 * the last write (sp_session_activity, with the driver's monotonic now),
 * the last complete reply or the last phase change. sp_session_deadline
 * gives when the reply now awaited is overdue (then sp_session_timeout), or
 * 0 when none is awaited (an idle session: the pool's idle rules apply). */
void sp_session_activity(sp_session *s, double now);
double sp_session_deadline(sp_session *s, double now);
/* A phase's timeout in seconds, as the options gave it or the default. */
double sp_session_phase_timeout(const sp_session *s, sp_phase ph);
/* The driver could not reach the server or lost the transport (reset, TLS
 * failure): kills the session with the given error. */
void sp_session_fail(sp_session *s, const sp_error *err);

/* Output: bytes to write, and how many were written. */
const sp_buf *sp_session_output(const sp_session *s);
void sp_session_consume(sp_session *s, size_t n);
/* A driver whose write completes after replies may already be read (a
 * writer and a reader running apart) says first that the next n pending
 * bytes are on their way: a reply to them is not taken for one that came
 * before its command. (sp_session_consume still says what left.) */
void sp_session_handing(sp_session *s, size_t n);

/* The most transactions awaiting their final replies at once (bdat_window's
 * maximum), and the events a session holds between two of the driver's
 * turns: each of those transactions' SP_EV_TX_DONE, the current one's, and a
 * few of the other kinds, with room to spare. Drivers keep no queue of their
 * own: the session's is the only one (see sp_session_look_event). */
#define SP_BDAT_WINDOW_MAX 16
#define SP_SESSION_EVENTS_MAX 64

/* Events in the order they happened; SP_EV_NONE when none are queued. */
sp_event sp_session_next_event(sp_session *s);
/* Events queued, looked at by the driver or not. */
size_t sp_session_events(const sp_session *s);
/* For a driver that acts on some events itself before its user takes them
 * (a body to write, a handshake to start, a socket to close): the oldest
 * event it has not looked at yet, or SP_EV_NONE. The event stays queued for
 * sp_session_next_event, unless the driver takes it out with
 * sp_session_take_looked (an event that is the driver's alone). A user that
 * takes events only after its driver has looked at all of them sees them in
 * order, from one queue. */
sp_event sp_session_look_event(sp_session *s);
/* Removes the event sp_session_look_event returned last. */
void sp_session_take_looked(sp_session *s);
/* Queued events the driver has looked at. */
size_t sp_session_looked_events(const sp_session *s);

/* Commands. Each returns 0, or -1 with *err set (kind invalid when the
 * request is malformed or impossible on this server, nothing sent). */
/* A transaction starts when the session is ready, or, when the server
 * offers PIPELINING, right after SP_EV_NEXT (the previous one's final dot
 * is queued and its reply still awaited: one round trip per message). */
int sp_session_start_tx(sp_session *s, const sp_tx_opts *o, sp_error *err);
int sp_session_body(sp_session *s, const char *p, size_t n, sp_error *err);
int sp_session_body_end(sp_session *s, sp_error *err);
int sp_session_noop(sp_session *s, sp_error *err);
int sp_session_rset(sp_session *s, sp_error *err);
int sp_session_quit(sp_session *s);
/* After SP_EV_AUTH (auth_gate): send AUTH now. -1 when AUTH was not waiting. */
int sp_session_auth_go(sp_session *s);
/* The driver finished the TLS handshake after SP_EV_TLS: EHLO again. */
void sp_session_tls_done(sp_session *s);

/* Tracing (off by default): when on, every state change is kept (the last
 * 32) until taken, oldest first, with sp_session_transitions. */
void sp_session_trace(sp_session *s, int on);
size_t sp_session_transitions(sp_session *s, sp_transition *out, size_t max);

/* State. */
sp_state sp_session_state(const sp_session *s);
/* The phase whose reply (or, while feeding the body, whose write) is awaited;
 * SP_PHASE_NONE when idle. Drivers pick their timeout from it. */
sp_phase sp_session_phase(const sp_session *s);
const sp_caps *sp_session_caps(const sp_session *s);
/* The outcome of the oldest finished transaction not yet taken (one per
 * SP_EV_TX_DONE, in order; with pipelining two can finish in one read), or
 * the transaction in progress when none is waiting. sp_session_tx_done
 * takes it; sp_session_tx_open says whether a transaction is in progress
 * (a driver keeps that one's body source). */
const sp_tx *sp_session_tx(const sp_session *s);
void sp_session_tx_done(sp_session *s);
int sp_session_tx_open(const sp_session *s);
/* Whether a transaction started now goes as BDAT chunks: the server offers
 * CHUNKING and PIPELINING and the session's window is not 0. The one place
 * this is decided; a driver or scheduler asks here. */
int sp_session_uses_bdat(const sp_session *s);
const sp_error *sp_session_error(const sp_session *s);
/* The gate before a final dot, for a caller that records the dot's mark
 * elsewhere (in Redis) before it may leave: sp_session_gate_dot, called
 * right after sp_session_send (a dot over DATA waits for the server's 354,
 * so it cannot be queued yet), says that this transaction closes the gate
 * when its final dot is queued; from then on sp_session_gated is true and
 * a driver writes nothing of the output until sp_session_gate_open.
 * Replies are still read meanwhile; a connection that ends with its dot
 * behind the gate never sent it (no ambiguity). */
void sp_session_gate_dot(sp_session *s);
void sp_session_gate_open(sp_session *s);
int sp_session_gated(const sp_session *s);
/* Complete replies read so far: drivers time each reply from the last
 * write or the last complete reply, never from the last byte read. */
unsigned long sp_session_replies(const sp_session *s);
/* Transactions that ended with the server accepting the message. */
unsigned sp_session_tx_count(const sp_session *s);
/* The greeting's reply code and text (for logs). */
const sp_reply *sp_session_greeting(const sp_session *s);
/* Whether the session runs over TLS, and the AUTH mechanism used (0: none). */
int sp_session_tls_active(const sp_session *s);
unsigned sp_session_auth_mech(const sp_session *s);

#endif
