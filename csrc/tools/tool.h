/*
 * tool.h — helpers shared by the C programs around the core: the VMM stand-in
 * (csrc/tools/vmm-standin.c), the test tools (test/hostile-peer.c, test/pid-reuse.c) and the
 * benchmark's baselines (bench/plain-handler.c, bench/kernel-baselines.c). Link csrc/tools/tool.c.
 *
 * Messages go to stderr as "<tool_name>: <text>"; a program sets tool_name first.
 */
#ifndef SNAPLOAD_TOOL_H
#define SNAPLOAD_TOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Exit code of a usage or setup error, in every tool. */
#define TOOL_EXIT_SETUP 2

extern const char *tool_name;

/* "<tool_name>: <text>" on stderr. Safe from any thread (one write). */
void tool_note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Flushes stdout, prints the note, and exits the whole process with code. */
void tool_exit(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
/* "<what>: <strerror(errno)>", exit TOOL_EXIT_SETUP. */
void tool_die(const char *what) __attribute__((noreturn));
/* "<what>: <detail>", exit TOOL_EXIT_SETUP. */
void tool_fail(const char *what, const char *detail) __attribute__((noreturn));

uint64_t tool_now_ns(void);
void tool_sleep_ms(long long ms);

/* A byte count or number: decimal or 0x hex, optional k/m/g/t binary suffix with an
 * optional "B"/"iB". No sign, no blanks. */
bool tool_parse_size(const char *s, uint64_t *out);
/* A guest region "SIZE[@OFFSET]" (SIZE > 0); *has_offset says whether @OFFSET was there. */
bool tool_parse_region(const char *s, uint64_t *size, uint64_t *offset, bool *has_offset);
/* 0 < F <= 1. */
bool tool_parse_fraction(const char *s, double *out);
/* "0", "0,2", "0-3": up to max CPU numbers into cpus; returns the count, or -1. */
int tool_parse_cpus(const char *s, int *cpus, int max);
/* Confines the calling thread to those CPUs (n > 0), or exits. */
void tool_pin_thread(const int *cpus, int n);
/* Confines the whole process (sched_setaffinity(0)) to those CPUs, or exits. */
void tool_pin_process(const int *cpus, int n);

/* xorshift64*: x ^= x>>12; x ^= x<<25; x ^= x>>27; out = x * 0x2545F4914F6CDD1D.
 * Seed 0 is replaced by 0x9e3779b97f4a7c15. */
struct tool_rng {
	uint64_t state;
};
void tool_rng_seed(struct tool_rng *r, uint64_t seed);
uint64_t tool_rng_next(struct tool_rng *r);

/*
 * A first-touch order over page indexes 0..npages-1, from a spec:
 *   seq | reverse | random (Fisher-Yates: for i = n-1 down to 1, j = next() % (i+1),
 *   swap) | file:PATH (little-endian u32 page indexes, each < npages).
 * Returns the malloc'd order and its length; exits on a bad file or spec.
 */
bool tool_order_spec_ok(const char *spec);
uint32_t *tool_page_order(const char *spec, uint64_t npages, uint64_t seed, uint64_t *len);
/* How many entries of an order of len entries --fraction F touches: ceil(F * len), at least 1. */
uint64_t tool_fraction_count(double fraction, uint64_t len);

/* A connected AF_UNIX SOCK_STREAM socket (close-on-exec), or -1 with errno set. */
int tool_unix_connect(const char *path);
/* One sendmsg of buf with fds as SCM_RIGHTS (none when nfds == 0). */
ssize_t tool_sendmsg_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags);

/* A userfaultfd (O_CLOEXEC | O_NONBLOCK; through /dev/userfaultfd where the syscall is
 * refused) after UFFDIO_API asking for features; exits unless all of them are granted. */
int tool_userfaultfd(uint64_t features);
/* UFFDIO_REGISTER MODE_MISSING of [addr, addr+len), or exits; UFFDIO_COPY must be offered. */
void tool_uffd_register(int uffd, void *addr, uint64_t len);

/* The VMM's handshake body: a JSON array of region objects, as Firecracker versions send it. */
enum tool_wire_format {
	TOOL_WIRE_V1,     /* base_host_virt_addr, size, offset */
	TOOL_WIRE_V7,     /* + page_size_kib (in bytes, despite its name) */
	TOOL_WIRE_V12,    /* + page_size and page_size_kib */
	TOOL_WIRE_FUTURE, /* + gpa_start and is_guest_memfd, fields the handler must ignore */
};
struct tool_wire_region {
	uint64_t addr, size, offset, gpa;
};
/* The body, malloc'd and NUL-terminated; its length in *len. */
char *tool_handshake_json(const struct tool_wire_region *r, int n, size_t page_size, enum tool_wire_format fmt,
			  size_t *len);

#endif
