/*
 * plain-handler: a minimal userfaultfd page-fault handler in plain C, following
 * Firecracker's example handlers. Baseline for the snapload benchmarks.
 *
 * usage: plain-handler --socket PATH --mem FILE [--strategy on_demand|chunk|fault_all]
 *                      [--chunk BYTES] [--cpu N] [--count K]
 *
 * Binds PATH (a stale socket is unlinked first), listens, prints "ready" on
 * stdout, then serves K VMM connections one after the other (default 1). Each
 * VMM sends one message: a JSON array of regions + the uffd via SCM_RIGHTS.
 * Faults are served by a single-threaded poll() loop (like Firecracker's
 * on_demand example) until the socket reports HUP/EOF (the VMM is gone); then one
 * line "plain-handler: served <faults> faults, <pages> pages" goes to stderr.
 *
 * Strategies:
 *   on_demand  one page per fault (UFFDIO_COPY from the mmapped memory file)
 *   chunk      the aligned --chunk bytes (default 2 MiB) holding the fault,
 *              clipped to the region, in one UFFDIO_COPY
 *   fault_all  on the first fault, every region in <= 1 GiB UFFDIO_COPYs
 * A copy that runs into an existing page (EEXIST, also reported by the kernel
 * as a short copy + EAGAIN) or an unregistered range (ENOENT) falls back to
 * page-by-page, skipping those pages, then wakes the faulting page.
 * UFFD_EVENT_REMOVE -> UFFDIO_UNREGISTER of the range (it then reads as zeros).
 * Errors: "plain-handler: <what>: <strerror>", exit 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include "../csrc/tools/tool.h"

#define PROG "plain-handler"
#define MAX_BODY 65536
#define MAX_FDS 16
#define GIB (1ULL << 30)

enum strategy { ON_DEMAND, CHUNK, FAULT_ALL };

struct region {
	uint64_t base, size, offset, psz;
};

static enum strategy strategy = ON_DEMAND;
static uint64_t chunk_bytes = 2ULL << 20;
static const uint8_t *mem;
static uint64_t mem_size;

/* per-connection state */
static int uffd = -1;
static struct region *regs;
static size_t nregs;
static uint64_t n_faults, n_pages;
static int populated; /* fault_all: done */
static int gone;      /* ESRCH: the VMM's mm is gone */
static uint64_t *pend; /* queued fault addresses */
static size_t npend, cappend;

static void usage(void)
{
	fprintf(stderr, "usage: " PROG " --socket PATH --mem FILE [--strategy on_demand|chunk|fault_all]"
			" [--chunk BYTES] [--cpu N] [--count K]\n");
	exit(2);
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	uint64_t v;
	if (!tool_parse_size(s, &v))
		tool_fail(opt, "invalid number");
	return v;
}

/* ---------- minimal JSON: [{"base_host_virt_addr":N,"size":N,"offset":N,"page_size":N,...},...] */

static int get_num(const char *obj, const char *key, uint64_t *out)
{
	const char *k = strstr(obj, key);
	if (!k)
		return 0;
	k += strlen(key);
	while (*k == ' ' || *k == '\t' || *k == '\n' || *k == '\r')
		k++;
	if (*k != ':')
		return 0;
	k++;
	while (*k == ' ' || *k == '\t' || *k == '\n' || *k == '\r')
		k++;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(k, &end, 10);
	if (end == k || errno || *k == '-')
		tool_fail("json", key);
	*out = v;
	return 1;
}

