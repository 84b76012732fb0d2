/* sp_error: the error value every layer reports (ARCHITECTURE.md, "Errors"). */
#ifndef SP_ERROR_H
#define SP_ERROR_H

#include <stddef.h>

typedef enum sp_kind {
    SP_KIND_NONE = 0,
    SP_KIND_TRANSIENT,  /* 4xx */
    SP_KIND_PERMANENT,  /* 5xx */
    SP_KIND_CONNECTION, /* 421, EOF, reset, timeout: the connection is gone */
    SP_KIND_AMBIGUOUS,  /* lost after the final dot, before its reply */
    SP_KIND_PROTOCOL,   /* malformed reply */
    SP_KIND_TLS,
    SP_KIND_AUTH,
    SP_KIND_INVALID, /* bad input from the caller */
    SP_KIND_CONFIG,
    SP_KIND_COUNT
} sp_kind;

typedef enum sp_phase {
    SP_PHASE_NONE = 0,
    SP_PHASE_CONNECT,
    SP_PHASE_GREETING,
    SP_PHASE_EHLO,
    SP_PHASE_STARTTLS,
    SP_PHASE_AUTH,
    SP_PHASE_MAIL,
    SP_PHASE_RCPT,
    SP_PHASE_DATA,
    SP_PHASE_DATA_END,
    SP_PHASE_RSET,
    SP_PHASE_NOOP,
    SP_PHASE_QUIT,
    SP_PHASE_COUNT
} sp_phase;

#define SP_ENHANCED_MAX 16
#define SP_ERROR_TEXT_MAX 512

typedef struct sp_error {
    sp_kind kind;
    sp_phase phase;
    int code;                        /* SMTP reply code, 0 when the server did not speak */
    char enhanced[SP_ENHANCED_MAX];  /* RFC 3463 code or "" */
    char text[SP_ERROR_TEXT_MAX];    /* server text or our description, truncated */
    int silent;                      /* the server never sent a byte on this connection */
} sp_error;

const char *sp_kind_name(sp_kind k);
const char *sp_phase_name(sp_phase p);
void sp_error_clear(sp_error *e);
/* Sets kind, phase and a printf-style description; code and enhanced are cleared. */
void sp_error_set(sp_error *e, sp_kind kind, sp_phase phase, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
/* Kind of a server reply code: 421 is connection, 4xx transient, 5xx permanent. */
sp_kind sp_kind_of_code(int code);
/* The newest entry of OpenSSL's error queue as text, and the queue cleared
 * (libcrypto's queue: DKIM in mail/ and TLS in net/ both report through it). */
void sp_openssl_reason(char *buf, size_t n);

#endif
