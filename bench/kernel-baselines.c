/*
 * kernel-baselines: the kernel's own paths on the snapshot-restore workload,
 * for comparison with userfaultfd handlers.
 *
 * usage: kernel-baselines --mem FILE --mode map-read|map-write|pread|memcpy
 *                         [--order seq|reverse|random|file:PATH] [--seed N] [--fraction F] [--cpu N]
 *
 *   map-read   mmap FILE PROT_READ|PROT_WRITE, MAP_PRIVATE; read one byte per page
 *              (Firecracker's File memory backend)
 *   map-write  same mapping; write-touch each page (copy-on-write) with an atomic add of 0
 *   pread      fresh anonymous memory of the file's size; time = pread of the whole
 *              file (1 MiB chunks) + read-touch of the pages in order
 *   memcpy     one memcpy between two already-touched buffers (reference)
 *
 * Order (4 KiB pages) and --fraction as the VMM stand-in's (csrc/tools/tool.h:
 * tool_page_order): --fraction F touches the first ceil(F*n) entries of the order
 * (memcpy copies that many pages from the start).
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

#include "../csrc/tools/tool.h"

#define PROG "kernel-baselines"
#define PG 4096ULL
#define CHUNK (1ULL << 20)

static volatile uint64_t sink;

static void usage(void)
{
	fprintf(stderr, "usage: " PROG " --mem FILE --mode map-read|map-write|pread|memcpy"
			" [--order seq|reverse|random|file:PATH] [--seed N] [--fraction F] [--cpu N]\n");
	exit(2);
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	uint64_t v;
	if (!tool_parse_size(s, &v))
		tool_fail(opt, "invalid number");
	return v;
}

static void *map_anon(uint64_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		tool_die("mmap anonymous");
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
			tool_die("pread");
		}
		if (r == 0)
			tool_fail("pread", "unexpected end of file");
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
	tool_name = PROG;
	const char *mem_path = NULL, *mode = NULL, *order = "seq";
	uint64_t seed = 1;
	double fraction = 1.0;
	int cpu = -1;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		if (!strcmp(a, "--mem"))
			mem_path = v;
		else if (!strcmp(a, "--mode"))
			mode = v;
		else if (!strcmp(a, "--order")) {
			if (!tool_order_spec_ok(v))
				tool_fail("--order", "expected seq, reverse, random or file:PATH");
			order = v;
		} else if (!strcmp(a, "--seed"))
			seed = parse_u64(a, v);
		else if (!strcmp(a, "--fraction")) {
			if (!tool_parse_fraction(v, &fraction))
				tool_fail("--fraction", "expected a number in (0, 1]");
		} else if (!strcmp(a, "--cpu")) {
			uint64_t c = parse_u64(a, v);
			if (c >= CPU_SETSIZE)
				tool_fail("--cpu", "out of range");
			cpu = (int)c;
		} else
			usage();
	}
	if (!mem_path || !mode)
		usage();
	int m_read = !strcmp(mode, "map-read"), m_write = !strcmp(mode, "map-write");
	int m_pread = !strcmp(mode, "pread"), m_memcpy = !strcmp(mode, "memcpy");
	if (!(m_read || m_write || m_pread || m_memcpy))
		tool_fail("--mode", "expected map-read, map-write, pread or memcpy");

	if (cpu >= 0)
		tool_pin_process(&cpu, 1);

	int fd = open(mem_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		tool_die("open --mem");
	struct stat st;
	if (fstat(fd, &st) < 0)
		tool_die("fstat --mem");
	if (st.st_size <= 0)
		tool_fail("--mem", "empty file");
	uint64_t size = (uint64_t)st.st_size;
	uint64_t npages = (size + PG - 1) / PG;
	uint64_t alloc = npages * PG;
	if (npages > UINT32_MAX)
		tool_fail("--mem", "file too large for u32 page indexes");

	/* page order */
	uint64_t count;
	uint32_t *ord = tool_page_order(order, npages, seed, &count);
	uint64_t m = tool_fraction_count(fraction, count);

	/* warm the page cache (untimed) */
	uint8_t *scratch = malloc(CHUNK);
	if (!scratch)
		tool_die("malloc");
	read_file(fd, NULL, size, scratch);
	free(scratch);

	uint64_t bytes = m * PG < size ? m * PG : size;
	uint64_t t0, t1, acc = 0;
	const uint8_t *check = NULL;

	if (m_read || m_write) {
		uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED)
			tool_die("mmap --mem");
		__asm__ volatile("" ::: "memory");
		t0 = tool_now_ns();
		if (m_read) {
			for (uint64_t k = 0; k < m; k++)
				acc += ((volatile uint8_t *)p)[(uint64_t)ord[k] * PG];
		} else {
			for (uint64_t k = 0; k < m; k++)
				__atomic_fetch_add((uint64_t *)(p + (uint64_t)ord[k] * PG), 0, __ATOMIC_RELAXED);
		}
		t1 = tool_now_ns();
		__asm__ volatile("" ::: "memory");
		check = p;
	} else if (m_pread) {
		uint8_t *p = map_anon(alloc);
		__asm__ volatile("" ::: "memory");
		t0 = tool_now_ns();
		read_file(fd, p, size, NULL);
		for (uint64_t k = 0; k < m; k++)
			acc += ((volatile uint8_t *)p)[(uint64_t)ord[k] * PG];
		t1 = tool_now_ns();
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
		t0 = tool_now_ns();
		memcpy(dst, src, bytes);
		__asm__ volatile("" ::: "memory");
		t1 = tool_now_ns();
		check = dst;
		/* memcpy copies the first m pages: verify those, whatever the order */
		for (uint64_t i = 0; i < m; i++)
			ord[i] = (uint32_t)i;
	}
	sink = acc;

	verify(fd, check, ord, m, size);
	if (close(fd) < 0)
		tool_die("close --mem");

	if (printf("{\"mode\":\"%s\",\"pages\":%llu,\"bytes\":%llu,\"ns\":%llu}\n", mode, (unsigned long long)m,
		   (unsigned long long)bytes, (unsigned long long)(t1 - t0)) < 0 ||
	    fflush(stdout) == EOF)
		tool_die("write stdout");
	return 0;
}
