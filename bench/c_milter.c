/*
 * The smallest useful libmilter milter in C: add one header at end of message.
 *
 * The benchmark's floor for any milter on the machine (contender 2d): the
 * same work as bench/bare_milter.py --tuned, without Python.
 *
 *     gcc -O2 -o c_milter c_milter.c -lmilter -lpthread
 *     ./c_milter inet:PORT@127.0.0.1
 *
 * It negotiates the protocol exactly as the tuned pymilter variant does:
 * pymilter's Milter.Base.negotiate() keeps every action the MTA offers and
 * clears, from the protocol flags offered, RCPT_REJ, HDR_LEADSPC, every
 * SMFIP_NR_* bit (each step that is sent is answered), and NOCONNECT and
 * NODATA (connect() and data() are overridden there).  What is left asks the
 * MTA not to send HELO, MAIL, RCPT, headers, end of headers, body and unknown
 * commands.  TCP_NODELAY is set on the listening socket after
 * smfi_opensocket(); Linux copies it to every accepted connection.
 */

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <libmilter/mfapi.h>

#define HEADER "X-Bench-C"

/* Milter.Base.protocol_mask() for bare_milter.py's TunedMilter. */
#define CLEARED (SMFIP_RCPT_REJ | SMFIP_HDR_LEADSPC \
    | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT \
    | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH | SMFIP_NR_BODY | SMFIP_NR_HDR \
    | SMFIP_NOCONNECT | SMFIP_NODATA)

static sfsistat
c_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2,
            unsigned long f3, unsigned long *pf0, unsigned long *pf1, unsigned long *pf2,
            unsigned long *pf3)
{
    (void) ctx;
    (void) f2;
    (void) f3;
    *pf0 = f0;
    *pf1 = f1 & ~(unsigned long) CLEARED;
    *pf2 = 0;
    *pf3 = 0;
    return SMFIS_CONTINUE;
}

static sfsistat
c_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr)
{
    (void) ctx;
    (void) host;
    (void) addr;
    return SMFIS_CONTINUE;
}

static sfsistat
c_data(SMFICTX *ctx)
{
    (void) ctx;
    return SMFIS_CONTINUE;
}

static sfsistat
c_eom(SMFICTX *ctx)
{
    if (smfi_addheader(ctx, HEADER, "1") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_ACCEPT;
}

static struct smfiDesc desc = {
    "benchc",           /* name */
    SMFI_VERSION,       /* version */
    SMFIF_ADDHDRS,      /* flags */
    c_connect,          /* connect */
    NULL,               /* helo */
    NULL,               /* envfrom */
    NULL,               /* envrcpt */
    NULL,               /* header */
    NULL,               /* eoh */
    NULL,               /* body */
    c_eom,              /* eom */
    NULL,               /* abort */
    NULL,               /* close */
    NULL,               /* unknown */
    c_data,             /* data */
    c_negotiate,        /* negotiate */
};

/* Set TCP_NODELAY on this process's listening TCP sockets (libmilter's). */
static int
nodelay_listeners(void)
{
    int done = 0;

    for (int fd = 0; fd < 1024; fd++) {
        int listening = 0, type = 0, one = 1;
        socklen_t len = sizeof listening;
        struct sockaddr_storage sa;
        socklen_t salen = sizeof sa;

        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening)
            continue;
        len = sizeof type;
        if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM)
            continue;
        if (getsockname(fd, (struct sockaddr *) &sa, &salen) != 0
            || (sa.ss_family != AF_INET && sa.ss_family != AF_INET6))
            continue;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
            fprintf(stderr, "c_milter: TCP_NODELAY on fd %d: %s\n", fd, strerror(errno));
            continue;
        }
        done++;
    }
    return done;
}

int
main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s inet:PORT@HOST|unix:/path\n", argv[0]);
        return 2;
    }
    if (smfi_setconn(argv[1]) != MI_SUCCESS) {
        fprintf(stderr, "c_milter: smfi_setconn(%s) failed\n", argv[1]);
        return 1;
    }
    smfi_settimeout(240);
    if (smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "c_milter: smfi_register failed\n");
        return 1;
    }
    if (smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "c_milter: smfi_opensocket failed\n");
        return 1;
    }
    printf("c milter on %s, TCP_NODELAY on %d listening socket(s)\n", argv[1],
           nodelay_listeners());
    fflush(stdout);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
