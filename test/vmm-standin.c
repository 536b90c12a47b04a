/*
 * vmm-standin.c — plays Firecracker's side of the UFFD handshake, then the guest.
 *
 * It maps guest memory the way Firecracker does (MAP_PRIVATE|MAP_ANONYMOUS|
 * MAP_NORESERVE, optionally MAP_HUGETLB|MAP_HUGE_2MB), creates the userfaultfd
 * itself (O_CLOEXEC|O_NONBLOCK, kernel faults included), UFFDIO_API with
 * UFFD_FEATURE_EVENT_REMOVE, registers every region MODE_MISSING, connects once
 * to the handler's socket and sends ONE sendmsg: JSON array + SCM_RIGHTS fd(s).
 * It never closes the socket or its uffd copy while alive. Then it touches
 * pages (timed), optionally balloons ranges (MADV_DONTNEED -> UFFD_EVENT_REMOVE),
 * and verifies page contents against the flat snapshot file (untimed).
 *
 * Build: cc -O2 -Wall -Wextra -Werror -std=gnu11 -pthread -o build/vmm-standin test/vmm-standin.c
 *
 * Options (sizes take k/m/g/t binary suffixes, optional "iB"/"B", and 0x hex):
 *   --socket PATH            handler's Unix SOCK_STREAM socket (required); one connect, no retry
 *   --expect FILE            flat memory file with the expected contents
 *   --region SIZE[@OFFSET]   repeatable; default one region = whole --expect file @0.
 *                            Without @OFFSET the offset is the running sum of previous sizes.
 *   --far                    regions after the first start >= 4 GiB after the previous one ends
 *   --hugepages              MAP_HUGETLB|MAP_HUGE_2MB, page size 2 MiB (exit 77 if unavailable)
 *   --format v1|v7|v12|future  JSON flavour (default v12); future also sends a memfd as an extra fd
 *   --body STRING            send exactly STRING as the body
 *   --garbage N              send N bytes of xorshift garbage (first byte 0xff) as the body
 *   --fds uffd|none|notuffd|two|many  SCM_RIGHTS payload (two = uffd + /dev/null,
 *                                many = uffd + 4 x /dev/null)
 *   --silent                 connect, send nothing, wait for the handler to close (implies --expect-reject)
 *   --expect-reject          after sending, touch nothing; wait for the handler to close the socket
 *   --reject-timeout MS      (default 10000) window for --expect-reject, counted from the start of sending
 *   --order seq|reverse|random|file:PATH   order of first touches over global page indexes
 *   --seed N                 (default 1) for --order random
 *   --fraction F             0<F<=1, touch the first ceil(F*n) entries of the order
 *   --threads N              touch threads; thread t takes entries t, t+N, t+2N, ...
 *   --cpu LIST               e.g. 0 or 0,1 or 0-3: touch thread t pinned to LIST[t % len];
 *                            main/watcher/watchdog threads are confined to the whole LIST
 *   --touch read|write       volatile byte load, or atomic fetch_add(0) on an aligned u64
 *   --balloon OFF:LEN        repeatable; MADV_DONTNEED that range of region 0 before touching
 *   --balloon-after OFF:LEN  repeatable; same, after the touch phase
 *   --exit-after N           SIGKILL ourselves once N pages have been touched (0 = right after the handshake)
 *   --verify touched|all|none  (default touched)
 *   --progress               "progress <touched> <total>" lines on stderr, about every 1%
 *   --hold MS                keep the socket open MS ms after printing the result
 *   --announce-half          tell the handler each region is half its registered size
 *                            (a lying VMM: faults land outside what it announced)
 *   --pause MS               sleep MS ms after the touch phase, before verifying
 *                            (lets a background populator finish first)
 *   --timeout MS             (default 120000) overall watchdog
 *
 * Global page index g: pages numbered across regions in region order, page = page size.
 * Touch offset inside page g: (g*64) % page_size.
 * --order random: state = seed (0 -> 0x9e3779b97f4a7c15); xorshift64*:
 *   x ^= x>>12; x ^= x<<25; x ^= x>>27; state = x; out = x*0x2545F4914F6CDD1D;
 *   order = 0..n-1, then for i = n-1 down to 1: j = next() % (i+1); swap(order[i], order[j]).
 * --order file:PATH: little-endian u32 global page indexes.
 *
 * stdout (one line, on completion):
 *   {"pages":P,"verified":V,"mismatches":M,"first_mismatch":G|-1,"touch_ns":T,
 *    "lat_p50_ns":A,"lat_p99_ns":B,"lat_max_ns":C,"threads":N}
 * Exit: 0 ok, 1 mismatches, 2 usage/setup error, 3 handler closed (--expect-reject),
 *       4 handler did not close in time, 5 handler hung up while we ran, 6 timeout,
 *       77 hugepages unavailable.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <linux/userfaultfd.h>

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT)
#endif
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
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
	EXIT_SETUP = 2,
	EXIT_REJECTED = 3,
	EXIT_NOT_REJECTED = 4,
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

enum fmt { FMT_V1, FMT_V7, FMT_V12, FMT_FUTURE };
enum fdsmode { FDS_UFFD, FDS_NONE, FDS_NOTUFFD, FDS_TWO, FDS_MANY };
enum ordmode { ORD_SEQ, ORD_REV, ORD_RANDOM, ORD_FILE };
enum vermode { VER_TOUCHED, VER_ALL, VER_NONE };

static struct {
	const char *socket_path;
	const char *expect_path;
	struct region regions[MAX_REGIONS];
	int nregions;
	bool far, hugepages;
	enum fmt format;
	const char *body;
	long long garbage; /* -1 = unset */
	enum fdsmode fds;
	bool silent, expect_reject;
	long long reject_timeout_ms;
	enum ordmode order;
	const char *order_file;
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
	int announce_half;
	long long timeout_ms;
} opt = {
	.format = FMT_V12,
	.garbage = -1,
	.fds = FDS_UFFD,
	.reject_timeout_ms = 10000,
	.order = ORD_SEQ,
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
static uint64_t order_len;   /* entries in the full order */
static uint64_t touch_count; /* entries to touch (after --fraction) */

/* Shared with the helper threads. */
static uint64_t g_touched;     /* pages touched so far (atomic) */
static int g_done;             /* result is being printed: watchdog/watcher stand down */
static int g_watch_stop;       /* watcher: stop watching the socket */

/* ------------------------------------------------------------------------- */

static void vfail(int code, const char *fmt, va_list ap)
{
	char buf[1024];
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof buf - 1)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	fflush(stdout);
	if (write(2, "standin: ", 9) < 0 || write(2, buf, (size_t)n) < 0) {
		/* nothing more we can do */
	}
	_exit(code);
}

