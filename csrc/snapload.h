/*
 * snapload.h — the whole ABI of snapload's C core.
 *
 * A thin layer over the Linux syscalls that TypeScript cannot reach through
 * Bun: userfaultfd, Unix sockets with SCM_RIGHTS, epoll, mmap, lseek holes.
 * Rules (after liburing / libmnl):
 *   - every function returns >= 0 on success and -errno on failure;
 *   - no hidden global state: the caller owns every fd and every buffer;
 *   - an fd in, an fd out: the caller runs the loop;
 *   - 64-bit results go through out-pointers so the FFI can return plain int.
 * Addresses in the VMM's address space are uint64_t (they are not ours to
 * dereference); addresses in our own address space are pointers.
 */
#ifndef SNAPLOAD_H
#define SNAPLOAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SL_ABI_VERSION 3

/* Size of one struct uffd_msg as the kernel writes it. */
#define SL_UFFD_MSG_SIZE 32

/* One ready fd from sl_epoll_wait, laid out the same on every arch
 * (struct epoll_event is packed on x86_64 only). */
struct sl_event {
	uint64_t data;   /* the token given to sl_epoll_ctl */
	uint32_t events; /* EPOLLIN | EPOLLOUT | EPOLLERR | EPOLLHUP | EPOLLRDHUP */
	uint32_t pad;
};
#define SL_EVENT_SIZE 16

/* SO_PEERCRED of a Unix socket peer. */
struct sl_peer {
	int32_t pid;
	uint32_t uid;
	uint32_t gid;
};

int sl_abi_version(void);

/* ---- memory the caller owns (shared with JS by pointer) ------------------ */

/* Anonymous, page-aligned, zero-filled memory. *out = address. */
int sl_buffer_alloc(uint64_t len, uint64_t *out);
int sl_buffer_free(void *addr, uint64_t len);

/* ---- files ---------------------------------------------------------------- */

/* open(path, O_RDONLY|O_CLOEXEC). Returns the fd. */
int sl_file_open_ro(const char *path);
/* Size in bytes (fstat st_size) into *out; *is_regular = 1 for S_ISREG. */
int sl_file_stat(int fd, uint64_t *out_size, int32_t *out_is_regular);
/* lseek(fd, off, SEEK_DATA or SEEK_HOLE) into *out; -ENXIO past the data. */
int sl_file_seek_data(int fd, uint64_t off, uint64_t *out);
int sl_file_seek_hole(int fd, uint64_t off, uint64_t *out);
/* pread into buf; returns bytes read (short only at EOF). len <= 1 GiB. */
int sl_file_pread(int fd, void *buf, uint32_t len, uint64_t off);
/* mmap(PROT_READ, MAP_PRIVATE [| MAP_POPULATE]) of [off, off+len). *out = address. */
int sl_file_map(int fd, uint64_t len, uint64_t off, int populate, uint64_t *out);
int sl_unmap(void *addr, uint64_t len);
/* madvise(addr, len, advice) on our own memory (e.g. MADV_WILLNEED = 3,
 * MADV_POPULATE_READ = 22). */
int sl_madvise(void *addr, uint64_t len, int advice);
/* mincore: one byte per page of [addr, addr+len) into vec, bit 0 = resident. */
int sl_mincore(void *addr, uint64_t len, uint8_t *vec);

int sl_close(int fd);
/* Sets O_NONBLOCK on fd. */
int sl_set_nonblock(int fd);

/* ---- userfaultfd ---------------------------------------------------------- */

/* userfaultfd(flags) (O_CLOEXEC|O_NONBLOCK, UFFD_USER_MODE_ONLY), falling back
 * to /dev/userfaultfd's USERFAULTFD_IOC_NEW. Returns the fd. */
