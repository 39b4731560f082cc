// Cooperative fibers: one per simulated GPU thread, switched only at synchronisation points.
//
// Why fibers and not one OS thread per GPU thread: the order in which threads run between two
// barriers is then chosen by the scheduler, not the OS, so every run is reproducible and the order
// can be made adversarial (see runtime.cpp); and a switch is a few instructions (x86-64: six
// callee-saved registers, the SSE/x87 control words and the stack pointer) with no system call,
// which matters because every warp collective (shuffle, mma) is a switch per lane.
//
// x86-64 has a hand-written switch; other hosts fall back to ucontext (correct, but each switch
// makes a sigprocmask system call). MINISAM_SIM_UCONTEXT=1 at build time selects the fallback on
// x86-64 too, to test it.
#pragma once

#include <cstddef>

namespace msim {

struct FiberContext {
    void* sp = nullptr;  // x86-64: the saved stack pointer
    void* uc = nullptr;  // fallback: a ucontext_t
};

// A fiber stack with a guard page below it (a kernel that overflows faults, never corrupts).
struct FiberStack {
    char* base = nullptr;  // the mapping, guard page included
    size_t size = 0;
    ~FiberStack();
    void allocate(size_t usable_bytes);
    char* top() const { return base + size; }
};

// Prepares `ctx` to run entry(arg) on `stack` the first time it is switched to. `entry` never
// returns: a finished fiber switches away for good.
void fiber_init(FiberContext& ctx, FiberStack& stack, void (*entry)(void*), void* arg);
// Saves the running context in `from` and resumes `to`.
void fiber_switch(FiberContext& from, FiberContext& to);
void fiber_release(FiberContext& ctx);

}  // namespace msim
