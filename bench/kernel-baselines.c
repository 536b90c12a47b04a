/*
 * kernel-baselines: the kernel's own paths on the snapshot-restore workload,
 * for comparison with userfaultfd handlers.
 *
 * usage: kernel-baselines --mem FILE --mode map-read|map-write|pread|memcpy
 *                         [--order seq|random|file:PATH] [--seed N] [--fraction F] [--cpu N]
 *
 *   map-read   mmap FILE PROT_READ|PROT_WRITE, MAP_PRIVATE; read one byte per page
 *              (Firecracker's File memory backend)
 *   map-write  same mapping; write-touch each page (copy-on-write) with an atomic add of 0
 *   pread      fresh anonymous memory of the file's size; time = pread of the whole
 *              file (1 MiB chunks) + read-touch of the pages in order
 *   memcpy     one memcpy between two already-touched buffers (reference)
 *
 * Order (4 KiB pages): seq; random = Fisher-Yates driven by xorshift64*
 * (x ^= x>>12; x ^= x<<25; x ^= x>>27; r = x*0x2545F4914F6CDD1D; for i = n-1..1:
 * j = r % (i+1), swap a[i], a[j]; seed 0 is replaced by 0x9E3779B97F4A7C15);
 * file:PATH = little-endian u32 page indexes. --fraction F touches the first
 * ceil(F*n) entries of the order (memcpy copies that many pages from the start).
 *
 * The file is read once (untimed) first so every mode sees a warm page cache.
 * Output, one line on stdout:
 *   {"mode":"map-read","pages":<touched>,"bytes":<pages*4096, capped at file size>,"ns":<elapsed>}
 * 16 sampled touched pages are compared with pread of the file: exit 1 on mismatch.
 * Errors: "kernel-baselines: <what>: <strerror>", exit 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PROG "kernel-baselines"
#define PG 4096ULL
#define CHUNK (1ULL << 20)

static volatile uint64_t sink;

static void die(const char *what)
{
	fprintf(stderr, PROG ": %s: %s\n", what, strerror(errno));
	exit(2);
}

static void fail(const char *what, const char *detail)
{
	fprintf(stderr, PROG ": %s: %s\n", what, detail);
	exit(2);
}

static void usage(void)
{
	fprintf(stderr, "usage: " PROG " --mem FILE --mode map-read|map-write|pread|memcpy"
			" [--order seq|random|file:PATH] [--seed N] [--fraction F] [--cpu N]\n");
	exit(2);
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-')
		fail(opt, "invalid number");
	return v;
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
		die("clock_gettime");
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void *map_anon(uint64_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap anonymous");
	return p;
}

/* pread exactly len bytes at off into buf */
static void pread_all(int fd, void *buf, uint64_t len, uint64_t off)
{
	uint8_t *b = buf;
	while (len > 0) {
		ssize_t r = pread(fd, b, len, (off_t)off);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("pread");
		}
		if (r == 0)
			fail("pread", "unexpected end of file");
		b += r;
		off += (uint64_t)r;
		len -= (uint64_t)r;
	}
}

/* pread the whole file in 1 MiB chunks into dst (or into a 1 MiB scratch if dst is NULL) */
static void read_file(int fd, uint8_t *dst, uint64_t size, uint8_t *scratch)
{
	for (uint64_t off = 0; off < size; off += CHUNK) {
		uint64_t l = size - off < CHUNK ? size - off : CHUNK;
		pread_all(fd, dst ? dst + off : scratch, l, off);
	}
}

static uint64_t xs_state;
static uint64_t xorshift64s(void)
{
	uint64_t x = xs_state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	xs_state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static uint32_t *load_order_file(const char *path, uint64_t npages, uint64_t *count)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open order file");
	struct stat st;
	if (fstat(fd, &st) < 0)
		die("fstat order file");
	uint64_t n = (uint64_t)st.st_size / 4;
	uint32_t *o = malloc(n ? n * 4 : 4);
	if (!o)
		die("malloc");
	uint8_t *raw = (uint8_t *)o;
	if (n)
		pread_all(fd, raw, n * 4, 0);
	if (close(fd) < 0)
		die("close order file");
	for (uint64_t i = 0; i < n; i++) {
		const uint8_t *b = raw + 4 * i;
		uint32_t v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
		if (v >= npages) {
			char msg[96];
			snprintf(msg, sizeof msg, "page index %u at entry %llu is beyond the file (%llu pages)", v,
				 (unsigned long long)i, (unsigned long long)npages);
			fail("order file", msg);
		}
		o[i] = v;
	}
	*count = n;
	return o;
}

/* compare up to 16 of the touched pages (spread over the order) in buf with the file */
static void verify(int fd, const uint8_t *buf, const uint32_t *ord, uint64_t m, uint64_t size)
{
	uint8_t want[PG];
	uint64_t samples = m < 16 ? m : 16;
	for (uint64_t k = 0; k < samples; k++) {
		uint64_t pg = ord[k * m / samples];
		uint64_t off = pg * PG;
		uint64_t l = size - off < PG ? size - off : PG;
		pread_all(fd, want, l, off);
		if (memcmp(want, buf + off, l) != 0) {
			fprintf(stderr, PROG ": verify: page %llu differs from the file\n", (unsigned long long)pg);
			exit(1);
		}
	}
}

