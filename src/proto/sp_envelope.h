/* sp_envelope: a transaction's envelope as command lines: MAIL FROM with
 * SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and the DSN
 * parameters (RFC 3461) the server offers, and RCPT TO with NOTIFY and ORCPT;
 * the checks that refuse an envelope before a byte is sent. Pure functions
 * of the request and the server's capabilities. */
#ifndef SP_ENVELOPE_H
#define SP_ENVELOPE_H

#include "sp_buf.h"
#include "sp_caps.h"
#include "sp_error.h"

struct sp_tx_opts;

/* Checks the addresses (printable ASCII or UTF-8, no brackets, spaces or
 * controls, at most 254 octets, recipients not empty) and what the server
 * must offer for them (SMTPUTF8, 8BITMIME, SIZE, and REQUIRETLS over TLS
 * when the message asks for it). *utf8 says whether an address needs
 * SMTPUTF8. 0, or -1 with *err (kind invalid; permanent for a message over
 * the server's SIZE; tls when REQUIRETLS cannot be honoured). */
int sp_envelope_check(const struct sp_tx_opts *o, const sp_caps *caps, int tls_active, int *utf8, sp_error *err);

/* Appends "MAIL FROM:<from>" and its parameters (no line end). 0, or -1
 * with *err (invalid: an ENVID too long; or out of memory). */
int sp_envelope_mail(sp_buf *out, const struct sp_tx_opts *o, const sp_caps *caps, int utf8, sp_error *err);

/* The parameters every RCPT of the transaction carries (" NOTIFY=..."), or
 * NULL (malloc'd; *oom set when allocation failed). */
char *sp_envelope_rcpt_params(const struct sp_tx_opts *o, const sp_caps *caps, int *oom);

/* Appends "RCPT TO:<addr>", params, " ORCPT=rfc822;<xtext>" when orcpt,
 * and CRLF. 0, or -1 when out of memory. */
int sp_envelope_rcpt(sp_buf *out, const char *addr, const char *params, int orcpt);

/* RFC 3461 4: xtext, "+HH" for '+', '=' and bytes outside 33..126. */
int sp_xtext(sp_buf *out, const char *p);

#endif