static void parse_regions(char *s)
{
	char *p = s;
	nregs = 0;
	while ((p = strchr(p, '{')) != NULL) {
		char *q = strchr(p, '}');
		if (!q)
			tool_fail("json", "unterminated object");
		*q = 0;
		struct region r;
		if (!get_num(p, "\"base_host_virt_addr\"", &r.base))
			tool_fail("json", "missing base_host_virt_addr");
		if (!get_num(p, "\"size\"", &r.size))
			tool_fail("json", "missing size");
		if (!get_num(p, "\"offset\"", &r.offset))
			tool_fail("json", "missing offset");
		if (!get_num(p, "\"page_size\"", &r.psz) && !get_num(p, "\"page_size_kib\"", &r.psz))
			r.psz = 4096; /* page_size_kib is in bytes despite its name */
		if (r.psz < 4096 || (r.psz & (r.psz - 1)))
			tool_fail("json", "bad page size");
		if (r.base % r.psz || r.size % r.psz || r.size == 0)
			tool_fail("json", "region not page aligned");
		if (r.offset > mem_size || r.size > mem_size - r.offset)
			tool_fail("json", "region beyond the end of the memory file");
		regs = realloc(regs, (nregs + 1) * sizeof *regs);
		if (!regs)
			tool_die("realloc");
		regs[nregs++] = r;
		p = q + 1;
	}
	if (nregs == 0)
		tool_fail("json", "no regions");
}

static const struct region *find_region(uint64_t addr)
{
	for (size_t i = 0; i < nregs; i++)
		if (addr >= regs[i].base && addr - regs[i].base < regs[i].size)
			return &regs[i];
	return NULL;
}

/* ---------- uffd */

static void wake(uint64_t start, uint64_t len)
{
	struct uffdio_range rg = { .start = start, .len = len };
	if (ioctl(uffd, UFFDIO_WAKE, &rg) < 0)
		tool_die("UFFDIO_WAKE");
}

static void unregister_range(uint64_t start, uint64_t end)
{
	if (end <= start)
		return;
	struct uffdio_range rg = { .start = start, .len = end - start };
	for (;;) {
		if (ioctl(uffd, UFFDIO_UNREGISTER, &rg) == 0)
			return;
		if (errno == EINTR)
			continue;
		if (errno == ESRCH) {
			gone = 1;
			return;
		}
		tool_die("UFFDIO_UNREGISTER");
	}
}

/* Read uffd messages until EAGAIN: REMOVE is handled at once, faults are queued.
 * Returns the number of messages read. */
static size_t drain(void)
{
	struct uffd_msg msgs[64];
	size_t got = 0;
	for (;;) {
		ssize_t r = read(uffd, msgs, sizeof msgs);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			tool_die("read uffd");
		}
		if (r == 0)
			break;
		if (r % sizeof(struct uffd_msg))
			tool_fail("read uffd", "partial uffd_msg");
		size_t n = r / sizeof(struct uffd_msg);
		for (size_t i = 0; i < n; i++) {
			struct uffd_msg *m = &msgs[i];
			if (m->event == UFFD_EVENT_PAGEFAULT) {
				if (npend == cappend) {
					cappend = cappend ? 2 * cappend : 256;
					pend = realloc(pend, cappend * sizeof *pend);
					if (!pend)
						tool_die("realloc");
				}
				pend[npend++] = m->arg.pagefault.address;
			} else if (m->event == UFFD_EVENT_REMOVE) {
				unregister_range(m->arg.remove.start, m->arg.remove.end);
			}
			/* other events are not enabled by the VMM: ignore */
		}
		got += n;
	}
	return got;
}

/* UFFDIO_COPY [dst, dst+len) of region r from the memory file. If anything but a
 * clean copy happened, wake fault_page (0 = none) at the end. */
