/*
 * hostile-peer — a peer on the handler's socket that the handler must refuse: a malformed
 * handshake, wrong file descriptors, silence, or a VMM that lies about its regions. It waits
 * for the handler to close the connection and says whether it did.
 *
 * It maps its regions and creates and registers a real userfaultfd first (as the stand-in does),
 * so that only the one thing a case bends is wrong.
 *
 * usage: hostile-peer --socket PATH [--region SIZE[@OFFSET]]... (default one 2 MiB region @0)
 *   --body STRING       send exactly STRING as the handshake body (with the uffd)
 *   --garbage N         send N bytes of xorshift garbage (first byte 0xff) as the body
 *   --fds none|notuffd|many   no fd; /dev/null instead of the uffd; the uffd + 4 x /dev/null
 *   --silent            connect and send nothing
 *   --announce-half     announce each region at half its registered size, then touch the first
 *                       page past the announced half (a fault outside every announced region)
 *   --reject-timeout MS (default 10000) how long to wait for the close, from the first send
 * Otherwise the body is the well-formed JSON of the regions (Firecracker v12) with the uffd: a
 * handshake the handler refuses for what it says (a region past the end of the image, ...).
 *
 * Exit: 3 the handler closed the connection (the outcome the tests want), 4 it did not within
 * --reject-timeout, 2 usage or setup error. A peer the handler kills (--announce-half) dies of
 * SIGKILL.
 */
#define _GNU_SOURCE
#include "../csrc/tools/tool.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef POLLRDHUP
#define POLLRDHUP 0x2000
#endif

enum { EXIT_REJECTED = 3, EXIT_NOT_REJECTED = 4 };

#define MAX_REGIONS 16
#define PAGE 4096

enum fdsmode { FDS_UFFD, FDS_NONE, FDS_NOTUFFD, FDS_MANY };

static struct tool_wire_region regions[MAX_REGIONS];
static uint8_t *addrs[MAX_REGIONS];
static int nregions;
static const char *socket_path;
static const char *body_arg;
static long long garbage = -1;
static enum fdsmode fds_mode = FDS_UFFD;
static bool silent, announce_half;
static long long reject_timeout_ms = 10000;
static int sock_fd = -1;

static void parse_region(const char *s)
{
	if (nregions >= MAX_REGIONS)
		tool_exit(TOOL_EXIT_SETUP, "too many --region (max %d)", MAX_REGIONS);
	struct tool_wire_region *r = &regions[nregions];
	bool has_offset;
	if (!tool_parse_region(s, &r->size, &r->offset, &has_offset) || r->size % PAGE)
		tool_exit(TOOL_EXIT_SETUP, "bad --region '%s' (want SIZE[@OFFSET], SIZE a multiple of 4 KiB)", s);
	if (!has_offset)
		r->offset = nregions ? regions[nregions - 1].offset + regions[nregions - 1].size : 0;
	nregions++;
}

static void parse_args(int argc, char **argv)
{
	enum { O_SOCKET = 1000, O_REGION, O_BODY, O_GARBAGE, O_FDS, O_SILENT, O_HALF, O_REJTO };
	static const struct option longopts[] = {
		{ "socket", required_argument, 0, O_SOCKET },
		{ "region", required_argument, 0, O_REGION },
		{ "body", required_argument, 0, O_BODY },
		{ "garbage", required_argument, 0, O_GARBAGE },
		{ "fds", required_argument, 0, O_FDS },
		{ "silent", no_argument, 0, O_SILENT },
		{ "announce-half", no_argument, 0, O_HALF },
		{ "reject-timeout", required_argument, 0, O_REJTO },
		{ 0, 0, 0, 0 },
	};
	int c;
	uint64_t v;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case O_SOCKET: socket_path = optarg; break;
		case O_REGION: parse_region(optarg); break;
		case O_BODY: body_arg = optarg; break;
		case O_GARBAGE:
			if (!tool_parse_size(optarg, &v) || v > (1ULL << 32))
				tool_exit(TOOL_EXIT_SETUP, "bad --garbage '%s'", optarg);
			garbage = (long long)v;
			break;
		case O_FDS:
			if (!strcmp(optarg, "none")) fds_mode = FDS_NONE;
			else if (!strcmp(optarg, "notuffd")) fds_mode = FDS_NOTUFFD;
			else if (!strcmp(optarg, "many")) fds_mode = FDS_MANY;
			else tool_exit(TOOL_EXIT_SETUP, "bad --fds '%s' (none|notuffd|many)", optarg);
			break;
		case O_SILENT: silent = true; break;
		case O_HALF: announce_half = true; break;
		case O_REJTO:
			if (!tool_parse_size(optarg, &v) || v > INT_MAX)
				tool_exit(TOOL_EXIT_SETUP, "bad --reject-timeout '%s'", optarg);
			reject_timeout_ms = (long long)v;
			break;
		default:
			tool_exit(TOOL_EXIT_SETUP, "unknown option or missing argument (near '%s'); see the comment atop test/hostile-peer.c",
				  argv[optind - 1]);
		}
	}
	if (optind < argc)
		tool_exit(TOOL_EXIT_SETUP, "unexpected argument '%s'", argv[optind]);
	if (!socket_path)
		tool_exit(TOOL_EXIT_SETUP, "--socket PATH is required");
	if (body_arg && garbage >= 0)
		tool_exit(TOOL_EXIT_SETUP, "--body and --garbage are exclusive");
	if (nregions == 0)
		regions[nregions++] = (struct tool_wire_region){ .size = 2u << 20, .offset = 0 };
}

