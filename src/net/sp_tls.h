/* sp_tls: the OpenSSL client context a pool shares among its connections.
 *
 * Verification is on unless the caller turns it off by name; TLS 1.2 is the
 * floor. The context keeps the newest session it saw so the next connection
 * can resume it (one cache per pool): a server that caps messages per
 * session makes the pool reconnect often, and a resumed handshake saves a
 * round trip and the certificate check's CPU. */
#ifndef SP_TLS_H
#define SP_TLS_H

#include <openssl/ssl.h>

#include "sp_error.h"

typedef struct sp_tls_opts {
    const char *ca_file;   /* PEM bundle; NULL: the system store */
    const char *ca_path;   /* hashed directory; NULL: the system store */
    const char *cert_file; /* client certificate (PEM), optional */
    const char *key_file;  /* its key (PEM); defaults to cert_file */
    int insecure_skip_verify; /* 1: no certificate or host name check */
} sp_tls_opts;

typedef struct sp_tls_ctx sp_tls_ctx;

sp_tls_ctx *sp_tls_ctx_new(const sp_tls_opts *o, sp_error *err);
void sp_tls_ctx_free(sp_tls_ctx *t);
/* A new SSL object for one connection: SNI and host name check against
 * server_name, the cached session offered for resumption. */
SSL *sp_tls_new_ssl(sp_tls_ctx *t, const char *server_name, sp_error *err);
/* Attaches the socket fd to ssl (for reading and writing) through a BIO
 * that never raises SIGPIPE; 0, or -1 when out of memory. */
int sp_tls_set_fd(sp_tls_ctx *t, SSL *ssl, int fd);
/* Handshakes that resumed a session, counted by sp_tls_note_handshake. */
unsigned long sp_tls_resumed(const sp_tls_ctx *t);
unsigned long sp_tls_handshakes(const sp_tls_ctx *t);
void sp_tls_note_handshake(sp_tls_ctx *t, SSL *ssl);
/* Describes the last OpenSSL failure (queue drained) into err. */
void sp_tls_error(sp_error *err, sp_phase phase, const char *what, SSL *ssl, int ret);

#endif
