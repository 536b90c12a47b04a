/* tool.c — see tool.h. */
#define _GNU_SOURCE
#include "tool.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>

#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

const char *tool_name = "tool";

/* One write per message, so lines from several threads do not interleave. */
static void vnote(const char *fmt, va_list ap)
{
	char buf[1024];
	int p = snprintf(buf, sizeof buf, "%s: ", tool_name);
	if (p < 0 || (size_t)p >= sizeof buf)
		p = 0;
	int n = vsnprintf(buf + p, sizeof buf - (size_t)p, fmt, ap);
	if (n < 0)
		n = 0;
	size_t len = (size_t)p + (size_t)n;
	if (len >= sizeof buf - 1)
		len = sizeof buf - 2;
	buf[len++] = '\n';
	if (write(2, buf, len) < 0) {
		/* nothing more we can do */
	}
}

void tool_note(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vnote(fmt, ap);
	va_end(ap);
}

void tool_exit(int code, const char *fmt, ...)
{
	fflush(stdout);
	va_list ap;
	va_start(ap, fmt);
	vnote(fmt, ap);
	va_end(ap);
	_exit(code);
}

void tool_die(const char *what)
{
	tool_exit(TOOL_EXIT_SETUP, "%s: %s", what, strerror(errno));
}

void tool_fail(const char *what, const char *detail)
{
	tool_exit(TOOL_EXIT_SETUP, "%s: %s", what, detail);
}

uint64_t tool_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void tool_sleep_ms(long long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
	}
}

/* ---- numbers ------------------------------------------------------------- */

bool tool_parse_size(const char *s, uint64_t *out)
{
	if (!s || !*s || *s == '-' || *s == '+' || *s == ' ' || *s == '\t')
		return false;
	int base = (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) ? 16 : 10;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, base);
	if (errno || end == s)
		return false;
	uint64_t mult = 1;
	switch (*end) {
	case 'k': case 'K': mult = 1ULL << 10; break;
	case 'm': case 'M': mult = 1ULL << 20; break;
	case 'g': case 'G': mult = 1ULL << 30; break;
	case 't': case 'T': mult = 1ULL << 40; break;
	default: break;
	}
	if (mult > 1) {
		end++;
		if ((end[0] == 'i' || end[0] == 'I') && (end[1] == 'b' || end[1] == 'B'))
			end += 2;
		else if (end[0] == 'b' || end[0] == 'B')
			end += 1;
	}
	if (*end)
		return false;
	if (mult > 1 && v > UINT64_MAX / mult)
		return false;
	*out = (uint64_t)v * mult;
	return true;
}

bool tool_parse_region(const char *s, uint64_t *size, uint64_t *offset, bool *has_offset)
{
	char buf[256];
	if (strlen(s) >= sizeof buf)
		return false;
	strcpy(buf, s);
	char *at = strchr(buf, '@');
	*has_offset = at != NULL;
	if (at) {
		*at = 0;
		if (!tool_parse_size(at + 1, offset))
			return false;
	}
	return tool_parse_size(buf, size) && *size > 0;
}

bool tool_parse_fraction(const char *s, double *out)
{
	char *end;
	errno = 0;
	double f = strtod(s, &end);
	if (errno || end == s || *end || !(f > 0.0 && f <= 1.0))
		return false;
	*out = f;
	return true;
}

int tool_parse_cpus(const char *s, int *cpus, int max)
{
	char buf[1024];
	if (strlen(s) >= sizeof buf)
		return -1;
	strcpy(buf, s);
	int n = 0;
	char *save = NULL;
	for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *dash = strchr(tok, '-');
		uint64_t a, b;
		if (dash) {
			*dash = 0;
			if (!tool_parse_size(tok, &a) || !tool_parse_size(dash + 1, &b) || b < a)
				return -1;
		} else {
			if (!tool_parse_size(tok, &a))
				return -1;
			b = a;
		}
		for (uint64_t c = a; c <= b; c++) {
			if (c >= CPU_SETSIZE || n >= max)
				return -1;
			cpus[n++] = (int)c;
		}
	}
	return n ? n : -1;
}

