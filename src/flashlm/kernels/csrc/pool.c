/* The kernels' persistent thread pool (see kernels.h). One job at a time: the caller publishes
 * (fn, arg, nth), bumps a generation counter and runs part 0 itself; each worker i < nth runs
 * part i and counts down. Workers that finish spin on the counter for a while (a decode step
 * calls the kernels every few tens of microseconds, and a condition-variable wake-up costs about
 * that much), then sleep on a condition variable. No thread is started per call.
 *
 * After fork() the child has no workers: the pthread_atfork handler marks the pool unstarted so
 * that the child's first call starts its own. POSIX threads only; elsewhere every call runs on
 * the calling thread.
 */
#include "kernels.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* ~50-200 us of pause (PAUSE is 40-140 cycles) before a worker sleeps, and as long for the
   caller waiting on the rest */
#define SPINS 4000

static pthread_mutex_t g_run = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_wake = PTHREAD_COND_INITIALIZER, g_done_cv = PTHREAD_COND_INITIALIZER;
static pthread_t g_thr[FL_MAX_THREADS];
static int g_started = 0;          /* workers running (they are tids 1..g_started) */
static int g_size = 1;             /* threads a call uses */
static atomic_uint g_gen = 0;      /* bumped per job */
static atomic_int g_left = 0;      /* parts still running */
static atomic_int g_sleepers = 0;  /* workers in (or about to enter) pthread_cond_wait */
static unsigned g_gen0[FL_MAX_THREADS];
static fl_task g_fn;
static void *g_arg;
static int g_nth;

static void *worker(void *p) {
    const int tid = (int)(intptr_t)p;
    unsigned seen = g_gen0[tid]; /* the generation when it was created: a job published since is new */
    for (;;) {
        unsigned gen;
        int spins = 0;
        while ((gen = atomic_load_explicit(&g_gen, memory_order_acquire)) == seen) {
            if (++spins < SPINS) {
                CPU_RELAX();
                continue;
            }
            pthread_mutex_lock(&g_mu);
            atomic_fetch_add(&g_sleepers, 1);
            while (atomic_load(&g_gen) == seen) pthread_cond_wait(&g_wake, &g_mu);
            atomic_fetch_sub(&g_sleepers, 1);
            pthread_mutex_unlock(&g_mu);
            spins = 0;
        }
        seen = gen;
        if (tid < g_nth) {
            g_fn(g_arg, tid, g_nth);
            if (atomic_fetch_sub_explicit(&g_left, 1, memory_order_acq_rel) == 1) {
                pthread_mutex_lock(&g_mu);
                pthread_cond_signal(&g_done_cv);
                pthread_mutex_unlock(&g_mu);
            }
        }
    }
    return NULL; /* not reached: workers live as long as the process */
}

static int start_workers(int n) { /* tids 1..n-1; returns how many threads a call can use */
    for (int i = g_started + 1; i < n; i++) {
        g_gen0[i] = atomic_load(&g_gen);
        if (pthread_create(&g_thr[i], NULL, worker, (void *)(intptr_t)i)) break;
        g_started = i;
    }
    return g_started + 1;
}

static void after_fork_child(void) {
    g_started = 0; /* the parent's workers do not exist here */
    pthread_mutex_init(&g_run, NULL);
    pthread_mutex_init(&g_mu, NULL);
    pthread_cond_init(&g_wake, NULL);
    pthread_cond_init(&g_done_cv, NULL);
    atomic_store(&g_sleepers, 0);
    atomic_store(&g_left, 0);
}

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static void init_once(void) { pthread_atfork(NULL, NULL, after_fork_child); }

int fl_pool_run(fl_task fn, void *arg, int nth) {
    pthread_once(&g_once, init_once);
    if (nth <= 1 || pthread_mutex_trylock(&g_run)) {
        fn(arg, 0, 1);
        return 1;
    }
    if (nth > g_started + 1) {
        const int avail = start_workers(nth);
        nth = nth < avail ? nth : avail;
    }
    if (nth <= 1) {
        pthread_mutex_unlock(&g_run);
        fn(arg, 0, 1);
        return 1;
    }
    g_fn = fn;
    g_arg = arg;
    g_nth = nth;
    atomic_store(&g_left, nth - 1);
    atomic_fetch_add(&g_gen, 1); /* seq_cst: ordered before the g_sleepers load below */
    if (atomic_load(&g_sleepers)) {
        pthread_mutex_lock(&g_mu);
        pthread_cond_broadcast(&g_wake);
        pthread_mutex_unlock(&g_mu);
    }
    fn(arg, 0, nth);
    int spins = 0;
    while (atomic_load_explicit(&g_left, memory_order_acquire)) {
        if (++spins < SPINS) {
            CPU_RELAX();
            continue;
        }
        pthread_mutex_lock(&g_mu);
        while (atomic_load(&g_left)) pthread_cond_wait(&g_done_cv, &g_mu);
        pthread_mutex_unlock(&g_mu);
    }
    pthread_mutex_unlock(&g_run);
    return nth;
}

int fl_pool_set_size(int n) {
    pthread_once(&g_once, init_once);
    n = n < 1 ? 1 : (n > FL_MAX_THREADS ? FL_MAX_THREADS : n);
    pthread_mutex_lock(&g_run);
    const int old = g_size;
    g_size = n; /* workers past n stay, asleep after their spin, for the next larger size */
    pthread_mutex_unlock(&g_run);
    return old;
}

int fl_pool_size(void) { return g_size; }

#else /* no POSIX threads: every call on the calling thread */

static int g_size = 1;
int fl_pool_run(fl_task fn, void *arg, int nth) {
    (void)nth;
    fn(arg, 0, 1);
    return 1;
}
int fl_pool_set_size(int n) {
    (void)n;
    return g_size;
}
int fl_pool_size(void) { return g_size; }

#endif
