// memcgscope's BPF side, compiled by bcc at run time.
//
// The handlers below are mode-independent; probes/program.py appends thin
// wrappers for the mode in use (fentry/fexit, kprobe/kretprobe, or
// tracepoints) and passes, as -D flags, the struct field offsets of the
// *running* kernel read from its BTF, so the headers bcc compiles against
// may be another version's (a host without matching headers uses the
// nearest Debian ones).
//
// Fast charges cost map updates only. A charge becomes an *episode* that
// crosses the ring buffer once it does something slow (a counter failure,
// a reclaim, a drain, an OOM) or fails; limit writes are always episodes.
//
// A page fault runs three of our programs: the charge core's entry and exit
// and the page charge's exit (the page charge has no entry program: its
// memcg, size and gfp are the charge core's, left per CPU at the core's
// exit). A fast charge reads no clock: 1 in LAT_SAMPLE is timed (counted
// LAT_SAMPLE times in the latency histogram and sum), and a charge that
// turns slow is timed from that moment on, exactly.

#include <uapi/linux/ptrace.h>
// (no linux/sched.h: task fields are read at BTF offsets; it only cost compile time)

#ifndef OFF_MEMCG_CSS_CGROUP
#error "memcgscope: struct offsets must be given as -D flags (probes/program.py)"
#endif

// Event types, reclaim callers, limit kinds and struct event_t come from
// probes/episodes.py, the one definition user space decodes with:
// @EVENT_LAYOUT@

struct task_ctx {
    // the charge in progress (outermost try_charge_memcg of this task)
    u64 charge_start;
    u64 charge_sp;    // its stack pointer at entry (see charge_is_stale)
    u64 charge_memcg;
    u64 charge_cgid;
    u64 charge_usage, charge_max, charge_memsw_usage, charge_memsw_max;
    u32 charge_gfp;
    u32 charge_nr;
    u32 charge_depth;
    u32 charge_emitted;
    // the limit write in progress
    u64 limit_start;
    u64 limit_memcg;
    u64 limit_cgid;
    u64 limit_value;
    u32 limit_kind;
    u32 limit_memsw;
    // the memcg reclaim in progress
    u64 reclaim_start;
    u64 reclaim_memcg;
    u64 reclaim_nr;
    u32 reclaim_gfp;
    u32 reclaim_opts;
    // mem_cgroup_handle_over_high in progress (memory.high throttling)
    u64 high_start;
    u64 high_memcg;
    u64 high_reclaim_ns;
    u64 high_penalty;  // the jiffies schedule_timeout_killable was asked to sleep
    u32 high_nr;
    u32 high_pad;
    // mem_cgroup_out_of_memory in progress
    u64 oom_start;
    u64 oom_memcg;
    u32 oom_gfp;
    u32 oom_order;
    // page_counter_try_charge in progress (inside a charge)
    u64 pc_counter;
    u64 pc_nr;
    u64 pc_fail_slot;
    // counter failures of a charge not (yet) slow: a batch that failed and
    // then fit after the shrink is a fast path and never crosses to user
    // space; if the charge turns slow they are sent before its next step
    u32 pend_n;
    u32 pend_dropped;
    struct event_t pend[2];
    // Run-length encoding of the OOM retry loop: an OOM step identical to
    // the last event sent for this task (same episode, memcg, gfp, order,
    // result and counters) is counted here, not sent; the count goes out
    // as one EV_REPEAT before the task's next event, or every REPEAT_FLUSH.
    // A memory.max write loops through hundreds of such passes; on kernels
    // without the superseded-limit break (5.10.262, 6.18.15) hundreds of
    // thousands a second, which no ring buffer holds.
    u64 rep_episode;  // the episode of the last OOM step sent; 0: no run open
    u64 rep_cgid;
    u64 rep_arg0, rep_arg1;
    s64 rep_ret;
    u64 rep_usage, rep_max, rep_memsw_usage, rep_memsw_max;
    u64 rep_ns;       // total duration of the repeats not yet sent
    u32 rep_n;        // repeats not yet sent
    u32 rep_caller;
};

// per-CPU, keyed by the memcg's address: a charge's fast path then costs
// no atomics and no pointer chase; cgid is filled once, on first use
struct charge_stat {
    u64 cgid;
    u64 calls;
    u64 pages;
    u64 slow;
    u64 fail_enomem;
    u64 fail_eintr;
    u64 fail_other;
    u64 ns;
};
struct hist_key { u64 cgid; u32 caller; u32 slot; };
struct lat_key { u64 memcg; u32 slot; u32 pad; };

// The charge (and page charge) open on this CPU, while it is a fast path.
// Most charges start and end here without touching the per-task map; a
// charge moves to `tasks` (promote) the moment it reaches
// page_counter_try_charge or anything slower, because from there it may
// sleep and migrate.
struct fast_ctx {
    u32 tid;
    u32 depth;
    u32 gfp;
    u32 nr;
    u64 start;        // 0: not timed (see LAT_SAMPLE)
    u64 sp;
    u64 memcg;
    u32 sampled;      // charges entered on this CPU, for LAT_SAMPLE
    // the last charge core call that returned on this CPU, for the page
    // charge's exit (its memcg, size and gfp); taken there once
    u32 last_tid;
    u64 last_memcg;
    u64 last_nr;
    u32 last_gfp;
    u32 last_pad;
};
struct reclaim_key { u64 cgid; u32 caller; u32 pad; };
struct reclaim_stat { u64 calls; u64 asked; u64 freed; u64 ns; };
struct limit_key { u64 cgid; u32 kind; s32 ret; };
// keyed by the OOM's memcg (the trigger) for invocations and kills, by the
// victim's own memcg for victims
struct oom_stat { u64 invocations; u64 returned_true; u64 kills; u64 victims; };
struct high_stat { u64 calls; u64 sleep_ns; u64 reclaim_ns; };
struct fail_key { u64 cgid; u32 counter; u32 pad; };
struct item_key { u64 cgid; u32 item; u32 pad; };
struct item_val { u64 count; s64 sum; };

