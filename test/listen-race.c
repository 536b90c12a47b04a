/*
 * listen-race — races sl_unix_listen against an attacker who swaps the socket path.
 *
 * usage: listen-race DIR ITERATIONS file|symlink
 *
 * The path DIR/sock starts as a stale socket file. A second thread (the attacker) keeps
 * exchanging (renameat2 RENAME_EXCHANGE) DIR/sock with a victim: a regular file (mode 0600), or a
 * symlink to one. The main thread (the daemon) calls sl_unix_listen(DIR/sock, 0666) in a loop
 * and closes the listener each time, leaving a stale socket for the next round.
 *
 * A safe sl_unix_listen never chmods the victim (or what the symlink points to) and never
 * unlinks it. Prints one JSON line; exit 0 when the victim is untouched, 1 when the attacker won,
 * 2 on a setup error.
 */
#define _GNU_SOURCE
#include "../csrc/snapload.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define VICTIM_MODE 0600
#define SOCKET_MODE 0666
#define BACKLOG 1

static char sock_path[4096], slot_path[4096], target_path[4096];
static atomic_int stop;
static atomic_long swaps;

static void *attacker(void *arg)
{
	(void)arg;
	while (!atomic_load(&stop)) {
		if (renameat2(AT_FDCWD, slot_path, AT_FDCWD, sock_path, RENAME_EXCHANGE) == 0)
			atomic_fetch_add(&swaps, 1);
	}
	return NULL;
}

static int make_stale_socket(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(path) >= sizeof sa.sun_path)
		return -1;
	memcpy(sa.sun_path, path, strlen(path) + 1);
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa))
		return -1;
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: listen-race DIR ITERATIONS file|symlink\n");
		return 2;
	}
	const char *dir = argv[1];
	long iterations = atol(argv[2]);
	int symlink_victim = strcmp(argv[3], "symlink") == 0;
	snprintf(sock_path, sizeof sock_path, "%s/sock", dir);
	snprintf(slot_path, sizeof slot_path, "%s/slot", dir);
	snprintf(target_path, sizeof target_path, "%s/target", dir);

	/* The file whose mode must never change: the victim itself, or the symlink's target. */
	int tfd = open(target_path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, VICTIM_MODE);
	if (tfd < 0 || fchmod(tfd, VICTIM_MODE)) {
		perror("target");
		return 2;
	}
	if (symlink_victim) {
		if (symlink(target_path, slot_path)) {
			perror("symlink");
			return 2;
		}
	} else if (link(target_path, slot_path)) {
		perror("link");
		return 2;
	}
	/* Watches whether the victim's name survives (a symlink is watched through O_PATH). */
	int vfd = open(slot_path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (vfd < 0 || make_stale_socket(sock_path)) {
		perror("setup");
		return 2;
	}
	struct stat before;
	fstat(vfd, &before);

	pthread_t t;
	pthread_create(&t, NULL, attacker, NULL);
	long listened = 0, refused = 0, chmodded = 0, unlinked = 0, i;
	for (i = 0; i < iterations; i++) {
		int fd = sl_unix_listen(sock_path, SOCKET_MODE, BACKLOG, NULL);
		if (fd >= 0) {
			listened++;
			close(fd);
		} else {
			refused++;
		}
		struct stat st, vst;
		if (fstat(tfd, &st) == 0 && (st.st_mode & 07777) != VICTIM_MODE)
			chmodded = 1;
		if (fstat(vfd, &vst) == 0 && vst.st_nlink < before.st_nlink)
			unlinked = 1;
		if (chmodded || unlinked)
			break;
	}
	atomic_store(&stop, 1);
	pthread_join(t, NULL);
	struct stat st;
	fstat(tfd, &st);
	printf("{\"iterations\":%ld,\"listened\":%ld,\"refused\":%ld,\"swaps\":%ld,\"victim_mode\":\"%o\",\"chmodded\":%ld,\"unlinked\":%ld}\n",
	       i, listened, refused, atomic_load(&swaps), st.st_mode & 07777, chmodded, unlinked);
	return chmodded || unlinked ? 1 : 0;
}