static void __attribute__((noreturn, format(printf, 2, 3))) fail(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfail(code, fmt, ap);
	va_end(ap);
	_exit(code);
}

static void __attribute__((noreturn)) syserr(const char *what)
{
	fail(EXIT_SETUP, "%s: %s", what, strerror(errno));
}

static void __attribute__((noreturn, format(printf, 1, 2))) usage_err(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vfail(EXIT_SETUP, fmt, ap);
	va_end(ap);
	_exit(EXIT_SETUP);
}

static void msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void msg(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof buf - 1)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	if (write(2, "standin: ", 9) < 0 || write(2, buf, (size_t)n) < 0) {
		/* ignore */
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ms(long long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
	}
}

/* ---- parsing ------------------------------------------------------------- */

static bool parse_u64(const char *s, uint64_t *out)
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

static long long parse_nonneg(const char *name, const char *s, long long max)
{
	uint64_t v;
	if (!parse_u64(s, &v) || v > (uint64_t)max)
		usage_err("bad value for --%s: '%s'", name, s);
	return (long long)v;
}

static void parse_region(const char *s)
{
	if (opt.nregions >= MAX_REGIONS)
		usage_err("too many --region (max %d)", MAX_REGIONS);
	struct region *r = &opt.regions[opt.nregions];
	char buf[256];
	if (strlen(s) >= sizeof buf)
		usage_err("bad --region '%s'", s);
	strcpy(buf, s);
	char *at = strchr(buf, '@');
	if (at) {
		*at = 0;
		if (!parse_u64(at + 1, &r->offset))
			usage_err("bad --region offset in '%s'", s);
		r->offset_given = true;
	}
	if (!parse_u64(buf, &r->size) || r->size == 0)
		usage_err("bad --region size in '%s'", s);
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
	if (!parse_u64(buf, &r->off) || !parse_u64(colon + 1, &r->len) || r->len == 0)
		usage_err("bad --%s '%s' (want OFF:LEN)", name, s);
	(*n)++;
}