BPF_HASH(tasks, u32, struct task_ctx, 16384);
BPF_PERCPU_HASH(charge_stats, u64, struct charge_stat, MAX_CGROUPS);
BPF_PERCPU_HASH(charge_lat, struct lat_key, u64, MAX_CGROUPS * 8);
BPF_PERCPU_HASH(page_charge_stats, u64, struct charge_stat, MAX_CGROUPS);
BPF_PERCPU_ARRAY(fast, struct fast_ctx, 1);
// charges whose fast context another task overwrote (preempted mid-charge)
BPF_PERCPU_ARRAY(ctx_lost, u64, 1);
BPF_HASH(reclaim_stats, struct reclaim_key, struct reclaim_stat, MAX_CGROUPS);
BPF_HASH(reclaim_lat, struct hist_key, u64, MAX_CGROUPS * 8);
BPF_HASH(limit_stats, struct limit_key, u64, MAX_CGROUPS);
BPF_HASH(oom_stats, u64, struct oom_stat, MAX_CGROUPS);
BPF_HASH(high_stats, u64, struct high_stat, MAX_CGROUPS);
BPF_HASH(high_lat, struct hist_key, u64, MAX_CGROUPS * 8);
BPF_HASH(counter_fails, struct fail_key, u64, MAX_CGROUPS);
BPF_HASH(memcg_events, struct item_key, struct item_val, MAX_CGROUPS * 16);
BPF_HASH(memcg_state, struct item_key, struct item_val, MAX_CGROUPS * 16);
BPF_PERCPU_ARRAY(lost, u64, 1);
// updates dropped because a map was full, per map (MAPIDX_* from program.py)
BPF_PERCPU_ARRAY(map_full, u64, NR_MAPIDX);
// per-task or per-CPU charge contexts found stale and reset
BPF_PERCPU_ARRAY(ctx_reset, u64, 1);
// [0] the event being built, [1] an EV_REPEAT sent ahead of it
BPF_PERCPU_ARRAY(scratch, struct event_t, 2);
BPF_PERCPU_ARRAY(zero_ctx, struct task_ctx, 1);

#ifdef USE_PERF_BUFFER
BPF_PERF_OUTPUT(events);
#else
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#endif

// fentry/fexit arguments. bpf_get_func_arg / bpf_get_func_ret (helpers 183,
// 184, Linux 5.17+: kernel/trace/bpf_trace.c) by number, as the headers bcc
// compiles against may predate them. Before 5.17 (Debian 5.10) the
// trampoline's saved arguments are read as memory: ctx[i] holds argument i
// and, in fexit, ctx[nr_args] the return value (arch/x86/net/bpf_jit_comp.c
// save_regs); a typed read of ctx[i] would be refused for pointer-to-pointer
// arguments ("arg2 type PTR is not a struct", kernel/bpf/btf.c btf_ctx_access).
#ifdef HAVE_GET_FUNC_ARG
static long (*mcs_get_func_arg)(void *ctx, u32 n, u64 *value) = (void *)183;
static long (*mcs_get_func_ret)(void *ctx, u64 *value) = (void *)184;
#define MCS_ARG(ctx, i, v) mcs_get_func_arg(ctx, i, v)
#define MCS_RET(ctx, n, v) mcs_get_func_ret(ctx, v)
#else
#define MCS_ARG(ctx, i, v) bpf_probe_read_kernel(v, sizeof(u64), (void *)(ctx) + 8 * (i))
#define MCS_RET(ctx, n, v) bpf_probe_read_kernel(v, sizeof(u64), (void *)(ctx) + 8 * (n))
#endif

