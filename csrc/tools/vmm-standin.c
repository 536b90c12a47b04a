/*
 * vmm-standin — a stand-in VM for snapload: plays a VMM's side of the UFFD handshake
 * (Firecracker's), then the guest, then checks every page the guest read.
 *
 * It maps guest memory the way Firecracker does (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE,
 * optionally MAP_HUGETLB|MAP_HUGE_2MB), creates the userfaultfd itself (O_CLOEXEC|O_NONBLOCK,
 * UFFD_FEATURE_EVENT_REMOVE), registers every region MODE_MISSING, connects once to the
 * handler's socket and sends ONE message: the JSON array of regions + the uffd (SCM_RIGHTS).
 * It keeps the socket and its uffd open while alive. Then it touches pages (timed), optionally
 * balloons ranges (MADV_DONTNEED -> UFFD_EVENT_REMOVE), and compares the pages with the flat
 * memory file it was given (untimed).
 *
 * `snapload demo` runs it; the tests and benchmarks use it as their VM. Flags, output lines and
 * exit codes: docs/vmm-standin.md. Build: scripts/build-c.ts (with csrc/tools/tool.c).
 */
#define _GNU_SOURCE
#include "tool.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif
#ifndef POLLRDHUP
#define POLLRDHUP 0x2000
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

enum {
	EXIT_OK = 0,
	EXIT_MISMATCH = 1,
	EXIT_SETUP = TOOL_EXIT_SETUP,
	EXIT_HUNG_UP = 5,
	EXIT_TIMEOUT = 6,
	EXIT_SKIP = 77,
};

#define MAX_REGIONS 64
#define MAX_BALLOONS 64
#define MAX_CPUS 256
#define HUGE_2M (2ULL << 20)
#define GIB4 (4ULL << 30)

struct region {
	uint64_t size, offset, gpa, npages, first_page;
	bool offset_given;
	uint8_t *addr;
};

struct range {
	uint64_t off, len;
};

enum vermode { VER_TOUCHED, VER_ALL, VER_NONE };

static struct {
	const char *socket_path;
	const char *expect_path;
	struct region regions[MAX_REGIONS];
	int nregions;
	bool far, hugepages;
	enum tool_wire_format format;
	bool extra_fd;
	const char *order;
	uint64_t seed;
	double fraction;
	int threads;
	int cpus[MAX_CPUS];
	int ncpus;
	bool touch_write;
	struct range balloon[MAX_BALLOONS];
	int nballoon;
	struct range balloon_after[MAX_BALLOONS];
	int nballoon_after;
	long long exit_after; /* -1 = unset */
	enum vermode verify;
	bool progress;
	long long hold_ms;
	long long pause_ms;
	long long timeout_ms;
} opt = {
	.format = TOOL_WIRE_V12,
	.order = "seq",
	.seed = 1,
	.fraction = 1.0,
	.threads = 1,
	.exit_after = -1,
	.verify = VER_TOUCHED,
	.timeout_ms = 120000,
};

static size_t page_size = 4096;
static uint64_t total_pages;
static const uint8_t *expect_map;
static uint64_t expect_size;
static int sock_fd = -1;
static int uffd = -1;

static uint32_t *order_arr;
static uint64_t touch_count; /* entries of the order to touch (after --fraction) */

/* Shared with the helper threads. */
static uint64_t g_touched; /* pages touched so far (atomic) */
static int g_done;         /* result is being printed: watchdog/watcher stand down */
static int g_watch_stop;   /* watcher: stop watching the socket */

#define usage_err(...) tool_exit(EXIT_SETUP, __VA_ARGS__)

/* ---- parsing ------------------------------------------------------------- */

static long long parse_nonneg(const char *name, const char *s, long long max)
{
	uint64_t v;
	if (!tool_parse_size(s, &v) || v > (uint64_t)max)
		usage_err("bad value for --%s: '%s'", name, s);
	return (long long)v;
}

static void parse_region(const char *s)
{
	if (opt.nregions >= MAX_REGIONS)
		usage_err("too many --region (max %d)", MAX_REGIONS);
	struct region *r = &opt.regions[opt.nregions];
	if (!tool_parse_region(s, &r->size, &r->offset, &r->offset_given))
		usage_err("bad --region '%s' (want SIZE[@OFFSET])", s);
	opt.nregions++;
}

