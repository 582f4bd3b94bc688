/*
 * kworkload.c - the standard paging workload on the kernel's own virtual memory.
 *
 * The page-index sequence is not computed here: it is read from a file of
 * little-endian uint32 page numbers written by vmpager.workload, so that this
 * program and vmpager provably perform the same accesses. The page contents
 * are computed here (splitmix64 words continuing the stream at --fill-offset,
 * word 0 of page p set to p); the driver checks a few of them afterwards.
 *
 *   1. mmap an anonymous private region of --mib MiB (4 KiB pages, no THP);
 *   2. fill: write every page;
 *   3. timed access phase: for each index, read word 0 of the page and write
 *      it back plus 1 (the sum of the values read is printed as "checksum");
 *   4. read the probe words (words 1 and 511 of the first and last page).
 *
 * Prints one JSON object: times, accesses/s, getrusage fault counters and
 * /proc/vmstat pswpin/pswpout deltas (system-wide) of both phases.
 *
 * Build: cc -O2 -o kworkload kworkload.c
 * Usage: kworkload --mib N --index-file PATH [--seed S] [--fill-offset F]
 *                  [--content random|sparse] [--max-seconds T]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096UL
#define PAGE_WORDS (PAGE_BYTES / sizeof(uint64_t))
#define GAMMA 0x9E3779B97F4A7C15ULL

struct counters {
	double t;
	long long pswpin, pswpout;
	long minflt, majflt;
};

static uint64_t stream_state;

static inline uint64_t splitmix64(void)
{
	uint64_t z = (stream_state += GAMMA);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static void sample(struct counters *c)
{
	char name[64];
	long long value;
	struct timespec ts;
	struct rusage ru;
	FILE *f;

	c->pswpin = c->pswpout = -1;
	f = fopen("/proc/vmstat", "r");
	if (f) {
		while (fscanf(f, "%63s %lld", name, &value) == 2) {
			if (!strcmp(name, "pswpin"))
				c->pswpin = value;
			else if (!strcmp(name, "pswpout"))
				c->pswpout = value;
		}
		fclose(f);
	}
	getrusage(RUSAGE_SELF, &ru);
	c->minflt = ru.ru_minflt;
	c->majflt = ru.ru_majflt;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	c->t = ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(void)
{
	fprintf(stderr, "usage: kworkload --mib N --index-file PATH [--seed S] "
	    "[--fill-offset F] [--content random|sparse] [--max-seconds T] [--willneed N]\n");
	exit(2);
}

/* Read the whole index file; the page cache it used is dropped again, since it
 * would otherwise be charged to this process's memory cgroup. */
static uint32_t *read_indices(const char *path, uint64_t npages, long long *count)
{
	struct stat st;
	int fd = open(path, O_RDONLY);
	if (fd < 0 || fstat(fd, &st) < 0) {
		perror(path);
		exit(1);
	}
	if (st.st_size % sizeof(uint32_t)) {
		fprintf(stderr, "%s: size %lld is not a multiple of 4\n", path, (long long)st.st_size);
		exit(1);
	}
	*count = st.st_size / (long long)sizeof(uint32_t);
	uint32_t *idx = malloc(st.st_size ? st.st_size : 1);
	if (!idx) {
		perror("malloc");
		exit(1);
	}
	size_t done = 0;
	while (done < (size_t)st.st_size) {
		ssize_t n = read(fd, (char *)idx + done, st.st_size - done);
		if (n <= 0) {
			fprintf(stderr, "%s: short read\n", path);
			exit(1);
		}
		done += n;
	}
	posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	close(fd);
	for (long long i = 0; i < *count; i++) {
		if (idx[i] >= npages) {
			fprintf(stderr, "%s: index %lld = %u is not below npages %" PRIu64 "\n",
			    path, i, idx[i], npages);
			exit(1);
		}
	}
	return idx;
}

