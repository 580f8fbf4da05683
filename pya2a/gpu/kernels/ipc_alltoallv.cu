// pya2a IPC all-to-all kernel: one launch moves every peer block, signalling with
// sequence-numbered flags in peer-mapped memory (no host barrier, graph capturable).
//
// Layout of the control block at the start of every rank's symmetric heap
// (must match pya2a/gpu/ipc.py: CTRL_* constants):
//   [0]      u64 seq         last completed call number (device-side, so graphs replay)
//   [8]      u32 done        blocks finished in the current call (reset by the last)
//   [128]    u64 rdy_seq[P]  written by peer r: "call s, here is my key for you"
//   [256]    u64 rdy_key[P]  key = (allocation index << 56) | byte offset in it
//   [1024]   u64 flag[P][B]  written by peer r: chunk c of call s is done
//   [8192]   u64 tab[S][P]   local: base address of allocation k on rank r (my VA)
//
// Protocol, push (mode 0), rank me, call s:
//   receiver role: tell each sender where to write (my recv buffer if it is
//     symmetric, else my staging slot for that sender), then wait flag[src][c] >= s
//     and copy the staging slot out if staged.
//   sender role: wait rdy_seq[dst] >= s, store chunk c into dst's memory, fence
//     (system scope), then set flag[me][c] = s in dst's control block.
// Protocol, pull (mode 1): the send buffer must be symmetric; the sender publishes
//   its key, the receiver reads from the peer and then sets flag[me][c] = s in
//   the sender's control block ("consumed"); the sender waits for that before the
//   call completes, so the send buffer may be reused after the call.
// A flag can never run ahead of the waiter (each side needs the other's previous
// call to finish first), so "wait until >= s" is exact.
//
// Every block spins on flags written by other GPUs: the grid must stay co-resident
// (the host keeps it at most the SM count), see GPU-NOTES.md.
//
// Portability: only __threadfence_system, volatile loads/stores and atomicAdd; the
// CUDA-only release store is guarded so hiprtc can build the file. Untested on AMD.

#define PYA2A_MAXP 8
#define PYA2A_MAXB 64
#define PYA2A_MAXS 32

#define CTRL_SEQ 0
#define CTRL_DONE 1
#define CTRL_RDY_SEQ 16
#define CTRL_RDY_KEY 32
#define CTRL_FLAG 128
#define CTRL_TAB 1024
#define KEY_SHIFT 56
#define KEY_MASK ((1ull << KEY_SHIFT) - 1ull)

typedef unsigned long long u64;
typedef long long i64;

struct Args {
    u64 sendbuf;
    u64 recvbuf;
    u64 ctrl;                    // my control block (= my heap base)
    u64 peer_ctrl[PYA2A_MAXP];   // peers' control blocks in my address space
    u64 my_key;                  // key of recvbuf (push) / sendbuf (pull); ~0 = staged
    u64 stage_off;               // byte offset of staging slots in the heap
    i64 slot_bytes;              // bytes per staging slot
    i64 scount[PYA2A_MAXP];
    i64 sdispl[PYA2A_MAXP];
    i64 rcount[PYA2A_MAXP];
    i64 rdispl[PYA2A_MAXP];
    i64 rank;
    i64 p;
    i64 bpp;                     // blocks per peer in this launch (grid = p * bpp)
    i64 min_chunk;               // bytes; chunks per pair = clamp(ceil(n / min_chunk), 1, max_chunks)
    i64 max_chunks;              // same on every rank
    i64 mode;                    // 0 push, 1 pull
};

__device__ __forceinline__ u64 ld_volatile(const u64* p) {
    return *(const volatile u64*)p;
}

__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 700) && !defined(__HIP_PLATFORM_AMD__)
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
#else
    __threadfence_system();
    *(volatile u64*)p = v;
#endif
}

__device__ __forceinline__ void spin_until_ge(const u64* p, u64 s) {
    while (ld_volatile(p) < s) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 700) && !defined(__HIP_PLATFORM_AMD__)
        __nanosleep(32);
#endif
    }
}

// Number of chunks and chunk size for a pair moving n bytes: a function of n and
// launch-independent constants only, so sender and receiver agree.
__device__ __forceinline__ void chunking(i64 n, const Args& a, i64* nch, i64* cs) {
    i64 k = (n + a.min_chunk - 1) / a.min_chunk;
    if (k < 1) k = 1;
    if (k > a.max_chunks) k = a.max_chunks;
    i64 c = (n + k - 1) / k;
    c = (c + 255) & ~(i64)255;   // keep chunk starts 256-byte aligned
    *nch = k;
    *cs = c;
}

