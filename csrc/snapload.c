/*
 * snapload.c — thin wrappers over the syscalls; see snapload.h for the ABI.
 * No policy lives here: every decision is the caller's.
 */
#define _GNU_SOURCE
#include "snapload.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sched.h>
#include <time.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define NEG_ERRNO() (errno ? -errno : -EIO)

int sl_abi_version(void) { return SL_ABI_VERSION; }

/* ---- memory --------------------------------------------------------------- */

int sl_buffer_alloc(uint64_t len, uint64_t *out)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NEG_ERRNO();
	*out = (uint64_t)(uintptr_t)p;
	return 0;
}

int sl_buffer_free(void *addr, uint64_t len)
{
	return munmap(addr, len) ? NEG_ERRNO() : 0;
}

/* ---- files ---------------------------------------------------------------- */

int sl_file_open_ro(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	return fd < 0 ? NEG_ERRNO() : fd;
}

int sl_file_stat(int fd, uint64_t *out_size, int32_t *out_is_regular)
{
	struct stat st;
	if (fstat(fd, &st))
		return NEG_ERRNO();
	*out_size = (uint64_t)st.st_size;
	*out_is_regular = S_ISREG(st.st_mode) ? 1 : 0;
	return 0;
}

static int seek(int fd, uint64_t off, int whence, uint64_t *out)
{
	off_t r = lseek(fd, (off_t)off, whence);
	if (r < 0)
		return NEG_ERRNO();
	*out = (uint64_t)r;
	return 0;
}

int sl_file_seek_data(int fd, uint64_t off, uint64_t *out) { return seek(fd, off, SEEK_DATA, out); }
int sl_file_seek_hole(int fd, uint64_t off, uint64_t *out) { return seek(fd, off, SEEK_HOLE, out); }

int sl_file_pread(int fd, void *buf, uint32_t len, uint64_t off)
{
	uint32_t done = 0;
	if (len > (1u << 30))
		return -EINVAL;
	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return NEG_ERRNO();
		}
		if (n == 0)
			break;
		done += (uint32_t)n;
	}
	return (int)done;
}

int sl_file_map(int fd, uint64_t len, uint64_t off, int populate, uint64_t *out)
{
	int flags = MAP_PRIVATE | (populate ? MAP_POPULATE : 0);
	void *p = mmap(NULL, len, PROT_READ, flags, fd, (off_t)off);
	if (p == MAP_FAILED)
		return NEG_ERRNO();
	*out = (uint64_t)(uintptr_t)p;
	return 0;
}

int sl_unmap(void *addr, uint64_t len) { return munmap(addr, len) ? NEG_ERRNO() : 0; }

int sl_madvise(void *addr, uint64_t len, int advice)
{
	return madvise(addr, len, advice) ? NEG_ERRNO() : 0;
}

int sl_mincore(void *addr, uint64_t len, uint8_t *vec)
{
	return mincore(addr, len, vec) ? NEG_ERRNO() : 0;
}

int sl_close(int fd) { return close(fd) ? NEG_ERRNO() : 0; }

int sl_set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
		return NEG_ERRNO();
	return 0;
}

/* ---- userfaultfd ---------------------------------------------------------- */

int sl_uffd_open(int flags)
{
	int fd = (int)syscall(SYS_userfaultfd, flags);
	if (fd >= 0)
		return fd;
	/* Unprivileged kernel-fault handling may be disabled for the syscall
	 * (vm.unprivileged_userfaultfd=0) but allowed through the device. */
	int err = errno;
	int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev < 0)
		return -err;
	fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
	int ioerr = errno;
	close(dev);
	return fd < 0 ? -ioerr : fd;
}

int sl_uffd_api(int uffd, uint64_t features, uint64_t *out_features, uint64_t *out_ioctls)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };
	if (ioctl(uffd, UFFDIO_API, &api))
		return NEG_ERRNO();
	if (out_features)
		*out_features = api.features;
	if (out_ioctls)
		*out_ioctls = api.ioctls;
	return 0;
}