static void parse_range(const char *name, const char *s, struct range *arr, int *n)
{
	if (*n >= MAX_BALLOONS)
		usage_err("too many --%s (max %d)", name, MAX_BALLOONS);
	char buf[256];
	if (strlen(s) >= sizeof buf)
		usage_err("bad --%s '%s'", name, s);
	strcpy(buf, s);
	char *colon = strchr(buf, ':');
	if (!colon)
		usage_err("bad --%s '%s' (want OFF:LEN)", name, s);
	*colon = 0;
	struct range *r = &arr[*n];
	if (!tool_parse_size(buf, &r->off) || !tool_parse_size(colon + 1, &r->len) || r->len == 0)
		usage_err("bad --%s '%s' (want OFF:LEN)", name, s);
	(*n)++;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: vmm-standin --socket PATH [--expect FILE] [--region SIZE[@OFFSET]]...\n"
		"  [--far] [--hugepages] [--format v1|v7|v12|future] [--extra-fd]\n"
		"  [--order seq|reverse|random|file:PATH] [--seed N] [--fraction F] [--threads N]\n"
		"  [--cpu LIST] [--touch read|write] [--balloon OFF:LEN]... [--balloon-after OFF:LEN]...\n"
		"  [--exit-after N] [--verify touched|all|none] [--progress] [--hold MS] [--pause MS] [--timeout MS]\n"
		"See docs/vmm-standin.md.\n");
}

enum {
	O_SOCKET = 1000, O_EXPECT, O_REGION, O_FAR, O_HUGE, O_FORMAT, O_EXTRA_FD, O_ORDER, O_SEED,
	O_FRACTION, O_THREADS, O_CPU, O_TOUCH, O_BALLOON, O_BALLOON_AFTER, O_EXIT_AFTER, O_VERIFY,
	O_PROGRESS, O_HOLD, O_PAUSE, O_TIMEOUT, O_HELP,
};