int main(int argc, char **argv)
{
	long long mib = 0;
	uint64_t seed = 42, fill_offset = 0;
	double max_seconds = 1e9;
	long long willneed = 0; /* > 0: madvise(MADV_WILLNEED) each window of this many accesses first */
	const char *index_path = NULL, *content = "random";

	for (int i = 1; i < argc; i++) {
		if (i + 1 >= argc)
			usage();
		if (!strcmp(argv[i], "--mib")) mib = atoll(argv[++i]);
		else if (!strcmp(argv[i], "--index-file")) index_path = argv[++i];
		else if (!strcmp(argv[i], "--seed")) seed = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--fill-offset")) fill_offset = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--content")) content = argv[++i];
		else if (!strcmp(argv[i], "--max-seconds")) max_seconds = atof(argv[++i]);
		else if (!strcmp(argv[i], "--willneed")) willneed = atoll(argv[++i]);
		else usage();
	}
	if (mib <= 0 || !index_path || (strcmp(content, "random") && strcmp(content, "sparse")))
		usage();
	int sparse = !strcmp(content, "sparse");
	uint64_t npages = (uint64_t)mib * 1024 * 1024 / PAGE_BYTES;
	long long naccesses;
	uint32_t *idx = read_indices(index_path, npages, &naccesses);

	uint8_t *mem = mmap(NULL, npages * PAGE_BYTES, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	/* 4 KiB pages, the unit vmpager pages in and out */
	madvise(mem, npages * PAGE_BYTES, MADV_NOHUGEPAGE);

	struct counters c0, c1, c2;
	/* output number n of the stream is the mix of seed + (n + 1) * GAMMA */
	stream_state = seed + fill_offset * GAMMA;
	sample(&c0);
	for (uint64_t p = 0; p < npages; p++) {
		uint64_t *w = (uint64_t *)(mem + p * PAGE_BYTES);
		if (!sparse)
			for (unsigned k = 0; k < PAGE_WORDS; k++)
				w[k] = splitmix64();
		w[0] = p;
	}
	sample(&c1);

	uint64_t checksum = 0;
	long long done = 0;
	double deadline = c1.t + max_seconds;
	const long long chunk = 65536;
	struct timespec ts;
	for (long long base = 0; base < naccesses; base += chunk) {
		long long end = base + chunk < naccesses ? base + chunk : naccesses;
		for (long long i = base; i < end; i++) {
			if (willneed > 0 && (i - base) % willneed == 0) {
				/* the batched variant: start the page-ins of the next window
				 * together (swap read-ahead), as a program that knows its next
				 * accesses can */
				long long wend = i + willneed < end ? i + willneed : end;
				for (long long j = i; j < wend; j++)
					madvise(mem + (uint64_t)idx[j] * PAGE_BYTES, PAGE_BYTES, MADV_WILLNEED);
			}
			uint64_t *w = (uint64_t *)(mem + (uint64_t)idx[i] * PAGE_BYTES);
			uint64_t v = *w;
			*w = v + 1;
			checksum += v;
		}
		done = end;
		clock_gettime(CLOCK_MONOTONIC, &ts);
		if (ts.tv_sec + ts.tv_nsec * 1e-9 > deadline)
			break;
	}
	sample(&c2);

	const uint64_t *first = (const uint64_t *)mem;
	const uint64_t *last = (const uint64_t *)(mem + (npages - 1) * PAGE_BYTES);
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	double access_s = c2.t - c1.t;
	printf("{\"mib\": %lld, \"npages\": %" PRIu64 ", \"content\": \"%s\", "
	    "\"seed\": %" PRIu64 ", \"fill_offset\": %" PRIu64 ", "
	    "\"willneed\": %lld, \"requested\": %lld, \"accesses\": %lld, \"truncated\": %s, "
	    "\"fill_s\": %.6f, \"fill_pswpin\": %lld, \"fill_pswpout\": %lld, "
	    "\"fill_minflt\": %ld, \"fill_majflt\": %ld, "
	    "\"access_s\": %.6f, \"accesses_per_s\": %.1f, \"pswpin\": %lld, \"pswpout\": %lld, "
	    "\"minflt\": %ld, \"majflt\": %ld, \"maxrss_kib\": %ld, "
	    "\"checksum\": %" PRIu64 ", "
	    "\"probe\": {\"first_w1\": %" PRIu64 ", \"first_w511\": %" PRIu64 ", "
	    "\"last_w1\": %" PRIu64 ", \"last_w511\": %" PRIu64 "}}\n",
	    mib, npages, content, seed, fill_offset,
	    willneed, naccesses, done, done < naccesses ? "true" : "false",
	    c1.t - c0.t, c1.pswpin - c0.pswpin, c1.pswpout - c0.pswpout,
	    c1.minflt - c0.minflt, c1.majflt - c0.majflt,
	    access_s, access_s > 0 ? done / access_s : 0.0,
	    c2.pswpin - c1.pswpin, c2.pswpout - c1.pswpout,
	    c2.minflt - c1.minflt, c2.majflt - c1.majflt, ru.ru_maxrss,
	    checksum, first[1], first[PAGE_WORDS - 1], last[1], last[PAGE_WORDS - 1]);
	munmap(mem, npages * PAGE_BYTES);
	free(idx);
	return 0;
}