int sl_uffd_open(int flags);
/* UFFDIO_API. *out_features = features the kernel grants, *out_ioctls = ioctls. */
int sl_uffd_api(int uffd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls);
/* sl_uffd_register modes (UFFDIO_REGISTER_MODE_*). */
#define SL_UFFD_MODE_MISSING 1
#define SL_UFFD_MODE_WP 2
#define SL_UFFD_MODE_MINOR 4
/* UFFDIO_REGISTER with a mode above. */
int sl_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls);
int sl_uffd_unregister(int uffd, uint64_t start, uint64_t len);
/* 1 if fd is a userfaultfd (anon_inode:[userfaultfd]), 0 if not. */
int sl_fd_is_uffd(int fd);
/* Reads up to max whole struct uffd_msg into buf (SL_UFFD_MSG_SIZE each).
 * Returns the number of messages; 0 when the queue is empty (EAGAIN). */
int sl_uffd_read(int uffd, void *buf, int max);
/* sl_uffd_copy / sl_uffd_zeropage mode: install without waking the waiters. */
#define SL_UFFD_DONTWAKE 1
/* UFFDIO_COPY of len bytes from our src to the VMM's dst. mode: 0 or SL_UFFD_DONTWAKE.
 * Returns 0 when all was copied, else -errno with the bytes that were
 * copied before the failure in *out_done (may be NULL). */
int sl_uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, int mode, uint64_t *out_done);
/* UFFDIO_ZEROPAGE; same contract as sl_uffd_copy. Not for hugetlbfs. */
int sl_uffd_zeropage(int uffd, uint64_t dst, uint64_t len, int mode, uint64_t *out_done);
/* UFFDIO_WAKE of [start, start+len). */
int sl_uffd_wake(int uffd, uint64_t start, uint64_t len);

/* ---- epoll ---------------------------------------------------------------- */

int sl_epoll_create(void);
/* sl_epoll_ctl ops (EPOLL_CTL_*). */
#define SL_EPOLL_ADD 1
#define SL_EPOLL_DEL 2
#define SL_EPOLL_MOD 3
/* Most events one sl_epoll_wait / sl_epoll_spin returns (more stay ready). */
#define SL_EPOLL_MAX_EVENTS 256
/* op: SL_EPOLL_ADD / DEL / MOD. data comes back in sl_event. */
int sl_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/* Waits up to timeout_ms (-1 = forever) and fills up to max (<= SL_EPOLL_MAX_EVENTS) sl_event.
 * Returns how many are ready; 0 on timeout or EINTR. */
int sl_epoll_wait(int epfd, struct sl_event *out, int max, int timeout_ms);
/* Polls (timeout 0) for up to spin_us microseconds, at most SL_SPIN_MAX_US, calling
 * sched_yield() between polls: a thread we just woke on our own CPU (a vCPU) runs during the
 * yield instead of waiting for our spin to end, and a thread on another CPU is caught without a
 * cross-CPU wake-up. Returns as sl_epoll_wait; 0 when nothing came within spin_us. */
#define SL_SPIN_MAX_US 10000
int sl_epoll_spin(int epfd, struct sl_event *out, int max, uint32_t spin_us);

/* ---- toucher: real faults against memory of our own (the JIT warm-up) ---- */

/* Starts a thread that, `rounds` times: reads one byte of every `page`-sized page of
 * [addr, addr+len) — each read of a missing page in a userfaultfd-registered range is a real
 * fault for the caller's loop to serve —, discards the range (MADV_DONTNEED), signals done_fd
 * (an eventfd) and, except after the last round, waits until go_fd (an eventfd) is signalled.
 * The caller owns both fds and must sl_toucher_join the handle. A thread blocked in a fault is
 * released when the caller closes the userfaultfd (the read then sees a zero page). */
int sl_toucher_start(void *addr, uint64_t len, uint32_t page, uint32_t rounds, int done_fd, int go_fd, uint64_t *out_handle);
/* Waits for the thread to end; returns the number of rounds it completed. */
int sl_toucher_join(uint64_t handle);