static void parse_cpus(const char *s)
{
	char buf[1024];
	if (strlen(s) >= sizeof buf)
		usage_err("bad --cpu '%s'", s);
	strcpy(buf, s);
	char *save = NULL;
	for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *dash = strchr(tok, '-');
		uint64_t a, b;
		if (dash) {
			*dash = 0;
			if (!parse_u64(tok, &a) || !parse_u64(dash + 1, &b) || b < a)
				usage_err("bad --cpu '%s'", s);
		} else {
			if (!parse_u64(tok, &a))
				usage_err("bad --cpu '%s'", s);
			b = a;
		}
		for (uint64_t c = a; c <= b; c++) {
			if (c >= CPU_SETSIZE || opt.ncpus >= MAX_CPUS)
				usage_err("bad --cpu '%s'", s);
			opt.cpus[opt.ncpus++] = (int)c;
		}
	}
	if (opt.ncpus == 0)
		usage_err("bad --cpu '%s'", s);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: vmm-standin --socket PATH [--expect FILE] [--region SIZE[@OFFSET]]...\n"
		"  [--far] [--hugepages] [--format v1|v7|v12|future] [--body STR | --garbage N]\n"
		"  [--fds uffd|none|notuffd|two|many] [--silent] [--expect-reject] [--reject-timeout MS]\n"
		"  [--order seq|reverse|random|file:PATH] [--seed N] [--fraction F] [--threads N]\n"
		"  [--cpu LIST] [--touch read|write] [--balloon OFF:LEN]... [--balloon-after OFF:LEN]...\n"
		"  [--exit-after N] [--verify touched|all|none] [--progress] [--hold MS] [--pause MS] [--announce-half] [--timeout MS]\n");
}

enum {
	O_SOCKET = 1000, O_EXPECT, O_REGION, O_FAR, O_HUGE, O_FORMAT, O_BODY, O_GARBAGE, O_FDS,
	O_SILENT, O_EXPREJ, O_REJTO, O_ORDER, O_SEED, O_FRACTION, O_THREADS, O_CPU, O_TOUCH,
	O_BALLOON, O_BALLOON_AFTER, O_EXIT_AFTER, O_VERIFY, O_PROGRESS, O_HOLD, O_PAUSE, O_ANNOUNCE_HALF, O_TIMEOUT, O_HELP,
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
		{ "body", required_argument, 0, O_BODY },
		{ "garbage", required_argument, 0, O_GARBAGE },
		{ "fds", required_argument, 0, O_FDS },
		{ "silent", no_argument, 0, O_SILENT },
		{ "expect-reject", no_argument, 0, O_EXPREJ },
		{ "reject-timeout", required_argument, 0, O_REJTO },
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
		{ "announce-half", no_argument, 0, O_ANNOUNCE_HALF },
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
			if (!strcmp(optarg, "v1")) opt.format = FMT_V1;
			else if (!strcmp(optarg, "v7")) opt.format = FMT_V7;
			else if (!strcmp(optarg, "v12")) opt.format = FMT_V12;
			else if (!strcmp(optarg, "future")) opt.format = FMT_FUTURE;
			else usage_err("bad --format '%s' (v1|v7|v12|future)", optarg);
			break;
		case O_BODY: opt.body = optarg; break;
		case O_GARBAGE: opt.garbage = parse_nonneg("garbage", optarg, 1LL << 40); break;
		case O_FDS:
			if (!strcmp(optarg, "uffd")) opt.fds = FDS_UFFD;
			else if (!strcmp(optarg, "none")) opt.fds = FDS_NONE;
			else if (!strcmp(optarg, "notuffd")) opt.fds = FDS_NOTUFFD;
			else if (!strcmp(optarg, "two")) opt.fds = FDS_TWO;
			else if (!strcmp(optarg, "many")) opt.fds = FDS_MANY;
			else usage_err("bad --fds '%s' (uffd|none|notuffd|two|many)", optarg);
			break;
		case O_SILENT: opt.silent = true; break;
		case O_EXPREJ: opt.expect_reject = true; break;
		case O_REJTO: opt.reject_timeout_ms = parse_nonneg("reject-timeout", optarg, INT_MAX); break;
		case O_ORDER:
			if (!strcmp(optarg, "seq")) opt.order = ORD_SEQ;
			else if (!strcmp(optarg, "reverse")) opt.order = ORD_REV;
			else if (!strcmp(optarg, "random")) opt.order = ORD_RANDOM;
			else if (!strncmp(optarg, "file:", 5) && optarg[5]) {
				opt.order = ORD_FILE;
				opt.order_file = optarg + 5;
			} else usage_err("bad --order '%s' (seq|reverse|random|file:PATH)", optarg);
			break;
		case O_SEED: {
			uint64_t v;
			if (!parse_u64(optarg, &v))
				usage_err("bad --seed '%s'", optarg);
			opt.seed = v;
			break;
		}
		case O_FRACTION: {
			char *end;
			errno = 0;
			double f = strtod(optarg, &end);
			if (errno || end == optarg || *end || !(f > 0.0 && f <= 1.0))
				usage_err("bad --fraction '%s' (want 0 < F <= 1)", optarg);
			opt.fraction = f;
			break;
		}
		case O_THREADS:
			opt.threads = (int)parse_nonneg("threads", optarg, 4096);
			if (opt.threads < 1)
				usage_err("bad --threads '%s'", optarg);
			break;
		case O_CPU: parse_cpus(optarg); break;
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
		case O_ANNOUNCE_HALF: opt.announce_half = 1; break;
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
	if (opt.body && opt.garbage >= 0)
		usage_err("--body and --garbage are exclusive");
	if (opt.silent)
		opt.expect_reject = true;
}