// Block-wide byte copy; 16-byte vectors when source and destination agree mod 16,
// four vectors in flight per thread.
__device__ void block_copy(char* dst, const char* src, i64 n) {
    const i64 tid = threadIdx.x, nt = blockDim.x;
    if (n <= 0) return;
    const unsigned long long da = (unsigned long long)dst, sa = (unsigned long long)src;
    if (((da ^ sa) & 15ull) == 0) {
        i64 head = (i64)((16ull - (da & 15ull)) & 15ull);
        if (head > n) head = n;
        for (i64 i = tid; i < head; i += nt) dst[i] = src[i];
        const i64 nv = (n - head) >> 4;
        uint4* d4 = (uint4*)(dst + head);
        const uint4* s4 = (const uint4*)(src + head);
        i64 i = tid;
        for (; i + 3 * nt < nv; i += 4 * nt) {
            uint4 v0 = s4[i], v1 = s4[i + nt], v2 = s4[i + 2 * nt], v3 = s4[i + 3 * nt];
            d4[i] = v0; d4[i + nt] = v1; d4[i + 2 * nt] = v2; d4[i + 3 * nt] = v3;
        }
        for (; i < nv; i += nt) d4[i] = s4[i];
        const i64 done = head + (nv << 4);
        for (i64 j = done + tid; j < n; j += nt) dst[j] = src[j];
    } else if (((da ^ sa) & 3ull) == 0) {
        i64 head = (i64)((4ull - (da & 3ull)) & 3ull);
        if (head > n) head = n;
        for (i64 i = tid; i < head; i += nt) dst[i] = src[i];
        const i64 nw = (n - head) >> 2;
        unsigned int* d = (unsigned int*)(dst + head);
        const unsigned int* s = (const unsigned int*)(src + head);
        for (i64 i = tid; i < nw; i += nt) d[i] = s[i];
        for (i64 j = head + (nw << 2) + tid; j < n; j += nt) dst[j] = src[j];
    } else {
        for (i64 i = tid; i < n; i += nt) dst[i] = src[i];
    }
}

__device__ __forceinline__ char* key_addr(const Args& a, u64 key, int peer) {
    const u64* tab = (const u64*)a.ctrl + CTRL_TAB;
    const u64 k = key >> KEY_SHIFT;
    return (char*)(tab[k * PYA2A_MAXP + peer] + (key & KEY_MASK));
}

extern "C" __global__ void __launch_bounds__(512) pya2a_ipc_alltoallv(const Args a) {
    __shared__ u64 s_seq;
    __shared__ u64 s_key;
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank, p = (int)a.p;
    const int q = blockIdx.x / (int)a.bpp, c = blockIdx.x % (int)a.bpp;
    if (threadIdx.x == 0) s_seq = ld_volatile(ctrl + CTRL_SEQ) + 1;
    __syncthreads();
    const u64 s = s_seq;
    const int dst = (me + q) % p, src = (me - q + p) % p;
    i64 nch, cs;

    if (q == 0) {
        // own block: local copy
        const i64 n = a.scount[me];
        chunking(n, a, &nch, &cs);
        if (c < nch) {
            const i64 b = c * cs, e = (b + cs < n) ? b + cs : n;
            if (b < e)
                block_copy((char*)a.recvbuf + a.rdispl[me] + b,
                           (const char*)a.sendbuf + a.sdispl[me] + b, e - b);
        }
    } else if (a.mode == 0) {
        // --- push ---
        const i64 nr = a.rcount[src];
        const bool staged = (a.my_key == ~0ull);
        if (c == 0 && threadIdx.x == 0 && nr > 0) {
            const u64 key = staged ? (a.stage_off + (u64)src * (u64)a.slot_bytes) : (a.my_key + (u64)a.rdispl[src]);
            u64* pc = (u64*)a.peer_ctrl[src];
            *(volatile u64*)(pc + CTRL_RDY_KEY + me) = key;
            st_release_sys(pc + CTRL_RDY_SEQ + me, s);
        }
        const i64 ns = a.scount[dst];
        chunking(ns, a, &nch, &cs);
        if (ns > 0 && c < nch) {
            const i64 b = c * cs, e = (b + cs < ns) ? b + cs : ns;
            if (b < e) {
                if (threadIdx.x == 0) {
                    spin_until_ge(ctrl + CTRL_RDY_SEQ + dst, s);
                    __threadfence_system();
                    s_key = ld_volatile(ctrl + CTRL_RDY_KEY + dst);
                }
                __syncthreads();
                char* out = key_addr(a, s_key, dst);
                block_copy(out + b, (const char*)a.sendbuf + a.sdispl[dst] + b, e - b);
                __threadfence_system();
                __syncthreads();
                if (threadIdx.x == 0)
                    st_release_sys((u64*)a.peer_ctrl[dst] + CTRL_FLAG + me * PYA2A_MAXB + c, s);
            }
        }
        chunking(nr, a, &nch, &cs);
        if (nr > 0 && c < nch) {
            const i64 b = c * cs, e = (b + cs < nr) ? b + cs : nr;
            if (b < e) {
                if (threadIdx.x == 0) {
                    spin_until_ge(ctrl + CTRL_FLAG + src * PYA2A_MAXB + c, s);
                    __threadfence_system();
                }
                __syncthreads();
                if (staged)
                    block_copy((char*)a.recvbuf + a.rdispl[src] + b,
                               (const char*)a.ctrl + a.stage_off + (u64)src * (u64)a.slot_bytes + b, e - b);
            }
        }
    } else {
        // --- pull: sendbuf symmetric (my_key is its key) ---
        const i64 ns = a.scount[dst];
        if (c == 0 && threadIdx.x == 0 && ns > 0) {
            u64* pc = (u64*)a.peer_ctrl[dst];
            *(volatile u64*)(pc + CTRL_RDY_KEY + me) = a.my_key + (u64)a.sdispl[dst];
            st_release_sys(pc + CTRL_RDY_SEQ + me, s);
        }
        const i64 nr = a.rcount[src];
        chunking(nr, a, &nch, &cs);
        if (nr > 0 && c < nch) {
            const i64 b = c * cs, e = (b + cs < nr) ? b + cs : nr;
            if (b < e) {
                if (threadIdx.x == 0) {
                    spin_until_ge(ctrl + CTRL_RDY_SEQ + src, s);
                    __threadfence_system();
                    s_key = ld_volatile(ctrl + CTRL_RDY_KEY + src);
                }
                __syncthreads();
                const char* in = key_addr(a, s_key, src);
                block_copy((char*)a.recvbuf + a.rdispl[src] + b, in + b, e - b);
                __threadfence_system();
                __syncthreads();
                if (threadIdx.x == 0)
                    st_release_sys((u64*)a.peer_ctrl[src] + CTRL_FLAG + me * PYA2A_MAXB + c, s);
            }
        }
        chunking(ns, a, &nch, &cs);
        if (ns > 0 && c < nch) {
            const i64 b = c * cs, e = (b + cs < ns) ? b + cs : ns;
            if (b < e && threadIdx.x == 0) {
                spin_until_ge(ctrl + CTRL_FLAG + dst * PYA2A_MAXB + c, s);
            }
        }
    }

    // The last block to finish publishes the call number; every block read it above.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        unsigned int* done = (unsigned int*)(ctrl + CTRL_DONE);
        const unsigned int old = atomicAdd(done, 1u);
        if (old == gridDim.x - 1) {
            *(volatile unsigned int*)done = 0u;
            __threadfence();
            *(volatile u64*)(ctrl + CTRL_SEQ) = s;
        }
    }
}

