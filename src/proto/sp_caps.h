/* sp_caps: what a server offers in its EHLO reply (RFC 5321 4.1.1.1 and the
 * extensions it names). */
#ifndef SP_CAPS_H
#define SP_CAPS_H

#include "sp_reply.h"

enum {
    SP_CAP_SIZE = 1u << 0,                /* RFC 1870 */
    SP_CAP_PIPELINING = 1u << 1,          /* RFC 2920 */
    SP_CAP_8BITMIME = 1u << 2,            /* RFC 6152 */
    SP_CAP_SMTPUTF8 = 1u << 3,            /* RFC 6531 */
    SP_CAP_STARTTLS = 1u << 4,            /* RFC 3207 */
    SP_CAP_AUTH = 1u << 5,                /* RFC 4954 */
    SP_CAP_ENHANCEDSTATUSCODES = 1u << 6, /* RFC 2034 */
    SP_CAP_DSN = 1u << 7,                 /* RFC 3461 */
    SP_CAP_CHUNKING = 1u << 8,            /* RFC 3030 */
    SP_CAP_LIMITS = 1u << 9,              /* RFC 9422 */
    SP_CAP_BINARYMIME = 1u << 10,         /* RFC 3030 */
    SP_CAP_REQUIRETLS = 1u << 11,         /* RFC 8689 */
};

enum {
    SP_AUTH_PLAIN = 1u << 0,
    SP_AUTH_LOGIN = 1u << 1,
    SP_AUTH_CRAM_MD5 = 1u << 2,
    SP_AUTH_XOAUTH2 = 1u << 3,
};
#define SP_AUTH_COUNT 4

/* The one table of AUTH mechanism names: the SP_AUTH_* bit of a name (of n
 * bytes, case-insensitive; 0 when unknown), and the name of one bit ("?"). */
unsigned sp_auth_mech_of(const char *name, size_t n);
const char *sp_auth_mech_name(unsigned mech);

typedef struct sp_caps {
    unsigned flags;
    unsigned auth;           /* SP_AUTH_* the server lists */
    unsigned long size_max;  /* SIZE argument, 0 when none was given */
    unsigned mailmax;        /* LIMITS MAILMAX, 0 when not advertised */
    unsigned rcptmax;        /* LIMITS RCPTMAX */
    unsigned rcptdomainmax;  /* LIMITS RCPTDOMAINMAX */
    int esmtp;               /* 1 after EHLO, 0 after a HELO fallback */
} sp_caps;

/* Fills caps from an EHLO reply (its first line is the server's name). */
void sp_caps_parse(sp_caps *caps, const sp_reply *ehlo);

#endif
