/*
 * pid-reuse — a VMM whose connecting process exits and whose pid is then reused by an innocent
 * process, before the daemon decides to kill "the VMM" (issue 8: --on-fatal kill by pid).
 *
 * usage: pid-reuse SOCKET -- DAEMON_COMMAND...      (run it inside a fresh pid namespace:
 *        unshare --pid --fork --mount-proc pid-reuse ...; it writes ns_last_pid)
 *
 * 1. starts the daemon (DAEMON_COMMAND) and waits until SOCKET accepts connections;
 * 2. maps 2 MiB, creates a userfaultfd and registers all of it, but a child process connects
 *    and sends a handshake announcing only the first 1 MiB, then exits (the parent keeps the
 *    connected socket and the uffd, as a VMM that forked would);
 * 3. forks a victim (it just waits) with the child's pid, by writing ns_last_pid;
 * 4. touches a page outside what was announced: the daemon must give up on this VM;
 * 5. once the daemon has closed the connection, reports whether the victim was killed.
 *
 * stdout: {"child":C,"victim":V,"reused":0|1,"victim_killed":0|1,"daemon_closed":0|1}
 * exit 0 when it ran (whatever the outcome), 2 on a setup error.
 */
#define _GNU_SOURCE
#include "../csrc/tools/tool.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define REGION_BYTES (2u << 20)
#define ANNOUNCED_BYTES (1u << 20)
#define PAGE 4096
#define WAIT_DAEMON_MS 20000
#define WAIT_CLOSE_MS 20000
#define WAIT_DEATH_MS 1000
#define REUSE_TRIES 20

static int set_last_pid(pid_t pid)
{
	int fd = open("/proc/sys/kernel/ns_last_pid", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	char buf[32];
	int n = snprintf(buf, sizeof buf, "%d", (int)pid);
	int r = write(fd, buf, (size_t)n) == n ? 0 : -1;
	close(fd);
	return r;
}

static volatile char *outside;

static void *toucher(void *arg)
{
	(void)arg;
	(void)*outside; /* blocks in the fault until the uffd is resolved or the process dies */
	return NULL;
}

int main(int argc, char **argv)
{
	tool_name = "pid-reuse";
	if (argc < 4 || strcmp(argv[2], "--") != 0) {
		fprintf(stderr, "usage: pid-reuse SOCKET -- DAEMON_COMMAND...\n");
		return 2;
	}
	const char *path = argv[1];
	pid_t daemon = fork();
	if (daemon < 0)
		tool_die("fork daemon");
	if (daemon == 0) {
		execvp(argv[3], argv + 3);
		_exit(127);
	}
	/* Wait until the daemon listens (connect succeeds); this probe is a handshake-less peer. */
	int up = 0;
	for (int waited = 0; waited < WAIT_DAEMON_MS && !up; waited += 10) {
		int p = tool_unix_connect(path);
		if (p >= 0) {
			up = 1;
			close(p);
		}
		if (!up)
			poll(NULL, 0, 10);
	}
	if (!up) {
		fprintf(stderr, "pid-reuse: daemon never listened on %s\n", path);
		kill(daemon, SIGKILL);
		return 2;
	}

	char *mem = mmap(NULL, REGION_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		tool_die("mmap");
	int uffd = tool_userfaultfd(0);
	tool_uffd_register(uffd, mem, REGION_BYTES);
	struct tool_wire_region announced = { .addr = (uintptr_t)mem, .size = ANNOUNCED_BYTES };
	size_t n;
	char *body = tool_handshake_json(&announced, 1, PAGE, TOOL_WIRE_V12, &n);

	/* The child connects (so the daemon's peer credentials name it), sends and exits; the
	 * parent keeps its copy of the connected socket. */
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		tool_die("socket");
	pid_t child = fork();
	if (child < 0)
		tool_die("fork child");
	if (child == 0) {
		struct sockaddr_un sa = { .sun_family = AF_UNIX };
		if (strlen(path) >= sizeof sa.sun_path)
			_exit(1);
		memcpy(sa.sun_path, path, strlen(path) + 1);
		if (connect(s, (struct sockaddr *)&sa, sizeof sa))
			_exit(1);
		_exit(tool_sendmsg_fds(s, body, n, &uffd, 1, 0) == (ssize_t)n ? 0 : 1);
	}
	int st;
	if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		fprintf(stderr, "pid-reuse: the connecting child failed\n");
		kill(daemon, SIGKILL);
		return 2;
	}

	/* The child is reaped: its pid is free. Hand it to an innocent process. */
	pid_t victim = -1;
	for (int i = 0; i < REUSE_TRIES && victim != child; i++) {
		if (victim > 0) {
			kill(victim, SIGKILL);
			waitpid(victim, NULL, 0);
		}
		if (set_last_pid(child - 1))
			tool_die("ns_last_pid (not in a fresh pid namespace?)");
		victim = fork();
		if (victim < 0)
			tool_die("fork victim");
		if (victim == 0) {
			for (;;)
				pause();
		}
	}
	int reused = victim == child;
	int victim_pidfd = (int)syscall(SYS_pidfd_open, victim, 0);
	if (victim_pidfd < 0)
		tool_die("pidfd_open victim");

	/* A fault outside the announced 1 MiB: the daemon cannot serve it and gives up on the VM. */
	outside = mem + ANNOUNCED_BYTES + PAGE;
	pthread_t t;
	pthread_create(&t, NULL, toucher, NULL);
	struct pollfd pc = { .fd = s, .events = POLLRDHUP };
	int closed = poll(&pc, 1, WAIT_CLOSE_MS) == 1;
	/* The daemon signals before it closes: if it killed the victim, its death is imminent. */
	struct pollfd pv = { .fd = victim_pidfd, .events = POLLIN };
	int killed = 0;
	if (poll(&pv, 1, WAIT_DEATH_MS) == 1) {
		waitpid(victim, &st, 0);
		killed = WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
	} else {
		kill(victim, SIGKILL);
		waitpid(victim, NULL, 0);
	}
	printf("{\"child\":%d,\"victim\":%d,\"reused\":%d,\"victim_killed\":%d,\"daemon_closed\":%d}\n", (int)child, (int)victim, reused,
	       killed, closed);
	fflush(stdout);
	kill(daemon, SIGTERM);
	waitpid(daemon, NULL, 0);
	_exit(0); /* the toucher is still blocked in its fault */
}
