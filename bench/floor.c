/*
 * The floor: the least a relay of a command's lines can do, for the
 * benchmark to measure beside the real servers in the same run. Not a
 * server anyone should run: no limits, no errors handled beyond what a
 * measurement needs, no records.
 *
 *   floor relay PORT CMD [ARG...]   a command per connection, its stdout a
 *       socket pair; one thread, epoll, one read(2) and one write(2) a line
 *   floor shared PORT CMD [ARG...]  one command for every client (started
 *       with the first), its stdout a pipe; per line one read(2), then one
 *       write(2) to each client
 *   floor spawn PORT CMD [ARG...]   the least a server that starts a command
 *       per connection does: accept(2), posix_spawn(3) of the command with
 *       the socket as its stdout (inetd-style: nothing relayed), close(2)
 *
 * Client sockets are blocking: a line always fits in a loopback socket's
 * buffer, so a write never waits in the measured scenarios.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FDS 65536

static char **command;
/* relay: the client socket of a command's end (by the command end's fd),
 * and the command end of a client socket (by its fd); 0 for none. */
static int peer[MAX_FDS];
/* shared: the clients, the command's pipe (-1 before the first client). */
static int clients[MAX_FDS], nclients, source = -1;
/* relay: whether an fd is a command's end. */
static char is_command[MAX_FDS];

static void die(const char *what) {
    perror(what);
    exit(1);
}

/* Runs the command with stdout `out` (and /dev/null for stdin). */
static void spawn(int out, int close_too) {
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        dup2(out, 1);
        int null = open("/dev/null", 0);
        dup2(null, 0);
        close(out);
        if (close_too >= 0)
            close(close_too);
        execvp(command[0], command);
        _exit(127);
    }
}

extern char **environ;

/* spawn: accept, posix_spawn with the socket as stdout, close; forever. */
static _Noreturn void spawn_loop(int listener) {
    posix_spawn_file_actions_t fa;
    for (;;) {
        int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
        posix_spawn_file_actions_adddup2(&fa, c, 1);
        pid_t pid;
        if (posix_spawnp(&pid, command[0], &fa, NULL, command, environ) != 0)
            perror("posix_spawn");
        posix_spawn_file_actions_destroy(&fa);
        close(c);
    }
}

static void watch(int ep, int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

static void drop_client(int ep, int fd, int shared) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    if (shared) {
        for (int i = 0; i < nclients; i++)
            if (clients[i] == fd) {
                clients[i] = clients[--nclients];
                break;
            }
    } else if (peer[fd]) {
        int cmd = peer[fd];
        epoll_ctl(ep, EPOLL_CTL_DEL, cmd, NULL);
        close(cmd); /* the command gets SIGPIPE at its next line */
        peer[cmd] = peer[fd] = 0;
        is_command[cmd] = 0;
    }
    close(fd);
}

int main(int argc, char **argv) {
    if (argc < 4 || (strcmp(argv[1], "relay") && strcmp(argv[1], "shared") && strcmp(argv[1], "spawn"))) {
        fprintf(stderr, "usage: floor relay|shared|spawn PORT CMD [ARG...]\n");
        return 2;
    }
    int shared = !strcmp(argv[1], "shared");
    command = argv + 3;
    signal(SIGPIPE, SIG_IGN);
    struct sigaction no_zombies = {.sa_handler = SIG_IGN, .sa_flags = SA_NOCLDWAIT};
    sigaction(SIGCHLD, &no_zombies, NULL);

    int listener = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 4096) < 0)
        die("listen");
    if (!strcmp(argv[1], "spawn"))
        spawn_loop(listener);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    watch(ep, listener);

    static char buf[65536];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int c = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
                if (c < 0 || c >= MAX_FDS) {
                    if (c >= 0)
                        close(c);
                    continue;
                }
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                watch(ep, c); /* for its close */
                if (shared) {
                    clients[nclients++] = c;
                    if (source < 0) {
                        int p[2];
                        if (pipe2(p, O_CLOEXEC) < 0)
                            die("pipe");
                        spawn(p[1], p[0]);
                        close(p[1]);
                        source = p[0];
                        watch(ep, source);
                    }
                } else {
                    int sv[2];
                    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                        die("socketpair");
                    spawn(sv[1], sv[0]);
                    close(sv[1]);
                    peer[sv[0]] = c;
                    peer[c] = sv[0];
                    is_command[sv[0]] = 1;
                    watch(ep, sv[0]);
                }
            } else if (shared && fd == source) {
                ssize_t got = read(source, buf, sizeof buf);
                if (got <= 0) {
                    epoll_ctl(ep, EPOLL_CTL_DEL, source, NULL);
                    close(source);
                    source = -1;
                    while (nclients)
                        drop_client(ep, clients[0], 1);
                    continue;
                }
                /* A failed write: the client's close is seen on its own event. */
                for (int k = 0; k < nclients; k++)
                    (void)!write(clients[k], buf, got);
            } else if (!shared && is_command[fd]) {
                /* A line from a command: one read, one write. */
                ssize_t got = read(fd, buf, sizeof buf);
                if (got <= 0 || write(peer[fd], buf, got) < 0)
                    drop_client(ep, peer[fd], 0);
            } else {
                /* A client: anything but its close is dropped. */
                ssize_t got = read(fd, buf, sizeof buf);
                if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR))
                    drop_client(ep, fd, shared);
            }
        }
    }
}