static void parse_args(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "socket", required_argument, 0, O_SOCKET },
		{ "expect", required_argument, 0, O_EXPECT },
		{ "region", required_argument, 0, O_REGION },
		{ "far", no_argument, 0, O_FAR },
		{ "hugepages", no_argument, 0, O_HUGE },
		{ "format", required_argument, 0, O_FORMAT },
		{ "extra-fd", no_argument, 0, O_EXTRA_FD },
		{ "order", required_argument, 0, O_ORDER },
		{ "seed", required_argument, 0, O_SEED },
		{ "fraction", required_argument, 0, O_FRACTION },
		{ "threads", required_argument, 0, O_THREADS },
		{ "cpu", required_argument, 0, O_CPU },
		{ "touch", required_argument, 0, O_TOUCH },
		{ "balloon", required_argument, 0, O_BALLOON },
		{ "balloon-after", required_argument, 0, O_BALLOON_AFTER },
		{ "exit-after", required_argument, 0, O_EXIT_AFTER },
		{ "verify", required_argument, 0, O_VERIFY },
		{ "progress", no_argument, 0, O_PROGRESS },
		{ "hold", required_argument, 0, O_HOLD },
		{ "pause", required_argument, 0, O_PAUSE },
		{ "timeout", required_argument, 0, O_TIMEOUT },
		{ "help", no_argument, 0, O_HELP },
		{ 0, 0, 0, 0 },
	};
	int c;
	opterr = 0;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case O_SOCKET: opt.socket_path = optarg; break;
		case O_EXPECT: opt.expect_path = optarg; break;
		case O_REGION: parse_region(optarg); break;
		case O_FAR: opt.far = true; break;
		case O_HUGE: opt.hugepages = true; break;
		case O_FORMAT:
			if (!strcmp(optarg, "v1")) opt.format = TOOL_WIRE_V1;
			else if (!strcmp(optarg, "v7")) opt.format = TOOL_WIRE_V7;
			else if (!strcmp(optarg, "v12")) opt.format = TOOL_WIRE_V12;
			else if (!strcmp(optarg, "future")) opt.format = TOOL_WIRE_FUTURE;
			else usage_err("bad --format '%s' (v1|v7|v12|future)", optarg);
			break;
		case O_EXTRA_FD: opt.extra_fd = true; break;
		case O_ORDER:
			if (!tool_order_spec_ok(optarg))
				usage_err("bad --order '%s' (seq|reverse|random|file:PATH)", optarg);
			opt.order = optarg;
			break;
		case O_SEED: {
			uint64_t v;
			if (!tool_parse_size(optarg, &v))
				usage_err("bad --seed '%s'", optarg);
			opt.seed = v;
			break;
		}
		case O_FRACTION:
			if (!tool_parse_fraction(optarg, &opt.fraction))
				usage_err("bad --fraction '%s' (want 0 < F <= 1)", optarg);
			break;
		case O_THREADS:
			opt.threads = (int)parse_nonneg("threads", optarg, 4096);
			if (opt.threads < 1)
				usage_err("bad --threads '%s'", optarg);
			break;
		case O_CPU:
			opt.ncpus = tool_parse_cpus(optarg, opt.cpus, MAX_CPUS);
			if (opt.ncpus < 0)
				usage_err("bad --cpu '%s'", optarg);
			break;
		case O_TOUCH:
			if (!strcmp(optarg, "read")) opt.touch_write = false;
			else if (!strcmp(optarg, "write")) opt.touch_write = true;
			else usage_err("bad --touch '%s' (read|write)", optarg);
			break;
		case O_BALLOON: parse_range("balloon", optarg, opt.balloon, &opt.nballoon); break;
		case O_BALLOON_AFTER:
			parse_range("balloon-after", optarg, opt.balloon_after, &opt.nballoon_after);
			break;
		case O_EXIT_AFTER: opt.exit_after = parse_nonneg("exit-after", optarg, LLONG_MAX); break;
		case O_VERIFY:
			if (!strcmp(optarg, "touched")) opt.verify = VER_TOUCHED;
			else if (!strcmp(optarg, "all")) opt.verify = VER_ALL;
			else if (!strcmp(optarg, "none")) opt.verify = VER_NONE;
			else usage_err("bad --verify '%s' (touched|all|none)", optarg);
			break;
		case O_PROGRESS: opt.progress = true; break;
		case O_HOLD: opt.hold_ms = parse_nonneg("hold", optarg, LLONG_MAX / 1000000); break;
		case O_PAUSE: opt.pause_ms = parse_nonneg("pause", optarg, LLONG_MAX / 1000000); break;
		case O_TIMEOUT: opt.timeout_ms = parse_nonneg("timeout", optarg, LLONG_MAX / 1000000); break;
		case O_HELP: usage(stdout); exit(0);
		default:
			usage(stderr);
			if (optopt)
				usage_err("unknown option or missing argument (near '%s')", argv[optind - 1]);
			usage_err("unknown option '%s'", argv[optind - 1]);
		}
	}
	if (optind < argc)
		usage_err("unexpected argument '%s'", argv[optind]);
	if (!opt.socket_path)
		usage_err("--socket PATH is required");
}

/* ---- helper threads ------------------------------------------------------ */

static void *watchdog_main(void *arg)
{
	(void)arg;
	uint64_t deadline = tool_now_ns() + (uint64_t)opt.timeout_ms * 1000000ULL;
	struct timespec ts = { .tv_sec = (time_t)(deadline / 1000000000ULL),
			       .tv_nsec = (long)(deadline % 1000000000ULL) };
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
	}
	if (__atomic_load_n(&g_done, __ATOMIC_ACQUIRE))
		return NULL;
	tool_exit(EXIT_TIMEOUT, "timeout (%lld ms)", opt.timeout_ms);
}

/* Called by the touching thread whose increment reached `done`: every 1% step
 * and the last page are each printed exactly once. */
static void progress_report(uint64_t done, uint64_t total)
{
	uint64_t step = total / 100 ? total / 100 : 1;
	if (done % step && done != total)
		return;
	char buf[64];
	int n = snprintf(buf, sizeof buf, "progress %" PRIu64 " %" PRIu64 "\n", done, total);
	if (n > 0 && write(2, buf, (size_t)n) < 0) {
		/* ignore */
	}
}

