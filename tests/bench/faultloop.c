/* The charge-heavy workload of bench_probes.py: map, touch every page,
 * unmap, ITER times. Each first touch is a page fault that charges one
 * page to the task's memcg (mostly from the per-cpu stock, a counter
 * charge every batch). Prints nanoseconds per page. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv) {
    long iters = argc > 1 ? atol(argv[1]) : 100;
    long bytes = (argc > 2 ? atol(argv[2]) : 4) << 20;
    long page = 4096;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < iters; i++) {
        char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 1; }
        madvise(p, bytes, MADV_NOHUGEPAGE);  /* one charge per 4 KiB page */
        for (long off = 0; off < bytes; off += page)
            p[off] = 1;
        munmap(p, bytes);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.1f\n", ns / (iters * (bytes / page)));
    return 0;
}
