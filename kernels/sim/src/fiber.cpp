#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstdio>

namespace msim {

FiberStack::~FiberStack() {
    if (base) munmap(base, size);
}

void FiberStack::allocate(size_t usable_bytes) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size = (usable_bytes + page - 1) / page * page + page;
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::fprintf(stderr, "minisam-gpusim: cannot map a %zu-byte fiber stack\n", size);
        std::abort();
    }
    base = (char*)p;
    mprotect(base, page, PROT_NONE);
}

}  // namespace msim

#if defined(__x86_64__) && !defined(MSIM_FIBER_UCONTEXT)

// msim_switch(void** save_sp, void* load_sp): pushes the callee-saved registers and the SSE/x87
// control words, stores the stack pointer, loads the other fiber's and pops the same. A new fiber's
// stack is laid out as if it had called msim_switch, returning into msim_fiber_start with the entry
// function in r12 and its argument in rbx.
asm(R"(
    .text
    .p2align 4
    .globl msim_switch
    .hidden msim_switch
    .type msim_switch,@function
msim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size msim_switch, .-msim_switch

    .p2align 4
    .globl msim_fiber_start
    .hidden msim_fiber_start
    .type msim_fiber_start,@function
msim_fiber_start:
    movq %rbx, %rdi
    callq *%r12
    ud2
    .size msim_fiber_start, .-msim_fiber_start
)");

extern "C" void msim_switch(void** save_sp, void* load_sp);
extern "C" void msim_fiber_start();

namespace msim {

void fiber_init(FiberContext& ctx, FiberStack& stack, void (*entry)(void*), void* arg) {
    // Frame popped by msim_switch, lowest address first: control words, r15, r14, r13, r12, rbx,
    // rbp, return address. The top is 16-byte aligned and the frame is 64 bytes, so
    // msim_fiber_start's call leaves the entry function with the ABI's alignment.
    uint64_t* sp = (uint64_t*)((uintptr_t)stack.top() & ~(uintptr_t)15) - 8;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    sp[0] = (uint64_t)mxcsr | ((uint64_t)fpucw << 32);
    sp[1] = 0;                    // r15
    sp[2] = 0;                    // r14
    sp[3] = 0;                    // r13
    sp[4] = (uint64_t)entry;      // r12
    sp[5] = (uint64_t)arg;        // rbx
    sp[6] = 0;                    // rbp
    sp[7] = (uint64_t)&msim_fiber_start;
    ctx.sp = sp;
}

void fiber_switch(FiberContext& from, FiberContext& to) { msim_switch(&from.sp, to.sp); }

void fiber_release(FiberContext&) {}

}  // namespace msim

#else

#include <ucontext.h>

namespace msim {

namespace {
struct Start {
    void (*entry)(void*);
    void* arg;
};
thread_local Start t_start;
void trampoline() {
    Start s = t_start;
    s.entry(s.arg);
    std::abort();
}
}  // namespace

void fiber_init(FiberContext& ctx, FiberStack& stack, void (*entry)(void*), void* arg) {
    if (!ctx.uc) ctx.uc = new ucontext_t;
    ucontext_t* uc = (ucontext_t*)ctx.uc;
    getcontext(uc);
    uc->uc_stack.ss_sp = stack.base;
    uc->uc_stack.ss_size = stack.size;
    uc->uc_link = nullptr;
    makecontext(uc, trampoline, 0);
    // makecontext passes only ints portably: the entry and its argument wait in `sp` until the
    // first switch into this fiber hands them to the trampoline through t_start.
    delete (Start*)ctx.sp;
    ctx.sp = new Start{entry, arg};
}

void fiber_switch(FiberContext& from, FiberContext& to) {
    if (!from.uc) from.uc = new ucontext_t;
    if (to.sp) {
        Start* s = (Start*)to.sp;
        t_start = *s;
        delete s;
        to.sp = nullptr;
    }
    swapcontext((ucontext_t*)from.uc, (ucontext_t*)to.uc);
}

void fiber_release(FiberContext& ctx) {
    delete (ucontext_t*)ctx.uc;
    ctx.uc = nullptr;
    delete (Start*)ctx.sp;
    ctx.sp = nullptr;
}

}  // namespace msim

#endif
