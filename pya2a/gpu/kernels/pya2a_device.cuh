// Device helpers shared by every pya2a kernel file (ipc_alltoallv.cu, moe_fused.cu,
// pack.cu). The loader (pya2a/gpu/loader.py) pastes this file in place of
// `#include "pya2a_device.cuh"` before compiling, so the compiled-module cache keys on
// the whole text and NVRTC / hiprtc need no include path.
//
// Portable CUDA / HIP: the CUDA-only instructions are guarded (__CUDA_ARCH__, not
// __HIP_PLATFORM_AMD__) and fall back to fences and volatile accesses. Untested on AMD.

#ifndef PYA2A_DEVICE_CUH
#define PYA2A_DEVICE_CUH

typedef unsigned long long u64;
typedef long long i64;

#if defined(__CUDA_ARCH__) && !defined(__HIP_PLATFORM_AMD__)
#define PYA2A_NV 1
#else
#define PYA2A_NV 0
#endif

// A load that always goes to memory (flags written by other GPUs or processes).
__device__ __forceinline__ u64 ld_volatile(const u64* p) {
    return *(const volatile u64*)p;
}

// Store a flag with system-scope release: every store of this thread before it (and, after
// a block barrier, of the block) is visible to any reader that sees the flag.
__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
#if PYA2A_NV && (__CUDA_ARCH__ >= 700)
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#else
    __threadfence_system();
    *(volatile u64*)p = v;
#endif
}

// Back off briefly inside a spin loop (keeps the SM's issue slots for co-resident blocks,
// which may belong to another rank sharing the GPU).
__device__ __forceinline__ void spin_pause(unsigned int ns) {
#if PYA2A_NV && (__CUDA_ARCH__ >= 700)
    __nanosleep(ns);
#endif
}

// Wait until *p >= s.
__device__ __forceinline__ void spin_until_ge(const u64* p, u64 s) {
    while (ld_volatile(p) < s) spin_pause(32);
}

// Nanoseconds (global timer); clock cycles where there is none (only a backstop there).
__device__ __forceinline__ u64 now_ns() {
#if PYA2A_NV
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
#else
    return (u64)clock64();
#endif
}

// Programmatic dependent launch (sm_90+): wait until the previous grid in the stream has
// completed and its memory is visible (a no-op when this launch did not ask for overlap),
// then let the next grid be scheduled; it waits here in turn.
__device__ __forceinline__ void pdl_enter() {
#if PYA2A_NV && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Copy n words, four in flight per thread: loads first, then stores (source and
// destination may lie in one allocation).
template <typename T>
__device__ __forceinline__ void copy_words(const T* s, T* d, i64 n, i64 tid, i64 nth) {
    i64 k = tid;
    for (; k + 3 * nth < n; k += 4 * nth) {
        const T a = s[k], b = s[k + nth], c = s[k + 2 * nth], e = s[k + 3 * nth];
        d[k] = a;
        d[k + nth] = b;
        d[k + 2 * nth] = c;
        d[k + 3 * nth] = e;
    }
    for (; k < n; k += nth) d[k] = s[k];
}

__device__ __forceinline__ void copy_bytes(const char* s, char* d, i64 lo, i64 hi, i64 tid,
                                           i64 nth) {
    for (i64 k = lo + tid; k < hi; k += nth) d[k] = s[k];
}

template <typename T>
__device__ __forceinline__ void copy_aligned(const char* s, char* d, i64 n, i64 tid, i64 nth) {
    const i64 w = (i64)sizeof(T);
    i64 head = (w - (i64)((u64)s % (u64)w)) % w;
    if (head > n) head = n;
    copy_bytes(s, d, 0, head, tid, nth);
    const i64 nw = (n - head) / w;
    copy_words<T>((const T*)(s + head), (T*)(d + head), nw, tid, nth);
    copy_bytes(s, d, head + nw * w, n, tid, nth);
}

// Copy n bytes with threads tid = 0..nth-1 cooperating: 16-byte vectors when source and
// destination agree mod 16 (byte head and tail around the aligned body), 4-byte words
// when they agree mod 4, bytes otherwise.
__device__ __forceinline__ void span_copy(char* dst, const char* src, i64 n, i64 tid, i64 nth) {
    if (n <= 0) return;
    const u64 da = (u64)dst, sa = (u64)src;
    if (((da ^ sa) & 15ull) == 0) {
        copy_aligned<uint4>(src, dst, n, tid, nth);
    } else if (((da ^ sa) & 3ull) == 0) {
        copy_aligned<unsigned int>(src, dst, n, tid, nth);
    } else {
        copy_bytes(src, dst, 0, n, tid, nth);
    }
}

// The same with the threads of one block.
__device__ __forceinline__ void block_copy(char* dst, const char* src, i64 n) {
    span_copy(dst, src, n, (i64)threadIdx.x, (i64)blockDim.x);
}

#endif  // PYA2A_DEVICE_CUH