static __always_inline u64 read_u64(u64 addr) {
    u64 v = 0;
    if (addr)
        bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

// memcg->css.cgroup->kn->id: the cgroup's inode number in its hierarchy
static __always_inline u64 memcg_cgid(u64 memcg) {
    u64 cgroup = read_u64(memcg + OFF_MEMCG_CSS_CGROUP);
    u64 kn = read_u64(cgroup + OFF_CGROUP_KN);
    return read_u64(kn + OFF_KN_ID);
}

static __always_inline void memcg_counters(u64 memcg, struct event_t *e) {
    e->usage = read_u64(memcg + OFF_MEMCG_MEMORY + OFF_PC_USAGE);
    e->max = read_u64(memcg + OFF_MEMCG_MEMORY + OFF_PC_MAX);
#ifdef HAVE_MEMSW
    e->memsw_usage = read_u64(memcg + OFF_MEMCG_MEMSW + OFF_PC_USAGE);
    e->memsw_max = read_u64(memcg + OFF_MEMCG_MEMSW + OFF_PC_MAX);
#endif
}

// current->cgroups->subsys[memory_cgrp_id]: the task's memcg (its css is
// the memcg's first member)
static __always_inline u64 task_memcg(void) {
    u64 task = bpf_get_current_task();
    u64 cset = read_u64(task + OFF_TASK_CGROUPS);
    return read_u64(cset + OFF_CSS_SET_SUBSYS + 8 * MEMORY_CGRP_ID);
}

static __always_inline void map_full_add(u32 idx) {
    u64 *n = map_full.lookup(&idx);
    if (n) (*n)++;
}

static __always_inline void count_ctx_reset(void) {
    u32 zero = 0;
    u64 *n = ctx_reset.lookup(&zero);
    if (n) (*n)++;
}

// The kernel stack of the current task: [task->stack, + THREAD_SIZE).
// THREAD_SIZE is 16 KiB on x86_64 and arm64 without KASAN (Debian's
// builds); with KASAN it is larger, and frames beyond 16 KiB are then taken
// for another stack, which only disables the stale check below.
#ifndef THREAD_SIZE
#define THREAD_SIZE 16384
#endif
#ifndef LAT_SAMPLE
#define LAT_SAMPLE 64
#endif
#ifndef REPEAT_FLUSH
#define REPEAT_FLUSH 65536
#endif
static __always_inline int on_task_stack(u64 sp) {
    if (!sp)
        return 0;   // no stack pointer given (fentry): the check is off
    u64 base = read_u64(bpf_get_current_task() + OFF_TASK_STACK);
    return base && sp - base < THREAD_SIZE;
}

// An open charge of this task is still running only if the new entry is
// nested in it: deeper on the same stack. On the task stack and not deeper,
// the open charge's return was never seen (a kretprobe that found all its
// instances taken, KRETPROBE_MAXACTIVE): it would make every later charge
// of the task look nested and go uncounted, so it is dropped. An entry on
// another stack (an interrupt's charge) is nested.
static __always_inline int charge_is_stale(u64 sp, u64 open_sp) {
    return on_task_stack(sp) && on_task_stack(open_sp) && sp >= open_sp;
}

static __always_inline u32 log2l(u64 v) {
    u32 r = 0;
    #pragma unroll
    for (int i = 0; i < 6; i++) {
        u32 shift = 32 >> i;
        if (v >> shift) { v >>= shift; r += shift; }
    }
    return r < HIST_SLOTS ? r : HIST_SLOTS - 1;
}

static __always_inline void reclaim_hist_add(u64 cgid, u32 caller, u64 ns) {
    struct hist_key k = {.cgid = cgid, .caller = caller, .slot = log2l(ns)};
    u64 zero = 0, *v = reclaim_lat.lookup_or_try_init(&k, &zero);
    if (v)
        __sync_fetch_and_add(v, 1);
    else
        map_full_add(MAPIDX_RECLAIM_LAT);
}

// An event of this task in scratch slot `slot`, its header filled.
static __always_inline struct event_t *event_in(u32 slot, u32 type) {
    struct event_t *e = scratch.lookup(&slot);
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    u64 id = bpf_get_current_pid_tgid();
    e->type = type;
    e->cpu = bpf_get_smp_processor_id();
    e->pid = id >> 32;
    e->tid = (u32)id;
    e->ts = bpf_ktime_get_ns();
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    return e;
}

static __always_inline struct event_t *new_event(u32 type) {
    return event_in(0, type);
}

static __always_inline void submit(void *ctx, struct event_t *e) {
    int err;
#ifdef USE_PERF_BUFFER
    err = events.perf_submit(ctx, e, sizeof(*e));
#else
    err = events.ringbuf_output(e, sizeof(*e), 0);
#endif
    if (err) {
        u32 zero = 0;
        u64 *n = lost.lookup(&zero);
        if (n) (*n)++;
    }
}

// The repeats of the task's last OOM step, sent as one EV_REPEAT.
static __always_inline void repeat_flush(void *ctx, struct task_ctx *c) {
    if (!c->rep_n)
        return;
    // slot 1 (slot 0 holds the event being built) only ever holds an
    // EV_REPEAT and these are its only fields: the rest stay zero, so there
    // is no clearing or comm to pay at each of emit()'s inlined copies
    u32 one = 1;
    struct event_t *r = scratch.lookup(&one);
    if (r) {
        u64 id = bpf_get_current_pid_tgid();
        r->type = EV_REPEAT;
        r->pid = id >> 32;
        r->tid = (u32)id;
        r->ts = bpf_ktime_get_ns();
        r->episode = c->rep_episode;
        r->cgid = c->rep_cgid;
        r->arg0 = c->rep_n;
        r->duration_ns = c->rep_ns;
        submit(ctx, r);
    }
    c->rep_n = 0;
    c->rep_ns = 0;
}

// Sends an event that no OOM step of its own episode can precede: an
// episode's start (charge_mark_slow with its pending failures, a limit
// write's or memory.high's entry), memory.high's exit (its episode never
// OOMs), a drain (once per loop, before its first OOM: try_charge_memcg and
// memory_max_write drain on the first pass without room; the v1 resize
// loop never OOMs), a page charge's failure (after its charge's exit) and
// the tracepoint reclaim (tracepoint mode has no OOM steps).  The
// assembler finds an EV_REPEAT's episode by its id, so other episodes'
// events may come between an OOM step and its repeats.
static __always_inline void emit(void *ctx, struct event_t *e) {
    submit(ctx, e);
}

// Sends an event that may follow an OOM step of its episode (a retry's
// counter failure or reclaim, the next OOM's kill or a different OOM step,
// the episode's exit): the repeats its task still holds go first, and
// their run ends.  Only these few sites carry the flush (each is inlined).
static __always_inline void emit_step(void *ctx, struct event_t *e, struct task_ctx *c) {
    if (c && e->episode && c->rep_episode) {   // c: none for a kill outside a charge
        repeat_flush(ctx, c);
        c->rep_episode = 0;
    }
    submit(ctx, e);
}

static __always_inline struct task_ctx *get_ctx(u32 tid, int create) {
    struct task_ctx *c = tasks.lookup(&tid);
    if (c || !create)
        return c;
    u32 zero = 0;
    struct task_ctx *z = zero_ctx.lookup(&zero);
    if (!z)
        return 0;
    tasks.update(&tid, z);
    c = tasks.lookup(&tid);
    if (!c)
        map_full_add(MAPIDX_TASKS);
    return c;
}

static __always_inline void maybe_free_ctx(u32 tid, struct task_ctx *c) {
    if (!c->charge_depth && !c->limit_start && !c->reclaim_start && !c->oom_start && !c->high_start)
        tasks.delete(&tid);
}

static __always_inline u32 current_tid(void) { return (u32)bpf_get_current_pid_tgid(); }

// The episode a nested event belongs to: the charge if one runs, else
// the limit write.
static __always_inline u64 episode_of(struct task_ctx *c) {
    if (c->charge_depth)
        return c->charge_start;
    if (c->high_start)
        return c->high_start;
    return c->limit_start;
}

static __always_inline u32 caller_of(struct task_ctx *c) {
    if (c->high_start)
        return CALLER_HIGH;   // memory.high reclaim, on return to user or inside a charge (6.1+)
    if (c->charge_depth)
        return CALLER_CHARGE;
    if (c->limit_start) {
        if (c->limit_kind == LIMIT_RESIZE_MAX) return CALLER_V1_LIMIT;
        if (c->limit_kind == LIMIT_MEMORY_MAX) return CALLER_V2_MAX;
        return CALLER_V2_HIGH;
    }
    return CALLER_OTHER;
}

// A charge turns slow: send its entry once, so user space sees the
// episode's start before its nested steps.
static __always_inline void charge_mark_slow(void *ctx, struct task_ctx *c) {
    if (!c->charge_depth || c->charge_emitted)
        return;
    c->charge_emitted = 1;
    struct event_t *e = new_event(EV_CHARGE_ENTER);
    if (!e)
        return;
    e->ts = c->charge_start;
    e->episode = c->charge_start;
    e->cgid = c->charge_cgid;
    e->arg0 = c->charge_gfp;
    e->arg1 = c->charge_nr;
    e->usage = c->charge_usage;
    e->max = c->charge_max;
    e->memsw_usage = c->charge_memsw_usage;
    e->memsw_max = c->charge_memsw_max;
    emit(ctx, e);
    u32 n = c->pend_n;
    if (n > 0) emit(ctx, &c->pend[0]);
    if (n > 1) emit(ctx, &c->pend[1]);
    c->pend_n = 0;
}

static __always_inline struct fast_ctx *fast_slot(void) {
    u32 zero = 0;
    return fast.lookup(&zero);
}

// The charge core call that just returned, left on this CPU for the page
// charge's exit, which follows without a sleep between (charge_memcg
// returns try_charge's result; on_page_charge_exit takes it once).
static __always_inline void note_last_charge(struct fast_ctx *f, u32 tid, u64 memcg, u64 nr, u32 gfp) {
    f->last_tid = tid;
    f->last_memcg = memcg;
    f->last_nr = nr;
    f->last_gfp = gfp;
}

// per-CPU values: plain increments. `weight`: how many charges this
// duration stands for (LAT_SAMPLE for a sampled fast charge, 1 for a slow
// one, 0 for a charge not timed)
static __always_inline void charge_account(int page, u64 memcg, u64 pages, u64 ns, s64 ret, int slow,
                                           u32 weight) {
    struct charge_stat zero = {};
    struct charge_stat *s = page ? page_charge_stats.lookup_or_try_init(&memcg, &zero)
                                 : charge_stats.lookup_or_try_init(&memcg, &zero);
    if (!s) {
        map_full_add(page ? MAPIDX_PAGE_CHARGE_STATS : MAPIDX_CHARGE_STATS);
        return;
    }
    if (!s->cgid && memcg)
        s->cgid = memcg_cgid(memcg);
    s->calls++;
    s->pages += pages;
    s->ns += ns * weight;
    if (slow) s->slow++;
    if (ret == -12) s->fail_enomem++;
    else if (ret == -4) s->fail_eintr++;
    else if (ret) s->fail_other++;
    if (!page && weight) {
        struct lat_key k = {.memcg = memcg, .slot = log2l(ns)};
        u64 z = 0, *v = charge_lat.lookup_or_try_init(&k, &z);
        if (v) (*v) += weight;
        else map_full_add(MAPIDX_CHARGE_LAT);
    }
}

// Moves this task's fast charge (and page charge) on this CPU to its
// per-task context; returns that context (created when `create`).
static __always_inline struct task_ctx *promote(u32 tid, int create) {
    struct fast_ctx *f = fast_slot();
    int moving = f && f->tid == tid && f->depth;
    struct task_ctx *c = get_ctx(tid, create || moving);
    if (!c || !f || !moving)
        return c;
    if (f->tid == tid && f->depth) {
        if (c->charge_depth) {
            c->charge_depth += f->depth;
        } else {
            c->charge_depth = f->depth;
            // not sampled at entry: timed from here, the moment it turned slow
            c->charge_start = f->start ? f->start : bpf_ktime_get_ns();
            c->charge_sp = f->sp;
            c->charge_memcg = f->memcg;
            c->charge_cgid = memcg_cgid(f->memcg);
            c->charge_gfp = f->gfp;
            c->charge_nr = f->nr;
            c->charge_emitted = 0;
            c->pend_n = 0;
            // read before the first counter attempt: the state at entry
            struct event_t tmp = {};
            memcg_counters(f->memcg, &tmp);
            c->charge_usage = tmp.usage;
            c->charge_max = tmp.max;
            c->charge_memsw_usage = tmp.memsw_usage;
            c->charge_memsw_max = tmp.memsw_max;
        }
        f->tid = 0;
        f->depth = 0;
    }
    return c;
}

static __always_inline void reclaim_account(u64 cgid, u32 caller, u64 asked, u64 freed, u64 ns) {
    struct reclaim_key k = {.cgid = cgid, .caller = caller};
    struct reclaim_stat zero = {}, *s = reclaim_stats.lookup_or_try_init(&k, &zero);
    if (s) {
        __sync_fetch_and_add(&s->calls, 1);
        __sync_fetch_and_add(&s->asked, asked);
        __sync_fetch_and_add(&s->freed, freed);
        __sync_fetch_and_add(&s->ns, ns);
    } else {
        map_full_add(MAPIDX_RECLAIM_STATS);
    }
    reclaim_hist_add(cgid, caller, ns);
}

// ---- the charge core: try_charge_memcg (try_charge on 5.10) ----

static __always_inline void on_charge_enter(void *ctx, u64 memcg, u32 gfp, u32 nr, u64 sp) {
    u32 tid = current_tid();
    struct task_ctx *c = tasks.lookup(&tid);
    if (c && c->charge_depth) {
        if (!charge_is_stale(sp, c->charge_sp)) {
            c->charge_depth++;  // nested in a slow charge (reclaim allocating): counted in the outer one
            return;
        }
        count_ctx_reset();
        c->charge_depth = 0;
        c->charge_start = 0;
        c->charge_memcg = 0;
        c->pend_n = 0;
    }
    struct fast_ctx *f = fast_slot();
    if (!f)
        return;
    if (f->depth && f->tid == tid) {
        if (!charge_is_stale(sp, f->sp)) {
            f->depth++;  // nested on this CPU (an interrupt's charge): counted in the outer one
            return;
        }
        count_ctx_reset();
        f->depth = 0;
    }
    if (f->depth) {
        u32 zero = 0;
        u64 *n = ctx_lost.lookup(&zero);
        if (n) (*n)++;
    }
    f->tid = tid;
    f->depth = 1;
    // no clock read on most charges: 1 in LAT_SAMPLE is timed
    f->start = (++f->sampled % LAT_SAMPLE) ? 0 : bpf_ktime_get_ns();
    f->sp = sp;
    f->memcg = memcg;
    f->gfp = gfp;
    f->nr = nr;
}

static __always_inline void on_charge_exit(void *ctx, s64 ret) {
    u32 tid = current_tid();
    struct fast_ctx *f = fast_slot();
    if (f && f->depth && f->tid == tid) {
        if (f->depth > 1) {
            f->depth--;
            return;
        }
        if (!ret) {
            // the fast path: a stock hit or a counter charge that fit
            u64 ns = f->start ? bpf_ktime_get_ns() - f->start : 0;
            charge_account(0, f->memcg, f->nr, ns, 0, 0, f->start ? LAT_SAMPLE : 0);
            note_last_charge(f, tid, f->memcg, f->nr, f->gfp);
            f->depth = 0;
            f->tid = 0;
            return;
        }
        promote(tid, 1);  // an error is always an episode
    }
    struct task_ctx *c = get_ctx(tid, 0);
    if (!c || !c->charge_depth)
        return;
    if (c->charge_depth > 1) {
        c->charge_depth--;
        return;
    }
    // depth stays 1 until the end: charge_mark_slow needs an open charge
    u64 ns = bpf_ktime_get_ns() - c->charge_start;
    u64 cgid = c->charge_cgid;
    if (ret) {
        charge_mark_slow(ctx, c);
    } else if (!c->charge_emitted && c->pend_n) {
        // success after a failure at the full size without reclaim: only a
        // forced charge does that (PF_MEMALLOC; __GFP_ATOMIC up to 6.0;
        // __GFP_HIGH/NOFAIL from 6.1), and it may leave usage above max
        u64 asked = c->pend_n > 1 ? c->pend[1].arg1 : c->pend[0].arg1;
        if (asked == c->charge_nr)
            charge_mark_slow(ctx, c);
    }
    charge_account(0, c->charge_memcg, c->charge_nr, ns, ret, c->charge_emitted, 1);
    struct fast_ctx *lf = fast_slot();
    if (lf)
        note_last_charge(lf, tid, c->charge_memcg, c->charge_nr, c->charge_gfp);
    if (c->charge_emitted) {
        struct event_t *e = new_event(EV_CHARGE_EXIT);
        if (e) {
            e->episode = c->charge_start;
            e->cgid = cgid;
            e->arg0 = c->charge_gfp;
            e->arg1 = c->charge_nr;
            e->ret = ret;
            e->duration_ns = ns;
            memcg_counters(c->charge_memcg, e);
            emit_step(ctx, e, c);
        }
    }
    c->charge_depth = 0;
    c->charge_start = 0;
    c->charge_memcg = 0;
    maybe_free_ctx(tid, c);
}

// ---- page_counter_try_charge: which level failed (inside a charge) ----

static __always_inline void on_pc_try_charge_enter(void *ctx, u64 counter, u64 nr, u64 fail_slot) {
    struct task_ctx *c = promote(current_tid(), 0);
    if (!c || !c->charge_depth)
        return;
    c->pc_counter = counter;
    c->pc_nr = nr;
    c->pc_fail_slot = fail_slot;
}

static __always_inline void on_pc_try_charge_exit(void *ctx, u64 ok) {
    struct task_ctx *c = get_ctx(current_tid(), 0);
    if (!c || !c->charge_depth || !c->pc_fail_slot)
        return;
    u64 slot = c->pc_fail_slot;
    c->pc_fail_slot = 0;
    if (ok & 0xff)
        return;
    u64 failed = read_u64(slot);
    // the leaf counter tells which hierarchy: memory or (v1) memsw
    u32 which = (c->pc_counter == c->charge_memcg + OFF_MEMCG_MEMORY) ? 0 : 1;
    u64 memcg = failed - (which ? OFF_MEMCG_MEMSW : OFF_MEMCG_MEMORY);
    struct event_t *e = new_event(EV_COUNTER_FAIL);
    if (!e)
        return;
    e->episode = c->charge_start;
    e->cgid = memcg_cgid(memcg);
    e->arg0 = which;
    e->arg1 = c->pc_nr;
    memcg_counters(memcg, e);
    struct fail_key k = {.cgid = e->cgid, .counter = which};
    u64 zero = 0, *v = counter_fails.lookup_or_try_init(&k, &zero);
    if (v) __sync_fetch_and_add(v, 1);
    else map_full_add(MAPIDX_COUNTER_FAILS);
    if (c->charge_emitted) {
        emit_step(ctx, e, c);
        return;
    }
    u32 n = c->pend_n;
    if (n == 0) {
        __builtin_memcpy(&c->pend[0], e, sizeof(*e));
        c->pend_n = 1;
    } else if (n == 1) {
        __builtin_memcpy(&c->pend[1], e, sizeof(*e));
        c->pend_n = 2;
    } else {
        c->pend_dropped++;  // cannot happen in try_charge's loop: at most a batch and an nr failure come first
    }
}

// ---- try_to_free_mem_cgroup_pages ----

static __always_inline void on_reclaim_enter(void *ctx, u64 memcg, u64 nr, u32 gfp, u32 opts) {
    struct task_ctx *c = promote(current_tid(), 1);
    if (!c)
        return;
    charge_mark_slow(ctx, c);
    c->reclaim_start = bpf_ktime_get_ns();
    c->reclaim_memcg = memcg;
    c->reclaim_nr = nr;
    c->reclaim_gfp = gfp;
    c->reclaim_opts = opts;
    if (c->limit_start && !c->limit_memcg)
        c->limit_memcg = memcg;  // memory.max/high writes: the target is the written cgroup
}

static __always_inline void on_reclaim_exit(void *ctx, u64 freed) {
    u32 tid = current_tid();
    struct task_ctx *c = get_ctx(tid, 0);
    if (!c || !c->reclaim_start)
        return;
    u64 ns = bpf_ktime_get_ns() - c->reclaim_start;
    struct event_t *e = new_event(EV_RECLAIM);
    u32 caller = caller_of(c);
    u64 cgid = memcg_cgid(c->reclaim_memcg);
    if (e) {
        e->episode = episode_of(c);
        e->cgid = cgid;
        e->arg0 = c->reclaim_nr;
        e->arg1 = c->reclaim_gfp;
        e->arg2 = c->reclaim_opts;
        e->ret = freed;
        e->duration_ns = ns;
        e->caller = caller;
        memcg_counters(c->reclaim_memcg, e);
        emit_step(ctx, e, c);
    }
    reclaim_account(cgid, caller, c->reclaim_nr, freed, ns);
    if (c->high_start)
        c->high_reclaim_ns += ns;
    c->reclaim_start = 0;
    maybe_free_ctx(tid, c);
}

// ---- mem_cgroup_handle_over_high (__mem_cgroup_handle_over_high from
// 6.18): the reclaim a task over memory.high owes, then the penalty sleep
// (schedule_timeout_killable). Its memcg is the task's own (5.10/6.12:
// get_mem_cgroup_from_mm(current->mm)); the debt is
// current->memcg_nr_pages_over_high. The sleep is the call's time minus
// its reclaims'. ----

static __always_inline void high_counters(u64 memcg, struct event_t *e) {
    memcg_counters(memcg, e);
    // v2 has no memsw: its slot carries memory.high (page_counter.high)
    e->memsw_max = read_u64(memcg + OFF_MEMCG_MEMORY + OFF_PC_HIGH);
}

static __always_inline void on_high_enter(void *ctx) {
    u64 task = bpf_get_current_task();
    u32 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), (void *)(task + OFF_TASK_OVER_HIGH));
    if (!nr)
        return;   // called on every notify-resume (5.10, 6.1-6.12): nothing owed, nothing done
    struct task_ctx *c = promote(current_tid(), 1);
    if (!c)
        return;
    charge_mark_slow(ctx, c);
    c->high_start = bpf_ktime_get_ns();
    c->high_memcg = task_memcg();
    c->high_reclaim_ns = 0;
    c->high_penalty = 0;
    c->high_nr = nr;
    if (c->charge_depth)
        return;   // the synchronous call inside a charge (6.1+): steps of that charge
    struct event_t *e = new_event(EV_HIGH_ENTER);
    if (!e)
        return;
    e->ts = c->high_start;
    e->episode = c->high_start;
    e->cgid = memcg_cgid(c->high_memcg);
    e->arg0 = nr;
    high_counters(c->high_memcg, e);
    emit(ctx, e);
}