/* ---- helper threads ------------------------------------------------------ */

static void *watchdog_main(void *arg)
{
	(void)arg;
	uint64_t deadline = now_ns() + (uint64_t)opt.timeout_ms * 1000000ULL;
	struct timespec ts = { .tv_sec = (time_t)(deadline / 1000000000ULL),
			       .tv_nsec = (long)(deadline % 1000000000ULL) };
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
	}
	if (__atomic_load_n(&g_done, __ATOMIC_ACQUIRE))
		return NULL;
	fail(EXIT_TIMEOUT, "timeout (%lld ms)", opt.timeout_ms);
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
	fail(EXIT_HUNG_UP, "handler hung up");
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
			fail(EXIT_SETUP, "poll(socket): %s", strerror(errno));
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
					msg("warning: handler sent %zd unexpected bytes on the socket", n);
					warned = true;
				}
			}
		}
	}
	return NULL;
}

/* ---- memory --------------------------------------------------------------- */

static void hugepage_skip(const char *why)
{
	fflush(stdout);
	fprintf(stderr, "standin: hugepages unavailable: %s\n", why);
	fflush(stderr);
	_exit(EXIT_SKIP);
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

static int map_flags(void)
{
	int f = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
	if (opt.hugepages)
		f |= MAP_HUGETLB | MAP_HUGE_2MB;
	return f;
}

static void *map_region(void *hint, uint64_t size)
{
	int flags = map_flags() | (hint ? MAP_FIXED : 0);
	void *p = mmap(hint, size, PROT_READ | PROT_WRITE, flags, -1, 0);
	if (p == MAP_FAILED) {
		if (opt.hugepages)
			hugepage_skip(strerror(errno));
		syserr("mmap(guest region)");
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
		syserr("mmap(reserve far layout)");
	uintptr_t lo = (uintptr_t)res, hi = lo + span;
	uintptr_t cur = (lo + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
	uintptr_t keep_from = lo;
	for (int i = 0; i < opt.nregions; i++) {
		struct region *r = &opt.regions[i];
		if (i)
			cur = (cur + GIB4 + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
		if (cur > keep_from && munmap((void *)keep_from, cur - keep_from))
			syserr("munmap(far gap)");
		r->addr = map_region((void *)cur, r->size);
		if ((uintptr_t)r->addr != cur)
			fail(EXIT_SETUP, "mmap(MAP_FIXED) returned %p, wanted 0x%lx", (void *)r->addr,
			     (unsigned long)cur);
		cur += r->size;
		keep_from = cur;
	}
	if (hi > keep_from && munmap((void *)keep_from, hi - keep_from))
		syserr("munmap(far tail)");
}

/* ---- userfaultfd ----------------------------------------------------------- */

static int create_uffd(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0 && (errno == ENOSYS || errno == EPERM)) {
		int e = errno;
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0) {
			msg("userfaultfd(): %s; /dev/userfaultfd: %s", strerror(e), strerror(errno));
			fail(EXIT_SETUP, "cannot create a userfaultfd");
		}
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		int e2 = errno;
		close(dev);
		errno = e2;
		if (fd < 0)
			syserr("ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)");
	} else if (fd < 0) {
		syserr("userfaultfd()");
	}
	uint64_t want = UFFD_FEATURE_EVENT_REMOVE;
	if (opt.hugepages)
		want |= UFFD_FEATURE_MISSING_HUGETLBFS;
	struct uffdio_api api = { .api = UFFD_API, .features = want };
	if (ioctl(fd, UFFDIO_API, &api))
		syserr("ioctl(UFFDIO_API)");
	if ((api.features & want) != want)
		fail(EXIT_SETUP, "UFFDIO_API: kernel lacks features 0x%llx",
		     (unsigned long long)(want & ~api.features));
	for (int i = 0; i < opt.nregions; i++) {
		struct region *r = &opt.regions[i];
		struct uffdio_register reg = {
			.range = { .start = (uintptr_t)r->addr, .len = r->size },
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		if (ioctl(fd, UFFDIO_REGISTER, &reg))
			syserr("ioctl(UFFDIO_REGISTER)");
		if (!(reg.ioctls & (1ULL << _UFFDIO_COPY)))
			fail(EXIT_SETUP, "UFFDIO_REGISTER: UFFDIO_COPY not available on region %d", i);
	}
	return fd;
}

/* ---- handshake --------------------------------------------------------------- */

static char *build_json(size_t *len_out)
{
	size_t cap = 64 + (size_t)opt.nregions * 320, n = 0;
	char *b = malloc(cap);
	if (!b)
		syserr("malloc");
	n += (size_t)snprintf(b + n, cap - n, "[");
	for (int i = 0; i < opt.nregions; i++) {
		const struct region *r = &opt.regions[i];
		n += (size_t)snprintf(b + n, cap - n,
				      "%s{\"base_host_virt_addr\":%" PRIu64 ",\"size\":%" PRIu64
				      ",\"offset\":%" PRIu64,
				      i ? "," : "", (uint64_t)(uintptr_t)r->addr,
				      /* --announce-half: a lying VMM that registered more than it tells. */
				      opt.announce_half ? r->size / 2 : r->size, r->offset);
		if (opt.format == FMT_V7)
			n += (size_t)snprintf(b + n, cap - n, ",\"page_size_kib\":%zu", page_size);
		if (opt.format == FMT_V12 || opt.format == FMT_FUTURE)
			n += (size_t)snprintf(b + n, cap - n, ",\"page_size\":%zu,\"page_size_kib\":%zu",
					      page_size, page_size);
		if (opt.format == FMT_FUTURE)
			n += (size_t)snprintf(b + n, cap - n,
					      ",\"gpa_start\":%" PRIu64 ",\"is_guest_memfd\":false", r->gpa);
		n += (size_t)snprintf(b + n, cap - n, "}");
	}
	n += (size_t)snprintf(b + n, cap - n, "]");
	if (n >= cap)
		fail(EXIT_SETUP, "internal: JSON buffer too small");
	*len_out = n;
	return b;
}

static uint64_t rng_state;

static uint64_t rng_next(void)
{
	uint64_t x = rng_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	rng_state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static void rng_seed(uint64_t seed)
{
	rng_state = seed ? seed : 0x9e3779b97f4a7c15ULL;
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
		struct iovec iov = { .iov_base = (void *)(buf + sent), .iov_len = chunk };
		union {
			char b[CMSG_SPACE(sizeof(int) * 4)];
			struct cmsghdr align;
		} u;
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
		if (fds_pending) {
			memset(&u, 0, sizeof u);
			mh.msg_control = u.b;
			mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
			struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
			c->cmsg_level = SOL_SOCKET;
			c->cmsg_type = SCM_RIGHTS;
			c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
			memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
		}
		ssize_t n = sendmsg(sock_fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EPIPE || errno == ECONNRESET)
				return -1;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				syserr("sendmsg");
			int timeout = -1;
			if (deadline) {
				uint64_t t = now_ns();
				if (t >= deadline)
					return -2;
				timeout = (int)((deadline - t + 999999) / 1000000);
			}
			struct pollfd pfd = { .fd = sock_fd, .events = POLLOUT };
			int r = poll(&pfd, 1, timeout);
			if (r < 0 && errno != EINTR)
				syserr("poll(socket, POLLOUT)");
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

/* Waits for the handler to close the socket. Exits 3 or 4. */
static void __attribute__((noreturn)) wait_reject(uint64_t start, uint64_t deadline)
{
	bool warned = false;
	for (;;) {
		uint64_t t = now_ns();
		if (t >= deadline)
			break;
		struct pollfd pfd = { .fd = sock_fd, .events = POLLIN | POLLRDHUP };
		int r = poll(&pfd, 1, (int)((deadline - t + 999999) / 1000000));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			syserr("poll(socket)");
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
				msg("warning: handler sent %zd unexpected bytes on the socket", n);
				warned = true;
			}
		}
		if (closed)
			fail(EXIT_REJECTED, "handler closed the connection after %" PRIu64 " ms",
			     (now_ns() - start) / 1000000);
	}
	fail(EXIT_NOT_REJECTED, "handler did not close the connection within %lld ms",
	     opt.reject_timeout_ms);
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
	if (opt.ncpus) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(opt.cpus[w->idx % opt.ncpus], &set);
		int e = pthread_setaffinity_np(pthread_self(), sizeof set, &set);
		if (e)
			fail(EXIT_SETUP, "pthread_setaffinity_np(cpu %d): %s", opt.cpus[w->idx % opt.ncpus],
			     strerror(e));
	}
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

static void build_order(void)
{
	if (opt.order == ORD_FILE) {
		int fd = open(opt.order_file, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			fail(EXIT_SETUP, "open %s: %s", opt.order_file, strerror(errno));
		struct stat st;
		if (fstat(fd, &st))
			syserr("fstat(order file)");
		if (st.st_size % 4)
			fail(EXIT_SETUP, "order file %s: size %lld is not a multiple of 4", opt.order_file,
			     (long long)st.st_size);
		order_len = (uint64_t)st.st_size / 4;
		order_arr = malloc(order_len * 4 + 4);
		if (!order_arr)
			syserr("malloc(order)");
		uint8_t *raw = (uint8_t *)order_arr;
		size_t got = 0;
		while (got < order_len * 4) {
			ssize_t n = read(fd, raw + got, order_len * 4 - got);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				syserr("read(order file)");
			if (n == 0)
				fail(EXIT_SETUP, "order file %s: short read", opt.order_file);
			got += (size_t)n;
		}
		close(fd);
		for (uint64_t i = 0; i < order_len; i++) {
			const uint8_t *q = raw + i * 4;
			uint32_t v = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 |
				     (uint32_t)q[3] << 24;
			if (v >= total_pages)
				fail(EXIT_SETUP, "order file %s: entry %" PRIu64 " = %u out of range (%" PRIu64
				     " pages)", opt.order_file, i, v, total_pages);
			order_arr[i] = v;
		}
	} else {
		order_len = total_pages;
		order_arr = malloc(order_len * sizeof(uint32_t) + 4);
		if (!order_arr)
			syserr("malloc(order)");
		for (uint64_t i = 0; i < order_len; i++)
			order_arr[i] = (uint32_t)(opt.order == ORD_REV ? order_len - 1 - i : i);
		if (opt.order == ORD_RANDOM && order_len > 1) {
			rng_seed(opt.seed);
			for (uint64_t i = order_len - 1; i > 0; i--) {
				uint64_t j = rng_next() % (i + 1);
				uint32_t t = order_arr[i];
				order_arr[i] = order_arr[j];
				order_arr[j] = t;
			}
		}
	}
	double x = opt.fraction * (double)order_len;
	uint64_t c = (uint64_t)x;
	if ((double)c + 1e-9 < x)
		c++;
	if (c == 0 && order_len > 0)
		c = 1;
	if (c > order_len)
		c = order_len;
	touch_count = c;
}

static void do_balloon(const struct range *arr, int n)
{
	for (int i = 0; i < n; i++) {
		if (madvise(opt.regions[0].addr + arr[i].off, arr[i].len, MADV_DONTNEED))
			fail(EXIT_SETUP, "madvise(MADV_DONTNEED, +0x%" PRIx64 ", 0x%" PRIx64 "): %s",
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

/* ---- main ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	signal(SIGPIPE, SIG_IGN);

	if (opt.ncpus) {
		cpu_set_t set;
		CPU_ZERO(&set);
		for (int i = 0; i < opt.ncpus; i++)
			CPU_SET(opt.cpus[i], &set);
		if (sched_setaffinity(0, sizeof set, &set))
			syserr("sched_setaffinity(--cpu)");
	}

	pthread_t watchdog;
	int e = pthread_create(&watchdog, NULL, watchdog_main, NULL);
	if (e)
		fail(EXIT_SETUP, "pthread_create(watchdog): %s", strerror(e));

	page_size = opt.hugepages ? HUGE_2M : 4096;
	bool touching = !opt.expect_reject;
	bool need_expect = touching && opt.verify != VER_NONE;

	if (opt.expect_path) {
		int fd = open(opt.expect_path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			fail(EXIT_SETUP, "open %s: %s", opt.expect_path, strerror(errno));
		struct stat st;
		if (fstat(fd, &st))
			syserr("fstat(expect)");
		expect_size = (uint64_t)st.st_size;
		if (expect_size) {
			void *m = mmap(NULL, expect_size, PROT_READ, MAP_PRIVATE, fd, 0);
			if (m == MAP_FAILED)
				syserr("mmap(expect)");
			expect_map = m;
		}
		close(fd);
	} else if (need_expect) {
		usage_err("--expect FILE is required (or use --verify none / --expect-reject)");
	}

	/* Regions. */
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
	if (touching)
		build_order();

	map_regions();
	if (opt.hugepages)
		check_hugepage_pool();
	uffd = create_uffd();

	/* Body and fds. */
	uint8_t *body;
	size_t body_len;
	if (opt.body) {
		body = (uint8_t *)opt.body;
		body_len = strlen(opt.body);
	} else if (opt.garbage >= 0) {
		body_len = (size_t)opt.garbage;
		body = malloc(body_len + 1);
		if (!body)
			syserr("malloc(garbage)");
		rng_seed(opt.seed ^ 0x5bd1e995ULL);
		for (size_t i = 0; i < body_len; i++)
			body[i] = (uint8_t)(rng_next() >> 56);
		if (body_len)
			body[0] = 0xff;
	} else {
		body = (uint8_t *)build_json(&body_len);
	}
	int fds[8], nfds = 0;
	int devnull = -1;
	if (opt.fds == FDS_NOTUFFD || opt.fds == FDS_TWO || opt.fds == FDS_MANY) {
		devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (devnull < 0)
			syserr("open /dev/null");
	}
	switch (opt.fds) {
	case FDS_UFFD: fds[nfds++] = uffd; break;
	case FDS_NONE: break;
	case FDS_NOTUFFD: fds[nfds++] = devnull; break;
	case FDS_TWO: fds[nfds++] = uffd; fds[nfds++] = devnull; break;
	case FDS_MANY:
		fds[nfds++] = uffd;
		for (int i = 0; i < 4; i++)
			fds[nfds++] = devnull;
		break;
	}
	if (opt.format == FMT_FUTURE && opt.fds != FDS_NONE) {
		int mfd = (int)syscall(SYS_memfd_create, "guest_mem", MFD_CLOEXEC);
		if (mfd < 0)
			syserr("memfd_create");
		uint64_t total = 0;
		for (int i = 0; i < opt.nregions; i++)
			total += opt.regions[i].size;
		if (ftruncate(mfd, (off_t)total))
			syserr("ftruncate(memfd)");
		fds[nfds++] = mfd;
	}

	/* Connect once, no retry. */
	sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock_fd < 0)
		syserr("socket(AF_UNIX)");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(opt.socket_path) >= sizeof sa.sun_path)
		usage_err("socket path too long (max %zu): %s", sizeof sa.sun_path - 1, opt.socket_path);
	strcpy(sa.sun_path, opt.socket_path);
	if (connect(sock_fd, (struct sockaddr *)&sa, sizeof sa))
		fail(EXIT_SETUP, "connect %s: %s", opt.socket_path, strerror(errno));

	uint64_t t_send = now_ns();
	uint64_t reject_deadline = t_send + (uint64_t)opt.reject_timeout_ms * 1000000ULL;
	if (!opt.silent) {
		if (body_len == 0 && nfds)
			msg("note: empty body: a zero-length sendmsg on SOCK_STREAM carries no fds");
		int r = send_body(body, body_len, fds, nfds, opt.expect_reject ? reject_deadline : 0);
		if (r == -1) {
			if (opt.expect_reject)
				fail(EXIT_REJECTED, "handler closed the connection while we were sending (after %" PRIu64
				     " ms)", (now_ns() - t_send) / 1000000);
			fail(EXIT_HUNG_UP, "handler hung up (while we were sending)");
		}
		if (r == -2)
			fail(EXIT_NOT_REJECTED, "handler neither read the body nor closed within %lld ms",
			     opt.reject_timeout_ms);
	}
	if (opt.exit_after == 0)
		kill(getpid(), SIGKILL);
	if (opt.expect_reject)
		wait_reject(t_send, reject_deadline);

	/* Guest phase. */
	pthread_t watcher;
	e = pthread_create(&watcher, NULL, watcher_main, NULL);
	if (e)
		fail(EXIT_SETUP, "pthread_create(watcher): %s", strerror(e));

	do_balloon(opt.balloon, opt.nballoon);

	int nt = opt.threads;
	struct worker *ws = calloc((size_t)nt, sizeof *ws);
	if (!ws)
		syserr("calloc(workers)");
	uint64_t per = touch_count / (uint64_t)nt + 1;
	for (int t = 0; t < nt; t++) {
		ws[t].idx = t;
		ws[t].lat = malloc(per * sizeof(uint64_t));
		if (!ws[t].lat)
			syserr("malloc(latencies)");
		memset(ws[t].lat, 0, per * sizeof(uint64_t)); /* fault it in before timing */
	}
	e = pthread_barrier_init(&start_barrier, NULL, (unsigned)nt + 1);
	if (e)
		fail(EXIT_SETUP, "pthread_barrier_init: %s", strerror(e));
	for (int t = 0; t < nt; t++) {
		e = pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]);
		if (e)
			fail(EXIT_SETUP, "pthread_create(worker): %s", strerror(e));
	}
	pthread_barrier_wait(&start_barrier);
	uint64_t t0 = now_ns();
	for (int t = 0; t < nt; t++)
		pthread_join(ws[t].tid, NULL);
	uint64_t t1 = now_ns();

	do_balloon(opt.balloon_after, opt.nballoon_after);
	if (opt.pause_ms > 0)
		sleep_ms(opt.pause_ms);

	/* Verification (untimed). */
	uint64_t verified = 0, mismatches = 0;
	long long first_mismatch = -1;
	if (opt.verify != VER_NONE && total_pages) {
		uint8_t *bits = NULL;
		if (opt.verify == VER_TOUCHED) {
			bits = calloc(total_pages / 8 + 1, 1);
			if (!bits)
				syserr("calloc(bitmap)");
			for (uint64_t i = 0; i < touch_count; i++)
				bits[order_arr[i] >> 3] |= (uint8_t)(1u << (order_arr[i] & 7));
		}
		uint8_t *zero = calloc(1, page_size);
		if (!zero)
			syserr("calloc(zero page)");
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
					msg("mismatch: page %" PRIu64 " (region %d page %" PRIu64
					    ", file offset 0x%" PRIx64 "%s): first differing byte +%zu: want 0x%02x got 0x%02x",
					    g, ri, off / page_size, r->offset + off,
					    want == zero ? ", ballooned: want zeros" : "", b, want[b], got[b]);
				}
				mismatches++;
			}
		}
		free(bits);
		free(zero);
	}
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
		syserr("malloc(latencies)");
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
		msg("%" PRIu64 " of %" PRIu64 " verified pages mismatch", mismatches, verified);

	printf("{\"pages\":%" PRIu64 ",\"verified\":%" PRIu64 ",\"mismatches\":%" PRIu64
	       ",\"first_mismatch\":%lld,\"touch_ns\":%" PRIu64 ",\"lat_p50_ns\":%" PRIu64
	       ",\"lat_p99_ns\":%" PRIu64 ",\"lat_max_ns\":%" PRIu64 ",\"threads\":%d}\n",
	       touch_count, verified, mismatches, first_mismatch, t1 - t0, p50, p99, pmax, nt);
	fflush(stdout);

	if (opt.hold_ms > 0)
		sleep_ms(opt.hold_ms);
	/* The socket and our uffd copy stay open until the process exits. */
	_exit(mismatches ? EXIT_MISMATCH : EXIT_OK);
}