static void install(const struct region *r, uint64_t dst, uint64_t len, uint64_t fault_page)
{
	int per_page = 0, need_wake = 0;
	while (len > 0 && !gone) {
		uint64_t l = per_page ? r->psz : len;
		struct uffdio_copy c = {
			.dst = dst,
			.src = (uint64_t)(uintptr_t)(mem + r->offset + (dst - r->base)),
			.len = l,
			.mode = 0,
			.copy = 0,
		};
		if (ioctl(uffd, UFFDIO_COPY, &c) == 0) {
			n_pages += l / r->psz;
			dst += l;
			len -= l;
			continue;
		}
		int e = errno;
		if (c.copy > 0) {
			/* short copy (the kernel reports EEXIST/ENOENT after some pages as
			 * EAGAIN + copy>0): the copied part is woken; go page by page */
			uint64_t done = (uint64_t)c.copy;
			n_pages += done / r->psz;
			dst += done;
			len -= done;
			per_page = 1;
			need_wake = 1;
			continue;
		}
		if (e == EINTR)
			continue;
		if (e == EAGAIN) {
			/* a non-cooperative event (REMOVE) is pending: read it, retry */
			if (drain() == 0)
				sched_yield(); /* let the madvise()ing thread finish */
			continue;
		}
		if (e == EEXIST) {
			/* the first page exists: skip it, do the rest page by page */
			need_wake = 1;
			per_page = 1;
			dst += r->psz;
			len -= r->psz;
			continue;
		}
		if (e == ENOENT) {
			/* range (partly) unregistered after a REMOVE */
			need_wake = 1;
			if (!per_page && l > r->psz) {
				per_page = 1;
				continue;
			}
			dst += r->psz;
			len -= r->psz;
			continue;
		}
		if (e == ESRCH) {
			gone = 1;
			return;
		}
		errno = e;
		tool_die("UFFDIO_COPY");
	}
	if (need_wake && fault_page && !gone)
		wake(fault_page, r->psz);
}

static void handle_fault(uint64_t addr)
{
	n_faults++;
	const struct region *r = find_region(addr);
	if (!r) {
		char b[64];
		snprintf(b, sizeof b, "0x%llx", (unsigned long long)addr);
		tool_fail("fault outside all regions", b);
	}
	uint64_t page = addr & ~(r->psz - 1);
	switch (strategy) {
	case ON_DEMAND:
		install(r, page, r->psz, page);
		break;
	case CHUNK: {
		uint64_t c = chunk_bytes < r->psz ? r->psz : (chunk_bytes + r->psz - 1) / r->psz * r->psz;
		uint64_t start = page - page % c;
		uint64_t end = start + c;
		if (start < r->base)
			start = r->base;
		if (end > r->base + r->size)
			end = r->base + r->size;
		install(r, start, end - start, page);
		break;
	}
	case FAULT_ALL:
		if (!populated) {
			populated = 1;
			for (size_t i = 0; i < nregs && !gone; i++)
				for (uint64_t off = 0; off < regs[i].size && !gone; off += GIB) {
					uint64_t l = regs[i].size - off < GIB ? regs[i].size - off : GIB;
					install(&regs[i], regs[i].base + off, l, 0);
				}
			if (!gone)
				wake(page, r->psz);
		} else {
			install(r, page, r->psz, page);
		}
		break;
	}
}

static void process_pending(void)
{
	for (size_t i = 0; i < npend && !gone; i++)
		handle_fault(pend[i]); /* may append to pend */
	npend = 0;
}

/* ---------- connection */

static void serve(int conn)
{
	char *buf = malloc(MAX_BODY + 1);
	if (!buf)
		tool_die("malloc");
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(sizeof(int) * MAX_FDS)];
	} cb;
	struct iovec iov = { .iov_base = buf, .iov_len = MAX_BODY };
	struct msghdr mh = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = cb.b,
		.msg_controllen = sizeof cb.b,
	};
	ssize_t n;
	do
		n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		tool_die("recvmsg");
	if (n == 0)
		tool_fail("recvmsg", "VMM closed the socket before sending regions");
	buf[n] = 0;

	uffd = -1;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < nfds; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
			if (uffd < 0)
				uffd = fd;
			else if (close(fd) < 0) /* extra fds (memfd etc.): not used */
				tool_die("close extra fd");
		}
	}
	if (uffd < 0)
		tool_fail("recvmsg", "no file descriptor received");
	int fl = fcntl(uffd, F_GETFL);
	if (fl < 0)
		tool_die("fcntl F_GETFL uffd");
	if (!(fl & O_NONBLOCK) && fcntl(uffd, F_SETFL, fl | O_NONBLOCK) < 0)
		tool_die("fcntl F_SETFL uffd");

	parse_regions(buf);
	free(buf);
	n_faults = n_pages = 0;
	populated = gone = 0;
	npend = 0;

	for (;;) {
		struct pollfd p[2] = {
			{ .fd = uffd, .events = POLLIN },
			{ .fd = conn, .events = POLLIN | POLLRDHUP },
		};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			tool_die("poll");
		}
		if (p[0].revents & (POLLERR | POLLNVAL))
			tool_fail("poll", "error condition on the uffd");
		if (p[0].revents & POLLIN) {
			drain();
			process_pending();
		}
		if (gone)
			break;
		if (p[1].revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL))
			break;
		if (p[1].revents & POLLIN) {
			char junk[4096];
			ssize_t r = recv(conn, junk, sizeof junk, MSG_DONTWAIT);
			if (r == 0)
				break;
			if (r < 0 && errno != EAGAIN && errno != EINTR)
				tool_die("recv");
		}
	}
	fprintf(stderr, PROG ": served %llu faults, %llu pages\n", (unsigned long long)n_faults,
		(unsigned long long)n_pages);
	if (close(uffd) < 0)
		tool_die("close uffd");
	uffd = -1;
}