static __always_inline void on_high_exit(void *ctx) {
    u32 tid = current_tid();
    struct task_ctx *c = get_ctx(tid, 0);
    if (!c || !c->high_start)
        return;
    u64 ns = bpf_ktime_get_ns() - c->high_start;
    u64 sleep = ns > c->high_reclaim_ns ? ns - c->high_reclaim_ns : 0;
    u64 cgid = memcg_cgid(c->high_memcg);
    struct high_stat zero = {}, *s = high_stats.lookup_or_try_init(&cgid, &zero);
    if (s) {
        __sync_fetch_and_add(&s->calls, 1);
        __sync_fetch_and_add(&s->sleep_ns, sleep);
        __sync_fetch_and_add(&s->reclaim_ns, c->high_reclaim_ns);
    } else {
        map_full_add(MAPIDX_HIGH_STATS);
    }
    if (sleep) {
        struct hist_key k = {.cgid = cgid, .caller = CALLER_HIGH, .slot = log2l(sleep)};
        u64 z = 0, *v = high_lat.lookup_or_try_init(&k, &z);
        if (v) __sync_fetch_and_add(v, 1);
        else map_full_add(MAPIDX_HIGH_LAT);
    }
    if (!c->charge_depth) {
        struct event_t *e = new_event(EV_HIGH_EXIT);
        if (e) {
            e->episode = c->high_start;
            e->cgid = cgid;
            e->arg0 = c->high_nr;
            e->arg1 = sleep;
            e->arg2 = c->high_penalty;
            e->duration_ns = ns;
            high_counters(c->high_memcg, e);
            emit(ctx, e);
        }
    }
    c->high_start = 0;
    c->high_memcg = 0;
    maybe_free_ctx(tid, c);
}

