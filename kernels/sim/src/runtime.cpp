// The SIMT runtime: runs a kernel launch block by block, each block's threads as fibers on the
// calling OS thread, with real barrier and warp-collective semantics.
//
// Scheduling rule (what makes a missing barrier a wrong answer): a thread runs without
// interruption from one synchronisation point (block barrier, warp collective) to the next, and
// the scheduler always resumes the runnable thread of highest priority. Priorities are drawn
// afresh at the block's start and at every block barrier: a random order of the warps, and within
// each warp a random order of its lanes (seeded: every run is reproducible). So between two block
// barriers the first warp runs its whole phase before the second starts, and so on: the largest
// skew a GPU could show. A thread that reads shared memory another warp writes before the same
// barrier sees the value only if the writer's warp drew the higher priority (about half the
// blocks and phases, so in a multi-block launch a race shows in either direction), and a deleted
// end-of-loop barrier lets the first warp overwrite a tile the others have not read yet. Fresh
// shared memory holds NaN bytes, so reading what nobody wrote is loud too.
//
// Warp collectives (shuffles, mma.sync) are exchanges: every live lane of the warp publishes its
// operands and waits until all have; then each lane reads the others'. Records are
// double-buffered by the lane's collective count, so one switch per lane suffices: a lane can
// only reuse a buffer after the whole warp has passed the next collective, i.e. after every lane
// has read it.
//
// Everything lives in thread-local state: launches on different OS threads are independent
// (tests run in parallel), and one OS thread runs one block at a time, which is what makes a
// `static thread_local` variable one block's shared memory.
#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../include/minisam_sim.h"
#include "../include/minisam_sim_abi.h"
#include "../include/minisam_sim_module.h"
#include "fiber.h"

extern "C" const msim::Module* const msim_modules[];
extern "C" const size_t msim_module_count;

namespace msim {

thread_local const uint3* t_thread_idx MSIM_TLS = nullptr;
thread_local BlockCoords t_block MSIM_TLS = {};

namespace {

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kStaticSharedLimit = 48 * 1024;

enum class State { Runnable, AtBarrier, AtCollective, Done };

// A queued cp.async: lands in shared memory when its group is waited for.
struct PendingCopy {
    void* dst;
    const void* src;
    unsigned cp_size, src_size;
    unsigned group;  // kUncommitted until a commit_group
};
constexpr unsigned kUncommitted = ~0u;

struct Thread {
    FiberContext ctx;
    std::vector<PendingCopy> copies;
    unsigned committed_groups = 0;
    uint3 tid;
    unsigned linear = 0;
    State state = State::Done;
    unsigned collectives = 0;  // warp collectives this lane has entered
};

struct Warp {
    unsigned live = 0;         // lanes that exist and have not exited
    unsigned arrived[2] = {};  // per buffer parity: lanes that published into it
    unsigned char slots[2][32][kSlotBytes];
};

struct SharedVar {
    void* p;
    size_t bytes;
};

struct Launch {
    const KernelEntry* kernel = nullptr;
    void** params = nullptr;
    msim_options options{};
    std::string error;
    // Shared variables this launch has met, poisoned before every block.
    std::vector<SharedVar> shared;
    size_t shared_bytes = 0;
};

// Per-OS-thread simulator state; fibers and stacks are kept between launches.
struct Sim {
    FiberContext scheduler;
    std::vector<std::unique_ptr<FiberStack>> stacks;
    Thread threads[kMaxThreads];
    Warp warps[kMaxThreads / 32];
    unsigned nthreads = 0;
    // Priority order: by_rank[r] is the thread of rank r (0 = runs first), rank[t] its inverse;
    // no runnable thread ranks before `cursor`.
    unsigned by_rank[kMaxThreads];
    unsigned rank[kMaxThreads];
    unsigned cursor = 0;
    uint64_t phase = 0;
    uint64_t block_linear = 0;
    unsigned live = 0;
    unsigned at_barrier = 0;
    Thread* current = nullptr;
    Launch* launch = nullptr;