// Copy-engine path helpers: the data moves with cudaMemcpyAsync into the peers'
// staging slots (host-known offsets); these kernels do the signalling.
// ce_pre: publish "slot free for call s" to every sender and wait for it from every
// receiver I will write to.
extern "C" __global__ void pya2a_ipc_ce_pre(const Args a) {
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank, p = (int)a.p;
    const u64 s = ld_volatile(ctrl + CTRL_SEQ) + 1;
    const int r = threadIdx.x;
    if (r < p && r != me) {
        if (a.rcount[r] > 0) {
            u64* pc = (u64*)a.peer_ctrl[r];
            *(volatile u64*)(pc + CTRL_RDY_KEY + me) = a.stage_off + (u64)r * (u64)a.slot_bytes;
            st_release_sys(pc + CTRL_RDY_SEQ + me, s);
        }
        if (a.scount[r] > 0) spin_until_ge(ctrl + CTRL_RDY_SEQ + r, s);
    }
}

// ce_post: after the copies, flag each receiver, wait for every sender, copy the
// staging slots out into the receive buffer, and publish the call number.
extern "C" __global__ void __launch_bounds__(512) pya2a_ipc_ce_post(const Args a) {
    __shared__ u64 s_seq;
    u64* ctrl = (u64*)a.ctrl;
    const int me = (int)a.rank, p = (int)a.p;
    if (threadIdx.x == 0) s_seq = ld_volatile(ctrl + CTRL_SEQ) + 1;
    __syncthreads();
    const u64 s = s_seq;
    const int q = blockIdx.x / (int)a.bpp, c = blockIdx.x % (int)a.bpp;
    const int dst = (me + q) % p, src = (me - q + p) % p;
    if (q != 0) {
        if (c == 0 && threadIdx.x == 0 && a.scount[dst] > 0) {
            __threadfence_system();
            st_release_sys((u64*)a.peer_ctrl[dst] + CTRL_FLAG + me * PYA2A_MAXB, s);
        }
        const i64 nr = a.rcount[src];
        if (nr > 0) {
            if (threadIdx.x == 0) {
                spin_until_ge(ctrl + CTRL_FLAG + src * PYA2A_MAXB, s);
                __threadfence_system();
            }
            __syncthreads();
            if (a.my_key == ~0ull) {
                const i64 cs = (((nr + a.bpp - 1) / a.bpp) + 255) & ~(i64)255;
                const i64 b = c * cs, e = (b + cs < nr) ? b + cs : nr;
                if (b < e)
                    block_copy((char*)a.recvbuf + a.rdispl[src] + b,
                               (const char*)a.ctrl + a.stage_off + (u64)src * (u64)a.slot_bytes + b, e - b);
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        unsigned int* done = (unsigned int*)(ctrl + CTRL_DONE);
        const unsigned int old = atomicAdd(done, 1u);
        if (old == gridDim.x - 1) {
            *(volatile unsigned int*)done = 0u;
            __threadfence();
            *(volatile u64*)(ctrl + CTRL_SEQ) = s;
        }
    }
}