// schedule_timeout_killable(timeout) inside the handler: the penalty the
// kernel computed (calculate_high_delay over the worst level), in jiffies
static __always_inline void on_high_sleep(void *ctx, u64 timeout) {
    u32 tid = current_tid();
    struct task_ctx *c = tasks.lookup(&tid);
    if (c && c->high_start)
        c->high_penalty = timeout;
}

// ---- drain_all_stock ----

static __always_inline void on_drain(void *ctx, u64 memcg, int args_valid) {
    struct task_ctx *c = promote(current_tid(), 0);
    if (c)
        charge_mark_slow(ctx, c);
    struct event_t *e = new_event(EV_DRAIN);
    if (!e)
        return;
    e->episode = c ? episode_of(c) : 0;
    e->cgid = args_valid ? memcg_cgid(memcg) : 0;
    e->caller = c ? caller_of(c) : CALLER_OTHER;
    emit(ctx, e);
}

// ---- mem_cgroup_out_of_memory ----

static __always_inline void on_oom_enter(void *ctx, u64 memcg, u32 gfp, u32 order) {
    struct task_ctx *c = promote(current_tid(), 1);
    if (!c)
        return;
    charge_mark_slow(ctx, c);
    c->oom_start = bpf_ktime_get_ns();
    c->oom_memcg = memcg;
    c->oom_gfp = gfp;
    c->oom_order = order;
}