int sl_uffd_register(int uffd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *out_ioctls)
{
	struct uffdio_register reg = { .range = { .start = start, .len = len }, .mode = mode };
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		return NEG_ERRNO();
	if (out_ioctls)
		*out_ioctls = reg.ioctls;
	return 0;
}

int sl_uffd_unregister(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { .start = start, .len = len };
	return ioctl(uffd, UFFDIO_UNREGISTER, &r) ? NEG_ERRNO() : 0;
}

int sl_fd_is_uffd(int fd)
{
	char path[64], target[64];
	snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, target, sizeof target - 1);
	if (n < 0)
		return NEG_ERRNO();
	target[n] = 0;
	return strcmp(target, "anon_inode:[userfaultfd]") == 0;
}

int sl_uffd_read(int uffd, void *buf, int max)
{
	for (;;) {
		ssize_t n = read(uffd, buf, (size_t)max * SL_UFFD_MSG_SIZE);
		if (n >= 0)
			return (int)(n / SL_UFFD_MSG_SIZE);
		if (errno == EINTR)
			continue;
		return errno == EAGAIN ? 0 : NEG_ERRNO();
	}
}

int sl_uffd_copy(int uffd, uint64_t dst, const void *src, uint64_t len, int mode, uint64_t *out_done)
{
	struct uffdio_copy c = {
		.dst = dst,
		.src = (uint64_t)(uintptr_t)src,
		.len = len,
		.mode = (mode & 1) ? UFFDIO_COPY_MODE_DONTWAKE : 0,
	};
	if (ioctl(uffd, UFFDIO_COPY, &c) == 0)
		return 0;
	int err = errno ? errno : EIO;
	if (out_done)
		*out_done = c.copy > 0 ? (uint64_t)c.copy : 0;
	return -err;
}

int sl_uffd_zeropage(int uffd, uint64_t dst, uint64_t len, int mode, uint64_t *out_done)
{
	struct uffdio_zeropage z = {
		.range = { .start = dst, .len = len },
		.mode = (mode & 1) ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0,
	};
	if (ioctl(uffd, UFFDIO_ZEROPAGE, &z) == 0)
		return 0;
	int err = errno ? errno : EIO;
	if (out_done)
		*out_done = z.zeropage > 0 ? (uint64_t)z.zeropage : 0;
	return -err;
}

int sl_uffd_wake(int uffd, uint64_t start, uint64_t len)
{
	struct uffdio_range r = { .start = start, .len = len };
	return ioctl(uffd, UFFDIO_WAKE, &r) ? NEG_ERRNO() : 0;
}

/* ---- epoll ---------------------------------------------------------------- */

int sl_epoll_create(void)
{
	int fd = epoll_create1(EPOLL_CLOEXEC);
	return fd < 0 ? NEG_ERRNO() : fd;
}

int sl_epoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data)
{
	struct epoll_event ev = { .events = events, .data.u64 = data };
	return epoll_ctl(epfd, op, fd, &ev) ? NEG_ERRNO() : 0;
}

int sl_epoll_wait(int epfd, struct sl_event *out, int max, int timeout_ms)
{
	struct epoll_event evs[SL_EPOLL_MAX_EVENTS];
	if (max > SL_EPOLL_MAX_EVENTS)
		max = SL_EPOLL_MAX_EVENTS;
	int n = epoll_wait(epfd, evs, max, timeout_ms);
	if (n < 0)
		return errno == EINTR ? 0 : NEG_ERRNO();
	for (int i = 0; i < n; i++) {
		out[i].data = evs[i].data.u64;
		out[i].events = evs[i].events;
		out[i].pad = 0;
	}
	return n;
}