    ~Sim() {
        for (Thread& t : threads) fiber_release(t.ctx);
        fiber_release(scheduler);
    }
};

// The OS thread's simulator (fast access), owned by `sim()`'s thread-local holder: stacks and
// fibers are reused by every launch on the thread and unmapped when it ends.
thread_local Sim* t_sim MSIM_TLS = nullptr;

Sim& sim() {
    thread_local std::unique_ptr<Sim> owner;
    if (!t_sim) {
        owner.reset(new Sim);
        t_sim = owner.get();
    }
    return *t_sim;
}

std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void yield_to_scheduler() {
    Sim& s = sim();
    Thread* t = s.current;
    fiber_switch(t->ctx, s.scheduler);
}

// A fault the kernel cannot continue from (bad collective, ...): recorded, and the thread parks
// forever; the scheduler sees the error and abandons the launch.
[[noreturn]] void fail(const std::string& why) {
    Sim& s = sim();
    if (s.launch->error.empty()) {
        const Thread* t = s.current;
        s.launch->error = format("%s: block (%u,%u,%u) thread (%u,%u,%u): ", s.launch->kernel->name, t_block.block_idx.x, t_block.block_idx.y,
                                 t_block.block_idx.z, t->tid.x, t->tid.y, t->tid.z) +
                          why;
    }
    s.current->state = State::Done;
    for (;;) yield_to_scheduler();
}

// splitmix64: the priority generator (seeded per launch, block and phase).
uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Fisher-Yates over v[0..n) (forward and reverse orders are fixed permutations).
void permute(unsigned* v, unsigned n, uint32_t mode, uint64_t& state) {
    for (unsigned i = 0; i < n; ++i) v[i] = i;
    if (mode == MSIM_ORDER_FORWARD) return;
    if (mode == MSIM_ORDER_REVERSE) {
        std::reverse(v, v + n);
        return;
    }
    for (unsigned i = n; i > 1; --i) {
        state = mix(state);
        std::swap(v[i - 1], v[state % i]);
    }
}

// Draws the priorities of a new phase: warps in a random order, lanes in a random order within
// their warp.
void new_priorities(Sim& s) {
    uint64_t state = mix(s.launch->options.seed ^ mix(s.block_linear * 0x9e3779b97f4a7c15ull + s.phase++));
    const unsigned nwarps = (s.nthreads + 31) / 32;
    unsigned warp_order[kMaxThreads / 32], lane_order[32];
    permute(warp_order, nwarps, s.launch->options.order, state);
    unsigned r = 0;
    for (unsigned wi = 0; wi < nwarps; ++wi) {
        const unsigned w = warp_order[wi];
        const unsigned lanes = std::min(32u, s.nthreads - 32 * w);
        permute(lane_order, lanes, s.launch->options.order, state);
        for (unsigned l = 0; l < lanes; ++l) {
            s.by_rank[r] = 32 * w + lane_order[l];
            s.rank[32 * w + lane_order[l]] = r;
            ++r;
        }
    }
    s.cursor = 0;
}

void make_runnable(Sim& s, Thread& t) {
    t.state = State::Runnable;
    s.cursor = std::min(s.cursor, s.rank[t.linear]);
}

void release_barrier(Sim& s) {
    for (unsigned i = 0; i < s.nthreads; ++i)
        if (s.threads[i].state == State::AtBarrier) s.threads[i].state = State::Runnable;
    s.at_barrier = 0;
    new_priorities(s);
}

void complete_copy(const PendingCopy& c) {
    std::memcpy(c.dst, c.src, c.src_size);
    std::memset((char*)c.dst + c.src_size, 0, c.cp_size - c.src_size);
}

// Lands this thread's copies of committed groups older than `keep_after` (all copies when
// `everything`), in issue order.
void complete_copies(Thread& t, unsigned keep_after, bool everything) {
    std::vector<PendingCopy> still;
    for (const PendingCopy& c : t.copies) {
        if (everything || (c.group != kUncommitted && c.group < keep_after)) complete_copy(c);
        else still.push_back(c);
    }
    t.copies.swap(still);
}

void thread_exit(Sim& s, Thread* t) {
    // Copies still in flight land anyway, as on the GPU.
    complete_copies(*t, 0, true);
    Warp& w = s.warps[t->linear / 32];
    const unsigned bit = 1u << (t->linear % 32);
    if ((w.arrived[0] | w.arrived[1]) & ~bit) {
        fail("exited while lanes of its warp wait for it in a warp collective");
    }
    w.live &= ~bit;
    t->state = State::Done;
    --s.live;
    // Exited threads no longer count at a block barrier.
    if (s.at_barrier > 0 && s.at_barrier == s.live) release_barrier(s);
}

void fiber_entry(void* arg) {
    Thread* t = (Thread*)arg;
    Sim& s = sim();
    s.launch->kernel->invoke(s.launch->kernel->fn, s.launch->params);
    thread_exit(s, t);
    for (;;) yield_to_scheduler();
}

void poison(const SharedVar& v) { std::memset(v.p, 0xff, v.bytes); }

std::string describe_deadlock(const Sim& s) {
    unsigned barrier = 0, collective = 0;
    for (unsigned i = 0; i < s.nthreads; ++i) {
        barrier += s.threads[i].state == State::AtBarrier;
        collective += s.threads[i].state == State::AtCollective;
    }
    return format("%s: block (%u,%u,%u) deadlocked: %u threads wait at __syncthreads, %u in a warp collective whose other lanes never arrive",
                  s.launch->kernel->name, t_block.block_idx.x, t_block.block_idx.y, t_block.block_idx.z, barrier, collective);
}

// Runs one block to completion; false with launch->error set on a fault.
bool run_block(Sim& s, uint64_t block_linear) {
    Launch& L = *s.launch;
    for (const SharedVar& v : L.shared) poison(v);
    const dim3 bd = t_block.block_dim;
    s.live = s.nthreads;
    s.at_barrier = 0;
    for (unsigned w = 0; w < (s.nthreads + 31) / 32; ++w) {
        const unsigned lanes = std::min(32u, s.nthreads - 32 * w);
        s.warps[w].live = lanes == 32 ? ~0u : (1u << lanes) - 1;
        s.warps[w].arrived[0] = s.warps[w].arrived[1] = 0;
    }
    for (unsigned i = 0; i < s.nthreads; ++i) {
        Thread& t = s.threads[i];
        t.linear = i;
        t.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        t.state = State::Runnable;
        t.collectives = 0;
        t.copies.clear();
        t.committed_groups = 0;
        fiber_init(t.ctx, *s.stacks[i], fiber_entry, &t);
    }
    s.block_linear = block_linear;
    s.phase = 0;
    new_priorities(s);
    for (;;) {
        while (s.cursor < s.nthreads && s.threads[s.by_rank[s.cursor]].state != State::Runnable) ++s.cursor;
        if (s.cursor == s.nthreads) {
            if (s.live == 0) break;
            L.error = describe_deadlock(s);
            return false;
        }
        Thread& t = s.threads[s.by_rank[s.cursor]];
        s.current = &t;
        t_thread_idx = &t.tid;
        fiber_switch(s.scheduler, t.ctx);
        if (!L.error.empty()) return false;
    }
    return true;
}

std::string check_geometry(msim_dim3 grid, msim_dim3 block, uint32_t shared_bytes) {
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
        return format("launch with an empty grid (%u,%u,%u) or block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x, block.y, block.z);
    if (threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
        return format("block (%u,%u,%u) exceeds CUDA's limits (1024 threads, 1024 x 1024 x 64)", block.x, block.y, block.z);
    if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
        return format("grid (%u,%u,%u) exceeds CUDA's limits (2^31-1 x 65535 x 65535)", grid.x, grid.y, grid.z);
    if (shared_bytes > 0) return "dynamic shared memory is not emulated yet (the kernels use static __shared__ only)";
    return "";
}

}  // namespace

void syncthreads(int site) {
    Sim& s = sim();
    if (site >= 0 && site == s.launch->options.skip_barrier_site) return;
    Thread* t = s.current;
    t->state = State::AtBarrier;
    if (++s.at_barrier == s.live) release_barrier(s);
    // Even the last arrival yields: who runs first after a barrier is the scheduler's choice.
    yield_to_scheduler();
}

unsigned lane_id() { return sim().current->linear % 32; }

const unsigned char* warp_exchange(unsigned mask, const void* mine, size_t bytes) {
    Sim& s = sim();
    Thread* t = s.current;
    Warp& w = s.warps[t->linear / 32];
    const unsigned lane = t->linear % 32;
    if ((mask & w.live) != w.live || !(mask & (1u << lane)))
        fail(format("warp collective with mask %08x but live lanes %08x: partial-warp masks are not emulated", mask, w.live));
    if (bytes > kSlotBytes) fail("warp collective record too large");
    const unsigned parity = t->collectives++ & 1;
    if (bytes) std::memcpy(w.slots[parity][lane], mine, bytes);
    w.arrived[parity] |= 1u << lane;
    t->state = State::AtCollective;
    if (w.arrived[parity] == w.live) {
        for (unsigned l = 0; l < 32; ++l) {
            Thread& o = s.threads[(t->linear & ~31u) + l];
            if ((w.live >> l & 1) && o.state == State::AtCollective && ((o.collectives - 1) & 1) == parity) make_runnable(s, o);
        }
        w.arrived[parity] = 0;
    }
    yield_to_scheduler();
    return &w.slots[parity][0][0];
}

void shared_register(void* p, size_t bytes) {
    Launch& L = *sim().launch;
    for (const SharedVar& v : L.shared)
        if (v.p == p) return;
    // First time this launch meets the variable: no thread has written it yet (the thread that
    // registers it is the first to pass its declaration).
    L.shared.push_back({p, bytes});
    L.shared_bytes += bytes;
    poison(L.shared.back());
    if (L.shared_bytes > kStaticSharedLimit)
        fail(format("%zu bytes of static __shared__ memory, above CUDA's 48 KiB per block", L.shared_bytes));
}

void cp_async(void* dst, const void* src, unsigned cp_size, unsigned src_size) {
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) fail(format("cp.async of %u bytes: the ISA allows 4, 8 or 16", cp_size));
    if (src_size > cp_size) fail(format("cp.async src-size %u above cp-size %u", src_size, cp_size));
    if ((uintptr_t)dst % cp_size || (uintptr_t)src % cp_size) fail(format("cp.async of %u bytes from/to an address not aligned to it", cp_size));
    sim().current->copies.push_back({dst, src, cp_size, src_size, kUncommitted});
}

void cp_async_commit_group() {
    Thread& t = *sim().current;
    for (PendingCopy& c : t.copies)
        if (c.group == kUncommitted) c.group = t.committed_groups;
    ++t.committed_groups;
}

void cp_async_wait_group(unsigned n) {
    // The mutation deletes every wait of the launch: copies then land only when their thread
    // exits, as late as a GPU may land them.
    if (sim().launch->options.mutations & MSIM_MUTATE_SKIP_CP_ASYNC_WAIT) return;
    Thread& t = *sim().current;
    complete_copies(t, t.committed_groups >= n ? t.committed_groups - n : 0, false);
}

void cp_async_wait_all() {
    cp_async_commit_group();
    cp_async_wait_group(0);
}

void ldmatrix(unsigned* d, int num, bool trans, const void* row_address) {
    if (num != 1 && num != 2 && num != 4) fail(format("ldmatrix .x%d: the ISA has .x1, .x2 and .x4", num));
    const unsigned char* all = warp_exchange(0xffffffffu, &row_address, sizeof row_address);
    const unsigned lane = lane_id();
    auto row = [&](int matrix, unsigned r) {
        const unsigned char* p;
        std::memcpy(&p, all + kSlotBytes * (8 * matrix + r), sizeof p);
        return (const uint16_t*)p;
    };
    for (int j = 0; j < num; ++j) {
        uint16_t e[2];
        for (unsigned i = 0; i < 2; ++i) {
            // Fragment element (lane/4, 2(lane%4)+i), of the stored matrix or of its transpose.
            const unsigned r = lane / 4, c = 2 * (lane % 4) + i;
            e[i] = trans ? row(j, c)[r] : row(j, r)[c];
        }
        d[j] = (unsigned)e[0] | ((unsigned)e[1] << 16);
    }
}

void syncwarp(unsigned mask) { warp_exchange(mask, nullptr, 0); }

bool mutation_swap_mma_a12() { return sim().launch->options.mutations & MSIM_MUTATE_SWAP_MMA_A12; }
bool mutation_break_nf4_lookup() { return sim().launch->options.mutations & MSIM_MUTATE_BREAK_NF4_LOOKUP; }

}  // namespace msim

namespace msim {
namespace {

// The blocks of one launch, handed out to the OS threads that run it.
struct BlockQueue {
    BlockQueue(msim_dim3 g) : grid(g), total((uint64_t)g.x * g.y * g.z) {}
    msim_dim3 grid;
    uint64_t total;
    std::atomic<uint64_t> next{0};
    std::mutex error_lock;
    std::string error;  // the first fault; stops the others
};

// Runs blocks from `q` on this OS thread until none is left or one faults. A block's schedule
// depends only on the seed and the block's index, so which thread runs it changes nothing.
void run_blocks(const KernelEntry* kernel, void** params, const msim_options& options, msim_dim3 block, BlockQueue& q) {
    Sim& s = sim();
    Launch L;
    L.kernel = kernel;
    L.params = params;
    L.options = options;
    s.nthreads = block.x * block.y * block.z;
    while (s.stacks.size() < s.nthreads) {
        s.stacks.emplace_back(new FiberStack);
        s.stacks.back()->allocate(kStackBytes);
    }
    s.launch = &L;
    t_block.block_dim = dim3{block.x, block.y, block.z};
    t_block.grid_dim = dim3{q.grid.x, q.grid.y, q.grid.z};
    for (uint64_t b; (b = q.next.fetch_add(1)) < q.total;) {
        t_block.block_idx = uint3{(unsigned)(b % q.grid.x), (unsigned)(b / q.grid.x % q.grid.y), (unsigned)(b / ((uint64_t)q.grid.x * q.grid.y))};
        if (!run_block(s, b)) {
            std::lock_guard<std::mutex> g(q.error_lock);
            if (q.error.empty()) q.error = L.error;
            q.next = q.total;
            break;
        }
    }
    s.launch = nullptr;
    s.current = nullptr;
    t_thread_idx = nullptr;
}

}  // namespace
}  // namespace msim

// ---- C ABI ----------------------------------------------------------------------------------

namespace {

struct Flat {
    const msim::Module* module;
    const msim::KernelEntry* kernel;
};

const std::vector<Flat>& all_kernels() {
    static const std::vector<Flat> list = [] {
        std::vector<Flat> v;
        for (size_t m = 0; m < msim_module_count; ++m)
            for (size_t k = 0; k < msim_modules[m]->kernel_count; ++k) v.push_back({msim_modules[m], &msim_modules[m]->kernels[k]});
        return v;
    }();
    return list;
}

void set_error(char* err, size_t err_len, const std::string& what) {
    if (!err || err_len == 0) return;
    const size_t n = std::min(what.size(), err_len - 1);
    std::memcpy(err, what.data(), n);
    err[n] = 0;
}

}  // namespace

extern "C" size_t msim_kernel_count(void) { return all_kernels().size(); }

extern "C" int msim_kernel_info_at(size_t index, msim_kernel_info* out) {
    const auto& list = all_kernels();
    if (index >= list.size() || !out) return -1;
    const Flat& f = list[index];
    *out = msim_kernel_info{f.module->module, f.module->variant, f.kernel->name, f.kernel->param_count, f.kernel->param_sizes,
                            f.module->barrier_sites, f.module->barrier_lines};
    return 0;
}

extern "C" int msim_launch(size_t index, msim_dim3 grid, msim_dim3 block, uint32_t shared_bytes, void** params, const msim_options* options,
                           char* err, size_t err_len) {
    using namespace msim;
    const auto& list = all_kernels();
    if (index >= list.size()) {
        set_error(err, err_len, "no such kernel");
        return -1;
    }
    const std::string bad = check_geometry(grid, block, shared_bytes);
    if (!bad.empty()) {
        set_error(err, err_len, std::string(list[index].kernel->name) + ": " + bad);
        return -1;
    }
    if (sim().launch) {
        set_error(err, err_len, "msim_launch called from inside a kernel");
        return -1;
    }
    msim_options opts{};
    opts.skip_barrier_site = -1;
    if (options) opts = *options;
    BlockQueue q(grid);
    const unsigned workers = (unsigned)std::min<uint64_t>(std::max(opts.threads, 1u), q.total);
    // Extra OS threads, each with its own fibers and shared memory; the caller is one of them.
    std::vector<std::thread> helpers;
    for (unsigned i = 1; i < workers; ++i) helpers.emplace_back([&] { run_blocks(list[index].kernel, params, opts, block, q); });
    run_blocks(list[index].kernel, params, opts, block, q);
    for (std::thread& h : helpers) h.join();
    if (!q.error.empty()) {
        set_error(err, err_len, q.error);
        return -1;
    }
    return 0;
}