static __always_inline void on_oom_exit(void *ctx, u64 ret) {
    u32 tid = current_tid();
    struct task_ctx *c = get_ctx(tid, 0);
    if (!c || !c->oom_start)
        return;
    u64 cgid = memcg_cgid(c->oom_memcg);
    struct event_t *e = new_event(EV_OOM);
    if (e) {
        e->episode = episode_of(c);
        e->cgid = cgid;
        e->arg0 = c->oom_gfp;
        e->arg1 = c->oom_order;
        e->ret = ret & 0xff;
        e->duration_ns = bpf_ktime_get_ns() - c->oom_start;
        e->caller = caller_of(c);
        memcg_counters(c->oom_memcg, e);
        if (e->episode && c->rep_episode == e->episode && c->rep_cgid == e->cgid && c->rep_arg0 == e->arg0
            && c->rep_arg1 == e->arg1 && c->rep_ret == e->ret && c->rep_caller == e->caller
            && c->rep_usage == e->usage && c->rep_max == e->max && c->rep_memsw_usage == e->memsw_usage
            && c->rep_memsw_max == e->memsw_max) {
            // the same pass again: counted, not sent
            c->rep_n++;
            c->rep_ns += e->duration_ns;
            if (c->rep_n >= REPEAT_FLUSH)
                repeat_flush(ctx, c);   // an endless loop still shows progress
        } else {
            emit_step(ctx, e, c);
            if (e->episode) {
                c->rep_episode = e->episode;
                c->rep_cgid = e->cgid;
                c->rep_arg0 = e->arg0;
                c->rep_arg1 = e->arg1;
                c->rep_ret = e->ret;
                c->rep_caller = e->caller;
                c->rep_usage = e->usage;
                c->rep_max = e->max;
                c->rep_memsw_usage = e->memsw_usage;
                c->rep_memsw_max = e->memsw_max;
                c->rep_n = 0;
                c->rep_ns = 0;
            }
        }
    }
    struct oom_stat zero = {}, *s = oom_stats.lookup_or_try_init(&cgid, &zero);
    if (s) {
        __sync_fetch_and_add(&s->invocations, 1);
        if (ret & 0xff) __sync_fetch_and_add(&s->returned_true, 1);
    } else {
        map_full_add(MAPIDX_OOM_STATS);
    }
    c->oom_start = 0;
    maybe_free_ctx(tid, c);
}