/* Returns 0 sent, -1 peer closed, -2 deadline passed. */
static int send_body(const uint8_t *buf, size_t len, const int *fds, int nfds, uint64_t deadline)
{
	size_t sent = 0;
	bool fds_pending = nfds > 0;
	while (sent < len || fds_pending) {
		size_t chunk = len - sent;
		if (chunk > 65536)
			chunk = 65536;
		ssize_t n = tool_sendmsg_fds(sock_fd, buf + sent, chunk, fds_pending ? fds : NULL, fds_pending ? nfds : 0,
					     MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EPIPE || errno == ECONNRESET)
				return -1;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				tool_die("sendmsg");
			uint64_t t = tool_now_ns();
			if (t >= deadline)
				return -2;
			struct pollfd pfd = { .fd = sock_fd, .events = POLLOUT };
			int r = poll(&pfd, 1, (int)((deadline - t + 999999) / 1000000));
			if (r < 0 && errno != EINTR)
				tool_die("poll(socket, POLLOUT)");
			if (r == 0)
				return -2;
			continue;
		}
		fds_pending = false;
		sent += (size_t)n;
		if (chunk == 0)
			break; /* empty body: one zero-length sendmsg, nothing more to do */
	}
	return 0;
}

/* Waits for the handler to close the socket: exits 3, or 4 at the deadline. */
static void __attribute__((noreturn)) wait_reject(uint64_t start, uint64_t deadline)
{
	bool warned = false;
	for (;;) {
		uint64_t t = tool_now_ns();
		if (t >= deadline)
			break;
		struct pollfd pfd = { .fd = sock_fd, .events = POLLIN | POLLRDHUP };
		int r = poll(&pfd, 1, (int)((deadline - t + 999999) / 1000000));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			tool_die("poll(socket)");
		}
		if (r == 0)
			break;
		bool closed = pfd.revents & (POLLHUP | POLLRDHUP | POLLERR);
		if (!closed && (pfd.revents & POLLIN)) {
			char buf[4096];
			ssize_t n = recv(sock_fd, buf, sizeof buf, MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				closed = true;
			else if (n > 0 && !warned) {
				tool_note("warning: handler sent %zd unexpected bytes on the socket", n);
				warned = true;
			}
		}
		if (closed)
			tool_exit(EXIT_REJECTED, "handler closed the connection after %" PRIu64 " ms",
				  (tool_now_ns() - start) / 1000000);
	}
	tool_exit(EXIT_NOT_REJECTED, "handler did not close the connection within %lld ms", reject_timeout_ms);
}

/* Blocks in a fault the handler cannot serve (the page is outside what was announced). */
static void *touch_outside(void *arg)
{
	(void)*(volatile uint8_t *)arg;
	return NULL;
}

int main(int argc, char **argv)
{
	tool_name = "hostile-peer";
	parse_args(argc, argv);
	signal(SIGPIPE, SIG_IGN);

	int uffd = tool_userfaultfd(UFFD_FEATURE_EVENT_REMOVE);
	for (int i = 0; i < nregions; i++) {
		void *p = mmap(NULL, regions[i].size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED)
			tool_die("mmap(guest region)");
		tool_uffd_register(uffd, p, regions[i].size);
		addrs[i] = p;
		regions[i].addr = (uintptr_t)p;
		if (announce_half)
			regions[i].size /= 2;
	}

	uint8_t *body;
	size_t body_len;
	if (body_arg) {
		body = (uint8_t *)body_arg;
		body_len = strlen(body_arg);
	} else if (garbage >= 0) {
		body_len = (size_t)garbage;
		body = malloc(body_len + 1);
		if (!body)
			tool_die("malloc(garbage)");
		struct tool_rng rng;
		tool_rng_seed(&rng, 1 ^ 0x5bd1e995ULL);
		for (size_t i = 0; i < body_len; i++)
			body[i] = (uint8_t)(tool_rng_next(&rng) >> 56);
		if (body_len)
			body[0] = 0xff;
	} else {
		body = (uint8_t *)tool_handshake_json(regions, nregions, PAGE, TOOL_WIRE_V12, &body_len);
	}

	int fds[5], nfds = 0;
	if (fds_mode == FDS_UFFD || fds_mode == FDS_MANY)
		fds[nfds++] = uffd;
	if (fds_mode == FDS_NOTUFFD || fds_mode == FDS_MANY) {
		int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (devnull < 0)
			tool_die("open /dev/null");
		for (int i = fds_mode == FDS_MANY ? 4 : 1; i > 0; i--)
			fds[nfds++] = devnull;
	}

	sock_fd = tool_unix_connect(socket_path);
	if (sock_fd < 0)
		tool_exit(TOOL_EXIT_SETUP, "connect %s: %s", socket_path, strerror(errno));
	uint64_t start = tool_now_ns();
	uint64_t deadline = start + (uint64_t)reject_timeout_ms * 1000000ULL;
	if (!silent) {
		if (body_len == 0 && nfds)
			tool_note("note: empty body: a zero-length sendmsg on SOCK_STREAM carries no fds");
		int r = send_body(body, body_len, fds, nfds, deadline);
		if (r == -1)
			tool_exit(EXIT_REJECTED, "handler closed the connection while we were sending (after %" PRIu64 " ms)",
				  (tool_now_ns() - start) / 1000000);
		if (r == -2)
			tool_exit(EXIT_NOT_REJECTED, "handler neither read the body nor closed within %lld ms", reject_timeout_ms);
	}
	if (announce_half) {
		/* The first page past what region 0 announced; the toucher may block for good. */
		pthread_t t;
		int e = pthread_create(&t, NULL, touch_outside, addrs[0] + regions[0].size);
		if (e)
			tool_exit(TOOL_EXIT_SETUP, "pthread_create(toucher): %s", strerror(e));
	}
	wait_reject(start, deadline);
}