int sl_epoll_spin(int epfd, struct sl_event *out, int max, uint32_t spin_us)
{
	struct timespec t;
	if (spin_us > SL_SPIN_MAX_US)
		spin_us = SL_SPIN_MAX_US;
	clock_gettime(CLOCK_MONOTONIC, &t);
	uint64_t until = (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec + (uint64_t)spin_us * 1000u;
	for (;;) {
		int n = sl_epoll_wait(epfd, out, max, 0);
		if (n != 0)
			return n;
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec >= until)
			return 0;
		sched_yield();
	}
}

/* ---- toucher --------------------------------------------------------------- */

struct sl_toucher {
	pthread_t thread;
	volatile unsigned char *addr;
	uint64_t len;
	uint32_t page, rounds, done;
	int done_fd, go_fd;
};

static void *toucher_main(void *arg)
{
	struct sl_toucher *t = arg;
	unsigned sum = 0;
	for (uint32_t r = 0; r < t->rounds; r++) {
		for (uint64_t off = 0; off < t->len; off += t->page)
			sum += t->addr[off];
		madvise((void *)t->addr, t->len, MADV_DONTNEED);
		t->done = r + 1;
		uint64_t one = 1;
		if (write(t->done_fd, &one, sizeof one) != sizeof one)
			break;
		if (r + 1 == t->rounds)
			break;
		struct pollfd p = { .fd = t->go_fd, .events = POLLIN };
		while (poll(&p, 1, -1) < 0 && errno == EINTR)
			;
		uint64_t v;
		if (read(t->go_fd, &v, sizeof v) != sizeof v)
			break;
	}
	(void)sum;
	return NULL;
}

int sl_toucher_start(void *addr, uint64_t len, uint32_t page, uint32_t rounds, int done_fd, int go_fd, uint64_t *out_handle)
{
	if (!page || len % page || !rounds)
		return -EINVAL;
	struct sl_toucher *t = calloc(1, sizeof *t);
	if (!t)
		return -ENOMEM;
	*t = (struct sl_toucher){ .addr = addr, .len = len, .page = page, .rounds = rounds, .done_fd = done_fd, .go_fd = go_fd };
	int err = pthread_create(&t->thread, NULL, toucher_main, t);
	if (err) {
		free(t);
		return -err;
	}
	*out_handle = (uint64_t)(uintptr_t)t;
	return 0;
}

int sl_toucher_join(uint64_t handle)
{
	struct sl_toucher *t = (struct sl_toucher *)(uintptr_t)handle;
	int err = pthread_join(t->thread, NULL);
	int done = (int)t->done;
	free(t);
	return err ? -err : done;
}

/* ---- eventfd -------------------------------------------------------------- */

int sl_eventfd(void)
{
	int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	return fd < 0 ? NEG_ERRNO() : fd;
}

int sl_eventfd_signal(int fd)
{
	uint64_t one = 1;
	return write(fd, &one, sizeof one) == sizeof one ? 0 : NEG_ERRNO();
}

int sl_eventfd_drain(int fd)
{
	uint64_t v;
	if (read(fd, &v, sizeof v) == sizeof v)
		return 0;
	return errno == EAGAIN ? 0 : NEG_ERRNO();
}

/* ---- Unix sockets --------------------------------------------------------- */

static int fill_sun(struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof sa->sun_path)
		return -ENAMETOOLONG;
	strcpy(sa->sun_path, path);
	return 0;
}

/* Name of the socket inside the private directory, and of a path moved aside for inspection. */
#define SL_PRIV_SOCK "s"
#define SL_PRIV_ASIDE "aside"
#define SL_PRIV_TRIES 16
#define SL_PRIV_MODE 0700