/* ---- eventfd (a wake-up the caller can poke from anywhere) ---------------- */

int sl_eventfd(void);
int sl_eventfd_signal(int fd);
int sl_eventfd_drain(int fd);

/* ---- Unix sockets --------------------------------------------------------- */

/* Identity of a file: what "is this still our socket file?" compares. */
struct sl_file_id {
	uint64_t dev;
	uint64_t ino;
};

/* Binds a SOCK_STREAM listener at path with file mode `mode` (e.g. 0600), and
 * its file's identity into *out_id (may be NULL). The socket is bound and
 * chmod-ed inside a fresh private (0700) directory beside path, then renamed
 * into place, so no path anyone else can swap is ever chmod-ed and the umask is
 * never touched. A socket file at path that nobody answers on (stale) is
 * replaced — removed only if it is still the inode that was checked; one a
 * listener answers on is refused (-EADDRINUSE); any other file too (-EEXIST).
 * Non-blocking, close-on-exec. Returns the fd. */
int sl_unix_listen(const char *path, uint32_t mode, int backlog, struct sl_file_id *out_id);
/* Unlinks path only if it is still the socket file `dev`/`ino` (see sl_unix_listen):
 * 0 when removed or already gone, -EEXIST when another file is there now. */
int sl_unix_unlink_if(const char *path, uint64_t dev, uint64_t ino);
/* accept4(NONBLOCK|CLOEXEC). Returns the fd; -EAGAIN when none is waiting. */
int sl_accept(int lfd);
/* Most fds one sl_recv_fds receives; more in one message are closed and counted as truncated. */
#define SL_MAX_FDS 16
/* One recvmsg: up to len bytes into buf and up to max_fds (<= SL_MAX_FDS) SCM_RIGHTS fds into
 * fds (*out_nfds of them; extra fds the kernel had to drop are counted in
 * *out_truncated as 1). Received fds are close-on-exec.
 * Returns bytes read (0 = peer closed). */
int sl_recv_fds(int fd, void *buf, uint32_t len, int32_t *fds, int max_fds, int32_t *out_nfds, int32_t *out_truncated);
int sl_peer_cred(int fd, struct sl_peer *out);

/* ---- TCP (postcopy page server and client) -------------------------------- */

/* host is a numeric IPv4/IPv6 address. Non-blocking, close-on-exec, SO_REUSEADDR,
 * TCP_NODELAY (inherited by accepted sockets). port 0 picks one; sl_local_port tells which.
 * Returns the fd. */
int sl_tcp_listen(const char *host, int port, int backlog);
int sl_local_port(int fd);
/* Starts a non-blocking connect; returns the fd (connect may still be in
 * progress: wait for EPOLLOUT, then sl_socket_error). TCP_NODELAY is set. */
int sl_tcp_connect(const char *host, int port);
/* SO_ERROR of a socket as -errno (0 = connected). */
int sl_socket_error(int fd);
/* recv/send without signals. Return bytes (recv 0 = peer closed); -EAGAIN when
 * it would block. */
int sl_recv(int fd, void *buf, uint32_t len);
int sl_send(int fd, const void *buf, uint32_t len);

/* ---- processes ------------------------------------------------------------ */

int sl_kill(int32_t pid, int sig);
/* pidfd_open(pid, 0). Returns the pidfd (close-on-exec). */
int sl_pidfd_open(int32_t pid);
/* A pidfd of a Unix socket's peer: SO_PEERPIDFD (the process that connected,
 * even if its pid was reused since), else pidfd_open of the SO_PEERCRED pid. */
int sl_peer_pidfd(int sock);
/* pidfd_send_signal(pidfd, sig, NULL, 0): never reaches a process that merely
 * reused the pid. -ESRCH once the process has exited. */
int sl_pidfd_send_signal(int pidfd, int sig);

#ifdef __cplusplus
}
#endif

#endif /* SNAPLOAD_H */
