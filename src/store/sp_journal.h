/* The campaign journal: an SQLite database, one run at a time.
 *
 * One row per recipient (its normalised address), with the last state letter
 * (P handed to the pool again, L final dot leaving, S sent, D sent possibly twice,
 * F failed for good, T failed for now, A ambiguous), the reason, the run
 * that last met it and when. A run holds an exclusive lock (flock on the
 * database file) from open to close: a second run on the same journal is
 * refused, naming the first. Records go into one open transaction that the
 * caller commits (once per loop wake); sp_journal_mark writes L and commits
 * at once, before a final dot leaves. The database is in WAL mode with
 * synchronous=NORMAL, so a commit survives kill -9; sp_journal_commit(j, 1)
 * also survives power loss. Schema (version 4; 1 and 2 were text files,
 * 3 had no log, and a run upgrades it):
 *
 *   meta(key PRIMARY KEY, value)                 campaign, created
 *   recipients(address PRIMARY KEY, state, info, run, updated)
 *   log(seq PRIMARY KEY, run, records)           records not merged yet: a
 *                                                row a commit, a JSON array
 *   logged(seq, item, address, state, info, run, updated)   a view of it
 *   latest(address, state, info, run, updated)   a view: the last of each
 *   runs(id PRIMARY KEY, pid, host, started, ended)
 *
 * A commit appends its records to the log; the log is merged into
 * recipients (each address's last record) every 2,048 records, at close,
 * and when a run opens a journal a dead run left unmerged.
 *
 * Not thread-safe: one thread uses a journal. */
#ifndef SP_JOURNAL_H
#define SP_JOURNAL_H

#include <stddef.h>

#define SP_JOURNAL_VERSION 4

typedef enum {
    SP_JOURNAL_OK = 0,
    SP_JOURNAL_BUSY,        /* another run holds the journal */
    SP_JOURNAL_NOT_JOURNAL, /* the file is not an SQLite database */
    SP_JOURNAL_VERSION_MISMATCH,
    SP_JOURNAL_CAMPAIGN, /* the journal belongs to another campaign */
    SP_JOURNAL_FULL,     /* the disk (or the database) is full */
    SP_JOURNAL_IO        /* any other failure */
} sp_journal_status;

typedef struct sp_journal sp_journal;

/* Opens (creating when absent) the journal at path for a run of campaign;
 * path NULL makes a private temporary one (deduplication within one run). On
 * failure returns NULL with *status and err (a sentence) set. */
sp_journal *sp_journal_open(const char *path, const char *campaign, sp_journal_status *status, char *err,
                            size_t errlen);
/* Closes: commits, records the run's end, releases the lock. Returns -1 when
 * the last commit failed (the error stays readable until sp_journal_unref). */
int sp_journal_close(sp_journal *j);
/* References: a journal lives while its opener or a pending mark holds it. */
void sp_journal_ref(sp_journal *j);
void sp_journal_unref(sp_journal *j);
int sp_journal_is_open(const sp_journal *j);

/* The last letter of key, or 0 when it has none; *this_run: this run met it
 * (recorded or sp_journal_meet). -1 on failure. */
int sp_journal_get(sp_journal *j, const char *key, size_t klen, char *letter, int *this_run);
/* This run has met key (a duplicate row after it is one). */
int sp_journal_meet(sp_journal *j, const char *key, size_t klen);
/* Sets key's letter and reason in the open transaction. */
int sp_journal_record(sp_journal *j, char letter, const char *key, size_t klen, const char *info, size_t ilen);
/* L for key, committed with everything before it: the final dot may leave. */
int sp_journal_mark(sp_journal *j, const char *key, size_t klen);
/* L for key in the open transaction, whose number goes to *gen: the final
 * dot may leave once sp_journal_sync_to(j, *gen) has returned 0. Marks of
 * several connections made in one loop turn share one commit. */
int sp_journal_mark_deferred(sp_journal *j, const char *key, size_t klen, unsigned long long *gen);
/* Commits transaction gen if it is still open (0 at once when it already
 * is); -1 when it cannot be, or when it ended without a commit (a failed
 * one), so a mark it held was lost. */
int sp_journal_sync_to(sp_journal *j, unsigned long long gen);
/* Commits the open transaction (none: nothing to do); sync: fsync too. */
int sp_journal_commit(sp_journal *j, int sync);
/* A recipient's state is one letter, defined here once: the SQLite journal
 * stores them, and the binding hands them to Lua (core.letters), whose
 * campaigns, Redis scripts and outbox spell them from there. */
#define SP_J_PREPARED "P"  /* safe to send: nothing of it has left */
#define SP_J_LEAVING "L"   /* its final dot or last chunk may have left */
#define SP_J_SENT "S"      /* sent */
#define SP_J_TWICE "D"     /* sent, possibly twice */
#define SP_J_FAILED "F"    /* failed for good (permanent or invalid) */
#define SP_J_TRANSIENT "T" /* failed for now: sent again with retry_failed */
#define SP_J_AMBIGUOUS "A" /* it may have arrived */
#define SP_J_LETTERS SP_J_PREPARED SP_J_LEAVING SP_J_SENT SP_J_TWICE SP_J_FAILED SP_J_TRANSIENT SP_J_AMBIGUOUS

/* Recipients per letter: counts['S' - 'A'] and so on (26 slots). */
int sp_journal_counts(sp_journal *j, long long counts[26]);

/* Reading a journal another run may hold (smtppool status): no lock, no
 * run of its own, read-only. */
sp_journal *sp_journal_open_read(const char *path, sp_journal_status *status, char *err, size_t errlen);
/* Another run holds the journal now. */
int sp_journal_running(sp_journal *j);
const char *sp_journal_campaign(const sp_journal *j);
/* The latest run: its pid, host, start and end (0 while it runs or when it
 * died); 0 when there is none, -1 on failure. */
int sp_journal_last_run(sp_journal *j, long long *pid, char *host, size_t hostlen, double *started, double *ended);
/* The n latest failures and ambiguities (letters F, T, A), newest first. */
typedef void (*sp_journal_row_fn)(void *ud, char letter, const char *address, const char *info, double updated);
int sp_journal_failures(sp_journal *j, int n, sp_journal_row_fn fn, void *ud);

/* The last failure's sentence and class. */
const char *sp_journal_error(const sp_journal *j);
sp_journal_status sp_journal_last_status(const sp_journal *j);

#endif