// ---- oom:mark_victim (every mode): the kill is the trigger's — the memcg
// whose OOM runs on this task, else the task's own memcg — and the victim,
// when the tracepoint hands over its task (TP_PROTO(struct task_struct
// *task, uid_t uid), include/trace/events/oom.h; read as a raw tracepoint),
// is named by its own memcg, pid and comm ----

static __always_inline u64 memcg_of_task(u64 task) {
    u64 cset = read_u64(task + OFF_TASK_CGROUPS);
    return read_u64(cset + OFF_CSS_SET_SUBSYS + 8 * MEMORY_CGRP_ID);
}

static __always_inline void on_mark_victim(void *ctx, u32 victim_pid, u64 victim) {
    struct task_ctx *c = get_ctx(current_tid(), 0);
    u64 memcg = (c && c->oom_start) ? c->oom_memcg : task_memcg();
    struct event_t *e = new_event(EV_OOM_KILL);
    if (!e)
        return;
    e->episode = c ? episode_of(c) : 0;
    e->cgid = memcg_cgid(memcg);
    u64 vcgid = 0;
    if (victim) {
        u32 pid = 0;
        bpf_probe_read_kernel(&pid, sizeof(pid), (void *)(victim + OFF_TASK_PID));
        victim_pid = pid;
        vcgid = memcg_cgid(memcg_of_task(victim));
        bpf_probe_read_kernel(&e->data, 16, (void *)(victim + OFF_TASK_COMM));
    }
    e->arg0 = victim_pid;
    e->arg1 = vcgid;
    e->flags = ((c && c->oom_start) ? 1 : 0) | (victim ? 2 : 0);
    u64 cgid = e->cgid;
    emit_step(ctx, e, c);
    struct oom_stat zero = {}, *s = oom_stats.lookup_or_try_init(&cgid, &zero);
    if (s)
        __sync_fetch_and_add(&s->kills, 1);
    else
        map_full_add(MAPIDX_OOM_STATS);
    if (vcgid) {
        struct oom_stat vzero = {}, *v = oom_stats.lookup_or_try_init(&vcgid, &vzero);
        if (v)
            __sync_fetch_and_add(&v->victims, 1);
        else
            map_full_add(MAPIDX_OOM_STATS);
    }
}

// ---- limit writes: mem_cgroup_resize_max (v1), memory_max_write and
// memory_high_write (v2) ----