/* Splits path into its directory (opened O_DIRECTORY) and its last component (into base). */
static int open_parent(const char *path, char *base, size_t base_len)
{
	const char *slash = strrchr(path, '/');
	const char *name = slash ? slash + 1 : path;
	if (!*name || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
		return -EINVAL;
	if (strlen(name) >= base_len)
		return -ENAMETOOLONG;
	strcpy(base, name);
	char dir[sizeof ((struct sockaddr_un *)0)->sun_path];
	if (!slash)
		strcpy(dir, ".");
	else if (slash == path)
		strcpy(dir, "/");
	else {
		size_t n = (size_t)(slash - path);
		if (n >= sizeof dir)
			return -ENAMETOOLONG;
		memcpy(dir, path, n);
		dir[n] = 0;
	}
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	return fd < 0 ? NEG_ERRNO() : fd;
}

/* A fresh directory beside the socket (same filesystem, so rename() works), mode 0700, ours
 * alone: what is inside cannot be swapped by anyone else. Its name goes to name (>= 32 bytes). */
static int make_private_dir(int dirfd, char *name, size_t name_len)
{
	for (int i = 0; i < SL_PRIV_TRIES; i++) {
		uint64_t rnd;
		if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
			return NEG_ERRNO();
		snprintf(name, name_len, ".snapload-%016llx", (unsigned long long)rnd);
		if (mkdirat(dirfd, name, SL_PRIV_MODE) == 0) {
			int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
			if (fd < 0) {
				int r = NEG_ERRNO();
				unlinkat(dirfd, name, AT_REMOVEDIR);
				return r;
			}
			/* The umask may have narrowed it; never widened. Make it exactly 0700 through the fd. */
			if (fchmod(fd, SL_PRIV_MODE)) {
				int r = NEG_ERRNO();
				close(fd);
				unlinkat(dirfd, name, AT_REMOVEDIR);
				return r;
			}
			return fd;
		}
		if (errno != EEXIST)
			return NEG_ERRNO();
	}
	return -EEXIST;
}

static void remove_private_dir(int dirfd, const char *name, int privfd)
{
	unlinkat(privfd, SL_PRIV_SOCK, 0);
	close(privfd);
	unlinkat(dirfd, name, AT_REMOVEDIR);
}

/*
 * Removes dirfd/base only if it is still the socket with inode (dev, ino): it is first moved into
 * our private directory, where nobody can swap it, then checked, then unlinked — or moved back
 * untouched if it was not ours. Returns 0 when removed (or already gone), -EEXIST if something
 * else is there now.
 */
static int remove_if_same(int dirfd, const char *base, int privfd, uint64_t dev, uint64_t ino)
{
	if (renameat(dirfd, base, privfd, SL_PRIV_ASIDE)) {
		if (errno == ENOENT)
			return 0;
		return NEG_ERRNO();
	}
	struct stat st;
	if (fstatat(privfd, SL_PRIV_ASIDE, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISSOCK(st.st_mode) &&
	    (uint64_t)st.st_dev == dev && (uint64_t)st.st_ino == ino)
		return unlinkat(privfd, SL_PRIV_ASIDE, 0) ? NEG_ERRNO() : 0;
	/* Not ours: put it back. If something took its place meanwhile, neither is touched and the
	 * moved file stays in the private directory (which then is not removed). */
	renameat2(privfd, SL_PRIV_ASIDE, dirfd, base, RENAME_NOREPLACE);
	return -EEXIST;
}

/* 1 if a listener answers at path, 0 if nobody does (a stale socket file). Connecting through a
 * path someone swapped can only make us refuse (a wrong "live"), never remove: removal checks
 * the inode. */
static int someone_listens(const char *path)
{
	struct sockaddr_un sa;
	int r = fill_sun(&sa, path);
	if (r)
		return r;
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return NEG_ERRNO();
	r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
	int err = errno;
	close(fd);
	if (r == 0)
		return 1;
	/* Nobody listening, or the file went away: stale. A full backlog (EAGAIN) is a live daemon. */
	if (err == ECONNREFUSED || err == ENOENT)
		return 0;
	return err == EAGAIN ? 1 : -err;
}

int sl_unix_listen(const char *path, uint32_t mode, int backlog, struct sl_file_id *out_id)
{
	struct sockaddr_un sa;
	int r = fill_sun(&sa, path);
	if (r)
		return r;
	char base[sizeof sa.sun_path];
	int dirfd = open_parent(path, base, sizeof base);
	if (dirfd < 0)
		return dirfd;
	char priv[32];
	int privfd = make_private_dir(dirfd, priv, sizeof priv);
	if (privfd < 0) {
		close(dirfd);
		return privfd;
	}
	int fd = -1;
	struct stat st;
	if (fstatat(dirfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		if (!S_ISSOCK(st.st_mode)) {
			r = -EEXIST;
			goto out;
		}
		r = someone_listens(path);
		if (r != 0) {
			r = r > 0 ? -EADDRINUSE : r;
			goto out;
		}
		r = remove_if_same(dirfd, base, privfd, (uint64_t)st.st_dev, (uint64_t)st.st_ino);
		if (r)
			goto out;
	} else if (errno != ENOENT) {
		r = NEG_ERRNO();
		goto out;
	}

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		r = NEG_ERRNO();
		goto out;
	}
	/* Bind inside the private directory: whatever mode the umask gives the new file, nobody else
	 * can reach it there, and the chmod cannot be redirected through a swapped path. */
	struct sockaddr_un in = { .sun_family = AF_UNIX };
	snprintf(in.sun_path, sizeof in.sun_path, "/proc/self/fd/%d/%s", privfd, SL_PRIV_SOCK);
	if (bind(fd, (struct sockaddr *)&in, sizeof in) || fchmodat(privfd, SL_PRIV_SOCK, mode & 07777, 0) ||
	    fstatat(privfd, SL_PRIV_SOCK, &st, AT_SYMLINK_NOFOLLOW) || listen(fd, backlog)) {
		r = NEG_ERRNO();
		goto out;
	}
	/* Into place atomically; never over a file that appeared meanwhile. */
	if (renameat2(privfd, SL_PRIV_SOCK, dirfd, base, RENAME_NOREPLACE)) {
		r = NEG_ERRNO();
		goto out;
	}
	if (out_id) {
		out_id->dev = (uint64_t)st.st_dev;
		out_id->ino = (uint64_t)st.st_ino;
	}
	r = fd;
	fd = -1;
out:
	if (fd >= 0)
		close(fd);
	remove_private_dir(dirfd, priv, privfd);
	close(dirfd);
	return r;
}

int sl_unix_unlink_if(const char *path, uint64_t dev, uint64_t ino)
{
	char base[sizeof ((struct sockaddr_un *)0)->sun_path];
	int dirfd = open_parent(path, base, sizeof base);
	if (dirfd < 0)
		return dirfd;
	char priv[32];
	int privfd = make_private_dir(dirfd, priv, sizeof priv);
	if (privfd < 0) {
		close(dirfd);
		return privfd;
	}
	int r = remove_if_same(dirfd, base, privfd, dev, ino);
	remove_private_dir(dirfd, priv, privfd);
	close(dirfd);
	return r;
}

int sl_accept(int lfd)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd >= 0)
			return fd;
		if (errno != EINTR)
			return NEG_ERRNO();
	}
}