int main(int argc, char **argv)
{
	const char *mem_path = NULL, *mode = NULL, *order = "seq";
	uint64_t seed = 1;
	double fraction = 1.0;
	long cpu = -1;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		if (!strcmp(a, "--mem"))
			mem_path = v;
		else if (!strcmp(a, "--mode"))
			mode = v;
		else if (!strcmp(a, "--order"))
			order = v;
		else if (!strcmp(a, "--seed"))
			seed = parse_u64(a, v);
		else if (!strcmp(a, "--fraction")) {
			char *end;
			errno = 0;
			fraction = strtod(v, &end);
			if (errno || end == v || *end || !(fraction > 0.0 && fraction <= 1.0))
				fail("--fraction", "expected a number in (0, 1]");
		} else if (!strcmp(a, "--cpu"))
			cpu = (long)parse_u64(a, v);
		else
			usage();
	}
	if (!mem_path || !mode)
		usage();
	int m_read = !strcmp(mode, "map-read"), m_write = !strcmp(mode, "map-write");
	int m_pread = !strcmp(mode, "pread"), m_memcpy = !strcmp(mode, "memcpy");
	if (!(m_read || m_write || m_pread || m_memcpy))
		fail("--mode", "expected map-read, map-write, pread or memcpy");

	if (cpu >= 0) {
		if (cpu >= CPU_SETSIZE)
			fail("--cpu", "out of range");
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		if (sched_setaffinity(0, sizeof set, &set) < 0)
			die("sched_setaffinity");
	}

	int fd = open(mem_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open --mem");
	struct stat st;
	if (fstat(fd, &st) < 0)
		die("fstat --mem");
	if (st.st_size <= 0)
		fail("--mem", "empty file");
	uint64_t size = (uint64_t)st.st_size;
	uint64_t npages = (size + PG - 1) / PG;
	uint64_t alloc = npages * PG;
	if (npages > UINT32_MAX)
		fail("--mem", "file too large for u32 page indexes");

	/* page order */
	uint32_t *ord;
	uint64_t count;
	if (!strncmp(order, "file:", 5)) {
		ord = load_order_file(order + 5, npages, &count);
	} else {
		count = npages;
		ord = malloc(count * sizeof *ord);
		if (!ord)
			die("malloc");
		for (uint64_t i = 0; i < count; i++)
			ord[i] = (uint32_t)i;
		if (!strcmp(order, "random")) {
			xs_state = seed ? seed : 0x9E3779B97F4A7C15ULL;
			for (uint64_t i = count - 1; i > 0; i--) {
				uint64_t j = xorshift64s() % (i + 1);
				uint32_t t = ord[i];
				ord[i] = ord[j];
				ord[j] = t;
			}
		} else if (strcmp(order, "seq") != 0) {
			fail("--order", "expected seq, random or file:PATH");
		}
	}
	double want = fraction * (double)count;
	uint64_t m = (uint64_t)want;
	if ((double)m < want)
		m++;
	if (m > count)
		m = count;

	/* warm the page cache (untimed) */
	uint8_t *scratch = malloc(CHUNK);
	if (!scratch)
		die("malloc");
	read_file(fd, NULL, size, scratch);
	free(scratch);

	uint64_t bytes = m * PG < size ? m * PG : size;
	uint64_t t0, t1, acc = 0;
	const uint8_t *check = NULL;

	if (m_read || m_write) {
		uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED)
			die("mmap --mem");
		__asm__ volatile("" ::: "memory");
		t0 = now_ns();
		if (m_read) {
			for (uint64_t k = 0; k < m; k++)
				acc += ((volatile uint8_t *)p)[(uint64_t)ord[k] * PG];
		} else {
			for (uint64_t k = 0; k < m; k++)
				__atomic_fetch_add((uint64_t *)(p + (uint64_t)ord[k] * PG), 0, __ATOMIC_RELAXED);
		}
		t1 = now_ns();
		__asm__ volatile("" ::: "memory");
		check = p;
	} else if (m_pread) {
		uint8_t *p = map_anon(alloc);
		__asm__ volatile("" ::: "memory");
		t0 = now_ns();
		read_file(fd, p, size, NULL);
		for (uint64_t k = 0; k < m; k++)
			acc += ((volatile uint8_t *)p)[(uint64_t)ord[k] * PG];
		t1 = now_ns();
		__asm__ volatile("" ::: "memory");
		check = p;
	} else {
		if (m > npages)
			m = npages;
		bytes = m * PG < size ? m * PG : size;
		uint8_t *src = map_anon(alloc), *dst = map_anon(alloc);
		read_file(fd, src, size, NULL);
		memset(dst, 0, alloc);
		__asm__ volatile("" ::: "memory");
		t0 = now_ns();
		memcpy(dst, src, bytes);
		__asm__ volatile("" ::: "memory");
		t1 = now_ns();
		check = dst;
		/* memcpy copies the first m pages: verify those, whatever the order */
		for (uint64_t i = 0; i < m; i++)
			ord[i] = (uint32_t)i;
	}
	sink = acc;

	verify(fd, check, ord, m, size);
	if (close(fd) < 0)
		die("close --mem");

	if (printf("{\"mode\":\"%s\",\"pages\":%llu,\"bytes\":%llu,\"ns\":%llu}\n", mode, (unsigned long long)m,
		   (unsigned long long)bytes, (unsigned long long)(t1 - t0)) < 0 ||
	    fflush(stdout) == EOF)
		die("write stdout");
	return 0;
}