static void cpu_set_of(const int *cpus, int n, cpu_set_t *set)
{
	CPU_ZERO(set);
	for (int i = 0; i < n; i++)
		CPU_SET(cpus[i], set);
}

void tool_pin_thread(const int *cpus, int n)
{
	cpu_set_t set;
	cpu_set_of(cpus, n, &set);
	int e = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
	if (e)
		tool_exit(TOOL_EXIT_SETUP, "pthread_setaffinity_np(cpu %d): %s", cpus[0], strerror(e));
}

void tool_pin_process(const int *cpus, int n)
{
	cpu_set_t set;
	cpu_set_of(cpus, n, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		tool_die("sched_setaffinity(--cpu)");
}

/* ---- page orders ----------------------------------------------------------- */

void tool_rng_seed(struct tool_rng *r, uint64_t seed)
{
	r->state = seed ? seed : 0x9e3779b97f4a7c15ULL;
}

uint64_t tool_rng_next(struct tool_rng *r)
{
	uint64_t x = r->state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	r->state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

bool tool_order_spec_ok(const char *spec)
{
	return !strcmp(spec, "seq") || !strcmp(spec, "reverse") || !strcmp(spec, "random") ||
	       (!strncmp(spec, "file:", 5) && spec[5]);
}

static uint32_t *order_from_file(const char *path, uint64_t npages, uint64_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		tool_exit(TOOL_EXIT_SETUP, "open %s: %s", path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st))
		tool_die("fstat(order file)");
	if (st.st_size % 4)
		tool_exit(TOOL_EXIT_SETUP, "order file %s: size %lld is not a multiple of 4", path, (long long)st.st_size);
	uint64_t n = (uint64_t)st.st_size / 4;
	uint32_t *order = malloc(n * 4 + 4);
	if (!order)
		tool_die("malloc(order)");
	uint8_t *raw = (uint8_t *)order;
	size_t got = 0;
	while (got < n * 4) {
		ssize_t r = read(fd, raw + got, n * 4 - got);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			tool_die("read(order file)");
		if (r == 0)
			tool_exit(TOOL_EXIT_SETUP, "order file %s: short read", path);
		got += (size_t)r;
	}
	close(fd);
	for (uint64_t i = 0; i < n; i++) {
		const uint8_t *q = raw + i * 4;
		uint32_t v = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
		if (v >= npages)
			tool_exit(TOOL_EXIT_SETUP, "order file %s: entry %" PRIu64 " = %u out of range (%" PRIu64 " pages)",
				  path, i, v, npages);
		order[i] = v;
	}
	*len = n;
	return order;
}

uint32_t *tool_page_order(const char *spec, uint64_t npages, uint64_t seed, uint64_t *len)
{
	if (!tool_order_spec_ok(spec))
		tool_exit(TOOL_EXIT_SETUP, "bad order '%s' (seq|reverse|random|file:PATH)", spec);
	if (!strncmp(spec, "file:", 5))
		return order_from_file(spec + 5, npages, len);
	if (npages > UINT32_MAX)
		tool_exit(TOOL_EXIT_SETUP, "too many pages (%" PRIu64 ")", npages);
	uint32_t *order = malloc(npages * sizeof(uint32_t) + 4);
	if (!order)
		tool_die("malloc(order)");
	bool reverse = !strcmp(spec, "reverse");
	for (uint64_t i = 0; i < npages; i++)
		order[i] = (uint32_t)(reverse ? npages - 1 - i : i);
	if (!strcmp(spec, "random") && npages > 1) {
		struct tool_rng rng;
		tool_rng_seed(&rng, seed);
		for (uint64_t i = npages - 1; i > 0; i--) {
			uint64_t j = tool_rng_next(&rng) % (i + 1);
			uint32_t t = order[i];
			order[i] = order[j];
			order[j] = t;
		}
	}
	*len = npages;
	return order;
}

uint64_t tool_fraction_count(double fraction, uint64_t len)
{
	double x = fraction * (double)len;
	uint64_t c = (uint64_t)x;
	if ((double)c + 1e-9 < x)
		c++;
	if (c == 0 && len > 0)
		c = 1;
	return c > len ? len : c;
}

/* ---- sockets --------------------------------------------------------------- */

int tool_unix_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path) {
		errno = ENAMETOOLONG;
		return -1;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

ssize_t tool_sendmsg_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags)
{
	union {
		char b[CMSG_SPACE(sizeof(int) * 8)];
		struct cmsghdr align;
	} u;
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (nfds > 8) {
		errno = EINVAL;
		return -1;
	}
	if (nfds > 0) {
		memset(&u, 0, sizeof u);
		mh.msg_control = u.b;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
	}
	return sendmsg(sock, &mh, flags);
}