int sl_recv_fds(int fd, void *buf, uint32_t len, int32_t *fds, int max_fds, int32_t *out_nfds, int32_t *out_truncated)
{
	union {
		struct cmsghdr hdr;
		char bytes[CMSG_SPACE(sizeof(int) * SL_MAX_FDS)];
	} ctl;
	struct iovec iov = { .iov_base = buf, .iov_len = len };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = ctl.bytes, .msg_controllen = sizeof ctl.bytes,
	};
	ssize_t n;
	do
		n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return NEG_ERRNO();

	int count = 0, truncated = (msg.msg_flags & MSG_CTRUNC) ? 1 : 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		int *in = (int *)CMSG_DATA(c);
		for (size_t i = 0; i < k; i++) {
			if (count < max_fds)
				fds[count++] = in[i];
			else {
				/* The caller asked for fewer: never leak the rest. */
				close(in[i]);
				truncated = 1;
			}
		}
	}
	*out_nfds = count;
	*out_truncated = truncated;
	return (int)n;
}

int sl_peer_cred(int fd, struct sl_peer *out)
{
	struct ucred uc;
	socklen_t l = sizeof uc;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &l))
		return NEG_ERRNO();
	out->pid = uc.pid;
	out->uid = uc.uid;
	out->gid = uc.gid;
	return 0;
}