static void hung_up(void)
{
	if (__atomic_load_n(&g_watch_stop, __ATOMIC_ACQUIRE))
		return;
	tool_exit(EXIT_HUNG_UP, "handler hung up");
}

/* Watches the socket for HUP/EOF: a dead handler would otherwise leave the
 * touching threads blocked forever. */
static void *watcher_main(void *arg)
{
	(void)arg;
	bool warned = false;
	while (!__atomic_load_n(&g_watch_stop, __ATOMIC_ACQUIRE)) {
		struct pollfd pfd = { .fd = sock_fd, .events = POLLIN | POLLRDHUP };
		int r = poll(&pfd, 1, 20);
		if (r < 0 && errno != EINTR)
			tool_exit(EXIT_SETUP, "poll(socket): %s", strerror(errno));
		if (r > 0) {
			if (pfd.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL)) {
				hung_up();
				return NULL;
			}
			if (pfd.revents & POLLIN) {
				char buf[4096];
				ssize_t n = recv(sock_fd, buf, sizeof buf, MSG_DONTWAIT);
				if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
					hung_up();
					return NULL;
				}
				if (n > 0 && !warned) {
					tool_note("warning: handler sent %zd unexpected bytes on the socket", n);
					warned = true;
				}
			}
		}
	}
	return NULL;
}

/* ---- memory --------------------------------------------------------------- */

static void __attribute__((noreturn)) hugepage_skip(const char *why)
{
	tool_exit(EXIT_SKIP, "hugepages unavailable: %s", why);
}

static long long read_sys_ll(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long long v = -1;
	if (fscanf(f, "%lld", &v) != 1)
		v = -1;
	fclose(f);
	return v;
}

/* MAP_NORESERVE hugetlb mmaps succeed even with an empty pool: the first
 * fault (or the handler's UFFDIO_COPY) would fail instead. Skip up front. */
static void check_hugepage_pool(void)
{
	const char *dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
	char p[256];
	snprintf(p, sizeof p, "%s/free_hugepages", dir);
	long long freep = read_sys_ll(p);
	snprintf(p, sizeof p, "%s/resv_hugepages", dir);
	long long resv = read_sys_ll(p);
	snprintf(p, sizeof p, "%s/nr_overcommit_hugepages", dir);
	long long over = read_sys_ll(p);
	snprintf(p, sizeof p, "%s/surplus_hugepages", dir);
	long long surplus = read_sys_ll(p);
	if (freep < 0)
		return; /* cannot tell; let it run */
	long long avail = freep - (resv > 0 ? resv : 0);
	if (over > 0 && surplus >= 0 && over > surplus)
		avail += over - surplus;
	if (avail < 0)
		avail = 0;
	if ((unsigned long long)avail < total_pages) {
		char why[160];
		snprintf(why, sizeof why, "%lld free 2 MiB pages in the pool, need %" PRIu64
			 " (sysctl vm.nr_hugepages)", avail, total_pages);
		hugepage_skip(why);
	}
}

static void *map_region(void *hint, uint64_t size)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (hint ? MAP_FIXED : 0);
	if (opt.hugepages)
		flags |= MAP_HUGETLB | MAP_HUGE_2MB;
	void *p = mmap(hint, size, PROT_READ | PROT_WRITE, flags, -1, 0);
	if (p == MAP_FAILED) {
		if (opt.hugepages)
			hugepage_skip(strerror(errno));
		tool_die("mmap(guest region)");
	}
	return p;
}