int main(int argc, char **argv)
{
	tool_name = PROG;
	const char *sock_path = NULL, *mem_path = NULL;
	long cpu = -1;
	uint64_t count = 1;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		if (!strcmp(a, "--socket"))
			sock_path = v;
		else if (!strcmp(a, "--mem"))
			mem_path = v;
		else if (!strcmp(a, "--strategy")) {
			if (!strcmp(v, "on_demand"))
				strategy = ON_DEMAND;
			else if (!strcmp(v, "chunk"))
				strategy = CHUNK;
			else if (!strcmp(v, "fault_all"))
				strategy = FAULT_ALL;
			else
				tool_fail("--strategy", "expected on_demand, chunk or fault_all");
		} else if (!strcmp(a, "--chunk")) {
			chunk_bytes = parse_u64(a, v);
			if (chunk_bytes == 0 || chunk_bytes % 4096)
				tool_fail("--chunk", "must be a positive multiple of 4096");
		} else if (!strcmp(a, "--cpu"))
			cpu = (long)parse_u64(a, v);
		else if (!strcmp(a, "--count")) {
			count = parse_u64(a, v);
			if (count == 0)
				tool_fail("--count", "must be at least 1");
		} else
			usage();
	}
	if (!sock_path || !mem_path)
		usage();

	if (cpu >= 0) {
		if (cpu >= CPU_SETSIZE)
			tool_fail("--cpu", "out of range");
		int one = (int)cpu;
		tool_pin_process(&one, 1);
	}

	/* the memory file, as Firecracker's example maps it (done before "ready"
	 * so that a benchmark does not time it) */
	int mfd = open(mem_path, O_RDONLY | O_CLOEXEC);
	if (mfd < 0)
		tool_die("open --mem");
	struct stat st;
	if (fstat(mfd, &st) < 0)
		tool_die("fstat --mem");
	if (st.st_size <= 0)
		tool_fail("--mem", "empty file");
	mem_size = (uint64_t)st.st_size;
	void *m = mmap(NULL, mem_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, mfd, 0);
	if (m == MAP_FAILED)
		tool_die("mmap --mem");
	mem = m;
	if (close(mfd) < 0)
		tool_die("close --mem");

	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(sock_path) >= sizeof sa.sun_path)
		tool_fail("--socket", "path too long");
	strcpy(sa.sun_path, sock_path);
	int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0)
		tool_die("socket");
	if (unlink(sock_path) < 0 && errno != ENOENT)
		tool_die("unlink stale socket");
	if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0)
		tool_die("bind");
	if (listen(ls, 16) < 0)
		tool_die("listen");
	if (printf("ready\n") < 0 || fflush(stdout) == EOF)
		tool_die("write stdout");

	for (uint64_t k = 0; k < count; k++) {
		int conn;
		do
			conn = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
		while (conn < 0 && errno == EINTR);
		if (conn < 0)
			tool_die("accept");
		serve(conn);
		if (close(conn) < 0)
			tool_die("close connection");
	}
	if (close(ls) < 0)
		tool_die("close listener");
	if (unlink(sock_path) < 0 && errno != ENOENT)
		tool_die("unlink socket");
	return 0;
}