/* ---- userfaultfd ----------------------------------------------------------- */

int tool_userfaultfd(uint64_t features)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && (errno == ENOSYS || errno == EPERM)) {
		int e = errno;
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0) {
			tool_note("userfaultfd(): %s; /dev/userfaultfd: %s", strerror(e), strerror(errno));
			tool_exit(TOOL_EXIT_SETUP, "cannot create a userfaultfd");
		}
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		int e2 = errno;
		close(dev);
		errno = e2;
		if (fd < 0)
			tool_die("ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)");
	} else if (fd < 0) {
		tool_die("userfaultfd()");
	}
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(fd, UFFDIO_API, &api))
		tool_die("ioctl(UFFDIO_API)");
	if ((api.features & features) != features)
		tool_exit(TOOL_EXIT_SETUP, "UFFDIO_API: kernel lacks features 0x%llx",
			  (unsigned long long)(features & ~api.features));
	return fd;
}

void tool_uffd_register(int uffd, void *addr, uint64_t len)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)addr, .len = len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		tool_die("ioctl(UFFDIO_REGISTER)");
	if (!(reg.ioctls & (1ULL << _UFFDIO_COPY)))
		tool_exit(TOOL_EXIT_SETUP, "UFFDIO_REGISTER: UFFDIO_COPY not available at %p", addr);
}

/* ---- handshake ------------------------------------------------------------- */

char *tool_handshake_json(const struct tool_wire_region *r, int n, size_t page_size, enum tool_wire_format fmt,
			  size_t *len)
{
	size_t cap = 64 + (size_t)n * 320, used = 0;
	char *b = malloc(cap);
	if (!b)
		tool_die("malloc(handshake)");
	used += (size_t)snprintf(b + used, cap - used, "[");
	for (int i = 0; i < n; i++) {
		used += (size_t)snprintf(b + used, cap - used,
					 "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64 ",\"offset\":%" PRIu64,
					 i ? "," : "", r[i].addr, r[i].size, r[i].offset);
		if (fmt == TOOL_WIRE_V7)
			used += (size_t)snprintf(b + used, cap - used, ",\"page_size_kib\":%zu", page_size);
		if (fmt == TOOL_WIRE_V12 || fmt == TOOL_WIRE_FUTURE)
			used += (size_t)snprintf(b + used, cap - used, ",\"page_size\":%zu,\"page_size_kib\":%zu", page_size,
						 page_size);
		if (fmt == TOOL_WIRE_FUTURE)
			used += (size_t)snprintf(b + used, cap - used, ",\"gpa_start\":%" PRIu64 ",\"is_guest_memfd\":false",
						 r[i].gpa);
		used += (size_t)snprintf(b + used, cap - used, "}");
	}
	used += (size_t)snprintf(b + used, cap - used, "]");
	if (used >= cap)
		tool_exit(TOOL_EXIT_SETUP, "internal: handshake buffer too small");
	*len = used;
	return b;
}