static void map_regions(void)
{
	if (!opt.far || opt.nregions == 1) {
		for (int i = 0; i < opt.nregions; i++)
			opt.regions[i].addr = map_region(NULL, opt.regions[i].size);
		return;
	}
	/* Reserve one PROT_NONE span, carve the regions out of it with MAP_FIXED,
	 * then give the gaps back. */
	uint64_t span = HUGE_2M;
	for (int i = 0; i < opt.nregions; i++)
		span += opt.regions[i].size + HUGE_2M + (i ? GIB4 : 0);
	void *res = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (res == MAP_FAILED)
		tool_die("mmap(reserve far layout)");
	uintptr_t lo = (uintptr_t)res, hi = lo + span;
	uintptr_t cur = (lo + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
	uintptr_t keep_from = lo;
	for (int i = 0; i < opt.nregions; i++) {
		struct region *r = &opt.regions[i];
		if (i)
			cur = (cur + GIB4 + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
		if (cur > keep_from && munmap((void *)keep_from, cur - keep_from))
			tool_die("munmap(far gap)");
		r->addr = map_region((void *)cur, r->size);
		if ((uintptr_t)r->addr != cur)
			tool_exit(EXIT_SETUP, "mmap(MAP_FIXED) returned %p, wanted 0x%lx", (void *)r->addr,
				  (unsigned long)cur);
		cur += r->size;
		keep_from = cur;
	}
	if (hi > keep_from && munmap((void *)keep_from, hi - keep_from))
		tool_die("munmap(far tail)");
}

static int create_uffd(void)
{
	uint64_t want = UFFD_FEATURE_EVENT_REMOVE;
	if (opt.hugepages)
		want |= UFFD_FEATURE_MISSING_HUGETLBFS;
	int fd = tool_userfaultfd(want);
	for (int i = 0; i < opt.nregions; i++)
		tool_uffd_register(fd, opt.regions[i].addr, opt.regions[i].size);
	return fd;
}

/* A memfd the size of guest memory, sent after the uffd: what a VMM backing its guest with a
 * memfd (e2b's, Firecracker's guest_memfd) passes along. The handler must close it unused. */
static int guest_memfd(void)
{
	int mfd = (int)syscall(SYS_memfd_create, "guest_mem", MFD_CLOEXEC);
	if (mfd < 0)
		tool_die("memfd_create");
	uint64_t total = 0;
	for (int i = 0; i < opt.nregions; i++)
		total += opt.regions[i].size;
	if (ftruncate(mfd, (off_t)total))
		tool_die("ftruncate(memfd)");
	return mfd;
}

/* The whole handshake in one message with the fds; a body larger than the socket buffer
 * goes out in more sends (the fds ride on the first). */
static void send_handshake(const char *body, size_t len, const int *fds, int nfds)
{
	size_t sent = 0;
	bool first = true;
	while (sent < len) {
		ssize_t n = tool_sendmsg_fds(sock_fd, body + sent, len - sent, first ? fds : NULL, first ? nfds : 0,
					     MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EPIPE || errno == ECONNRESET)
				tool_exit(EXIT_HUNG_UP, "handler hung up (while we were sending)");
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				tool_die("sendmsg");
			struct pollfd pfd = { .fd = sock_fd, .events = POLLOUT };
			if (poll(&pfd, 1, -1) < 0 && errno != EINTR)
				tool_die("poll(socket, POLLOUT)");
			continue;
		}
		first = false;
		sent += (size_t)n;
	}
}

/* ---- touching ------------------------------------------------------------------ */

static inline uint8_t *page_addr(uint64_t g, int *region_out)
{
	for (int i = 0; i < opt.nregions; i++) {
		const struct region *r = &opt.regions[i];
		if (g < r->first_page + r->npages) {
			if (region_out)
				*region_out = i;
			return r->addr + (g - r->first_page) * page_size;
		}
	}
	return NULL;
}

struct worker {
	pthread_t tid;
	int idx;
	uint64_t n;
	uint64_t *lat;
};

static pthread_barrier_t start_barrier;

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	if (opt.ncpus)
		tool_pin_thread(&opt.cpus[w->idx % opt.ncpus], 1);
	pthread_barrier_wait(&start_barrier);
	const uint64_t stride = (uint64_t)opt.threads;
	const uint64_t exit_after = opt.exit_after < 0 ? UINT64_MAX : (uint64_t)opt.exit_after;
	const bool wr = opt.touch_write;
	const bool progress = opt.progress;
	uint64_t k = 0;
	for (uint64_t e = (uint64_t)w->idx; e < touch_count; e += stride, k++) {
		uint64_t g = order_arr[e];
		uint8_t *p = page_addr(g, NULL) + (((g * 64) % page_size) & ~(size_t)7);
		struct timespec a, b;
		clock_gettime(CLOCK_MONOTONIC, &a);
		if (wr)
			__atomic_fetch_add((uint64_t *)p, 0, __ATOMIC_RELAXED);
		else
			(void)*(volatile uint8_t *)p;
		clock_gettime(CLOCK_MONOTONIC, &b);
		w->lat[k] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ULL + (uint64_t)b.tv_nsec -
			    (uint64_t)a.tv_nsec;
		uint64_t c = __atomic_add_fetch(&g_touched, 1, __ATOMIC_RELAXED);
		if (c == exit_after)
			kill(getpid(), SIGKILL);
		if (progress)
			progress_report(c, touch_count);
	}
	return NULL;
}

