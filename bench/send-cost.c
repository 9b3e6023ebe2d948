// send-cost: the sender's CPU per call of writev(2) with two slices against send(2) of the same
// bytes in one buffer, on loopback TCP (bench/README.md, "The kernel's part of a request").
//
//   cc -O2 -pthread bench/send-cost.c -o /tmp/send-cost && taskset -c 1 /tmp/send-cost 20000
//
// The argument is the calls per batch; the two ways alternate batch by batch (30 each) so the
// host's drifts fall on both, and each prints its median, 25th and 75th percentile. A second
// thread drains the socket. Binds 127.0.0.1 on a port the kernel picks.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum { BATCHES = 30, HEAD = 180, BODY = 12 };

static int receiver;

static void *drain(void *unused) {
    (void)unused;
    char buf[65536];
    while (read(receiver, buf, sizeof buf) > 0) {
    }
    return NULL;
}

static double thread_cpu_seconds(void) {
    struct rusage usage;
    getrusage(RUSAGE_THREAD, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec +
           usage.ru_stime.tv_usec / 1e6;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 20000;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) || listen(listener, 1) ||
        getsockname(listener, (struct sockaddr *)&addr, &len)) {
        perror("listen on 127.0.0.1");
        return 1;
    }
    int sender = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(sender, (struct sockaddr *)&addr, sizeof addr)) {
        perror("connect");
        return 1;
    }
    receiver = accept(listener, NULL, NULL);
    int one = 1;
    setsockopt(sender, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    pthread_t thread;
    pthread_create(&thread, NULL, drain, NULL);

    char head[HEAD], body[BODY], flat[HEAD + BODY];
    memset(head, 'h', sizeof head);
    memset(body, 'b', sizeof body);
    struct iovec slices[2] = {{head, HEAD}, {body, BODY}};
    double cost[2][BATCHES];
    for (int batch = 0; batch < BATCHES; batch++) {
        for (int way = 0; way < 2; way++) {
            double start = thread_cpu_seconds();
            for (long i = 0; i < calls; i++) {
                ssize_t sent;
                if (way == 0) {
                    sent = writev(sender, slices, 2);
                } else {
                    // As gathered_write does: copy the slices into one buffer, then send it.
                    memcpy(flat, head, HEAD);
                    memcpy(flat + HEAD, body, BODY);
                    sent = send(sender, flat, sizeof flat, MSG_NOSIGNAL);
                }
                if (sent != HEAD + BODY) {
                    perror("write");
                    return 1;
                }
            }
            cost[way][batch] = (thread_cpu_seconds() - start) / calls * 1e6;
        }
    }
    const char *names[2] = {"writev, 2 slices", "send, 1 buffer  "};
    for (int way = 0; way < 2; way++) {
        qsort(cost[way], BATCHES, sizeof(double), by_value);
        printf("%s median %.3f µs/call (p25 %.3f, p75 %.3f), %d batches of %ld\n", names[way],
               cost[way][BATCHES / 2], cost[way][BATCHES / 4], cost[way][3 * BATCHES / 4],
               BATCHES, calls);
    }
    return 0;
}
