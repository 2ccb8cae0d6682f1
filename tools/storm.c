// A connection storm against a pushhub node: N clients connect to 127.0.0.1:PORT at once
// (non-blocking connects, all issued before any answer is read), each sends an SSE request,
// and the time from the start until each is answered is recorded: served (200), refused (any
// other status: 503 past --max-connections) or failed (closed with no answer, or never
// connected). Prints one JSON line; pair it with `nstat -az TcpExtListenOverflows` to see
// connections the listen backlog dropped (their SYNs are retried after 1 s, 3 s, ...).
//   cc -O2 -o storm tools/storm.c && ./storm PORT N
// (docs/benchmarks.md, "A node at its limits")
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
  int port = atoi(argv[1]), n = atoi(argv[2]);
  int ep = epoll_create1(0);
  int *fds = calloc(n, sizeof(int)); int *state = calloc(n, sizeof(int)); double *at = calloc(n, sizeof(double));
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  const char *req = "GET /topics/storm/sse HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n";
  double t0 = now();
  for (int i = 0; i < n; i++) {
    fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(fds[i], (void *)&a, sizeof a);
    struct epoll_event e = {.events = EPOLLOUT, .data.u32 = i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
  }
  int served = 0, refused = 0, failed = 0; char buf[4096]; struct epoll_event ev[512];
  while (served + refused + failed < n && now() - t0 < 60) {
    int k = epoll_wait(ep, ev, 512, 1000);
    for (int j = 0; j < k; j++) {
      int i = ev[j].data.u32;
      if (state[i] == 0) {
        if (ev[j].events & (EPOLLERR | EPOLLHUP)) { state[i] = 3; failed++; epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL); continue; }
        write(fds[i], req, strlen(req)); state[i] = 1;
        struct epoll_event e = {.events = EPOLLIN, .data.u32 = i}; epoll_ctl(ep, EPOLL_CTL_MOD, fds[i], &e);
      } else if (state[i] == 1) {
        ssize_t r = read(fds[i], buf, sizeof buf - 1);
        if (r <= 0) { state[i] = 3; failed++; epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL); continue; }
        buf[r] = 0; at[i] = now() - t0; state[i] = 2; epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL);
        if (strncmp(buf, "HTTP/1.1 200", 12) == 0) served++; else refused++;
      }
    }
  }
  double *t = calloc(n, sizeof(double)); int m = 0;
  for (int i = 0; i < n; i++) if (state[i] == 2) t[m++] = at[i];
  qsort(t, m, sizeof(double), cmp);
  printf("{\"n\":%d,\"served\":%d,\"refused\":%d,\"failed\":%d,\"p50_ms\":%.1f,\"p99_ms\":%.1f,\"all_ms\":%.1f}\n", n, served, refused, failed,
         m ? t[m / 2] * 1e3 : -1, m ? t[(int)(m * 0.99)] * 1e3 : -1, m ? t[m - 1] * 1e3 : -1);
  return 0;
}