static void do_balloon(const struct range *arr, int n)
{
	for (int i = 0; i < n; i++) {
		if (madvise(opt.regions[0].addr + arr[i].off, arr[i].len, MADV_DONTNEED))
			tool_exit(EXIT_SETUP, "madvise(MADV_DONTNEED, +0x%" PRIx64 ", 0x%" PRIx64 "): %s",
				  arr[i].off, arr[i].len, strerror(errno));
	}
}

static bool in_balloon(int region, uint64_t off)
{
	if (region != 0)
		return false;
	for (int i = 0; i < opt.nballoon; i++)
		if (off >= opt.balloon[i].off && off - opt.balloon[i].off < opt.balloon[i].len)
			return true;
	for (int i = 0; i < opt.nballoon_after; i++)
		if (off >= opt.balloon_after[i].off && off - opt.balloon_after[i].off < opt.balloon_after[i].len)
			return true;
	return false;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* ---- setup --------------------------------------------------------------------- */

static void open_expect(bool need_expect)
{
	if (!opt.expect_path) {
		if (need_expect)
			usage_err("--expect FILE is required (or use --verify none)");
		return;
	}
	int fd = open(opt.expect_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		tool_exit(EXIT_SETUP, "open %s: %s", opt.expect_path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st))
		tool_die("fstat(expect)");
	expect_size = (uint64_t)st.st_size;
	if (expect_size) {
		void *m = mmap(NULL, expect_size, PROT_READ, MAP_PRIVATE, fd, 0);
		if (m == MAP_FAILED)
			tool_die("mmap(expect)");
		expect_map = m;
	}
	close(fd);
}

/* Region defaults, offsets, guest-physical addresses and global page numbers; checks. */
static void lay_out_regions(bool need_expect)
{
	if (opt.nregions == 0) {
		struct region *r = &opt.regions[0];
		r->size = opt.expect_path ? expect_size : page_size * (opt.hugepages ? 1 : 512);
		if (r->size == 0)
			usage_err("expect file %s is empty", opt.expect_path);
		r->offset = 0;
		r->offset_given = true;
		opt.nregions = 1;
	}
	uint64_t running = 0, gpa = 0;
	for (int i = 0; i < opt.nregions; i++) {
		struct region *r = &opt.regions[i];
		if (r->size % page_size)
			usage_err("region %d: size %" PRIu64 " is not a multiple of the page size %zu", i,
				  r->size, page_size);
		if (!r->offset_given)
			r->offset = running;
		if (r->offset % 4096)
			usage_err("region %d: offset %" PRIu64 " is not 4 KiB aligned", i, r->offset);
		if (need_expect && (r->offset > expect_size || r->size > expect_size - r->offset))
			usage_err("region %d: [%" PRIu64 ", +%" PRIu64 ") lies beyond the expect file (%" PRIu64
				  " bytes)", i, r->offset, r->size, expect_size);
		running = r->offset + r->size;
		if (opt.far && i)
			gpa = (gpa + GIB4 - 1) & ~(GIB4 - 1);
		r->gpa = gpa;
		gpa += r->size;
		r->npages = r->size / page_size;
		r->first_page = total_pages;
		total_pages += r->npages;
	}
	if (total_pages > UINT32_MAX)
		usage_err("too many pages (%" PRIu64 ")", total_pages);
	struct range *lists[2] = { opt.balloon, opt.balloon_after };
	int counts[2] = { opt.nballoon, opt.nballoon_after };
	for (int l = 0; l < 2; l++)
		for (int i = 0; i < counts[l]; i++) {
			const struct range *b = &lists[l][i];
			if (b->off % page_size || b->len % page_size)
				usage_err("balloon range 0x%" PRIx64 ":0x%" PRIx64 " is not page aligned (%zu)",
					  b->off, b->len, page_size);
			if (b->off > opt.regions[0].size || b->len > opt.regions[0].size - b->off)
				usage_err("balloon range 0x%" PRIx64 ":0x%" PRIx64 " is outside region 0",
					  b->off, b->len);
		}
}

static void connect_and_send(void)
{
	struct tool_wire_region wire[MAX_REGIONS];
	for (int i = 0; i < opt.nregions; i++) {
		const struct region *r = &opt.regions[i];
		wire[i] = (struct tool_wire_region){ .addr = (uintptr_t)r->addr, .size = r->size, .offset = r->offset, .gpa = r->gpa };
	}
	size_t body_len;
	char *body = tool_handshake_json(wire, opt.nregions, page_size, opt.format, &body_len);
	int fds[3], nfds = 0;
	fds[nfds++] = uffd;
	if (opt.extra_fd)
		fds[nfds++] = guest_memfd();
	if (opt.format == TOOL_WIRE_FUTURE)
		fds[nfds++] = guest_memfd();
	/* Connect once, no retry: a VMM that finds no handler fails the restore. */
	sock_fd = tool_unix_connect(opt.socket_path);
	if (sock_fd < 0)
		tool_exit(EXIT_SETUP, "connect %s: %s", opt.socket_path, strerror(errno));
	send_handshake(body, body_len, fds, nfds);
	free(body);
}

/* ---- verification --------------------------------------------------------------- */

static void verify_pages(uint64_t *verified_out, uint64_t *mismatches_out, long long *first_out)
{
	uint64_t verified = 0, mismatches = 0;
	long long first_mismatch = -1;
	uint8_t *bits = NULL;
	if (opt.verify == VER_TOUCHED) {
		bits = calloc(total_pages / 8 + 1, 1);
		if (!bits)
			tool_die("calloc(bitmap)");
		for (uint64_t i = 0; i < touch_count; i++)
			bits[order_arr[i] >> 3] |= (uint8_t)(1u << (order_arr[i] & 7));
	}
	uint8_t *zero = calloc(1, page_size);
	if (!zero)
		tool_die("calloc(zero page)");
	for (uint64_t g = 0; g < total_pages; g++) {
		if (bits && !(bits[g >> 3] & (1u << (g & 7))))
			continue;
		int ri = 0;
		const uint8_t *got = page_addr(g, &ri);
		const struct region *r = &opt.regions[ri];
		uint64_t off = (g - r->first_page) * page_size;
		const uint8_t *want = in_balloon(ri, off) ? zero : expect_map + r->offset + off;
		verified++;
		if (memcmp(got, want, page_size) != 0) {
			if (mismatches == 0) {
				first_mismatch = (long long)g;
				size_t b = 0;
				while (b < page_size && got[b] == want[b])
					b++;
				tool_note("mismatch: page %" PRIu64 " (region %d page %" PRIu64
					  ", file offset 0x%" PRIx64 "%s): first differing byte +%zu: want 0x%02x got 0x%02x",
					  g, ri, off / page_size, r->offset + off,
					  want == zero ? ", ballooned: want zeros" : "", b, want[b], got[b]);
			}
			mismatches++;
		}
	}
	free(bits);
	free(zero);
	*verified_out = verified;
	*mismatches_out = mismatches;
	*first_out = first_mismatch;
}

/* ---- main ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	tool_name = "standin";
	parse_args(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	if (opt.ncpus)
		tool_pin_process(opt.cpus, opt.ncpus);

	pthread_t watchdog;
	int e = pthread_create(&watchdog, NULL, watchdog_main, NULL);
	if (e)
		tool_exit(EXIT_SETUP, "pthread_create(watchdog): %s", strerror(e));

	page_size = opt.hugepages ? HUGE_2M : 4096;
	bool need_expect = opt.verify != VER_NONE;
	open_expect(need_expect);
	lay_out_regions(need_expect);
	uint64_t order_len;
	order_arr = tool_page_order(opt.order, total_pages, opt.seed, &order_len);
	touch_count = tool_fraction_count(opt.fraction, order_len);

	map_regions();
	if (opt.hugepages)
		check_hugepage_pool();
	uffd = create_uffd();
	connect_and_send();
	if (opt.exit_after == 0)
		kill(getpid(), SIGKILL);

	/* Guest phase. */
	pthread_t watcher;
	e = pthread_create(&watcher, NULL, watcher_main, NULL);
	if (e)
		tool_exit(EXIT_SETUP, "pthread_create(watcher): %s", strerror(e));

	do_balloon(opt.balloon, opt.nballoon);

	int nt = opt.threads;
	struct worker *ws = calloc((size_t)nt, sizeof *ws);
	if (!ws)
		tool_die("calloc(workers)");
	uint64_t per = touch_count / (uint64_t)nt + 1;
	for (int t = 0; t < nt; t++) {
		ws[t].idx = t;
		ws[t].lat = malloc(per * sizeof(uint64_t));
		if (!ws[t].lat)
			tool_die("malloc(latencies)");
		memset(ws[t].lat, 0, per * sizeof(uint64_t)); /* fault it in before timing */
	}
	e = pthread_barrier_init(&start_barrier, NULL, (unsigned)nt + 1);
	if (e)
		tool_exit(EXIT_SETUP, "pthread_barrier_init: %s", strerror(e));
	for (int t = 0; t < nt; t++) {
		e = pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]);
		if (e)
			tool_exit(EXIT_SETUP, "pthread_create(worker): %s", strerror(e));
	}
	pthread_barrier_wait(&start_barrier);
	uint64_t t0 = tool_now_ns();
	for (int t = 0; t < nt; t++)
		pthread_join(ws[t].tid, NULL);
	uint64_t t1 = tool_now_ns();

	do_balloon(opt.balloon_after, opt.nballoon_after);
	if (opt.pause_ms > 0)
		tool_sleep_ms(opt.pause_ms);

	/* Verification (untimed). */
	uint64_t verified = 0, mismatches = 0;
	long long first_mismatch = -1;
	if (opt.verify != VER_NONE && total_pages)
		verify_pages(&verified, &mismatches, &first_mismatch);
	__atomic_store_n(&g_watch_stop, 1, __ATOMIC_RELEASE);
	__atomic_store_n(&g_done, 1, __ATOMIC_RELEASE);
	pthread_join(watcher, NULL);

	/* Latencies. */
	uint64_t nlat = 0;
	for (int t = 0; t < nt; t++) {
		uint64_t c = 0;
		for (uint64_t en = (uint64_t)t; en < touch_count; en += (uint64_t)nt)
			c++;
		ws[t].n = c;
		nlat += c;
	}
	uint64_t *all = malloc((nlat + 1) * sizeof(uint64_t));
	if (!all)
		tool_die("malloc(latencies)");
	uint64_t k = 0;
	for (int t = 0; t < nt; t++) {
		memcpy(all + k, ws[t].lat, ws[t].n * sizeof(uint64_t));
		k += ws[t].n;
	}
	qsort(all, nlat, sizeof(uint64_t), cmp_u64);
	uint64_t p50 = 0, p99 = 0, pmax = 0;
	if (nlat) {
		p50 = all[(nlat * 50 + 99) / 100 - 1];
		p99 = all[(nlat * 99 + 99) / 100 - 1];
		pmax = all[nlat - 1];
	}
	if (mismatches)
		tool_note("%" PRIu64 " of %" PRIu64 " verified pages mismatch", mismatches, verified);

	printf("{\"pages\":%" PRIu64 ",\"verified\":%" PRIu64 ",\"mismatches\":%" PRIu64
	       ",\"first_mismatch\":%lld,\"touch_ns\":%" PRIu64 ",\"lat_p50_ns\":%" PRIu64
	       ",\"lat_p99_ns\":%" PRIu64 ",\"lat_max_ns\":%" PRIu64 ",\"threads\":%d}\n",
	       touch_count, verified, mismatches, first_mismatch, t1 - t0, p50, p99, pmax, nt);
	fflush(stdout);

	if (opt.hold_ms > 0)
		tool_sleep_ms(opt.hold_ms);
	/* The socket and our uffd copy stay open until the process exits. */
	_exit(mismatches ? EXIT_MISMATCH : EXIT_OK);
}