static __always_inline void on_limit_enter(void *ctx, u32 kind, u64 memcg, u64 cgid, u64 value,
                                           u32 memsw, const char *buf) {
    struct task_ctx *c = get_ctx(current_tid(), 1);
    if (!c)
        return;
    c->limit_start = bpf_ktime_get_ns();
    c->limit_kind = kind;
    c->limit_memcg = memcg;
    c->limit_cgid = cgid;
    c->limit_value = value;
    c->limit_memsw = memsw;
    struct event_t *e = new_event(EV_LIMIT_ENTER);
    if (!e)
        return;
    e->ts = c->limit_start;
    e->episode = c->limit_start;
    e->cgid = cgid;
    e->arg0 = kind;
    e->arg1 = value;
    e->arg2 = memsw;
    if (memcg)
        memcg_counters(memcg, e);
    if (buf)
        bpf_probe_read_kernel_str(&e->data, sizeof(e->data), buf);
    emit(ctx, e);
}

static __always_inline void on_limit_exit(void *ctx, s64 ret) {
    u32 tid = current_tid();
    struct task_ctx *c = get_ctx(tid, 0);
    if (!c || !c->limit_start)
        return;
    struct event_t *e = new_event(EV_LIMIT_EXIT);
    u64 cgid = c->limit_cgid;
    if (e) {
        e->episode = c->limit_start;
        e->cgid = cgid;
        e->arg0 = c->limit_kind;
        e->arg1 = c->limit_value;
        e->arg2 = c->limit_memsw;
        e->ret = ret;
        e->duration_ns = bpf_ktime_get_ns() - c->limit_start;
        if (c->limit_memcg)
            memcg_counters(c->limit_memcg, e);
        e->flags = c->limit_memcg ? 1 : 0;  // counters valid
        emit_step(ctx, e, c);
    }
    // v2 writes return the byte count on success: count them as 0
    struct limit_key k = {.cgid = cgid, .kind = c->limit_kind, .ret = ret > 0 ? 0 : (s32)ret};
    u64 zero = 0, *v = limit_stats.lookup_or_try_init(&k, &zero);
    if (v) __sync_fetch_and_add(v, 1);
    else map_full_add(MAPIDX_LIMIT_STATS);
    c->limit_start = 0;
    c->limit_memcg = 0;
    maybe_free_ctx(tid, c);
}

// kernfs_open_file *of -> of->kn (the file) -> parent (the cgroup dir) -> id
static __always_inline u64 of_cgroup_id(u64 of) {
    u64 kn = read_u64(of + OFF_OF_KN);
    u64 parent = read_u64(kn + OFF_KN_PARENT);
    return read_u64(parent + OFF_KN_ID);
}

// ---- __mem_cgroup_charge (mem_cgroup_charge on 5.10): exit only ----
// The page charge's memcg, size and gfp are those of the charge core call
// inside it (5.10 mem_cgroup_charge -> try_charge(memcg, gfp_mask,
// nr_pages); 6.1-7.x __mem_cgroup_charge -> charge_memcg -> try_charge(memcg,
// gfp, folio_nr_pages(folio))), left per CPU at that call's exit. None
// there (the root memcg: 6.1+ try_charge returns before try_charge_memcg):
// counted under memcg 0, as before. Not timed. A charge core call of this
// task from an interrupt between two of its page charges could lend its
// memcg to a root page charge: root tasks' page counts only.

static __always_inline void on_page_charge_exit(void *ctx, s64 ret) {
    u32 tid = current_tid();
    u64 memcg = 0, pages = 0;
    u32 gfp = 0;
    struct fast_ctx *f = fast_slot();
    if (f && f->last_tid == tid) {
        memcg = f->last_memcg;
        pages = f->last_nr;
        gfp = f->last_gfp;
        f->last_tid = 0;
    }
    charge_account(1, memcg, pages, 0, ret, 0, 0);
    if (ret) {
        struct event_t *e = new_event(EV_PAGE_CHARGE_FAIL);
        if (e) {
            e->cgid = memcg ? memcg_cgid(memcg) : 0;
            e->arg0 = pages;
            e->arg1 = gfp;
            e->ret = ret;
            emit(ctx, e);
        }
    }
}

// ---- tracepoint mode: memcg reclaim by task, memcg:* activity ----

static __always_inline void on_tp_reclaim_begin(void *ctx, u32 gfp) {
    struct task_ctx *c = get_ctx(current_tid(), 1);
    if (!c)
        return;
    c->reclaim_start = bpf_ktime_get_ns();
    c->reclaim_gfp = gfp;
    c->reclaim_memcg = task_memcg();
}

static __always_inline void on_tp_reclaim_end(void *ctx, u64 freed) {
    u32 tid = current_tid();
    struct task_ctx *c = get_ctx(tid, 0);
    if (!c || !c->reclaim_start)
        return;
    u64 ns = bpf_ktime_get_ns() - c->reclaim_start;
    u64 cgid = memcg_cgid(c->reclaim_memcg);
    struct event_t *e = new_event(EV_TP_RECLAIM);
    if (e) {
        e->cgid = cgid;
        e->arg1 = c->reclaim_gfp;
        e->ret = freed;
        e->duration_ns = ns;
        e->caller = CALLER_UNKNOWN;
        memcg_counters(c->reclaim_memcg, e);
        emit(ctx, e);
    }
    reclaim_account(cgid, CALLER_UNKNOWN, 0, freed, ns);
    c->reclaim_start = 0;
    maybe_free_ctx(tid, c);
}

static __always_inline void item_add(int state, u64 cgid, u32 item, s64 val) {
    struct item_key k = {.cgid = cgid, .item = item};
    struct item_val zero = {}, *v = state ? memcg_state.lookup_or_try_init(&k, &zero)
                                          : memcg_events.lookup_or_try_init(&k, &zero);
    if (v) {
        __sync_fetch_and_add(&v->count, 1);
        __sync_fetch_and_add(&v->sum, val);
    } else {
        map_full_add(state ? MAPIDX_MEMCG_STATE : MAPIDX_MEMCG_EVENTS);
    }
}