/* ---- TCP ------------------------------------------------------------------ */

static int fill_inet(struct sockaddr_storage *ss, socklen_t *sl, const char *host, int port)
{
	memset(ss, 0, sizeof *ss);
	struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
	if (port < 0 || port > 65535)
		return -EINVAL;
	if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons((uint16_t)port);
		*sl = sizeof *a4;
		return AF_INET;
	}
	if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons((uint16_t)port);
		*sl = sizeof *a6;
		return AF_INET6;
	}
	return -EINVAL;
}

int sl_tcp_listen(const char *host, int port, int backlog)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	int fam = fill_inet(&ss, &sl, host, port);
	if (fam < 0)
		return fam;
	int fd = socket(fam, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return NEG_ERRNO();
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	/* Accepted sockets inherit it: a small reply sent as header + payload must not wait for an ACK. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (bind(fd, (struct sockaddr *)&ss, sl) || listen(fd, backlog)) {
		int r = NEG_ERRNO();
		close(fd);
		return r;
	}
	return fd;
}

int sl_local_port(int fd)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof ss;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl))
		return NEG_ERRNO();
	if (ss.ss_family == AF_INET)
		return ntohs(((struct sockaddr_in *)&ss)->sin_port);
	if (ss.ss_family == AF_INET6)
		return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
	return -EAFNOSUPPORT;
}

int sl_tcp_connect(const char *host, int port)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	int fam = fill_inet(&ss, &sl, host, port);
	if (fam < 0)
		return fam;
	int fd = socket(fam, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return NEG_ERRNO();
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(fd, (struct sockaddr *)&ss, sl) && errno != EINPROGRESS) {
		int r = NEG_ERRNO();
		close(fd);
		return r;
	}
	return fd;
}

int sl_socket_error(int fd)
{
	int err = 0;
	socklen_t l = sizeof err;
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l))
		return NEG_ERRNO();
	return -err;
}

int sl_recv(int fd, void *buf, uint32_t len)
{
	for (;;) {
		ssize_t n = recv(fd, buf, len, MSG_DONTWAIT);
		if (n >= 0)
			return (int)n;
		if (errno != EINTR)
			return NEG_ERRNO();
	}
}

int sl_send(int fd, const void *buf, uint32_t len)
{
	for (;;) {
		ssize_t n = send(fd, buf, len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n >= 0)
			return (int)n;
		if (errno != EINTR)
			return NEG_ERRNO();
	}
}

/* ---- processes ------------------------------------------------------------ */

int sl_kill(int32_t pid, int sig)
{
	return kill(pid, sig) ? NEG_ERRNO() : 0;
}

/* Not in every libc's headers yet (Linux 6.5). */
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
#define SL_PIDFD_OPEN_FLAGS 0
#define SL_PIDFD_SIGNAL_FLAGS 0

int sl_pidfd_open(int32_t pid)
{
	int fd = (int)syscall(SYS_pidfd_open, (pid_t)pid, SL_PIDFD_OPEN_FLAGS);
	return fd < 0 ? NEG_ERRNO() : fd;
}

int sl_peer_pidfd(int sock)
{
	int pidfd = -1;
	socklen_t l = sizeof pidfd;
	if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &l) == 0)
		return pidfd;
	if (errno != ENOPROTOOPT)
		return NEG_ERRNO();
	/* Older kernel: the pid the kernel recorded at connect(), pinned as soon as we can. */
	struct ucred uc;
	l = sizeof uc;
	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &uc, &l))
		return NEG_ERRNO();
	return sl_pidfd_open(uc.pid);
}

int sl_pidfd_send_signal(int pidfd, int sig)
{
	return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, SL_PIDFD_SIGNAL_FLAGS) ? NEG_ERRNO() : 0;
}
